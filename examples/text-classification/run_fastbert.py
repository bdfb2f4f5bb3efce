"""Train a FastBERT classifier: fine-tune backbone + teacher, self-distill the students, report the speed trade-off.

One process:

    python examples/text-classification/run_fastbert.py \
        --model_name_or_path bert-base-uncased --dataset_name rotten_tomatoes --output_dir out/fastbert-rt

Local files (csv/json/parquet), sentence pairs and extra unlabeled text for distillation:

    python examples/text-classification/run_fastbert.py --model_name_or_path bert-base-uncased \
        --train_file train.csv --validation_file dev.csv --text_column premise --text_pair_column hypothesis \
        --label_column label --unlabeled_files more_text.csv --output_dir out/fastbert-pairs

Several processes (DDP; on CPU the gloo backend is picked automatically):

    torchrun --nproc_per_node 2 examples/text-classification/run_fastbert.py ...
    accelerate launch --num_processes 2 examples/text-classification/run_fastbert.py ...

Arguments can also come from a JSON file: `python run_fastbert.py args.json`.
"""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

from hf_fastbert.data import load_raw_datasets
from hf_fastbert.training import FastBertTrainingConfig, train_fastbert


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={
            "help": "A checkpoint of a supported family (BERT, RoBERTa, XLM-RoBERTa, ELECTRA, DistilBERT, ALBERT, "
            "DeBERTa-v2/v3, ModernBERT; Hub id or folder): pre-trained, fine-tuned or FastBERT."
        }
    )


@dataclass
class OutputArguments:
    output_dir: str = field(metadata={"help": "Where the final model, tokenizer, card and results go."})
    hub_token: str | None = field(
        default=None, metadata={"help": "A Hub token for push_to_hub (default: the saved login or HF_TOKEN)."}
    )


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "A dataset name for datasets.load_dataset."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset configuration name."})
    train_file: str | None = field(default=None, metadata={"help": "A local csv/json/parquet training file."})
    validation_file: str | None = field(default=None, metadata={"help": "A local csv/json/parquet validation file."})
    unlabeled_files: list[str] | None = field(
        default=None, metadata={"help": "Local csv/json/parquet files of unlabeled text, used for distillation."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation rows."})


def main(argv=None):
    # The run's options (columns, length, epochs, learning rates, speeds, Hub...) are train_fastbert's own config.
    parser = HfArgumentParser((ModelArguments, OutputArguments, DataArguments, FastBertTrainingConfig))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        arguments = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
        if "speeds" in arguments:  # the name of earlier versions of this script
            arguments["eval_speeds"] = arguments.pop("speeds")
        model_args, output_args, data_args, config = parser.parse_dict(arguments)
    else:
        model_args, output_args, data_args, config = parser.parse_args_into_dataclasses(argv)

    if data_args.dataset_name is not None:
        raw = load_raw_datasets(data_args.dataset_name, data_args.dataset_config_name)
    else:
        if data_args.train_file is None:
            parser.error("Give --dataset_name or --train_file.")
        files = {"train": data_args.train_file}
        if data_args.validation_file is not None:
            files[config.eval_split] = data_args.validation_file
        raw = load_raw_datasets(data_files=files)
    for split, limit in (("train", data_args.max_train_samples), (config.eval_split, data_args.max_eval_samples)):
        if limit is not None and split in raw:
            raw[split] = raw[split].select(range(min(limit, len(raw[split]))))
    unlabeled = None
    if data_args.unlabeled_files:
        unlabeled = load_raw_datasets(data_files={"unlabeled": data_args.unlabeled_files})["unlabeled"]

    output = train_fastbert(
        model_args.model_name_or_path,
        raw,
        output_args.output_dir,
        config,
        unlabeled_dataset=unlabeled,
        hub_token=output_args.hub_token,
        dataset_name=data_args.dataset_name or Path(data_args.validation_file or data_args.train_file).name,
    )
    for stage, how in output.convergence.items():
        print(
            f"{stage}: {how['stopped']} after {how['steps']} steps (best held-out {how['metric']}: {how['best']:.4g})"
        )
    if output.results:  # the main process, when there is a labelled evaluation split
        print(f"{'speed':>6} {'accuracy':>9} {'mean exit layer':>16} {'FLOPs speedup':>14}")
        for row in output.results:
            print(
                f"{row['speed']:>6.2f} {100 * row['accuracy']:>8.2f}% {row['mean_exit_layer']:>16.2f} "
                f"{row['flops_speedup']:>13.2f}x"
            )
        print(f"Saved to {output.output_dir}")


if __name__ == "__main__":
    try:
        main()
    finally:  # under torchrun: gloo's threads still running at interpreter exit would abort the process
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

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

import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from hf_fastbert.constants import DEFAULT_SPEEDS
from hf_fastbert.data import load_raw_datasets
from hf_fastbert.training import train_fastbert


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={
            "help": "A checkpoint of a supported family (BERT, RoBERTa, XLM-RoBERTa, ELECTRA, DistilBERT, ALBERT, "
            "DeBERTa-v2/v3, ModernBERT; Hub id or folder): pre-trained, fine-tuned or FastBERT."
        }
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
    text_column: str = field(default="text", metadata={"help": "The text column (first sentence of pairs)."})
    text_pair_column: str | None = field(default=None, metadata={"help": "The second sentence of sentence pairs."})
    label_column: str = field(default="label", metadata={"help": "The label column."})
    eval_split: str = field(default="validation", metadata={"help": "The labelled split evaluated after training."})
    max_length: int = field(default=128, metadata={"help": "Truncation length in tokens."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation rows."})


@dataclass
class RunArguments:
    output_dir: str = field(metadata={"help": "Where the final model, tokenizer, card and results go."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace a non-empty output_dir that is not a previous run's output."}
    )
    finetune_epochs: float | None = field(
        default=None,
        metadata={
            "help": "Stage 2 epochs, exactly (0 skips fine-tuning). Default: until the held-out loss stops "
            "improving, at most finetune_max_epochs, keeping the best weights."
        },
    )
    finetune_max_epochs: float = field(default=10.0, metadata={"help": "Stage 2 budget when converging."})
    finetune_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Stage 2 learning rate (default: 1e-4 below BERT-base size, 2e-5 for base-sized models)."},
    )
    distill_epochs: float | None = field(
        default=None,
        metadata={
            "help": "Stage 3 epochs, exactly (0 skips distillation). Default: until the students' held-out KL to the "
            "teacher stops improving, at most distill_max_epochs, keeping the best students."
        },
    )
    distill_max_epochs: float = field(default=10.0, metadata={"help": "Stage 3 budget when converging."})
    distill_learning_rate: float = field(default=1e-3, metadata={"help": "Stage 3 (students') learning rate."})
    distillation_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the KL."})
    batch_size: int = field(default=32, metadata={"help": "Per-device batch size of both stages."})
    seed: int = field(default=42, metadata={"help": "Random seed."})
    speeds: list[float] = field(default_factory=lambda: list(DEFAULT_SPEEDS), metadata={"help": "Speeds to report."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push the final model and its card to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "The Hub repository, e.g. user/fastbert-rt."})
    hub_token: str | None = field(default=None, metadata={"help": "A Hub token (defaults to the saved login)."})


def main(argv=None):
    parser = HfArgumentParser((ModelArguments, DataArguments, RunArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, run_args = parser.parse_json_file(argv[0])
    else:
        model_args, data_args, run_args = parser.parse_args_into_dataclasses(argv)

    if data_args.dataset_name is not None:
        raw = load_raw_datasets(data_args.dataset_name, data_args.dataset_config_name)
    else:
        if data_args.train_file is None:
            parser.error("Give --dataset_name or --train_file.")
        files = {"train": data_args.train_file}
        if data_args.validation_file is not None:
            files[data_args.eval_split] = data_args.validation_file
        raw = load_raw_datasets(data_files=files)
    for split, limit in (("train", data_args.max_train_samples), (data_args.eval_split, data_args.max_eval_samples)):
        if limit is not None and split in raw:
            raw[split] = raw[split].select(range(min(limit, len(raw[split]))))
    unlabeled = None
    if data_args.unlabeled_files:
        unlabeled = load_raw_datasets(data_files={"unlabeled": data_args.unlabeled_files})["unlabeled"]

    output = train_fastbert(
        model_args.model_name_or_path,
        raw,
        run_args.output_dir,
        text_column=data_args.text_column,
        text_pair_column=data_args.text_pair_column,
        label_column=data_args.label_column,
        eval_split=data_args.eval_split,
        unlabeled_dataset=unlabeled,
        max_length=data_args.max_length,
        finetune_epochs=run_args.finetune_epochs,
        finetune_learning_rate=run_args.finetune_learning_rate,
        finetune_max_epochs=run_args.finetune_max_epochs,
        distill_epochs=run_args.distill_epochs,
        distill_learning_rate=run_args.distill_learning_rate,
        distill_max_epochs=run_args.distill_max_epochs,
        distillation_temperature=run_args.distillation_temperature,
        batch_size=run_args.batch_size,
        seed=run_args.seed,
        eval_speeds=run_args.speeds,
        overwrite_output_dir=run_args.overwrite_output_dir,
        dataset_name=data_args.dataset_name or Path(data_args.validation_file or data_args.train_file).name,
        push_to_hub=run_args.push_to_hub,
        hub_model_id=run_args.hub_model_id,
        hub_token=run_args.hub_token,
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
    main()

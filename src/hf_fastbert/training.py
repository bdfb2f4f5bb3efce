"""FastBERT's two training stages end to end: fine-tune backbone + teacher, then self-distill the students.

Shared by `examples/text-classification/run_fastbert.py` and the `hf-fastbert train` command.
"""

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset, DatasetDict, concatenate_datasets
from transformers import AutoConfig, AutoTokenizer, Trainer, TrainingArguments

from .backbones import BACKBONES
from .configuration_fastbert import fastbert_config_class, validate_speeds
from .data import check_columns, label_maps, label_names_from, prepare_dataset
from .evaluation import DEFAULT_SPEEDS, FastBertMetrics, evaluate_speeds
from .modeling_fastbert import FastBertForSequenceClassification
from .trainer_fastbert import FastBertDistillationTrainer
from .training_args_fastbert import FastBertTrainingArguments, validate_temperature


logger = logging.getLogger(__name__)

RESULTS_FILENAME = "speed_results.json"


@dataclass
class FastBertTrainingOutput:
    """
    What [`train_fastbert`] returns.

    Args:
        model: the trained [`FastBertForSequenceClassification`] (eval mode).
        tokenizer: its tokenizer.
        output_dir: the folder the final model, tokenizer, card and `speed_results.json` were saved to.
        label_names: class names in index order.
        results: one dict per speed (`speed`, `accuracy`, `mean_exit_layer`, `flops_speedup`) on the evaluation
            split, or `None` without one.
        finetune_metrics / distill_metrics: the `train()` metrics of each stage (empty when a stage was skipped).
    """

    model: Any
    tokenizer: Any
    output_dir: str
    label_names: list[str]
    results: list[dict] | None = None
    finetune_metrics: dict = field(default_factory=dict)
    distill_metrics: dict = field(default_factory=dict)


def _stage_args(args_class, output_dir, epochs, learning_rate, common: dict, overrides: dict):
    settings = dict(
        output_dir=output_dir,
        num_train_epochs=epochs,
        learning_rate=learning_rate,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="steps",
        logging_steps=50,
        # Only the trained parameters reach DDP: no search for unused ones (see the module docstring).
        ddp_find_unused_parameters=False,
    )
    settings.update(common)
    settings.update(overrides)
    return args_class(**settings)


def _match_checkpoint_labels(config, label_names: list[str], reuse_teacher: bool) -> list[str]:
    """
    The label order to train with. A checkpoint that is already a classifier of the data's labels keeps its own order
    (its teacher's outputs mean those labels); with `reuse_teacher` (no fine-tuning) the checkpoint must be one.
    """
    is_classifier = any(name.endswith("ForSequenceClassification") for name in config.architectures or [])
    id2label = config.id2label or {}
    checkpoint_names = [str(id2label[i]) for i in sorted(id2label)]
    named = checkpoint_names and any(name != f"LABEL_{i}" for i, name in enumerate(checkpoint_names))
    if is_classifier and named and sorted(checkpoint_names) == sorted(label_names):
        return checkpoint_names
    if reuse_teacher:
        if not is_classifier:
            raise ValueError(
                "finetune_epochs=0 distills the checkpoint's own teacher, but the checkpoint is not a fine-tuned "
                "sequence classifier: fine-tune it first (finetune_epochs > 0)."
            )
        if named or len(checkpoint_names) != len(label_names):
            raise ValueError(
                f"finetune_epochs=0 distills the checkpoint's own teacher, but its labels {checkpoint_names} are not "
                f"the data's labels {label_names}."
            )
    return label_names


def train_fastbert(
    model_name_or_path: str,
    raw_datasets: DatasetDict,
    output_dir: str,
    *,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    eval_split: str | None = "validation",
    unlabeled_dataset: Dataset | None = None,
    distill_on_train: bool = True,
    max_length: int = 128,
    finetune_epochs: float = 3.0,
    finetune_learning_rate: float = 2e-5,
    distill_epochs: float = 5.0,
    distill_learning_rate: float = 2e-4,
    distillation_temperature: float = 1.0,
    batch_size: int = 32,
    warmup_ratio: float = 0.1,
    weight_decay: float = 0.01,
    seed: int = 42,
    eval_speeds=DEFAULT_SPEEDS,
    push_to_hub: bool = False,
    hub_model_id: str | None = None,
    hub_token: str | None = None,
    progress: bool = True,
    training_args: dict | None = None,
    finetune_args: dict | None = None,
    distill_args: dict | None = None,
) -> FastBertTrainingOutput:
    """
    Train a FastBERT classifier from a BERT checkpoint: stage 2 fine-tunes backbone + teacher with the stock
    [`Trainer`] (teacher cross-entropy; the students are frozen), stage 3 self-distills the students with
    [`FastBertDistillationTrainer`] (backbone and teacher frozen), then the model is evaluated at `eval_speeds` and
    saved with its tokenizer, a model card and `speed_results.json`.

    Every input is validated (columns, label sets, non-empty splits, speeds, the model's config) before any
    tokenization or training starts; `output_dir` receives the final files only at the end.

    Args:
        model_name_or_path (`str`):
            A checkpoint of a supported family (Hub id or folder): a pre-trained encoder (BERT, RoBERTa, XLM-RoBERTa,
            ELECTRA, DistilBERT, ALBERT, DeBERTa-v2/v3, ModernBERT), a fine-tuned `<Family>ForSequenceClassification`
            or a FastBERT checkpoint.
        raw_datasets (`datasets.DatasetDict`):
            Raw text splits; `"train"` is required and labelled. See [`hf_fastbert.data.load_raw_datasets`].
        output_dir (`str`):
            Where the final model goes (and stage 3's checkpoints, if saved). Stage 2's `Trainer` folder is
            `output_dir/_finetune`: the leading underscore keeps its checkpoints out of `push_to_hub` uploads.
        text_column, text_pair_column, label_column (`str`):
            Columns of the raw splits; `text_pair_column` for sentence pairs.
        eval_split (`str`, *optional*, defaults to `"validation"`):
            The labelled split to evaluate on after training (skipped when missing or `None`).
        unlabeled_dataset (`datasets.Dataset`, *optional*):
            Extra unlabeled text (same text column(s)) for distillation.
        distill_on_train (`bool`, *optional*, defaults to `True`):
            Also distill on the training texts (labels dropped). Without `unlabeled_dataset` the training texts are
            always used.
        max_length (`int`, *optional*, defaults to 128): Truncation length in tokens.
        finetune_epochs, finetune_learning_rate: Stage 2 (the paper: <= 3 epochs, 2e-5). 0 epochs skips stage 2 (the
            checkpoint's backbone and teacher must then already be fine-tuned).
        distill_epochs, distill_learning_rate: Stage 3 (the paper: 5 epochs, 2e-4). 0 epochs skips stage 3.
        distillation_temperature (`float`, *optional*, defaults to 1.0): See [`FastBertTrainingArguments`].
        batch_size, warmup_ratio, weight_decay, seed: Shared by both stages (per-device batch size).
        eval_speeds (`Iterable[float]`, *optional*, defaults to 0.0 .. 0.9): Speeds of the final evaluation.
        push_to_hub, hub_model_id, hub_token: Push the final model (with its card) to the Hub.
        progress (`bool`, *optional*, defaults to `True`): Progress bars.
        training_args, finetune_args, distill_args (`dict`, *optional*):
            Extra [`TrainingArguments`] fields for both stages, stage 2 only, stage 3 only (e.g. `{"bf16": True}`,
            `{"save_strategy": "epoch"}`).

    Returns:
        [`FastBertTrainingOutput`].
    """
    speeds = validate_speeds(eval_speeds, name="eval_speeds")
    if "train" not in raw_datasets:
        raise ValueError(f"The dataset has no 'train' split; its splits are {list(raw_datasets)}.")
    for name, epochs in (("finetune_epochs", finetune_epochs), ("distill_epochs", distill_epochs)):
        if epochs < 0:
            raise ValueError(f"`{name}` must be >= 0, got {epochs}.")
    text_columns = [text_column, text_pair_column]
    check_columns(raw_datasets["train"], text_columns + [label_column], "train")
    label_names = label_names_from(raw_datasets["train"], label_column)
    if len(label_names) < 2:
        raise ValueError(f"The training labels must have at least 2 classes, got {label_names}.")
    eval_raw = raw_datasets[eval_split] if eval_split is not None and eval_split in raw_datasets else None
    if eval_raw is not None:
        check_columns(eval_raw, text_columns + [label_column], eval_split)
    if unlabeled_dataset is not None:
        check_columns(unlabeled_dataset, text_columns, "unlabeled")
    validate_temperature(distillation_temperature)

    config = AutoConfig.from_pretrained(model_name_or_path)
    config_class = fastbert_config_class(config.model_type)  # ValueError naming the supported families
    longest = BACKBONES[config_class.backbone_model_type].max_length(config)
    if longest is not None and max_length > longest:
        raise ValueError(
            f"`max_length` ({max_length}) exceeds the {longest} tokens the model's max_position_embeddings allow."
        )
    label_names = _match_checkpoint_labels(config, label_names, reuse_teacher=finetune_epochs == 0)
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)

    def tokenize(dataset, split, labelled=True):
        return prepare_dataset(
            dataset,
            tokenizer,
            text_column,
            text_pair_column,
            label_column if labelled else None,
            label_names,
            max_length,
            split,
        )

    train_dataset = tokenize(raw_datasets["train"], "train")
    eval_dataset = tokenize(eval_raw, eval_split) if eval_raw is not None else None
    distill_parts = [train_dataset.remove_columns("labels")] if distill_on_train or unlabeled_dataset is None else []
    if unlabeled_dataset is not None:
        distill_parts.append(tokenize(unlabeled_dataset, "unlabeled", labelled=False))
    distill_dataset = concatenate_datasets(distill_parts) if len(distill_parts) > 1 else distill_parts[0]

    fastbert_config = config_class.from_pretrained(
        model_name_or_path, num_labels=len(label_names), **label_maps(label_names)
    )
    model = FastBertForSequenceClassification.from_pretrained(
        model_name_or_path, config=fastbert_config, ignore_mismatched_sizes=True
    )
    common = dict(
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        warmup_steps=warmup_ratio,  # a value < 1 is a fraction of the training steps
        weight_decay=weight_decay,
        seed=seed,
        disable_tqdm=not progress,
    )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available():
        # Several processes without an accelerator (torchrun/accelerate launch on CPU): transformers only runs DDP
        # (gloo) with use_cpu=True; without it every process would train alone on the whole dataset.
        common["use_cpu"] = True
    common.update(training_args or {})

    finetune_metrics, finetune_steps = {}, 0
    if finetune_epochs > 0:
        # Stage 2: the stock Trainer. The students are frozen: they get no gradient, and DDP needs no search for
        # unused parameters. A new teacher: students distilled from the old one (a FastBERT checkpoint) no longer match
        # it, and stage 2's checkpoints must not say otherwise.
        model.branches.requires_grad_(False)
        model.config.branches_distilled = False
        args = _stage_args(
            TrainingArguments,
            os.path.join(output_dir, "_finetune"),
            finetune_epochs,
            finetune_learning_rate,
            common,
            finetune_args or {},
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            compute_metrics=FastBertMetrics(model.config, speeds=[0.0]),
        )
        finetune_metrics = trainer.train().metrics
        finetune_steps = trainer.state.global_step
        model = trainer.accelerator.unwrap_model(trainer.model)

    distill_metrics = {}
    args = _stage_args(
        FastBertTrainingArguments,
        output_dir,
        max(distill_epochs, 0),
        distill_learning_rate,
        common,
        dict(distillation_temperature=distillation_temperature, eval_speeds=speeds, **(distill_args or {})),
    )
    distiller = FastBertDistillationTrainer(
        model=model, args=args, train_dataset=distill_dataset, eval_dataset=eval_dataset, processing_class=tokenizer
    )
    if distill_epochs > 0:
        distill_metrics = distiller.train().metrics
    model = distiller.accelerator.unwrap_model(distiller.model).eval()

    results = None
    if eval_dataset is not None and distiller.is_world_process_zero():
        results = evaluate_speeds(model, eval_dataset, speeds, batch_size=batch_size, progress=progress)
        distiller.speed_results = results
    distiller.save_model(output_dir)
    base_model = None if os.path.isdir(model_name_or_path) else model_name_or_path  # a Hub id for the card
    if distiller.is_world_process_zero():
        with open(os.path.join(output_dir, RESULTS_FILENAME), "w", encoding="utf-8") as file:
            summary = {
                "label_names": label_names,
                "num_processes": distiller.args.world_size,
                "finetune_steps": finetune_steps,
                "distill_steps": distiller.state.global_step,
                "results": results,
            }
            json.dump(summary, file, indent=2)
        distiller.create_model_card(finetuned_from=base_model)
    if push_to_hub:
        distiller.args.hub_model_id = hub_model_id
        distiller.args.hub_token = hub_token
        distiller.push_to_hub(finetuned_from=base_model)
    return FastBertTrainingOutput(
        model=model,
        tokenizer=tokenizer,
        output_dir=output_dir,
        label_names=label_names,
        results=results,
        finetune_metrics=finetune_metrics,
        distill_metrics=distill_metrics,
    )


__all__ = ["FastBertTrainingOutput", "RESULTS_FILENAME", "train_fastbert"]

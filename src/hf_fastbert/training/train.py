"""FastBERT's two training stages end to end: fine-tune backbone + teacher, then self-distill the students.

Shared by `examples/text-classification/run_fastbert.py` and the `hf-fastbert train` command.
"""

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict, concatenate_datasets
from huggingface_hub.utils import validate_repo_id
from transformers import AutoConfig, AutoTokenizer, Trainer, TrainingArguments

from ..analysis import Sweep, describe_drop, results_source, sweep_logits, write_sweep
from ..backbones import BACKBONES, takes_token_type_ids
from ..configuration_fastbert import fastbert_config_class
from ..constants import MAX_ACCURACY_DROP, RESULTS_FILENAME
from ..convergence import ConvergenceCallback, split_held_out
from ..data import check_columns, label_maps, label_names_from, prepare_dataset
from ..evaluation import FastBertMetrics, metrics_at_speeds, predict_all_logits
from ..modelcard import push_model_to_hub
from ..modeling_fastbert import FastBertForSequenceClassification
from ..trainer_fastbert import FastBertDistillationTrainer
from ..training_args_fastbert import (
    DISTILL_MIN_IMPROVEMENT,
    FastBertTrainingArguments,
)
from .config import FastBertTrainingConfig
from .output_dir import check_output_dir, staged_output_dir


logger = logging.getLogger(__name__)

# Fine-tuning learning rate by model size: 1e-4 measured for small models (6-layer MiniLM: 74.2% where the paper's 2e-5
# reached 53.5% on a 20-class task); the paper's 2e-5 for base-sized ones (hidden size >= 768; not measured here).
SMALL_MODEL_LEARNING_RATE = 1e-4
BASE_MODEL_LEARNING_RATE = 2e-5
BASE_HIDDEN_SIZE = 768


def default_finetune_learning_rate(config) -> float:
    """The fine-tuning learning rate `train_fastbert` uses when none is given: 1e-4 for models smaller than
    BERT-base (hidden size < 768), the paper's 2e-5 otherwise."""
    hidden = getattr(config, "hidden_size", None) or getattr(config, "dim", None) or BASE_HIDDEN_SIZE
    return SMALL_MODEL_LEARNING_RATE if hidden < BASE_HIDDEN_SIZE else BASE_MODEL_LEARNING_RATE


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
        results_data / results_samples: which data (in words) and how many samples the results were measured on.
        finetune_metrics / distill_metrics: the `train()` metrics of each stage (empty when a stage was skipped).
        convergence: how each converging stage stopped, `{"finetune": ..., "distill": ...}`
            ([`hf_fastbert.convergence.ConvergenceCallback.summary`]); a stage run for fixed epochs is absent.
        default_speed: how the saved `config.speed` was chosen, or `None` when it was not calibrated: `exit_rule`,
            `speed`, `max_accuracy_drop`, `confidence`, `data` and `samples` (what it was chosen on), `accuracy` and
            `reference_accuracy` (full depth) there, `flops_speedup` and `accuracy_drop_se`
            ([`calibrate_default_speed`]).
        eval_logits: the evaluation split's full-depth pass `(all_logits, seq_lengths, labels)`
            ([`hf_fastbert.evaluation.predict_all_logits`]), from which `results` were computed; `None` without one.
        sweep: what that pass gives besides ([`hf_fastbert.analysis.Sweep`]: the oracle, the students against the
            teacher, the LUHA rows), also written to `output_dir/sweep/`; `None` without an evaluation split.
    """

    model: Any
    tokenizer: Any
    output_dir: str
    label_names: list[str]
    results: list[dict] | None = None
    results_data: str | None = None
    results_samples: int | None = None
    finetune_metrics: dict = field(default_factory=dict)
    distill_metrics: dict = field(default_factory=dict)
    convergence: dict = field(default_factory=dict)
    default_speed: dict | None = None
    eval_logits: tuple | None = None
    sweep: Sweep | None = None


def calibrate_default_speed(
    model, all_logits, seq_lengths, labels, data: str, max_accuracy_drop=MAX_ACCURACY_DROP, confidence=None
) -> dict:
    """
    Set `model.config.speed` to the largest speed (0, 0.01, ..., 0.99) of the model's exit rule whose accuracy on the
    given full-depth pass (of `data`, in words) stays within `max_accuracy_drop` (a fraction) of full depth, and
    describe the choice.

    Returns:
        `dict` with `exit_rule`, `speed`, `max_accuracy_drop`, `data` ("1,000 samples of <data>"), `samples`,
        `accuracy`, `reference_accuracy`, `flops_speedup` (the last three on the same data) and `accuracy_drop_se`
        (the standard error of the drop measured there: what it may be on new data).
    """
    from ..analysis import calibrate_logits

    choice = calibrate_logits(
        model,
        all_logits,
        seq_lengths,
        labels,
        max_accuracy_drop=max_accuracy_drop,
        confidence=confidence,
        exit_rules=model.config.exit_rule,
    )
    return {
        "exit_rule": choice.exit_rule,
        "speed": choice.speed,
        "max_accuracy_drop": max_accuracy_drop,
        "confidence": confidence,
        "data": f"{len(labels):,} samples of {data}",
        "samples": len(labels),
        "accuracy": choice.row["accuracy"],
        "reference_accuracy": choice.reference["accuracy"],
        "flops_speedup": choice.row["flops_speedup"],
        "accuracy_drop_se": choice.row["accuracy_drop_se"],
    }


def describe_default_speed(default_speed: dict, advise: bool = False) -> str:
    """The default speed and how it was chosen (printed by `train`, written on the model card), with the bound on its
    expected drop when the standard error is known; `advise` adds how to choose a speed that keeps the budget at a
    confidence (for the person training, not the card's readers)."""
    confidence = default_speed.get("confidence")
    within = f"within {100 * default_speed['max_accuracy_drop']:g} accuracy points of full depth"
    if confidence:
        within += f" at {confidence:.0%} confidence, tested in order of speed"
    text = (
        f"Default speed {default_speed['speed']:g} ({default_speed['exit_rule']} rule): the largest speed {within} on "
        f"{default_speed['data']} ({default_speed['accuracy']:.2%} against {default_speed['reference_accuracy']:.2%}, "
        f"{default_speed['flops_speedup']:.2f}x fewer FLOPs). `speed=0` runs every layer."
    )
    if default_speed.get("accuracy_drop_se") is not None and default_speed["speed"] > 0:
        drop = {"accuracy": default_speed["accuracy"], "accuracy_drop_se": default_speed["accuracy_drop_se"]}
        reference = {"accuracy": default_speed["reference_accuracy"]}
        text += f" Measured: {describe_drop(drop, reference, confidence or 0.95)}."
        if advise and not confidence:
            text += (
                " `--accuracy-confidence 0.95` (or `hf-fastbert calibrate ... --confidence 0.95`) chooses a speed "
                "whose expected drop stays within the budget at that confidence."
            )
    return text


def _warmup_steps(common: dict, warmup_ratio: float, num_samples: int, epochs: float) -> int:
    """Warmup of a stage trained until convergence: `warmup_ratio` of its first 3 epochs' steps (the paper's 10% of 3
    epochs), not of the whole budget, which it rarely uses."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    batch = common["per_device_train_batch_size"] * world_size * common.get("gradient_accumulation_steps", 1)
    return round(warmup_ratio * min(epochs, 3.0) * math.ceil(num_samples / batch))


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


def training_notes(convergence, finetune_steps, finetune_learning_rate, distill_epochs, distill_learning_rate):
    """The model card's "Training" section: each stage's learning rate and how it stopped."""
    from ..convergence import describe_convergence

    notes = []
    if finetune_steps:
        how = describe_convergence(convergence["finetune"], "fine-tuning") if "finetune" in convergence else None
        notes.append(
            f"- Fine-tuning (backbone + teacher, cross-entropy), learning rate {finetune_learning_rate:g}, "
            f"{finetune_steps} steps" + (f": {how}" if how else " (fixed number of epochs).")
        )
    if distill_epochs > 0:
        how = describe_convergence(convergence["distill"], "self-distillation") if "distill" in convergence else None
        notes.append(
            f"- Self-distillation (students learn the frozen teacher's soft labels), learning rate "
            f"{distill_learning_rate:g}" + (f": {how}" if how else ", fixed number of epochs.")
        )
    return "\n".join(notes) or None


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
    config: FastBertTrainingConfig | None = None,
    *,
    unlabeled_dataset: Dataset | None = None,
    dataset_name: str | None = None,
    hub_token: str | None = None,
    training_args: dict | None = None,
    finetune_args: dict | None = None,
    distill_args: dict | None = None,
    **options,
) -> FastBertTrainingOutput:
    """
    Train a FastBERT classifier from a BERT checkpoint: stage 2 fine-tunes backbone + teacher with the stock
    [`Trainer`] (teacher cross-entropy; the students are frozen), stage 3 self-distills the students with
    [`FastBertDistillationTrainer`] (backbone and teacher frozen), then the model is evaluated at `config.eval_speeds`
    and saved with its tokenizer, a model card and `speed_results.json`.

    Every input is validated (columns, label sets, non-empty splits, speeds, the model's config, the output folder,
    the Hub repo id) before any tokenization or training starts. The run writes into a partial folder next to
    `output_dir` that replaces it only once everything is saved ([`staged_output_dir`]): an interrupted run leaves
    `output_dir` as it was, and a finished one never mixes its files with an earlier run's.

    Args:
        model_name_or_path (`str`):
            A checkpoint of a supported family (Hub id or folder): a pre-trained encoder (BERT, RoBERTa, XLM-RoBERTa,
            ELECTRA, DistilBERT, ALBERT, DeBERTa-v2/v3, ModernBERT), a fine-tuned `<Family>ForSequenceClassification`
            or a FastBERT checkpoint.
        raw_datasets (`datasets.DatasetDict`):
            Raw text splits; `"train"` is required and labelled. See [`hf_fastbert.data.load_raw_datasets`].
        output_dir (`str`):
            Where the final model goes (and stage 3's checkpoints, if saved; stage 2's go to `output_dir/_finetune`).
            It must not exist, be empty, or be a previous run's output holding nothing else (see
            [`check_output_dir`]), unless `config.overwrite_output_dir`.
        config ([`FastBertTrainingConfig`], *optional*):
            The options of the run (columns, length, both stages' epochs and learning rates, the final sweep, the
            default speed, the output folder, the Hub); its defaults when not given.
        unlabeled_dataset (`datasets.Dataset`, *optional*):
            Extra unlabeled text (same text column(s)) for distillation.
        dataset_name (`str`, *optional*):
            What the data is called (e.g. `"rotten_tomatoes"`), so that the results and the model card say which
            data they were measured on: "1,000 samples of rotten_tomatoes (validation split)".
        hub_token (`str`, *optional*): A Hub token for `push_to_hub` (default: the saved login or `HF_TOKEN`).
        training_args, finetune_args, distill_args (`dict`, *optional*):
            Extra [`TrainingArguments`] fields for both stages, stage 2 only, stage 3 only (e.g. `{"bf16": True}`,
            `{"save_strategy": "epoch"}`). Not `push_to_hub`: use the config's `push_to_hub`.
        **options:
            Fields of [`FastBertTrainingConfig`] as keywords (`finetune_epochs=1, max_length=64`): they replace the
            `config`'s. An unknown name is a `TypeError`.

    Returns:
        [`FastBertTrainingOutput`].
    """
    config = _with_options(config, options)
    if "train" not in raw_datasets:
        raise ValueError(f"The dataset has no 'train' split; its splits are {list(raw_datasets)}.")
    speeds = config.eval_speeds
    finetune_converges, distill_converges = config.finetune_epochs is None, config.distill_epochs is None
    finetune_epochs = config.finetune_max_epochs if finetune_converges else config.finetune_epochs
    distill_epochs = config.distill_max_epochs if distill_converges else config.distill_epochs
    text_columns = [config.text_column, config.text_pair_column]
    check_columns(raw_datasets["train"], text_columns + [config.label_column], "train")
    label_names = label_names_from(raw_datasets["train"], config.label_column)
    if len(label_names) < 2:
        raise ValueError(f"The training labels must have at least 2 classes, got {label_names}.")
    if (finetune_converges and finetune_epochs > 0) or (distill_converges and distill_epochs > 0):
        if len(raw_datasets["train"]) < 2:
            raise ValueError(
                "Training until convergence holds out part of the training split, which needs at least 2 samples: "
                "give more data or fixed numbers of epochs."
            )
    eval_raw = (
        raw_datasets[config.eval_split]
        if config.eval_split is not None and config.eval_split in raw_datasets
        else None
    )
    if eval_raw is not None:
        check_columns(eval_raw, text_columns + [config.label_column], config.eval_split)
    if unlabeled_dataset is not None:
        check_columns(unlabeled_dataset, text_columns, "unlabeled")
    for name, extra in (
        ("training_args", training_args),
        ("finetune_args", finetune_args),
        ("distill_args", distill_args),
    ):
        if (extra or {}).get("push_to_hub"):
            raise ValueError(
                f"`{name}` cannot set push_to_hub (the stages' pushes upload whole training folders, "
                "training_args.bin included): use train_fastbert(push_to_hub=True)."
            )
    hub_repo_id = None
    if config.push_to_hub:
        hub_repo_id = config.hub_model_id or Path(os.path.abspath(output_dir)).name
        try:
            validate_repo_id(hub_repo_id)
        except ValueError as error:
            raise ValueError(f"Cannot push to {hub_repo_id!r}: {error}") from None
    check_output_dir(output_dir, config.overwrite_output_dir)

    checkpoint_config = AutoConfig.from_pretrained(model_name_or_path)
    config_class = fastbert_config_class(checkpoint_config.model_type)  # ValueError naming the supported families
    longest = BACKBONES[config_class.backbone_model_type].max_length(checkpoint_config)
    if longest is not None and config.max_length > longest:
        raise ValueError(
            f"`max_length` ({config.max_length}) exceeds the {longest} tokens the model's max_position_embeddings "
            "allow."
        )
    label_names = _match_checkpoint_labels(checkpoint_config, label_names, reuse_teacher=finetune_epochs == 0)
    finetune_learning_rate = config.finetune_learning_rate or default_finetune_learning_rate(checkpoint_config)
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)

    def tokenize(dataset, split, labelled=True):
        return prepare_dataset(
            dataset,
            tokenizer,
            config.text_column,
            config.text_pair_column,
            config.label_column if labelled else None,
            label_names,
            config.max_length,
            split,
            token_type_ids=takes_token_type_ids(checkpoint_config),  # a BERT tokenizer on DistilBERT or ModernBERT
        )

    train_dataset = tokenize(raw_datasets["train"], "train")
    eval_dataset = tokenize(eval_raw, config.eval_split) if eval_raw is not None else None
    held_out = None
    if (finetune_converges and finetune_epochs > 0) or (distill_converges and distill_epochs > 0):
        # Convergence is measured on a slice of the training split that neither stage trains on; never on the
        # evaluation split the results are reported on.
        train_dataset, held_out = split_held_out(train_dataset, config.held_out_fraction, seed=config.seed)
    distill_parts = (
        [train_dataset.remove_columns("labels")] if config.distill_on_train or unlabeled_dataset is None else []
    )
    if unlabeled_dataset is not None:
        distill_parts.append(tokenize(unlabeled_dataset, "unlabeled", labelled=False))
    distill_dataset = concatenate_datasets(distill_parts) if len(distill_parts) > 1 else distill_parts[0]

    uncertainty_top_k = config.uncertainty_top_k
    if uncertainty_top_k == "auto":
        uncertainty_top_k = 2 if len(label_names) > 2 else None
    fastbert_config = config_class.from_pretrained(
        model_name_or_path,
        num_labels=len(label_names),
        uncertainty_top_k=uncertainty_top_k,
        **label_maps(label_names),
    )
    model = FastBertForSequenceClassification.from_pretrained(
        model_name_or_path, config=fastbert_config, ignore_mismatched_sizes=True
    )
    common = dict(
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        warmup_steps=config.warmup_ratio,  # a value < 1 is a fraction of the training steps
        weight_decay=config.weight_decay,
        seed=config.seed,
        disable_tqdm=not config.progress,
        dataloader_pin_memory=torch.accelerator.is_available(),  # without an accelerator pinning only warns
    )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available():
        # Several processes without an accelerator (torchrun/accelerate launch on CPU): transformers only runs DDP
        # (gloo) with use_cpu=True; without it every process would train alone on the whole dataset.
        common["use_cpu"] = True
    common.update(training_args or {})

    with staged_output_dir(output_dir) as work_dir:
        finetune_metrics, finetune_steps, convergence = {}, 0, {}
        if finetune_epochs > 0:
            # Stage 2: the stock Trainer. The students are frozen: they get no gradient, and DDP needs no search
            # for unused parameters. A new teacher: students distilled from the old one (a FastBERT checkpoint) no
            # longer match it, and stage 2's checkpoints must not say otherwise.
            model.branches.requires_grad_(False)
            model.config.branches_distilled = False
            args = _stage_args(
                TrainingArguments,
                os.path.join(work_dir, "_finetune"),
                finetune_epochs,
                finetune_learning_rate,
                common,
                {
                    **(
                        {
                            "warmup_steps": _warmup_steps(
                                common, config.warmup_ratio, len(train_dataset), finetune_epochs
                            )
                        }
                        if finetune_converges and "warmup_steps" not in (training_args or {})
                        else {}
                    ),
                    **(finetune_args or {}),
                },
            )
            callbacks = []
            if finetune_converges:
                finetune_convergence = ConvergenceCallback(
                    "eval_loss", patience=config.finetune_patience, description="fine-tuning"
                )
                callbacks.append(finetune_convergence)
            # A fixed number of epochs needs no stopping data: fine-tuning then learns from every labelled sample,
            # and the held-out slice is only the students' (they never train on it either way).
            finetune_dataset = train_dataset
            if not finetune_converges and held_out is not None:
                finetune_dataset = concatenate_datasets([train_dataset, held_out])
            trainer = Trainer(
                model=model,
                args=args,
                train_dataset=finetune_dataset,
                eval_dataset=held_out if finetune_converges else eval_dataset,
                processing_class=tokenizer,
                compute_metrics=FastBertMetrics(model.config, speeds=[0.0]),
                callbacks=callbacks,
            )
            finetune_metrics = trainer.train().metrics
            finetune_steps = trainer.state.global_step
            model = trainer.accelerator.unwrap_model(trainer.model)
            if finetune_converges:
                convergence["finetune"] = finetune_convergence.summary()

        distill_metrics = {}
        args = _stage_args(
            FastBertTrainingArguments,
            work_dir,
            max(distill_epochs, 0),
            config.distill_learning_rate,
            common,
            {
                "distillation_temperature": config.distillation_temperature,
                "cache_states": config.distill_cache_states,
                "eval_speeds": speeds,
                "convergence_patience": config.distill_patience if distill_converges else None,
                "convergence_min_improvement": DISTILL_MIN_IMPROVEMENT,
                **(
                    {"warmup_steps": _warmup_steps(common, config.warmup_ratio, len(distill_dataset), distill_epochs)}
                    if distill_converges and "warmup_steps" not in (training_args or {})
                    else {}
                ),
                **(distill_args or {}),
            },
        )
        distiller = FastBertDistillationTrainer(
            model=model,
            args=args,
            train_dataset=distill_dataset,
            # Converging: the students' KL on the held-out slice (its labels give accuracy in the logs, the loss
            # ignores them). Otherwise the evaluation split, as `evaluate()` would use it.
            eval_dataset=held_out if distill_converges else eval_dataset,
            processing_class=tokenizer,
        )
        if distill_epochs > 0:
            distill_metrics = distiller.train().metrics
            if distiller.convergence is not None:
                convergence["distill"] = distiller.convergence
        model = distiller.accelerator.unwrap_model(distiller.model).eval()

        results, eval_logits, default_speed, report = None, None, None, None
        if eval_dataset is not None and distiller.is_world_process_zero():
            # The one full-depth pass over the evaluation split: every speed, the oracle, the students, the plots.
            eval_logits = predict_all_logits(
                model, eval_dataset, batch_size=config.batch_size, progress=config.progress
            )
            all_logits, seq_lengths, labels = eval_logits
            results = metrics_at_speeds(all_logits, seq_lengths, model.config, speeds, labels=labels)
            report = sweep_logits(all_logits, seq_lengths, labels, model.config, speeds, None, config.luha_bins)
            distiller.speed_results = results
            distiller.speed_results_samples = len(eval_dataset)
            distiller.speed_results_data = f"{dataset_name or 'the data'} ({config.eval_split} split)"
        if (
            config.max_accuracy_drop is not None
            and model.config.branches_distilled
            and distiller.is_world_process_zero()
        ):
            if eval_logits is not None and config.eval_split != "test":
                calibration_logits, data = eval_logits, distiller.speed_results_data
            elif held_out is not None:
                calibration_logits = predict_all_logits(
                    model, held_out, batch_size=config.batch_size, progress=config.progress
                )
                data = f"the held-out slice of {dataset_name or 'the data'} (train split)"
            else:
                calibration_logits = None
                logger.warning(
                    "No labelled data to choose the default speed on (no eval split other than 'test', no held-out "
                    "slice): the model keeps speed %g.",
                    model.config.speed,
                )
            if calibration_logits is not None:
                default_speed = calibrate_default_speed(
                    model, *calibration_logits, data, config.max_accuracy_drop, config.accuracy_confidence
                )
        distiller.training_notes = training_notes(
            convergence, finetune_steps, finetune_learning_rate, distill_epochs, config.distill_learning_rate
        )
        if default_speed is not None:
            distiller.training_notes = "\n".join(
                filter(None, [distiller.training_notes, f"- {describe_default_speed(default_speed)}"])
            )
        distiller.save_model(work_dir)
        base_model = None if os.path.isdir(model_name_or_path) else model_name_or_path  # a Hub id for the card
        if distiller.is_world_process_zero():
            with open(os.path.join(work_dir, RESULTS_FILENAME), "w", encoding="utf-8") as file:
                summary = {
                    "label_names": label_names,
                    "num_processes": distiller.args.world_size,
                    "finetune_steps": finetune_steps,
                    "distill_steps": distiller.state.global_step,
                    "finetune_learning_rate": finetune_learning_rate if finetune_steps else None,
                    "distill_learning_rate": config.distill_learning_rate if distill_epochs > 0 else None,
                    "held_out_samples": len(held_out) if held_out is not None else 0,
                    "convergence": convergence,
                    "default_speed": default_speed,
                    "training_notes": distiller.training_notes,
                    "data": distiller.speed_results_data if results else None,
                    "samples": distiller.speed_results_samples if results else None,
                    "results": results,
                }
                json.dump(summary, file, indent=2)
            if report is not None:
                rule = model.config.exit_rule  # said in the rows: a later calibrate to another rule shows
                source = results_source(
                    str(Path(output_dir).expanduser().resolve()), distiller.speed_results_data, len(eval_dataset)
                )
                write_sweep(
                    [{"exit_rule": rule, **row} for row in results],
                    report.luha,
                    Path(work_dir) / "sweep",
                    "FastBERT: accuracy against speed-up",
                    {**source, "exit_rule": rule},
                    report.oracle,
                    students=report.students,
                )
            distiller.create_model_card(finetuned_from=base_model)
    if config.push_to_hub and distiller.is_world_process_zero():
        try:
            push_model_to_hub(
                model,
                hub_repo_id,
                commit_message="End of training",
                token=hub_token,
                private=config.hub_private_repo,
                tokenizer=tokenizer,
                **distiller._card_arguments(finetuned_from=base_model),
            )
        except Exception:
            logger.error(
                "Pushing to %s failed; the trained model is saved in %s: push it with `hf-fastbert push %s %s`.",
                hub_repo_id,
                output_dir,
                output_dir,
                hub_repo_id,
            )
            raise
    # Every process returns once the main one has published (and pushed) the model: `output_dir` is then complete.
    distiller.accelerator.wait_for_everyone()
    return FastBertTrainingOutput(
        model=model,
        tokenizer=tokenizer,
        output_dir=output_dir,
        label_names=label_names,
        results=results,
        results_data=distiller.speed_results_data if results else None,
        results_samples=distiller.speed_results_samples if results else None,
        finetune_metrics=finetune_metrics,
        distill_metrics=distill_metrics,
        convergence=convergence,
        default_speed=default_speed,
        eval_logits=eval_logits,
        sweep=report,
    )


def _with_options(config: FastBertTrainingConfig | None, options: dict) -> FastBertTrainingConfig:
    """`config` (default: the defaults) with the options given as keywords; a `TypeError` naming an unknown one."""
    unknown = sorted(set(options) - set(FastBertTrainingConfig.option_names()))
    if unknown:
        raise TypeError(
            f"train_fastbert() got unknown options {unknown}: it takes the fields of FastBertTrainingConfig "
            "(hf_fastbert.training.FastBertTrainingConfig) as keywords"
        )
    return dataclasses.replace(config or FastBertTrainingConfig(), **options)

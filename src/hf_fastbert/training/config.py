"""
The options of a FastBERT training run, declared once: [`train_fastbert`] takes them, `hf-fastbert train` and
`examples/text-classification/run_fastbert.py` parse them with `HfArgumentParser`. A new option is one field here.

Torch-free: the command line builds its parser from this module without loading the training stack.
"""

import math
from dataclasses import dataclass, field, fields
from numbers import Integral, Real

from ..configuration_fastbert import validate_speeds, validate_uncertainty_top_k
from ..constants import (
    DEFAULT_SPEEDS,
    DISTILL_LEARNING_RATE,
    DISTILL_MAX_EPOCHS,
    DISTILL_PATIENCE,
    FINETUNE_MAX_EPOCHS,
    FINETUNE_PATIENCE,
    HELD_OUT_FRACTION,
    MAX_ACCURACY_DROP,
)


def _positive_integer(name, value, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def _number(name, value, low=0.0, high=math.inf, *, low_open=False, high_open=False, allow_none=False, hint=""):
    if value is None and allow_none:
        return
    ok = isinstance(value, Real) and not isinstance(value, bool) and not math.isnan(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        if high == math.inf:
            bounds = f"{'>' if low_open else '>='} {low:g}"
        else:
            bounds = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"`{name}` must be a number {bounds}{hint}, got {value!r}.")


def validate_temperature(temperature, name="distillation_temperature"):
    """Raise a `ValueError` naming `name` unless `temperature` is a finite positive number."""
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise ValueError(f"`{name}` must be a finite positive number, got {temperature!r}.")


@dataclass
class FastBertTrainingConfig:
    r"""
    Every option of a training run (stage 2: fine-tune backbone + teacher; stage 3: self-distill the students), each
    checked when the config is made, before any data is read. The model, the data and the output folder are given to
    [`train_fastbert`] beside it; `hf-fastbert train --help` lists the same options.

    Args:
        text_column, text_pair_column, label_column (`str`):
            Columns of the raw splits; `text_pair_column` for sentence pairs.
        eval_split (`str`, *optional*, defaults to `"validation"`):
            The labelled split to evaluate on after training (skipped when missing or `None`).
        distill_on_train (`bool`, *optional*, defaults to `True`):
            Also distill on the training texts (labels dropped). Without unlabeled text
            (`train_fastbert(unlabeled_dataset=...)`) the training texts are always used.
        max_length (`int`, *optional*, defaults to 128): Truncation length in tokens.
        finetune_epochs (`float`, *optional*):
            Stage 2 (fine-tuning). `None` (the default): until the held-out loss has not improved for
            `finetune_patience` evaluations (every epoch, and every 500 steps in long epochs), at most
            `finetune_max_epochs` (10), keeping the best weights. A number: exactly that many epochs. 0 skips stage 2
            (the checkpoint's backbone and teacher must then already be fine-tuned).
        finetune_learning_rate (`float`, *optional*):
            Default: 1e-4 for models smaller than BERT-base (hidden size < 768; measured), the paper's 2e-5 for
            larger ones ([`default_finetune_learning_rate`]).
        distill_epochs (`float`, *optional*):
            Stage 3 (self-distillation). `None` (the default): until the students' held-out KL to the teacher has not
            improved by 1% for `distill_patience` evaluations, at most `distill_max_epochs` (30), keeping the best
            students. A number: exactly that many epochs. 0 skips stage 3.
        distill_learning_rate (`float`, *optional*, defaults to 1e-3): The students' learning rate (measured; the
            paper's 2e-4 was sized for BERT-base on large data).
        distill_cache_states (`bool`, *optional*, defaults to `True`): Run the frozen backbone and teacher once
            and train the students on their cached inputs ([`FastBertTrainingArguments.cache_states`]).
        held_out_fraction (`float`, *optional*, defaults to 0.1):
            When a stage converges, this share of the training split (at most 2,000 samples) is held out, seeded:
            stage 2 stops on its loss, stage 3 on the students' KL on its texts. The students never train on it
            (stage 2 only with a fixed `finetune_epochs`), and the `eval_split` used for the final results is never
            used to stop.
        uncertainty_top_k (`int` or `"auto"`, *optional*, defaults to `"auto"`): The model's
            `config.uncertainty_top_k`. `"auto"`: 2 (the entropy of the two most probable labels) when there are more
            than two labels, else None (the paper's full entropy; identical for two). Measured with converged students
            on 3, 8 and 52 classes (`benchmarks/bench_many_class.py`): top-2 reached within one accuracy point of full
            depth 2.59x / 5.29x / 2.48x FLOPs speed-up (R52, R8, CrowdFlower) against the full entropy's 2.42x / 5.36x
            / 2.38x, and degrades far more gently at high speeds (R52 at speed 0.9: 85.9% against 79.0%). A second R8
            run went the other way (4.92x against 5.75x): with few labels the two are close, pass None to compare.
        distillation_temperature (`float`, *optional*, defaults to 1.0): See [`FastBertTrainingArguments`].
        batch_size, warmup_ratio, weight_decay, seed: Shared by both stages (per-device batch size).
        eval_speeds (`Iterable[float]`, *optional*, defaults to 0.0 .. 0.9): Speeds of the final evaluation.
        max_accuracy_drop (`float`, *optional*, defaults to 0.005):
            The model is saved with a default speed (`config.speed`) that is fast out of the box: the largest speed of
            its exit rule whose accuracy stays within this fraction (0.005: half a point) of full depth
            ([`calibrate_default_speed`]). It is chosen on the `eval_split` (already evaluated: no extra pass) unless
            that split is called `"test"`, in which case on the held-out slice of the training split, so that the
            reported test results are never the data the speed was chosen on. `None` keeps the checkpoint's speed (0
            for a stock checkpoint). Without distilled students or labelled calibration data the speed stays 0.
            `speed=0` per call (pipeline, model, CLI `--speed 0`) still runs every layer.
        accuracy_confidence (`float`, *optional*):
            With `max_accuracy_drop`, the confidence (0.95) at which the speed's expected drop on new data stays
            within the budget, not only the drop measured where it is chosen
            ([`hf_fastbert.analysis.calibrate_speed`]'s `confidence`): on 1,000 samples the point estimate breaks a
            half-point budget on new data about half the time. `None`: the point estimate.
        luha_bins (`int`, *optional*, defaults to 10): Uncertainty bins of the LUHA view in `output_dir/sweep/`
            (`None`: no LUHA view). The sweep folder holds the evaluation split's tables and plots, from the same pass
            as `results` ([`hf_fastbert.analysis.write_sweep`]).
        overwrite_output_dir (`bool`, *optional*, defaults to `False`):
            Replace a non-empty output folder that is not a previous run's output: everything in it is deleted once
            the new model is saved.
        push_to_hub, hub_model_id, hub_private_repo: Push the final model to the Hub repo `hub_model_id`
            (default: the name of `output_dir`): exactly its weights, config, code, tokenizer, card and plot
            ([`hf_fastbert.modelcard.push_model_to_hub`]), never `training_args.bin` or other files of the folder.
        progress (`bool`, *optional*, defaults to `True`): Progress bars.
    """

    # The data's columns and length.
    text_column: str = field(default="text", metadata={"help": "Column holding the text (first text of pairs)."})
    text_pair_column: str | None = field(default=None, metadata={"help": "Second text column, for pair tasks."})
    label_column: str = field(default="label", metadata={"help": "Column holding the labels."})
    eval_split: str | None = field(
        default="validation",
        metadata={"help": "Labelled split of the final evaluation and sweep (skipped when the data has none)."},
    )
    max_length: int = field(default=128, metadata={"help": "Truncate inputs to N tokens."})
    distill_on_train: bool = field(
        default=True,
        metadata={"help": "Also distill on the training texts when unlabeled text is given (labels are not used)."},
    )
    # Stage 2: fine-tuning.
    finetune_epochs: float | None = field(
        default=None,
        metadata={
            "aliases": ["--epochs"],
            "help": "Fine-tune for exactly N epochs; 0 skips it for an already fine-tuned classifier. Default: until "
            "the held-out loss stops improving, at most --max-epochs, keeping the best weights.",
        },
    )
    finetune_learning_rate: float | None = field(
        default=None,
        metadata={
            "aliases": ["--learning-rate"],
            "help": "Fine-tuning learning rate. Default: 1e-4 for models smaller than BERT-base (hidden size < 768; "
            "measured), the paper's 2e-5 for base-sized ones.",
        },
    )
    finetune_max_epochs: float = field(
        default=FINETUNE_MAX_EPOCHS,
        metadata={"aliases": ["--max-epochs"], "help": "Most fine-tuning epochs when fine-tuning until convergence."},
    )
    finetune_patience: int = field(
        default=FINETUNE_PATIENCE, metadata={"help": "Evaluations without improvement before fine-tuning stops."}
    )
    # Stage 3: self-distillation.
    distill_epochs: float | None = field(
        default=None,
        metadata={
            "help": "Self-distill for exactly N epochs; 0 skips it. Default: until the students' held-out KL to the "
            "teacher stops improving, at most --distill-max-epochs, keeping the best students."
        },
    )
    distill_learning_rate: float = field(
        default=DISTILL_LEARNING_RATE, metadata={"help": "The students' learning rate."}
    )
    distill_max_epochs: float = field(
        default=DISTILL_MAX_EPOCHS,
        metadata={"help": "Most self-distillation epochs when distilling until convergence."},
    )
    distill_patience: int = field(
        default=DISTILL_PATIENCE,
        metadata={"help": "Evaluations without an improvement of 1 percent before distillation stops."},
    )
    distillation_temperature: float = field(
        default=1.0, metadata={"help": "Softmax temperature of the KL (paper: 1)."}
    )
    distill_cache_states: bool = field(
        default=True,
        metadata={
            "help": "Run the frozen backbone once and distill on its cached states (float16, in memory, up to 8 GiB); "
            "--no-distill-cache-states runs it every epoch."
        },
    )
    held_out_fraction: float = field(
        default=HELD_OUT_FRACTION,
        metadata={
            "help": "Share of the training split (at most 2,000 samples) held out to stop a converging stage on; "
            "never the evaluation split."
        },
    )
    uncertainty_top_k: int | str | None = field(
        default="auto",
        metadata={
            "help": "The model's config.uncertainty_top_k: an integer >= 2 (entropy over the K most probable labels), "
            "None (the paper's full entropy) or auto (2 with more than two labels, else None)."
        },
    )
    # Both stages.
    batch_size: int = field(default=32, metadata={"help": "Per-device batch size of training and evaluation."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Share of each stage's steps spent warming up."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay of both stages."})
    seed: int = field(default=42, metadata={"help": "Random seed."})
    # Results.
    eval_speeds: list[float] = field(
        default_factory=lambda: list(DEFAULT_SPEEDS),
        metadata={"aliases": ["--speeds"], "help": "Speeds of the final sweep."},
    )
    max_accuracy_drop: float | None = field(
        default=MAX_ACCURACY_DROP,
        metadata={
            "help": "The model is saved with the largest speed whose accuracy stays within this fraction (0.005 = "
            "0.5 points) of full depth, chosen on the eval split (on the held-out slice of the training split when "
            "that split is 'test'). Speed 0 at predict time still runs every layer."
        },
    )
    accuracy_confidence: float | None = field(
        default=None,
        metadata={
            "help": "With max_accuracy_drop: choose the saved speed so that its expected accuracy drop on new data "
            "stays within the budget at this confidence (e.g. 0.95), not only the drop measured where it is chosen. "
            "Slower speeds, but a promise that holds far more often."
        },
    )
    luha_bins: int | None = field(default=10, metadata={"help": "Uncertainty bins of the sweep's LUHA view."})
    # The output.
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace a non-empty output folder that is not a previous run's output (everything in it is "
            "deleted). A previous run's output, unchanged, is replaced without it."
        },
    )
    push_to_hub: bool = field(
        default=False, metadata={"help": "Push the final model and its card to the Hub (token: `hf auth login`)."}
    )
    hub_model_id: str | None = field(default=None, metadata={"help": "The Hub repository (default: the folder name)."})
    hub_private_repo: bool | None = field(default=None, metadata={"help": "Make a new Hub repository private."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})

    def __post_init__(self):
        for name in ("text_column", "label_column"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"`{name}` must be a column name, got {getattr(self, name)!r}.")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, Integral) or self.max_length < 2:
            raise ValueError(f"`max_length` must be an integer >= 2, got {self.max_length!r}.")
        for name in ("finetune_epochs", "distill_epochs"):
            _number(name, getattr(self, name), allow_none=True)
        for name in ("finetune_max_epochs", "distill_max_epochs"):  # 0: the converging stage is skipped
            _number(name, getattr(self, name))
        _number("distill_learning_rate", self.distill_learning_rate, low_open=True)
        _number("finetune_learning_rate", self.finetune_learning_rate, low_open=True, allow_none=True)
        validate_temperature(self.distillation_temperature)
        if not isinstance(self.distill_cache_states, bool):
            raise ValueError(f"`distill_cache_states` must be a bool, got {self.distill_cache_states!r}.")
        for name in ("finetune_patience", "distill_patience", "batch_size"):
            _positive_integer(name, getattr(self, name))
        _positive_integer("luha_bins", self.luha_bins, allow_none=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, Integral):
            raise ValueError(f"`seed` must be an integer, got {self.seed!r}.")
        _number("held_out_fraction", self.held_out_fraction, 0, 1, low_open=True, high_open=True)
        _number("warmup_ratio", self.warmup_ratio, 0, 1, high_open=True)
        _number("weight_decay", self.weight_decay)
        _number(
            "max_accuracy_drop",
            self.max_accuracy_drop,
            0,
            1,
            high_open=True,
            allow_none=True,
            hint=" (a fraction: 0.005 is half a point)",
        )
        _number("accuracy_confidence", self.accuracy_confidence, 0, 1, low_open=True, high_open=True, allow_none=True)
        if self.accuracy_confidence is not None and self.max_accuracy_drop is None:
            raise ValueError("`accuracy_confidence` bounds `max_accuracy_drop`: give both, or neither.")
        self.uncertainty_top_k = _top_k(self.uncertainty_top_k)
        self.eval_speeds = sorted(set(validate_speeds(self.eval_speeds, name="eval_speeds")))
        if self.push_to_hub and self.hub_model_id is not None:
            from huggingface_hub.utils import validate_repo_id

            try:
                validate_repo_id(self.hub_model_id)
            except ValueError as error:
                raise ValueError(f"Cannot push to {self.hub_model_id!r}: {error}") from None

    @classmethod
    def option_names(cls) -> list[str]:
        """The names of the options, as [`train_fastbert`] takes them as keywords."""
        return [option.name for option in fields(cls)]


def _top_k(value):
    """`uncertainty_top_k` as given in Python or on the command line ("auto", "none", "2")."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        if text == "none":
            return None
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f'`uncertainty_top_k` must be "auto", None or an integer >= 2, got {value!r}.') from None
    validate_uncertainty_top_k(value, allowed=('"auto"', "None"))
    return value


__all__ = ["FastBertTrainingConfig", "validate_temperature"]

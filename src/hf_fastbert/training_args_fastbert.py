"""Training arguments of FastBERT's self-distillation stage."""

from dataclasses import dataclass, field

from transformers import TrainingArguments
from transformers.trainer_utils import HubStrategy

from .configuration_fastbert import validate_speeds
from .constants import (
    DISTILL_LEARNING_RATE,
    DISTILL_MAX_EPOCHS,
    DISTILL_MIN_IMPROVEMENT,
    DISTILL_PATIENCE,
    HELD_OUT_FRACTION,
)
from .training.config import validate_temperature


@dataclass
class FastBertTrainingArguments(TrainingArguments):
    r"""
    [`TrainingArguments`] plus the knobs of [`FastBertDistillationTrainer`]. The distillation trainer also works with
    plain [`TrainingArguments`], taking the defaults below.

    Args:
        distillation_temperature (`float`, *optional*, defaults to 1.0):
            Softmax temperature of the teacher and the students in the KL divergence; the loss is multiplied by its
            square so gradients keep their scale. The paper uses 1.
        eval_speeds (`list[float]`, *optional*, defaults to `[0.0, 0.1, 0.5]`):
            Speeds at which `evaluate()` reports accuracy, mean exit layer and FLOPs speed-up when no
            `compute_metrics` is given (labelled evaluation data only).
        learning_rate (`float`, *optional*, defaults to 1e-3):
            The students' learning rate (AdamW), chosen by measurement (see the README).
        num_train_epochs (`float`, *optional*, defaults to 30):
            With `convergence_patience` (the default), the most epochs distillation may take; without, the epochs.
        convergence_patience (`int`, *optional*, defaults to 2):
            Distill until the students' held-out KL to the teacher (`eval_loss`) has not improved by
            `convergence_min_improvement` for this many evaluations (every epoch, or every 500 steps within long
            epochs), then restore the students of the best evaluation. `None` trains for exactly `num_train_epochs`.
        convergence_min_improvement (`float`, *optional*, defaults to 0.01):
            Relative decrease of the held-out KL that counts as progress.
        held_out_fraction (`float`, *optional*, defaults to 0.1):
            Without an `eval_dataset`, this share of the distillation data (at most 2,000 samples) is held out to
            measure convergence; labels are not needed.
        cache_states (`bool`, *optional*, defaults to `True`):
            Run the frozen backbone and teacher once over the training and evaluation data and train the students on
            their cached inputs (float16, in memory: samples x tokens x (layers - 1) x hidden size x 2 bytes; above
            8 GiB, or with several processes, the backbone runs every epoch instead), so that an epoch costs the
            students alone. `False` runs the backbone every step.
        hub_strategy (`str`, *optional*, defaults to `"end"`):
            As in [`TrainingArguments`], but `"end"` by default and the only value [`FastBertDistillationTrainer`]
            accepts with `push_to_hub=True`: the other strategies push whole training folders (`training_args.bin`,
            a pickle, and checkpoints) while training.

    Example:

    ```python
    >>> from hf_fastbert import FastBertTrainingArguments

    >>> args = FastBertTrainingArguments("out")  # distil until the held-out KL stops improving (at most 30 epochs)
    >>> fixed = FastBertTrainingArguments("out", num_train_epochs=5, convergence_patience=None)  # exactly 5 epochs
    ```"""

    learning_rate: float = field(
        default=DISTILL_LEARNING_RATE, metadata={"help": "The students' learning rate (AdamW)."}
    )
    num_train_epochs: float = field(
        default=DISTILL_MAX_EPOCHS,
        metadata={"help": "The most epochs when distilling until convergence; otherwise the number of epochs."},
    )
    convergence_patience: int | None = field(
        default=DISTILL_PATIENCE,
        metadata={
            "help": "Stop once the held-out KL has not improved for this many evaluations and keep the best "
            "students; None trains for exactly num_train_epochs."
        },
    )
    convergence_min_improvement: float = field(
        default=DISTILL_MIN_IMPROVEMENT,
        metadata={"help": "Relative decrease of the held-out KL that counts as progress."},
    )
    held_out_fraction: float = field(
        default=HELD_OUT_FRACTION,
        metadata={"help": "Share of the distillation data held out to measure convergence without eval_dataset."},
    )

    distillation_temperature: float = field(
        default=1.0,
        metadata={"help": "Softmax temperature of the self-distillation KL (the loss is scaled by its square)."},
    )
    eval_speeds: list[float] = field(
        default_factory=lambda: [0.0, 0.1, 0.5],
        metadata={"help": "Speeds at which evaluate() reports accuracy, mean exit layer and FLOPs speed-up."},
    )
    cache_states: bool = field(
        default=True,
        metadata={
            "help": "Train the students on the frozen backbone's cached states (float16, in memory, up to 8 GiB): "
            "one backbone pass instead of one per epoch."
        },
    )

    hub_strategy: HubStrategy | str = field(
        default="end",
        metadata={"help": "When to push with push_to_hub: 'end' (the model's files once training completes)."},
    )

    def __post_init__(self):
        validate_temperature(self.distillation_temperature)
        self.eval_speeds = validate_speeds(self.eval_speeds, name="eval_speeds")
        patience = self.convergence_patience
        if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
            raise ValueError(f"`convergence_patience` must be None or an integer >= 1, got {patience!r}.")
        improvement = self.convergence_min_improvement
        if isinstance(improvement, bool) or not isinstance(improvement, (int, float)) or not 0 <= improvement < 1:
            raise ValueError(f"`convergence_min_improvement` must be in [0, 1), got {improvement!r}.")
        if not isinstance(self.cache_states, bool):
            raise ValueError(f"`cache_states` must be a bool, got {self.cache_states!r}.")
        fraction = self.held_out_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise ValueError(f"`held_out_fraction` must be in (0, 1), got {fraction!r}.")
        super().__post_init__()


__all__ = [
    "DISTILL_LEARNING_RATE",
    "DISTILL_MAX_EPOCHS",
    "DISTILL_MIN_IMPROVEMENT",
    "DISTILL_PATIENCE",
    "HELD_OUT_FRACTION",
    "FastBertTrainingArguments",
    "validate_temperature",
]

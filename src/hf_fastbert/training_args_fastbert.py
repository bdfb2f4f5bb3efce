"""Training arguments of FastBERT's self-distillation stage."""

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments
from transformers.trainer_utils import HubStrategy

from .configuration_fastbert import validate_speeds


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
        hub_strategy (`str`, *optional*, defaults to `"end"`):
            As in [`TrainingArguments`], but `"end"` by default and the only value [`FastBertDistillationTrainer`]
            accepts with `push_to_hub=True`: the other strategies push whole training folders (`training_args.bin`,
            a pickle, and checkpoints) while training.

    Example:

    ```python
    >>> from hf_fastbert import FastBertTrainingArguments

    >>> args = FastBertTrainingArguments("out", learning_rate=2e-4, num_train_epochs=5, distillation_temperature=1.0)
    ```"""

    distillation_temperature: float = field(
        default=1.0,
        metadata={"help": "Softmax temperature of the self-distillation KL (the loss is scaled by its square)."},
    )
    eval_speeds: list[float] = field(
        default_factory=lambda: [0.0, 0.1, 0.5],
        metadata={"help": "Speeds at which evaluate() reports accuracy, mean exit layer and FLOPs speed-up."},
    )

    hub_strategy: HubStrategy | str = field(
        default="end",
        metadata={"help": "When to push with push_to_hub: 'end' (the model's files once training completes)."},
    )

    def __post_init__(self):
        validate_temperature(self.distillation_temperature)
        self.eval_speeds = validate_speeds(self.eval_speeds, name="eval_speeds")
        super().__post_init__()


__all__ = ["FastBertTrainingArguments", "validate_temperature"]

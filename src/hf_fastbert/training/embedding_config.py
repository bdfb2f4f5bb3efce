"""
The options of a sentence-embedding distillation run, declared once: [`train_embedding_heads`] takes them and
`hf-fastbert train-embedding` parses them with `HfArgumentParser`. Torch-free.
"""

from dataclasses import dataclass, field

from ..configuration_fastbert import validate_speeds
from ..constants import (
    DISTILL_LEARNING_RATE,
    DISTILL_PATIENCE,
    EMBEDDING_MAX_EPOCHS,
    EMBEDDING_SPEEDS,
    HELD_OUT_FRACTION,
)
from .config import _number, _positive_integer


@dataclass
class EmbeddingTrainingConfig:
    r"""
    Every option of a run that self-distills the embedding heads of a sentence embedding model (backbone frozen),
    checked when the config is made.

    Args:
        max_length (`int`, *optional*): Truncation length in tokens; default 128, or the model's limit when lower.
        batch_size (`int`, *optional*, defaults to 32): Texts per step (and per evaluation batch).
        learning_rate (`float`, *optional*, defaults to 1e-3): The heads' learning rate (AdamW).
        max_epochs (`float`, *optional*, defaults to 30): The most epochs; training stops earlier once the held-out
            loss has not improved by 1% for `patience` evaluations (every epoch, every 500 steps in long epochs).
        patience (`int`, *optional*, defaults to 2): Evaluations without improvement before stopping; `None`
            trains exactly `max_epochs`.
        held_out_fraction (`float`, *optional*, defaults to 0.1): Without evaluation texts, this share of the
            training texts (at most 2,000) is held out for convergence and for the quality report.
        speeds (`list[float]`): The speeds the quality report covers.
        seed (`int`, *optional*, defaults to 42).
        cache_states (`bool`, *optional*, defaults to `True`): Run the frozen backbone once and train the heads on
            its cached states (float16, in memory: texts x tokens x (layers - 1) x hidden size x 2 bytes), so that
            every epoch after the first costs the heads alone. Above 8 GiB it runs the backbone every epoch instead.
        overwrite_output_dir (`bool`): Replace a non-empty output folder that is not a previous run's.
    """

    max_length: int | None = field(
        default=None, metadata={"help": "Truncation length in tokens (default 128, or the model's limit when lower)."}
    )
    batch_size: int = field(default=32, metadata={"help": "Texts per training step."})
    learning_rate: float = field(default=DISTILL_LEARNING_RATE, metadata={"help": "The heads' learning rate (AdamW)."})
    max_epochs: float = field(
        default=EMBEDDING_MAX_EPOCHS,
        metadata={"help": "The most epochs; stops earlier once the held-out loss stops improving."},
    )
    patience: int | None = field(
        default=DISTILL_PATIENCE, metadata={"help": "Evaluations without improvement before stopping."}
    )
    held_out_fraction: float = field(
        default=HELD_OUT_FRACTION,
        metadata={"help": "Share of the training texts held out (without --eval-file), at most 2,000."},
    )
    speeds: list[float] = field(
        default_factory=lambda: list(EMBEDDING_SPEEDS), metadata={"help": "Speeds the quality report covers."}
    )
    seed: int = field(default=42, metadata={"help": "Random seed."})
    cache_states: bool = field(
        default=True,
        metadata={
            "help": "Run the frozen backbone once and train the heads on its cached states (float16, in memory; "
            "above 8 GiB the backbone runs every epoch instead). --no-cache-states turns it off."
        },
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace a non-empty output folder that is not a previous run's."}
    )

    def __post_init__(self):
        _positive_integer("max_length", self.max_length, allow_none=True)
        _positive_integer("batch_size", self.batch_size)
        _positive_integer("patience", self.patience, allow_none=True)
        _number("learning_rate", self.learning_rate, low_open=True)
        _number("max_epochs", self.max_epochs, low_open=True)
        _number("held_out_fraction", self.held_out_fraction, 0.0, 1.0, low_open=True, high_open=True)
        if not isinstance(self.cache_states, bool):
            raise ValueError(f"`cache_states` must be a bool, got {self.cache_states!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"`seed` must be an integer, got {self.seed!r}.")
        self.speeds = validate_speeds(self.speeds)


__all__ = ["EmbeddingTrainingConfig"]

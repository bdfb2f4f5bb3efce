"""FastBERT model configuration."""

import math
from numbers import Real

from transformers import BertConfig


TEACHER_HEADS = ("bert", "branch")


def validate_speed(speed, name="speed"):
    """Raise a `ValueError` naming `name` unless `speed` is a real number in [0, 1]."""
    if isinstance(speed, bool) or not isinstance(speed, Real) or math.isnan(speed) or not 0.0 <= speed <= 1.0:
        raise ValueError(f"`{name}` must be a number in [0, 1] (0 = full depth), got {speed!r}.")


def validate_speeds(speeds, name="speeds") -> list[float]:
    """A speed or a non-empty list of speeds -> list of floats; `ValueError` naming `name` for an invalid one."""
    speeds = [speeds] if isinstance(speeds, Real) else list(speeds)
    if not speeds:
        raise ValueError(f"`{name}` must contain at least one speed.")
    for speed in speeds:
        validate_speed(speed, name=name)
    return [float(speed) for speed in speeds]


class FastBertConfig(BertConfig):
    r"""
    Configuration of a [`FastBertForSequenceClassification`]: a [`BertConfig`] plus the FastBERT settings.

    Every BERT checkpoint config loads into it, so `FastBertConfig.from_pretrained("bert-base-uncased", num_labels=2)`
    works and the backbone keeps its architecture.

    Args:
        speed (`float`, *optional*, defaults to 0.0):
            Default early-exit threshold in [0, 1]. A sample stops at the first layer whose student's normalized
            uncertainty is below `speed`. 0 runs every sample through every layer (plain BERT). Can be overridden per
            call with `model(..., speed=...)`.
        branch_hidden_size (`int`, *optional*, defaults to 128):
            Width of the student classifiers (the paper uses 128).
        branch_num_attention_heads (`int`, *optional*, defaults to 2):
            Attention heads of the student classifiers' self-attention (the paper uses 2).
        uncertainty_top_k (`int`, *optional*):
            When set, the uncertainty is the normalized entropy of the `uncertainty_top_k` largest probabilities,
            renormalized, instead of the entropy over all labels. With dozens of labels the full normalized entropy
            stays close to 1 and nothing exits; `uncertainty_top_k=2` or `3` fixes that. Ignored when it is not
            smaller than `num_labels`.
        teacher_head (`str`, *optional*, defaults to `"bert"`):
            `"bert"`: the teacher is BERT's own classification head (pooler + dropout + linear, the parameter names of
            [`BertForSequenceClassification`]), so fine-tuned BERT classifiers load unchanged. `"branch"`: the
            teacher has the students' architecture, as in the paper.
        branches_distilled (`bool`, *optional*, defaults to `False`):
            Set by [`FastBertDistillationTrainer`] once the students have been self-distilled from the teacher. Until
            then the students are untrained and early exits are meaningless; model cards say so.

    Example:

    ```python
    >>> from hf_fastbert import FastBertConfig, FastBertForSequenceClassification

    >>> config = FastBertConfig(num_hidden_layers=4, speed=0.2)
    >>> model = FastBertForSequenceClassification(config)
    ```"""

    model_type = "fastbert"
    _auto_class = "AutoConfig"

    speed: float = 0.0
    branch_hidden_size: int = 128
    branch_num_attention_heads: int = 2
    uncertainty_top_k: int | None = None
    teacher_head: str = "bert"
    branches_distilled: bool = False

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") == "bert":  # a BERT checkpoint is a FastBERT one with default settings
            config_dict = {**config_dict, "model_type": cls.model_type}
        return config_dict, kwargs

    def __post_init__(self, **kwargs):
        # A plain BERT config.json carries model_type="bert"; it must not shadow ours.
        kwargs.pop("model_type", None)
        super().__post_init__(**kwargs)
        self.validate_fastbert()

    def validate_fastbert(self):
        """Raise a `ValueError` naming the first invalid FastBERT setting."""
        validate_speed(self.speed)
        for name in ("branch_hidden_size", "branch_num_attention_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.branch_hidden_size % self.branch_num_attention_heads:
            raise ValueError(
                f"`branch_hidden_size` ({self.branch_hidden_size}) must be a multiple of "
                f"`branch_num_attention_heads` ({self.branch_num_attention_heads})."
            )
        top_k = self.uncertainty_top_k
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 2):
            raise ValueError(f"`uncertainty_top_k` must be None or an integer >= 2, got {top_k!r}.")
        if not isinstance(self.branches_distilled, bool):
            raise ValueError(f"`branches_distilled` must be a bool, got {self.branches_distilled!r}.")
        if self.teacher_head not in TEACHER_HEADS:
            raise ValueError(f"`teacher_head` must be one of {TEACHER_HEADS}, got {self.teacher_head!r}.")
        if self.problem_type in ("regression", "multi_label_classification") or self.num_labels < 2:
            raise ValueError(
                "FastBERT exits on the uncertainty of a single-label prediction: it needs "
                f"problem_type='single_label_classification' and num_labels >= 2, got problem_type="
                f"{self.problem_type!r} and num_labels={self.num_labels}."
            )


__all__ = ["FastBertConfig"]

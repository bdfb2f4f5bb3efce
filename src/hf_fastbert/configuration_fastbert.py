"""FastBERT configurations: one per backbone family, each the family's own config plus the FastBERT settings."""

import math
from dataclasses import dataclass
from numbers import Real

from transformers import (
    AlbertConfig,
    BertConfig,
    DebertaV2Config,
    DistilBertConfig,
    ElectraConfig,
    ModernBertConfig,
    RobertaConfig,
    XLMRobertaConfig,
)

from .constants import EXIT_RULES, POOLING_MODES


# "stock": the family's own classification head (BERT checkpoints of hf-fastbert 0.1 say "bert", the same thing);
# "branch": a head of the students' architecture, as in the paper.
TEACHER_HEADS = ("stock", "bert", "branch")


def validate_speed(speed, name="speed") -> float:
    """`speed` as a float; a `ValueError` naming `name` unless it is a real number in [0, 1] (a `Fraction` too)."""
    if type(speed) is float and 0.0 <= speed <= 1.0:  # the common case, without the `Real` ABC check (per call)
        return speed
    if isinstance(speed, bool) or not isinstance(speed, Real) or math.isnan(speed) or not 0.0 <= speed <= 1.0:
        raise ValueError(f"`{name}` must be a number in [0, 1] (0 = full depth), got {speed!r}.")
    return float(speed)


def validate_uncertainty_top_k(top_k, allowed=("None",)):
    """A `ValueError` unless `top_k` is None or an integer >= 2 (`allowed` names what the caller also accepts)."""
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 2):
        raise ValueError(f"`uncertainty_top_k` must be {', '.join(allowed)} or an integer >= 2, got {top_k!r}.")


def validate_exit_table(table, name: str, num_students: int, sorted_rows: bool = False):
    """
    A `ValueError` unless `table` is None or a calibrated table (`exit_thresholds`, `exit_heads`): one row per student
    (`num_students`), rows of equal length holding finite numbers (thresholds: >= 0 and non-decreasing). A NaN or
    negative threshold would never let a sample out, silently.
    """
    if table is None:
        return
    if not isinstance(table, list) or len(table) != num_students:
        rows = len(table) if isinstance(table, list) else type(table).__name__
        raise ValueError(
            f"`{name}` must hold one row per student ({num_students}), got {rows}: recalibrate "
            "(`calibrate --save` or `model.calibrate_exit_rules`) after changing the number of layers."
        )
    width = len(table[0]) if table and isinstance(table[0], list) else None
    for index, row in enumerate(table):
        numbers = isinstance(row, list) and row and len(row) == width
        numbers = numbers and all(
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) for value in row
        )
        if not numbers:
            raise ValueError(f"`{name}` row {index} must be {width} finite numbers, got {row!r:.120}.")
        if sorted_rows and (min(row) < 0 or any(b < a for a, b in zip(row, row[1:], strict=False))):
            raise ValueError(f"`{name}` row {index} must be non-negative and non-decreasing, got {row!r:.120}.")


def validate_speeds(speeds, name="speeds") -> list[float]:
    """A speed or a non-empty list of speeds -> list of floats; `ValueError` naming `name` for an invalid one."""
    speeds = [speeds] if isinstance(speeds, Real) else list(speeds)
    if not speeds:
        raise ValueError(f"`{name}` must contain at least one speed.")
    for speed in speeds:
        validate_speed(speed, name=name)
    return [float(speed) for speed in speeds]


@dataclass(repr=False, kw_only=True)
class FastBertConfigMixin:
    r"""
    The FastBERT settings, shared by the configuration of every backbone family (`FastBertConfig` for BERT,
    `FastBertRobertaConfig`, ...). Each family's class is `class FastBert<Family>Config(FastBertConfigMixin,
    <Family>Config)`, so every checkpoint config of that family loads into it and the backbone keeps its architecture:
    `FastBertRobertaConfig.from_pretrained("roberta-base", num_labels=2)`.

    Args:
        speed (`float`, *optional*, defaults to 0.0):
            Default early-exit threshold in [0, 1]. A sample stops at the first layer whose student's normalized
            uncertainty is below `speed`. 0 runs every sample through every layer (the stock classifier). Can be
            overridden per call with `model(..., speed=...)`.
        branch_hidden_size (`int`, *optional*, defaults to 128):
            Width of the student classifiers (the paper uses 128).
        branch_num_attention_heads (`int`, *optional*, defaults to 2):
            Attention heads of the student classifiers' self-attention (the paper uses 2).
        uncertainty_top_k (`int`, *optional*):
            When set, the uncertainty is the normalized entropy of the `uncertainty_top_k` largest probabilities,
            renormalized, instead of the entropy over all labels. With dozens of labels the full normalized entropy
            stays close to 1 and nothing exits; `uncertainty_top_k=2` or `3` fixes that. Ignored when it is not
            smaller than `num_labels`.
        teacher_head (`str`, *optional*, defaults to `"stock"`):
            `"stock"`: the teacher is the family's own classification head with the parameter names of its
            `<Family>ForSequenceClassification`, so fine-tuned stock classifiers load unchanged (BERT configs written
            by hf-fastbert 0.1 say `"bert"`, which means the same). `"branch"`: the teacher has the students'
            architecture, as in the paper.
        branches_distilled (`bool`, *optional*, defaults to `False`):
            Set by [`FastBertDistillationTrainer`] once the students have been self-distilled from the teacher. Until
            then the students are untrained and early exits are meaningless; model cards say so.
        exit_rule (`str`, *optional*, defaults to `"entropy"`):
            When a sample leaves: `"entropy"` (FastBERT), `"patience"` (PABEE), `"thresholds"` (per-layer, calibrated)
            or `"learned"` (a logistic head per layer). Every rule reads `speed` as 0 = full depth, higher = faster;
            see `hf_fastbert.exit_rules`.
        exit_thresholds (`list`, *optional*):
            The `"thresholds"` rule's calibration table (`model.calibrate_exit_rules`).
        exit_heads (`list`, *optional*):
            The `"learned"` rule's per-layer weights (`model.calibrate_exit_rules`).
        embedding_pooling (`str`, *optional*, defaults to `"mean"`):
            Sentence embedding models ([`FastBertForSentenceEmbedding`]) only: how the last layer's token states
            become the embedding, as sentence-transformers' `Pooling` does it: `"mean"` (over real tokens), `"cls"`
            (the first token) or `"max"`. Read from a sentence-transformers folder's `1_Pooling/config.json` when
            there is one.
        normalize_embeddings (`bool`, *optional*, defaults to `True`):
            Sentence embedding models only: scale every embedding to unit length (sentence-transformers' `Normalize`
            module).
        embedding_max_length (`int`, *optional*):
            Sentence embedding models only: the truncation length of the sentence-transformers model it was made from
            (`sentence_bert_config.json`'s `max_seq_length`), which its sentence-transformers module keeps, so that
            speed 0 truncates as the stock model does.
        embedding_head_queries (`int`, *optional*, defaults to 4):
            Sentence embedding models only: learned attention queries of each layer's embedding head.
        embedding_heads_distilled (`bool`, *optional*, defaults to `False`):
            Sentence embedding models only: set once the embedding heads have been self-distilled
            ([`FastBertEmbeddingTrainer`]); until then early exits are meaningless.
    """

    # The model type of the stock checkpoints of this family ("bert", "roberta", ...); set by each family's class.
    backbone_model_type = None

    speed: float = 0.0
    branch_hidden_size: int = 128
    branch_num_attention_heads: int = 2
    uncertainty_top_k: int | None = None
    teacher_head: str = "stock"
    branches_distilled: bool = False
    exit_rule: str = "entropy"
    exit_thresholds: list | None = None
    exit_heads: list | None = None
    embedding_pooling: str = "mean"
    normalize_embeddings: bool = True
    embedding_max_length: int | None = None
    embedding_head_queries: int = 4
    embedding_heads_distilled: bool = False

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        model_type = config_dict.get("model_type")
        if model_type == cls.backbone_model_type:  # a stock checkpoint is a FastBERT one with default settings
            config_dict = {**config_dict, "model_type": cls.model_type}
        elif model_type is not None and model_type != cls.model_type:
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a {model_type!r} checkpoint, not a "
                f"{cls.backbone_model_type!r} one: {cls.__name__} cannot load it. "
                "FastBertForSequenceClassification.from_pretrained picks the FastBERT class of each supported family."
            )
        return config_dict, kwargs

    def __post_init__(self, **kwargs):
        # A stock config.json carries the family's model_type; it must not shadow ours.
        kwargs.pop("model_type", None)
        super().__post_init__(**kwargs)
        self.validate_fastbert()

    def validate_fastbert(self):
        """Raise a `ValueError` naming the first invalid FastBERT setting."""
        self.speed = validate_speed(self.speed)  # a float, also from a Fraction or a numpy number (JSON-safe)
        for name in ("branch_hidden_size", "branch_num_attention_heads", "embedding_head_queries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.branch_hidden_size % self.branch_num_attention_heads:
            raise ValueError(
                f"`branch_hidden_size` ({self.branch_hidden_size}) must be a multiple of "
                f"`branch_num_attention_heads` ({self.branch_num_attention_heads})."
            )
        validate_uncertainty_top_k(self.uncertainty_top_k)
        for name in ("branches_distilled", "normalize_embeddings", "embedding_heads_distilled"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be a bool, got {getattr(self, name)!r}.")
        length = self.embedding_max_length
        if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length <= 0):
            raise ValueError(f"`embedding_max_length` must be None or a positive integer, got {length!r}.")
        if self.embedding_pooling not in POOLING_MODES:
            raise ValueError(f"`embedding_pooling` must be one of {POOLING_MODES}, got {self.embedding_pooling!r}.")
        if self.exit_rule not in EXIT_RULES:
            raise ValueError(f"`exit_rule` must be one of {EXIT_RULES}, got {self.exit_rule!r}.")
        if self.teacher_head not in TEACHER_HEADS:
            raise ValueError(f"`teacher_head` must be one of {TEACHER_HEADS}, got {self.teacher_head!r}.")
        if self.problem_type in ("regression", "multi_label_classification") or self.num_labels < 2:
            raise ValueError(
                "FastBERT exits on the uncertainty of a single-label prediction: it needs "
                f"problem_type='single_label_classification' and num_labels >= 2, got problem_type="
                f"{self.problem_type!r} and num_labels={self.num_labels}."
            )
        if self.num_hidden_layers < 2:
            raise ValueError(
                f"FastBERT needs at least 2 layers (students after all but the last), got {self.num_hidden_layers}."
            )
        for name in ("exit_thresholds", "exit_heads"):
            validate_exit_table(
                getattr(self, name), name, self.num_hidden_layers - 1, sorted_rows=name == "exit_thresholds"
            )


class FastBertConfig(FastBertConfigMixin, BertConfig):
    r"""
    Configuration of a [`FastBertForSequenceClassification`] on BERT: a [`BertConfig`] plus the FastBERT settings
    of [`FastBertConfigMixin`] (`speed`, `branch_hidden_size`, `branch_num_attention_heads`, `uncertainty_top_k`,
    `teacher_head`, `branches_distilled`).

    Example:

    ```python
    >>> from hf_fastbert import FastBertConfig, FastBertForSequenceClassification

    >>> config = FastBertConfig(num_hidden_layers=4, speed=0.2)
    >>> model = FastBertForSequenceClassification(config)
    ```"""

    model_type = "fastbert"
    backbone_model_type = "bert"
    _auto_class = "AutoConfig"


class FastBertRobertaConfig(FastBertConfigMixin, RobertaConfig):
    """A [`RobertaConfig`] plus the FastBERT settings of [`FastBertConfigMixin`]."""

    model_type = "fastbert-roberta"
    backbone_model_type = "roberta"
    _auto_class = "AutoConfig"


class FastBertXLMRobertaConfig(FastBertConfigMixin, XLMRobertaConfig):
    """An [`XLMRobertaConfig`] plus the FastBERT settings of [`FastBertConfigMixin`]."""

    model_type = "fastbert-xlm-roberta"
    backbone_model_type = "xlm-roberta"
    _auto_class = "AutoConfig"


class FastBertElectraConfig(FastBertConfigMixin, ElectraConfig):
    """An [`ElectraConfig`] plus the FastBERT settings of [`FastBertConfigMixin`]."""

    model_type = "fastbert-electra"
    backbone_model_type = "electra"
    _auto_class = "AutoConfig"


class FastBertDistilBertConfig(FastBertConfigMixin, DistilBertConfig):
    """A [`DistilBertConfig`] plus the FastBERT settings of [`FastBertConfigMixin`]."""

    model_type = "fastbert-distilbert"
    backbone_model_type = "distilbert"
    _auto_class = "AutoConfig"


class FastBertAlbertConfig(FastBertConfigMixin, AlbertConfig):
    """An [`AlbertConfig`] plus the FastBERT settings of [`FastBertConfigMixin`]."""

    model_type = "fastbert-albert"
    backbone_model_type = "albert"
    _auto_class = "AutoConfig"


class FastBertDebertaV2Config(FastBertConfigMixin, DebertaV2Config):
    """A [`DebertaV2Config`] (DeBERTa-v2 and -v3 checkpoints) plus the FastBERT settings of [`FastBertConfigMixin`]."""

    model_type = "fastbert-deberta-v2"
    backbone_model_type = "deberta-v2"
    _auto_class = "AutoConfig"


class FastBertModernBertConfig(FastBertConfigMixin, ModernBertConfig):
    """A [`ModernBertConfig`] plus the FastBERT settings of [`FastBertConfigMixin`]."""

    model_type = "fastbert-modernbert"
    backbone_model_type = "modernbert"
    _auto_class = "AutoConfig"


# Every supported family: the model type of its stock checkpoints -> its FastBERT config class.
FASTBERT_CONFIGS = {
    config_class.backbone_model_type: config_class
    for config_class in (
        FastBertConfig,
        FastBertRobertaConfig,
        FastBertXLMRobertaConfig,
        FastBertElectraConfig,
        FastBertDistilBertConfig,
        FastBertAlbertConfig,
        FastBertDebertaV2Config,
        FastBertModernBertConfig,
    )
}


def fastbert_config_class(model_type: str):
    """The FastBERT config class for a stock or FastBERT `model_type`; `ValueError` listing the supported ones."""
    for config_class in FASTBERT_CONFIGS.values():
        if model_type in (config_class.model_type, config_class.backbone_model_type):
            return config_class
    raise ValueError(
        f"FastBERT does not support model type {model_type!r}. Supported backbone families: "
        f"{', '.join(FASTBERT_CONFIGS)}."
    )


def is_fastbert_model_type(model_type) -> bool:
    """Whether `model_type` (a config's) is one of FastBERT's ("fastbert", "fastbert-roberta", ...)."""
    return any(model_type == config_class.model_type for config_class in FASTBERT_CONFIGS.values())


__all__ = [
    "FASTBERT_CONFIGS",
    "FastBertAlbertConfig",
    "FastBertConfig",
    "FastBertConfigMixin",
    "FastBertDebertaV2Config",
    "FastBertDistilBertConfig",
    "FastBertElectraConfig",
    "FastBertModernBertConfig",
    "FastBertRobertaConfig",
    "FastBertXLMRobertaConfig",
    "fastbert_config_class",
    "is_fastbert_model_type",
]

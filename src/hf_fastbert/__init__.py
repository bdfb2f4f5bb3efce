"""hf-fastbert: FastBERT's self-distilled early exit for Hugging Face Transformers."""

from transformers import AutoConfig, AutoModelForSequenceClassification

from .configuration_fastbert import FastBertConfig
from .flops import bert_flops, fastbert_flops
from .modeling_fastbert import (
    FastBertForSequenceClassification,
    FastBertSequenceClassifierOutput,
    normalized_entropy,
)


__version__ = "0.1.0"

# The only global change the package makes: the Auto classes learn the "fastbert" model type.
AutoConfig.register(FastBertConfig.model_type, FastBertConfig, exist_ok=True)
AutoModelForSequenceClassification.register(FastBertConfig, FastBertForSequenceClassification, exist_ok=True)

__all__ = [
    "FastBertConfig",
    "FastBertForSequenceClassification",
    "FastBertSequenceClassifierOutput",
    "__version__",
    "bert_flops",
    "fastbert_flops",
    "normalized_entropy",
]

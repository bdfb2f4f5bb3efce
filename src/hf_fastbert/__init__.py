"""hf-fastbert: FastBERT's self-distilled early exit for Hugging Face Transformers."""

import importlib

from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from .configuration_fastbert import (
    FASTBERT_CONFIGS,
    FastBertAlbertConfig,
    FastBertConfig,
    FastBertConfigMixin,
    FastBertDebertaV2Config,
    FastBertDistilBertConfig,
    FastBertElectraConfig,
    FastBertModernBertConfig,
    FastBertRobertaConfig,
    FastBertXLMRobertaConfig,
)
from .flops import bert_flops, fastbert_flops, stock_flops
from .modeling_fastbert import (
    FASTBERT_BASE_MODELS,
    FASTBERT_MODELS,
    FastBertAlbertForSequenceClassification,
    FastBertDebertaV2ForSequenceClassification,
    FastBertDistilBertForSequenceClassification,
    FastBertElectraForSequenceClassification,
    FastBertForSequenceClassification,
    FastBertModelMixin,
    FastBertModernBertForSequenceClassification,
    FastBertRobertaForSequenceClassification,
    FastBertSequenceClassifierOutput,
    FastBertXLMRobertaForSequenceClassification,
    fold_students,
    normalized_entropy,
)
from .modeling_fastbert_embedding import (
    FASTBERT_EMBEDDING_MODELS,
    FastBertEmbeddingOutput,
    FastBertForSentenceEmbedding,
)
from .pipeline_fastbert import FastBertTextClassificationPipeline, pipeline, register_text_classification_pipeline


# The training stack (Trainer, datasets, pandas) loads on first use, so that inference-only users do not pay for it.
_LAZY_NAMES = {
    "ConvergenceCallback": "convergence",
    "FastBertDistillationTrainer": "trainer_fastbert",
    "FastBertEmbeddingTrainer": "trainer_fastbert_embedding",
    "FastBertMetrics": "evaluation",
    "FastBertTrainingArguments": "training_args_fastbert",
    "distillation_loss": "distillation",
    "evaluate_speeds": "evaluation",
    "train_embedding_heads": "training",
    "train_fastbert": "training",
    "write_model_card": "modelcard",
}


def __getattr__(name):
    if name not in _LAZY_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY_NAMES))


__version__ = "0.1.0"

# The only global changes the package makes: the Auto classes learn the FastBERT model types ("fastbert",
# "fastbert-roberta", ...; AutoModelForSequenceClassification gives the FastBERT model, AutoModel its backbone), and
# the "text-classification" pipeline learns FastBERT's `speed` (stock behaviour for every other model).
for _config_class, _model_class in FASTBERT_MODELS.items():
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
    AutoModelForSequenceClassification.register(_config_class, _model_class, exist_ok=True)
    AutoModel.register(_config_class, FASTBERT_BASE_MODELS[_config_class], exist_ok=True)
register_text_classification_pipeline()

__all__ = [
    "ConvergenceCallback",
    "FASTBERT_CONFIGS",
    "FASTBERT_EMBEDDING_MODELS",
    "FastBertEmbeddingOutput",
    "FastBertForSentenceEmbedding",
    "FASTBERT_MODELS",
    "FastBertAlbertConfig",
    "FastBertAlbertForSequenceClassification",
    "FastBertConfig",
    "FastBertConfigMixin",
    "FastBertDebertaV2Config",
    "FastBertDebertaV2ForSequenceClassification",
    "FastBertDistilBertConfig",
    "FastBertDistilBertForSequenceClassification",
    "FastBertElectraConfig",
    "FastBertElectraForSequenceClassification",
    "FastBertDistillationTrainer",
    "FastBertEmbeddingTrainer",
    "FastBertForSequenceClassification",
    "FastBertMetrics",
    "FastBertModelMixin",
    "FastBertModernBertConfig",
    "FastBertModernBertForSequenceClassification",
    "FastBertRobertaConfig",
    "FastBertRobertaForSequenceClassification",
    "FastBertSequenceClassifierOutput",
    "FastBertTextClassificationPipeline",
    "FastBertTrainingArguments",
    "FastBertXLMRobertaConfig",
    "FastBertXLMRobertaForSequenceClassification",
    "__version__",
    "bert_flops",
    "distillation_loss",
    "evaluate_speeds",
    "fastbert_flops",
    "fold_students",
    "normalized_entropy",
    "pipeline",
    "stock_flops",
    "train_embedding_heads",
    "train_fastbert",
    "write_model_card",
]

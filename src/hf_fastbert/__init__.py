"""hf-fastbert: FastBERT's self-distilled early exit for Hugging Face Transformers."""

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
from .evaluation import FastBertMetrics, evaluate_speeds
from .flops import bert_flops, fastbert_flops, stock_flops
from .modelcard import write_model_card
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
    normalized_entropy,
)
from .pipeline_fastbert import FastBertTextClassificationPipeline, pipeline, register_text_classification_pipeline
from .trainer_fastbert import FastBertDistillationTrainer, distillation_loss
from .training import train_fastbert
from .training_args_fastbert import FastBertTrainingArguments


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
    "FASTBERT_CONFIGS",
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
    "normalized_entropy",
    "pipeline",
    "stock_flops",
    "train_fastbert",
    "write_model_card",
]

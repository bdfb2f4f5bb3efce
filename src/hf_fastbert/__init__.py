"""hf-fastbert: FastBERT's self-distilled early exit for Hugging Face Transformers."""

from transformers import AutoConfig, AutoModelForSequenceClassification

from .configuration_fastbert import FastBertConfig
from .evaluation import FastBertMetrics, evaluate_speeds
from .flops import bert_flops, fastbert_flops
from .modelcard import write_model_card
from .modeling_fastbert import (
    FastBertForSequenceClassification,
    FastBertSequenceClassifierOutput,
    normalized_entropy,
)
from .pipeline_fastbert import FastBertTextClassificationPipeline, pipeline, register_text_classification_pipeline
from .trainer_fastbert import FastBertDistillationTrainer, distillation_loss
from .training import train_fastbert
from .training_args_fastbert import FastBertTrainingArguments


__version__ = "0.1.0"

# The only global changes the package makes: the Auto classes learn the "fastbert" model type, and the
# "text-classification" pipeline learns FastBERT's `speed` (stock behaviour for every other model).
AutoConfig.register(FastBertConfig.model_type, FastBertConfig, exist_ok=True)
AutoModelForSequenceClassification.register(FastBertConfig, FastBertForSequenceClassification, exist_ok=True)
register_text_classification_pipeline()

__all__ = [
    "FastBertConfig",
    "FastBertDistillationTrainer",
    "FastBertForSequenceClassification",
    "FastBertMetrics",
    "FastBertSequenceClassifierOutput",
    "FastBertTextClassificationPipeline",
    "FastBertTrainingArguments",
    "__version__",
    "bert_flops",
    "distillation_loss",
    "evaluate_speeds",
    "fastbert_flops",
    "normalized_entropy",
    "pipeline",
    "train_fastbert",
    "write_model_card",
]

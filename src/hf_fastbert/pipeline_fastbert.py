"""The text-classification and feature-extraction pipelines with FastBERT's `speed`, and `hf_fastbert.pipeline`."""

from typing import Any

import torch
import transformers
from transformers import FeatureExtractionPipeline, TextClassificationPipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_fastbert import is_fastbert_model_type, validate_speed
from .constants import EXIT_RULES
from .modeling_fastbert_embedding import FastBertEmbeddingMixin


TASK = "text-classification"
TASK_ALIASES = ("text-classification", "sentiment-analysis")
EMBEDDING_TASK = "feature-extraction"


def is_fastbert(model) -> bool:
    """Whether `model` is a FastBERT model, from the plugin or loaded as remote code (`trust_remote_code=True`)."""
    return is_fastbert_model_type(getattr(getattr(model, "config", None), "model_type", None))


class FastBertTextClassificationPipeline(TextClassificationPipeline):
    r"""
    [`TextClassificationPipeline`] that runs FastBERT models at a chosen `speed`.

    Once `hf_fastbert` is imported, `transformers.pipeline("text-classification", ...)` (and "sentiment-analysis")
    builds this class. For models that are not FastBERT it is exactly the stock pipeline, except that `speed` and
    `return_exit_layer` raise a `ValueError` instead of being silently handed to the tokenizer.

    Args (at construction or per call, the call's value wins):
        speed (`float`, *optional*):
            Early-exit threshold in [0, 1]; defaults to the model's `config.speed`. A sample leaves at the first layer
            whose student's normalized uncertainty is below `speed`.
        exit_rule (`str`, *optional*):
            The exit rule (`"entropy"`, `"patience"`, `"thresholds"`, `"learned"`; see `hf_fastbert.exit_rules`);
            defaults to the model's `config.exit_rule`, the one `hf-fastbert calibrate` picked.
        return_exit_layer (`bool`, *optional*, defaults to `False`):
            Add `"exit_layer"`, the 1-based layer the sample left at, to each result.

    Every other argument (`top_k`, `function_to_apply`, tokenizer arguments, `batch_size`, sentence pairs given as
    `{"text": ..., "text_pair": ...}`) behaves as in [`TextClassificationPipeline`].

    Example:

    ```python
    >>> import hf_fastbert
    >>> from transformers import pipeline

    >>> classifier = pipeline("text-classification", model="path/to/fastbert", speed=0.1)
    >>> classifier("A gem.", return_exit_layer=True)
    [{'label': 'positive', 'score': 0.97, 'exit_layer': 2}]
    >>> classifier(["A gem.", "Too long."], speed=0.5)  # per-call speed
    ```"""

    def check_model_type(self, supported_models):
        # FastBERT on ONNX Runtime (`hf_fastbert.modeling_ort`) is no PreTrainedModel, but a text classifier all the
        # same: no "not supported for text-classification" error for it.
        if not is_fastbert(self.model):
            super().check_model_type(supported_models)

    def _sanitize_parameters(self, speed=None, return_exit_layer=None, exit_rule=None, **kwargs):
        preprocess_params, forward_params, postprocess_params = super()._sanitize_parameters(**kwargs)
        for name, value in (("speed", speed), ("return_exit_layer", return_exit_layer), ("exit_rule", exit_rule)):
            if value is not None and not is_fastbert(self.model):
                raise ValueError(
                    f"`{name}` is a FastBERT option, but this pipeline's model is {type(self.model).__name__} "
                    f"(model_type={getattr(self.model.config, 'model_type', None)!r}), not a FastBERT model."
                )
        if speed is not None:
            validate_speed(speed)
            forward_params["speed"] = float(speed)  # any real number (a Fraction, a numpy float) as the model's float
        if exit_rule is not None:
            if exit_rule not in EXIT_RULES:
                raise ValueError(f"`exit_rule` must be one of {EXIT_RULES}, got {exit_rule!r}.")
            forward_params["exit_rule"] = exit_rule
        if return_exit_layer is not None:
            if not isinstance(return_exit_layer, bool):
                raise ValueError(f"`return_exit_layer` must be a bool, got {return_exit_layer!r}.")
            postprocess_params["return_exit_layer"] = return_exit_layer
        return preprocess_params, forward_params, postprocess_params

    def _forward(self, model_inputs, speed=None, exit_rule=None):
        if is_fastbert(self.model):
            effective_speed = self.model.config.speed if speed is None else speed
            if self.model.training and effective_speed > 0:
                raise ValueError(
                    f"speed={effective_speed} was asked, but the FastBERT model is in training mode, where it never "
                    "exits early: call `model.eval()` first."
                )
            if speed is not None:
                model_inputs = {**model_inputs, "speed": speed}
            if exit_rule is not None:
                model_inputs = {**model_inputs, "exit_rule": exit_rule}
        return super()._forward(model_inputs)

    def postprocess(self, model_outputs, return_exit_layer=False, **kwargs):
        result = super().postprocess(model_outputs, **kwargs)
        if return_exit_layer:
            exit_layer = int(model_outputs["exit_layers"][0])
            for entry in [result] if isinstance(result, dict) else result:
                entry["exit_layer"] = exit_layer
        return result


class FastBertFeatureExtractionPipeline(FeatureExtractionPipeline):
    r"""
    [`FeatureExtractionPipeline`] that runs FastBERT sentence embedding models ([`FastBertForSentenceEmbedding`]) at
    a chosen `speed`: each input gives its sentence embedding (a list of `hidden_size` floats, pooled and normalized
    as the model's config says), as sentence-transformers' `encode` and TEI's `/embed` do, rather than per-token
    states.

    Once `hf_fastbert` is imported, `transformers.pipeline("feature-extraction", ...)` builds this class. For other
    models it is exactly the stock pipeline, except that `speed` raises a `ValueError` instead of being dropped.

    Args (at construction or per call, the call's value wins):
        speed (`float`, *optional*): Early-exit threshold in [0, 1]; defaults to the model's `config.speed`.

    Example:

    ```python
    >>> import hf_fastbert
    >>> from transformers import pipeline

    >>> embed = pipeline("feature-extraction", model=embedding_model, tokenizer=tokenizer, speed=0.05)
    >>> embed(["A query", "A document"])  # [[[0.01, ...]], [[...]]]: one embedding per input
    ```"""

    def _sanitize_parameters(self, speed=None, **kwargs):
        preprocess_params, forward_params, postprocess_params = super()._sanitize_parameters(**kwargs)
        if speed is not None:
            if not isinstance(self.model, FastBertEmbeddingMixin):
                raise ValueError(
                    f"`speed` is an option of FastBERT sentence embedding models, but this pipeline's model is "
                    f"{type(self.model).__name__}."
                )
            forward_params["speed"] = validate_speed(speed)
        return preprocess_params, forward_params, postprocess_params

    def _forward(self, model_inputs, speed=None):
        if speed is not None:
            model_inputs = {**model_inputs, "speed": speed}
        return self.model(**model_inputs)


def register_text_classification_pipeline() -> None:
    """
    Make `transformers.pipeline("text-classification")` and `"sentiment-analysis"` build
    [`FastBertTextClassificationPipeline`], and `"feature-extraction"` [`FastBertFeatureExtractionPipeline`].
    `import hf_fastbert` calls it; it is idempotent.

    Only the registry entry's `impl` changes: its model classes, default model and type stay the stock ones. This is
    what `PIPELINE_REGISTRY.register_pipeline` would store, without its side effects: it logs an "Overwriting
    pipeline" warning on every import, drops the default model unless given again, and marks the class as a custom
    pipeline, so that `Pipeline.save_pretrained` would write `custom_pipelines["text-classification"]` and the pipeline
    code into saved repos, making everyone who loads them pass `trust_remote_code=True`.
    """
    pipelines = {TASK: FastBertTextClassificationPipeline, EMBEDDING_TASK: FastBertFeatureExtractionPipeline}
    for task, impl in pipelines.items():
        entry = PIPELINE_REGISTRY.supported_tasks[task]
        PIPELINE_REGISTRY.supported_tasks[task] = {**entry, "impl": impl}


def pipeline(
    task: str | None = None,
    model=None,
    config=None,
    tokenizer=None,
    feature_extractor=None,
    image_processor=None,
    video_processor=None,
    processor=None,
    revision: str | None = None,
    use_fast: bool = True,
    token: str | bool | None = None,
    device: int | str | torch.device | None = None,
    device_map: str | dict[str, int | str] | None = None,
    dtype: str | torch.dtype | None = "auto",
    trust_remote_code: bool | None = None,
    model_kwargs: dict[str, Any] | None = None,
    pipeline_class: Any | None = None,
    *,
    speed: float | None = None,
    exit_rule: str | None = None,
    **kwargs: Any,
):
    """
    [`transformers.pipeline`] with FastBERT's `speed` and `exit_rule`: the same arguments, plus those two.

    For "text-classification" (and "sentiment-analysis") it builds a [`FastBertTextClassificationPipeline`] and for
    "feature-extraction" a [`FastBertFeatureExtractionPipeline`], whatever the global pipeline registry holds; for a
    FastBERT model instance the task defaults to "text-classification" ("feature-extraction" for a sentence embedding
    model). It changes no global state.

    Args:
        speed (`float`, *optional*):
            Default early-exit threshold in [0, 1] of the pipeline's calls (each call can override it); defaults to
            the model's `config.speed`. Only for FastBERT models (text classification, or feature extraction with a
            sentence embedding model): anything else raises a `ValueError`.
        exit_rule (`str`, *optional*):
            Default exit rule of the pipeline's calls (each call can override it); defaults to the model's
            `config.exit_rule`. Same restrictions as `speed`.

    Example:

    ```python
    >>> import hf_fastbert

    >>> classifier = hf_fastbert.pipeline("text-classification", model="path/to/fastbert", speed=0.2)
    >>> classifier(["A gem.", "Too long."], return_exit_layer=True)
    ```"""
    if speed is not None:
        validate_speed(speed)
        speed = float(speed)
    if task is None and isinstance(model, FastBertEmbeddingMixin):
        task = EMBEDDING_TASK
    elif task is None and is_fastbert(model):
        task = TASK
    if task in TASK_ALIASES and pipeline_class is None:
        pipeline_class = FastBertTextClassificationPipeline
    if task == EMBEDDING_TASK and pipeline_class is None:
        pipeline_class = FastBertFeatureExtractionPipeline
    for name, value in (("speed", speed), ("exit_rule", exit_rule)):
        if value is None:
            continue
        tasks = TASK_ALIASES + ((EMBEDDING_TASK,) if name == "speed" else ())
        if task not in tasks and not (task is None and isinstance(model, str)):
            raise ValueError(f"`{name}` applies to the tasks {tasks} of FastBERT models, not to {task!r}.")
        kwargs[name] = value
    return transformers.pipeline(
        task=task,
        model=model,
        config=config,
        tokenizer=tokenizer,
        feature_extractor=feature_extractor,
        image_processor=image_processor,
        video_processor=video_processor,
        processor=processor,
        revision=revision,
        use_fast=use_fast,
        token=token,
        device=device,
        device_map=device_map,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        model_kwargs=model_kwargs,
        pipeline_class=pipeline_class,
        **kwargs,
    )


__all__ = [
    "FastBertFeatureExtractionPipeline",
    "FastBertTextClassificationPipeline",
    "is_fastbert",
    "pipeline",
    "register_text_classification_pipeline",
]

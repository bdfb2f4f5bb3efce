"""int8 inference on CPU: a FastBERT model whose linear layers (backbone, teacher and students) run in int8.

`torch.ao.quantization.quantize_dynamic` is used although it is deprecated in favour of torchao: on this project's CPU
machines torchao 0.18's `Int8DynamicActivationInt8WeightConfig` ran an int8 feed-forward block 1.6x *slower* than
fp32 without `torch.compile`, while `quantize_dynamic` ran it 3.2x faster (numbers in the README). Dynamic quantization
picks one activation scale per call, so in one batched call a sample's answer would depend on the rest of its batch
(3 of 20 demo snippets changed label or exit layer between batch 1 and 32 at speed 0.3). So the int8 copy runs each
sample alone, without its padding (`per_sample=True`, the default): its answers are the same in any batch, at the
cost of batching's throughput (on 1 thread, batch 32 cost about 1.3x batch 32 run together).
"""

import warnings

import torch
from torch import nn

from .modeling_fastbert import FastBertBranch, FastBertModelMixin, FoldedFastBertBranch, fold_students, is_quantized


def check_int8_supported():
    """A `RuntimeError` naming the problem when this torch build has no int8 CPU kernels (no quantized engine)."""
    engines = [engine for engine in torch.backends.quantized.supported_engines if engine != "none"]
    if not engines:
        raise RuntimeError(
            "int8 inference needs a quantized CPU engine (fbgemm, x86 or qnnpack), and this torch build has none: "
            "run the model in float32"
        )


def quantize_int8(model: FastBertModelMixin, per_sample: bool = True) -> FastBertModelMixin:
    """
    An int8 inference copy of `model` (eval mode, CPU): its students folded (`fold_students`), then every `nn.Linear`
    with int8 weights and dynamically quantized activations, but the students' layers that only see one vector per
    sample (their `first_token_layers`): at that size int8's per-call quantization costs more than the
    float matrix product it replaces (`benchmarks/bench_students.py`). The original model is left untouched. Exits,
    `speed` and the pipeline work as before; `save_pretrained` and the distillation trainer refuse the copy (distill
    and save the float model, then quantize).

    With `per_sample` (the default), a batch runs one sample at a time, each without its padding: int8 activations
    are scaled per call, so a sample's answer is then the same whatever else is in its batch (a server's clients do
    not change each other's labels). `per_sample=False` runs batches together: faster at large batches, and each
    answer depends slightly on the rest of its batch.

    Example:

    ```python
    >>> from hf_fastbert import FastBertForSequenceClassification
    >>> from hf_fastbert.quantization import quantize_int8

    >>> model = quantize_int8(FastBertForSequenceClassification.from_pretrained("path/to/fastbert"))
    >>> model(**inputs, speed=0.5).exit_layers
    ```"""
    if not isinstance(model, FastBertModelMixin):
        raise ValueError(f"quantize_int8 takes a FastBERT model, got {type(model).__name__}.")
    if model.device.type != "cpu":
        raise ValueError(f"int8 dynamic quantization runs on the CPU; the model is on {model.device}: call .cpu().")
    check_int8_supported()
    quantized = fold_students(model)
    kept_float = {
        f"{name}.{layer}"
        for name, module in quantized.named_modules()
        if isinstance(module, (FastBertBranch, FoldedFastBertBranch))
        for layer in module.first_token_layers
    }
    names = {name for name, module in quantized.named_modules() if isinstance(module, nn.Linear)} - kept_float
    with warnings.catch_warnings():  # torch.ao's deprecation notices, see the module docstring
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        quantized = torch.ao.quantization.quantize_dynamic(quantized, names, dtype=torch.qint8)
    quantized.int8_per_sample = per_sample  # read by the forward pass (`_forward_each_sample`)
    return quantized


__all__ = ["check_int8_supported", "is_quantized", "quantize_int8"]

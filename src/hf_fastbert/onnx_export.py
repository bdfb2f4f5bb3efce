"""Export a FastBERT model to ONNX Runtime as stages, so that its early exits run on the runtime BERT classifiers are
deployed with.

A batch cannot leave a session half-way (its rows leave at different layers; ONNX Runtime's maintainers say the
runtime has no early exit), so the model is cut where the exits are: one graph per layer, for the layer and its student
(the student's logits and its exit measure, the normalized entropy); the first layer's graph starts from the token ids
(the embeddings inside it). Between two session runs the host reads a few numbers per sample and drops the rows that
left ([`hf_fastbert.modeling_ort`]). A sample alone can stop half-way through one graph: at load, the runtime nests the
layer graphs in `If`s ([`early_exit_graph`]), one session run per sample. The layers are fused before they are cut and
nested (`If`/`Loop` subgraphs miss the fusion passes): every fusion of a layer (Attention, SkipLayerNormalization,
BiasGelu) lies inside its graph; only cross-layer memory planning is lost. Speed 0, where no sample can leave, runs
another graph: the whole model in one (`model.onnx`, the stock classifier's computation), so that it neither runs the
students nor pays a session run per layer. Each session run costs more than its operators (its own workers to wake,
its memory planned apart from the other sessions'), so the format runs as few as it can. A session computes every
output it has, whatever the caller asks for, so the students are inside their layer's graph (format 2 had graphs of
their own: a second run per layer), and the embeddings inside the first layer's (format 3 had a graph of their own:
one run more).

Toolchain: `torch.onnx.export(dynamo=True)` (torch.export, then onnxscript's torchlib), onnxscript's ONNX Runtime
rewriter (`onnxscript.rewriter.ort_fusions`, which fuses graphs from the dynamo exporter; the older
`onnxruntime.transformers.optimizer` does not) and `onnxruntime.quantization.quantize_dynamic` for int8. Optimum pins
transformers < 4.58; transformers' own `exporters` export whole models, not a model's layers one by one.

Layout, beside the model's `config.json` (Optimum's habit: ONNX files under `onnx/`):

    onnx/layer_0.onnx      input_ids, attention_mask[, token_type_ids] -> next_hidden_states, logits, uncertainty
    onnx/layer_<i>.onnx    hidden_states, attention_mask -> next_hidden_states, logits, uncertainty (0 < i < L - 1)
    onnx/layer_<L-1>.onnx  hidden_states, attention_mask -> logits (the teacher)
    onnx/model.onnx        input_ids, attention_mask[, token_type_ids] -> logits (the teacher; what speed 0 runs)
    onnx/fastbert_onnx.json  what the files were exported from, checked at load
"""

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from .exit_rules import _unclamped_normalized_entropy
from .files import sha256_file


logger = logging.getLogger(__name__)

ONNX_FOLDER = "onnx"
MANIFEST = "fastbert_onnx.json"
FULL_MODEL = "model.onnx"  # the whole model in one graph: speed 0 runs it, as the stock classifier runs
EARLY_EXIT = "early_exit"  # the layer graphs nested in one, built at load (`early_exit_graph`): a sample alone
# 1: students inside the layer graphs, no whole-model graph; 2: students in graphs of their own, beside the whole
# model; 3: students inside the layer graphs, embeddings in a graph of their own; 4: embeddings inside layer 0's graph
FORMAT_VERSION = 4
OPSET = 18
# The fused operators every layer of these families must have after the rewriter (checked at export and in tests):
# a version of onnxscript or torch that silently stops fusing fails loudly instead of running slower.
EXPECTED_FUSIONS = {
    "bert": {"Attention": 1, "SkipLayerNormalization": 2, "BiasGelu": 1},
    "roberta": {"Attention": 1, "SkipLayerNormalization": 2, "BiasGelu": 1},
    "xlm-roberta": {"Attention": 1, "SkipLayerNormalization": 2, "BiasGelu": 1},
    "electra": {"Attention": 1, "SkipLayerNormalization": 2, "BiasGelu": 1},
    "distilbert": {"Attention": 1, "SkipLayerNormalization": 2, "BiasGelu": 1},
}
ONNX_EXTRA_HINT = "pip install 'hf-fastbert[onnx]'"


def require_onnx():
    """Import the export toolchain, or fail with one line naming the extra."""
    try:
        import onnx_ir  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ImportError(f"ONNX export and ONNX Runtime need the [onnx] extra: {ONNX_EXTRA_HINT} ({error})") from None


class EmbeddingStage(nn.Module):
    """The embeddings of a FastBERT model: token ids (and types) -> the first layer's input."""

    def __init__(self, model, token_types: bool):
        super().__init__()
        self.model, self.token_types = model, token_types

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        inputs = {"input_ids": input_ids, "inputs_embeds": None}
        inputs.update({name: None for name in self.model.backbone.embedding_inputs})  # positions: the default
        if self.token_types:
            inputs["token_type_ids"] = token_type_ids
        return self.model.backbone.embed(self.model, inputs, attention_mask)  # (B, T, H)


class LayerStage(nn.Module):
    """
    Layer `index` of a FastBERT model, with its student and exit measure (the teacher after the last layer). Layer 0
    starts from the token ids (`embeddings` is its [`EmbeddingStage`]), the others from the previous layer's output.
    """

    def __init__(self, model, index: int, embeddings: EmbeddingStage | None = None):
        super().__init__()
        self.model, self.index, self.embeddings = model, index, embeddings

    def forward(self, inputs, attention_mask, token_type_ids=None):
        model, backbone = self.model, self.model.backbone
        hidden_states = inputs if self.embeddings is None else self.embeddings(inputs, attention_mask, token_type_ids)
        state = backbone.prepare(model, hidden_states, attention_mask)
        # At layer 0 the input is the embeddings (DeBERTa's convolution after the first layer reads them).
        hidden = backbone.run_layer(model, self.index, hidden_states, state, attention_mask, hidden_states)
        if self.index == model.config.num_hidden_layers - 1:
            return model.teacher_logits(hidden, attention_mask)  # (B, C)
        logits = model.branches[self.index](backbone.student_input(model, hidden), attention_mask)  # (B, C)
        uncertainty = _unclamped_normalized_entropy(logits, model.config.uncertainty_top_k)  # (B,)
        return hidden, logits, uncertainty


class FullModelStage(nn.Module):
    """
    The whole model at speed 0, as the stock classifier computes it: embeddings, every layer (masks prepared once),
    the teacher. One session run instead of one per layer: what speed 0 runs, so that it costs what the stock graph
    costs.
    """

    def __init__(self, model, token_types: bool):
        super().__init__()
        self.model, self.embeddings = model, EmbeddingStage(model, token_types)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        model, backbone = self.model, self.model.backbone
        embeddings = self.embeddings(input_ids, attention_mask, token_type_ids)  # (B, T, H)
        state = backbone.prepare(model, embeddings, attention_mask)
        hidden = embeddings
        for index in range(model.config.num_hidden_layers):
            hidden = backbone.run_layer(model, index, hidden, state, attention_mask, embeddings)
        return model.teacher_logits(hidden, attention_mask)  # (B, C)


def uses_token_types(model) -> bool:
    return "token_type_ids" in model.backbone.embedding_inputs and getattr(model.config, "type_vocab_size", 0) > 0


def weights_fingerprint(folder) -> str | None:
    """SHA-256 of the folder's `model.safetensors` (None without one): ties an `onnx/` folder to the weights."""
    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        return None
    return sha256_file(path)


def config_signature(config) -> dict:
    """The config fields the exported graphs depend on: a mismatch at load means the files belong to another model."""
    return {
        "backbone_model_type": config.backbone_model_type,
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "num_labels": config.num_labels,
        "id2label": {str(key): value for key, value in config.id2label.items()},
        "teacher_head": config.teacher_head,
    }


def _operator_counts(model) -> dict:
    counts = {}
    for node in model.graph.all_nodes() if hasattr(model.graph, "all_nodes") else model.graph:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _export_stage(module, args, input_names, output_names, dynamic_shapes):
    # The exporter's notes (axis names, deprecations, "torchvision is not installed") are not the user's business.
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                opset_version=OPSET,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=dynamic_shapes,
                verbose=False,
            )
    finally:
        registration.setLevel(level)
    return program.model  # onnx_ir.Model


def _fuse(model, padding_mask: bool = False):
    """
    ONNX Runtime's fused operators (onnxscript's rewriter). With `padding_mask` (the graph's `attention_mask` input is
    the only thing its attention masks depend on: the encoder families of `EXPECTED_FUSIONS`), every fused `Attention`
    also reads that mask directly as its `mask_index` (1 = attend), instead of the (batch, 1, length, length) bias the
    exported graph builds from it with about 20 operators: those ran in every layer's session, which the stock
    graph builds once (the same rewrite is applied to it in the benchmark, like with like).
    """
    from onnxscript.rewriter import ort_fusions

    fused, _ = ort_fusions.optimize_for_ort(model)
    if padding_mask:
        _attention_reads_padding_mask(fused)
    return fused


def _attention_reads_padding_mask(model) -> None:
    """Rewire every `com.microsoft` Attention of `model` with an attention bias to `mask_index = int32(attention_mask)`
    and drop the nodes that only built the bias."""
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    graph = model.graph
    mask = next((value for value in graph.inputs if value.name == "attention_mask"), None)
    attention = [
        node
        for node in graph
        if node.op_type == "Attention"
        and node.domain == "com.microsoft"
        and len(node.inputs) >= 6
        and node.inputs[5] is not None
        and node.inputs[3] is None
    ]
    if mask is None or not attention:
        return
    cast = ir.node("Cast", [mask], {"to": ir.DataType.INT32}, name="attention_mask_index")
    cast.outputs[0].name = "attention_mask_index"
    graph.insert_before(attention[0], cast)
    for node in attention:
        node.replace_input_with(3, cast.outputs[0])
        node.resize_inputs(5)  # the attention bias, gone
    RemoveUnusedNodesPass()(model)


def _student_nodes(model) -> list[str]:
    """Names of the nodes that compute a student after its input projection (which sees every token, as a layer's
    matrices do, and is quantized): traced inside `model.branches.<i>` (the exporter's name scopes), or reading one
    of its parameters (nodes the rewriter made keep their inputs, not always their metadata)."""
    names = []
    for node in model.graph:
        scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes", "")
        inputs = [value.name for value in node.inputs if value is not None]
        if "dense_in" in scopes or any(name and "dense_in" in name for name in inputs):
            continue
        if "branches." in scopes or any(name and "branches." in name for name in inputs):
            names.append(node.name)
            if node.op_type == "Gemm":  # quantize_dynamic first rewrites a Gemm into `<name>_MatMul` + `<name>_Add`
                names.append(f"{node.name}_MatMul")
    return names


def _save(model, path: Path):
    import onnx_ir as ir

    ir.save(model, str(path))


def _quantize(source: Path, target: Path, exclude: list[str]):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    disabled = logging.root.manager.disable
    logging.disable(max(disabled, logging.WARNING))  # its advice to pre-process, on the root logger for every stage
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, nodes_to_exclude=exclude)
    finally:
        logging.disable(disabled)


def export_onnx(model, output_dir=None, *, int8: bool = False, quantize_students: bool = False, check: bool = True):
    """
    Export a FastBERT model as ONNX Runtime stages into `<output_dir>/onnx/`: each layer and its student (the first
    with the embeddings), and the whole model in one graph (`model.onnx`, what speed 0 runs: the stock classifier's
    computation).

    Args:
        model ([`FastBertForSequenceClassification`] or `str`):
            The model, or the folder of a saved one (then `output_dir` defaults to it). Inference copies (folded or
            int8 PyTorch models) are refused: export the float model, and pass `int8=True`.
        output_dir (`str`, *optional*): The model folder the `onnx/` folder goes into. With a model object, the model
            is saved there first (`save_pretrained`: config and weights, which the `onnx/` files are tied to); add the
            tokenizer for the pipeline. [`ORTFastBertForSequenceClassification.from_pretrained`] reads the folder.
        int8 (`bool`, *optional*, defaults to `False`): Dynamic int8 quantization of every stage (weights int8 per
            tensor, activations quantized per call), after fusion.
        quantize_students (`bool`, *optional*, defaults to `False`): Quantize every matrix of the students. By
            default only their input projection is (it sees every token, like a layer's matrices); the rest sees one
            vector per sample, where per-call activation quantization costs more than it saves (as measured for the
            PyTorch int8 path; `benchmarks/bench_onnx.py --quantized-students` measures it on the runtime).
        check (`bool`, *optional*, defaults to `True`): Fail when a layer of a family listed in `EXPECTED_FUSIONS`
            lacks one of its fused operators.

    Returns:
        `Path` of the `onnx/` folder. It replaces an existing one only once every stage is written.
    """
    require_onnx()
    from .modeling_fastbert import FastBertForSequenceClassification, FastBertModelMixin, fold_students

    source_dir = None
    if isinstance(model, str | os.PathLike):
        source_dir = Path(model)
        if not (source_dir / "config.json").is_file():
            raise ValueError(f"{model} is not a saved model folder (no config.json).")
        model = FastBertForSequenceClassification.from_pretrained(source_dir)
    if not isinstance(model, FastBertModelMixin):
        raise ValueError(f"export_onnx takes a FastBERT model, got {type(model).__name__}.")
    if model.is_inference_copy:
        raise ValueError(
            "This model is an inference copy (folded or int8 PyTorch): export the float model it came from "
            "(`int8=True` quantizes the ONNX stages)."
        )
    if output_dir is None:
        if source_dir is None:
            raise ValueError("Give `output_dir`: the model folder the onnx/ folder goes into.")
        output_dir = source_dir
    output_dir = Path(output_dir)
    if source_dir is None or output_dir.resolve() != source_dir.resolve():
        model.save_pretrained(output_dir)
    config = model.config
    family = config.backbone_model_type
    if not config.branches_distilled:
        logger.warning(
            "The students of this model were never self-distilled: the exported stages answer like the PyTorch model, "
            "so only speed 0 gives meaningful predictions."
        )
    # The stages compute the students folded (`fold_students`: the same function within float rounding in fewer
    # operators, which a small batch pays for one by one); the folder keeps the checkpoint's own weights.
    model = fold_students(model)
    token_types = uses_token_types(model)

    # Example inputs: 2 rows, one padded, so that the traced graph covers padding; both axes dynamic.
    generator = torch.Generator().manual_seed(0)
    low = min(5, config.vocab_size - 1)
    input_ids = torch.randint(low, config.vocab_size, (2, 16), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 11:] = 0
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    axes = {0: batch, 1: length}

    final = output_dir / ONNX_FOLDER
    work = Path(tempfile.mkdtemp(prefix=f".{ONNX_FOLDER}.", suffix=".partial", dir=output_dir))
    try:
        stages = []
        embedding_inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if token_types else [])
        args = (input_ids, attention_mask) + ((torch.zeros_like(input_ids),) if token_types else ())
        try:
            full = FullModelStage(model, token_types).eval()
            graph = _export_stage(full, args, embedding_inputs, ["logits"], tuple(axes for _ in args))
            stages.append((FULL_MODEL, graph))
            stage_args, input_names = args, embedding_inputs  # layer 0 reads the token ids
            for index in range(config.num_hidden_layers):
                last = index == config.num_hidden_layers - 1
                outputs = ["logits"] if last else ["next_hidden_states", "logits", "uncertainty"]
                embeddings = EmbeddingStage(model, token_types) if index == 0 else None
                stage = LayerStage(model, index, embeddings).eval()
                graph = _export_stage(stage, stage_args, input_names, outputs, tuple(axes for _ in stage_args))
                stages.append((f"layer_{index}.onnx", graph))
                if not last:
                    with torch.no_grad():
                        stage_args = (stage(*stage_args)[0], attention_mask)
                    input_names = ["hidden_states", "attention_mask"]
        except Exception as error:  # the exporter's errors are long; name the family and the reason first
            reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
            raise ValueError(
                f"The {family} family does not export to ONNX with this torch ({torch.__version__}): {reason}"
            ) from error

        stages = [(name, _fuse(graph, padding_mask=family in EXPECTED_FUSIONS)) for name, graph in stages]
        fusions = {}
        for name, graph in stages:
            counts = _operator_counts(graph)
            fused = {op: count for op, count in counts.items() if op in FUSED_OPERATORS}
            fusions[name] = fused
            if check and (name.startswith("layer_") or name == FULL_MODEL) and family in EXPECTED_FUSIONS:
                layers = config.num_hidden_layers if name == FULL_MODEL else 1
                expected = EXPECTED_FUSIONS[family].items()
                missing = {op: count * layers for op, count in expected if fused.get(op, 0) < count * layers}
                if missing:
                    raise RuntimeError(
                        f"{name}: the ONNX Runtime fusions {sorted(missing)} were not applied (fused: {fused}); "
                        "this torch/onnxscript version changed the exported graph. Pass check=False to export "
                        "unfused stages anyway."
                    )
            path = work / name
            if int8:
                exclude = [] if quantize_students else _student_nodes(graph)
                float_path = work / f"{name}.float"
                _save(graph, float_path)
                _quantize(float_path, path, exclude)
                float_path.unlink()
            else:
                _save(graph, path)

        import onnxruntime
        import onnxscript

        manifest = {
            "format_version": FORMAT_VERSION,
            "config": config_signature(config),
            "model_safetensors_sha256": weights_fingerprint(output_dir),
            "token_type_ids": token_types,
            # The layer graphs' `uncertainty` output measures this; another config value is computed from the logits.
            "uncertainty_top_k": config.uncertainty_top_k,
            # `calibrate --backend onnx --save` writes the exit rule and speed chosen on these stages' outputs here.
            "calibration": None,
            "int8": int8,
            "quantize_students": quantize_students if int8 else None,
            "stages": [name for name, _ in stages if name != FULL_MODEL],  # stage_names(L)
            "full_model": FULL_MODEL,
            "fusions": fusions,
            "opset": OPSET,
            "exported_with": {
                "torch": torch.__version__,
                "onnxscript": onnxscript.__version__,
                "onnxruntime": onnxruntime.__version__,
            },
        }
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if final.exists():
            trash = output_dir / f".{ONNX_FOLDER}.old"
            shutil.rmtree(trash, ignore_errors=True)
            final.rename(trash)
            work.rename(final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            work.rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def stage_names(num_layers: int) -> list[str]:
    """The files an early exit runs, in order: each layer with its student (the first with the embeddings)."""
    return [f"layer_{index}.onnx" for index in range(num_layers)]


def early_exit_graph(layers: list):
    """
    The layer graphs (`onnx.ModelProto`s, in order, as exported) nested in one `onnx.ModelProto` that runs a sample
    alone to its exit under the entropy rule: after each layer but the last, an `If` on `uncertainty < speed` returns
    the student's logits, or runs the next layers in its else-branch. Inputs: the first layer's, and `speed` (a
    float32 scalar); outputs: `logits` (1, C) and `exit_layer` (1,), 1-based. One session run per sample instead of
    one per layer: no host work between two layers, and the session's one thread pool stays awake from one layer to
    the next. The layers are fused before they are nested, so each keeps its fusions. Batch 1 only: an `If` reads one
    condition.
    """
    import onnx
    from onnx import TensorProto, helper

    for index, layer in enumerate(layers):  # what the nesting below does not carry over
        if layer.functions or layer.graph.sparse_initializer:
            raise ValueError(f"Layer {index}'s graph has local functions or sparse initializers: it cannot be nested.")
    token_inputs = [value.name for value in layers[0].graph.input]  # the token ids and mask (and types)
    for index, layer in enumerate(layers[1:], start=1):
        if [value.name for value in layer.graph.input] != ["hidden_states", "attention_mask"]:
            raise ValueError(f"Layer {index}'s graph does not read (hidden_states, attention_mask).")

    def add_layer(graph, index):
        """Add layer `index`'s nodes and initializers to `graph`, names prefixed; its inputs read the outer values."""
        prefix = f"layer_{index}/"
        outer = {"attention_mask": "attention_mask"}
        if index:
            outer["hidden_states"] = f"layer_{index - 1}/next_hidden_states"
        else:
            outer.update({name: name for name in token_inputs})

        def rename(name):
            return name and outer.get(name, prefix + name)

        for number, node in enumerate(layers[index].graph.node):
            if any(
                attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                for attribute in node.attribute
            ):
                raise ValueError(
                    f"Layer {index}'s graph has subgraphs of its own ({node.op_type}): it cannot be nested."
                )
            copy = graph.node.add()
            copy.CopyFrom(node)
            copy.name = prefix + (node.name or str(number))
            copy.input[:] = [rename(name) for name in node.input]
            copy.output[:] = [rename(name) for name in node.output]
        for initializer in layers[index].graph.initializer:
            copy = graph.initializer.add()
            copy.CopyFrom(initializer)
            copy.name = rename(initializer.name)
        return prefix

    def add_outputs(graph, logits, layer, names):
        graph.node.extend(
            [
                helper.make_node("Identity", [logits], [names[0]]),
                helper.make_node("Identity", [layer], [names[1]]),
            ]
        )
        graph.output.extend(
            [
                helper.make_value_info(names[0], layers[-1].graph.output[0].type),  # the teacher's logits, (B, C)
                helper.make_tensor_value_info(names[1], TensorProto.INT64, [1]),
            ]
        )

    def add_from_layer(graph, index):
        """Add layer `index`, then the next ones unless its student lets the sample leave: (logits, exit layer)."""
        prefix = add_layer(graph, index)
        own = f"exit_{index}/"  # the names this function adds, apart from the layer's own
        exit_layer = helper.make_tensor(own + "exit_layer", TensorProto.INT64, [1], [index + 1])
        if index == len(layers) - 1:  # the teacher
            graph.node.append(helper.make_node("Constant", [], [own + "exit_layer"], value=exit_layer))
            return prefix + "logits", own + "exit_layer"
        graph.node.append(helper.make_node("Less", [prefix + "uncertainty", "speed"], [own + "leaves"]))
        # The branches are built in place: a graph attribute made apart would be copied, weights and all, per level.
        exit_node = graph.node.add(op_type="If", name=own + "if", input=[own + "leaves"])
        exit_node.output.extend([own + "logits", own + "layer"])
        leave = exit_node.attribute.add(name="then_branch", type=onnx.AttributeProto.GRAPH).g
        leave.name = own + "leave"
        leave.node.append(helper.make_node("Constant", [], [own + "exit_layer"], value=exit_layer))
        add_outputs(leave, prefix + "logits", own + "exit_layer", [own + "leave_logits", own + "leave_layer"])
        stay = exit_node.attribute.add(name="else_branch", type=onnx.AttributeProto.GRAPH).g
        stay.name = own + "stay"
        logits, layer = add_from_layer(stay, index + 1)
        add_outputs(stay, logits, layer, [own + "stay_logits", own + "stay_layer"])
        return own + "logits", own + "layer"

    model = onnx.ModelProto(ir_version=max(layer.ir_version for layer in layers))
    opsets = {}
    for layer in layers:
        for opset in layer.opset_import:
            opsets[opset.domain] = max(opsets.get(opset.domain, 0), opset.version)
    model.opset_import.extend(helper.make_opsetid(domain, version) for domain, version in opsets.items())
    graph = model.graph
    graph.name = "fastbert_early_exit"
    graph.input.extend(layers[0].graph.input)
    graph.input.append(helper.make_tensor_value_info("speed", TensorProto.FLOAT, []))
    logits, exit_layer = add_from_layer(graph, 0)
    add_outputs(graph, logits, exit_layer, ["logits", "exit_layer"])
    return model


def copy_onnx_stages(source, target, config) -> None:
    """
    Copy the `onnx/` stages of the model folder `source` into `target`, where the same model was just saved (a push):
    checked first against `source`'s config and weights, then tied to the weights file in `target` (the same tensors,
    not necessarily the same bytes).
    """
    from .modeling_ort import check_onnx_folder

    source, target = Path(source), Path(target)
    check_onnx_folder(source, config)
    shutil.copytree(source / ONNX_FOLDER, target / ONNX_FOLDER, ignore=shutil.ignore_patterns(".*"))
    manifest_path = target / ONNX_FOLDER / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["model_safetensors_sha256"] = weights_fingerprint(target)
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")


# ONNX Runtime's own (com.microsoft) operators the rewriter fuses into, counted per stage in the manifest.
FUSED_OPERATORS = (
    "Attention",
    "MultiHeadAttention",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "BiasGelu",
    "FastGelu",
    "Gelu",
    "EmbedLayerNormalization",
    "RotaryEmbedding",
    "QAttention",
    "DynamicQuantizeMatMul",
    "MatMulInteger",
)


__all__ = [
    "EARLY_EXIT",
    "EXPECTED_FUSIONS",
    "MANIFEST",
    "FULL_MODEL",
    "ONNX_FOLDER",
    "copy_onnx_stages",
    "early_exit_graph",
    "export_onnx",
    "require_onnx",
    "stage_names",
    "weights_fingerprint",
]

"""`hf-fastbert export`: the model as ONNX Runtime stages in its folder's `onnx/`."""

import logging
import time
from pathlib import Path

from ..configuration_fastbert import is_fastbert_model_type
from ..constants import (
    PROG,
)
from ..loading import load_fastbert_weights, load_model_config
from .common import (
    _HelpFormatter,
)


logger = logging.getLogger(__name__)


def register(commands):
    """Add the `export` command to `commands` (the subcommands of `hf-fastbert`)."""
    export = commands.add_parser(
        "export",
        help="Write the model as ONNX Runtime stages (onnx/ in its folder), fp32 or int8, for --backend onnx.",
        description="Exports one graph per layer (the layer, its student, the student's logits and its "
        "uncertainty; the first also computes the embeddings) and the whole model in one graph (what speed 0 runs) "
        "with torch.onnx's dynamo exporter, fuses them for ONNX Runtime (Attention, SkipLayerNormalization, Gelu) "
        "and, with --int8, quantizes each stage dynamically. Written to "
        "<output-dir>/onnx/, replacing an existing export only once complete. Then `predict`, `evaluate`, `sweep`, "
        "`calibrate` and `serve` take --backend onnx; `calibrate --backend onnx --save` picks the exit rule and "
        "speed on the runtime's own outputs. Needs pip install 'hf-fastbert[onnx]'.",
        formatter_class=_HelpFormatter,
    )
    export.add_argument("model", help="A local FastBERT model folder (or a Hub repo id, with --output-dir).")
    export.add_argument("--output-dir", help="The model folder to write onnx/ into (default: the model's folder).")
    export.add_argument("--int8", action="store_true", help="Dynamic int8 quantization of every stage.")
    export.add_argument(
        "--quantize-students",
        action="store_true",
        help="With --int8, quantize the students' matrices too (by default they stay float: measured slower in "
        "int8, one vector per sample).",
    )
    export.set_defaults(run=run_export)


def run_export(args):
    from ..onnx_export import export_onnx, require_onnx

    require_onnx()  # before anything loads
    if args.quantize_students and not args.int8:
        raise ValueError("--quantize-students goes with --int8")
    source, config = load_model_config(args.model)
    if not is_fastbert_model_type(config.model_type):
        raise ValueError(f"{args.model} is a {config.model_type!r} model, not FastBERT")
    local = Path(args.model).expanduser().is_dir()
    if args.output_dir is None and not local:
        raise ValueError(f"{args.model} is not a local folder: give --output-dir for the exported model")
    output_dir = Path(args.output_dir or args.model).expanduser()
    in_place = local and output_dir.resolve() == Path(args.model).expanduser().resolve()
    model = load_fastbert_weights(source, args.model, config).eval()  # a clear error for weights that do not fit
    started = time.perf_counter()
    # In place, the folder's own weights are what the stages are tied to; elsewhere the model is saved there first.
    folder = export_onnx(
        output_dir if in_place else model, output_dir, int8=args.int8, quantize_students=args.quantize_students
    )
    if not in_place:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(source).save_pretrained(output_dir)
    seconds = time.perf_counter() - started
    print(
        f"exported {config.num_hidden_layers} {'int8' if args.int8 else 'float32'} ONNX stages to {folder} in "
        f"{seconds:.0f} s; run it with `{PROG} predict {output_dir} TEXT --backend onnx`"
    )

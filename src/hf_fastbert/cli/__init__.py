"""
The `hf-fastbert` command line (also `python -m hf_fastbert`): one module per command, each with `register` (its
options) and a `run_<command>` function; `common` holds what they share.

    hf-fastbert train       fine-tune a BERT checkpoint, then self-distill its exits (no arguments: the offline demo)
    hf-fastbert train-embedding   self-distill per-layer heads of a sentence embedding model, for early exit
    hf-fastbert evaluate    accuracy, mean exit layer, FLOPs speed-up and measured wall-time speed-up per speed
    hf-fastbert sweep       a grid of speeds -> table, CSV/JSON, accuracy-vs-speed-up plot and the LUHA view
    hf-fastbert calibrate   the largest speed within an accuracy drop, or the smallest reaching a FLOPs speed-up
    hf-fastbert export      the model as ONNX Runtime stages (fp32 or int8), for `--backend onnx`
    hf-fastbert predict     label, score and exit layer for texts from arguments, a file or stdin
    hf-fastbert serve       an HTTP server (TEI's /predict API) with dynamic batching and load-adaptive speed
    hf-fastbert push        upload a FastBERT model, its tokenizer and its model card to the Hub

Every command prints a one-line error and exits with a non-zero code on bad input (2 for bad arguments, 1 for bad
files, columns, models or data), checked before any long work; `--debug` shows the traceback instead. Nothing is lost
or half-written: `train` replaces its output folder only when the new model is complete, refuses a non-empty folder
that is not a previous run's (unless --overwrite-output-dir), and `sweep` never replaces another sweep's results.
"""

import argparse
import logging
import sys

from ..constants import PROG
from . import calibrate, evaluate, export, predict, push, serve, sweep, train, train_embedding
from .common import CommandParser, _HelpFormatter
from .predict import read_texts
from .push import card_results
from .train import DEMO_TRAINING, USER_TRAINING, resolve_train_defaults


# In the order of `hf-fastbert --help`.
COMMAND_MODULES = (train, train_embedding, evaluate, sweep, calibrate, export, predict, push, serve)


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
    # A command can declare its options as dataclasses (`train`: FastBertTrainingConfig), as HfArgumentParser does.
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=CommandParser)
    for module in COMMAND_MODULES:
        module.register(commands)
    return parser


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
    parse = getattr(args, "parse", None)  # a command whose options are dataclasses checks them here
    if parse is not None:
        try:
            args.config = parse(args)
        except ValueError as error:  # a bad value: a usage error
            print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
            return 2
        except (ImportError, OSError) as error:  # the demo's model package missing, say
            if args.debug:
                raise
            print(f"{PROG} {args.command}: error: {' '.join(str(error).split())}", file=sys.stderr)
            return 1
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    command = args.run
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
    finally:
        _end_process_group()


def _end_process_group() -> None:
    """
    Destroy the process group a command ran under (torchrun/accelerate launch), before the interpreter exits: gloo's
    worker threads still alive during interpreter shutdown abort the process (SIGABRT), and torchrun then fails the
    whole run.
    """
    distributed = sys.modules.get("torch.distributed")  # not imported: no process group (and no torch import here)
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


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


__all__ = [
    "DEMO_TRAINING",
    "USER_TRAINING",
    "build_parser",
    "card_results",
    "main",
    "read_texts",
    "resolve_train_defaults",
]

"""`hf-fastbert predict`: label, score and exit layer for texts from arguments, a file or stdin."""

import json
import logging
import os
import sys
from pathlib import Path

from ..backbones import max_input_length
from ..files import check_writable_folder
from ..loading import load_fastbert
from .common import (
    _add_backend_argument,
    _add_int8_argument,
    _add_model_argument,
    _HelpFormatter,
    _positive_int,
    _speed,
    input_file,
)


logger = logging.getLogger(__name__)


def register(commands):
    """Add the `predict` command to `commands` (the subcommands of `hf-fastbert`)."""
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
    predict.set_defaults(run=run_predict)


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
    from ..prediction import split_lines

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
    from ..data import check_max_length
    from ..prediction import classify_encodings, results_from_logits, tokenize

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
    from ..prediction import TABLE_SUFFIXES

    return path is not None and Path(path).suffix.lower() in TABLE_SUFFIXES


def run_predict_file(args):
    """`predict --file ... [--output ...]`: streaming, and split across processes under torchrun/accelerate."""
    from ..prediction import OUTPUT_SUFFIXES, InputSpec, predict_file

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
    if args.output is not None and int(os.environ.get("RANK", "0")) == 0:
        print(f"{count} predictions written to {args.output}", file=sys.stderr)

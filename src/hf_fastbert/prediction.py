"""Batched early-exit classification of tokenized inputs, and streaming prediction over large files.

`classify_encodings` is the engine the HTTP server and `hf-fastbert predict --file` share: unpadded encodings in,
one `(logits, exit_layer)` per input out, batches padded exactly like `tokenizer(..., padding=True)`.
`predict_file` streams a .txt/.csv/.tsv/.jsonl/.parquet file through it in chunks (bounded memory), and under
`torchrun`/`accelerate launch` splits every chunk across the processes with Accelerate and writes one merged output
in input order.
"""

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .backbones import max_input_length, takes_token_type_ids


logger = logging.getLogger(__name__)

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
OUTPUT_SUFFIXES = (".jsonl", ".parquet", ".csv")
MODEL_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def collate(encodings: Sequence[dict], pad_token_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """
    Pad unpadded encodings into a batch, as `tokenizer(..., padding=True, return_tensors="pt")` would.

    Args:
        encodings (`Sequence[dict]`):
            One dict per input with `input_ids` and optionally `attention_mask` and `token_type_ids` (lists of ints).
        pad_token_id (`int`): The id `input_ids` are padded with (the mask and token types are padded with 0).
        padding_side (`str`, *optional*, defaults to `"right"`): `"right"` or `"left"`, the tokenizer's.

    Returns:
        `dict[str, torch.Tensor]` of `(B, T)` int64 tensors, `attention_mask` always included.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}.")
    length = max(len(encoding["input_ids"]) for encoding in encodings)
    batch = {}
    for key in MODEL_INPUT_NAMES:
        if key not in encodings[0] and key != "attention_mask":
            continue
        value = pad_token_id if key == "input_ids" else 0
        rows = []
        for encoding in encodings:
            row = list(encoding[key]) if key in encoding else [1] * len(encoding["input_ids"])
            padding = [value] * (length - len(row))
            rows.append(row + padding if padding_side == "right" else padding + row)
        batch[key] = torch.tensor(rows, dtype=torch.long)  # (B, T)
    return batch


@torch.inference_mode()
def classify_batch(model, encodings: Sequence[dict], speed: float | None, pad_token_id: int, padding_side="right"):
    """
    One forward pass of the early-exit engine over `encodings` at `speed` (`None`: the model's `config.speed`).

    Returns:
        `(logits, exit_layers)`: a `(B, C)` float32 CPU tensor and a `(B,)` int64 CPU tensor; for a sentence
        embedding model ([`FastBertForSentenceEmbedding`]), its `(B, D)` embeddings instead of logits.
    """
    device = model.device
    batch = collate(encodings, pad_token_id, padding_side)
    if "token_type_ids" in batch and not takes_token_type_ids(model.config):  # a BERT tokenizer on DistilBERT
        del batch["token_type_ids"]
    output = model(**{key: value.to(device) for key, value in batch.items()}, speed=speed)
    values = output.get("logits", output.get("embeddings"))
    return values.float().cpu(), output.exit_layers.long().cpu()


def classify_encodings(
    model,
    encodings: Sequence[dict],
    speed: float | None = None,
    *,
    batch_size: int = 32,
    pad_token_id: int = 0,
    padding_side: str = "right",
    sort_by_length: bool = True,
):
    """
    Classify tokenized inputs in batches with early exit; results in input order.

    Args:
        model: A FastBERT model in eval mode (`model(**inputs, speed=...)` returning `logits` and `exit_layers`).
        encodings (`Sequence[dict]`): Unpadded encodings, one per input (see [`collate`]).
        speed (`float`, *optional*): Early-exit threshold; defaults to the model's `config.speed`.
        batch_size (`int`, *optional*, defaults to 32): Inputs per forward pass.
        pad_token_id (`int`, *optional*, defaults to 0): The tokenizer's padding id.
        padding_side (`str`, *optional*, defaults to `"right"`): The tokenizer's padding side.
        sort_by_length (`bool`, *optional*, defaults to `True`):
            Batch inputs of similar length together (less padding). The results do not depend on it: a sample's
            prediction is the same in any batch (up to float rounding).

    Returns:
        `(logits, exit_layers)`: `(N, C)` float32 and `(N,)` int64 CPU tensors.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    count = len(encodings)
    num_labels = model.config.num_labels
    logits, exit_layers = torch.empty(count, num_labels), torch.empty(count, dtype=torch.long)
    order = list(range(count))
    if sort_by_length:
        order.sort(key=lambda index: len(encodings[index]["input_ids"]))
    for start in range(0, count, batch_size):
        indices = order[start : start + batch_size]
        batch_logits, batch_exits = classify_batch(
            model, [encodings[index] for index in indices], speed, pad_token_id, padding_side
        )
        logits[indices], exit_layers[indices] = batch_logits, batch_exits
    return logits, exit_layers


def tokenize(tokenizer, texts: Sequence[str], text_pairs: Sequence[str | None] | None = None, **kwargs) -> list[dict]:
    """
    Unpadded encodings (dicts of int lists, the model's inputs only) for texts and optional pairs; inputs whose pair
    is `None` are single texts. `kwargs` go to the tokenizer (`truncation`, `max_length`).
    """
    encodings: list[dict | None] = [None] * len(texts)
    pairs = list(text_pairs) if text_pairs is not None else [None] * len(texts)
    for is_pair in (False, True):
        indices = [index for index, pair in enumerate(pairs) if (pair is not None) == is_pair]
        if not indices:
            continue
        firsts = [texts[index] for index in indices]
        seconds = [pairs[index] for index in indices] if is_pair else None
        encoded = tokenizer(firsts, seconds, **kwargs)
        keys = [key for key in MODEL_INPUT_NAMES if key in encoded]
        for position, index in enumerate(indices):
            encodings[index] = {key: encoded[key][position] for key in keys}
    return encodings


def results_from_logits(logits: torch.Tensor, exit_layers: torch.Tensor, id2label) -> list[dict]:
    """`label`, `score` (the exiting classifier's probability of that label) and `exit_layer` per input."""
    scores, indices = logits.softmax(dim=-1).max(dim=-1)  # (N,), (N,)
    return [
        {"label": id2label[index], "score": score, "exit_layer": layer}
        for score, index, layer in zip(scores.tolist(), indices.tolist(), exit_layers.tolist(), strict=True)
    ]


# ----------------------------------------------------------------------------------------------------
# Streaming files
# ----------------------------------------------------------------------------------------------------


@dataclass
class InputSpec:
    """
    Where the texts of an input file are.

    Args:
        text_column (`str`, *optional*, defaults to `"text"`): Column of a table file holding the text.
        text_pair_column (`str`, *optional*): Column holding the second text of sentence pairs.
        pair_separator (`str`, *optional*): For a .txt file (one input per line): split each line at this string
            into a pair.
    """

    text_column: str = "text"
    text_pair_column: str | None = None
    pair_separator: str | None = None


def _split_pair(line: str, separator: str | None, where: str):
    if separator is None:
        return line, None
    parts = line.split(separator, 1)
    if len(parts) != 2:
        raise ValueError(f"{where}: every input must hold the pair separator {separator!r}: {line[:80]!r}")
    return parts[0], parts[1]


def split_lines(text: str) -> list[str]:
    """
    One input per `\\n`-terminated line (a trailing `\\r` of Windows line ends dropped), and nothing else: form
    feeds, lone carriage returns, U+0085 and U+2028 stay inside their line, as in every other line-based tool.
    """
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def check_text(value, where: str) -> str:
    """`value` if it is text the tokenizer can take; a `ValueError` naming `where` (file and line or row) if not."""
    if not isinstance(value, str):
        raise ValueError(f"{where}: the input is not text: {value!r:.80}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"{where}: the input is not valid Unicode text ({error.reason} at character {error.start})"
        ) from None
    return value


def _text_rows(path: Path, spec: InputSpec):
    """(where, text, pair) of every non-empty line of a text file; lines split on b"\\n" only, decoded one by one."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark is not text
                raw = raw[3:]
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{where} is not UTF-8 text (byte {raw[error.start]:#04x})") from None
            (line,) = split_lines(line.removesuffix("\n"))
            if line.strip():
                yield (where, *_split_pair(line, spec.pair_separator, where))


def _csv_rows(path: Path, columns: list[str]):
    import csv

    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        try:
            header = next(reader, None)
            if header is None:
                return
            missing = [column for column in columns if column not in header]
            if missing:
                raise ValueError(f"{path} has no column {missing[0]!r} (it has {header})")
            indices = [header.index(column) for column in columns]
            for row in reader:
                if not row:
                    continue
                where = f"{path}:{reader.line_num}"
                if len(row) != len(header):  # pandas would shift such a row silently
                    raise ValueError(
                        f"{where} has {len(row)} fields and the header {len(header)}: quote fields that hold the "
                        "separator"
                    )
                yield (where, *(row[index] for index in indices))
        except csv.Error as error:
            raise ValueError(f"{path}:{reader.line_num} is not valid CSV ({error})") from None
        except UnicodeDecodeError as error:
            raise ValueError(f"{path} is not UTF-8 text ({error.reason})") from None


def _jsonl_rows(path: Path, columns: list[str]):
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{where} is not UTF-8 text (byte {raw[error.start]:#04x})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as error:
                reason = getattr(error, "msg", "nested too deeply")
                raise ValueError(f"{where} is not a JSON object per line ({reason})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where} is not a JSON object per line")
            for column in columns:
                if column not in record:
                    raise ValueError(f"{where} has no column {column!r} (it has {sorted(record)})")
            yield (where, *(record[column] for column in columns))


def _parquet_rows(path: Path, columns: list[str]):
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    missing = [column for column in columns if column not in parquet.schema_arrow.names]
    if missing:
        raise ValueError(f"{path} has no column {missing[0]!r} (it has {parquet.schema_arrow.names})")
    number = 0
    for batch in parquet.iter_batches(batch_size=1024, columns=columns):
        for values in zip(*(batch.column(column).to_pylist() for column in columns), strict=True):
            number += 1
            yield (f"{path}, row {number}", *values)


def read_inputs(path, spec: InputSpec | None = None, chunk_size: int = 1024) -> Iterator[list[tuple[str, str | None]]]:
    """
    Stream `(text, text_pair)` inputs from a file, `chunk_size` at a time (`text_pair` is `None` for single texts).

    .txt (or any other suffix): one input per `\\n` line ([`split_lines`]), empty lines skipped. .csv/.tsv (every row
    with the header's number of fields), .jsonl/.json (one JSON object per line) and .parquet: the `spec.text_column`
    (and `spec.text_pair_column`) of every row. Read row by row, so memory stays bounded whatever the file's size. A
    value that is not text the tokenizer can take (a number, a lone surrogate) is a `ValueError` naming its line or
    row.
    """
    spec = spec or InputSpec()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    suffix = path.suffix.lower()
    columns = [spec.text_column] + ([spec.text_pair_column] if spec.text_pair_column else [])
    if suffix not in TABLE_SUFFIXES:
        rows = _text_rows(path, spec)
    elif suffix in (".csv", ".tsv"):
        rows = _csv_rows(path, columns)
    elif suffix == ".parquet":
        rows = _parquet_rows(path, columns)
    else:
        rows = _jsonl_rows(path, columns)
    chunk = []
    for where, text, *pair in rows:
        pair = pair[0] if pair else None
        chunk.append((check_text(text, where), None if pair is None else check_text(pair, where)))
        if len(chunk) == chunk_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def count_inputs(path, spec: InputSpec | None = None) -> int:
    """
    The number of inputs in a file, every one read and checked as [`read_inputs`] reads it: a bad row fails here,
    before any model runs and before an output file is opened.
    """
    return sum(len(chunk) for chunk in read_inputs(path, spec))


class PredictionWriter:
    """
    Writes result rows to a .jsonl, .parquet or .csv file as they come, into `PATH.partial`, renamed to `PATH` by
    `close()`; a failed job removes it (no complete-looking file, no partial one). Use as a context manager.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.suffix = self.path.suffix.lower()
        if self.suffix not in OUTPUT_SUFFIXES:
            raise ValueError(f"cannot write predictions to {path}: use a {', '.join(OUTPUT_SUFFIXES)} file name")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self._handle = None
        self._writer = None
        self.rows_written = 0

    def write(self, rows: list[dict]):
        if not rows:
            return
        if self.suffix == ".jsonl":
            if self._handle is None:
                self._handle = self.partial.open("w", encoding="utf-8")
            self._handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        elif self.suffix == ".csv":
            import csv

            if self._handle is None:
                self._handle = self.partial.open("w", encoding="utf-8", newline="")
                self._writer = csv.DictWriter(self._handle, fieldnames=list(rows[0]))
                self._writer.writeheader()
            self._writer.writerows(rows)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pylist(rows)
            if self._writer is None:
                self._writer = pq.ParquetWriter(self.partial, table.schema)
            self._writer.write_table(table.cast(self._writer.schema))
        self.rows_written += len(rows)

    def close(self, *, complete: bool = True):
        if self.suffix == ".parquet" and self._writer is not None:
            self._writer.close()
        if self._handle is not None:
            self._handle.close()
        if not complete:  # a failed job leaves nothing behind: not a complete-looking file, not a partial one
            self.partial.unlink(missing_ok=True)
            return
        if self.rows_written == 0:  # no input: an empty but valid file
            if self.suffix == ".parquet":
                _write_empty_parquet(self.partial)
            else:
                self.partial.write_text("")
        os.replace(self.partial, self.path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback):
        self.close(complete=exc_type is None)


def _write_empty_parquet(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("label", pa.string()), ("score", pa.float64()), ("exit_layer", pa.int64())])
    pq.write_table(schema.empty_table(), path)


def _distributed_state():
    """Accelerate's process state: several processes under torchrun/accelerate launch, CPU-only ones included."""
    from accelerate import PartialState

    # Without an accelerator, Accelerate treats torchrun's processes as independent single-process jobs unless told
    # to use the CPU: each would then predict the whole file.
    accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return PartialState(cpu=not accelerator)


def predict_file(
    model,
    tokenizer,
    input_path,
    output_path=None,
    *,
    spec: InputSpec | None = None,
    speed: float | None = None,
    batch_size: int = 32,
    chunk_size: int = 1024,
    max_length: int | None = None,
    progress: bool = True,
    emit=None,
) -> int:
    """
    Classify every input of a file with early exit, streaming: bounded memory whatever the file's size.

    Run it in one process, or unchanged under `torchrun --nproc_per_node N` / `accelerate launch --multi_gpu
    --num_processes N` (on CPU-only machines too, with gloo): every process
    reads the same chunk of `chunk_size * num_processes` inputs, Accelerate's `split_between_processes` gives each its
    contiguous share, and the main process gathers the results and writes them, so the output is one file in input
    order whatever the number of processes.

    Args:
        model: A FastBERT model (moved to the process's device and put in eval mode).
        tokenizer: Its tokenizer.
        input_path (`str` or `Path`): .txt (one input per line), .csv/.tsv, .jsonl/.json (one object per line) or
            .parquet; see [`read_inputs`].
        output_path (`str` or `Path`, *optional*): .jsonl, .parquet or .csv; rows `label`, `score`, `exit_layer`,
            `text` (and `text_pair`). Without it, rows go to `emit`.
        spec ([`InputSpec`], *optional*): Columns or pair separator.
        speed (`float`, *optional*): Early-exit threshold; defaults to the model's `config.speed`.
        batch_size (`int`, *optional*, defaults to 32): Inputs per forward pass (inputs of similar length are batched
            together within a chunk).
        chunk_size (`int`, *optional*, defaults to 1024): Inputs each process holds at a time.
        max_length (`int`, *optional*): Truncate inputs to this many tokens; defaults to the model's limit.
        progress (`bool`, *optional*, defaults to `True`): A progress bar on stderr (main process).
        emit (`Callable[[list[dict]], None]`, *optional*): Receives the rows, in order, when there is no
            `output_path` (main process only).

    Returns:
        `int`: the number of inputs classified (all processes together).
    """
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    spec = spec or InputSpec()
    state = _distributed_state()
    model = model.to(state.device).eval()
    if max_length is None:
        max_length = min(tokenizer.model_max_length, max_input_length(model.config))
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total = count_inputs(input_path, spec)  # every input checked before the first forward pass
    writer = PredictionWriter(output_path) if output_path is not None and state.is_main_process else None
    bar = tqdm(total=total, desc="Predicting", unit=" inputs", disable=not (progress and state.is_main_process))
    done = 0
    try:
        for chunk in read_inputs(input_path, spec, chunk_size * state.num_processes):
            with state.split_between_processes(chunk) as mine:
                rows = []
                if mine:
                    texts, pairs = [text for text, _ in mine], [pair for _, pair in mine]
                    encodings = tokenize(tokenizer, texts, pairs, truncation=True, max_length=max_length)
                    logits, exit_layers = classify_encodings(
                        model,
                        encodings,
                        speed,
                        batch_size=batch_size,
                        pad_token_id=pad_token_id,
                        padding_side=tokenizer.padding_side,
                    )
                    rows = results_from_logits(logits, exit_layers, model.config.id2label)
                    for row, (text, pair) in zip(rows, mine, strict=True):
                        row["text"] = text
                        if spec.text_pair_column or spec.pair_separator:
                            row["text_pair"] = pair
            if state.num_processes > 1:
                rows = gather_object(rows)  # rank order = input order
            done += len(chunk)
            bar.update(len(chunk))
            if writer is not None:
                writer.write(rows)
            elif emit is not None and state.is_main_process:
                emit(rows)
    except BaseException:
        if writer is not None:
            writer.close(complete=False)
        raise
    finally:
        bar.close()
    if writer is not None:
        writer.close()
    state.wait_for_everyone()
    return done


__all__ = [
    "InputSpec",
    "PredictionWriter",
    "classify_batch",
    "classify_encodings",
    "collate",
    "count_inputs",
    "predict_file",
    "read_inputs",
    "results_from_logits",
    "tokenize",
]

"""Text-classification data for FastBERT training: loading, validation, label mapping and tokenization.

Every check runs before any tokenization or training, and raises a `ValueError` naming the problem.
"""

import contextlib
import json
import logging
import os
from collections.abc import Sequence

import datasets
from datasets import ClassLabel, Dataset, DatasetDict
from datasets.exceptions import DatasetGenerationError


logger = logging.getLogger(__name__)

FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _as_list(files) -> list[str]:
    return [files] if isinstance(files, (str, os.PathLike)) else [str(f) for f in files]


def file_builder(files: str | Sequence[str]) -> str:
    """The `datasets` builder (`"csv"`, `"json"` or `"parquet"`) for local files, from their extension."""
    files = _as_list(files)
    if not files:
        raise ValueError("No data file given.")
    builders = set()
    for path in files:
        extension = os.path.splitext(str(path))[1].lower()
        if extension not in FILE_BUILDERS:
            raise ValueError(f"Unsupported data file {path!r}: expected one of {sorted(FILE_BUILDERS)}.")
        if not os.path.isfile(path):
            raise ValueError(f"Data file not found: {path!r}.")
        builders.add(FILE_BUILDERS[extension])
    if len(builders) > 1:
        raise ValueError(f"All data files must have the same format, got {sorted(builders)}: {files}.")
    return builders.pop()


def read_texts_file(path, text_column: str = "text") -> list[str]:
    """
    The texts of a local file: a `.txt` file holds one text per line (blank lines skipped); a `.csv`/`.tsv`,
    `.json`/`.jsonl` or `.parquet` file holds them in `text_column`. A `ValueError` naming the file and the problem.
    """
    if str(path).lower().endswith(".txt"):
        if not os.path.isfile(path):
            raise ValueError(f"Data file not found: {str(path)!r}.")
        try:
            lines = open(path, encoding="utf-8").read().splitlines()
        except UnicodeDecodeError as error:
            raise ValueError(f"Cannot read {path}: not UTF-8 text ({error.reason} at byte {error.start}).") from None
        texts = [line.strip() for line in lines if line.strip()]
    else:
        dataset = load_raw_datasets(data_files={"data": str(path)})["data"]
        check_columns(dataset, [text_column], split=str(path))
        texts = [text for text in dataset[text_column] if isinstance(text, str) and text.strip()]
    if not texts:
        raise ValueError(f"{path} holds no text.")
    return texts


def load_raw_datasets(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    data_files: dict[str, str | Sequence[str]] | None = None,
    cache_dir: str | None = None,
) -> DatasetDict:
    """
    Load a dataset from the Hub (or a local dataset folder) by name, or from local csv/json/parquet files.

    Args:
        dataset_name (`str`, *optional*):
            A name for `datasets.load_dataset`, e.g. `"rotten_tomatoes"`.
        dataset_config_name (`str`, *optional*):
            The dataset configuration, e.g. `"sst2"` for `"glue"`.
        data_files (`dict[str, str | list[str]]`, *optional*):
            Local files per split, e.g. `{"train": "train.csv", "validation": ["dev.csv"]}`. All files share one
            format, chosen from the extension (`.csv`/`.tsv`, `.json`/`.jsonl`, `.parquet`).
        cache_dir (`str`, *optional*):
            The `datasets` cache directory.

    Returns:
        `datasets.DatasetDict`.
    """
    if (dataset_name is None) == (not data_files):
        raise ValueError("Give exactly one of a dataset name and local data files.")
    if dataset_name is not None:
        return datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
    data_files = {split: _as_list(files) for split, files in data_files.items() if files}
    paths = [path for files in data_files.values() for path in files]
    builder = file_builder(paths)
    kwargs = {}
    if builder == "csv" and all(path.lower().endswith(".tsv") for path in paths):
        kwargs["delimiter"] = "\t"

    def load(files):
        with _datasets_errors_not_logged():
            return datasets.load_dataset(builder, data_files=files, cache_dir=cache_dir, **kwargs)

    try:
        return load(data_files)
    except (DatasetGenerationError, ValueError) as error:  # a malformed file (ArrowInvalid, UnicodeDecodeError...)
        bad_path, cause = None, error.__cause__ or error
        for path in paths if len(paths) > 1 else []:  # which file?
            try:
                load({"data": path})
            except (DatasetGenerationError, ValueError) as file_error:
                bad_path, cause = path, file_error.__cause__ or file_error
                break
        if len(paths) == 1:
            bad_path = paths[0]
        if bad_path is None:
            raise ValueError(f"Cannot read the data files {paths} together: {_first_line(cause)}") from error
        raise ValueError(f"Cannot read {bad_path}: {_read_problem(bad_path, cause)}") from error


@contextlib.contextmanager
def _datasets_errors_not_logged():
    """`datasets` logs a malformed file's error before raising it: the raised error says it (once, with the file)."""
    datasets_logger = logging.getLogger("datasets")
    level = datasets_logger.level
    datasets_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        datasets_logger.setLevel(level)


def _first_line(error) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _json_error(text: str) -> json.JSONDecodeError | None:
    try:
        json.loads(text)
    except json.JSONDecodeError as error:
        return error
    return None


def _json_problem(path: str) -> str | None:
    """The first JSON syntax error of a .json/.jsonl file (a line of JSON Lines, or a position), if any."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError):
        return None
    document_error = _json_error(text)
    if document_error is None:
        return None
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    if _json_error(first) is None:  # JSON Lines: the first line that is not JSON
        for number, line in enumerate(lines, start=1):
            line_error = _json_error(line) if line.strip() else None
            if line_error is not None:
                return f"line {number} is not valid JSON ({line_error.msg}, column {line_error.colno})"
    return f"it is not valid JSON ({document_error.msg}, line {document_error.lineno})"


def _read_problem(path: str, cause: BaseException) -> str:
    """What is wrong with a data file that `datasets` could not read, in words."""
    if isinstance(cause, UnicodeDecodeError):
        with contextlib.suppress(OSError):
            with open(path, "rb") as file:
                data = file.read()
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as error:
                line = data.count(b"\n", 0, error.start) + 1
                return f"it is not UTF-8 text (byte {data[error.start]:#04x} on line {line})"
        return f"it is not UTF-8 text ({cause.reason})"
    if path.lower().endswith((".json", ".jsonl")):
        problem = _json_problem(path)
        if problem is not None:
            return problem
    return _first_line(cause)


def check_columns(dataset: Dataset, columns: Sequence[str | None], split: str = "train"):
    """Raise a `ValueError` if `dataset` is empty or lacks one of `columns` (`None` entries are skipped)."""
    if len(dataset) == 0:
        raise ValueError(f"The {split} dataset is empty.")
    for column in columns:
        if column is not None and column not in dataset.column_names:
            raise ValueError(f"The {split} dataset has no column {column!r}; its columns are {dataset.column_names}.")


def label_names_from(dataset: Dataset, label_column: str = "label") -> list[str]:
    """
    The label names, in class-index order.

    A `ClassLabel` column gives its names. Otherwise the distinct values: integers sorted numerically, anything else
    sorted as strings; the names are the values as strings.
    """
    check_columns(dataset, [label_column])
    feature = dataset.features[label_column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    values = set(dataset.unique(label_column))
    if None in values:
        raise ValueError(f"The label column {label_column!r} has missing values.")
    if all(isinstance(value, int) and not isinstance(value, bool) for value in values):
        return [str(value) for value in sorted(values)]
    return sorted(str(value) for value in values)


def _label_ids(dataset: Dataset, label_column: str, label_names: Sequence[str], split: str) -> list[int]:
    """Map a label column to class indices, raising on values outside `label_names`."""
    values = dataset[label_column]
    feature = dataset.features[label_column]
    if isinstance(feature, ClassLabel):
        bad = sorted({v for v in values if v is None or not 0 <= v < feature.num_classes}, key=str)
        if bad:
            raise ValueError(
                f"The {split} dataset has labels {bad[:10]} outside the label set {feature.names} "
                "(unlabeled rows, e.g. -1, belong in an unlabeled file used for distillation only)."
            )
        values = [feature.names[v] for v in values]
    label2id = {name: i for i, name in enumerate(label_names)}
    unknown = sorted({str(v) for v in values if v is None or str(v) not in label2id})
    if unknown:
        raise ValueError(f"The {split} dataset has labels {unknown[:10]} outside the label set {list(label_names)}.")
    return [label2id[str(v)] for v in values]


def prepare_dataset(
    dataset: Dataset,
    tokenizer,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str | None = "label",
    label_names: Sequence[str] | None = None,
    max_length: int = 128,
    split: str = "train",
    token_type_ids: bool = True,
) -> Dataset:
    """
    Validate and tokenize a text-classification split.

    Args:
        dataset (`datasets.Dataset`):
            The raw split.
        tokenizer:
            A (fast) tokenizer.
        text_column (`str`, *optional*, defaults to `"text"`):
            The text column (the first sentence of pairs).
        text_pair_column (`str`, *optional*):
            The second sentence of sentence-pair tasks.
        label_column (`str`, *optional*, defaults to `"label"`):
            The label column; `None` for unlabeled text (distillation needs no labels).
        label_names (`list[str]`, *optional*):
            The label set, in class-index order; defaults to [`label_names_from`] on this split. Pass the training
            split's names when preparing validation and test splits so the indices agree.
        max_length (`int`, *optional*, defaults to 128):
            Truncation length in tokens (no padding: the data collator pads each batch).
        split (`str`, *optional*, defaults to `"train"`):
            The split's name, for error messages.
        token_type_ids (`bool`, *optional*, defaults to `True`):
            Keep the tokenizer's `token_type_ids`; `False` for families whose models take none (DistilBERT,
            ModernBERT), which a tokenizer borrowed from BERT still makes (`backbones.takes_token_type_ids`).

    Returns:
        `datasets.Dataset` with `input_ids`, `attention_mask`, `token_type_ids` (when the tokenizer makes them) and,
        when labelled, `labels` (int64 class indices).
    """
    check_columns(dataset, [text_column, text_pair_column, label_column], split)
    check_max_length(tokenizer, max_length, pair=text_pair_column is not None)
    for column in (text_column, text_pair_column):
        if column is not None and any(not isinstance(text, str) for text in dataset[column]):
            raise ValueError(f"The {split} column {column!r} must contain only strings (found missing values).")
    labels = None
    if label_column is not None:
        label_names = label_names_from(dataset, label_column) if label_names is None else list(label_names)
        labels = _label_ids(dataset, label_column, label_names, split)

    def tokenize(batch):
        pairs = (batch[text_pair_column],) if text_pair_column is not None else ()
        return tokenizer(batch[text_column], *pairs, truncation=True, max_length=max_length)

    tokenized = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, desc=f"Tokenizing {split}")
    if not token_type_ids and "token_type_ids" in tokenized.column_names:
        tokenized = tokenized.remove_columns("token_type_ids")
    if labels is not None:
        tokenized = tokenized.add_column("labels", labels)
    return tokenized


def check_max_length(tokenizer, max_length: int, pair: bool = False) -> None:
    """Raise a `ValueError` unless `max_length` leaves room for text after the tokenizer's special tokens."""
    special = tokenizer.num_special_tokens_to_add(pair=pair)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= special:
        raise ValueError(
            f"max_length {max_length!r} leaves no room for text: the tokenizer adds {special} special tokens"
            f"{' to a pair' if pair else ''}, so use at least {special + 1}."
        )


def label_maps(label_names: Sequence[str]) -> dict:
    """`{"id2label": ..., "label2id": ...}` for a model config, from the label names."""
    return {
        "id2label": dict(enumerate(label_names)),
        "label2id": {name: i for i, name in enumerate(label_names)},
    }


__all__ = [
    "check_columns",
    "check_max_length",
    "file_builder",
    "label_maps",
    "label_names_from",
    "load_raw_datasets",
    "prepare_dataset",
    "read_texts_file",
]

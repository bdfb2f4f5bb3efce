"""Batched classification of encodings, and streaming `predict --file` (one process and torchrun with two)."""

import csv
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tiny_models import sentiment_fastbert

from hf_fastbert.cli import main
from hf_fastbert.prediction import InputSpec, collate, predict_file, read_inputs, tokenize


WORDS = "the a film movie good bad great awful plot actor boring fun long short gem mess".split()
TEXTS = [" ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(1 + i % 6)) for i in range(23)]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield sentiment_fastbert(WORDS)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(model_and_tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("fastbert")
    model, tokenizer = model_and_tokenizer
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def expected_rows(model, tokenizer, texts, pairs=None, speed=None):
    with torch.no_grad():
        output = model(**tokenizer(texts, pairs, padding=True, return_tensors="pt"), speed=speed)
    scores, indices = output.logits.softmax(-1).max(-1)
    labels = [model.config.id2label[index] for index in indices.tolist()]
    return labels, scores.tolist(), output.exit_layers.tolist()


def assert_rows_match(rows, expected, texts):
    labels, scores, exits = expected
    assert [row["text"] for row in rows] == texts  # input order
    assert [row["label"] for row in rows] == labels
    assert [row["exit_layer"] for row in rows] == exits
    assert [row["score"] for row in rows] == pytest.approx(scores, abs=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_pads_like_the_tokenizer(model_and_tokenizer, side):
    _, tokenizer = model_and_tokenizer
    tokenizer.padding_side = side
    try:
        expected = tokenizer(TEXTS[:5], ["gem"] * 5, padding=True, return_tensors="pt")
        batch = collate(tokenize(tokenizer, TEXTS[:5], ["gem"] * 5), tokenizer.pad_token_id, side)
    finally:
        tokenizer.padding_side = "right"
    assert batch.keys() == expected.keys()
    for key in batch:
        assert torch.equal(batch[key], expected[key])


def test_read_inputs_streams_every_format(tmp_path):
    pairs = [(text, f"pair {index}") for index, text in enumerate(TEXTS[:7])]
    (tmp_path / "in.txt").write_text("\n".join(f"{a}\t{b}" for a, b in pairs) + "\n\n")
    with open(tmp_path / "in.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "sentence", "second"])
        writer.writerows([index, a, b] for index, (a, b) in enumerate(pairs))
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"sentence": a, "second": b}) + "\n" for a, b in pairs))
    pq.write_table(
        pa.table({"sentence": [a for a, _ in pairs], "second": [b for _, b in pairs]}), tmp_path / "in.parquet"
    )
    table_spec = InputSpec(text_column="sentence", text_pair_column="second")
    for name, spec in [
        ("in.txt", InputSpec(pair_separator="\t")),
        ("in.csv", table_spec),
        ("in.jsonl", table_spec),
        ("in.parquet", table_spec),
    ]:
        chunks = list(read_inputs(tmp_path / name, spec, chunk_size=3))
        assert [len(chunk) for chunk in chunks] == [3, 3, 1], name
        assert [row for chunk in chunks for row in chunk] == pairs, name
    assert [row for chunk in read_inputs(tmp_path / "in.csv", InputSpec("sentence")) for row in chunk] == [
        (a, None) for a, _ in pairs
    ]
    with pytest.raises(ValueError, match="no column 'text'"):
        next(read_inputs(tmp_path / "in.jsonl"))
    with pytest.raises(ValueError, match="no column 'text'"):
        next(read_inputs(tmp_path / "in.parquet"))
    (tmp_path / "bad.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match="not text"):
        next(read_inputs(tmp_path / "bad.jsonl"))


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".csv"])
def test_predict_file_streams_in_chunks_and_keeps_the_order(model_and_tokenizer, tmp_path, suffix):
    model, tokenizer = model_and_tokenizer
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": text, "id": index}) + "\n" for index, text in enumerate(TEXTS)))
    output = tmp_path / f"preds{suffix}"
    count = predict_file(model, tokenizer, source, output, speed=0.5, chunk_size=5, batch_size=4, progress=False)
    assert count == len(TEXTS) and not (tmp_path / f"preds{suffix}.partial").exists()
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in output.read_text().splitlines()]
    elif suffix == ".parquet":
        rows = pq.read_table(output).to_pylist()
    else:
        with open(output, newline="") as handle:
            rows = [
                {**row, "exit_layer": int(row["exit_layer"]), "score": float(row["score"])}
                for row in csv.DictReader(handle)
            ]
    assert_rows_match(rows, expected_rows(model, tokenizer, TEXTS, speed=0.5), TEXTS)


def test_predict_command_with_a_table_file(model_dir, model_and_tokenizer, tmp_path, capsys):
    model, tokenizer = model_and_tokenizer
    with open(tmp_path / "in.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "other"])
        writer.writerows([text, "gem"] for text in TEXTS)
    output = tmp_path / "out" / "preds.jsonl"
    args = ["predict", str(model_dir), "--file", str(tmp_path / "in.csv"), "--text-column", "review"]
    assert main([*args, "--text-pair-column", "other", "--output", str(output), "--chunk-size", "7"]) == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["text_pair"] for row in rows] == ["gem"] * len(TEXTS)
    assert_rows_match(rows, expected_rows(model, tokenizer, TEXTS, ["gem"] * len(TEXTS)), TEXTS)
    assert f"{len(TEXTS)} predictions written" in capsys.readouterr().err

    assert main([*args, "--json", "--speed", "0"]) == 0  # a table file without --output: streamed to stdout
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert_rows_match(rows, expected_rows(model, tokenizer, TEXTS, speed=0), TEXTS)

    assert main(["predict", str(model_dir), "gem", "--output", str(output)]) == 1
    assert "--output needs --file" in capsys.readouterr().err
    assert main([*args[:3], str(tmp_path / "missing.csv")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main([*args[:3], str(tmp_path / "in.csv")]) == 1  # no "text" column
    assert "no column 'text'" in capsys.readouterr().err


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_predict_file_under_torchrun_with_two_processes_matches_one(model_dir, tmp_path):
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": TEXTS}), source)
    common = ["predict", str(model_dir), "--file", str(source), "--speed", "0.5", "--chunk-size", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = subprocess.run(
        [*torchrun, "-m", "hf_fastbert", *common, "--output", str(tmp_path / "two.jsonl")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert main([*common, "--output", str(tmp_path / "one.jsonl")]) == 0
    one = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    merged = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert [row["text"] for row in merged] == TEXTS  # one file, input order
    assert [(row["label"], row["exit_layer"]) for row in merged] == [(row["label"], row["exit_layer"]) for row in one]
    assert [row["score"] for row in merged] == pytest.approx([row["score"] for row in one], abs=1e-5)
    assert two.stderr.count("predictions written") == 1  # only the main process reports


def test_predict_command_checks_the_output_before_loading_the_model(model_dir, tmp_path, capsys):
    (tmp_path / "in.txt").write_text("gem\n")
    args = ["predict", str(model_dir), "--file", str(tmp_path / "in.txt"), "--output"]
    assert main([*args, str(tmp_path / "preds.txt")]) == 1
    assert "use a .jsonl, .parquet, .csv file name" in capsys.readouterr().err
    (tmp_path / "taken.jsonl").mkdir()
    assert main([*args, str(tmp_path / "taken.jsonl")]) == 1
    assert "it is a folder" in capsys.readouterr().err
    assert main(["predict", str(model_dir), "--file", str(tmp_path)]) == 1
    assert "is a folder, not a file" in capsys.readouterr().err

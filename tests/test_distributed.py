"""Both stages under torchrun with 2 CPU processes (DDP, gloo) on a tiny model; the result loads and predicts."""

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_config
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertTokenizerFast

from hf_fastbert import FastBertForSequenceClassification


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "text-classification" / "run_fastbert.py"
WORDS = {"pos": ["good", "great"], "neg": ["bad", "awful"], None: ["movie", "plot", "the"]}


def write_csv(path, num_rows, seed):
    rng = random.Random(seed)
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["text", "label"])
        for _ in range(num_rows):
            label = rng.choice(["pos", "neg"])
            words = rng.choices(WORDS[None], k=rng.randint(1, 4)) + [rng.choice(WORDS[label])]
            writer.writerow([" ".join(words), label])


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_both_stages_under_torchrun_with_two_cpu_processes(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted({w for ws in WORDS.values() for w in ws})]
    torch.manual_seed(0)
    base = tmp_path / "base"
    FastBertForSequenceClassification(tiny_config(vocab_size=len(vocab), num_labels=2)).save_pretrained(base)
    BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}).save_pretrained(base)
    write_csv(tmp_path / "train.csv", 64, seed=0)
    write_csv(tmp_path / "dev.csv", 16, seed=1)
    output_dir = tmp_path / "out"

    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(EXAMPLE),
        "--model_name_or_path", str(base), "--train_file", str(tmp_path / "train.csv"),
        "--validation_file", str(tmp_path / "dev.csv"), "--output_dir", str(output_dir),
        "--finetune_epochs", "1", "--distill_epochs", "1", "--batch_size", "8", "--speeds", "0", "0.5",
        "--max_length", "32",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    summary = json.loads((output_dir / "speed_results.json").read_text())
    assert summary["num_processes"] == 2
    assert summary["finetune_steps"] == summary["distill_steps"] == 64 // (2 * 8)  # the data is split in two
    assert [row["speed"] for row in summary["results"]] == [0.0, 0.5]
    assert result.stdout.count("Saved to") == 1  # only the main process reports
    assert sorted(path.name for path in tmp_path.iterdir()) == ["base", "dev.csv", "out", "train.csv"]  # no partial

    model = AutoModelForSequenceClassification.from_pretrained(output_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert isinstance(model, FastBertForSequenceClassification) and model.config.branches_distilled
    assert sorted(model.config.label2id) == ["neg", "pos"]
    with torch.no_grad():
        out = model(**tokenizer(["good movie", "the plot was awful"], padding=True, return_tensors="pt"), speed=0.5)
    assert out.logits.shape == (2, 2) and torch.isfinite(out.logits).all()
    assert ((out.exit_layers >= 1) & (out.exit_layers <= 4)).all()

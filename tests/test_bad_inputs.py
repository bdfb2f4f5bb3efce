"""Bad input through every command and the Python API: a one-line error naming the problem (exit 1; 2 for bad
arguments), raised before any long work, and nothing lost or half-written after any failure, interrupted runs
included. Each case runs against a folder of good and bad files whose every byte is compared before and after."""

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import sentiment_fastbert

from hf_fastbert.cli import main


WORDS = "the a film movie good bad great awful plot actor boring fun long short gem mess".split()
POSITIVE = {"good", "great", "fun", "gem"}


def labelled_rows(count, seed=0):
    """Texts labelled by whether their first polar word is positive (the tiny model's labels)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        words = [WORDS[i] for i in torch.randint(0, len(WORDS), (5,), generator=generator).tolist()]
        polar = [word for word in words if word in POSITIVE | {"bad", "awful", "boring", "mess"}]
        rows.append({"text": " ".join(words), "label": "positive" if polar and polar[0] in POSITIVE else "negative"})
    return rows


def write_csv(path, rows, delimiter=","):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def save_model(path, distilled=True):
    model, tokenizer = sentiment_fastbert(WORDS)
    model.config.branches_distilled = distilled
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def snapshot(root: Path) -> dict:
    """Every file and folder under `root` (hidden ones included) with a hash of its bytes."""
    return {
        str(path.relative_to(root)): hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() else "folder"
        for path in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Good and bad inputs of every kind the commands take, by name (paths as strings)."""
    root = tmp_path_factory.mktemp("inputs")
    model = save_model(root / "model")
    mismatched = shutil.copytree(model, root / "mismatched")  # config.json edited after saving: 3 labels, 2 in weights
    config = json.loads((mismatched / "config.json").read_text())
    config["id2label"] = {"0": "negative", "1": "neutral", "2": "positive"}
    config["label2id"] = {"negative": 0, "neutral": 1, "positive": 2}
    (mismatched / "config.json").write_text(json.dumps(config))
    fewer_layers = shutil.copytree(model, root / "fewer_layers")  # config.json edited: a layer less than the weights
    config = json.loads((fewer_layers / "config.json").read_text())
    config["num_hidden_layers"] -= 1
    (fewer_layers / "config.json").write_text(json.dumps(config))
    nan_thresholds = shutil.copytree(model, root / "nan_thresholds")  # a calibrated table that could never exit
    config = json.loads((nan_thresholds / "config.json").read_text())
    rows = config["num_hidden_layers"] - 1
    config.update(exit_rule="thresholds", exit_thresholds=[[float("nan")] * 21] * rows)
    (nan_thresholds / "config.json").write_text(json.dumps(config))
    negative_thresholds = shutil.copytree(nan_thresholds, root / "negative_thresholds")
    config["exit_thresholds"] = [[-0.5] * 21] * rows
    (negative_thresholds / "config.json").write_text(json.dumps(config))
    no_students = shutil.copytree(model, root / "no_students")  # claims distilled students, holds none
    weights = load_file(no_students / "model.safetensors")
    save_file({key: value for key, value in weights.items() if not key.startswith("branches.")},
              no_students / "model.safetensors", metadata={"format": "pt"})  # fmt: skip
    rows = labelled_rows(16)
    write_csv(root / "good.csv", rows)
    write_csv(root / "no_label.tsv", [{"text": row["text"]} for row in rows], delimiter="\t")
    (root / "bad.jsonl").write_text('{"text": "good film", "label": "positive"}\n{"text": "bad", "label": \n')
    (root / "bad.json").write_text('[{"text": "good film", "label": "positive"},')
    (root / "latin1.csv").write_bytes("text,label\ngood film,positive\ncaf\xe9 mess,negative\n".encode("latin-1"))
    (root / "bad.parquet").write_bytes(b"PAR1 not really parquet")
    (root / "latin1.txt").write_bytes("good film\ncaf\xe9\n".encode("latin-1"))
    good_jsonl = "".join(json.dumps({"text": row["text"]}) + "\n" for row in rows)
    (root / "good.jsonl").write_text(good_jsonl)
    (root / "existing.jsonl").write_text('{"label": "a previous run"}\n')
    # A lone surrogate (valid JSON, not valid Unicode text) at line 3, after good rows.
    (root / "surrogate.jsonl").write_text(good_jsonl[: good_jsonl.index("\n", 40) + 1] + '{"text": "x \\ud800"}\n')
    # A row with more fields than the header, which pandas would read shifted into an index.
    (root / "ragged.csv").write_text("text,label\ngood film,positive\ngreat,1,extra,fields\n")
    (root / "empty_key").write_text("\n")
    (root / "bad_curve.json").write_text("speed,accuracy\n0,0.8\n")
    (root / "a_folder").mkdir()
    (root / "a_file").write_text("not a folder\n")
    (root / "results.csv").write_text("speed,accuracy,mean_exit_layer,flops_speedup\n0,0.8,4,1\n")
    (root / "broken_results.json").write_text('{"results": [')
    (root / "user_folder").mkdir()
    (root / "user_folder" / "notes.txt").write_text("mine\n")
    (root / "outputs").mkdir()  # `outputs/fastbrt` is then a mistyped folder, not a Hub id
    names = {path.name.replace(".", "_"): str(path) for path in root.iterdir()}
    return {**names, "root": str(root)}


@pytest.fixture
def in_inputs(files, monkeypatch):
    """Run in the inputs folder without progress bars (stderr holds only the error) and without a Hub login."""
    import datasets
    import huggingface_hub.constants
    from transformers.utils import logging as transformers_logging

    monkeypatch.chdir(files["root"])
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(Path(files["root"]) / "no-token"))
    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()
    before = snapshot(Path(files["root"]))
    yield files
    datasets.enable_progress_bars()
    transformers_logging.enable_progress_bar()
    assert snapshot(Path(files["root"])) == before  # nothing lost, changed or half-written


# (command line with {file} names, exit code, words the one-line error must contain)
CLI_CASES = [
    # train
    ("train --model {a_folder} --dataset {good_csv}", 1, ["a_folder holds no config.json"]),
    ("train --model outputs/fastbrt --dataset {good_csv}", 1, ["no such model folder: outputs/fastbrt"]),
    ("train --model {model} --dataset {bad_jsonl}", 1, ["bad.jsonl", "line 2 is not valid JSON"]),
    ("train --model {model} --dataset {latin1_csv}", 1, ["latin1.csv", "not UTF-8", "line 3"]),
    ("train --model {model} --dataset {bad_parquet}", 1, ["bad.parquet", "Parquet"]),
    ("train --model {model} --dataset {a_folder}", 1, ["data file", "is a folder"]),
    ("train --model {model} --dataset {good_csv} --validation-file {latin1_csv}", 1, ["latin1.csv", "not UTF-8"]),
    ("train --model {model} --dataset {good_csv} --validation-file {bad_json}", 1, ["the same format"]),
    ("train --model {model} --dataset {good_csv} --unlabeled-file {a_folder}", 1, ["unlabeled file", "is a folder"]),
    ("train --model {model} --dataset {no_label_tsv}", 1, ["no column 'label'"]),
    (
        "train --model {model} --dataset {good_csv} --output-dir {user_folder}",
        1,
        ["user_folder is not empty", "--overwrite-output-dir"],
    ),
    ("train --model {model} --dataset {good_csv} --output-dir {a_file}", 1, ["a_file is a file"]),
    ("train --model {model} --dataset {good_csv} --output-dir {a_file}/out", 1, ["a_file is a file, not a folder"]),
    (
        "train --model {model} --dataset {good_csv} --output-dir {root} --overwrite-output-dir",
        1,
        ["contains the current folder"],
    ),
    (
        "train --model {model} --dataset {user_folder}/../good.csv --output-dir {root}/.. --overwrite-output-dir",
        1,
        ["contains the current folder"],
    ),
    ("train --model {model} --dataset {good_csv} --max-length 2 --output-dir new/a/b", 1, ["leaves no room for text"]),
    ("train --model {model} --dataset {good_csv} --epochs -1", 2, ["--epochs", "must be a number >= 0"]),
    # evaluate
    ("evaluate {mismatched} --dataset {good_csv}", 1, ["mismatched do not fit its config.json", "3 labels"]),
    ("evaluate {model} --dataset {bad_json}", 1, ["bad.json", "not valid JSON"]),
    ("evaluate {model} --dataset {good_csv} --output results.txt", 1, ["use a .csv or .json file name"]),
    ("evaluate {model} --dataset {good_csv} --output {a_file}/x.json", 1, ["a_file is a file, not a folder"]),
    ("evaluate {model} --dataset {good_csv} --output {a_folder}", 1, ["use a .csv or .json file name"]),
    ("evaluate {a_file} --dataset {good_csv}", 1, ["a_file is a file, not a model folder"]),
    # sweep
    ("sweep {model} --dataset {bad_parquet}", 1, ["bad.parquet"]),
    ("sweep {model} --dataset {good_csv} --output-dir {a_file}", 1, ["a_file is a file"]),
    ("sweep {model} --dataset {latin1_csv}", 1, ["latin1.csv", "not UTF-8"]),
    ("sweep {model} --dataset {good_csv} --max-length 1", 1, ["leaves no room for text"]),
    ("sweep {model} --dataset {good_csv} --exit-rule learned", 1, ["'learned' is fitted on validation data"]),
    ("sweep {model} --dataset {good_csv} --exit-rule fastest", 2, ["--exit-rule", "invalid choice: 'fastest'"]),
    ("sweep {model} --dataset {good_csv} --uncertainty-top-k 0", 2, ["must be an integer >= 2"]),
    ("evaluate {model} --dataset {good_csv} --uncertainty-top-k 1", 2, ["--uncertainty-top-k", "integer >= 2"]),
    # calibrate
    ("calibrate {root}/missing --max-accuracy-drop 0.01 --save", 1, ["--save needs a local model folder"]),
    ("calibrate {model} --dataset {no_label_tsv} --max-accuracy-drop 0.01", 1, ["no column 'label'"]),
    ("calibrate outputs/fastbrt --target-speedup 2", 1, ["no such model folder"]),
    # a top-k the config refuses is refused before any work, not written into config.json
    ("calibrate {model} --dataset {good_csv} --uncertainty-top-k 1 --save", 2, ["integer >= 2"]),
    # serve
    ("serve {model} --port 70000", 2, ["--port", "[0, 65535]"]),
    ("serve {model} --api-key-file {empty_key}", 1, ["API key file", "is empty"]),
    (
        "serve {model} --adaptive --target-p95-ms 50 --speed-curve {bad_curve_json}",
        1,
        ["bad_curve.json", "not a JSON"],
    ),
    # predict
    ("predict {model} --file {a_folder}", 1, ["text file", "is a folder, not a file"]),
    ("predict {model} --file {root}/missing.txt", 1, ["text file", "does not exist"]),
    ("predict {model} --file {latin1_txt}", 1, ["latin1.txt is not UTF-8 text", "line 2"]),
    ("predict {model} good caf\udce9", 1, ["argument 2 is not UTF-8 text (byte 0xe9"]),  # as Python decodes argv
    ("predict {model} good --max-length 1", 1, ["max_length 1 leaves no room for text", "at least 3"]),
    ("predict {model} good --max-length 1000", 1, ["exceeds the model's 512 positions"]),
    ("predict {model} good --pair-separator | --max-length 3", 1, ["at least 4"]),
    ("predict {mismatched} good", 1, ["do not fit its config.json"]),
    ("predict {no_students} good", 1, ["branches_distilled=true", "holds no student weights"]),
    ("predict {fewer_layers} good", 1, ["fewer_layers hold", "has no place for", "was config.json edited?"]),
    ("predict {nan_thresholds} good", 1, ["exit_thresholds", "row 0 must be 21 finite numbers"]),
    ("predict {negative_thresholds} good", 1, ["exit_thresholds", "non-negative and non-decreasing"]),
    ("predict outputs/fastbrt good", 1, ["no such model folder: outputs/fastbrt"]),
    ("predict {model} good --speed 2", 2, ["invalid speed '2'"]),
    ("predict {model} --file {surrogate_jsonl} --output new.jsonl", 1, ["surrogate.jsonl:3", "not valid Unicode"]),
    ("predict {model} --file {surrogate_jsonl}", 1, ["surrogate.jsonl:3", "not valid Unicode"]),
    ("predict {model} --file {ragged_csv}", 1, ["ragged.csv:3 has 4 fields and the header 2"]),
    ("predict {model} --file {good_jsonl} --output {good_jsonl}", 1, ["is the input file"]),
    ("predict {model} --file {good_jsonl} --output {existing_jsonl}", 1, ["existing.jsonl exists", "--overwrite"]),
    # push (all fail before anything is created: no Hub is reachable here)
    ("push {model} alice/x --token hf_secret", 2, ["HF_TOKEN", "hf auth login"]),
    ("push {model} 'not a valid id!'", 1, ["invalid repo id"]),
    ("push {model} alice/x --results {results_csv}", 1, ["--results takes a .json results file"]),
    ("push {model} alice/x --results {broken_results_json}", 1, ["broken_results.json is not valid JSON"]),
    ("push {model} alice/x --results {a_folder}", 1, ["results file", "is a folder"]),
    ("push {a_file} alice/x", 1, ["a_file is a file"]),
    ("push {model} alice/x", 1, ["not logged in", "HF_TOKEN"]),
]


@pytest.mark.parametrize("command, code, words", CLI_CASES, ids=[case[0] for case in CLI_CASES])
def test_cli_bad_input(in_inputs, capsys, command, code, words):
    import shlex

    argv = [part.format(**in_inputs) for part in shlex.split(command)]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"hf-fastbert {argv[0]}: error: "), err
    if code == 1:
        assert len(lines) == 1, err  # one line, nothing else
    for word in words:
        assert word in lines[-1], lines[-1]


def test_non_utf8_stdin_is_a_one_line_error(in_inputs, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"good film\ncaf\xe9\n")))
    assert main(["predict", in_inputs["model"], "-"]) == 1
    assert (
        capsys.readouterr().err.strip() == "hf-fastbert predict: error: stdin is not UTF-8 text (byte 0xe9 on line 2)"
    )


def test_debug_keeps_the_traceback(in_inputs):
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        main(["--debug", "evaluate", in_inputs["model"], "--dataset", in_inputs["bad_jsonl"]])


# The Python API: (call, exception, words)
def _train(files, tmp_path, **kwargs):
    from datasets import Dataset, DatasetDict

    from hf_fastbert import train_fastbert

    raw = DatasetDict(train=Dataset.from_list(labelled_rows(16)))
    settings = dict(output_dir=str(tmp_path / "out"), max_length=16, progress=False)
    settings.update(kwargs)
    return train_fastbert(files["model"], raw, **settings)


def _card(files, tmp_path, **kwargs):
    from transformers import AutoModelForSequenceClassification

    from hf_fastbert import write_model_card

    write_model_card(tmp_path / "card", AutoModelForSequenceClassification.from_pretrained(files["model"]), **kwargs)


ROWS = [{"speed": 0.0, "accuracy": 0.8, "mean_exit_layer": 4.0, "flops_speedup": 1.0}]
API_CASES = [
    (lambda f, t: _train(f, t, output_dir=f["user_folder"]), ValueError, ["not empty", "overwrite_output_dir=True"]),
    (lambda f, t: _train(f, t, push_to_hub=True, hub_model_id="not valid!"), ValueError, ["Cannot push"]),
    (lambda f, t: _train(f, t, training_args={"push_to_hub": True}), ValueError, ["training_args", "push_to_hub"]),
    (lambda f, t: _train(f, t, max_length=2), ValueError, ["leaves no room for text"]),
    (lambda f, t: _train(f, t, eval_speeds=[Fraction(3, 2)]), ValueError, ["eval_speeds"]),
    (lambda f, t: _card(f, t, results=ROWS, results_samples=0), ValueError, ["results_samples"]),
    (lambda f, t: _card(f, t, results_data="rotten_tomatoes"), ValueError, ["give the results too"]),
    (lambda f, t: _card(f, t, results=ROWS, results_data="two\nlines"), ValueError, ["one-line"]),
    (
        lambda f, t: __import__("hf_fastbert.data").data.load_raw_datasets(data_files={"train": f["bad_jsonl"]}),
        ValueError,
        ["bad.jsonl: line 2 is not valid JSON"],
    ),
    (
        lambda f, t: __import__("hf_fastbert.data").data.load_raw_datasets(
            data_files={"train": f["good_csv"], "validation": f["latin1_csv"]}
        ),
        ValueError,
        ["latin1.csv: it is not UTF-8 text"],
    ),
]


@pytest.mark.parametrize("call, error, words", API_CASES)
def test_api_bad_input(in_inputs, tmp_path, call, error, words):
    with pytest.raises(error) as raised:
        call(in_inputs, tmp_path)
    for word in words:
        assert word in str(raised.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "card").exists()
    assert not [path.name for path in tmp_path.iterdir() if path.name.endswith(".partial")]


def test_a_distillation_trainer_refuses_checkpoint_pushes(in_inputs, tmp_path):
    from transformers import AutoModelForSequenceClassification, TrainingArguments

    from hf_fastbert import FastBertDistillationTrainer

    model = AutoModelForSequenceClassification.from_pretrained(in_inputs["model"])
    args = TrainingArguments(str(tmp_path / "out"), push_to_hub=True, hub_model_id="alice/x", report_to="none")
    with pytest.raises(ValueError, match="hub_strategy='every_save' pushes whole training folders"):  # the default
        FastBertDistillationTrainer(model=model, args=args)
    assert all(parameter.requires_grad for parameter in model.parameters())  # refused before freezing anything


def test_the_pipeline_takes_any_real_speed(in_inputs):
    import hf_fastbert

    classifier = hf_fastbert.pipeline("text-classification", model=in_inputs["model"], speed=Fraction(1, 2))
    halves = classifier(["good film", "a mess"], return_exit_layer=True)
    assert halves == classifier(["good film", "a mess"], speed=0.5, return_exit_layer=True)


# Interrupted and repeated runs ------------------------------------------------------------------------------------


def train_args(files, output_dir, *extra):
    return ["train", "--model", files["model"], "--dataset", files["good_csv"], "--output-dir", str(output_dir),
            "--epochs", "1", "--distill-epochs", "1", "--batch-size", "8", "--max-length", "16", *extra]  # fmt: skip


def test_train_replaces_its_previous_run_whole_and_refuses_anything_else(files, tmp_path, capsys):
    out = tmp_path / "out"
    dev = write_csv(tmp_path / "dev.csv", labelled_rows(8, seed=1))
    assert main(train_args(files, out, "--validation-file", str(dev), "--speeds", "0", "0.5")) == 0
    first = snapshot(out)
    assert {"config.json", "model.safetensors", "speed_results.json", "training_run.json", "sweep/luha.csv"} <= set(
        first
    )
    assert not [path for path in tmp_path.iterdir() if path.name.endswith(".partial")]
    # A rerun replaces the whole previous run: no file of the first one survives (its sweep had another eval split).
    assert main(train_args(files, out)) == 0
    assert "sweep" not in snapshot(out) and json.loads((out / "speed_results.json").read_text())["results"] is None
    assert "_finetune" not in snapshot(out)  # no empty folder of stage 2's (no checkpoint was kept)
    # A file of the run changed since (a config edited by hand or by `calibrate --save`): not just a previous run.
    config = (out / "config.json").read_bytes()
    (out / "config.json").write_bytes(config.replace(b'"speed"', b'"speed" ', 1))
    capsys.readouterr()
    assert main(train_args(files, out)) == 1
    assert "holds files changed since the previous training run wrote them (config.json)" in capsys.readouterr().err
    (out / "config.json").write_bytes(config)
    # A file the user added since: the folder is no longer just a previous run.
    (out / "notes.txt").write_text("mine\n")
    capsys.readouterr()
    assert main(train_args(files, out)) == 1
    assert "holds files the previous training run did not write (notes.txt)" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine\n"
    # --overwrite-output-dir replaces it all, but never deletes an input.
    (out / "train.csv").write_bytes(Path(files["good_csv"]).read_bytes())
    args = train_args(files, out, "--overwrite-output-dir")
    args[args.index("--dataset") + 1] = str(out / "train.csv")
    assert main(args) == 1
    assert "inside --output-dir" in capsys.readouterr().err and (out / "train.csv").is_file()
    assert main(train_args(files, out, "--overwrite-output-dir")) == 0
    assert not (out / "notes.txt").exists() and not (out / "train.csv").exists()


def test_an_interrupted_train_leaves_the_previous_model_and_a_rerun_works(files, tmp_path, capsys, monkeypatch):
    from hf_fastbert import FastBertDistillationTrainer

    out = tmp_path / "out"
    assert main(train_args(files, out)) == 0
    finished = snapshot(out)
    original_step = FastBertDistillationTrainer.training_step

    def interrupted_step(self, *args, **kwargs):
        if self.state.global_step == 1:
            raise KeyboardInterrupt  # Ctrl-C during distillation
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(FastBertDistillationTrainer, "training_step", interrupted_step)
    assert main(train_args(files, out, "--seed", "7")) == 130
    assert "interrupted" in capsys.readouterr().err
    assert snapshot(out) == finished  # the previous model, untouched
    assert [path.name for path in tmp_path.iterdir()] == ["out"]  # and no partial folder left behind
    monkeypatch.setattr(FastBertDistillationTrainer, "training_step", original_step)
    assert main(train_args(files, out, "--seed", "7")) == 0
    assert snapshot(out)["model.safetensors"] != finished["model.safetensors"]


def test_a_killed_run_is_never_taken_for_a_model(files, tmp_path, capsys):
    """A run killed with SIGKILL leaves its partial folder; the next run clears it (or refuses: checkpoints)."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    partial = tmp_path / ".out.partial"
    (partial / "out").mkdir(parents=True)
    (partial / "out" / "config.json").write_text("{}")  # half-written: no weights
    (partial / "owner.json").write_text(json.dumps({"host": os.uname().nodename, "pid": int(dead.stdout)}))
    out = tmp_path / "out"
    assert main(["predict", str(out), "good film"]) == 1  # nothing at --output-dir: no model to take
    assert "no such model folder" in capsys.readouterr().err
    (partial / "out" / "_finetune" / "checkpoint-2").mkdir(parents=True)
    assert main(train_args(files, out)) == 1
    assert "an interrupted run left checkpoints" in capsys.readouterr().err and partial.is_dir()
    shutil.rmtree(partial / "out" / "_finetune")
    assert main(train_args(files, out)) == 0
    assert not partial.exists() and (out / "model.safetensors").is_file()


def test_a_sweep_never_replaces_the_card_results_silently(files, tmp_path, capsys):
    model_dir = shutil.copytree(files["model"], tmp_path / "model")
    card = {"model": str(model_dir.resolve()), "data": "rotten_tomatoes (validation split)", "samples": 1000,
            "results": ROWS}  # fmt: skip
    (model_dir / "sweep").mkdir()
    (model_dir / "sweep" / "sweep.json").write_text(json.dumps(card))
    before = snapshot(model_dir)
    small = write_csv(tmp_path / "small.csv", labelled_rows(8, seed=2))
    sweep = ["sweep", str(model_dir), "--dataset", str(small), "--speeds", "0", "0.5"]
    assert main(sweep) == 1
    err = capsys.readouterr().err
    assert "already holds the sweep of 1,000 samples of rotten_tomatoes (validation split)" in err
    assert "that `push` puts on the model card" in err and "--overwrite-output-dir" in err
    assert snapshot(model_dir) == before
    assert main([*sweep, "--output-dir", str(tmp_path / "adhoc")]) == 0  # elsewhere: fine
    assert main([*sweep, "--overwrite-output-dir"]) == 0  # replacing it: only when asked
    replaced = json.loads((model_dir / "sweep" / "sweep.json").read_text())
    assert replaced["samples"] == 8 and replaced["data"] == "small.csv"
    assert main(sweep) == 0  # a rerun on the same model and data replaces its own files
    assert sorted(os.listdir(model_dir / "sweep")) == [
        "luha.csv",
        "luha.png",
        "students.csv",
        "sweep.csv",
        "sweep.json",
        "sweep.png",
    ]


def test_push_checks_everything_before_creating_the_repo(files, tmp_path, capsys, monkeypatch):
    from hub_server import HubServer

    model_dir = shutil.copytree(files["model"], tmp_path / "model")
    bad = tmp_path / "bad_results.json"
    bad.write_text(json.dumps({"data": "dev.csv", "samples": 10, "results": [{**ROWS[0], "accuracy": 80.4}]}))
    good = tmp_path / "results.json"
    good.write_text(json.dumps({"data": "dev.csv", "samples": 10, "results": ROWS}))
    (model_dir / "training_args.bin").write_bytes(b"a pickle")  # what a Trainer folder holds: never uploaded
    (model_dir / "notes.txt").write_text("mine\n")
    with HubServer(tokens={"hf_alice": "alice"}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", "hf_alice")
        assert main(["push", str(model_dir), "alice/tiny", "--results", str(bad), "--private"]) == 1
        assert "must be a fraction in [0, 1], got 80.4" in capsys.readouterr().err
        assert hub.repos == {}  # refused before the (public by default) repository was created
        assert main(["push", str(model_dir), "tiny", "--results", str(good), "--private"]) == 0
        assert list(hub.repos) == ["alice/tiny"] and hub.repos["alice/tiny"].private
        uploaded = set(hub.files("alice/tiny")) - {".gitattributes"}
    code = {name for name in os.listdir(model_dir) if name.endswith(".py")}
    expected = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"}
    assert uploaded == expected | code | {"accuracy_vs_speedup.png"}
    assert 'model="alice/tiny"' in hub.files("alice/tiny")["README.md"].decode()  # the namespace the Hub gave


def test_texts_are_split_on_newlines_only_the_same_in_every_path(files, tmp_path, capsys, monkeypatch):
    from hf_fastbert.cli import read_texts
    from hf_fastbert.prediction import read_inputs

    # Form feed, U+2028, lone CR and U+0085 stay inside their text; CRLF ends a line; the BOM is not text.
    content = "\ufeffone\fstill one\r\ntwo\u2028still two\nthree\rstill three\u0085still\n\n"
    expected = ["one\fstill one", "two\u2028still two", "three\rstill three\u0085still"]
    path = tmp_path / "in.txt"
    path.write_bytes(content.encode("utf-8"))
    assert read_texts([], str(path)) == expected
    assert [text for chunk in read_inputs(path) for text, _ in chunk] == expected
    assert read_texts(["-"], stdin=io.BytesIO(content.encode("utf-8"))) == expected
    assert main(["predict", files["model"], "--file", str(path), "--json"]) == 0
    # (json.dumps keeps U+2028 and U+0085 unescaped: split the output on "\n" only too)
    assert [json.loads(line)["text"] for line in capsys.readouterr().out.split("\n")[:-1]] == expected
    assert main(["predict", files["model"], "--file", str(path), "--output", str(tmp_path / "out.jsonl")]) == 0
    written = (tmp_path / "out.jsonl").read_bytes().decode("utf-8").split("\n")[:-1]
    assert [json.loads(line)["text"] for line in written] == expected


def test_texts_may_follow_options(files, capsys):
    assert main(["predict", files["model"], "--speed", "0.3", "a good film", "a bad film", "--json"]) == 0
    assert [json.loads(line)["text"] for line in capsys.readouterr().out.splitlines()] == ["a good film", "a bad film"]
    assert main(["predict", files["model"], "a good film", "--unknown-flag"]) == 2  # options are still checked
    assert "unrecognized arguments: --unknown-flag" in capsys.readouterr().err


def test_calibrate_save_keeps_the_previous_config(files, tmp_path, caplog):
    model = shutil.copytree(files["model"], tmp_path / "model")
    before = (model / "config.json").read_bytes()
    code = main(["calibrate", str(model), "--dataset", files["good_csv"], "--max-accuracy-drop", "0.01", "--save"])
    assert code == 0
    assert (model / "config.json.previous").read_bytes() == before
    assert "Calibrated on only 16 samples" in caplog.text  # a budget in points needs more samples than that


@pytest.mark.parametrize("family", ["distilbert", "modernbert"])
def test_families_without_token_types_train_and_predict_with_a_bert_tokenizer(files, tmp_path, family):
    # A BERT tokenizer makes token_type_ids; DistilBERT and ModernBERT take none: they are left out, not an error.
    from tiny_models import family_model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(files["model"])
    assert "token_type_ids" in tokenizer("good film")
    folder = tmp_path / family
    overrides = {
        "num_labels": 2,
        "id2label": {0: "negative", 1: "positive"},
        "label2id": {"negative": 0, "positive": 1},
    }
    family_model(family, **overrides).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert main(["predict", str(folder), "good film", "--speed", "0.5"]) == 0
    args = train_args(files, tmp_path / "out")
    args[args.index("--model") + 1] = str(folder)
    assert main(args) == 0
    assert main(["evaluate", str(tmp_path / "out"), "--dataset", files["good_csv"]]) == 0


def test_push_without_network_is_a_one_line_error(in_inputs, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    assert main(["push", in_inputs["model"], "alice/x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("hf-fastbert push: error: cannot reach the Hugging Face Hub at http://127.0.0.1:9")

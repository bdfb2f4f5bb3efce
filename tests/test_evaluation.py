"""Speed metrics from one full-depth pass: agreement with the early-exit engine, FastBertMetrics, bad input."""

import copy

import numpy as np
import pytest
import torch
from datasets import Dataset
from tiny_models import random_batch, tiny_model
from transformers import EvalPrediction

from hf_fastbert import FastBertMetrics, bert_flops, evaluate_speeds
from hf_fastbert.evaluation import (
    accuracy_drop_standard_error,
    flatten_speed_metrics,
    metrics_at_speeds,
    predict_all_logits,
)


SPEEDS = [0.0, 0.2, 0.5, 0.8, 1.0]


def tokenized_dataset(batch_size=24, seq_length=14, seed=0, num_labels=3):
    input_ids, attention_mask = random_batch(batch_size, seq_length, seed=seed)
    lengths = attention_mask.sum(dim=1)
    labels = torch.randint(0, num_labels, (batch_size,), generator=torch.Generator().manual_seed(seed))
    rows = {
        "input_ids": [ids[:n].tolist() for ids, n in zip(input_ids, lengths, strict=True)],
        "attention_mask": [[1] * int(n) for n in lengths],
        "labels": labels.tolist(),
    }
    return Dataset.from_dict(rows), input_ids, attention_mask, labels


def test_metrics_match_the_early_exit_engine_at_every_speed():
    model = tiny_model()
    dataset, input_ids, attention_mask, labels = tokenized_dataset()
    results = evaluate_speeds(model, dataset, SPEEDS, batch_size=5)  # batches differ from the engine's below
    assert [row["speed"] for row in results] == SPEEDS
    baseline = bert_flops(model.config, attention_mask.sum(dim=1)).sum().item()
    exits_seen = set()
    with torch.no_grad():
        for row, speed in zip(results, SPEEDS, strict=True):
            out = model(input_ids=input_ids, attention_mask=attention_mask, speed=speed)  # the compaction engine
            exits_seen.update(out.exit_layers.tolist())
            assert row["accuracy"] == pytest.approx((out.logits.argmax(-1) == labels).float().mean().item())
            assert row["mean_exit_layer"] == pytest.approx(out.exit_layers.float().mean().item())
            assert row["flops_speedup"] == pytest.approx(baseline / out.flops.sum().item())
    assert results[0]["mean_exit_layer"] == model.config.num_hidden_layers
    assert results[0]["flops_speedup"] == pytest.approx(1.0)  # teacher_head="bert": speed 0 is plain BERT
    assert len(exits_seen) > 2  # the test covers early, middle and full-depth exits


def test_one_pass_gives_all_logits_lengths_and_labels():
    model = tiny_model()
    dataset, input_ids, attention_mask, labels = tokenized_dataset(batch_size=7)
    all_logits, seq_lengths, got_labels = predict_all_logits(model, dataset, batch_size=3)
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask, output_all_logits=True).all_logits
    torch.testing.assert_close(all_logits, expected, rtol=1e-5, atol=1e-5)
    assert seq_lengths.tolist() == attention_mask.sum(dim=1).tolist()
    assert got_labels.tolist() == labels.tolist()
    _, _, no_labels = predict_all_logits(model, dataset.remove_columns("labels"))
    assert no_labels is None


def test_metrics_at_speeds_worked_example():
    config = tiny_model().config  # 4 layers
    # Sample 0: confident from layer 1 and right; sample 1: only the teacher is confident, and wrong at layer 1.
    all_logits = torch.tensor(
        [
            [[9.0, 0.0, 0.0]] * 4,
            [[0.1, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, 0.1], [0.0, 0.0, 9.0]],
        ]
    )
    rows = metrics_at_speeds(all_logits, np.array([10, 10]), config, speeds=[0.0, 0.5, 1.0], labels=[0, 2])
    assert [row["accuracy"] for row in rows] == [1.0, 1.0, 0.5]
    assert [row["mean_exit_layer"] for row in rows] == [4.0, 2.5, 1.0]
    speedups = [row["flops_speedup"] for row in rows]
    assert speedups[0] == pytest.approx(1.0) and speedups[1] > 1.4 and speedups[2] > speedups[1]
    assert metrics_at_speeds(all_logits, [10, 10], config, speeds=[0.5])[0]["accuracy"] is None
    # Changed answers: none until speed 1, where sample 1 is lost; the drop's standard error from them (exactly 0 at
    # speed 0, full depth itself).
    assert [(row["answers_lost"], row["answers_gained"]) for row in rows] == [(0, 0), (0, 0), (1, 0)]
    assert [row["accuracy_drop_se"] for row in rows] == [
        0.0,
        pytest.approx(accuracy_drop_standard_error(0, 0, 2)),
        pytest.approx(accuracy_drop_standard_error(1, 0, 2)),
    ]
    unlabelled = metrics_at_speeds(all_logits, [10, 10], config, speeds=[0.5])[0]
    assert unlabelled["accuracy_drop_se"] is None and "answers_lost" not in unlabelled


def test_accuracy_drop_standard_error_counts_only_changed_answers():
    # Agresti-Min: half a sample added to each cell of the paired table. 60 answers lost in 1,000: about 0.75 points.
    lost, gained = 60.5 / 1002, 0.5 / 1002
    expected = ((lost + gained - (lost - gained) ** 2) / 1002) ** 0.5
    assert accuracy_drop_standard_error(60, 0, 1000) == pytest.approx(expected)
    assert 100 * accuracy_drop_standard_error(60, 0, 1000) == pytest.approx(0.756, abs=0.001)
    # No changed answer still leaves a bound (0.1 points), where the plain estimate would say 0.
    assert 100 * accuracy_drop_standard_error(0, 0, 1000) == pytest.approx(0.0998, abs=0.0001)
    # Answers lost and gained in equal numbers: no drop, but the spread of both.
    assert accuracy_drop_standard_error(30, 30, 1000) > accuracy_drop_standard_error(30, 0, 1000)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"speeds": [1.5]}, "speeds"),
        ({"speeds": []}, "at least one"),
        ({"all_logits": torch.zeros(2, 3, 3)}, "num_hidden_layers"),
        ({"seq_lengths": torch.tensor([5])}, "seq_lengths"),
        ({"labels": [0, 1, 2]}, "labels"),
        ({"all_logits": torch.zeros(0, 4, 3), "seq_lengths": torch.zeros(0)}, "zero samples"),
    ],
)
def test_bad_input_is_named(kwargs, message):
    settings = dict(all_logits=torch.zeros(2, 4, 3), seq_lengths=torch.tensor([5, 6]), speeds=[0.1], labels=None)
    settings.update(kwargs)
    config = tiny_model().config
    with pytest.raises(ValueError, match=message):
        metrics_at_speeds(
            settings["all_logits"], settings["seq_lengths"], config, settings["speeds"], settings["labels"]
        )


def test_evaluate_speeds_refuses_an_empty_dataset():
    with pytest.raises(ValueError, match="empty"):
        evaluate_speeds(tiny_model(), Dataset.from_dict({"input_ids": []}), [0.0])


def test_fastbert_metrics_from_distillation_predictions():
    model = tiny_model()
    dataset, input_ids, attention_mask, labels = tokenized_dataset()
    all_logits, seq_lengths, _ = predict_all_logits(model, dataset)
    metrics = FastBertMetrics(model.config, speeds=[0.0, 0.5])(
        EvalPrediction(predictions=(all_logits.numpy(), seq_lengths.numpy(), np.zeros((24, 3))), label_ids=labels)
    )
    expected = flatten_speed_metrics(metrics_at_speeds(all_logits, seq_lengths, model.config, [0.0, 0.5], labels))
    assert {key: metrics[key] for key in expected} == expected
    assert set(expected) == {
        f"{key}_speed_{speed}" for key in ("accuracy", "mean_exit_layer", "flops_speedup") for speed in ("0", "0.5")
    }
    assert metrics["accuracy"] == expected["accuracy_speed_0"]  # the teacher's accuracy


def test_fastbert_metrics_with_stock_trainer_predictions():
    """The stock Trainer passes (logits, exit_layers, flops) at the model's speed, and -100-padded input ids."""
    model = tiny_model()
    _, input_ids, attention_mask, labels = tokenized_dataset()
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, speed=0.5)
    padded_inputs = torch.cat([input_ids, torch.full((24, 3), -100)], dim=1).numpy()
    predictions = (out.logits.numpy(), out.exit_layers.numpy(), out.flops.numpy())
    config = copy.deepcopy(model.config)
    config.speed = 0.5  # the speed the stock Trainer's model ran at
    metrics = FastBertMetrics(config)(EvalPrediction(predictions, labels.numpy(), inputs=padded_inputs))
    assert metrics["accuracy_speed_0.5"] == pytest.approx((out.logits.argmax(-1) == labels).float().mean().item())
    assert "accuracy" not in metrics  # always the teacher's (full depth): not known from exits at speed 0.5
    assert metrics["mean_exit_layer_speed_0.5"] == pytest.approx(out.exit_layers.float().mean().item())
    baseline = bert_flops(model.config, attention_mask.sum(dim=1)).sum().item()
    assert metrics["flops_speedup_speed_0.5"] == pytest.approx(baseline / out.flops.sum().item())
    without_inputs = FastBertMetrics(config)(EvalPrediction(predictions, labels.numpy()))
    assert "flops_speedup_speed_0.5" not in without_inputs and "accuracy_speed_0.5" in without_inputs
    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=attention_mask, speed=0.0)
    predictions = (full.logits.numpy(), full.exit_layers.numpy(), full.flops.numpy())
    config.speed = 0.0
    at_full_depth = FastBertMetrics(config)(EvalPrediction(predictions, labels.numpy()))
    assert at_full_depth["accuracy"] == at_full_depth["accuracy_speed_0"]


def test_student_gaps_and_the_failed_distillation_warning():
    from hf_fastbert.evaluation import distillation_warning, student_gaps

    teacher = torch.tensor([[3.0, 0.0], [0.0, 3.0], [3.0, 0.0], [0.0, 3.0]])  # (N=4, C=2)
    good = teacher.clone()
    wrong = teacher.flip(-1)
    all_logits = torch.stack([wrong, wrong, good, teacher], dim=1)  # (N, L=4, C): students 1-3, then the teacher
    gaps = student_gaps(all_logits, labels=torch.tensor([0, 1, 0, 0]))
    assert [row["layer"] for row in gaps] == [1, 2, 3]
    assert [row["agreement"] for row in gaps] == [0.0, 0.0, 1.0]
    assert gaps[2]["kl"] == pytest.approx(0.0, abs=1e-6) and gaps[0]["kl"] > 2
    assert [row["accuracy"] for row in gaps] == [0.25, 0.25, 0.75]
    assert distillation_warning(gaps) is None  # the upper half (layer 3) agrees
    failed = student_gaps(torch.stack([good, wrong, wrong, teacher], dim=1))
    message = distillation_warning(failed)
    assert "student of layer 3 agrees with the teacher on only 0%" in message and "Distil longer" in message
    assert student_gaps(all_logits)[0]["accuracy"] is None

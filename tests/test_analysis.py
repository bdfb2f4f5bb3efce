"""The library behind `sweep`, `calibrate` and `evaluate`: calibration, the LUHA view, exit rules and the oracle."""

import pytest
import torch

from hf_fastbert import FastBertConfig, FastBertForSequenceClassification
from hf_fastbert.analysis import (
    calibrate,
    calibrate_speed,
    choose_exit_rule,
    cross_fitted_metrics,
    format_table,
    luha_table,
    oracle_metrics,
    rule_summary,
    sweep,
    sweep_logits,
)
from hf_fastbert.exit_rules import oracle_exits


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


def test_calibrate_speed_with_confidence_tests_each_speed_at_its_upper_bound_in_order():
    rows = [
        {"speed": 0.0, "accuracy": 0.80, "flops_speedup": 1.0, "accuracy_drop_se": 0.0},
        {"speed": 0.1, "accuracy": 0.80, "flops_speedup": 1.6, "accuracy_drop_se": 0.001},
        {"speed": 0.2, "accuracy": 0.796, "flops_speedup": 2.1, "accuracy_drop_se": 0.004},
        {"speed": 0.3, "accuracy": 0.79, "flops_speedup": 2.9, "accuracy_drop_se": 0.008},
    ]
    assert calibrate_speed(rows, max_accuracy_drop=0.005)["speed"] == 0.2  # the point estimate
    # 0.2 at 95%: 0.004 + 1.645 x 0.004 = 0.0106 > 0.005; 0.1: 0 + 0.0016 passes.
    assert calibrate_speed(rows, max_accuracy_drop=0.005, confidence=0.95)["speed"] == 0.1
    assert calibrate_speed(rows, max_accuracy_drop=0.011, confidence=0.95)["speed"] == 0.2
    # 0.3 at 95%: 0.01 + 0.0132 = 0.0232; at 50% the bound is the point estimate.
    assert calibrate_speed(rows, max_accuracy_drop=0.0235, confidence=0.95)["speed"] == 0.3
    assert calibrate_speed(rows, max_accuracy_drop=0.01, confidence=0.5)["speed"] == 0.3
    # A speed that passes after one that failed is luck on these samples: the point estimate takes it, the bound stops.
    lucky = rows + [{"speed": 0.4, "accuracy": 0.80, "flops_speedup": 3.5, "accuracy_drop_se": 0.001}]
    assert calibrate_speed(lucky, max_accuracy_drop=0.005)["speed"] == 0.4
    assert calibrate_speed(lucky, max_accuracy_drop=0.005, confidence=0.95)["speed"] == 0.1
    for bad in (0.0, 1.0, 1.5, True, "0.9"):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            calibrate_speed(rows, max_accuracy_drop=0.01, confidence=bad)
    with pytest.raises(ValueError, match="give it with max_accuracy_drop"):
        calibrate_speed(rows, target_speedup=2.0, confidence=0.95)
    with pytest.raises(ValueError, match="accuracy_drop_se"):
        calibrate_speed(RESULTS, max_accuracy_drop=0.01, confidence=0.95)


def test_choose_exit_rule_shares_the_confidence_among_rules():
    rows = [
        {"speed": 0.0, "accuracy": 0.80, "flops_speedup": 1.0, "accuracy_drop_se": 0.0},
        {"speed": 0.5, "accuracy": 0.80, "flops_speedup": 2.0, "accuracy_drop_se": 0.0028},
    ]
    # One rule at 95%: 1.645 x 0.0028 = 0.0046 passes a 0.005 budget; two rules at 97.5% each: 1.96 x 0.0028 fails.
    _, row, _ = choose_exit_rule({"entropy": rows}, max_accuracy_drop=0.005, confidence=0.95)
    assert row["speed"] == 0.5
    _, row, _ = choose_exit_rule({"entropy": rows, "patience": rows}, max_accuracy_drop=0.005, confidence=0.95)
    assert row["speed"] == 0.0
    with pytest.raises(ValueError, match="give it with max_accuracy_drop"):  # not "no rule reaches 2x"
        choose_exit_rule({"entropy": rows}, target_speedup=2.0, confidence=0.95)


def test_describe_drop_states_the_bound_on_new_data():
    from hf_fastbert.analysis import describe_drop

    text = describe_drop({"accuracy": 0.795, "accuracy_drop_se": 0.008}, {"accuracy": 0.80})
    assert text == "0.50 points below full depth on these samples, expected drop at most 1.82 (95% bound)"
    text = describe_drop({"accuracy": 0.795, "accuracy_drop_se": 0.008}, {"accuracy": 0.80}, confidence=0.5)
    assert text.endswith("expected drop at most 0.50 (50% bound)")
    assert describe_drop({"accuracy": 0.795}, {"accuracy": 0.80}) == "0.50 points below full depth"
    assert describe_drop({"accuracy": 0.802}, {"accuracy": 0.80}) == "0.20 points above full depth"


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
    table = format_table([{"speed": 0.1, "n": 3, "x": None, "accuracy": 0.5}], ["speed", "n", "x", "accuracy"])
    assert table.splitlines() == ["speed  n  x  accuracy", "-----  -  -  --------", "  0.1  3  -    0.5000"]


# --- exit rules against the oracle -------------------------------------------------------------------------------


def tiny_config(layers=4, labels=3):
    return FastBertConfig(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=32,
        num_labels=labels,
        branch_hidden_size=16,
    )


def random_pass(samples=64, layers=4, labels=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    all_logits = torch.randn(samples, layers, labels, generator=generator) * 3  # (N, L, C)
    seq_lengths = torch.randint(4, 16, (samples,), generator=generator)
    gold = torch.randint(0, labels, (samples,), generator=generator)
    return all_logits, seq_lengths, gold


def test_oracle_metrics_is_the_teachers_accuracy_at_the_first_agreeing_layer():
    config = tiny_config()
    all_logits, seq_lengths, labels = random_pass()
    oracle = oracle_metrics(all_logits, seq_lengths, config, labels)
    teacher = (all_logits[:, -1].argmax(-1) == labels).double().mean().item()
    assert oracle["exit_rule"] == "oracle" and oracle["accuracy"] == pytest.approx(teacher)
    assert oracle["mean_exit_layer"] == pytest.approx(oracle_exits(all_logits).double().mean().item())
    assert oracle["flops_speedup"] > 1
    # No rule keeping every answer of the teacher spends fewer FLOPs than the oracle.
    report = sweep_logits(all_logits, seq_lengths, labels, config, [0.0, 0.3, 0.6, 0.9], ["entropy", "patience"])
    for rows in report.by_rule.values():
        for row in rows:
            if row["accuracy"] == pytest.approx(teacher) and row["mean_exit_layer"] < oracle["mean_exit_layer"]:
                pytest.fail(f"{row} beats the oracle {oracle}")


def test_sweep_logits_compares_rules_side_by_side():
    config = tiny_config()
    all_logits, seq_lengths, labels = random_pass()
    report = sweep_logits(all_logits, seq_lengths, labels, config, [0.0, 0.5, 0.9], ["patience", "entropy"])
    assert list(report.by_rule) == ["patience", "entropy"] and report.results == report.by_rule["patience"]
    assert [row["exit_rule"] for row in report.rows] == ["patience"] * 3 + ["entropy"] * 3
    assert [row["exit_rule"] for row in report.summary] == ["patience", "entropy"]
    assert all(0 <= row["oracle_fraction"] for row in report.summary)
    assert report.luha is None and report.samples == 64
    with pytest.raises(ValueError, match="calibrate it first"):
        sweep_logits(all_logits, seq_lengths, labels, config, [0.0], ["thresholds"])
    with pytest.raises(ValueError, match="unknown exit rule"):
        sweep_logits(all_logits, seq_lengths, labels, config, [0.0], ["nope"])


def test_rule_summary_oracle_fraction():
    by_rule = {
        "entropy": [
            {"speed": 0.0, "accuracy": 0.8, "flops_speedup": 1.0},
            {"speed": 0.5, "accuracy": 0.795, "flops_speedup": 2.0},
            {"speed": 0.9, "accuracy": 0.6, "flops_speedup": 4.0},
        ]
    }
    (row,) = rule_summary(by_rule, {"flops_speedup": 3.0})
    assert row["speed"] == 0.5 and row["oracle_fraction"] == pytest.approx(2.0 / 3.0)


def test_choose_exit_rule_budget_and_target():
    by_rule = {
        "entropy": [
            {"speed": 0.0, "accuracy": 0.80, "flops_speedup": 1.0},
            {"speed": 0.5, "accuracy": 0.795, "flops_speedup": 2.0},
            {"speed": 0.9, "accuracy": 0.70, "flops_speedup": 5.0},
        ],
        "patience": [
            {"speed": 0.0, "accuracy": 0.80, "flops_speedup": 1.0},
            {"speed": 0.5, "accuracy": 0.79, "flops_speedup": 2.5},
            {"speed": 0.9, "accuracy": 0.75, "flops_speedup": 3.0},
        ],
    }
    rule, row, candidates = choose_exit_rule(by_rule, max_accuracy_drop=0.01)
    assert (rule, row["speed"]) == ("patience", 0.5) and candidates["entropy"]["speed"] == 0.5
    rule, row, candidates = choose_exit_rule(by_rule, target_speedup=2.8)
    assert (rule, row["speed"]) == ("patience", 0.9) and candidates["entropy"]["speed"] == 0.9
    rule, row, candidates = choose_exit_rule(by_rule, target_speedup=4.0)
    assert rule == "entropy" and candidates["patience"] is None
    with pytest.raises(ValueError, match="no exit rule reaches a 9.0x"):
        choose_exit_rule(by_rule, target_speedup=9.0)


@pytest.fixture(scope="module")
def model_and_data():
    from datasets import Dataset

    torch.manual_seed(0)
    model = FastBertForSequenceClassification(tiny_config()).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.branches.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(
                    torch.randn(module.weight.shape, generator=generator) * 2 / module.in_features**0.5
                )
    lengths = torch.randint(4, 12, (48,), generator=generator).tolist()
    rows = {
        "input_ids": [[2] + torch.randint(5, 40, (n,), generator=generator).tolist() + [3] for n in lengths],
        "label": torch.randint(0, 3, (48,), generator=generator).tolist(),
    }
    return model, Dataset.from_dict(rows)


def test_calibrate_picks_a_rule_and_sets_the_config(model_and_data):
    model, dataset = model_and_data
    model.config.exit_rule, model.config.speed = "entropy", 0.0
    choice = calibrate(model, dataset, max_accuracy_drop=1.0, speeds=[0.0, 0.5, 0.9], batch_size=16)
    assert choice.exit_rule in ("entropy", "patience", "thresholds", "learned")
    assert (model.config.exit_rule, model.config.speed) == (choice.exit_rule, choice.speed)
    assert set(choice.candidates) == {"entropy", "patience", "thresholds", "learned"}
    best = max(row["flops_speedup"] for row in choice.candidates.values())
    assert choice.row["flops_speedup"] == best and choice.reference["speed"] == 0.0
    assert model.config.exit_thresholds is not None and model.config.exit_heads is not None  # fitted first
    # The calibrated rules now sweep, and the sweep agrees with the model run at that rule and speed.
    report = sweep(model, dataset, [0.0, 0.5], exit_rules=["thresholds", "learned"], batch_size=16)
    assert set(report.by_rule) == {"thresholds", "learned"} and report.oracle["accuracy"] == choice.oracle["accuracy"]
    with pytest.raises(ValueError, match="exactly one"):
        calibrate(model, dataset)
    model.config.exit_rule, model.config.speed = "entropy", 0.0


@pytest.mark.parametrize("rule", ["thresholds", "learned"])
def test_cross_fitted_drop_standard_error_is_the_pooled_samples_own(model_and_data, rule):
    """Pooling the folds' standard errors gives the standard error of every sample's own cross-fitted answer."""
    import copy

    from hf_fastbert.evaluation import accuracy_drop_standard_error, predict_all_logits
    from hf_fastbert.exit_rules import calibrate_thresholds, fit_exit_heads, select_exits

    model, dataset = model_and_data
    all_logits, seq_lengths, labels = predict_all_logits(model, dataset, batch_size=16)
    speeds = [0.0, 0.3, 0.6, 0.9]
    rows = cross_fitted_metrics(all_logits, seq_lengths, labels, model.config, speeds, rule)
    fold_of = torch.arange(len(labels)) % 2
    for row in rows:
        right = torch.zeros(len(labels), dtype=torch.bool)
        for fold in range(2):
            held, fit = fold_of == fold, fold_of != fold
            fitted = copy.deepcopy(model.config)
            if rule == "thresholds":
                fitted.exit_thresholds = calibrate_thresholds(all_logits[fit], fitted.uncertainty_top_k)
            else:
                fitted.exit_heads = fit_exit_heads(all_logits[fit], fitted.uncertainty_top_k)
            logits, _ = select_exits(all_logits[held], row["speed"], fitted, rule)
            right[held] = logits.argmax(dim=-1) == labels[held]
        full_depth = all_logits[:, -1].argmax(dim=-1) == labels
        lost, gained = int((full_depth & ~right).sum()), int((right & ~full_depth).sum())
        assert row["accuracy"] == pytest.approx(right.double().mean().item(), abs=1e-12)
        assert (row["answers_lost"], row["answers_gained"]) == (lost, gained)
        if row["speed"] > 0:
            assert row["accuracy_drop_se"] == pytest.approx(accuracy_drop_standard_error(lost, gained, len(labels)))
    assert rows[0]["accuracy_drop_se"] == 0.0 and any(row["answers_lost"] > 0 for row in rows)


def test_calibrate_with_confidence_is_never_faster(model_and_data):
    model, dataset = model_and_data
    model.config.exit_rule, model.config.speed = "entropy", 0.0
    speeds = [round(0.05 * i, 2) for i in range(20)]
    point = calibrate(model, dataset, max_accuracy_drop=0.05, exit_rules=["entropy"], speeds=speeds, batch_size=16)
    bound = calibrate(
        model, dataset, max_accuracy_drop=0.05, confidence=0.95, exit_rules=["entropy"], speeds=speeds, batch_size=16
    )
    assert bound.speed <= point.speed
    drop = bound.reference["accuracy"] - bound.row["accuracy"]
    assert drop + 1.6448536 * bound.row["accuracy_drop_se"] <= 0.05 + 1e-9
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        calibrate(model, dataset, max_accuracy_drop=0.05, confidence=95)
    model.config.exit_rule, model.config.speed = "entropy", 0.0


def test_train_default_speed_with_confidence_says_so(model_and_data):
    from hf_fastbert.evaluation import predict_all_logits
    from hf_fastbert.training import FastBertTrainingConfig
    from hf_fastbert.training.train import calibrate_default_speed, describe_default_speed

    model, dataset = model_and_data
    model.config.exit_rule, model.config.speed = "entropy", 0.0
    logits = predict_all_logits(model, dataset, batch_size=16)
    point = calibrate_default_speed(model, *logits, "tiny", max_accuracy_drop=0.05)
    bound = calibrate_default_speed(model, *logits, "tiny", max_accuracy_drop=0.05, confidence=0.95)
    assert bound["speed"] <= point["speed"] and (point["confidence"], bound["confidence"]) == (None, 0.95)
    assert "within 5 accuracy points of full depth at 95% confidence" in describe_default_speed(bound)
    if point["speed"] > 0:  # the advice is for the person training, not for the model card
        assert "--accuracy-confidence 0.95" in describe_default_speed(point, advise=True)
        assert "--accuracy-confidence" not in describe_default_speed(point)
    with pytest.raises(ValueError, match="give both, or neither"):
        FastBertTrainingConfig(accuracy_confidence=0.95, max_accuracy_drop=None)
    with pytest.raises(ValueError, match="accuracy_confidence"):
        FastBertTrainingConfig(accuracy_confidence=1.0)
    model.config.exit_rule, model.config.speed = "entropy", 0.0


def test_rows_of_rule_and_the_serving_curve(tmp_path):
    import json

    from hf_fastbert.analysis import rows_of_rule
    from hf_fastbert.serving import load_speed_curve

    def rows(rule, accuracy):
        return [
            {"exit_rule": rule, "speed": 0.0, "accuracy": 0.8, "flops_speedup": 1.0},
            {"exit_rule": rule, "speed": 0.5, "accuracy": accuracy, "flops_speedup": 1.5},
        ]

    data = {"results": rows("entropy", 0.7), "exit_rules": {"entropy": rows("entropy", 0.7)}}
    data["exit_rules"]["learned"] = rows("learned", 0.79)
    assert rows_of_rule(data, "learned")[1]["accuracy"] == 0.79
    assert (
        rows_of_rule(data) is data["results"] and rows_of_rule(rows("entropy", 0.7), "entropy")[1]["accuracy"] == 0.7
    )
    assert rows_of_rule([{"speed": 0.0}], "patience") == [{"speed": 0.0}]  # rows that do not say their rule
    with pytest.raises(ValueError, match="measured with the exit rule entropy"):
        rows_of_rule({"results": rows("entropy", 0.7)}, "patience")
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(data))
    assert load_speed_curve(path, exit_rule="learned")[1]["accuracy"] == 0.79
    assert load_speed_curve(path)[1]["accuracy"] == 0.7
    assert "accuracy_drop_se" not in load_speed_curve(path)[1]  # curves written before it was measured
    for index, row in enumerate(data["results"]):
        row["accuracy_drop_se"] = 0.01 * index
    path.write_text(json.dumps(data))
    assert [row["accuracy_drop_se"] for row in load_speed_curve(path)] == [0.0, 0.01]  # serve --accuracy-confidence

"""Every exit rule in the one engine: consistency with `all_logits`, batch invariance, monotonic speed, the oracle."""

import pytest
import torch
from tiny_models import family_model, random_batch
from tolerances import assert_rule_clear

from hf_fastbert import FastBertForSequenceClassification
from hf_fastbert.exit_rules import (
    EXIT_RULES,
    calibrate_thresholds,
    fit_exit_heads,
    oracle_exits,
    patience_for,
    select_exits,
)


SPEEDS = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


def run(model, input_ids, attention_mask=None, **kwargs):
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


@pytest.fixture(scope="module", params=["bert", "modernbert"])
def calibrated(request):
    """A tiny model whose thresholds and learned heads are calibrated on a 'validation' batch."""
    model = family_model(request.param)
    input_ids, attention_mask = random_batch(batch_size=48, seq_length=12, seed=7)
    model.calibrate_exit_rules(run(model, input_ids, attention_mask, output_all_logits=True).all_logits)
    return model


@pytest.mark.parametrize("rule", EXIT_RULES)
@pytest.mark.parametrize("speed", [0.3, 0.6, 0.9])
def test_engine_matches_the_rule_on_all_logits(calibrated, rule, speed):
    input_ids, attention_mask = random_batch(batch_size=16, seed=1)  # seed 0: a patience exit hinges on 3e-5
    engine = run(calibrated, input_ids, attention_mask, speed=speed, exit_rule=rule)
    full = run(calibrated, input_ids, attention_mask, speed=speed, exit_rule=rule, output_all_logits=True)
    _, expected = select_exits(full.all_logits, speed, calibrated.config, rule)
    assert_rule_clear(full.all_logits, speed, calibrated.config, rule)
    assert engine.exit_layers.tolist() == expected.tolist() == full.exit_layers.tolist()
    torch.testing.assert_close(engine.logits, full.logits, rtol=0, atol=1e-5)
    assert torch.equal(engine.flops, full.flops)


@pytest.mark.parametrize("rule", EXIT_RULES)
def test_batch_invariance_and_monotonic_speed(calibrated, rule):
    input_ids, attention_mask = random_batch(batch_size=8, seq_length=14, seed=3)
    batched = run(calibrated, input_ids, attention_mask, speed=0.6, exit_rule=rule)
    for i in range(8):
        alone = run(calibrated, input_ids[i : i + 1, : int(attention_mask[i].sum())], speed=0.6, exit_rule=rule)
        torch.testing.assert_close(alone.logits[0], batched.logits[i], rtol=0, atol=1e-5)
        assert alone.exit_layers.item() == batched.exit_layers[i].item()
    exits = torch.stack(
        [run(calibrated, input_ids, attention_mask, speed=s, exit_rule=rule).exit_layers for s in SPEEDS]
    )
    assert (exits[1:] <= exits[:-1]).all() and exits[0].eq(4).all()


def test_patience_against_a_direct_reading_of_pabee():
    all_logits = torch.tensor(
        [
            [[2.0, 0.0], [2.0, 0.0], [2.0, 0.0], [0.0, 2.0]],  # agrees from layer 1: streaks 1, 2, 3
            [[0.0, 2.0], [2.0, 0.0], [2.0, 0.0], [2.0, 0.0]],  # streaks 1, 1, 2
            [[0.0, 2.0], [2.0, 0.0], [0.0, 2.0], [2.0, 0.0]],  # never two in a row
        ]
    )
    config = family_model("bert").config
    config.exit_rule = "patience"
    assert [patience_for(s, 4) for s in (1.0, 0.5, 0.01)] == [1, 2, 3]
    assert select_exits(all_logits, 1.0, config)[1].tolist() == [1, 1, 1]
    assert select_exits(all_logits, 0.5, config)[1].tolist() == [2, 3, 4]
    assert select_exits(all_logits, 0.01, config)[1].tolist() == [3, 4, 4]


def test_oracle_is_the_first_layer_that_answers_as_the_teacher():
    all_logits = torch.tensor(
        [
            [[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]],
            [[0.0, 2.0], [0.0, 2.0], [2.0, 0.0]],
            [[0.0, 2.0], [0.0, 2.0], [0.0, 2.0]],
        ]
    )
    assert oracle_exits(all_logits).tolist() == [1, 3, 1]


def test_rules_and_their_calibration_are_saved_with_the_model(calibrated, tmp_path):
    calibrated.config.exit_rule = "learned"
    try:
        calibrated.save_pretrained(tmp_path)
        reloaded = FastBertForSequenceClassification.from_pretrained(tmp_path).eval()
    finally:
        calibrated.config.exit_rule = "entropy"
    assert reloaded.config.exit_rule == "learned"
    assert reloaded.config.exit_heads == calibrated.config.exit_heads
    input_ids, attention_mask = random_batch()
    expected = run(calibrated, input_ids, attention_mask, speed=0.7, exit_rule="learned").exit_layers
    assert run(reloaded, input_ids, attention_mask, speed=0.7).exit_layers.tolist() == expected.tolist()


@pytest.mark.parametrize("rule, field", [("thresholds", "exit_thresholds"), ("learned", "exit_heads")])
def test_uncalibrated_rules_are_refused(rule, field):
    model = family_model("bert")
    with pytest.raises(ValueError, match=field):
        run(model, *random_batch(), speed=0.5, exit_rule=rule)
    with pytest.raises(ValueError, match="exit_rule"):
        run(model, *random_batch(), speed=0.5, exit_rule="magic")


@pytest.mark.parametrize("rule", ["thresholds", "learned"])
def test_cross_fitting_measures_each_half_with_the_other_halfs_fit(rule):
    from hf_fastbert import FastBertConfig
    from hf_fastbert.analysis import cross_fitted_metrics
    from hf_fastbert.evaluation import accuracy_drop_standard_error, metrics_at_speeds

    config = FastBertConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=2, intermediate_size=64)
    generator = torch.Generator().manual_seed(0)
    half = torch.randn(40, 4, 3, generator=generator) * 3  # (N, L, C)
    lengths, labels = torch.randint(4, 30, (40,), generator=generator), torch.randint(0, 3, (40,), generator=generator)
    # Every sample twice in a row: the interleaved folds are the same 40 samples, so each fold's fit on the other is
    # the fit on `half`, and the pooled rows must be that fit measured on `half`.
    twice = [tensor.repeat_interleave(2, dim=0) for tensor in (half, lengths, labels)]
    speeds = [0.0, 0.3, 0.6, 0.9]
    pooled = cross_fitted_metrics(*twice, config, speeds, rule)

    in_sample = FastBertConfig.from_dict(config.to_dict())
    in_sample.exit_thresholds = calibrate_thresholds(half)
    in_sample.exit_heads = fit_exit_heads(half)
    expected = metrics_at_speeds(half, lengths, in_sample, speeds, labels, rule)
    for got, want in zip(pooled, expected, strict=True):
        # Every changed answer twice, and the drop's standard error from twice the samples.
        lost, gained = want.pop("answers_lost"), want.pop("answers_gained")
        assert (got.pop("answers_lost"), got.pop("answers_gained")) == (2 * lost, 2 * gained)
        se = 0.0 if want["speed"] == 0 else accuracy_drop_standard_error(2 * lost, 2 * gained, 80)
        assert got.pop("accuracy_drop_se") == pytest.approx(se) and want.pop("accuracy_drop_se") is not None
        assert got == pytest.approx(want)
    assert pooled[0]["mean_exit_layer"] == 4 and pooled[0]["flops_speedup"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="calibrated rules"):
        cross_fitted_metrics(*twice, config, speeds, "entropy")

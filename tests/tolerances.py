"""How closely two computations of the same model must agree, for tests that compare them.

Two computations of the same function (weights saved and reloaded, the stock model against the FastBERT engine, another
process, another batch) agree to float32 rounding, not bit for bit: which kernel runs, its summation order and its
vectorized tails depend on the CPU, the thread count and memory alignment. So they are compared within `LOGITS_ATOL`,
and their exit layers exactly where the decisions are clear of their thresholds by far more than that
(`assert_exits_clear` for the entropy rule, `assert_rule_clear` for any rule; `clear_speed` picks such a speed for a
trained model). Bit-for-bit equality is asserted only where it is a real property, and each such test says
why (the same call repeated, values selected from the same tensor, bytes copied by `save_pretrained`).
"""

import torch


# The tiny models' logits reach about 10 in magnitude, where float32 values are 1e-6 apart: two computations differ by
# a few of those steps (1.2e-6 seen on logits near 6 between a model in memory and its reload); a real bug (a wrong
# mask, a skipped layer) moves them by 1e-2 or more.
LOGITS_ATOL = 1e-5
# An exit decision compared exactly across two computations must not hinge on rounding.
EXIT_MARGIN = 1e-4


def assert_same_predictions(got, expected, atol=LOGITS_ATOL):
    """Same logits within `atol`, same exit layers."""
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=atol)
    assert got.exit_layers.tolist() == expected.exit_layers.tolist()


def student_uncertainties(model, input_ids, attention_mask):
    """(B, L - 1) every student's uncertainty (the entropy rule's measure) on the batch."""
    with torch.no_grad():
        all_logits = model(input_ids=input_ids, attention_mask=attention_mask, output_all_logits=True).all_logits
    return model.uncertainty(all_logits[:, :-1].float())


def assert_exits_clear(model, input_ids, attention_mask, speed, margin=EXIT_MARGIN):
    """Under the entropy rule at `speed`, every student's uncertainty is at least `margin` away from the threshold, so
    that two computations agreeing within `LOGITS_ATOL` take the same exits."""
    uncertainties = student_uncertainties(model, input_ids, attention_mask)
    closest = (uncertainties - speed).abs().min().item()
    assert closest > margin, f"an uncertainty lies {closest:.2e} from speed {speed}: pick inputs clear of it"


def clear_speed(model, input_ids, attention_mask, near, margin=EXIT_MARGIN):
    """The speed nearest `near` (on a 0.01 grid) at which every student's uncertainty is at least `margin` away, for
    a model whose uncertainties a test cannot know in advance (a trained one): see [`assert_exits_clear`]."""
    uncertainties = student_uncertainties(model, input_ids, attention_mask)
    for step in range(50):
        for speed in dict.fromkeys((near + step / 100, near - step / 100)):  # `near` itself once
            if 0 < speed <= 1 and (uncertainties - speed).abs().min().item() > margin:
                return round(speed, 2)
    raise AssertionError(f"no speed near {near} is clear of the students' uncertainties by {margin}")


def assert_rule_clear(all_logits, speed, config, rule, margin=EXIT_MARGIN, draws=16):
    """Under any exit rule: moving every logit by up to `margin` (random draws) changes no exit, so that two
    computations agreeing within `LOGITS_ATOL` take the same exits under `rule` at `speed`."""
    from hf_fastbert.exit_rules import select_exits

    _, expected = select_exits(all_logits, speed, config, rule)
    generator = torch.Generator().manual_seed(0)
    for _ in range(draws):
        noise = (torch.rand(all_logits.shape, generator=generator) * 2 - 1) * margin
        _, exits = select_exits(all_logits + noise, speed, config, rule)
        assert exits.tolist() == expected.tolist(), f"{rule} at speed {speed}: an exit hinges on rounding"

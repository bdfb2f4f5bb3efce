"""`model.compile()`: the early-exit engine with compiled layers and students gives the same answers, and a bounded
number of graphs although the batch shrinks and the padding columns are trimmed from layer to layer."""

import pytest
import torch
from tiny_models import family_model, random_batch


CALLS = [  # (batch size, padded length, speed, padded): batch 1 and larger, with and without padding, nobody / some /
    # everybody leaving early
    (8, 12, 0.5, True),
    (1, 7, 0.6, True),
    (5, 10, 0.0, True),
    (6, 9, 0.95, True),
    (4, 14, 0.2, True),
    (3, 11, 0.5, False),
    (1, 6, 0.5, False),
    (2, 8, 0.0, False),
    (1, 9, 0.0, False),
]


@pytest.fixture
def dynamo_counters():
    """A frame compiled more than 16 times is an error instead of a silent fallback to eager mode. (Dynamo's default
    limit is 8: enough for BERT-style layers; ModernBERT's and ALBERT's take a few more variants, see `compile`.)"""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=16):
        yield torch._dynamo.utils.counters
    torch._dynamo.reset()


@pytest.mark.parametrize("family", ["bert", "modernbert"])  # uniform layers; alternating ones
def test_compiled_model_gives_the_same_exits_with_a_bounded_number_of_graphs(family, dynamo_counters):
    # More layers than Dynamo's recompile limit: one graph per layer would fail here.
    model = family_model(family, num_hidden_layers=10).eval()
    reference = family_model(family, num_hidden_layers=10).eval()
    # backend="eager": Dynamo's tracing, guards and recompilations as with the default backend, without inductor's
    # minutes of C++ code generation (benchmarks/bench_quantized.py --compile measures inductor).
    assert model.compile(backend="eager") is model

    def call(batch_size, length, speed, padded, seed):
        input_ids, attention_mask = random_batch(batch_size, length, seed=seed, min_length=2 if padded else length)
        with torch.no_grad():
            got = model(input_ids=input_ids, attention_mask=attention_mask, speed=speed)
            expected = reference(input_ids=input_ids, attention_mask=attention_mask, speed=speed)
        assert got.exit_layers.tolist() == expected.exit_layers.tolist()
        torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=1e-5)
        return got.exit_layers

    exits = torch.cat([call(*shape, seed=index) for index, shape in enumerate(CALLS)])
    assert len(set(exits.tolist())) >= 3  # early, middle and full-depth exits: the engine's paths were compiled
    # More batch sizes, lengths and speeds: the graphs stop growing (shapes are symbolic, not specialized), and no
    # frame passed the recompile limit (the fixture makes that an error).
    counts = []
    for round_ in (1, 2):
        for index, (batch_size, length, speed, padded) in enumerate(CALLS):
            new_size = batch_size if batch_size == 1 else batch_size + 3 * round_
            call(
                new_size, length + 5 * round_, min(speed * 0.9 + 0.05 * round_, 1.0), padded, seed=100 * round_ + index
            )
        counts.append(dynamo_counters["stats"]["unique_graphs"])
    assert counts[0] == counts[1] <= 30  # shared by the 10 layers, and by the 9 students


def test_compile_without_a_cpp_compiler_is_a_clear_error(monkeypatch):
    from torch._inductor import config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, "no-such-compiler++"))
    model = family_model("bert")
    with pytest.raises(RuntimeError, match="no-such-compiler"):
        model.compile()
    model.compile(backend="eager")  # needs no compiler

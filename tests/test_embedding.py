"""FastBERT sentence embeddings: speed 0 is the stock embedding, the engine's exits match the rule applied to every
layer's embedding, batch invariance, exact FLOPs, loading and the bad inputs, for every family on tiny models."""

import json

import pytest
import torch
import torch.nn.functional as F
from tiny_models import FAMILIES, family_config, random_batch
from tolerances import EXIT_MARGIN, LOGITS_ATOL
from transformers import AutoModel

from hf_fastbert import FASTBERT_MODELS, FastBertForSentenceEmbedding
from hf_fastbert.distillation import embedding_distillation_loss
from hf_fastbert.flops import embedding_flops
from hf_fastbert.modeling_fastbert_embedding import (
    FASTBERT_EMBEDDING_MODELS,
    embedding_uncertainty,
    pool_tokens,
    select_embedding_exits,
)


def embedder(family="bert", seed=0, distilled=True, **overrides):
    """
    A tiny embedding model of `family` in eval mode whose heads are one random head plus noise, so that consecutive
    layers' embeddings are close, by an amount that varies with the sample (`mixing_speeds` finds speeds at which
    samples leave at several layers).
    """
    torch.manual_seed(seed)
    config = family_config(family, embedding_heads_distilled=distilled, **overrides)
    return settle_heads(FASTBERT_EMBEDDING_MODELS[type(config)](config).eval())


def settle_heads(model):
    """Make every head the first one plus noise (see `embedder`)."""
    with torch.no_grad():
        for head in model.embedding_heads[1:]:
            for parameter, first in zip(head.parameters(), model.embedding_heads[0].parameters(), strict=True):
                parameter.copy_(first + 0.3 * first.std() * torch.randn_like(first))
    return model


def run(model, input_ids, attention_mask=None, **kwargs):
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def stock_embedding(model, input_ids, attention_mask, mode="mean"):
    """What sentence-transformers computes: the base model, pooling, normalization."""
    with torch.no_grad():
        states = model.backbone.base_model(model)(input_ids=input_ids, attention_mask=attention_mask)[0]
    return F.normalize(pool_tokens(states, attention_mask, mode), dim=-1)


def test_pool_tokens_matches_sentence_transformers_formulas():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, -4.0], [100.0, 100.0]]])  # (1, 3, 2), the last token is padding
    mask = torch.tensor([[1, 1, 0]])
    assert pool_tokens(hidden, mask, "mean").tolist() == [[2.0, -1.0]]
    assert pool_tokens(hidden, mask, "cls").tolist() == [[1.0, 2.0]]
    assert pool_tokens(hidden, mask, "max").tolist() == [[3.0, 2.0]]


def test_select_embedding_exits_takes_the_first_settled_layer():
    # Layers 1 .. 4 of one sample.
    e = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [0.0, 1.0]]), dim=-1)
    all_embeddings = e[None]  # (1, 4, 2)
    settled = 1 - F.cosine_similarity(e[2], e[1], dim=0).item()  # layer 3 against layer 2: about 0.005
    embeddings, exit_layers = select_embedding_exits(all_embeddings, speed=settled * 2)
    assert exit_layers.tolist() == [3] and torch.equal(embeddings[0], e[2])  # layer 2 moved by 1 from layer 1
    assert select_embedding_exits(all_embeddings, speed=settled / 2)[1].tolist() == [4]
    assert select_embedding_exits(all_embeddings, speed=0.0)[1].tolist() == [4]
    assert select_embedding_exits(all_embeddings, speed=1.0)[1].tolist() == [3]  # layer 1 never leaves (cos 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_speed_zero_is_the_stock_embedding(family):
    model = embedder(family)
    input_ids, attention_mask = random_batch()
    expected = stock_embedding(model, input_ids, attention_mask)
    output = run(model, input_ids, attention_mask)
    torch.testing.assert_close(output.embeddings, expected, rtol=0, atol=LOGITS_ATOL)
    assert output.exit_layers.eq(4).all()
    layers_only = embedding_flops(model.config, attention_mask.sum(1), output.exit_layers, heads_ran=False)
    assert output.flops.tolist() == layers_only.tolist()
    # The engine's full-depth pass ends with the same embedding.
    full = run(model, input_ids, attention_mask, output_all_embeddings=True)
    torch.testing.assert_close(full.all_embeddings[:, -1], expected, rtol=0, atol=LOGITS_ATOL)
    assert full.all_embeddings.shape == (8, 4, 32)


def mixing_speeds(model, input_ids, attention_mask):
    """Speeds that send samples out at several layers: each halfway between two of the samples' uncertainties at layer
    2, and at least `EXIT_MARGIN` from every uncertainty the rule reads (so that two computations agreeing to rounding
    take the same exits)."""
    all_embeddings = run(model, input_ids, attention_mask, output_all_embeddings=True).all_embeddings
    uncertainties = embedding_uncertainty(all_embeddings[:, 1:-1], all_embeddings[:, :-2])  # (B, L - 2): layers 2..
    at_layer_2 = uncertainties[:, 0].sort().values
    middles = ((at_layer_2[1:] + at_layer_2[:-1]) / 2).tolist()
    clear = [speed for speed in middles if 0 < speed <= 1 and (uncertainties - speed).abs().min() > EXIT_MARGIN]
    return [clear[int(q * (len(clear) - 1))] for q in (0.25, 0.5, 0.75)] if clear else []


@pytest.mark.parametrize("family", FAMILIES)
def test_exits_are_the_rule_applied_to_every_layer(family):
    model = embedder(family)
    input_ids, attention_mask = random_batch(batch_size=16, seed=1)
    full = run(model, input_ids, attention_mask, output_all_embeddings=True)
    speeds = mixing_speeds(model, input_ids, attention_mask)
    seen = set()
    for speed in speeds:
        expected, expected_layers = select_embedding_exits(full.all_embeddings, speed)
        output = run(model, input_ids, attention_mask, speed=speed)
        assert output.exit_layers.tolist() == expected_layers.tolist()
        torch.testing.assert_close(output.embeddings, expected, rtol=0, atol=1e-5)
        heads_flops = embedding_flops(model.config, attention_mask.sum(1), output.exit_layers)
        assert output.flops.tolist() == heads_flops.tolist()
        seen |= set(output.exit_layers.tolist())
        assert output.exit_layers.ge(2).all(), "layer 1 has nothing to compare with: no sample leaves there"
    assert len(seen) > 1, "the test needs a mix of exit layers"


@pytest.mark.parametrize("family", ["bert", "modernbert", "deberta-v2"])
def test_batch_invariance(family):
    model = embedder(family)
    input_ids, attention_mask = random_batch(batch_size=10, seed=2)
    speed = mixing_speeds(model, input_ids, attention_mask)[1]
    batch = run(model, input_ids, attention_mask, speed=speed)
    assert len(set(batch.exit_layers.tolist())) > 1, "the test needs a mix of exit layers"
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    permuted = run(model, input_ids[order], attention_mask[order], speed=speed)
    assert permuted.exit_layers.tolist() == batch.exit_layers[order].tolist()
    torch.testing.assert_close(permuted.embeddings, batch.embeddings[order], rtol=0, atol=1e-5)
    for row in (0, 3, 7):
        length = int(attention_mask[row].sum())
        alone = run(model, input_ids[row : row + 1, :length], attention_mask[row : row + 1, :length], speed=speed)
        assert alone.exit_layers.tolist() == batch.exit_layers[row : row + 1].tolist()
        assert alone.flops.tolist() == batch.flops[row : row + 1].tolist()
        torch.testing.assert_close(alone.embeddings, batch.embeddings[row : row + 1], rtol=0, atol=1e-5)


def test_training_mode_returns_the_distillation_loss_and_trains_the_heads_only_through_them():
    model = embedder().train()
    input_ids, attention_mask = random_batch()
    output = model(input_ids=input_ids, attention_mask=attention_mask)
    assert output.loss is not None and output.all_embeddings is None
    full = model(input_ids=input_ids, attention_mask=attention_mask, output_all_embeddings=True)
    torch.testing.assert_close(full.loss, embedding_distillation_loss(full.all_embeddings)[0])
    model.backbone.base_model(model).requires_grad_(False)  # as the trainer freezes it
    model(input_ids=input_ids, attention_mask=attention_mask).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.embedding_heads.parameters())


def test_embedding_distillation_loss():
    target = F.normalize(torch.randn(3, 8), dim=-1)
    same = torch.stack([target, 2 * target, target], dim=1)  # heads already agree (any scale)
    loss, per_head = embedding_distillation_loss(same)
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and per_head.shape == (2,)
    opposite = torch.stack([-target, target], dim=1)
    assert embedding_distillation_loss(opposite)[0].item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="all_embeddings"):
        embedding_distillation_loss(target)
    assert embedding_uncertainty(target, target).abs().max().item() < 1e-6


def test_undistilled_heads_refuse_to_exit():
    model = embedder(distilled=False)
    input_ids, attention_mask = random_batch()
    with pytest.raises(ValueError, match="never distilled"):
        run(model, input_ids, attention_mask, speed=0.2)
    assert run(model, input_ids, attention_mask).exit_layers.eq(4).all()  # speed 0 works: the stock embedding


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "modernbert"])
def test_loads_stock_and_classifier_checkpoints_and_round_trips(family, tmp_path):
    torch.manual_seed(0)
    stock = AutoModel.from_config(family_config(family, fastbert=False)).eval()
    stock.save_pretrained(tmp_path / "stock")
    model = FastBertForSentenceEmbedding.from_pretrained(tmp_path / "stock").eval()
    assert type(model) is FASTBERT_EMBEDDING_MODELS[type(model.config)]
    input_ids, attention_mask = random_batch()
    with torch.no_grad():
        states = stock(input_ids=input_ids, attention_mask=attention_mask)[0]
    expected = F.normalize(pool_tokens(states, attention_mask, "mean"), dim=-1)
    torch.testing.assert_close(run(model, input_ids, attention_mask).embeddings, expected, rtol=0, atol=LOGITS_ATOL)
    # A FastBERT classifier's backbone, without its heads.
    config = family_config(family)
    classifier = FASTBERT_MODELS[type(config)](config).eval()
    classifier.save_pretrained(tmp_path / "classifier")
    from_classifier = FastBertForSentenceEmbedding.from_pretrained(tmp_path / "classifier").eval()
    with torch.no_grad():
        states = classifier.backbone.base_model(classifier)(input_ids=input_ids, attention_mask=attention_mask)[0]
    expected = F.normalize(pool_tokens(states, attention_mask, "mean"), dim=-1)
    got = run(from_classifier, input_ids, attention_mask).embeddings
    torch.testing.assert_close(got, expected, rtol=0, atol=LOGITS_ATOL)
    # Save and load: heads and settings come back (the same weights; a reloaded model agrees to rounding).
    settle_heads(model).config.embedding_heads_distilled = True
    model.save_pretrained(tmp_path / "fastbert")
    again = FastBertForSentenceEmbedding.from_pretrained(tmp_path / "fastbert").eval()
    assert again.config.embedding_heads_distilled
    speed = mixing_speeds(model, input_ids, attention_mask)[1]
    got, expected = (run(m, input_ids, attention_mask, speed=speed) for m in (again, model))
    torch.testing.assert_close(got.embeddings, expected.embeddings, rtol=0, atol=LOGITS_ATOL)
    assert got.exit_layers.tolist() == expected.exit_layers.tolist()


def write_sentence_transformers_files(folder, mode="cls", normalize=False):
    types = ["base.modules.Transformer", "sentence_transformer.modules.Pooling", "base.modules.Normalize"]
    paths = ["", "1_Pooling", "2_Normalize"]
    modules = [
        {"idx": index, "name": str(index), "path": path, "type": f"sentence_transformers.{kind}"}
        for index, (kind, path) in enumerate(zip(types, paths, strict=True))
    ][: 3 if normalize else 2]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    flags = {f"pooling_mode_{name}": name == {"cls": "cls_token", "mean": "mean_tokens", "max": "max_tokens"}[mode]
             for name in ("cls_token", "mean_tokens", "max_tokens")}  # fmt: skip
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **flags}))


def test_pooling_is_read_from_sentence_transformers_files(tmp_path):
    torch.manual_seed(0)
    stock = AutoModel.from_config(family_config("bert", fastbert=False)).eval()
    stock.save_pretrained(tmp_path)
    write_sentence_transformers_files(tmp_path, mode="cls", normalize=False)
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 48}))
    model = FastBertForSentenceEmbedding.from_pretrained(tmp_path).eval()
    assert model.config.embedding_pooling == "cls" and model.config.normalize_embeddings is False
    assert model.config.embedding_max_length == 48
    input_ids, attention_mask = random_batch()
    with torch.no_grad():
        expected = stock(input_ids=input_ids, attention_mask=attention_mask)[0][:, 0]
    torch.testing.assert_close(run(model, input_ids, attention_mask).embeddings, expected, rtol=0, atol=LOGITS_ATOL)


def test_pooling_files_that_disagree_with_the_config_are_refused(tmp_path):
    model = embedder()
    model.config.embedding_pooling = "mean"
    model.save_pretrained(tmp_path)
    write_sentence_transformers_files(tmp_path, mode="cls", normalize=True)
    with pytest.raises(ValueError, match="embedding_pooling='mean'.*'cls'"):
        FastBertForSentenceEmbedding.from_pretrained(tmp_path)


def test_bad_pooling_setting_is_refused():
    with pytest.raises(ValueError, match="embedding_pooling"):
        family_config("bert", embedding_pooling="weightedmean")


def test_a_checkpoint_claiming_distilled_heads_without_them_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    embedder().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    kept = {name: value for name, value in weights.items() if not name.startswith("embedding_heads.")}
    save_file(kept, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="holds no head weights"):
        FastBertForSentenceEmbedding.from_pretrained(tmp_path)

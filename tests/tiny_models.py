"""Tiny models built in code, shared by the tests."""

import torch

from hf_fastbert import FastBertConfig, FastBertForSequenceClassification


VOCAB_SIZE = 99


def tiny_config(**overrides) -> FastBertConfig:
    settings = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=3,
        branch_hidden_size=16,
    )
    settings.update(overrides)
    return FastBertConfig(**settings)


def spread_branches(model: FastBertForSequenceClassification, seed: int = 0) -> FastBertForSequenceClassification:
    """Give the (untrained) students weights whose uncertainties spread over [0, 1], so that samples exit early."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.branches.modules():
            if isinstance(module, torch.nn.Linear):
                weight = torch.randn(module.weight.shape, generator=generator)
                module.weight.copy_(weight * 2 / module.in_features**0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.5)
    return model


def tiny_model(seed: int = 0, **overrides) -> FastBertForSequenceClassification:
    torch.manual_seed(seed)
    return spread_branches(FastBertForSequenceClassification(tiny_config(**overrides)), seed).eval()


def random_batch(batch_size: int = 8, seq_length: int = 12, seed: int = 0, min_length: int = 2):
    """Right-padded input_ids and attention_mask with random real lengths; the first token plays [CLS]."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB_SIZE, (batch_size, seq_length), generator=generator)
    lengths = torch.randint(min_length, seq_length + 1, (batch_size,), generator=generator)
    attention_mask = (torch.arange(seq_length)[None, :] < lengths[:, None]).long()
    input_ids[:, 0] = 2
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    return input_ids, attention_mask


def sentiment_fastbert(words: list[str]):
    """
    A seeded 4-layer FastBERT (labels negative/positive, default speed 0.3) and a tokenizer over `words`; the students
    get large random weights so that samples exit early. Returns `(model, tokenizer)`.
    """
    from transformers import BertTokenizerFast

    vocab = {token: index for index, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words)}
    tokenizer = BertTokenizerFast(vocab=vocab)
    torch.manual_seed(0)
    config = FastBertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=37,
        branch_hidden_size=16,
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
        speed=0.3,
    )
    model = FastBertForSequenceClassification(config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.branches.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.6)
    return model, tokenizer

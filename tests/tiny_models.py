"""Tiny models built in code, shared by the tests."""

import torch
from transformers import (
    AlbertConfig,
    BertConfig,
    DebertaV2Config,
    DistilBertConfig,
    ElectraConfig,
    ModernBertConfig,
    RobertaConfig,
    XLMRobertaConfig,
)

from hf_fastbert import FASTBERT_CONFIGS, FastBertConfig, FastBertForSequenceClassification


VOCAB_SIZE = 99

# Tiny settings of every supported family, in each family's own parameter names: 4 layers, hidden 32, 4 heads.
FAMILY_SETTINGS = {
    "bert": (BertConfig, {}),
    "roberta": (RobertaConfig, {"pad_token_id": 1, "max_position_embeddings": 66}),
    "xlm-roberta": (XLMRobertaConfig, {"pad_token_id": 1, "max_position_embeddings": 66}),
    "electra": (ElectraConfig, {"embedding_size": 16}),
    "distilbert": (
        DistilBertConfig,
        {"dim": 32, "n_layers": 4, "n_heads": 4, "hidden_dim": 37, "pad_token_id": 0},
    ),
    "albert": (AlbertConfig, {"embedding_size": 16, "num_hidden_groups": 2, "inner_group_num": 2}),
    "deberta-v2": (
        DebertaV2Config,
        {
            "relative_attention": True,
            "position_buckets": 8,
            "max_relative_positions": 64,
            "pos_att_type": ["p2c", "c2p"],
            "position_biased_input": False,
            "norm_rel_ebd": "layer_norm",
            "share_att_key": True,
            "conv_kernel_size": 3,
            "type_vocab_size": 2,
        },
    ),
    "modernbert": (
        ModernBertConfig,
        {
            "global_attn_every_n_layers": 2,
            "local_attention": 8,
            "classifier_pooling": "mean",
            **{"pad_token_id": 0, "bos_token_id": 2, "cls_token_id": 2, "eos_token_id": 3, "sep_token_id": 3},
        },
    ),
}
FAMILIES = list(FAMILY_SETTINGS)


def family_config(family: str, fastbert: bool = True, **overrides):
    """A tiny config of `family`: the stock one (`fastbert=False`) or the FastBERT one."""
    stock_class, settings = FAMILY_SETTINGS[family]
    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=3,
    )
    if family == "distilbert":
        common = dict(vocab_size=VOCAB_SIZE, max_position_embeddings=64, num_labels=3)
    config_class = FASTBERT_CONFIGS[family] if fastbert else stock_class
    if fastbert:
        common["branch_hidden_size"] = 16
    return config_class(**{**common, **settings, **overrides})


def tiny_config(**overrides) -> FastBertConfig:
    return family_config("bert", **overrides)


def spread_branches(model, seed: int = 0):
    """Give the (untrained) students weights whose uncertainties spread over [0, 1], so that samples exit early."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.branches.modules():
            if isinstance(module, torch.nn.Linear):
                weight = torch.randn(module.weight.shape, generator=generator)
                module.weight.copy_(weight * 2 / module.in_features**0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.5)
    return model


def family_model(family: str, seed: int = 0, **overrides):
    """A tiny FastBERT model of `family` in eval mode, with students that exit early."""
    from hf_fastbert import FASTBERT_MODELS

    torch.manual_seed(seed)
    config = family_config(family, **overrides)
    return spread_branches(FASTBERT_MODELS[type(config)](config), seed).eval()


def tiny_model(seed: int = 0, **overrides) -> FastBertForSequenceClassification:
    return family_model("bert", seed, **overrides)


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

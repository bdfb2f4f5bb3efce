"""Analytic FLOPs of FastBERT inference, per sample, for every backbone family.

Counts matrix-multiply work only, at 2 FLOPs per multiply-add: the convention of the FastBERT paper (a BERT-base layer
at length 128 is about 1.8 GFLOPs) and of `torch.utils.flop_counter.FlopCounterMode`. Element-wise work (embedding
sums, LayerNorm, softmax, GELU, biases) is a fraction of a percent and is not counted; embedding lookups cost no FLOPs.
All functions take the sample's real token length, so padding never inflates a count. What each family's layers and
head cost is declared beside the family (`backbones.py`).
"""

import torch

from .backbones import get_backbone


def layer_flops(config, seq_lengths: torch.Tensor) -> torch.Tensor:
    """FLOPs of one encoder layer of `config`'s family. `seq_lengths`: (B,) token counts -> (B,) int64."""
    return get_backbone(config).layer_flops(config, seq_lengths.long())


def branch_flops(config, seq_lengths: torch.Tensor) -> torch.Tensor:
    """
    FLOPs of one FastBERT student classifier: its input projection over every token, then per head one score and one
    weighted sum per token (keys and values folded into the first token's query, see `FastBertBranch`), and the
    first token's projections. (B,) -> (B,) int64.
    """
    n, h, w, c = seq_lengths.long(), config.hidden_size, config.branch_hidden_size, config.num_labels
    heads = config.branch_num_attention_heads
    input_projection = 2 * n * h * w
    attention = 2 * n * heads * w * 2  # scores against the folded query, weighted mean of the inputs
    first_token = 2 * w * w * 5  # query, folding the key and value weights, attention output, dense
    return input_projection + attention + first_token + 2 * w * c


def teacher_flops(config, seq_lengths: torch.Tensor) -> torch.Tensor:
    """FLOPs of the teacher classifier on the last layer. (B,) -> (B,) int64."""
    if config.teacher_head == "branch":
        return branch_flops(config, seq_lengths)
    return get_backbone(config).teacher_flops(config, seq_lengths.long())


def fastbert_flops(config, seq_lengths: torch.Tensor, exit_layers: torch.Tensor, branches_ran: bool = True):
    """
    FLOPs that FastBERT inference spent on each sample.

    Args:
        config: a FastBERT config of any family.
        seq_lengths: (B,) real token counts (the attention mask's row sums).
        exit_layers: (B,) 1-based exit layers; `config.num_hidden_layers` for samples answered by the teacher.
        branches_ran: whether the student classifiers were evaluated (False at speed 0).

    Returns:
        (B,) int64 tensor of FLOPs.
    """
    backbone, n = get_backbone(config), seq_lengths.long()
    num_layers = config.num_hidden_layers
    exit_layers = exit_layers.long()
    flops = backbone.fixed_flops(config, n) + exit_layers * backbone.layer_flops(config, n)
    if branches_ran:
        flops = flops + exit_layers.clamp(max=num_layers - 1) * branch_flops(config, n)
    return flops + (exit_layers == num_layers) * teacher_flops(config, n)


def stock_flops(config, seq_lengths: torch.Tensor) -> torch.Tensor:
    """
    FLOPs of the family's stock classifier (`<Family>ForSequenceClassification`, same backbone): the speed-up
    baseline. (B,) -> (B,).
    """
    backbone, n = get_backbone(config), seq_lengths.long()
    head = backbone.teacher_flops(config, n)
    return backbone.fixed_flops(config, n) + config.num_hidden_layers * backbone.layer_flops(config, n) + head


def embedding_head_flops(config, seq_lengths: torch.Tensor) -> torch.Tensor:
    """
    FLOPs of one sentence-embedding head ([`FastBertEmbeddingHead`]): per learned query a score and a weighted sum
    per token, then the output projection of the pooled vectors and the mean. (B,) -> (B,) int64.
    """
    n, h, q = seq_lengths.long(), config.hidden_size, config.embedding_head_queries
    return 2 * n * h * q * 2 + 2 * (q + 1) * h * h


def embedding_flops(config, seq_lengths: torch.Tensor, exit_layers: torch.Tensor, heads_ran: bool = True):
    """
    FLOPs that a FastBERT sentence embedding model spent on each sample: the layers it ran and, when the heads ran,
    one head per layer before its exit (none after the last layer: pooling costs no matrix multiply). Arguments and
    result as [`fastbert_flops`].
    """
    backbone, n = get_backbone(config), seq_lengths.long()
    exit_layers = exit_layers.long()
    flops = backbone.fixed_flops(config, n) + exit_layers * backbone.layer_flops(config, n)
    if heads_ran:
        flops = flops + exit_layers.clamp(max=config.num_hidden_layers - 1) * embedding_head_flops(config, n)
    return flops


# hf-fastbert 0.1 name, from when BERT was the only family.
bert_flops = stock_flops

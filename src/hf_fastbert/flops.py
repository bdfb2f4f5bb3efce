"""Analytic FLOPs of FastBERT inference, per sample.

Counts matrix-multiply work only, at 2 FLOPs per multiply-add: the convention of the FastBERT paper (a BERT-base layer
at length 128 is about 1.8 GFLOPs) and of `torch.utils.flop_counter.FlopCounterMode`. Element-wise work (embedding
sums, LayerNorm, softmax, GELU, biases) is a fraction of a percent and is not counted; embedding lookups cost no FLOPs.
All functions take the sample's real token length, so padding never inflates a count.
"""

import torch


def layer_flops(config, seq_lengths: torch.Tensor) -> torch.Tensor:
    """FLOPs of one BERT encoder layer. `seq_lengths`: (B,) token counts -> (B,) int64."""
    n, h, i = seq_lengths.long(), config.hidden_size, config.intermediate_size
    projections = 2 * n * h * h * 4  # query, key, value, output
    attention = 2 * n * n * h * 2  # scores and weighted sum, all heads together
    feed_forward = 2 * n * h * i * 2
    return projections + attention + feed_forward


def branch_flops(config, seq_lengths: torch.Tensor) -> torch.Tensor:
    """FLOPs of one FastBERT student classifier (only the first token's query is needed). (B,) -> (B,) int64."""
    n, h, w, c = seq_lengths.long(), config.hidden_size, config.branch_hidden_size, config.num_labels
    down_projection = 2 * n * h * w
    keys_values = 2 * n * w * w * 2
    first_token = 2 * w * w * 3  # its query, the attention output projection, the dense layer
    attention = 2 * n * w * 2
    return down_projection + keys_values + first_token + attention + 2 * w * c


def teacher_flops(config, seq_lengths: torch.Tensor) -> torch.Tensor:
    """FLOPs of the teacher classifier on the last layer. (B,) -> (B,) int64."""
    if config.teacher_head == "branch":
        return branch_flops(config, seq_lengths)
    h, c = config.hidden_size, config.num_labels
    return torch.full_like(seq_lengths.long(), 2 * h * h + 2 * h * c)  # pooler + classifier


def fastbert_flops(config, seq_lengths: torch.Tensor, exit_layers: torch.Tensor, branches_ran: bool = True):
    """
    FLOPs that FastBERT inference spent on each sample.

    Args:
        config: a `FastBertConfig`.
        seq_lengths: (B,) real token counts (the attention mask's row sums).
        exit_layers: (B,) 1-based exit layers; `config.num_hidden_layers` for samples answered by the teacher.
        branches_ran: whether the student classifiers were evaluated (False at speed 0).

    Returns:
        (B,) int64 tensor of FLOPs.
    """
    num_layers = config.num_hidden_layers
    exit_layers = exit_layers.long()
    flops = exit_layers * layer_flops(config, seq_lengths)
    if branches_ran:
        flops = flops + exit_layers.clamp(max=num_layers - 1) * branch_flops(config, seq_lengths)
    return flops + (exit_layers == num_layers) * teacher_flops(config, seq_lengths)


def bert_flops(config, seq_lengths: torch.Tensor) -> torch.Tensor:
    """FLOPs of `BertForSequenceClassification` with the same backbone: the speed-up baseline. (B,) -> (B,)."""
    h, c = config.hidden_size, config.num_labels
    return config.num_hidden_layers * layer_flops(config, seq_lengths) + 2 * h * h + 2 * h * c

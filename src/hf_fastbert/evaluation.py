"""Accuracy, exit layers and FLOPs speed-up of FastBERT at many speeds from one full-depth pass.

Exit decisions are a pure function of every classifier's logits: one forward pass with `output_all_logits=True` gives
the prediction, exit layer and FLOPs of every sample at every speed, exactly as the early-exit engine would compute
them. These helpers turn such a pass into metrics.
"""

import logging
import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .configuration_fastbert import validate_speeds
from .constants import DEFAULT_SPEEDS
from .distillation import branch_kl
from .exit_rules import check_exit_rule, select_exits
from .flops import embedding_flops, fastbert_flops, stock_flops
from .modeling_fastbert_embedding import select_embedding_exits
from .prediction import collate


logger = logging.getLogger(__name__)

# Students of the upper half of the layers that agree with the teacher on fewer samples than this failed to learn it.
MIN_STUDENT_AGREEMENT = 0.9


def _as_tensor(values) -> torch.Tensor:
    return values if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values))


def embedding_quality(queries, corpus, labels=None, neighbours: int = 10) -> dict:
    """
    How well (N, D) `queries` stand in for the (N, D) `corpus` embeddings of the same texts (full depth) in a search
    of the corpus, each text's own entry excluded: `cosine` (mean cosine of each query to its own corpus embedding),
    `overlap` (share of the `neighbours` nearest corpus entries that the corpus embedding also finds) and, with (N,)
    `labels`, `precision` (share of them with the text's label; else `None`).
    """
    return _EmbeddingSearch(corpus, labels, neighbours).quality(queries)


class _EmbeddingSearch:
    """A search of a corpus of N embeddings by cosine, each text's own entry excluded, with its reference answers."""

    def __init__(self, corpus, labels, neighbours: int):
        self.corpus = _unit_vectors(corpus)  # (N, D)
        self.labels = None if labels is None else torch.as_tensor(np.asarray(labels))
        self.k = min(neighbours, len(self.corpus) - 1)
        self.reference = self.nearest(self.corpus)  # (N, k) what the corpus embeddings themselves find

    def nearest(self, queries: torch.Tensor) -> torch.Tensor:
        """(N, D) unit queries -> (N, k) indices of their nearest corpus entries."""
        similarities = queries @ self.corpus.T  # (N, N)
        similarities.fill_diagonal_(-float("inf"))
        return similarities.topk(self.k, dim=1).indices

    def quality(self, queries) -> dict:
        """`embedding_quality`'s metrics of (N, D) `queries`."""
        queries, k, labels = _unit_vectors(queries), self.k, self.labels
        found = self.nearest(queries)
        return {
            "cosine": float((queries * self.corpus).sum(dim=1).mean()),
            "overlap": float((found[:, :, None] == self.reference[:, None, :]).any(dim=2).float().mean())
            if k
            else 1.0,
            "precision": None if labels is None or not k else float((labels[found] == labels[:, None]).float().mean()),
        }


def _unit_vectors(vectors) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.as_tensor(np.asarray(vectors)).float(), dim=-1)


def embedding_metrics_at_speeds(
    all_embeddings, seq_lengths, config, speeds: Iterable[float], labels=None, neighbours: int = 10
) -> list[dict]:
    """
    Quality and cost of a sentence embedding model at each speed, from one full-depth pass over a set of texts that
    serve as queries and as the corpus (indexed at full depth, as an existing index is).

    Args:
        all_embeddings (`(N, L, D)`): every head's embedding, then the final one (`output_all_embeddings=True`).
        seq_lengths (`(N,)`): real token counts.
        config: the model's config.
        speeds: speeds in [0, 1].
        labels (`(N,)`, *optional*): classes, for same-class precision (used only here).
        neighbours (`int`, defaults to 10): the k of overlap@k and precision@k.

    Returns:
        `list[dict]`, one per speed: `speed`, `cosine` (mean cosine of each query's embedding to its full-depth
        one), `overlap` (share of the k nearest neighbours in the corpus, the query itself excluded, that full depth
        also finds), `precision` (share of them with the query's label; `None` without labels), `mean_exit_layer` and
        `flops_speedup` (full-depth FLOPs over the FLOPs spent, summed over the texts).
    """
    all_embeddings = torch.as_tensor(np.asarray(all_embeddings)).float()
    seq_lengths = torch.as_tensor(np.asarray(seq_lengths)).long()
    search = _EmbeddingSearch(all_embeddings[:, -1], labels, neighbours)  # the full-depth index, searched once
    num_layers = all_embeddings.shape[1]
    full_flops = embedding_flops(config, seq_lengths, torch.full_like(seq_lengths, num_layers), heads_ran=False)
    rows = []
    for speed in validate_speeds(list(speeds)):
        embeddings, exit_layers = select_embedding_exits(all_embeddings, speed)
        flops = embedding_flops(config, seq_lengths, exit_layers, heads_ran=speed > 0)
        rows.append(
            {
                "speed": speed,
                **search.quality(embeddings),
                "mean_exit_layer": float(exit_layers.float().mean()),
                "flops_speedup": float(full_flops.sum() / flops.sum()),
            }
        )
    return rows


def metrics_at_speeds(
    all_logits, seq_lengths, config, speeds: Iterable[float] = DEFAULT_SPEEDS, labels=None, exit_rule=None
) -> list[dict]:
    """
    Accuracy, mean exit layer and FLOPs speed-up at each speed, from one full-depth pass.

    Args:
        all_logits (`torch.Tensor` or `np.ndarray` of shape `(N, L, C)`):
            Logits of every classifier, students first then the teacher (`output_all_logits=True`).
        seq_lengths (`torch.Tensor` or `np.ndarray` of shape `(N,)`):
            Real token count of each sample (the attention mask's row sums); FLOPs grow with it.
        config ([`FastBertConfig`]):
            The model's config (layer sizes for FLOPs, `uncertainty_top_k` for the exit rule).
        speeds (`Iterable[float]`, *optional*, defaults to 0.0, 0.1, ..., 0.9):
            Speeds to report, each in [0, 1].
        labels (`torch.Tensor` or `np.ndarray` of shape `(N,)`, *optional*):
            Class indices. Without them `accuracy` is `None`.
        exit_rule (`str`, *optional*):
            The exit rule (`hf_fastbert.exit_rules`); defaults to `config.exit_rule`.

    Returns:
        `list[dict]`, one per speed, with keys `speed`, `accuracy` (fraction in [0, 1]), `mean_exit_layer` (1-based;
        `num_hidden_layers` = full depth), `flops_speedup` (FLOPs of the family's stock classifier with the same
        backbone divided by the FLOPs early-exit inference spends, summed over the samples) and `accuracy_drop_se`
        (the standard error of the accuracy drop from full depth on these samples, [`accuracy_drop_standard_error`];
        None without labels, like `accuracy`). With labels also `answers_lost` and `answers_gained`: the samples
        right at full depth and wrong at this speed, and the reverse.

    Example:

    ```python
    >>> import torch
    >>> from hf_fastbert import FastBertConfig
    >>> from hf_fastbert.evaluation import metrics_at_speeds

    >>> config = FastBertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64)
    >>> all_logits = torch.tensor([[[4.0, -4.0], [3.0, -3.0]], [[0.1, 0.0], [-2.0, 2.0]]])  # (N=2, L=2, C=2)
    >>> rows = metrics_at_speeds(all_logits, torch.tensor([8, 8]), config, speeds=[0.0, 0.5], labels=[0, 1])
    >>> [(row["speed"], row["accuracy"], row["mean_exit_layer"]) for row in rows]
    [(0.0, 1.0, 2.0), (0.5, 1.0, 1.5)]
    ```"""
    speeds = validate_speeds(speeds)
    exit_rule = check_exit_rule(config, exit_rule)
    all_logits = _as_tensor(all_logits).float()
    seq_lengths = _as_tensor(seq_lengths).long()
    if all_logits.ndim != 3 or all_logits.shape[1] != config.num_hidden_layers:
        raise ValueError(
            f"`all_logits` must have shape (N, num_hidden_layers={config.num_hidden_layers}, num_labels), "
            f"got {tuple(all_logits.shape)}."
        )
    if seq_lengths.shape != all_logits.shape[:1]:
        raise ValueError(f"`seq_lengths` must have shape ({all_logits.shape[0]},), got {tuple(seq_lengths.shape)}.")
    if labels is not None:
        labels = _as_tensor(labels).long().reshape(-1)
        if labels.shape != seq_lengths.shape:
            raise ValueError(f"`labels` must have shape ({all_logits.shape[0]},), got {tuple(labels.shape)}.")
    if all_logits.shape[0] == 0:
        raise ValueError("Cannot compute metrics on zero samples.")

    baseline = stock_flops(config, seq_lengths).sum().item()
    full_depth_right = None if labels is None else all_logits[:, -1].argmax(dim=-1) == labels  # (N,)
    results = []
    for speed in speeds:
        logits, exit_layers = select_exits(all_logits, speed, config, exit_rule)
        predictions = logits.argmax(dim=-1)
        flops = fastbert_flops(config, seq_lengths, exit_layers, branches_ran=speed > 0).sum().item()
        row = {
            "speed": speed,
            "accuracy": None,
            "mean_exit_layer": exit_layers.double().mean().item(),
            "flops_speedup": baseline / flops,
            "accuracy_drop_se": None,
        }
        if labels is not None:
            right = predictions == labels  # (N,)
            lost, gained = int((full_depth_right & ~right).sum()), int((right & ~full_depth_right).sum())
            row["accuracy"] = right.double().mean().item()
            row["accuracy_drop_se"] = accuracy_drop_standard_error(lost, gained, len(right), speed)
            row.update(answers_lost=lost, answers_gained=gained)
        results.append(row)
    return results


def accuracy_drop_standard_error(answers_lost: int, answers_gained: int, samples: int, speed=None) -> float:
    """
    The standard error of an accuracy drop measured on `samples` samples: full depth's accuracy minus another's, on
    the same samples. The differences are paired, so only the changed answers count: `answers_lost` were right at
    full depth and wrong here, `answers_gained` the reverse. It adds half a sample to each of the four cells of the
    paired table (Agresti and Min, 2005), so that a few changed answers, or none, do not give a bound of zero: 60
    answers lost in 1,000 samples give 0.75 points, none give 0.1. At `speed` 0 (full depth itself) the drop is
    exactly 0, not an estimate: 0.0.
    """
    if speed == 0:
        return 0.0
    lost, gained = (answers_lost + 0.5) / (samples + 2), (answers_gained + 0.5) / (samples + 2)
    return math.sqrt(max(lost + gained - (lost - gained) ** 2, 0.0) / (samples + 2))


def flatten_speed_metrics(results: Sequence[dict]) -> dict[str, float]:
    """
    Flat metric names for `Trainer` logs: per speed `s`, `accuracy_speed_{s}` (only when labels were given),
    `mean_exit_layer_speed_{s}` and `flops_speedup_speed_{s}`. (The full-depth `accuracy` is added by
    [`FastBertMetrics`], not here.)
    """
    metrics = {}
    for row in results:
        suffix = f"speed_{row['speed']:g}"
        for key in ("accuracy", "mean_exit_layer", "flops_speedup"):
            if row[key] is not None:
                metrics[f"{key}_{suffix}"] = row[key]
    return metrics


class FastBertMetrics:
    r"""
    A ready, offline `compute_metrics` for the [`Trainer`]: accuracy, mean exit layer and FLOPs speed-up at one or
    more speeds (no `evaluate.load`, no Hub).

    The names mean the same under every trainer: `accuracy` is the teacher's accuracy (full depth, speed 0), and
    `accuracy_speed_{s}`, `mean_exit_layer_speed_{s}`, `flops_speedup_speed_{s}` are early exit at speed `s`.

    With [`FastBertDistillationTrainer`], the predictions are `(all_logits, seq_lengths, per_branch_kl)` and every
    speed is reported from one full-depth pass. With the stock [`Trainer`] (stage 2), the model returns `(logits,
    exit_layers, flops)` at its own `config.speed`: the metrics are then reported at that speed only (`accuracy`
    too when that speed is 0), and the FLOPs speed-up needs the token lengths, which it reads from the inputs when the
    training arguments have `include_for_metrics=["inputs"]` (tokens different from `pad_token_id`).

    Args:
        config ([`FastBertConfig`]):
            The model's config.
        speeds (`Iterable[float]`, *optional*, defaults to `(0.0, 0.1, 0.5)`):
            Speeds to report.
        pad_token_id (`int`, *optional*):
            Padding token id, to count token lengths from the inputs; defaults to `config.pad_token_id`.

    Returns (when called on an `EvalPrediction`):
        `dict[str, float]`: `accuracy` (the teacher's, at full depth) and, per speed `s`, `accuracy_speed_{s}`,
        `mean_exit_layer_speed_{s}` and `flops_speedup_speed_{s}` (the `Trainer` adds the `eval_` prefix).

    Example:

    ```python
    >>> from hf_fastbert import FastBertDistillationTrainer, FastBertMetrics

    >>> trainer = FastBertDistillationTrainer(
    ...     model=model, args=args, train_dataset=train, eval_dataset=dev,
    ...     compute_metrics=FastBertMetrics(model.config, speeds=[0.0, 0.1, 0.5]),
    ... )
    ```"""

    def __init__(self, config, speeds: Iterable[float] = (0.0, 0.1, 0.5), pad_token_id: int | None = None):
        self.config = config
        self.speeds = validate_speeds(speeds)
        self.pad_token_id = config.pad_token_id if pad_token_id is None else pad_token_id

    def __call__(self, eval_pred) -> dict[str, float]:
        predictions = eval_pred.predictions
        predictions = predictions if isinstance(predictions, (tuple, list)) else (predictions,)
        labels = eval_pred.label_ids
        first = np.asarray(predictions[0])
        if first.ndim == 3:  # FastBertDistillationTrainer: (all_logits, seq_lengths, per_branch_kl)
            return self._from_all_logits(first, np.asarray(predictions[1]), labels)

        # Stock Trainer: (logits, exit_layers, flops[, all_logits]) at the model's own speed.
        seq_lengths = self._lengths_from_inputs(getattr(eval_pred, "inputs", None))
        all_logits = next((np.asarray(p) for p in predictions if np.ndim(p) == 3), None)
        if all_logits is not None and seq_lengths is not None:
            return self._from_all_logits(all_logits, seq_lengths, labels)
        metrics, speed = {}, float(self.config.speed)
        suffix = f"speed_{speed:g}"
        if labels is not None:
            metrics[f"accuracy_{suffix}"] = float((first.argmax(-1) == np.asarray(labels).reshape(-1)).mean())
            if speed == 0:  # full depth: these are the teacher's answers
                metrics["accuracy"] = metrics[f"accuracy_{suffix}"]
        if len(predictions) >= 3:
            exit_layers, flops = np.asarray(predictions[1]), np.asarray(predictions[2])
            metrics[f"mean_exit_layer_{suffix}"] = float(exit_layers.mean())
            if seq_lengths is not None:
                baseline = stock_flops(self.config, torch.as_tensor(seq_lengths)).sum().item()
                metrics[f"flops_speedup_{suffix}"] = baseline / float(flops.astype(np.float64).sum())
        return metrics

    def _from_all_logits(self, all_logits, seq_lengths, labels) -> dict[str, float]:
        results = metrics_at_speeds(all_logits, seq_lengths, self.config, self.speeds, labels=labels)
        metrics = flatten_speed_metrics(results)
        if labels is not None:
            teacher = np.asarray(all_logits)[:, -1].argmax(-1)
            metrics["accuracy"] = float((teacher == np.asarray(labels).reshape(-1)).mean())
        return metrics

    def _lengths_from_inputs(self, inputs):
        if inputs is None:
            return None
        inputs = np.asarray(inputs)
        # The Trainer pads across batches with -100.
        return ((inputs != self.pad_token_id) & (inputs != -100)).sum(axis=-1)


def student_gaps(all_logits, labels=None) -> list[dict]:
    """
    How far each student is from its teacher on held-out data: a failed self-distillation shows here first.

    Args:
        all_logits (`torch.Tensor` or `np.ndarray` of shape `(N, L, C)`): Every classifier's logits, students first.
        labels (`(N,)`, *optional*): Class indices, for each student's own accuracy.

    Returns:
        `list[dict]`, one per student (layers 1 .. L-1): `layer`, `agreement` (share of samples where it predicts
        the teacher's class), `kl` (mean KL(teacher || student) in nats) and `accuracy` (`None` without labels).
    """
    all_logits = _as_tensor(all_logits).float()
    predictions = all_logits.argmax(dim=-1)  # (N, L)
    agreement = (predictions[:, :-1] == predictions[:, -1:]).double().mean(dim=0)  # (L-1,)
    kl = branch_kl(all_logits[:, :-1], all_logits[:, -1]).double().mean(dim=0)  # (L-1,)
    accuracy = None
    if labels is not None:
        accuracy = (predictions[:, :-1] == _as_tensor(labels).long().reshape(-1, 1)).double().mean(dim=0)
    return [
        {
            "layer": index + 1,
            "agreement": agreement[index].item(),
            "kl": kl[index].item(),
            "accuracy": None if accuracy is None else accuracy[index].item(),
        }
        for index in range(all_logits.shape[1] - 1)
    ]


def distillation_warning(gaps: Sequence[dict], min_agreement: float = MIN_STUDENT_AGREEMENT) -> str | None:
    """
    A warning with what to do when the students of the upper half of the layers are far from the teacher (they agree
    with it on fewer than `min_agreement` of the samples, on average), else `None`.

    Args:
        gaps (`list[dict]`): [`student_gaps`] rows.
        min_agreement (`float`, *optional*, defaults to 0.9): The agreement below which distillation failed.
    """
    if not gaps:
        return None
    upper = [row for row in gaps if row["layer"] > (len(gaps) + 1) // 2] or list(gaps[-1:])
    agreement = sum(row["agreement"] for row in upper) / len(upper)
    if agreement >= min_agreement:
        return None
    if len(upper) > 1:
        students = f"the students of layers {upper[0]['layer']}-{upper[-1]['layer']} agree"
    else:
        students = f"the student of layer {upper[0]['layer']} agrees"
    kl = sum(row["kl"] for row in upper) / len(upper)
    return (
        f"Self-distillation failed: {students} with the teacher on only {agreement:.0%} of "
        f"the held-out samples (mean KL {kl:.2f} nats), so few samples can exit early without losing accuracy. "
        "Distil longer (a higher epoch budget, or no fixed epoch count so that it runs until convergence), with a "
        "higher student learning rate, or on more in-domain text (unlabeled text works)."
    )


@torch.no_grad()
def predict_all_logits(model, dataset, batch_size: int = 32, progress: bool = False):
    """
    One full-depth pass over a tokenized dataset with `output_all_logits=True`.

    Args:
        model ([`FastBertForSequenceClassification`]):
            The model; it is put in eval mode and run on its own device.
        dataset (`datasets.Dataset` or a sequence of dicts):
            Rows with `input_ids` (and optionally `attention_mask`, `token_type_ids`, `labels` or `label`), unpadded,
            e.g. from [`hf_fastbert.data.prepare_dataset`].
        batch_size (`int`, *optional*, defaults to 32):
            Samples per forward pass.
        progress (`bool`, *optional*, defaults to `False`):
            Show a progress bar.

    Returns:
        `(all_logits, seq_lengths, labels)`: (N, L, C) float32 CPU tensor, (N,) int64 token lengths, and (N,) int64
        labels or `None` when the dataset has no label column.
    """
    num_samples = len(dataset)
    if num_samples == 0:
        raise ValueError("The evaluation dataset is empty.")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    model.eval()
    device = model.device
    pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    all_logits, seq_lengths, labels = [], [], []
    for start in tqdm(range(0, num_samples, batch_size), desc="Evaluating", disable=not progress):
        rows = dataset[start : start + batch_size]
        features = [dict(zip(rows, values, strict=True)) for values in zip(*rows.values(), strict=True)]
        batch = collate(features, pad_token_id)  # the padding of every path
        label_key = "labels" if "labels" in rows else "label" if "label" in rows else None
        if label_key is not None:
            labels.append(torch.as_tensor(rows[label_key], dtype=torch.long))
        output = model(**{key: value.to(device) for key, value in batch.items()}, output_all_logits=True)
        all_logits.append(output.all_logits.float().cpu())  # (b, L, C)
        seq_lengths.append(batch["attention_mask"].sum(dim=1))  # (b,)
    labels = torch.cat(labels) if labels else None
    return torch.cat(all_logits), torch.cat(seq_lengths), labels


def evaluate_speeds(
    model,
    dataset,
    speeds: Iterable[float] = DEFAULT_SPEEDS,
    batch_size: int = 32,
    progress: bool = False,
    exit_rule: str | None = None,
) -> list[dict]:
    """
    Accuracy, mean exit layer and FLOPs speed-up of `model` on `dataset` at every speed, from ONE full-depth pass.

    Args:
        model ([`FastBertForSequenceClassification`]): The model.
        dataset: A tokenized dataset (see [`predict_all_logits`]).
        speeds (`Iterable[float]`, *optional*, defaults to 0.0, 0.1, ..., 0.9): Speeds to report.
        batch_size (`int`, *optional*, defaults to 32): Samples per forward pass.
        progress (`bool`, *optional*, defaults to `False`): Show a progress bar.
        exit_rule (`str`, *optional*): The exit rule; defaults to `model.config.exit_rule`.

    Returns:
        `list[dict]` with keys `speed`, `accuracy` (`None` without labels), `mean_exit_layer`, `flops_speedup`: the
        format `hf_fastbert.modelcard.write_model_card(results=...)` takes.

    Example:

    ```python
    >>> from hf_fastbert import evaluate_speeds

    >>> for row in evaluate_speeds(model, test_dataset, speeds=[0.0, 0.1, 0.5]):
    ...     print(row)
    ```"""
    speeds = validate_speeds(speeds)
    all_logits, seq_lengths, labels = predict_all_logits(model, dataset, batch_size=batch_size, progress=progress)
    return metrics_at_speeds(all_logits, seq_lengths, model.config, speeds, labels=labels, exit_rule=exit_rule)


__all__ = [
    "MIN_STUDENT_AGREEMENT",
    "accuracy_drop_standard_error",
    "FastBertMetrics",
    "distillation_warning",
    "embedding_metrics_at_speeds",
    "embedding_quality",
    "evaluate_speeds",
    "flatten_speed_metrics",
    "metrics_at_speeds",
    "predict_all_logits",
    "student_gaps",
]

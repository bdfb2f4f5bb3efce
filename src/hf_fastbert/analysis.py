"""Sweeps, calibration and the LUHA view: what a FastBERT model trades at each speed, under each exit rule.

Everything here starts from ONE full-depth pass (`hf_fastbert.evaluation.predict_all_logits`): exit decisions are a
pure function of every classifier's logits, so every speed and every exit rule is computed exactly from it, with the
oracle bound beside them (leave at the first layer whose answer is the teacher's). The `sweep`, `calibrate` and
`evaluate` commands, `train` and the model card all go through these functions.

Example:

```python
>>> from hf_fastbert.analysis import calibrate, sweep

>>> report = sweep(model, test_dataset, exit_rules=["entropy", "patience"])
>>> report.results, report.oracle  # rows per (rule, speed); the oracle's accuracy and FLOPs speed-up
>>> choice = calibrate(model, validation_dataset, max_accuracy_drop=0.01)  # sets config.exit_rule and config.speed
>>> choice.exit_rule, choice.speed
>>> model.save_pretrained("calibrated")
```
"""

import contextlib
import copy
import csv
import json
import numbers
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .constants import CALIBRATION_SPEEDS, DEFAULT_SPEEDS, EXIT_RULES, RESULT_COLUMNS
from .evaluation import accuracy_drop_standard_error, metrics_at_speeds, predict_all_logits, student_gaps
from .exit_rules import calibrate_thresholds, check_exit_rule, fit_exit_heads, normalized_entropy, oracle_exits
from .files import atomic_path, check_writable_folder
from .flops import fastbert_flops, stock_flops


SWEEP_SPEEDS = DEFAULT_SPEEDS  # the name of hf-fastbert 0.x for the one speed grid (constants.py)
SWEEP_FILES = ("sweep.csv", "sweep.json", "sweep.png", "luha.csv", "luha.png", "students.csv")
CALIBRATED_RULES = ("thresholds", "learned")  # rules fitted on validation data (`model.calibrate_exit_rules`)


# ----------------------------------------------------------------------------------------------------
# Pure functions of per-speed results or of all_logits (tested without a model)
# ----------------------------------------------------------------------------------------------------


def calibrate_speed(results, *, max_accuracy_drop=None, target_speedup=None, confidence=None):
    """
    Choose a speed from per-speed results.

    Args:
        results (`list[dict]`):
            One dict per speed with at least `speed`, `accuracy` and `flops_speedup` (what a sweep returns). With
            `max_accuracy_drop` it must contain speed 0, the full-depth reference.
        max_accuracy_drop (`float`, *optional*):
            Return the largest speed whose accuracy is at least the speed-0 accuracy minus this (a fraction:
            0.005 is half an accuracy point).
        target_speedup (`float`, *optional*):
            Return the smallest speed whose FLOPs speed-up reaches this.
        confidence (`float`, *optional*):
            With `max_accuracy_drop`: keep the expected drop on new data within the budget at this confidence, not
            only the drop measured on these samples. Each speed's drop is read at its one-sided upper confidence
            bound (drop + z x its standard error, the rows' `accuracy_drop_se`; z = 1.64 for 0.95), and the speeds
            are tested in increasing order: the first that fails ends the search (a fixed-sequence test, so the many
            speeds tried do not erode the confidence). `benchmarks/bench_calibration.py` measures how often each
            choice keeps its budget on new data (summary in docs/training.md).

    Returns:
        The chosen result dict.

    Raises:
        `ValueError`: when neither or both criteria are given, speed 0 is missing, or no speed reaches the target;
        for a `confidence` outside (0, 1), without `max_accuracy_drop`, or with rows that lack `accuracy_drop_se`.
    """
    if (max_accuracy_drop is None) == (target_speedup is None):
        raise ValueError("Give exactly one of max_accuracy_drop and target_speedup.")
    rows = sorted(results, key=lambda row: row["speed"])
    if not rows:
        raise ValueError("No results to calibrate on.")
    margin = _confidence_margin(rows, confidence, max_accuracy_drop)  # per row, 0.0 without `confidence`
    if max_accuracy_drop is not None:
        if max_accuracy_drop < 0:
            raise ValueError(f"max_accuracy_drop must be >= 0, got {max_accuracy_drop}.")
        reference = [row for row in rows if row["speed"] == 0]
        if not reference:
            raise ValueError("Calibrating on an accuracy drop needs the speed-0 (full depth) result as reference.")
        floor = reference[0]["accuracy"] - max_accuracy_drop - 1e-9
        if confidence is None:
            return [row for row in rows if row["accuracy"] >= floor][-1]
        # A fixed-sequence test: speeds in increasing order, the first whose bound breaks the budget ends the search,
        # so that trying 100 speeds does not spend the confidence (taking the largest passing speed would).
        chosen = rows[0]
        for row, extra in zip(rows, margin, strict=True):
            if row["accuracy"] - extra < floor:
                break
            chosen = row
        return chosen
    reaching = [row for row in rows if row["flops_speedup"] >= target_speedup]
    if not reaching:
        best = max(rows, key=lambda row: row["flops_speedup"])
        raise ValueError(
            f"No speed up to {rows[-1]['speed']} reaches a {target_speedup}x FLOPs speed-up on this data "
            f"(best: {best['flops_speedup']:.2f}x at speed {best['speed']})."
        )
    return reaching[0]


def describe_drop(row, reference, confidence=0.95) -> str:
    """A chosen speed's accuracy drop from full depth, with the one-sided `confidence` upper bound on its expected drop
    (from the row's `accuracy_drop_se`), in words: what `calibrate` and `train` print. The bound is for this speed
    alone: a speed picked as the largest that passed on these samples was picked for its luck, so expect more."""
    drop = 100 * (reference["accuracy"] - row["accuracy"])
    text = f"{abs(drop):.2f} points {'below' if drop >= 0 else 'above'} full depth"
    if row.get("accuracy_drop_se") is not None:
        bound = drop + 100 * _z_score(confidence) * row["accuracy_drop_se"]
        text += f" on these samples, expected drop at most {bound:.2f} ({confidence:.0%} bound)"
    return text


def _z_score(confidence) -> float:
    """The one-sided normal quantile of `confidence` (1.645 for 0.95), after checking it is a probability."""
    if isinstance(confidence, bool) or not isinstance(confidence, numbers.Real) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be a probability strictly between 0 and 1 (0.95), got {confidence!r}.")
    return statistics.NormalDist().inv_cdf(float(confidence))


def _confidence_margin(rows, confidence, max_accuracy_drop) -> list[float]:
    """z x `accuracy_drop_se` per row for a one-sided `confidence` bound on the drop (all 0.0 without one)."""
    if confidence is None:
        return [0.0] * len(rows)
    z = _z_score(confidence)
    if max_accuracy_drop is None:
        raise ValueError("confidence bounds an accuracy budget: give it with max_accuracy_drop.")
    if any(row.get("accuracy_drop_se") is None for row in rows):
        raise ValueError(
            "confidence needs each result's accuracy_drop_se, which a row lacks (`metrics_at_speeds` measures it on "
            "labelled data; for a speed curve written before hf-fastbert measured it, run `hf-fastbert sweep MODEL` "
            "again)."
        )
    return [z * row["accuracy_drop_se"] for row in rows]


def luha_table(all_logits, labels, num_bins=10, top_k=None):
    """
    The paper's "lower uncertainty, higher accuracy" view: each classifier's accuracy by uncertainty bin.

    Args:
        all_logits (`torch.Tensor` of shape `(num_samples, num_layers, num_labels)`):
            Every classifier's logits, students first, the teacher last (`model(..., output_all_logits=True)`).
        labels (`torch.Tensor` of shape `(num_samples,)`): the gold labels.
        num_bins (`int`, *optional*, defaults to 10): equal-width uncertainty bins over [0, 1].
        top_k (`int`, *optional*): `config.uncertainty_top_k`, so that the bins match the exit rule's uncertainty.

    Returns:
        `list[dict]` with keys layer (1-based), uncertainty_low, uncertainty_high, samples, accuracy (None for an
        empty bin), one per layer and bin.
    """
    uncertainty = normalized_entropy(all_logits, top_k)  # (N, L)
    correct = all_logits.argmax(dim=-1) == labels[:, None]  # (N, L)
    bins = (uncertainty * num_bins).long().clamp(max=num_bins - 1)  # (N, L)
    rows = []
    for layer in range(all_logits.shape[1]):
        for index in range(num_bins):
            in_bin = bins[:, layer] == index  # (N,)
            count = int(in_bin.sum())
            rows.append(
                {
                    "layer": layer + 1,
                    "uncertainty_low": round(index / num_bins, 6),
                    "uncertainty_high": round((index + 1) / num_bins, 6),
                    "samples": count,
                    "accuracy": float(correct[in_bin, layer].float().mean()) if count else None,
                }
            )
    return rows


def oracle_metrics(all_logits, seq_lengths, config, labels=None) -> dict:
    """
    The oracle bound: every sample leaves at the first layer whose answer equals the teacher's, so the accuracy is the
    teacher's and no exit rule spends fewer FLOPs without changing an answer.

    Args:
        all_logits (`torch.Tensor` of shape `(N, L, C)`), seq_lengths (`(N,)`), config, labels (`(N,)`, *optional*):
            as in [`~hf_fastbert.evaluation.metrics_at_speeds`].

    Returns:
        `dict` with `exit_rule` ("oracle"), `accuracy` (None without labels), `mean_exit_layer` and `flops_speedup`.
    """
    all_logits = torch.as_tensor(all_logits).float()
    seq_lengths = torch.as_tensor(seq_lengths).long()
    exit_layers = oracle_exits(all_logits)  # (N,)
    flops = fastbert_flops(config, seq_lengths, exit_layers, branches_ran=True).sum().item()
    accuracy = None
    if labels is not None:
        teacher = all_logits[:, -1].argmax(dim=-1)
        accuracy = (teacher == torch.as_tensor(labels).long().reshape(-1)).double().mean().item()
    return {
        "exit_rule": "oracle",
        "accuracy": accuracy,
        "mean_exit_layer": exit_layers.double().mean().item(),
        "flops_speedup": stock_flops(config, seq_lengths).sum().item() / flops,
    }


def rule_summary(by_rule: dict, oracle: dict, max_accuracy_drop: float = 0.01) -> list[dict]:
    """
    Per exit rule: the fastest speed within `max_accuracy_drop` of full depth, and its FLOPs speed-up as a fraction
    of the oracle's (`benchmarks/bench_exit_rules.py`'s measure: 1.0 = as fast as the oracle).

    Returns:
        `list[dict]` with `exit_rule`, `speed`, `accuracy`, `flops_speedup`, `oracle_fraction`.
    """
    summary = []
    for rule, rows in by_rule.items():
        row = calibrate_speed(rows, max_accuracy_drop=max_accuracy_drop)
        summary.append(
            {
                "exit_rule": rule,
                "speed": row["speed"],
                "accuracy": row["accuracy"],
                "flops_speedup": row["flops_speedup"],
                "oracle_fraction": row["flops_speedup"] / oracle["flops_speedup"],
            }
        )
    return summary


def cross_fitted_metrics(all_logits, seq_lengths, labels, config, speeds, exit_rule, folds=2) -> list[dict]:
    """
    A calibrated rule's curve (`"thresholds"`, `"learned"`) on the data it is fitted on, without the optimism of
    measuring a fit on its own samples: the samples are dealt into `folds` interleaved folds, each fold is measured
    with the rule fitted on the other folds (cross-fitting), and the per-speed results are pooled over all samples.
    Choosing a speed on these rows and then fitting the rule on all the data is what [`calibrate`] does.

    Returns:
        The rows of [`~hf_fastbert.evaluation.metrics_at_speeds`] (`speed`, `accuracy`, `mean_exit_layer`,
        `flops_speedup`, `accuracy_drop_se`, `answers_lost`, `answers_gained`), pooled: accuracy, mean exit layer
        and the changed answers over samples, the speed-up as total FLOPs over total.
    """
    if exit_rule not in CALIBRATED_RULES:
        raise ValueError(f"cross-fitting is for the calibrated rules {CALIBRATED_RULES}, got {exit_rule!r}")
    all_logits = torch.as_tensor(all_logits).float()
    seq_lengths = torch.as_tensor(seq_lengths).long()
    labels = torch.as_tensor(labels).long().reshape(-1)
    if all_logits.shape[0] < 2 * folds:
        raise ValueError(f"cross-fitting {folds} folds needs at least {2 * folds} samples, got {all_logits.shape[0]}")
    fold_of = torch.arange(all_logits.shape[0]) % folds
    pooled = None
    for fold in range(folds):
        held, fit = fold_of == fold, fold_of != fold
        fitted = copy.deepcopy(config)
        if exit_rule == "thresholds":
            fitted.exit_thresholds = calibrate_thresholds(all_logits[fit], config.uncertainty_top_k)
        else:
            fitted.exit_heads = fit_exit_heads(all_logits[fit], config.uncertainty_top_k)
        rows = metrics_at_speeds(all_logits[held], seq_lengths[held], fitted, speeds, labels[held], exit_rule)
        count, stock = int(held.sum()), stock_flops(config, seq_lengths[held]).sum().item()
        sums = [
            {
                "speed": row["speed"],
                "correct": row["accuracy"] * count,
                "exit_layers": row["mean_exit_layer"] * count,
                "stock": stock,
                "flops": stock / row["flops_speedup"],
                "answers_lost": row["answers_lost"],
                "answers_gained": row["answers_gained"],
            }
            for row in rows
        ]
        if pooled is None:
            pooled = sums
        else:
            for total, part in zip(pooled, sums, strict=True):
                for key in ("correct", "exit_layers", "stock", "flops", "answers_lost", "answers_gained"):
                    total[key] += part[key]
    samples = all_logits.shape[0]
    return [
        {
            "speed": row["speed"],
            "accuracy": row["correct"] / samples,
            "mean_exit_layer": row["exit_layers"] / samples,
            "flops_speedup": row["stock"] / row["flops"],
            "accuracy_drop_se": accuracy_drop_standard_error(
                row["answers_lost"], row["answers_gained"], samples, row["speed"]
            ),
            "answers_lost": row["answers_lost"],
            "answers_gained": row["answers_gained"],
        }
        for row in pooled
    ]


def format_table(rows, columns):
    """Rows of dicts -> an aligned plain-text table (floats with 4 decimals but speeds as given, None as '-')."""

    def cell(column, value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:g}" if column == "speed" else f"{value:.4f}"
        return str(value)

    cells = [[cell(column, row.get(column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    lines = ["  ".join(column.rjust(width) for column, width in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(value.rjust(width) for value, width in zip(line, widths, strict=True)) for line in cells]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Sweeping and calibrating a model on a dataset
# ----------------------------------------------------------------------------------------------------


@dataclass
class Sweep:
    """
    What [`sweep`] measured.

    Attributes:
        results (`list[dict]`): per speed of the first exit rule: `exit_rule`, `speed`, `accuracy`,
            `mean_exit_layer`, `flops_speedup` (the curve the model card and `serve --adaptive` read).
        by_rule (`dict[str, list[dict]]`): the same rows for every exit rule swept.
        oracle (`dict`): [`oracle_metrics`]: the bound beside the curves.
        summary (`list[dict]`): [`rule_summary`] within one accuracy point.
        luha (`list[dict]`, *optional*): [`luha_table`] rows, when `luha_bins` was given.
        samples (`int`): how many samples.
    """

    results: list
    by_rule: dict
    oracle: dict
    summary: list
    luha: list | None = None
    samples: int = 0
    students: list | None = None  # [`hf_fastbert.evaluation.student_gaps`]: each student against the teacher

    @property
    def rows(self) -> list[dict]:
        """Every rule's rows, one after the other."""
        return [row for rows in self.by_rule.values() for row in rows]


def _rules(config, exit_rules):
    if exit_rules is None:
        exit_rules = [config.exit_rule]
    rules = list(dict.fromkeys([exit_rules] if isinstance(exit_rules, str) else exit_rules))
    for rule in rules:
        if rule not in EXIT_RULES:
            raise ValueError(f"unknown exit rule {rule!r}: one of {', '.join(EXIT_RULES)}")
    return rules


def _check_calibrated(config, rule):
    try:
        check_exit_rule(config, rule)
    except ValueError:
        raise ValueError(
            f"the exit rule {rule!r} is fitted on validation data, and this model's is missing: calibrate it first "
            "(`hf-fastbert calibrate MODEL --save`, or `hf_fastbert.analysis.calibrate`)"
        ) from None


def sweep_logits(
    all_logits, seq_lengths, labels, config, speeds=DEFAULT_SPEEDS, exit_rules=None, luha_bins=None, cross_fit=False
):
    """
    [`sweep`] from a full-depth pass already made (`predict_all_logits`): the same [`Sweep`], no model needed. With
    `cross_fit`, the calibrated rules' rows are cross-fitted on this data ([`cross_fitted_metrics`]) instead of
    measured with the config's fit.
    """
    if labels is None:
        raise ValueError("the evaluation data has no labels: accuracy needs a label column")
    rules = _rules(config, exit_rules)
    by_rule = {}
    for rule in rules:
        if cross_fit and rule in CALIBRATED_RULES:
            rows = cross_fitted_metrics(all_logits, seq_lengths, labels, config, speeds, rule)
        else:
            _check_calibrated(config, rule)
            rows = metrics_at_speeds(all_logits, seq_lengths, config, speeds, labels=labels, exit_rule=rule)
        by_rule[rule] = [{"exit_rule": rule, **row} for row in rows]
    oracle = oracle_metrics(all_logits, seq_lengths, config, labels)
    has_reference = any(row["speed"] == 0 for row in by_rule[rules[0]])
    summary = rule_summary(by_rule, oracle) if has_reference else []
    luha = None if luha_bins is None else luha_table(all_logits, labels, luha_bins, config.uncertainty_top_k)
    students = student_gaps(all_logits, labels)
    return Sweep(by_rule[rules[0]], by_rule, oracle, summary, luha, int(all_logits.shape[0]), students)


def sweep(model, dataset, speeds=DEFAULT_SPEEDS, *, exit_rules=None, batch_size=32, luha_bins=None, progress=False):
    """
    Every speed's accuracy, mean exit layer and FLOPs speed-up under each exit rule, from ONE full-depth pass, with
    the oracle bound beside them and optionally the LUHA view.

    Args:
        model ([`FastBertForSequenceClassification`]): the model (its config's `uncertainty_top_k`, calibrated tables
            and heads are used).
        dataset: a tokenized, labelled dataset (`hf_fastbert.data.prepare_dataset`).
        speeds (`list[float]`, *optional*, defaults to 0, 0.1, ..., 0.9): the grid.
        exit_rules (`str` or `list[str]`, *optional*): rules to compare (default: the model's `config.exit_rule`).
            `"thresholds"` and `"learned"` need the model calibrated first ([`calibrate`]).
        batch_size (`int`, *optional*, defaults to 32), progress (`bool`): the pass's batch size and progress bar.
        luha_bins (`int`, *optional*): also compute the LUHA view with this many uncertainty bins.

    Returns:
        [`Sweep`].
    """
    rules = _rules(model.config, exit_rules)
    for rule in rules:  # before the pass, not after it
        _check_calibrated(model.config, rule)
    all_logits, seq_lengths, labels = predict_all_logits(model, dataset, batch_size=batch_size, progress=progress)
    return sweep_logits(all_logits, seq_lengths, labels, model.config, speeds, rules, luha_bins)


@dataclass
class Calibration:
    """
    What [`calibrate`] chose.

    Attributes:
        exit_rule (`str`), speed (`float`): the choice, also set on the model's config.
        row (`dict`): the chosen rule's metrics at that speed on the validation data.
        reference (`dict`): full depth (speed 0) on the same data.
        candidates (`dict[str, dict | None]`): each rule's own choice (None where it cannot meet the criterion).
        oracle (`dict`): the oracle bound on the same data.
        sweep ([`Sweep`]): every rule's curve.
    """

    exit_rule: str
    speed: float
    row: dict
    reference: dict
    candidates: dict = field(default_factory=dict)
    oracle: dict = field(default_factory=dict)
    sweep: Sweep | None = None


def choose_exit_rule(by_rule: dict, *, max_accuracy_drop=None, target_speedup=None, confidence=None):
    """
    The rule and speed for an accuracy budget (the largest FLOPs speed-up within `max_accuracy_drop` of full depth,
    read at `confidence` as in [`calibrate_speed`]) or a target speed-up (the best accuracy among the speeds reaching
    `target_speedup`), from each rule's rows. Ties go to the rule listed first. With `confidence` and several rules,
    each rule is held to 1 - (1 - confidence) / rules (Bonferroni), since the fastest of them is taken.

    Returns:
        `(rule, row, candidates)`: `candidates` maps each rule to its own choice, or None when it has none.

    Raises:
        `ValueError` when no rule reaches `target_speedup` (the message names the best speed-up seen).
    """
    _confidence_margin([], confidence, max_accuracy_drop)
    if confidence is not None:  # the fastest of several rules is chosen: each must hold at a share of the risk
        confidence = 1 - (1 - confidence) / len(by_rule)
    candidates, errors = {}, []
    for rule, rows in by_rule.items():
        try:
            candidates[rule] = calibrate_speed(
                rows, max_accuracy_drop=max_accuracy_drop, target_speedup=target_speedup, confidence=confidence
            )
        except ValueError as error:
            if max_accuracy_drop is not None or target_speedup is None:
                raise
            candidates[rule] = None
            errors.append((rule, str(error)))
    found = {rule: row for rule, row in candidates.items() if row is not None}
    if not found:
        if len(errors) == 1:
            raise ValueError(errors[0][1])
        raise ValueError(
            f"no exit rule reaches a {target_speedup}x FLOPs speed-up on this data: "
            + "; ".join(f"{rule}: {message}" for rule, message in errors)
        )
    if max_accuracy_drop is not None:
        rule = max(found, key=lambda name: found[name]["flops_speedup"])
    else:
        rule = max(found, key=lambda name: found[name]["accuracy"])
    return rule, found[rule], candidates


def calibrate(
    model,
    dataset,
    *,
    max_accuracy_drop=None,
    target_speedup=None,
    confidence=None,
    exit_rules=EXIT_RULES,
    speeds=CALIBRATION_SPEEDS,
    batch_size=32,
    progress=False,
):
    """
    Pick the exit rule and its speed on validation data, and set them on the model's config (`exit_rule`, `speed`).

    One full-depth pass gives every rule's curve. When `"thresholds"` or `"learned"` is among the candidates, they are
    fitted on that same pass (`model.calibrate_exit_rules`, stored in the config), and their curves are cross-fitted
    ([`cross_fitted_metrics`]: each half of the data measured with the rule fitted on the other half), since a rule
    measured on the samples it was fitted on looks better than it is. Then, for an accuracy budget
    (`max_accuracy_drop`), the rule and speed with the largest FLOPs speed-up whose accuracy stays within the budget
    of full depth; for `target_speedup`, the most accurate rule and speed among those reaching it.
    `model.save_pretrained` (or `hf-fastbert calibrate --save`) keeps the choice.

    Args:
        model ([`FastBertForSequenceClassification`]): the model; its config is updated.
        dataset: a tokenized, labelled validation dataset.
        max_accuracy_drop (`float`, *optional*): accuracy loss accepted, as a fraction (0.01 = one point).
        target_speedup (`float`, *optional*): the FLOPs speed-up to reach. Give exactly one of the two.
        confidence (`float`, *optional*): with `max_accuracy_drop`, keep the expected drop on new data within the
            budget at this confidence (0.95), not only the drop measured on this data: each speed's drop is read at
            its upper confidence bound ([`calibrate_speed`]; several rules share the risk, [`choose_exit_rule`]).
            Slower speeds, but a promise that holds far more often.
        exit_rules (`list[str]`, *optional*, defaults to every rule): the candidates.
        speeds (`list[float]`, *optional*, defaults to 0, 0.01, ..., 0.99): candidate speeds (0 is always added).
        batch_size (`int`, *optional*, defaults to 32), progress (`bool`): the pass's batch size and progress bar.

    Returns:
        [`Calibration`].
    """
    if (max_accuracy_drop is None) == (target_speedup is None):
        raise ValueError("Give exactly one of max_accuracy_drop and target_speedup.")
    _confidence_margin([], confidence, max_accuracy_drop)  # a bad confidence fails before the pass
    rules = _rules(model.config, exit_rules)
    all_logits, seq_lengths, labels = predict_all_logits(model, dataset, batch_size=batch_size, progress=progress)
    return calibrate_logits(
        model,
        all_logits,
        seq_lengths,
        labels,
        max_accuracy_drop=max_accuracy_drop,
        target_speedup=target_speedup,
        confidence=confidence,
        exit_rules=rules,
        speeds=speeds,
    )


def calibrate_logits(
    model,
    all_logits,
    seq_lengths,
    labels,
    *,
    max_accuracy_drop=None,
    target_speedup=None,
    confidence=None,
    exit_rules=EXIT_RULES,
    speeds=CALIBRATION_SPEEDS,
):
    """[`calibrate`] from the full-depth pass it would run: `(all_logits, seq_lengths, labels)` as
    [`hf_fastbert.evaluation.predict_all_logits`] returns them. Sets the model's `config.exit_rule` and `config.speed`
    and returns the [`Calibration`]."""
    if (max_accuracy_drop is None) == (target_speedup is None):
        raise ValueError("Give exactly one of max_accuracy_drop and target_speedup.")
    _confidence_margin([], confidence, max_accuracy_drop)  # a bad confidence fails before the pass
    rules = _rules(model.config, exit_rules)
    if labels is None:
        raise ValueError("the validation data has no labels: calibrating needs a label column")
    if any(rule in CALIBRATED_RULES for rule in rules):
        model.calibrate_exit_rules(all_logits)
    speeds = sorted(set(speeds) | {0.0})
    # A calibrated rule is judged on samples its fit did not see (choosing on its own fit overfits).
    report = sweep_logits(all_logits, seq_lengths, labels, model.config, speeds, rules, cross_fit=True)
    rule, row, candidates = choose_exit_rule(
        report.by_rule, max_accuracy_drop=max_accuracy_drop, target_speedup=target_speedup, confidence=confidence
    )
    model.config.exit_rule = rule
    model.config.speed = row["speed"]
    reference = report.by_rule[rule][0]
    return Calibration(rule, row["speed"], row, reference, candidates, report.oracle, report)


# ----------------------------------------------------------------------------------------------------
# Wall time
# ----------------------------------------------------------------------------------------------------


def timing_batches(dataset, tokenizer, batch_size):
    """The inputs as padded batches (no labels: labels make the model run every layer for the loss)."""
    from .prediction import collate

    columns = [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in dataset.column_names]
    rows = dataset.select_columns(columns).to_list()
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return [
        collate(rows[start : start + batch_size], pad_token_id, tokenizer.padding_side)
        for start in range(0, len(rows), batch_size)
    ]


def measure_wall_time(model, batches, speed, exit_rule=None):
    """Seconds the early-exit engine takes over `batches` at `speed` (under `exit_rule`), after one warm-up batch."""
    from tqdm.auto import tqdm

    model.eval()
    with torch.inference_mode():
        model(**batches[0], speed=speed, exit_rule=exit_rule)
        start = time.perf_counter()
        for batch in tqdm(batches, desc=f"Timing speed {speed:g}", leave=False):
            model(**batch, speed=speed, exit_rule=exit_rule)
        return time.perf_counter() - start


def add_wall_time(results, model, batches, exit_rule=None):
    """Add `wall_time_s` and `wall_speedup` (over speed 0 on the same batches) to each result row, in place."""
    reference = measure_wall_time(model, batches, 0.0, exit_rule)
    for row in results:
        seconds = reference if row["speed"] == 0 else measure_wall_time(model, batches, row["speed"], exit_rule)
        row["wall_time_s"] = seconds
        row["wall_speedup"] = reference / seconds
    return results


# ----------------------------------------------------------------------------------------------------
# Results files
# ----------------------------------------------------------------------------------------------------


def write_rows(rows, path, source=None):
    """
    Write result rows to `path` as CSV or JSON, chosen by the suffix (.csv / .json). With `source` (a dict: model,
    data, samples, and anything else to keep beside the rows), the JSON file is `{**source, "results": rows}`, so
    that it says where its results come from.
    """
    path = Path(path)
    if path.suffix not in (".csv", ".json"):
        raise ValueError(f"Cannot write results to {path}: use a .csv or .json file name.")
    with atomic_path(path) as temporary:
        if path.suffix == ".json":
            temporary.write_text(json.dumps({**source, "results": rows} if source else rows, indent=2) + "\n")
        else:
            with temporary.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
                writer.writeheader()
                writer.writerows(rows)


def read_results_file(path):
    """`(rows, source)` of a results .json: a list of rows (source None) or `{model, data, samples, results}`."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"the results file {path} is not valid JSON ({error})") from None
    if isinstance(data, list):
        return data, None
    if not isinstance(data, dict) or not isinstance(data.get("results", []), list | type(None)):
        raise ValueError(f"the results file {path} holds no list of results")
    source = {key: data.get(key) for key in ("model", "data", "samples")}
    return data.get("results"), source


def results_source(model, data, samples):
    """Where results come from, written into their .json file: the model, the data in words, the sample count."""
    path = Path(model).expanduser()
    return {"model": str(path.resolve()) if path.exists() else str(model), "data": data, "samples": samples}


def rows_of_rule(data, exit_rule=None, path="the results file"):
    """
    The rows of a results file's content (`data`: a list of rows, or `{..., "results": rows}`) that were measured
    with `exit_rule`: a sweep of several rules keeps each one's under `exit_rules`. A file measured with another rule
    only is refused (a card or a serving ladder would show one rule's curve under another's name); rows that do not
    say their rule are taken as they are.
    """
    rows = data.get("results") if isinstance(data, dict) else data
    if exit_rule is None or not isinstance(rows, list) or not rows:
        return rows
    by_rule = data.get("exit_rules") if isinstance(data, dict) else None
    if isinstance(by_rule, dict) and exit_rule in by_rule:
        return by_rule[exit_rule]
    swept = {row.get("exit_rule") for row in rows if isinstance(row, dict)} - {None}
    if swept and exit_rule not in swept:
        raise ValueError(
            f"the results in {path} were measured with the exit rule {', '.join(sorted(swept))}, but the model now "
            f"uses {exit_rule!r}: rerun `hf-fastbert sweep MODEL --exit-rule {exit_rule}`"
        )
    return rows


def describe_source(source):
    """`source` (model, data, samples) in words."""
    if not source or source.get("data") is None or source.get("samples") is None:
        return "unrecorded data"
    return f"{source['samples']:,} samples of {source['data']}"


def check_sweep_dir(output_dir, source, overwrite=False, card=False):
    """Raise unless `output_dir` may take this sweep: no sweep files there, or a sweep of the same model and data."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"the output folder {output_dir} is a file")
    check_writable_folder(output_dir, f"cannot write to {output_dir}")
    if overwrite or not any((output_dir / name).exists() for name in SWEEP_FILES):
        return
    previous = None
    with contextlib.suppress(OSError, ValueError):
        previous = read_results_file(output_dir / "sweep.json")[1]
    if previous is not None and all(previous.get(key) == source[key] for key in ("model", "data", "samples")):
        return  # a rerun on the same model and data
    what = f"the sweep of {describe_source(previous)}" + (" that `push` puts on the model card" if card else "")
    if previous is not None and previous.get("model") not in (None, source["model"]):
        what += f" (model {previous['model']})"
    raise ValueError(
        f"{output_dir} already holds {what}: write this one elsewhere with --output-dir, or replace it with "
        "--overwrite-output-dir"
    )


def write_sweep(results, luha, output_dir, title=None, source=None, oracle=None, by_rule=None, students=None):
    """
    The sweep's files: sweep.csv/.json/.png, with LUHA rows luha.csv/.png, and with student rows
    ([`hf_fastbert.evaluation.student_gaps`]) students.csv; the LUHA plot then says when distillation failed (each
    file written atomically).

    `results` is the curve the model card and `serve --adaptive` read (sweep.json's `results`); with `by_rule`
    (several rules' rows), sweep.csv holds every rule's rows, sweep.json keeps them under `exit_rules` and the plot
    draws one curve each; with `oracle`, sweep.json and the plot show the oracle bound.
    """
    from .evaluation import distillation_warning
    from .plotting import plot_luha, plot_sweep

    output_dir = Path(output_dir)
    every_row = [row for rows in by_rule.values() for row in rows] if by_rule else results
    extra = {}
    if oracle is not None:
        extra["oracle"] = oracle
    if by_rule and len(by_rule) > 1:
        extra["exit_rules"] = by_rule
    write_rows(every_row, output_dir / "sweep.csv")
    write_rows(results, output_dir / "sweep.json", {**(source or {}), **extra} or None)
    with atomic_path(output_dir / "sweep.png") as temporary:
        plot_sweep(every_row, temporary, title=title, oracle=oracle)
    if luha is not None:
        write_rows(luha, output_dir / "luha.csv")
        failed = distillation_warning(students) if students else None
        with atomic_path(output_dir / "luha.png") as temporary:
            plot_luha(luha, temporary, warning=failed and "Self-distillation failed: students far from the teacher")
    else:  # no stale LUHA view of an earlier sweep next to this one
        for name in ("luha.csv", "luha.png"):
            (output_dir / name).unlink(missing_ok=True)
    if students:
        write_rows(students, output_dir / "students.csv")
    else:
        (output_dir / "students.csv").unlink(missing_ok=True)


__all__ = [
    "CALIBRATION_SPEEDS",
    "RESULT_COLUMNS",
    "SWEEP_SPEEDS",
    "Calibration",
    "Sweep",
    "add_wall_time",
    "calibrate",
    "calibrate_logits",
    "calibrate_speed",
    "check_sweep_dir",
    "choose_exit_rule",
    "cross_fitted_metrics",
    "describe_drop",
    "format_table",
    "luha_table",
    "measure_wall_time",
    "oracle_metrics",
    "read_results_file",
    "results_source",
    "rows_of_rule",
    "rule_summary",
    "sweep",
    "sweep_logits",
    "timing_batches",
    "write_rows",
    "write_sweep",
]

"""Exit rules: when a sample may leave after a student. Pure tensor functions of the students' logits and the config.

Every rule reads `speed` in [0, 1] the same way: 0 = full depth (no sample leaves early), higher = faster. The engine
(`modeling_fastbert.py`) calls `exits_at_layer` after each student on the samples still in the batch;
`select_exits` runs the very same function over `all_logits`, so the two always agree.

- `"entropy"` (FastBERT, the default): leave when the student's normalized entropy is below `speed`.
- `"patience"` (PABEE): leave when the last `p` students agree on the label, `p = 1 + round((1 - speed) * (L - 2))`
  (speed 1: the first student decides; speed -> 0: all L - 1 students must agree).
- `"thresholds"` (DeeBERT-style, calibrated): a threshold on the normalized entropy per layer, calibrated on
  validation data (`calibrate_thresholds`) so that, among the validation samples it lets out, at least `1 - speed` of
  that layer's answers equal the teacher's.
- `"learned"` (learning to exit, as in BERxiT): a logistic head per layer on a few features of the student's answer
  (`fit_exit_heads`, seconds on a validation pass) predicts "this student already agrees with the teacher"; leave when
  that probability exceeds `1 - speed`.

The calibrated tables and the learned heads are small lists of numbers kept in the config (`exit_thresholds`,
`exit_heads`), so they are saved with the model and every rule is computable from `(all_logits, config)` alone.
"""

import math

import torch

from .constants import EXIT_RULES


THRESHOLD_GRID = 21  # calibrated thresholds at required agreements 1, 0.95, ..., 0


def normalized_entropy(logits: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
    """
    The paper's uncertainty: entropy of softmax(logits) divided by log(num_labels), in [0, 1].

    Args:
        logits: (..., C) classifier logits.
        top_k: when set and smaller than C, the entropy of the `top_k` largest probabilities renormalized, divided by
            log(top_k). Keeps the measure useful with many labels, where the full entropy stays close to 1.

    Returns:
        (...) float32 tensor.
    """
    return _unclamped_normalized_entropy(logits, top_k).clamp(0.0, 1.0)


def _unclamped_normalized_entropy(logits: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """`normalized_entropy` before rounding's few ulps outside [0, 1] are clamped (a comparison with a speed in (0, 1]
    gives the same answer on both, with one kernel fewer)."""
    num_labels = logits.shape[-1]
    if top_k is not None and top_k < num_labels:
        logits = logits.topk(top_k, dim=-1).values
        num_labels = top_k
    log_probs = logits.float().log_softmax(dim=-1)
    # 0 * log 0 = 0: a probability that underflows to 0 next to a log-probability of -inf adds nothing (nansum).
    entropy = (log_probs.exp() * log_probs).nansum(dim=-1)
    return entropy / -math.log(num_labels)


def patience_for(speed: float, num_layers: int) -> int:
    """How many consecutive students must agree under the patience rule at `speed` (> 0)."""
    return 1 + round((1.0 - speed) * (num_layers - 2))


def agreement_streak(predictions: torch.Tensor, state) -> torch.Tensor:
    """(b,) how many consecutive students, this one included, answered `predictions`; `state` = (previous, streak)."""
    if state is None:
        return torch.ones_like(predictions)
    previous, streak = state
    return torch.where(predictions == previous, streak + 1, 1)


def exit_features(logits: torch.Tensor, streak: torch.Tensor, num_layers: int, top_k: int | None) -> torch.Tensor:
    """(b, C) student logits and (b,) agreement streaks -> (b, 5) features of the learned exit (bias first)."""
    probs = logits.float().softmax(dim=-1)
    top2 = probs.topk(min(2, probs.shape[-1]), dim=-1).values  # (b, 2)
    return torch.stack(
        [
            torch.ones_like(top2[:, 0]),
            top2[:, 0],
            top2[:, 0] - top2[:, -1],
            normalized_entropy(logits, top_k),
            streak.float() / (num_layers - 1),
        ],
        dim=-1,
    )


def exits_at_layer(config, speed: float, index: int, logits: torch.Tensor, state=None, rule: str | None = None):
    """
    Which samples leave after student `index` (0-based) at `speed` (> 0).

    Args:
        config: the model's config (`exit_rule`, `uncertainty_top_k`, `exit_thresholds`, `exit_heads`).
        logits: (b, C) this student's logits for the samples still in the batch.
        state: what the rule carries from layer to layer for these samples (None before the first student).
        rule: overrides `config.exit_rule`.

    Returns:
        `(exits, state)`: (b,) bool and the state to carry: None, or a tuple of (b, ...) tensors to index like the
        batch when samples leave.
    """
    rule = rule or config.exit_rule
    if rule == "entropy":
        return _unclamped_normalized_entropy(logits, config.uncertainty_top_k) < speed, None
    if rule == "thresholds":
        return normalized_entropy(logits, config.uncertainty_top_k) < calibrated_threshold(config, index, speed), None
    num_layers = config.num_hidden_layers
    predictions = logits.argmax(dim=-1)  # (b,)
    streak = agreement_streak(predictions, state)
    if rule == "patience":
        exits = streak >= patience_for(speed, num_layers)
    elif rule == "learned":
        weights = torch.tensor(config.exit_heads[index], device=logits.device)  # (5,)
        features = exit_features(logits, streak, num_layers, config.uncertainty_top_k)
        exits = torch.sigmoid(features @ weights) > 1.0 - speed
    else:
        raise ValueError(f"Unknown exit_rule {rule!r}; one of {EXIT_RULES}.")
    return exits, (predictions, streak)


def calibrated_threshold(config, index: int, speed: float) -> float:
    """The `"thresholds"` rule's entropy threshold for layer `index` at `speed`, interpolated in the table."""
    table = config.exit_thresholds[index]  # thresholds at required agreements 1, 0.95, ..., 0 (non-decreasing)
    position = speed * (len(table) - 1)
    low = min(int(position), len(table) - 2)
    return table[low] + (table[low + 1] - table[low]) * (position - low)


def select_exits(all_logits: torch.Tensor, speed: float, config, rule: str | None = None):
    """
    What early-exit inference at `speed` answers for each sample, from every classifier's logits.

    Args:
        all_logits: (B, L, C) logits of the students (layers 1 .. L-1), then the teacher.
        speed: in [0, 1]; 0 = full depth.
        config: the model's config (its `exit_rule` and what the rule reads).
        rule: overrides `config.exit_rule`.

    Returns:
        `(logits, exit_layers)`: (B, C) logits of the classifier each sample exits at and (B,) 1-based exit layers.
    """
    batch_size, num_layers = all_logits.shape[:2]
    exit_layers = torch.full((batch_size,), num_layers, dtype=torch.long, device=all_logits.device)
    if speed > 0:
        state, waiting = None, torch.ones(batch_size, dtype=torch.bool, device=all_logits.device)
        for index in range(num_layers - 1):
            exits, state = exits_at_layer(config, speed, index, all_logits[:, index], state, rule)
            leave = exits & waiting
            exit_layers[leave] = index + 1
            waiting &= ~exits
    rows = torch.arange(batch_size, device=all_logits.device)
    return all_logits[rows, exit_layers - 1], exit_layers  # (B, C), (B,)


def oracle_exits(all_logits: torch.Tensor) -> torch.Tensor:
    """The bound no rule can beat without losing accuracy: the first layer whose answer is the teacher's. (B,)."""
    agree = all_logits.argmax(dim=-1) == all_logits[:, -1:].argmax(dim=-1)  # (B, L); the teacher agrees with itself
    return agree.int().argmax(dim=1) + 1


def calibrate_thresholds(all_logits: torch.Tensor, top_k: int | None = None) -> list[list[float]]:
    """
    The `"thresholds"` rule's table from a validation pass: for each student layer and each required agreement
    a in 1, 0.95, ..., 0, the largest entropy threshold under which at least a of the validation samples it lets out
    answer as the teacher does. Returns (L - 1) lists of `THRESHOLD_GRID` non-decreasing floats.
    """
    teacher = all_logits[:, -1].argmax(dim=-1)  # (N,)
    table = []
    for index in range(all_logits.shape[1] - 1):
        uncertainty = normalized_entropy(all_logits[:, index], top_k)  # (N,)
        order = uncertainty.argsort()
        agree = (all_logits[order, index].argmax(dim=-1) == teacher[order]).double()
        agreement = agree.cumsum(0) / torch.arange(1, len(agree) + 1)  # among the k least uncertain
        sorted_u = uncertainty[order].double()
        # A threshold just above the k-th smallest uncertainty lets out exactly those k samples.
        cut = torch.cat([sorted_u[1:], torch.tensor([1.0 + 1e-6], dtype=torch.double)])
        row = []
        for step in range(THRESHOLD_GRID):
            required = 1.0 - step / (THRESHOLD_GRID - 1)
            ok = (agreement >= required - 1e-12).nonzero()
            # The largest k such that the first k reach the agreement; threshold between u_k and u_{k+1}.
            row.append(0.0 if len(ok) == 0 else float((sorted_u[ok[-1, 0]] + cut[ok[-1, 0]]) / 2))
        table.append([max(row[: i + 1]) for i in range(len(row))])  # non-decreasing in speed
    return table


def fit_exit_heads(all_logits: torch.Tensor, top_k: int | None = None, steps: int = 200) -> list[list[float]]:
    """
    The `"learned"` rule's heads from a validation (or training) pass of the frozen model: per student layer, a
    logistic regression of "this student's answer equals the teacher's" on `exit_features`. Returns (L - 1) lists of
    5 weights.
    """
    num_layers = all_logits.shape[1]
    teacher = all_logits[:, -1].argmax(dim=-1)
    l2 = torch.tensor([0.0, 1e-4, 1e-4, 1e-4, 1e-4], dtype=torch.double)  # a little keeps separable layers finite
    heads, state = [], None
    for index in range(num_layers - 1):
        logits = all_logits[:, index].float()
        predictions = logits.argmax(dim=-1)
        streak = agreement_streak(predictions, state)
        state = (predictions, streak)
        features = exit_features(logits, streak, num_layers, top_k).double()  # (N, 5)
        weights = fit_logistic(features, (predictions == teacher).double(), l2, steps)
        heads.append([float(value) for value in weights])
    return heads


def fit_logistic(features: torch.Tensor, target: torch.Tensor, l2: torch.Tensor, steps: int = 200) -> torch.Tensor:
    """(F,) float64 weights of a logistic regression of the (N,) 0/1 `target` on (N, F) float64 `features`, by
    L-BFGS from zero, with the L2 penalty `l2` (F,) per weight (0 for the bias) added to the mean log-loss."""
    weights = torch.zeros(features.shape[1], dtype=torch.double, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(features @ weights, target)
        loss = loss + (l2 * weights.pow(2)).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weights.detach()


def check_exit_rule(config, rule: str | None = None) -> str:
    """The rule to use (`rule` or `config.exit_rule`); a `ValueError` naming what is missing or wrong."""
    rule = config.exit_rule if rule is None else rule
    if rule not in EXIT_RULES:
        raise ValueError(f"`exit_rule` must be one of {EXIT_RULES}, got {rule!r}.")
    students = config.num_hidden_layers - 1
    if rule == "thresholds":
        table = config.exit_thresholds
        if not (isinstance(table, list) and len(table) == students and all(len(row) >= 2 for row in table)):
            raise ValueError(
                f"exit_rule='thresholds' needs `exit_thresholds` calibrated on validation data ({students} rows): "
                "call model.calibrate_exit_rules(all_logits) first."
            )
    if rule == "learned":
        heads = config.exit_heads
        if not (isinstance(heads, list) and len(heads) == students and all(len(row) == 5 for row in heads)):
            raise ValueError(
                f"exit_rule='learned' needs `exit_heads` fitted on the frozen model's outputs ({students} rows of 5): "
                "call model.calibrate_exit_rules(all_logits) first."
            )
    return rule


__all__ = [
    "EXIT_RULES",
    "check_exit_rule",
    "calibrate_thresholds",
    "exits_at_layer",
    "fit_exit_heads",
    "fit_logistic",
    "normalized_entropy",
    "oracle_exits",
    "select_exits",
]

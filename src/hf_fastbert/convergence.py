"""Train until a held-out metric stops improving, then keep the best weights: both of FastBERT's training stages.

A fixed number of epochs is the wrong unit: a few hundred distillation steps suffice on a binary task, while students
of a 50-class task are still far from their teacher after thousands. [`ConvergenceCallback`] evaluates on held-out
data every epoch (or more often on large data), stops once the metric has not improved for `patience` evaluations,
and restores the trained parameters of the best evaluation. Unlike the stock `EarlyStoppingCallback` it needs no
checkpoints on disk (`load_best_model_at_end`): the best values of the trained parameters are kept in memory (the
students alone in self-distillation), and it says how the run stopped ([`ConvergenceCallback.summary`]).
"""

import logging
import math

import torch
from transformers import TrainerCallback


logger = logging.getLogger(__name__)

# Evaluate at the end of every epoch, and every this many optimizer steps within long epochs.
MAX_STEPS_BETWEEN_EVALUATIONS = 500


def split_held_out(dataset, fraction: float = 0.1, max_samples: int = 2000, seed: int = 42):
    """
    A seeded random split of `dataset` into `(train, held_out)`; the held-out slice has `fraction` of the samples
    (at least 1, at most `max_samples`, and always leaves at least one training sample).

    Args:
        dataset (`datasets.Dataset` or a sequence): The data to split (needs at least 2 rows).
        fraction (`float`, *optional*, defaults to 0.1): Share of the samples held out, in (0, 1).
        max_samples (`int`, *optional*, defaults to 2000): Cap on the held-out samples.
        seed (`int`, *optional*, defaults to 42): Shuffling seed; the split is a pure function of it.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"The held-out fraction must be in (0, 1), got {fraction!r}.")
    if len(dataset) < 2:
        raise ValueError(f"Holding out data for convergence needs at least 2 samples, got {len(dataset)}.")
    size = min(max(1, round(fraction * len(dataset))), max_samples, len(dataset) - 1)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    train, held_out = sorted(order[size:]), sorted(order[:size])
    if hasattr(dataset, "select"):
        return dataset.select(train), dataset.select(held_out)
    return [dataset[index] for index in train], [dataset[index] for index in held_out]


class ConvergenceCallback(TrainerCallback):
    r"""
    Stop training when a held-out metric stops improving and keep the trained parameters of its best evaluation.

    - Evaluates (`control.should_evaluate`) at every epoch's end and every `eval_every` steps when the training
      arguments' own `eval_strategy` is `"no"`; otherwise it follows the arguments' evaluations.
    - An evaluation improves when the metric beats the best so far by more than `min_relative_improvement` of it.
      After `patience` evaluations in a row without improvement, training stops.
    - The best values of every parameter that requires a gradient are kept in memory (the students alone in
      self-distillation) and restored when training ends, whether it stopped early or used up its budget.
    - [`summary`] says how the run stopped; a line is logged at the end.

    Args:
        metric (`str`, *optional*, defaults to `"eval_loss"`): The metric to watch (as `evaluate()` reports it).
        greater_is_better (`bool`, *optional*, defaults to `False`): Direction of the metric.
        patience (`int`, *optional*, defaults to 2): Evaluations without improvement before stopping (>= 1).
        min_relative_improvement (`float`, *optional*, defaults to 0.0): Relative progress that counts (0.01: 1%).
        eval_every (`int`, *optional*): Steps between evaluations within an epoch (default
            [`MAX_STEPS_BETWEEN_EVALUATIONS`]).
        description (`str`, *optional*): What is trained, for the log ("self-distillation", "fine-tuning").
    """

    def __init__(
        self,
        metric: str = "eval_loss",
        greater_is_better: bool = False,
        patience: int = 2,
        min_relative_improvement: float = 0.0,
        eval_every: int | None = None,
        description: str = "training",
    ):
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"`patience` must be an integer >= 1, got {patience!r}.")
        if not isinstance(min_relative_improvement, (int, float)) or not 0 <= min_relative_improvement < 1:
            raise ValueError(f"`min_relative_improvement` must be in [0, 1), got {min_relative_improvement!r}.")
        self.metric = metric if metric.startswith("eval_") else f"eval_{metric}"
        self.greater_is_better = greater_is_better
        self.patience = patience
        self.min_relative_improvement = float(min_relative_improvement)
        self.eval_every = eval_every or MAX_STEPS_BETWEEN_EVALUATIONS
        self.description = description
        self.reset()

    def reset(self):
        self.history = []  # (step, epoch, value) of every evaluation
        self.best = None  # (step, epoch, value)
        self.bad_evaluations = 0
        self.stopped_early = False
        self._best_state = None
        self._last_evaluated_step = None
        self._schedule = True
        self._max_steps = None
        self._steps = None

    # ---- evaluation schedule ----
    def on_train_begin(self, args, state, control, **kwargs):
        self.reset()
        self._schedule = str(getattr(args.eval_strategy, "value", args.eval_strategy)) == "no"
        self._max_steps = state.max_steps

    def on_step_end(self, args, state, control, **kwargs):
        if self._schedule and state.global_step % self.eval_every == 0:
            control.should_evaluate = True

    def on_epoch_end(self, args, state, control, **kwargs):
        if self._schedule and state.global_step != self._last_evaluated_step:
            control.should_evaluate = True

    # ---- stopping and best weights ----
    def _improves(self, value: float) -> bool:
        if self.best is None:
            return True
        best = self.best[2]
        margin = self.min_relative_improvement * abs(best)
        return value > best + margin if self.greater_is_better else value < best - margin

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        value = (metrics or {}).get(self.metric)
        if value is None or not math.isfinite(value):
            logger.warning(
                "Convergence: no finite %s in the evaluation metrics; this evaluation is ignored.", self.metric
            )
            return
        self._last_evaluated_step = state.global_step
        self.history.append((state.global_step, state.epoch, float(value)))
        improved_on_best = self.best is None or (
            value > self.best[2] if self.greater_is_better else value < self.best[2]
        )
        if self._improves(value):
            self.bad_evaluations = 0
        else:
            self.bad_evaluations += 1
        if improved_on_best:
            self.best = (state.global_step, state.epoch, float(value))
            if model is not None:
                self._best_state = {
                    name: parameter.detach().clone()
                    for name, parameter in model.named_parameters()
                    if parameter.requires_grad
                }
        if self.bad_evaluations >= self.patience:
            self.stopped_early = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._steps = state.global_step
        if model is not None and self._best_state is not None and self.best[0] != self.history[-1][0]:
            parameters = dict(model.named_parameters())
            with torch.no_grad():
                for name, value in self._best_state.items():
                    parameters[name].copy_(value)
        self._best_state = None  # free the copy
        if self.history:
            logger.info("%s", self.message())

    def summary(self) -> dict | None:
        """
        How the run stopped, or `None` before any evaluation: `stopped` (`"converged"` when the metric stopped
        improving, `"budget"` when the step budget ran out first), `metric`, `best` / `first` / `last` values,
        `best_step`, `best_epoch`, `steps` (run), `max_steps` (the budget), `evaluations`, `still_improving`,
        `patience`, `min_relative_improvement` and `history` (step, epoch and value of every evaluation).
        """
        if not self.history:
            return None
        return {
            "stopped": "converged" if self.stopped_early else "budget",
            "metric": self.metric,
            "best": self.best[2],
            "best_step": self.best[0],
            "best_epoch": round(self.best[1], 2) if self.best[1] is not None else None,
            "first": self.history[0][2],
            "last": self.history[-1][2],
            "steps": self._steps if self._steps is not None else self.history[-1][0],
            "max_steps": self._max_steps,
            "evaluations": len(self.history),
            "still_improving": not self.stopped_early and self.bad_evaluations == 0,
            "patience": self.patience,
            "min_relative_improvement": self.min_relative_improvement,
            "history": [
                {"step": step, "epoch": round(epoch, 2) if epoch is not None else None, "value": value}
                for step, epoch, value in self.history
            ],
        }

    def message(self) -> str:
        """One sentence on how the run stopped (logged at the end of training, written into the model card)."""
        return describe_convergence(self.summary(), self.description)


def describe_convergence(summary: dict | None, description: str = "training") -> str:
    """The sentence [`ConvergenceCallback.message`] writes, from a [`ConvergenceCallback.summary`] dict."""
    if not summary:
        return f"{description.capitalize()}: no held-out evaluation."
    metric = summary["metric"].removeprefix("eval_")
    best = (
        f"best held-out {metric} {summary['best']:.4g} at step {summary['best_step']} (epoch {summary['best_epoch']})"
    )
    if summary["stopped"] == "converged":
        return (
            f"{description.capitalize()} converged: held-out {metric} did not improve for {summary['patience']} "
            f"evaluation(s); stopped at step {summary['steps']} of at most {summary['max_steps']}, {best} (restored)."
        )
    trend = (
        "was still improving: more epochs may help"
        if summary.get("still_improving")
        else "had stopped improving, short of the patience"
    )
    return (
        f"{description.capitalize()} used its whole budget of {summary['max_steps']} steps; held-out {metric} {trend} "
        f"(first {summary['first']:.4g}, last {summary['last']:.4g}); {best} (restored)."
    )


__all__ = ["MAX_STEPS_BETWEEN_EVALUATIONS", "ConvergenceCallback", "describe_convergence", "split_held_out"]

"""The speed ladder and the adaptive speed controller: pure objects driven by a clock that tests can fake."""

import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from ..configuration_fastbert import validate_speed
from ..constants import RESULTS_FILENAME, SWEEP_FILENAME


logger = logging.getLogger(__name__)


def load_speed_curve(path, exit_rule: str | None = None) -> list[dict]:
    """
    A speed/accuracy curve written by `hf-fastbert sweep` (`sweep/sweep.json`) or `train` (`speed_results.json`):
    rows with `speed`, `accuracy` and `flops_speedup` (and `accuracy_drop_se` where every row has it: curves written
    since hf-fastbert measured it), sorted by speed. With `exit_rule` (the served model's), the rows of that rule
    (`hf_fastbert.analysis.rows_of_rule`).
    """
    from ..analysis import rows_of_rule

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"speed curve {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:  # not JSON, not UTF-8
        raise ValueError(f"the speed curve {path} is not a JSON results file ({str(error)[:120]})") from None
    rows = rows_of_rule(data, exit_rule, path)
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path} holds no speed/accuracy rows")
    for row in rows:
        missing = [key for key in ("speed", "accuracy", "flops_speedup") if row.get(key) is None]
        if missing:
            raise ValueError(f"the rows of {path} need speed, accuracy and flops_speedup; one lacks {missing}")
    keys = ("speed", "accuracy", "flops_speedup")
    if all(row.get("accuracy_drop_se") is not None for row in rows):
        keys += ("accuracy_drop_se",)
    return sorted(({key: row[key] for key in keys} for row in rows), key=_speed_key)


def find_speed_curve(model) -> Path | None:
    """The speed/accuracy curve saved with a local model: `sweep/sweep.json` (`hf-fastbert sweep`, `train`), else
    `speed_results.json` (`train_fastbert`); None when there is none."""

    path = Path(model).expanduser()
    for candidate in (path / SWEEP_FILENAME, path / RESULTS_FILENAME):
        if candidate.is_file():
            return candidate
    return None


def _speed_key(row):
    return row["speed"]


def speed_ladder(
    curve: Sequence[dict],
    *,
    max_accuracy_drop: float,
    min_speed: float = 0.0,
    min_gain: float = 0.05,
    confidence: float | None = None,
) -> list[dict]:
    """
    The speeds the adaptive controller moves between, from a speed/accuracy curve measured on held-out data.

    Args:
        curve (`Sequence[dict]`):
            Rows with `speed`, `accuracy` and `flops_speedup` (see [`load_speed_curve`]), including speed 0, the
            full-depth reference.
        max_accuracy_drop (`float`):
            The accuracy floor, as a fraction below full depth (0.01 = one point). The ladder stops before the first
            speed above `min_speed` whose accuracy falls below it, so no rung lies past the floor.
        min_speed (`float`, *optional*, defaults to 0.0):
            The first rung: the speed served without load. Its FLOPs speed-up and accuracy are interpolated from
            the curve when it is not one of its speeds.
        min_gain (`float`, *optional*, defaults to 0.05):
            A speed becomes the next rung only if its FLOPs speed-up beats the previous rung's by this fraction, so
            that each step up buys real throughput.
        confidence (`float`, *optional*):
            Hold the floor on new data at this confidence (0.95), not only on the curve's samples: each speed's
            accuracy is read at its one-sided lower bound (the rows' `accuracy_drop_se`, as
            `hf_fastbert.analysis.calibrate_speed(confidence=...)` reads it). The ladder already stops at the first
            speed that fails, so the speeds tried do not spend the confidence.

    Returns:
        `list[dict]` of rungs `{"speed", "accuracy", "flops_speedup"}`, increasing in speed and FLOPs speed-up.

    Raises:
        `ValueError`: no speed-0 row, a negative drop, `min_speed` itself past the floor; a `confidence` outside
        (0, 1) or a curve without `accuracy_drop_se`.
    """
    import numpy as np

    from ..analysis import _confidence_margin

    if max_accuracy_drop < 0:
        raise ValueError(f"max_accuracy_drop must be >= 0, got {max_accuracy_drop}.")
    validate_speed(min_speed, "min_speed")
    rows = sorted(curve, key=_speed_key)
    margins = _confidence_margin(rows, confidence, max_accuracy_drop)  # all 0.0 without `confidence`
    reference = [row for row in rows if row["speed"] == 0]
    if not reference:
        raise ValueError("The speed curve needs the speed-0 (full depth) row as the accuracy reference.")
    floor = reference[0]["accuracy"] - max_accuracy_drop - 1e-9
    speeds = [row["speed"] for row in rows]
    base = {
        "speed": min_speed,
        "accuracy": float(np.interp(min_speed, speeds, [row["accuracy"] for row in rows])),
        "flops_speedup": float(np.interp(min_speed, speeds, [row["flops_speedup"] for row in rows])),
    }
    bound = "" if confidence is None else f" at {confidence:.0%} confidence"
    if base["accuracy"] - float(np.interp(min_speed, speeds, margins)) < floor:
        raise ValueError(
            f"the default speed {min_speed:g} is already past the accuracy floor{bound} (accuracy "
            f"{base['accuracy']:.4f}, floor {floor:.4f}): lower it or allow a larger max_accuracy_drop"
        )
    ladder = [base]
    for row, margin in zip(rows, margins, strict=True):
        if row["speed"] <= min_speed:
            continue
        if row["accuracy"] - margin < floor:
            break
        if row["flops_speedup"] >= ladder[-1]["flops_speedup"] * (1 + min_gain):
            ladder.append({key: row[key] for key in ("speed", "accuracy", "flops_speedup")})
    return ladder


def _percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of a non-empty sequence."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


class AdaptiveSpeedController:
    r"""
    Chooses the serving speed from the load, between the rungs of a [`speed_ladder`].

    Requests report their latency with [`observe`]; the server calls [`update`] before every batch (and a few times
    a second when idle) with the wait of the oldest queued input, and serves the speed it returns.

    - **Raise** when the pressure, the larger of the p95 latency of the requests finished at the current speed (at
      least `min_samples` of them in the last `window` seconds) and the oldest input's queueing delay, exceeds
      `raise_at * target`: jump to the first rung whose FLOPs cost is low enough to bring the pressure to the middle
      of the band (`(raise_at + lower_at) / 2 * target`), assuming latency scales with the cost per input; at least
      one rung, at most the top. Not within `raise_interval` seconds of the last change.
    - **Lower** when the pressure is below `raise_at * target` and a slower rung is predicted to stay under
      `lower_at * target` (the measured p95 scaled by the cost ratio): go to the slowest such rung; with too few
      requests to measure (the load has fallen away), one rung down. Not within `lower_interval` seconds of the last
      change. The gap between `lower_at` and `raise_at` keeps it from oscillating.

    Args:
        ladder (`Sequence[dict]`): Rungs with `speed` and `flops_speedup`, increasing (see [`speed_ladder`]).
        target_latency (`float`): The p95 latency target, in seconds.
        raise_at (`float`, *optional*, defaults to 0.8): Fraction of the target above which the speed is raised.
        lower_at (`float`, *optional*, defaults to 0.5): Fraction of the target a slower rung must be predicted under.
        window (`float`, *optional*, defaults to 3.0): Seconds of latency history considered.
        min_samples (`int`, *optional*, defaults to 10): Requests needed at the current speed to measure a p95.
        raise_interval (`float`, *optional*, defaults to 0.5): Seconds at a speed before raising it again.
        lower_interval (`float`, *optional*, defaults to 2.0): Seconds at a speed before lowering it.
        clock (`Callable[[], float]`, *optional*, defaults to `time.monotonic`): The time source, in seconds.

    Example:

    ```python
    >>> from hf_fastbert.serving import AdaptiveSpeedController
    >>> now = [0.0]
    >>> ladder = [{"speed": 0.0, "flops_speedup": 1.0}, {"speed": 0.5, "flops_speedup": 2.0}]
    >>> controller = AdaptiveSpeedController(ladder, target_latency=0.1, clock=lambda: now[0])
    >>> for _ in range(20):
    ...     controller.observe(0.2, speed=0.0)  # twice the target
    >>> now[0] = 1.0
    >>> controller.update()
    0.5
    ```"""

    def __init__(
        self,
        ladder: Sequence[dict],
        target_latency: float,
        *,
        raise_at: float = 0.8,
        lower_at: float = 0.5,
        window: float = 3.0,
        min_samples: int = 10,
        raise_interval: float = 0.5,
        lower_interval: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not ladder:
            raise ValueError("The speed ladder is empty.")
        speeds = [rung["speed"] for rung in ladder]
        costs = [1.0 / rung["flops_speedup"] for rung in ladder]
        if any(b <= a for a, b in zip(speeds, speeds[1:], strict=False)) or any(
            b >= a for a, b in zip(costs, costs[1:], strict=False)
        ):
            raise ValueError("The ladder's speeds must increase and its FLOPs speed-ups too.")
        if not target_latency > 0:
            raise ValueError(f"target_latency must be > 0 seconds, got {target_latency}.")
        if not 0 < lower_at < raise_at:
            raise ValueError(f"Need 0 < lower_at < raise_at, got lower_at={lower_at}, raise_at={raise_at}.")
        if window <= 0 or min_samples < 1 or raise_interval < 0 or lower_interval < 0:
            raise ValueError("window must be > 0, min_samples >= 1, raise_interval and lower_interval >= 0.")
        self.ladder = [dict(rung) for rung in ladder]
        self.speeds, self.costs = speeds, costs
        self.target_latency = target_latency
        self.raise_at, self.lower_at = raise_at, lower_at
        self.window, self.min_samples = window, min_samples
        self.raise_interval, self.lower_interval = raise_interval, lower_interval
        self.clock = clock
        self.level = 0
        self.changed_at = clock()
        self.changes: deque[tuple[float, float]] = deque(maxlen=1000)  # (time, new speed)
        self._latencies: deque[tuple[float, float]] = deque()  # (time, seconds) at the current speed

    @property
    def speed(self) -> float:
        """The speed served now."""
        return self.speeds[self.level]

    @property
    def max_speed(self) -> float:
        """The top rung: the fastest speed within the accuracy floor."""
        return self.speeds[-1]

    def observe(self, latency: float, speed: float):
        """Report a request's latency (seconds) and the speed it was served at; other speeds than the current one
        are ignored (requests that started before the last change)."""
        if speed == self.speed:
            self._latencies.append((self.clock(), latency))

    def p95(self) -> float | None:
        """p95 latency at the current speed over the window, or None with fewer than `min_samples` requests."""
        horizon = self.clock() - self.window
        while self._latencies and self._latencies[0][0] < horizon:
            self._latencies.popleft()
        if len(self._latencies) < self.min_samples:
            return None
        return _percentile([latency for _, latency in self._latencies], 0.95)

    def update(self, queue_delay: float = 0.0) -> float:
        """
        Decide the speed now, given the queueing delay (seconds) of the oldest input waiting; returns the speed.
        """
        now = self.clock()
        p95 = self.p95()
        pressure = max(p95 or 0.0, queue_delay)
        since = now - self.changed_at
        high = self.raise_at * self.target_latency
        if pressure > high:
            if self.level < len(self.speeds) - 1 and since >= self.raise_interval:
                setpoint = (self.raise_at + self.lower_at) / 2 * self.target_latency
                wanted_cost = self.costs[self.level] * setpoint / pressure
                level = next(
                    (i for i in range(self.level + 1, len(self.costs)) if self.costs[i] <= wanted_cost),
                    len(self.costs) - 1,
                )
                self._move(level, now)
        elif self.level > 0 and since >= self.lower_interval:
            if p95 is None:
                self._move(self.level - 1, now)
            else:
                low = self.lower_at * self.target_latency
                fits = [i for i in range(self.level) if p95 * self.costs[i] / self.costs[self.level] < low]
                if fits:
                    self._move(fits[0], now)
        return self.speed

    def _move(self, level: int, now: float):
        logger.info(
            "Adaptive speed: %g -> %g (p95 target %.0f ms)",
            self.speeds[self.level],
            self.speeds[level],
            1000 * self.target_latency,
        )
        self.level = level
        self.changed_at = now
        self._latencies.clear()
        self.changes.append((now, self.speeds[level]))

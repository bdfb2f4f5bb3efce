"""
Serving a FastBERT classifier over HTTP under varying load: `hf-fastbert serve`.

- [`create_app`] builds an ASGI app (Starlette) with text-embeddings-inference's (TEI) `POST /predict` API (also on
  `POST /` and `POST /invocations`, as TEI), `GET /health`, `GET /info` and Prometheus `GET /metrics`; [`serve`]
  runs it with uvicorn. Both need the `serve` extra: `pip install "hf-fastbert[serve]"`.
- [`DynamicBatcher`] gathers the inputs of concurrent requests into batches for the model's batched early-exit
  engine (`model(**inputs, speed=...)`), so that each input's answer is what the model gives for it offline.
- [`AdaptiveSpeedController`] (opt-in) raises the speed when the latency target is threatened and lowers it when the
  load falls, between the rungs of a [`speed_ladder`] read from the speed/accuracy curve of `hf-fastbert sweep`
  (or `train`), never past an accuracy floor. It is a pure object driven by a clock that tests can fake.

The batcher and the controller need neither Starlette nor uvicorn.
"""

import asyncio
import hmac
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .configuration_fastbert import validate_speed
from .pipeline_fastbert import is_fastbert
from .prediction import check_text, classify_batch, tokenize


logger = logging.getLogger(__name__)

SERVE_EXTRA_HINT = 'the server needs the serve extra: pip install "hf-fastbert[serve]"'


# ----------------------------------------------------------------------------------------------------
# The speed ladder and the adaptive controller (pure; a clock is injected)
# ----------------------------------------------------------------------------------------------------


def load_speed_curve(path, exit_rule: str | None = None) -> list[dict]:
    """
    A speed/accuracy curve written by `hf-fastbert sweep` (`sweep/sweep.json`) or `train` (`speed_results.json`):
    rows with `speed`, `accuracy` and `flops_speedup`, sorted by speed. With `exit_rule` (the served model's), the
    rows of that rule (`hf_fastbert.analysis.rows_of_rule`).
    """
    from .analysis import rows_of_rule

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
    return sorted(({key: row[key] for key in ("speed", "accuracy", "flops_speedup")} for row in rows), key=_speed_key)


def find_speed_curve(model) -> Path | None:
    """The speed/accuracy curve saved with a local model: `sweep/sweep.json` (`hf-fastbert sweep`, `train`), else
    `speed_results.json` (`train_fastbert`); None when there is none."""
    from .training import RESULTS_FILENAME

    path = Path(model).expanduser()
    for candidate in (path / "sweep" / "sweep.json", path / RESULTS_FILENAME):
        if candidate.is_file():
            return candidate
    return None


def _speed_key(row):
    return row["speed"]


def speed_ladder(
    curve: Sequence[dict], *, max_accuracy_drop: float, min_speed: float = 0.0, min_gain: float = 0.05
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

    Returns:
        `list[dict]` of rungs `{"speed", "accuracy", "flops_speedup"}`, increasing in speed and FLOPs speed-up.

    Raises:
        `ValueError`: no speed-0 row, a negative drop, or `min_speed` itself past the floor.
    """
    import numpy as np

    if max_accuracy_drop < 0:
        raise ValueError(f"max_accuracy_drop must be >= 0, got {max_accuracy_drop}.")
    validate_speed(min_speed, "min_speed")
    rows = sorted(curve, key=_speed_key)
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
    if base["accuracy"] < floor:
        raise ValueError(
            f"the default speed {min_speed:g} is already past the accuracy floor (accuracy {base['accuracy']:.4f} < "
            f"{floor:.4f}): lower it or allow a larger max_accuracy_drop"
        )
    ladder = [base]
    for row in rows:
        if row["speed"] <= min_speed:
            continue
        if row["accuracy"] < floor:
            break
        if row["flops_speedup"] >= ladder[-1]["flops_speedup"] * (1 + min_gain):
            ladder.append(dict(row))
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


# ----------------------------------------------------------------------------------------------------
# Dynamic batching
# ----------------------------------------------------------------------------------------------------


class Overloaded(Exception):
    """The queue is full: the request is refused (HTTP 429)."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new work (HTTP 503)."""


class EngineError(Exception):
    """The model failed on a batch (HTTP 424)."""


@dataclass
class InputResult:
    """One input's answer: its exiting classifier's logits, exit layer, the speed it ran at, and timings (s)."""

    logits: torch.Tensor  # (C,)
    exit_layer: int
    speed: float
    queue_time: float
    inference_time: float


@dataclass
class _Pending:
    encoding: dict
    speed: float | None  # the request's own speed, or None for the server's current one
    future: asyncio.Future
    enqueued: float


class DynamicBatcher:
    r"""
    Gathers the inputs of concurrent requests into batches for the early-exit engine, on an asyncio loop.

    A batch starts when it is full, or `max_wait` seconds after its first input arrived or after the engine became
    free, whichever is later (under load, the clients just answered send their next requests meanwhile, so batches
    stay full); a batch holds at most `max_batch_size`
    inputs (inputs, not requests: a request's inputs may span batches); inputs are served first come, first served.
    While the worker thread runs a batch, the next one gathers, and starts as soon as the worker is free. A batch with
    several speeds (per-request speeds) runs one forward pass per speed. At most `max_queue_size` inputs wait:
    [`submit`] raises [`Overloaded`] beyond that instead of letting memory grow.

    Args:
        run_batch (`Callable[[list[dict], float], tuple[Tensor, Tensor]]`):
            Runs in the worker thread: unpadded encodings and a speed -> `(logits (B, C), exit_layers (B,))`.
        max_batch_size (`int`, *optional*, defaults to 32): Inputs per batch.
        max_wait (`float`, *optional*, defaults to 0.005): Seconds a batch waits for more inputs.
        max_queue_size (`int`, *optional*, defaults to 1024): Inputs allowed to wait.
        current_speed (`Callable[[float], float]`, *optional*):
            Called before each batch (and every `tick` seconds when idle) with the oldest input's queueing delay;
            returns the speed for inputs without their own (the adaptive controller's `update`). Default: 0.
        on_batch (`Callable`, *optional*):
            Called after each batch with `(size, exit_layers, queue_times, seconds)`, for metrics.
        clock (`Callable[[], float]`, *optional*, defaults to `time.monotonic`).
        tick (`float`, *optional*, defaults to 0.1): Idle polling period, seconds.
    """

    def __init__(
        self,
        run_batch: Callable,
        *,
        max_batch_size: int = 32,
        max_wait: float = 0.005,
        max_queue_size: int = 1024,
        current_speed: Callable[[float], float] | None = None,
        on_batch: Callable | None = None,
        clock: Callable[[], float] = time.monotonic,
        tick: float = 0.1,
    ):
        if max_batch_size < 1 or max_queue_size < 1 or max_wait < 0:
            raise ValueError("max_batch_size and max_queue_size must be >= 1 and max_wait >= 0.")
        self.run_batch = run_batch
        self.max_batch_size, self.max_wait, self.max_queue_size = max_batch_size, max_wait, max_queue_size
        self.current_speed = current_speed or (lambda queue_delay: 0.0)
        self.on_batch = on_batch
        self.clock = clock
        self.tick = tick
        self._queue: deque[_Pending] = deque()
        self._event: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False
        self._free_since = -math.inf
        self.batches = 0

    @property
    def queue_size(self) -> int:
        """Inputs waiting (not counting the batch running)."""
        return len(self._queue)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done() and not self._closing

    def start(self):
        """Start the batching task on the running event loop and the worker thread."""
        self._event = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastbert-engine")
        self._closing = False
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="fastbert-batcher")

    async def close(self):
        """Stop taking inputs, finish every input already accepted, then stop the worker."""
        self._closing = True
        if self._event is not None:
            self._event.set()
        if self._task is not None:
            await self._task
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def submit(self, encodings: Sequence[dict], speed: float | None = None) -> list[asyncio.Future]:
        """
        Queue a request's inputs; returns one future per input, resolving to an [`InputResult`].

        Raises:
            [`ShuttingDown`] when closing or not started; [`Overloaded`] when the inputs do not fit in the queue.
        """
        if not self.running:
            raise ShuttingDown("the server is shutting down")
        if len(self._queue) + len(encodings) > self.max_queue_size:
            raise Overloaded(
                f"the queue is full ({len(self._queue)} inputs waiting, at most {self.max_queue_size}): retry later"
            )
        loop = asyncio.get_running_loop()
        now = self.clock()
        futures = []
        for encoding in encodings:
            future = loop.create_future()
            self._queue.append(_Pending(encoding, speed, future, now))
            futures.append(future)
        self._event.set()
        return futures

    async def _wait(self, timeout: float):
        self._event.clear()
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            pass

    async def _loop(self):
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                await self._wait(self.tick)
                if not self._queue:
                    self.current_speed(0.0)  # lets the controller see the idle time
                continue
            # Wait at most max_wait after the first input arrived AND after the engine became free: under load the
            # oldest input has already waited a whole batch, and the clients just answered are about to send again.
            deadline = max(self._queue[0].enqueued, self._free_since) + self.max_wait
            while len(self._queue) < self.max_batch_size and not self._closing:
                remaining = deadline - self.clock()
                if remaining <= 0:
                    break
                await self._wait(remaining)
            started = self.clock()
            speed = self.current_speed(started - self._queue[0].enqueued)
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), self.max_batch_size))]
            batch = [item for item in batch if not item.future.done()]  # a cancelled request's inputs
            if not batch:
                continue
            groups: dict[float, list[_Pending]] = {}
            for item in batch:
                groups.setdefault(speed if item.speed is None else item.speed, []).append(item)
            try:
                outputs = await loop.run_in_executor(self._executor, self._run_groups, groups)
            except Exception as error:  # the model failed: every input of the batch gets the error
                logger.exception("The model failed on a batch of %d inputs", len(batch))
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(EngineError(f"inference failed: {error}"))
                self._free_since = self.clock()
                continue
            finished = self._free_since = self.clock()
            exit_layers, queue_times = [], []
            for group_speed, (logits, layers) in outputs.items():
                for item, row, layer in zip(groups[group_speed], logits, layers.tolist(), strict=True):
                    queue_times.append(started - item.enqueued)
                    exit_layers.append(layer)
                    if not item.future.done():
                        item.future.set_result(
                            InputResult(row, layer, group_speed, started - item.enqueued, finished - started)
                        )
            self.batches += 1
            if self.on_batch is not None:
                self.on_batch(len(batch), exit_layers, queue_times, finished - started)

    def _run_groups(self, groups):
        return {
            group_speed: self.run_batch([item.encoding for item in items], group_speed)
            for group_speed, items in groups.items()
        }


# ----------------------------------------------------------------------------------------------------
# Requests: TEI's /predict shapes
# ----------------------------------------------------------------------------------------------------


class RequestError(Exception):
    """A request the server refuses: HTTP `status`, TEI's `error_type` and a message naming the problem."""

    def __init__(self, status: int, error_type: str, message: str):
        super().__init__(message)
        self.status, self.error_type, self.message = status, error_type, message


@dataclass
class PredictRequest:
    """A parsed `POST /predict` body (TEI's `PredictRequest` plus FastBERT's `speed`)."""

    texts: list[str]
    pairs: list[str | None]
    single: bool
    raw_scores: bool = False
    truncate: bool | None = None
    truncation_direction: str = "right"
    speed: float | None = None


BATCH_SHAPE_HINT = 'a batch is a list of lists: [["text 1"], ["text 2"], ["first text", "second text"]]'


def _text(value: str, where: str) -> str:
    try:
        return check_text(value, where)
    except ValueError as error:  # a lone surrogate: JSON allows it, the tokenizer does not
        raise RequestError(422, "validation", str(error)) from None


def _sequence(value, where: str) -> tuple[str, str | None]:
    if isinstance(value, list) and len(value) in (1, 2) and all(isinstance(text, str) for text in value):
        return _text(value[0], where), _text(value[1], where) if len(value) == 2 else None
    raise RequestError(
        422, "validation", f"{where} must be a list of one text or a pair of texts, got {json.dumps(value)[:100]}"
    )


def parse_inputs(inputs) -> tuple[list[tuple[str, str | None]], bool]:
    """
    TEI's `inputs`: a string; a list of one string or a pair of strings (one input); or a batch, a list of such
    lists (`[["a"], ["b", "c"]]`). Returns `(inputs as (text, pair or None), single)`.

    As in TEI, a list of two strings is ONE sentence pair, not two texts, and a list of three or more strings is
    refused.
    """
    if isinstance(inputs, str):
        return [(_text(inputs, "`inputs`"), None)], True
    if not isinstance(inputs, list):
        raise RequestError(
            422, "validation", f"`inputs` must be a string, a pair of strings or a batch; {BATCH_SHAPE_HINT}"
        )
    if not inputs:
        raise RequestError(400, "empty", "`inputs` cannot be empty")
    if all(isinstance(value, str) for value in inputs):
        if len(inputs) > 2:
            raise RequestError(
                422,
                "validation",
                f"a list of strings is one text or one sentence pair, not {len(inputs)} strings; {BATCH_SHAPE_HINT}",
            )
        return [_sequence(inputs, "`inputs`")], True
    return [_sequence(value, f"`inputs[{index}]`") for index, value in enumerate(inputs)], False


def parse_predict_request(payload) -> PredictRequest:
    """Validate a decoded `POST /predict` JSON body; raises [`RequestError`] naming the problem."""
    if not isinstance(payload, dict):
        raise RequestError(422, "validation", 'the body must be a JSON object such as {"inputs": "some text"}')
    if "inputs" not in payload:
        raise RequestError(422, "validation", 'the body has no `inputs` field: send {"inputs": "some text"}')
    inputs, single = parse_inputs(payload["inputs"])
    request = PredictRequest([text for text, _ in inputs], [pair for _, pair in inputs], single)
    for name in ("raw_scores", "truncate"):
        value = payload.get(name)
        if value is not None and not isinstance(value, bool):
            raise RequestError(422, "validation", f"`{name}` must be true or false, got {json.dumps(value)}")
    request.raw_scores = bool(payload.get("raw_scores") or False)
    request.truncate = payload.get("truncate")
    direction = payload.get("truncation_direction", "right")
    if not isinstance(direction, str) or direction.lower() not in ("left", "right"):
        raise RequestError(422, "validation", f'`truncation_direction` must be "Left" or "Right", got {direction!r}')
    request.truncation_direction = direction.lower()
    speed = payload.get("speed")
    if speed is not None:
        if isinstance(speed, bool) or not isinstance(speed, (int, float)):
            raise RequestError(422, "validation", f"`speed` must be a number in [0, 1], got {json.dumps(speed)}")
        try:
            validate_speed(float(speed))
        except ValueError:
            raise RequestError(422, "validation", f"`speed` must be a number in [0, 1], got {speed}") from None
        request.speed = float(speed)
    return request


# ----------------------------------------------------------------------------------------------------
# The server
# ----------------------------------------------------------------------------------------------------


@dataclass
class ServingConfig:
    r"""
    Settings of the FastBERT server.

    Args:
        speed (`float`, *optional*):
            Speed for requests that do not give one; defaults to the model's `config.speed`. In adaptive mode, the
            speed served without load (the ladder's first rung).
        max_batch_size (`int`, *optional*, defaults to 32): Inputs per forward pass.
        max_wait_ms (`float`, *optional*, defaults to 5.0): How long the first input of a batch waits for others.
        max_queue_size (`int`, *optional*, defaults to 1024): Inputs allowed to wait; more answers 429.
        max_concurrent_requests (`int`, *optional*, defaults to 512): Requests in progress; more answers 429.
        max_client_batch_size (`int`, *optional*, defaults to 32): Inputs per request; more answers 413.
        max_input_length (`int`, *optional*): Tokens per input; defaults to the tokenizer's and the model's limit.
            Longer inputs answer 413 unless the request (or `auto_truncate`) asks for truncation.
        auto_truncate (`bool`, *optional*, defaults to `False`): Truncate when a request does not say.
        max_request_bytes (`int`, *optional*, defaults to 2,000,000): Larger bodies answer 413, before they are read
            (from `Content-Length`) or as soon as the bytes read pass the limit (a body without one).
        api_key (`str`, *optional*): When set, every route but `/health` answers 401 unless the request carries
            `Authorization: Bearer <api_key>` (TEI's `--api-key`).
        adaptive (`bool`, *optional*, defaults to `False`): Choose the speed from the load (needs `speed_curve` and
            `target_p95_ms`).
        target_p95_ms (`float`, *optional*): Adaptive mode's p95 latency target, in milliseconds.
        max_accuracy_drop (`float`, *optional*, defaults to 0.01): Adaptive mode's accuracy floor, as a fraction
            below full depth on the curve's data (0.01 = one point).
        speed_curve (`list[dict]`, *optional*): The speed/accuracy curve (see [`load_speed_curve`]).
        model_id (`str`, *optional*): The name `/info` reports.
    """

    speed: float | None = None
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_queue_size: int = 1024
    max_concurrent_requests: int = 512
    max_client_batch_size: int = 32
    max_input_length: int | None = None
    auto_truncate: bool = False
    max_request_bytes: int = 2_000_000
    api_key: str | None = field(default=None, repr=False)
    adaptive: bool = False
    target_p95_ms: float | None = None
    max_accuracy_drop: float = 0.01
    speed_curve: list[dict] | None = field(default=None, repr=False)
    model_id: str | None = None

    def __post_init__(self):
        if self.speed is not None:
            validate_speed(self.speed)
        if self.api_key is not None and not (isinstance(self.api_key, str) and self.api_key.strip()):
            raise ValueError("api_key must be a non-empty string (or None for no authentication).")
        names = ("max_batch_size", "max_queue_size", "max_concurrent_requests", "max_client_batch_size")
        for name in names + ("max_request_bytes",):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.max_input_length is not None and self.max_input_length < 2:
            raise ValueError(f"max_input_length must be >= 2, got {self.max_input_length}.")
        if not self.max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}.")
        if self.max_queue_size < self.max_client_batch_size:
            raise ValueError("max_queue_size must be at least max_client_batch_size, or big requests never fit.")
        if self.adaptive:
            if self.speed_curve is None:
                raise ValueError("adaptive mode needs a speed curve (hf-fastbert sweep's sweep.json).")
            if self.target_p95_ms is None or not self.target_p95_ms > 0:
                raise ValueError(f"adaptive mode needs target_p95_ms > 0, got {self.target_p95_ms}.")
            if not self.max_accuracy_drop >= 0:
                raise ValueError(f"max_accuracy_drop must be >= 0, got {self.max_accuracy_drop}.")


class ServingMetrics:
    """The Prometheus metrics of one server, in their own registry."""

    LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)

    def __init__(self, num_layers: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "fastbert_requests", "Predict requests answered, by HTTP status", ["status"], registry=registry
        )
        self.errors = Counter(
            "fastbert_errors", "Predict requests refused or failed, by type", ["type"], registry=registry
        )
        self.inputs = Counter("fastbert_inputs", "Inputs classified", registry=registry)
        self.latency = Histogram(
            "fastbert_request_duration_seconds",
            "Predict request latency inside the server",
            buckets=self.LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_time = Histogram(
            "fastbert_queue_duration_seconds",
            "Time an input waited for its batch",
            buckets=self.LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_time = Histogram(
            "fastbert_batch_duration_seconds",
            "Forward time of a batch",
            buckets=self.LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "fastbert_batch_size",
            "Inputs per batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=registry,
        )
        self.exit_layer = Histogram(
            "fastbert_exit_layer",
            "Layer each input exited at (sum / count = mean exit layer)",
            buckets=tuple(range(1, num_layers + 1)),
            registry=registry,
        )
        self.mean_exit_layer = Gauge(
            "fastbert_mean_exit_layer", "Mean exit layer of the last 1000 inputs", registry=registry
        )
        self.speed = Gauge("fastbert_speed", "Speed served to requests that do not give one", registry=registry)
        self.queue_size = Gauge("fastbert_queue_size", "Inputs waiting for a batch", registry=registry)
        self.in_flight = Gauge("fastbert_requests_in_flight", "Predict requests in progress", registry=registry)
        self.speed_changes = Counter(
            "fastbert_speed_changes", "Speed changes made by the adaptive controller", registry=registry
        )
        self._recent_exits: deque[int] = deque(maxlen=1000)

    def record_batch(self, size, exit_layers, queue_times, seconds):
        self.batch_size.observe(size)
        self.batch_time.observe(seconds)
        self.inputs.inc(size)
        for layer, waited in zip(exit_layers, queue_times, strict=True):
            self.exit_layer.observe(layer)
            self.queue_time.observe(waited)
        self._recent_exits.extend(exit_layers)
        self.mean_exit_layer.set(sum(self._recent_exits) / len(self._recent_exits))

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class FastBertServer:
    """
    The model, its tokenizer, the batcher, the controller and the metrics behind the HTTP app ([`create_app`]).

    Args:
        model: A FastBERT model (e.g. `AutoModelForSequenceClassification.from_pretrained(path)` with `hf_fastbert`
            imported); it is put in eval mode.
        tokenizer: Its tokenizer.
        config ([`ServingConfig`], *optional*): The settings.
        controller ([`AdaptiveSpeedController`], *optional*): In adaptive mode, use this controller instead of one
            built from the config (tests give one with a fake clock).
    """

    def __init__(self, model, tokenizer, config: ServingConfig | None = None, controller=None):
        if not is_fastbert(model):
            raise ValueError(
                f"the server needs a FastBERT model, got {type(model).__name__} "
                f"(model_type={getattr(getattr(model, 'config', None), 'model_type', None)!r})"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config = config or ServingConfig()
        model_config = model.config
        self.default_speed = model_config.speed if config.speed is None else config.speed
        limits = [tokenizer.model_max_length, getattr(model_config, "max_position_embeddings", math.inf)]
        self.max_input_length = config.max_input_length or int(min(limits))
        if config.max_input_length is not None and config.max_input_length > min(limits):
            raise ValueError(
                f"max_input_length {config.max_input_length} exceeds the model's limit {int(min(limits))}."
            )
        self.num_layers = model_config.num_hidden_layers
        self.labels = [str(model_config.id2label[index]) for index in range(model_config.num_labels)]
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.controller = controller
        if config.adaptive and controller is None:
            ladder = speed_ladder(
                config.speed_curve, max_accuracy_drop=config.max_accuracy_drop, min_speed=self.default_speed
            )
            self.controller = AdaptiveSpeedController(ladder, config.target_p95_ms / 1000)
        self.metrics = ServingMetrics(self.num_layers)
        self.metrics.speed.set(self.current_speed)
        self.batcher = DynamicBatcher(
            self._run_batch,
            max_batch_size=config.max_batch_size,
            max_wait=config.max_wait_ms / 1000,
            max_queue_size=config.max_queue_size,
            current_speed=self._speed_for_batch,
            on_batch=self.metrics.record_batch,
        )
        self.in_flight = 0
        self._parser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastbert-parse")

    @property
    def adaptive(self) -> bool:
        return self.controller is not None

    @property
    def current_speed(self) -> float:
        return self.controller.speed if self.adaptive else self.default_speed

    def _speed_for_batch(self, queue_delay: float) -> float:
        if self.adaptive:
            changes = len(self.controller.changes)
            self.controller.update(queue_delay)
            self.metrics.speed_changes.inc(len(self.controller.changes) - changes)
        self.metrics.speed.set(self.current_speed)
        self.metrics.queue_size.set(self.batcher.queue_size)
        return self.current_speed

    def _run_batch(self, encodings, speed):
        return classify_batch(self.model, encodings, speed, self.pad_token_id, self.tokenizer.padding_side)

    def warm_up(self):
        """One forward pass before the first request (the first call of a model is slower)."""
        self._run_batch(tokenize(self.tokenizer, ["warm-up"], truncation=True, max_length=8), self.default_speed)

    def info(self) -> dict:
        config = self.config
        id2label = {str(index): label for index, label in enumerate(self.labels)}
        info = {
            "model_id": config.model_id or getattr(self.model.config, "_name_or_path", None) or "fastbert",
            "model_type": {"classifier": {"id2label": id2label, "label2id": {v: int(k) for k, v in id2label.items()}}},
            "labels": self.labels,
            "num_layers": self.num_layers,
            "default_speed": self.default_speed,
            "speed": self.current_speed,
            "mode": "adaptive" if self.adaptive else "fixed",
            "max_batch_size": config.max_batch_size,
            "max_wait_ms": config.max_wait_ms,
            "max_queue_size": config.max_queue_size,
            "max_concurrent_requests": config.max_concurrent_requests,
            "max_client_batch_size": config.max_client_batch_size,
            "max_input_length": self.max_input_length,
            "auto_truncate": config.auto_truncate,
        }
        if self.adaptive:
            info["adaptive"] = {
                "target_p95_ms": 1000 * self.controller.target_latency,
                "max_accuracy_drop": config.max_accuracy_drop,
                "ladder": self.controller.ladder,
            }
        from . import __version__

        info["version"] = __version__
        return info

    def _parse_and_encode(self, payload: bytes) -> tuple[PredictRequest, list[dict]]:
        try:
            body = json.loads(payload)
        except (ValueError, RecursionError) as error:  # bad JSON or UTF-8, a 5,000-digit number, nesting too deep
            reason = str(error) if isinstance(error, ValueError) else "nested too deeply"
            raise RequestError(400, "validation", f"the body is not valid JSON: {reason[:200]}") from None
        request = parse_predict_request(body)
        if len(request.texts) > self.config.max_client_batch_size:
            raise RequestError(
                413,
                "validation",
                f"batch size {len(request.texts)} > maximum allowed batch size {self.config.max_client_batch_size}",
            )
        return request, self.encode(request)

    def encode(self, request: PredictRequest) -> list[dict]:
        """Tokenize a request's inputs (unpadded); 413 for an over-long input without truncation."""
        truncate = self.config.auto_truncate if request.truncate is None else request.truncate
        tokenizer = self.tokenizer
        side = tokenizer.truncation_side
        tokenizer.truncation_side = request.truncation_direction  # the parsing thread is the tokenizer's only user
        try:
            encodings = tokenize(
                tokenizer, request.texts, request.pairs, truncation=truncate, max_length=self.max_input_length
            )
        finally:
            tokenizer.truncation_side = side
        for index, encoding in enumerate(encodings):
            length = len(encoding["input_ids"])
            if length > self.max_input_length:
                where = "the input" if request.single else f"input {index}"
                raise RequestError(
                    413,
                    "validation",
                    f"{where} has {length} tokens, more than the maximum {self.max_input_length}: shorten it or "
                    'send "truncate": true',
                )
        return encodings

    async def predict(self, payload: bytes, started: float | None = None) -> tuple[list, dict]:
        """
        Answer a `/predict` body: `(TEI response, headers)`; raises [`RequestError`]. `started` is the request's
        arrival (`time.perf_counter()`), for the latency the adaptive controller observes.
        """
        started = time.perf_counter() if started is None else started
        if len(payload) > self.config.max_request_bytes:
            raise RequestError(
                413, "validation", f"the body has {len(payload)} bytes, more than {self.config.max_request_bytes}"
            )
        # Decoding and tokenizing a 2 MB body takes long enough to stall every other request (and /health) if it
        # ran on the event loop: one worker thread does it (the tokenizer's only user, so its truncation side is
        # safe to set per request).
        loop = asyncio.get_running_loop()
        request, encodings = await loop.run_in_executor(self._parser, self._parse_and_encode, payload)
        try:
            futures = self.batcher.submit(encodings, request.speed)
        except Overloaded as error:
            raise RequestError(429, "overloaded", str(error)) from None
        except ShuttingDown as error:
            raise RequestError(503, "unhealthy", str(error)) from None
        try:
            results: list[InputResult] = await asyncio.gather(*futures)
        except EngineError as error:
            raise RequestError(424, "backend", str(error)) from None
        predictions = []
        for result in results:
            scores = result.logits if request.raw_scores else result.logits.softmax(dim=-1)
            entries = [
                {"score": score, "label": label, "exit_layer": result.exit_layer, "speed": result.speed}
                for score, label in zip(scores.tolist(), self.labels, strict=True)
            ]
            entries.sort(key=lambda entry: -entry["score"])
            predictions.append(entries)
        latency = time.perf_counter() - started
        if self.adaptive and request.speed is None:
            self.controller.observe(latency, results[-1].speed)
        headers = {
            "x-total-time": str(round(1000 * latency)),
            "x-queue-time": str(round(1000 * max(result.queue_time for result in results))),
            "x-inference-time": str(round(1000 * max(result.inference_time for result in results))),
            "x-fastbert-speed": ",".join(sorted({f"{result.speed:g}" for result in results})),
            "x-fastbert-exit-layers": ",".join(str(result.exit_layer) for result in results),
        }
        return (predictions[0] if request.single else predictions), headers


def _error_response(error: "RequestError"):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": error.message, "error_type": error.error_type}, status_code=error.status)


def create_app(model, tokenizer, config: ServingConfig | None = None, *, controller=None):
    r"""
    The FastBERT HTTP app (Starlette, ASGI): serve it with any ASGI server, or with [`serve`].

    Routes:
        - `POST /predict` (also `POST /` and `POST /invocations`, as TEI): TEI's request, `{"inputs": ...,
          "raw_scores": false, "truncate": false, "truncation_direction": "Right"}` plus an optional `"speed"`; TEI's
          response, a list of `{"score", "label"}` sorted by score (a list of such lists for a batch), each entry with
          the input's `exit_layer` and the `speed` it ran at. Errors are `{"error": ..., "error_type": ...}`: 400
          (not JSON, empty input), 401 (with `api_key`: no or a wrong `Authorization: Bearer` key), 413 (too many
          inputs, input too long without truncation, body too large: refused from its `Content-Length` before it is
          read), 422 (wrong shape or type, invalid speed, text that is not valid Unicode), 424 (the model failed),
          429 (queue full), 500 (a bug: still a JSON error, counted in the metrics), 503 (shutting down). Bodies
          are decoded and tokenized on a worker thread, never on the event loop.
        - `GET /health`: 200 `{"status": "ok"}`, 503 when shutting down.
        - `GET /info`: model, labels, layers, default and current speed, mode, limits (and the adaptive ladder).
        - `GET /metrics`: Prometheus text format.
        With `api_key`, every route but `/health` needs the key.

    Args:
        model, tokenizer, config, controller: see [`FastBertServer`].

    Returns:
        `starlette.applications.Starlette`, with the [`FastBertServer`] in `app.state.server`.

    Example:

    ```python
    >>> import hf_fastbert
    >>> from transformers import AutoModelForSequenceClassification, AutoTokenizer
    >>> from hf_fastbert.serving import ServingConfig, create_app

    >>> model = AutoModelForSequenceClassification.from_pretrained("path/to/fastbert")
    >>> app = create_app(model, AutoTokenizer.from_pretrained("path/to/fastbert"), ServingConfig(speed=0.3))
    >>> # uvicorn.run(app, host="127.0.0.1", port=8080)
    ```"""
    try:
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route
    except ImportError as error:
        raise ImportError(SERVE_EXTRA_HINT) from error

    server = FastBertServer(model, tokenizer, config, controller)
    metrics = server.metrics

    api_key = None if server.config.api_key is None else server.config.api_key.encode()

    def authorized(request) -> bool:
        if api_key is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key)

    def unauthorized(started):
        error = RequestError(401, "unauthorized", "missing or wrong API key: send `Authorization: Bearer <key>`")
        return _finish(_error_response(error), error, started)

    async def read_body(request) -> bytes:
        """The body, refused with 413 before it is read (Content-Length) or once it passes the limit."""
        limit = server.config.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise RequestError(413, "validation", f"the body has {declared} bytes, more than {limit}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise RequestError(413, "validation", f"the body has more than {limit} bytes")
        return bytes(body)

    async def predict(request):
        started = time.perf_counter()
        if not authorized(request):
            return unauthorized(started)
        if server.in_flight >= server.config.max_concurrent_requests:
            error = RequestError(
                429,
                "overloaded",
                f"{server.in_flight} requests in progress, at most "
                f"{server.config.max_concurrent_requests}: retry later",
            )
            return _finish(_error_response(error), error, started)
        server.in_flight += 1
        metrics.in_flight.set(server.in_flight)
        try:
            body, headers = await server.predict(await read_body(request), started)
        except RequestError as error:
            return _finish(_error_response(error), error, started)
        except Exception as error:  # a bug or an input nobody foresaw: TEI's JSON error, counted, and logged
            logger.exception("unexpected error answering a request")
            error = RequestError(500, "backend", f"unexpected error: {type(error).__name__}")
            return _finish(_error_response(error), error, started)
        finally:
            server.in_flight -= 1
            metrics.in_flight.set(server.in_flight)
        return _finish(JSONResponse(body, headers=headers), None, started)

    def _finish(response, error, started):
        metrics.requests.labels(status=str(response.status_code)).inc()
        if error is not None:
            metrics.errors.labels(type=error.error_type).inc()
        metrics.latency.observe(time.perf_counter() - started)
        return response

    async def health(request):
        if not server.batcher.running:
            return JSONResponse({"error": "unhealthy", "error_type": "unhealthy"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def info(request):
        if not authorized(request):
            return unauthorized(time.perf_counter())
        return JSONResponse(server.info())

    async def prometheus(request):
        if not authorized(request):
            return unauthorized(time.perf_counter())
        metrics.speed.set(server.current_speed)
        metrics.queue_size.set(server.batcher.queue_size)
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @asynccontextmanager
    async def lifespan(app):
        await asyncio.get_running_loop().run_in_executor(None, server.warm_up)
        server.batcher.start()
        logger.info(
            "FastBERT server ready: %s, %d layers, speed %s",
            server.info()["model_id"],
            server.num_layers,
            f"adaptive from {server.current_speed:g} to {server.controller.max_speed:g}"
            if server.adaptive
            else f"{server.current_speed:g}",
        )
        try:
            yield
        finally:
            await server.batcher.close()  # every accepted input is answered before the worker stops
            server._parser.shutdown(wait=False)

    routes = [
        Route("/predict", predict, methods=["POST"]),
        Route("/", predict, methods=["POST"]),
        Route("/invocations", predict, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/info", info, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.server = server
    return app


def load_model(name_or_path: str):
    """A FastBERT model (eval mode) and its tokenizer from a folder or Hub id, through the Auto classes."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from . import pipeline_fastbert  # noqa: F401  (importing the package registers the fastbert type)

    model = AutoModelForSequenceClassification.from_pretrained(name_or_path).eval()
    if not is_fastbert(model):
        raise ValueError(f"{name_or_path} is a {model.config.model_type!r} model, not FastBERT")
    return model, AutoTokenizer.from_pretrained(name_or_path)


def serve(
    model,
    tokenizer=None,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    config: ServingConfig | None = None,
    log_level: str = "info",
    access_log: bool = False,
    timeout_graceful_shutdown: float | None = 30.0,
):
    r"""
    Serve a FastBERT model over HTTP with uvicorn until interrupted (Ctrl-C or SIGTERM: the server stops accepting
    connections, answers every request already accepted, then exits).

    Args:
        model (`str` or model): A model folder or Hub id, or a loaded FastBERT model.
        tokenizer (*optional*): Its tokenizer (loaded from `model` when it is a path).
        host (`str`, *optional*, defaults to `"127.0.0.1"`): Address to bind; `"0.0.0.0"` exposes the server.
        port (`int`, *optional*, defaults to 8080): Port to bind.
        config ([`ServingConfig`], *optional*): Batching, limits and adaptive speed.
        log_level (`str`, *optional*, defaults to `"info"`): uvicorn's log level.
        access_log (`bool`, *optional*, defaults to `False`): Log every request.
        timeout_graceful_shutdown (`float`, *optional*, defaults to 30): Seconds in-flight requests get at shutdown.

    Example:

    ```python
    >>> from hf_fastbert.serving import ServingConfig, serve
    >>> serve("path/to/fastbert", port=8080, config=ServingConfig(max_batch_size=32, max_wait_ms=5))
    ```"""
    try:
        import uvicorn
    except ImportError as error:
        raise ImportError(SERVE_EXTRA_HINT) from error
    if isinstance(model, (str, Path)):
        model, loaded_tokenizer = load_model(str(model))
        tokenizer = tokenizer or loaded_tokenizer
    if tokenizer is None:
        raise ValueError("serve() needs the model's tokenizer")
    app = create_app(model, tokenizer, config)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=timeout_graceful_shutdown,
    )


__all__ = [
    "AdaptiveSpeedController",
    "DynamicBatcher",
    "FastBertServer",
    "InputResult",
    "PredictRequest",
    "RequestError",
    "ServingConfig",
    "create_app",
    "find_speed_curve",
    "load_model",
    "load_speed_curve",
    "parse_inputs",
    "parse_predict_request",
    "serve",
    "speed_ladder",
]

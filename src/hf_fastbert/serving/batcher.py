"""Dynamic batching: the inputs of concurrent requests gathered into batches for the early-exit engine."""

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch


logger = logging.getLogger(__name__)


class Overloaded(Exception):
    """The queue is full: the request is refused (HTTP 429)."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new work (HTTP 503)."""


class EngineError(Exception):
    """The model failed on a batch (HTTP 424)."""


@dataclass
class InputResult:
    """One input's answer: what the model gave it where it left (a classifier's logits, or a sentence embedding), its
    exit layer, the speed it ran at, and timings (s)."""

    output: torch.Tensor  # (C,) logits or (D,) embedding
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
            Runs in the worker thread: unpadded encodings and a speed -> `(outputs (B, ...), exit_layers (B,))`: the
            model's logits or embeddings.
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
            for group_speed, (values, layers) in outputs.items():
                for item, row, layer in zip(groups[group_speed], values, layers.tolist(), strict=True):
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

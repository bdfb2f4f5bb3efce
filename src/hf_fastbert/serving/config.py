"""
The server's settings, declared once: [`ServingOptions`] are what `hf-fastbert serve` parses (with
`HfArgumentParser`), [`ServingConfig`] adds what the command line does not take as a value (the API key, read from a
file or the environment; the speed curve, read from a file; the model's name). Torch-free.
"""

import math
from dataclasses import dataclass, field

from ..configuration_fastbert import validate_speed


@dataclass(kw_only=True)
class ServingOptions:
    r"""
    The server's batching, limits and adaptive-speed settings.

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
        adaptive (`bool`, *optional*, defaults to `False`): Choose the speed from the load (needs a speed curve and
            `target_p95_ms`).
        target_p95_ms (`float`, *optional*): Adaptive mode's p95 latency target, in milliseconds.
        max_accuracy_drop (`float`, *optional*, defaults to 0.01): Adaptive mode's accuracy floor, as a fraction
            below full depth on the curve's data (0.01 = one point).
        accuracy_confidence (`float`, *optional*): Hold adaptive mode's floor on new data at this confidence (0.95):
            each speed's accuracy is read at its lower bound from the curve's `accuracy_drop_se` (see
            [`speed_ladder`]). Without it, the floor holds on the curve's own samples.
    """

    speed: float | None = field(default=None, metadata={"help": "Default speed (default: the model's config.speed)."})
    max_batch_size: int = field(default=32, metadata={"help": "Inputs per forward pass."})
    max_wait_ms: float = field(default=5.0, metadata={"help": "How long an input waits for a batch to fill."})
    max_queue_size: int = field(default=1024, metadata={"help": "Inputs allowed to wait; more answers 429."})
    max_concurrent_requests: int = field(default=512, metadata={"help": "Requests in progress; more answers 429."})
    max_client_batch_size: int = field(default=32, metadata={"help": "Inputs per request; more answers 413."})
    max_input_length: int | None = field(
        default=None, metadata={"help": "Tokens per input (default: the model's limit)."}
    )
    auto_truncate: bool = field(
        default=False, metadata={"help": "Truncate over-long inputs unless a request says otherwise."}
    )
    max_request_bytes: int = field(
        default=2_000_000,
        metadata={"help": "Larger request bodies answer 413, refused from their Content-Length before they are read."},
    )
    adaptive: bool = field(default=False, metadata={"help": "Choose the speed from the load."})
    target_p95_ms: float | None = field(default=None, metadata={"help": "The p95 latency target (with --adaptive)."})
    max_accuracy_drop: float = field(
        default=0.01,
        metadata={"help": "Accuracy floor below full depth on the curve's data, as a fraction (0.01 = one point)."},
    )
    accuracy_confidence: float | None = field(
        default=None,
        metadata={"help": "Hold the accuracy floor on new data at this confidence (0.95), from the curve's errors."},
    )

    def __post_init__(self):
        if self.speed is not None:
            validate_speed(self.speed)
        names = ("max_batch_size", "max_queue_size", "max_concurrent_requests", "max_client_batch_size")
        for name in names + ("max_request_bytes",):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.max_input_length is not None and self.max_input_length < 2:
            raise ValueError(f"`max_input_length` must be >= 2, got {self.max_input_length}.")
        if not self.max_wait_ms >= 0:
            raise ValueError(f"`max_wait_ms` must be >= 0, got {self.max_wait_ms}.")
        if self.max_queue_size < self.max_client_batch_size:
            raise ValueError("`max_queue_size` must be at least `max_client_batch_size`, or big requests never fit.")
        if self.target_p95_ms is not None and not (math.isfinite(self.target_p95_ms) and self.target_p95_ms > 0):
            raise ValueError(f"`target_p95_ms` must be a positive number, got {self.target_p95_ms}.")
        if not self.max_accuracy_drop >= 0:
            raise ValueError(f"`max_accuracy_drop` must be >= 0, got {self.max_accuracy_drop}.")
        if self.accuracy_confidence is not None and not 0 < self.accuracy_confidence < 1:
            raise ValueError(
                f"`accuracy_confidence` must be strictly between 0 and 1 (0.95), got {self.accuracy_confidence}."
            )
        if self.accuracy_confidence is not None and not self.adaptive:
            raise ValueError("`accuracy_confidence` bounds adaptive mode's accuracy floor: give it with `adaptive`.")


@dataclass(kw_only=True)
class ServingConfig(ServingOptions):
    r"""
    Settings of the FastBERT server (keywords only): the [`ServingOptions`], and

    Args:
        api_key (`str`, *optional*): When set, every route but `/health` answers 401 unless the request carries
            `Authorization: Bearer <api_key>` (TEI's `--api-key`).
        speed_curve (`list[dict]`, *optional*): The speed/accuracy curve (see [`load_speed_curve`]); adaptive mode
            needs it.
        model_id (`str`, *optional*): The name `/info` reports.
    """

    api_key: str | None = field(default=None, repr=False)
    speed_curve: list[dict] | None = field(default=None, repr=False)
    model_id: str | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.api_key is not None and not (isinstance(self.api_key, str) and self.api_key.strip()):
            raise ValueError("api_key must be a non-empty string (or None for no authentication).")
        if self.adaptive:
            if self.speed_curve is None:
                raise ValueError("adaptive mode needs a speed curve (hf-fastbert sweep's sweep.json).")
            if self.target_p95_ms is None:
                raise ValueError(f"adaptive mode needs target_p95_ms > 0, got {self.target_p95_ms}.")


__all__ = ["ServingConfig", "ServingOptions"]

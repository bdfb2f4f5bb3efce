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

One job per module, along text-embeddings-inference's seams: `speed` (the ladder and the controller) and `batcher`
need neither Starlette nor uvicorn; `schemas` parses requests, `metrics` counts, `app` holds the settings, the server,
the routes and the launcher.
"""

from .app import SERVE_EXTRA_HINT, FastBertServer, create_app, load_model, serve
from .batcher import DynamicBatcher, EngineError, InputResult, Overloaded, ShuttingDown
from .config import ServingConfig, ServingOptions
from .metrics import ServingMetrics
from .schemas import PredictRequest, RequestError, parse_inputs, parse_predict_request
from .speed import AdaptiveSpeedController, find_speed_curve, load_speed_curve, speed_ladder


__all__ = [
    "SERVE_EXTRA_HINT",
    "AdaptiveSpeedController",
    "DynamicBatcher",
    "EngineError",
    "FastBertServer",
    "InputResult",
    "Overloaded",
    "PredictRequest",
    "RequestError",
    "ServingConfig",
    "ServingOptions",
    "ServingMetrics",
    "ShuttingDown",
    "create_app",
    "find_speed_curve",
    "load_model",
    "load_speed_curve",
    "parse_inputs",
    "parse_predict_request",
    "serve",
    "speed_ladder",
]

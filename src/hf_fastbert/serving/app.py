"""The server: its settings, the model behind it, the Starlette app with TEI's routes, and the uvicorn launcher."""

import asyncio
import hmac
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import torch.nn.functional as F

from ..backbones import max_input_length
from ..modeling_fastbert_embedding import FastBertEmbeddingMixin
from ..pipeline_fastbert import is_fastbert
from ..prediction import classify_batch, tokenize
from .batcher import (
    DynamicBatcher,
    EngineError,
    InputResult,
    Overloaded,
    ShuttingDown,
)
from .config import ServingConfig
from .metrics import (
    ServingMetrics,
)
from .schemas import (
    PredictRequest,
    RequestError,
    parse_embed_request,
    parse_predict_request,
)
from .speed import (
    AdaptiveSpeedController,
    speed_ladder,
)


logger = logging.getLogger(__name__)

SERVE_EXTRA_HINT = 'the server needs the serve extra: pip install "hf-fastbert[serve]"'


class FastBertServer:
    """
    The model, its tokenizer, the batcher, the controller and the metrics behind the HTTP app ([`create_app`]).

    Args:
        model: A FastBERT model (e.g. `AutoModelForSequenceClassification.from_pretrained(path)` with `hf_fastbert`
            imported), answering `/predict`, or a FastBERT sentence embedding model
            ([`FastBertForSentenceEmbedding`]), answering `/embed`; it is put in eval mode.
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
        limits = [tokenizer.model_max_length, max_input_length(model_config)]
        self.max_input_length = config.max_input_length or int(min(limits))
        if config.max_input_length is not None and config.max_input_length > min(limits):
            raise ValueError(
                f"max_input_length {config.max_input_length} exceeds the model's limit {int(min(limits))}."
            )
        self.num_layers = model_config.num_hidden_layers
        self.embeds = isinstance(model, FastBertEmbeddingMixin)  # /embed; else a classifier, /predict
        labels = [] if self.embeds else range(model_config.num_labels)
        self.labels = [str(model_config.id2label[index]) for index in labels]
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.controller = controller
        if config.adaptive and controller is None:
            ladder = speed_ladder(
                config.speed_curve,
                max_accuracy_drop=config.max_accuracy_drop,
                min_speed=self.default_speed,
                confidence=config.accuracy_confidence,
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
        if self.embeds:
            model_type = {"embedding": {"pooling": self.model.config.embedding_pooling}}
        else:
            model_type = {"classifier": {"id2label": id2label, "label2id": {v: int(k) for k, v in id2label.items()}}}
        info = {
            "model_id": config.model_id or getattr(self.model.config, "_name_or_path", None) or "fastbert",
            "model_type": model_type,
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
        from .. import __version__

        info["version"] = __version__
        return info

    def _parse_and_encode(self, payload: bytes, parse=parse_predict_request) -> tuple[PredictRequest, list[dict]]:
        try:
            body = json.loads(payload)
        except (ValueError, RecursionError) as error:  # bad JSON or UTF-8, a 5,000-digit number, nesting too deep
            reason = str(error) if isinstance(error, ValueError) else "nested too deeply"
            raise RequestError(400, "validation", f"the body is not valid JSON: {reason[:200]}") from None
        request = parse(body)
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
        if self.embeds:
            raise RequestError(424, "backend", "this server's model is a sentence embedding model: use /embed")
        request, results, headers = await self._answer(payload, started, parse_predict_request)
        predictions = []
        for result in results:
            scores = result.output if request.raw_scores else result.output.softmax(dim=-1)
            entries = [
                {"score": score, "label": label, "exit_layer": result.exit_layer, "speed": result.speed}
                for score, label in zip(scores.tolist(), self.labels, strict=True)
            ]
            entries.sort(key=lambda entry: -entry["score"])
            predictions.append(entries)
        return (predictions[0] if request.single else predictions), headers

    async def embed(self, payload: bytes, started: float | None = None) -> tuple[list, dict]:
        """Answer an `/embed` body: `(TEI response: a list of embeddings, headers)`; raises [`RequestError`]."""
        if not self.embeds:
            raise RequestError(424, "backend", "this server's model is a classifier: use /predict")
        request, results, headers = await self._answer(payload, started, parse_embed_request)
        vectors = [F.normalize(result.output, dim=0) if request.normalize else result.output for result in results]
        return [vector.tolist() for vector in vectors], headers

    async def _answer(self, payload: bytes, started, parse) -> tuple:
        """Parse, tokenize, batch and run a request: `(request, results, headers)`."""
        started = time.perf_counter() if started is None else started
        if len(payload) > self.config.max_request_bytes:
            raise RequestError(
                413, "validation", f"the body has {len(payload)} bytes, more than {self.config.max_request_bytes}"
            )
        # Decoding and tokenizing a 2 MB body takes long enough to stall every other request (and /health) if it
        # ran on the event loop: one worker thread does it (the tokenizer's only user, so its truncation side is
        # safe to set per request).
        loop = asyncio.get_running_loop()
        request, encodings = await loop.run_in_executor(self._parser, self._parse_and_encode, payload, parse)
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
        return request, results, headers


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
        - `POST /embed` (a sentence embedding model, [`FastBertForSentenceEmbedding`]): TEI's request, `{"inputs":
          "text" or ["text", ...], "normalize": true, "truncate": false, "truncation_direction": "Right"}` plus an
          optional `"speed"`; TEI's response, a list of embeddings (one per input, also for a single string), with
          the exit layers and speeds in the `x-fastbert-exit-layers` and `x-fastbert-speed` headers. `/predict` on
          an embedding model and `/embed` on a classifier answer 424.
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
        return await answer(request, server.predict)

    async def embed(request):
        return await answer(request, server.embed)

    async def answer(request, method):
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
            body, headers = await method(await read_body(request), started)
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
        Route("/embed", embed, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/info", info, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.server = server
    return app


def load_model(name_or_path: str, *, int8: bool = False, backend: str = "torch"):
    """A FastBERT model (eval mode), classifier or sentence embedding model, and its tokenizer from a folder or Hub id
    (`hf_fastbert.loading.load_fastbert`)."""
    from ..loading import load_fastbert

    return load_fastbert(name_or_path, int8=int8, backend=backend, embeddings=True)


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

"""`hf-fastbert serve`: the HTTP server (TEI's /predict API), dynamic batching, load-adaptive speed."""

import dataclasses
import logging
import os

from ..constants import (
    PROG,
)
from ..loading import load_fastbert, load_model_config
from ..serving.config import ServingOptions
from .common import (
    _add_backend_argument,
    _add_int8_argument,
    _add_model_argument,
    _HelpFormatter,
    _non_negative_float,
    _port,
    _positive_int,
    dataclass_from_namespace,
    input_file,
)


logger = logging.getLogger(__name__)

API_KEY_ENV = "HF_FASTBERT_API_KEY"


def register(commands):
    """Add the `serve` command to `commands` (the subcommands of `hf-fastbert`)."""
    serve = commands.add_parser(
        "serve",
        dataclass_types=[ServingOptions],  # batching, limits and adaptive speed: the server's own settings
        help="Serve the model over HTTP (TEI's /predict API) with dynamic batching and load-adaptive speed.",
        description="An HTTP server (uvicorn) with text-embeddings-inference's POST /predict API plus a per-request "
        "`speed` and each input's exit layer, GET /health, GET /info and Prometheus GET /metrics. Concurrent "
        "requests are batched for the early-exit engine. With --adaptive the speed follows the load: raised when the "
        "p95 latency threatens --target-p95-ms, lowered when the load falls, never past --max-accuracy-drop on the "
        "model's speed/accuracy curve (from `hf-fastbert sweep` or `train`). Needs the serve extra: "
        'pip install "hf-fastbert[serve]".',
        formatter_class=_HelpFormatter,
    )
    _add_model_argument(serve)
    serve.add_argument("--host", default="127.0.0.1", help="Address to bind (0.0.0.0 exposes the server).")
    serve.add_argument("--port", type=_port, default=8080, help="Port to bind.")
    _add_int8_argument(serve)
    _add_backend_argument(serve)
    serve.add_argument(
        "--api-key-file",
        help="A file holding an API key: every route but /health then needs `Authorization: Bearer <key>` (or set "
        f"{API_KEY_ENV}; a key on the command line would show in `ps`).",
    )
    adaptive = serve.add_argument_group("load-adaptive speed")
    adaptive.add_argument(
        "--speed-curve",
        help="Speed/accuracy curve (.json rows with speed, accuracy, flops_speedup; default: "
        "<model>/sweep/sweep.json, else <model>/speed_results.json).",
    )
    serve.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's choice).")
    serve.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"], help="Log level."
    )
    serve.add_argument("--access-log", action="store_true", help="Log every request.")
    serve.add_argument(
        "--timeout-graceful-shutdown",
        type=_non_negative_float,
        default=30.0,
        help="Seconds in-flight requests get to finish at shutdown.",
    )
    serve.set_defaults(run=run_serve, parse=lambda args: dataclass_from_namespace(ServingOptions, args))


def read_api_key(path=None) -> str | None:
    """`serve`'s API key: the first line of `path`, else the `HF_FASTBERT_API_KEY` environment variable, else None."""
    if path is not None:
        lines = input_file(path, "API key file").read_text(encoding="utf-8").splitlines()
        if not lines or not lines[0].strip():
            raise ValueError(f"the API key file {path} is empty")
        return lines[0].strip()
    return os.environ.get(API_KEY_ENV) or None


def run_serve(args):
    from ..serving import ServingConfig, find_speed_curve, load_speed_curve, serve

    if args.adaptive and args.target_p95_ms is None:
        raise ValueError("--adaptive needs --target-p95-ms, the p95 latency target in milliseconds")
    curve = None
    if args.adaptive:
        path = input_file(args.speed_curve, "speed curve") if args.speed_curve else find_speed_curve(args.model)
        if path is None:
            raise ValueError(
                f"--adaptive needs the model's speed/accuracy curve: run `{PROG} sweep {args.model}` or give "
                "--speed-curve"
            )
        curve = load_speed_curve(path, exit_rule=getattr(load_model_config(args.model)[1], "exit_rule", None))
    config = ServingConfig(
        **dataclasses.asdict(args.config),  # the ServingOptions parsed from the command line
        api_key=read_api_key(args.api_key_file),
        speed_curve=curve,
        model_id=args.model,
    )
    model, tokenizer = load_fastbert(args.model, int8=args.int8, backend=args.backend, embeddings=True)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    serve(
        model,
        tokenizer,
        host=args.host,
        port=args.port,
        config=config,
        log_level=args.log_level,
        access_log=args.access_log,
        timeout_graceful_shutdown=args.timeout_graceful_shutdown,
    )

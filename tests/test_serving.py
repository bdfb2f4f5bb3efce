"""The HTTP server: TEI's API, dynamic batching, errors, shutdown, and the adaptive speed controller (fake clock)."""

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch
from tiny_models import FAMILIES, VOCAB_SIZE, family_model, sentiment_fastbert

from hf_fastbert.serving import (
    AdaptiveSpeedController,
    DynamicBatcher,
    Overloaded,
    RequestError,
    ServingConfig,
    ServingOptions,
    create_app,
    parse_inputs,
    parse_predict_request,
    speed_ladder,
)


uvicorn = pytest.importorskip("uvicorn")

WORDS = "the a film movie good bad great awful plot actor boring fun long short gem mess".split()
TEXTS = [
    "the film good",
    "a bad movie long boring",
    "gem",
    "the plot actor awful mess fun",
    "great fun",
    "short mess",
    "the the the",
    "actor",
]
CURVE = [  # a speed/accuracy curve as `hf-fastbert sweep` writes it
    {"speed": 0.0, "accuracy": 0.80, "flops_speedup": 1.0},
    {"speed": 0.1, "accuracy": 0.80, "flops_speedup": 0.97},
    {"speed": 0.2, "accuracy": 0.80, "flops_speedup": 1.2},
    {"speed": 0.3, "accuracy": 0.80, "flops_speedup": 1.22},
    {"speed": 0.4, "accuracy": 0.797, "flops_speedup": 1.6},
    {"speed": 0.5, "accuracy": 0.793, "flops_speedup": 2.0},
    {"speed": 0.6, "accuracy": 0.78, "flops_speedup": 2.5},
    {"speed": 0.7, "accuracy": 0.795, "flops_speedup": 3.0},
]


# ----------------------------------------------------------------------------------------------------
# Pure parts: request parsing, the speed ladder, the controller on a fake clock
# ----------------------------------------------------------------------------------------------------


def test_inputs_follow_tei_shapes():
    assert parse_inputs("a text") == ([("a text", None)], True)
    assert parse_inputs(["a text"]) == ([("a text", None)], True)
    assert parse_inputs(["first", "second"]) == ([("first", "second")], True)  # TEI: two strings are ONE pair
    assert parse_inputs([["a"], ["b", "c"]]) == ([("a", None), ("b", "c")], False)
    for bad, status, message in [
        ([], 400, "cannot be empty"),
        (["a", "b", "c"], 422, "a batch is a list of lists"),
        ([["a", "b", "c"]], 422, "inputs[0]"),
        ([["a"], "b"], 422, "inputs[1]"),
        (3, 422, "must be a string"),
        ([[1]], 422, "inputs[0]"),
    ]:
        with pytest.raises(RequestError, match=message.replace("[", r"\[")) as error:
            parse_inputs(bad)
        assert error.value.status == status


def test_predict_request_fields():
    request = parse_predict_request(
        {"inputs": "x", "raw_scores": True, "truncate": True, "truncation_direction": "Left", "speed": 0.4}
    )
    assert (request.raw_scores, request.truncate, request.truncation_direction, request.speed) == (
        True,
        True,
        "left",
        0.4,
    )
    assert parse_predict_request({"inputs": "x", "parameters": {"top_k": None}}).speed is None  # unknown: ignored
    for body, message in [
        ({"text": "x"}, "no `inputs` field"),
        (["x"], "JSON object"),
        ({"inputs": "x", "speed": 1.5}, "`speed` must be a number in"),
        ({"inputs": "x", "speed": True}, "`speed` must be a number in"),
        ({"inputs": "x", "speed": "fast"}, "`speed` must be a number in"),
        ({"inputs": "x", "raw_scores": "yes"}, "`raw_scores` must be true or false"),
        ({"inputs": "x", "truncation_direction": "up"}, "truncation_direction"),
    ]:
        with pytest.raises(RequestError, match=message) as error:
            parse_predict_request(body)
        assert error.value.status == 422


def test_speed_ladder_stops_at_the_accuracy_floor_and_skips_useless_speeds():
    ladder = speed_ladder(CURVE, max_accuracy_drop=0.01)
    # 0.1 is slower than 0.0, 0.3 gains under 5% over 0.2; 0.6 falls below the floor (0.79): the ladder stops there,
    # although 0.7 is back above it.
    assert [rung["speed"] for rung in ladder] == [0.0, 0.2, 0.4, 0.5]
    assert [rung["speed"] for rung in speed_ladder(CURVE, max_accuracy_drop=0.0)] == [0.0, 0.2]
    interpolated = speed_ladder(CURVE, max_accuracy_drop=0.01, min_speed=0.45)
    assert interpolated[0] == pytest.approx({"speed": 0.45, "accuracy": 0.795, "flops_speedup": 1.8})
    assert [rung["speed"] for rung in interpolated] == [0.45, 0.5]
    with pytest.raises(ValueError, match="already past the accuracy floor"):
        speed_ladder(CURVE, max_accuracy_drop=0.005, min_speed=0.6)
    with pytest.raises(ValueError, match="speed-0"):
        speed_ladder(CURVE[1:], max_accuracy_drop=0.01)


def test_speed_ladder_with_a_confidence_reads_each_speed_at_its_lower_bound():
    # 1.645 x 0.005 = 0.008: speed 0.4 (drop 0.003) then fails a one-point floor at 95%, and the ladder stops there.
    curve = [dict(row, accuracy_drop_se=0.0 if row["speed"] == 0 else 0.005) for row in CURVE]
    assert [rung["speed"] for rung in speed_ladder(curve, max_accuracy_drop=0.01)] == [0.0, 0.2, 0.4, 0.5]
    ladder = speed_ladder(curve, max_accuracy_drop=0.01, confidence=0.95)
    assert [rung["speed"] for rung in ladder] == [0.0, 0.2]
    assert set(ladder[-1]) == {"speed", "accuracy", "flops_speedup"}
    with pytest.raises(ValueError, match="already past the accuracy floor at 95% confidence"):
        speed_ladder(curve, max_accuracy_drop=0.01, min_speed=0.45, confidence=0.95)
    with pytest.raises(ValueError, match="lacks .*sweep"):
        speed_ladder(CURVE, max_accuracy_drop=0.01, confidence=0.95)
    with pytest.raises(ValueError, match="confidence must be a probability"):
        speed_ladder(curve, max_accuracy_drop=0.01, confidence=1.5)


def test_serving_options_check_the_accuracy_confidence():
    ServingOptions(adaptive=True, target_p95_ms=50, accuracy_confidence=0.95)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        ServingOptions(adaptive=True, target_p95_ms=50, accuracy_confidence=95)
    with pytest.raises(ValueError, match="give it with `adaptive`"):
        ServingOptions(accuracy_confidence=0.95)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def closed_loop_latency(clients, cost, per_input=0.01):
    """Latency of `clients` closed-loop clients when one input costs `per_input * cost` seconds (Little's law)."""
    return clients * per_input * cost


def test_controller_raises_under_load_and_lowers_after():
    clock = FakeClock()
    ladder = speed_ladder(CURVE, max_accuracy_drop=0.01)  # speeds 0, 0.2, 0.4, 0.5
    controller = AdaptiveSpeedController(ladder, target_latency=0.2, clock=clock)
    history = []

    def run(clients, seconds, step=0.1):
        for _ in range(round(seconds / step)):
            clock.now += step
            latency = closed_loop_latency(clients, controller.costs[controller.level])
            for _ in range(5):
                controller.observe(latency, controller.speed)
            history.append((clock.now, controller.update(queue_delay=latency / 2)))

    run(clients=1, seconds=5)  # 10 ms: nothing to do
    assert {speed for _, speed in history} == {0.0}
    run(clients=32, seconds=10)  # 320 ms at speed 0, 1.6 x the 200 ms target
    assert controller.speed == 0.5  # 160 ms = 0.8 x target at 0.5: the top rung inside the floor
    raised_at = next(t for t, speed in history if speed > 0)
    assert raised_at <= 5.3  # reacts at once (10 requests measured), not after a window
    assert max(speed for _, speed in history) <= 0.5  # never past the floor
    run(clients=11, seconds=10)  # 55 ms at the top; predicted 110 ms at speed 0, over lower_at x target (100 ms)
    assert controller.speed == 0.2  # predicted 92 ms: the slowest rung predicted under 100 ms
    run(clients=1, seconds=10)
    assert controller.speed == 0.0
    # changes happen only after the dwell times
    times = [t for t, _ in controller.changes]
    assert all(
        later - earlier >= controller.raise_interval - 1e-9 for earlier, later in zip(times, times[1:], strict=False)
    )


def test_controller_respects_intervals_and_reacts_to_queueing_delay():
    clock = FakeClock()
    controller = AdaptiveSpeedController(
        [
            {"speed": 0.0, "flops_speedup": 1.0},
            {"speed": 0.3, "flops_speedup": 1.5},
            {"speed": 0.6, "flops_speedup": 2.5},
        ],
        target_latency=0.1,
        clock=clock,
    )
    clock.now = 0.1
    assert controller.update(queue_delay=0.05) == 0.0  # 0.5 x target: fine
    assert controller.update(queue_delay=0.09) == 0.0  # too soon after start (raise_interval 0.5 s)
    clock.now = 0.6
    assert controller.update(queue_delay=0.09) == 0.3  # the oldest input's wait alone threatens the target
    clock.now = 0.8
    assert controller.update(queue_delay=0.5) == 0.3  # too soon after the last change
    clock.now = 1.2
    assert controller.update(queue_delay=0.5) == 0.6
    for _ in range(20):  # an old request served at speed 0.3 is not counted at 0.6
        controller.observe(1.0, speed=0.3)
    clock.now = 2.0
    assert controller.update() == 0.6  # no load, but lower_interval (2 s) has not passed
    clock.now = 3.3
    assert controller.update() == 0.3  # idle: one rung down at a time
    clock.now = 5.4
    assert controller.update() == 0.0
    with pytest.raises(ValueError, match="increase"):
        AdaptiveSpeedController([{"speed": 0.2, "flops_speedup": 1}, {"speed": 0.1, "flops_speedup": 2}], 0.1)


# ----------------------------------------------------------------------------------------------------
# The batcher, without HTTP
# ----------------------------------------------------------------------------------------------------


def test_batcher_gathers_concurrent_inputs_and_answers_each_its_own():
    batches = []

    def run_batch(encodings, speed):  # logits that name the input
        batches.append((len(encodings), speed))
        ids = torch.tensor([encoding["input_ids"][0] for encoding in encodings], dtype=torch.float)
        return torch.stack([ids, -ids], dim=1), torch.full((len(encodings),), 2)

    async def scenario():
        batcher = DynamicBatcher(run_batch, max_batch_size=4, max_wait=0.05, max_queue_size=7)
        batcher.start()
        futures = [batcher.submit([{"input_ids": [index]}]) for index in range(5)]
        futures.append(batcher.submit([{"input_ids": [10]}, {"input_ids": [11]}], speed=0.7))
        with pytest.raises(Overloaded, match="queue is full"):
            batcher.submit([{"input_ids": [99]}])
        results = [await asyncio.gather(*request) for request in futures]
        await batcher.close()
        return results

    results = asyncio.run(scenario())
    assert [[int(result.output[0]) for result in request] for request in results] == [
        [0],
        [1],
        [2],
        [3],
        [4],
        [10, 11],
    ]
    assert [result.speed for result in results[-1]] == [0.7, 0.7] and results[0][0].speed == 0.0
    # 4 inputs in the first batch, then the rest: one forward pass per speed
    assert batches == [(4, 0.0), (1, 0.0), (2, 0.7)]


# ----------------------------------------------------------------------------------------------------
# The HTTP server on 127.0.0.1
# ----------------------------------------------------------------------------------------------------


@contextmanager
def running(app):
    """Serve `app` with uvicorn on a free loopback port in a thread; yields (base URL, uvicorn server)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=20))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def post(url, body, raw=False):
    """POST JSON with the standard library; returns (status, decoded JSON, headers)."""
    data = body if raw else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), error.headers


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.fixture(scope="module")
def model_and_tokenizer():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield sentiment_fastbert(WORDS)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server_url(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    app = create_app(model, tokenizer, ServingConfig(max_wait_ms=20, max_client_batch_size=8, max_input_length=12))
    with running(app) as (url, _):
        yield url


def offline(model, tokenizer, texts, pairs=None, speed=None):
    """What the model gives for these inputs, one batch, the usual way."""
    with torch.no_grad():
        output = model(**tokenizer(texts, pairs, padding=True, return_tensors="pt"), speed=speed)
    return output.logits, output.exit_layers


def check(predictions, logits, exit_layer, labels=("negative", "positive"), speed=0.3, raw=False):
    scores, exit_layer = (logits if raw else logits.softmax(-1)), int(exit_layer)
    expected = sorted(zip(scores.tolist(), labels, strict=True), reverse=True)
    assert [entry["label"] for entry in predictions] == [label for _, label in expected]
    assert [entry["score"] for entry in predictions] == pytest.approx([score for score, _ in expected], abs=1e-5)
    assert {entry["exit_layer"] for entry in predictions} == {exit_layer}
    assert {entry["speed"] for entry in predictions} == {speed}


def test_responses_equal_offline_predictions(server_url, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    logits, exits = offline(model, tokenizer, TEXTS[:1])
    status, body, headers = post(f"{server_url}/predict", {"inputs": TEXTS[0]})
    assert status == 200 and headers["x-fastbert-speed"] == "0.3"
    check(body, logits[0], exits[0])

    batch = [[text] for text in TEXTS[:6]] + [["gem", "bad bad"]]
    status, body, _ = post(f"{server_url}/predict", {"inputs": batch, "speed": 0.6})
    assert status == 200 and len(body) == 7
    logits, exits = offline(model, tokenizer, TEXTS[:6], speed=0.6)
    pair_logits, pair_exits = offline(model, tokenizer, ["gem"], ["bad bad"], speed=0.6)
    for predictions, row, layer in zip(body, [*logits, pair_logits[0]], [*exits, pair_exits[0]], strict=True):
        check(predictions, row, layer, speed=0.6)
    assert len({entry[0]["exit_layer"] for entry in body}) > 1  # the speed matters: samples exit at various layers

    status, body, _ = post(f"{server_url}/", {"inputs": ["gem", "bad bad"], "raw_scores": True, "speed": 0})
    assert status == 200
    check(body, *[value[0] for value in offline(model, tokenizer, ["gem"], ["bad bad"], speed=0)], speed=0, raw=True)


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server_url, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    texts = [f"{a} {b}" for a in WORDS[:6] for b in WORDS[4:8]]  # 24 distinct inputs
    logits, exits = offline(model, tokenizer, texts)
    _, before = get(f"{server_url}/metrics")
    with ThreadPoolExecutor(len(texts)) as pool:
        responses = list(pool.map(lambda text: post(f"{server_url}/predict", {"inputs": text}), texts))
    for (status, body, _), row, layer in zip(responses, logits, exits, strict=True):
        assert status == 200
        check(body, row, layer)
    _, after = get(f"{server_url}/metrics")
    batches = metric(after, "fastbert_batch_size_count") - metric(before, "fastbert_batch_size_count")
    assert metric(after, "fastbert_inputs_total") - metric(before, "fastbert_inputs_total") == len(texts)
    assert batches < len(texts)  # requests shared forward passes


def metric(exposition, name):
    lines = [line for line in exposition.splitlines() if line and not line.startswith("#")]
    return sum(float(line.split()[-1]) for line in lines if line.split("{")[0].split()[0] == name)


def test_stock_tei_client(server_url, model_and_tokenizer):
    from huggingface_hub import InferenceClient

    model, tokenizer = model_and_tokenizer
    logits, _ = offline(model, tokenizer, ["great fun"])
    top = InferenceClient(model=server_url).text_classification("great fun")  # POST / as on a TEI endpoint
    assert top.label == ("negative", "positive")[int(logits[0].argmax())]
    assert top.score == pytest.approx(float(logits[0].softmax(-1).max()), abs=1e-5)


def test_bad_requests_get_named_errors(server_url):
    too_long = " ".join(["film"] * 20)
    cases = [
        (b"{not json", 400, "validation", "not valid JSON"),
        ({"inputs": []}, 400, "empty", "cannot be empty"),
        ({"inputs": [["film"]] * 9}, 413, "validation", "batch size 9 > maximum allowed batch size 8"),
        ({"inputs": "film", "speed": -0.1}, 422, "validation", "`speed` must be a number in [0, 1]"),
        ({"inputs": too_long}, 413, "validation", "has 22 tokens, more than the maximum 12"),
        ({"inputs": [["gem"], [too_long]]}, 413, "validation", "input 1 has 22 tokens"),
        ({"inputs": ["a", "b", "c"]}, 422, "validation", "a batch is a list of lists"),
        ({"input": "film"}, 422, "validation", "no `inputs` field"),
        # JSON the parser accepts or refuses in ways a tokenizer or json.loads would turn into a 500
        (b'{"inputs": "film \\ud800"}', 422, "validation", "not valid Unicode text"),
        (b"[" * 200_000 + b"]" * 200_000, 400, "validation", "not valid JSON"),
        (b'{"inputs": "film", "speed": ' + b"9" * 5000 + b"}", 400, "validation", "not valid JSON"),
    ]
    for body, status, error_type, message in cases:
        code, answer, _ = post(f"{server_url}/predict", body, raw=isinstance(body, bytes))
        assert (code, answer["error_type"]) == (status, error_type), body
        assert message in answer["error"]
    status, body, _ = post(f"{server_url}/predict", {"inputs": too_long, "truncate": True})
    assert status == 200 and len(body) == 2
    _, exposition = get(f"{server_url}/metrics")
    assert metric(exposition, "fastbert_errors_total") >= len(cases)


def test_health_info_and_metrics(server_url):
    assert get(f"{server_url}/health") == (200, '{"status":"ok"}')
    status, text = get(f"{server_url}/info")
    info = json.loads(text)
    assert status == 200
    assert info["labels"] == ["negative", "positive"] and info["num_layers"] == 4
    assert info["model_type"]["classifier"]["id2label"] == {"0": "negative", "1": "positive"}
    assert (info["default_speed"], info["speed"], info["mode"], info["max_input_length"]) == (0.3, 0.3, "fixed", 12)
    post(f"{server_url}/predict", {"inputs": "gem"})
    status, exposition = get(f"{server_url}/metrics")
    assert status == 200
    for name in (
        'fastbert_requests_total{status="200"}',
        "fastbert_request_duration_seconds_bucket",
        "fastbert_batch_size_bucket",
        "fastbert_exit_layer_sum",
        "fastbert_mean_exit_layer",
        "fastbert_queue_size",
    ):
        assert name in exposition
    assert metric(exposition, "fastbert_speed") == 0.3
    assert 1 <= metric(exposition, "fastbert_mean_exit_layer") <= 4


class Gate:
    """Holds the engine until opened, to fill the queue deterministically."""

    def __init__(self, run_batch):
        self.run_batch, self.opened, self.entered = run_batch, threading.Event(), threading.Event()

    def __call__(self, encodings, speed):
        self.entered.set()
        assert self.opened.wait(30)
        return self.run_batch(encodings, speed)


def wait_for(condition, seconds=30):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_full_queue_answers_429_and_shutdown_answers_every_accepted_request(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    config = ServingConfig(max_batch_size=2, max_wait_ms=0, max_queue_size=4, max_client_batch_size=2)
    app = create_app(model, tokenizer, config)
    server = app.state.server
    gate = Gate(server.batcher.run_batch)
    server.batcher.run_batch = gate
    texts = TEXTS[:6]
    with running(app) as (url, uvicorn_server), ThreadPoolExecutor(3) as pool:
        first = pool.submit(post, f"{url}/predict", {"inputs": [[text] for text in texts[:2]]})
        assert gate.entered.wait(30)  # its batch holds the engine
        second = pool.submit(post, f"{url}/predict", {"inputs": [[text] for text in texts[2:4]]})
        third = pool.submit(post, f"{url}/predict", {"inputs": [[text] for text in texts[4:6]]})
        wait_for(lambda: server.batcher.queue_size == 4)  # the queue is full
        status, body, _ = post(f"{url}/predict", {"inputs": "gem"})
        assert (status, body["error_type"]) == (429, "overloaded") and "queue is full" in body["error"]
        uvicorn_server.should_exit = True  # shut down with 6 inputs accepted and unanswered
        time.sleep(0.3)
        gate.opened.set()
        answers = [future.result(timeout=60) for future in (first, second, third)]
    logits, exits = offline(model, tokenizer, texts)
    for index, (status, body, _) in enumerate(answers):
        assert status == 200
        for offset, predictions in enumerate(body):
            check(predictions, logits[2 * index + offset], exits[2 * index + offset])
    with pytest.raises(urllib.error.URLError):  # closed
        urllib.request.urlopen(f"{url}/health", timeout=5)


def test_adaptive_mode_serves_the_controller_speed(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    clock = FakeClock()
    ladder = speed_ladder(CURVE, max_accuracy_drop=0.01, min_speed=0.3)
    controller = AdaptiveSpeedController(ladder, target_latency=0.05, clock=clock)
    config = ServingConfig(adaptive=True, speed_curve=CURVE, target_p95_ms=50, max_wait_ms=0)
    app = create_app(model, tokenizer, config, controller=controller)
    with running(app) as (url, _):
        info = json.loads(get(f"{url}/info")[1])
        assert info["mode"] == "adaptive" and [rung["speed"] for rung in info["adaptive"]["ladder"]] == [0.3, 0.4, 0.5]
        assert post(f"{url}/predict", {"inputs": "gem"})[2]["x-fastbert-speed"] == "0.3"
        for _ in range(20):
            controller.observe(0.2, 0.3)  # 4 x the target
        clock.now = 1.0
        status, body, headers = post(f"{url}/predict", {"inputs": "gem"})
        assert status == 200 and headers["x-fastbert-speed"] == "0.5" and body[0]["speed"] == 0.5
        check(body, *[value[0] for value in offline(model, tokenizer, ["gem"], speed=0.5)], speed=0.5)
        assert post(f"{url}/predict", {"inputs": "gem", "speed": 0.1})[1][0]["speed"] == 0.1  # the request's own
        exposition = get(f"{url}/metrics")[1]
        assert metric(exposition, "fastbert_speed") == 0.5 and metric(exposition, "fastbert_speed_changes_total") == 1


def test_adaptive_mode_holds_the_floor_at_the_accuracy_confidence(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    curve = [dict(row, accuracy_drop_se=0.0 if row["speed"] == 0 else 0.005) for row in CURVE]
    for confidence, speeds in ((None, [0.0, 0.2, 0.4, 0.5]), (0.95, [0.0, 0.2])):
        config = ServingConfig(
            adaptive=True, speed_curve=curve, target_p95_ms=50, speed=0.0, accuracy_confidence=confidence
        )
        with running(create_app(model, tokenizer, config)) as (url, _):
            assert [rung["speed"] for rung in json.loads(get(f"{url}/info")[1])["adaptive"]["ladder"]] == speeds


def test_serving_config_validation():
    with pytest.raises(ValueError, match="speed curve"):
        ServingConfig(adaptive=True, target_p95_ms=100)
    with pytest.raises(ValueError, match="target_p95_ms"):
        ServingConfig(adaptive=True, speed_curve=CURVE)
    with pytest.raises(ValueError, match="max_batch_size"):
        ServingConfig(max_batch_size=0)
    with pytest.raises(ValueError, match="speed"):
        ServingConfig(speed=2.0)


# ----------------------------------------------------------------------------------------------------
# The `serve` command
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(model_and_tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("fastbert")
    model, tokenizer = model_and_tokenizer
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_serve_command_parses_its_options_into_the_library_call(model_dir, monkeypatch, capsys):
    from hf_fastbert.cli import main

    calls = []
    monkeypatch.setattr("hf_fastbert.serving.serve", lambda *args, **kwargs: calls.append((args, kwargs)))
    assert main(["serve", str(model_dir), "--adaptive"]) == 1
    assert "--target-p95-ms" in capsys.readouterr().err
    assert main(["serve", str(model_dir), "--adaptive", "--target-p95-ms", "100"]) == 1
    assert "speed/accuracy curve" in capsys.readouterr().err
    (model_dir / "sweep").mkdir()
    (model_dir / "sweep" / "sweep.json").write_text(json.dumps(CURVE))
    argv = ["serve", str(model_dir), "--port", "9000", "--adaptive", "--target-p95-ms", "100", "--max-wait-ms", "2"]
    assert main([*argv, "--max-accuracy-drop", "0.02", "--max-batch-size", "16"]) == 0
    (model, tokenizer), kwargs = calls[-1]
    config = kwargs["config"]
    assert (kwargs["host"], kwargs["port"]) == ("127.0.0.1", 9000)
    assert (config.adaptive, config.target_p95_ms, config.max_accuracy_drop) == (True, 100, 0.02)
    assert (config.max_batch_size, config.max_wait_ms, config.speed_curve) == (16, 2, CURVE)
    assert type(model).__name__ == "FastBertForSequenceClassification" and tokenizer is not None


def test_serve_command_end_to_end_with_graceful_sigterm(model_dir):
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "hf_fastbert", "serve", str(model_dir), "--port", str(port), "--speed", "0.6"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if get(f"{url}/health")[0] == 200:
                    break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.1)
        status, body, headers = post(f"{url}/predict", {"inputs": [["gem"], ["a bad movie long boring"]]})
        assert status == 200 and headers["x-fastbert-speed"] == "0.6" and len(body) == 2
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0]
    assert process.returncode in (0, -signal.SIGTERM), output  # uvicorn re-raises the signal once it has shut down
    assert "Shutting down" in output and "FastBERT server ready" in output


@pytest.mark.parametrize("family", FAMILIES)
def test_every_backbone_family_is_served_like_offline(family):
    from transformers import BertTokenizerFast

    from hf_fastbert.serving import FastBertServer

    words = [f"w{i}" for i in range(VOCAB_SIZE - 5)]
    tokenizer = BertTokenizerFast(
        vocab={t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words)}
    )
    model = family_model(family)
    if "token_type_ids" not in model.backbone.embedding_inputs:
        tokenizer.model_input_names = ["input_ids", "attention_mask"]
    texts = [" ".join(words[i : i + 3 + i % 5]) for i in range(0, 40, 5)]
    server = FastBertServer(model, tokenizer, ServingConfig(max_wait_ms=0, max_batch_size=3))

    async def ask():
        server.batcher.start()
        try:
            return await server.predict(json.dumps({"inputs": [[text] for text in texts], "speed": 0.5}).encode())
        finally:
            await server.batcher.close()

    body, _ = asyncio.run(ask())
    logits, exits = offline(model, tokenizer, texts, speed=0.5)
    for predictions, row, layer in zip(body, logits, exits, strict=True):
        check(predictions, row, layer, labels=[model.config.id2label[i] for i in range(3)], speed=0.5)


def test_body_limit_is_checked_before_the_body_is_read(model_and_tokenizer):
    import http.client

    model, tokenizer = model_and_tokenizer
    app = create_app(model, tokenizer, ServingConfig(max_request_bytes=1000))
    body = json.dumps({"inputs": "film " * 400}).encode()
    with running(app) as (url, _):
        status, answer, _ = post(f"{url}/predict", body, raw=True)  # with Content-Length: refused from the header
        assert (status, answer["error_type"]) == (413, "validation") and "more than 1000" in answer["error"]
        connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)  # chunked: no length
        connection.request("POST", "/predict", body=iter([body[:600], body[600:]]), encode_chunked=True,
                           headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})  # fmt: skip
        response = connection.getresponse()
        assert response.status == 413 and "more than 1000 bytes" in json.loads(response.read())["error"]
        connection.close()
        assert post(f"{url}/predict", {"inputs": "a gem"})[0] == 200


def test_api_key_guards_every_route_but_health(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    app = create_app(model, tokenizer, ServingConfig(api_key="s3cret"))

    def call(path, key=None, body=None):
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    with running(app) as (url, _):
        for path, body in ((f"{url}/predict", {"inputs": "a gem"}), (f"{url}/info", None), (f"{url}/metrics", None)):
            assert call(path, body=body) == 401
            assert call(path, "wrong", body=body) == 401
            assert call(path, "s3cret", body=body) == 200
        assert call(f"{url}/health") == 200
    with pytest.raises(ValueError, match="api_key must be a non-empty string"):
        ServingConfig(api_key=" ")


def test_tokenizing_a_request_does_not_block_the_event_loop(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    app = create_app(model, tokenizer, ServingConfig())
    server = app.state.server
    encode = server.encode

    entered, release, blocked = threading.Event(), threading.Event(), []

    def slow_encode(request):  # a 2 MB body's tokenization, in time: it lasts until /health has answered
        entered.set()
        blocked.append(not release.wait(timeout=30))  # True: /health never answered while this ran
        return encode(request)

    monkeypatch.setattr(server, "encode", slow_encode)
    with running(app) as (url, _):
        slow = threading.Thread(target=post, args=(f"{url}/predict", {"inputs": "a gem"}))
        slow.start()
        assert entered.wait(timeout=30)
        assert get(f"{url}/health")[0] == 200
        release.set()
        slow.join()
    assert blocked == [False]  # answered while the request was still being tokenized


def test_serve_options_are_the_serving_options_fields_declared_once(capsys):
    import dataclasses

    from hf_fastbert.cli import build_parser, main
    from hf_fastbert.serving import ServingOptions

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    options = {option for action in serve._actions for option in action.option_strings}
    for field in dataclasses.fields(ServingOptions):
        assert f"--{field.name.replace('_', '-')}" in options, field.name
    assert not {"--api-key", "--speed-curve-rows", "--model-id"} & options  # a key on the command line shows in ps
    assert main(["serve", "some-model", "--max-queue-size", "4", "--max-client-batch-size", "8"]) == 2
    assert "--max-queue-size must be at least --max-client-batch-size" in capsys.readouterr().err
    args = build_parser().parse_args(["serve", "--auto-truncate", "--adaptive", "some-model"])
    assert args.auto_truncate and args.adaptive and args.model == "some-model"  # flags take no value


# ----------------------------------------------------------------------------------------------------
# /embed: a FastBERT sentence embedding model behind TEI's embedding route
# ----------------------------------------------------------------------------------------------------


def test_embed_request_fields():
    from hf_fastbert.serving.schemas import parse_embed_request

    request = parse_embed_request({"inputs": ["a", "b"], "normalize": False, "truncate": True, "speed": 0.2})
    assert (request.texts, request.single, request.normalize, request.truncate, request.speed) == (
        ["a", "b"], False, False, True, 0.2,
    )  # fmt: skip
    assert parse_embed_request({"inputs": "a"}).single and parse_embed_request({"inputs": "a"}).normalize
    for bad, status, message in [
        ({"inputs": []}, 400, "cannot be empty"),
        ({"inputs": [["a"]]}, 422, "list of strings"),
        ({"inputs": "a", "normalize": "yes"}, 422, "`normalize`"),
        ({"inputs": "a", "speed": 2}, 422, "`speed`"),
        (["a"], 422, "JSON object"),
    ]:
        with pytest.raises(RequestError, match=message) as error:
            parse_embed_request(bad)
        assert error.value.status == status


def test_embed_route_answers_with_the_models_embeddings(model_and_tokenizer, server_url):
    from hf_fastbert import FastBertConfig, FastBertForSentenceEmbedding

    _, tokenizer = model_and_tokenizer
    torch.manual_seed(0)
    config = FastBertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=37, embedding_heads_distilled=True,
    )  # fmt: skip
    model = FastBertForSentenceEmbedding(config).eval()
    app = create_app(model, tokenizer, ServingConfig(max_wait_ms=5))
    with running(app) as (url, _):
        for speed in (0.0, 0.9):
            status, body, headers = post(f"{url}/embed", {"inputs": TEXTS[:3], "speed": speed})
            assert status == 200 and len(body) == 3 and len(body[0]) == 32
            batch = tokenizer(TEXTS[:3], padding=True, return_tensors="pt")
            with torch.no_grad():
                expected = model(**batch, speed=speed)
            torch.testing.assert_close(torch.tensor(body), expected.embeddings, rtol=0, atol=1e-5)
            assert headers["x-fastbert-exit-layers"] == ",".join(map(str, expected.exit_layers.tolist()))
        status, body, _ = post(f"{url}/embed", {"inputs": "gem"})
        assert status == 200 and len(body) == 1  # TEI: a list of embeddings, also for one string
        status, info = get(f"{url}/info")
        assert json.loads(info)["model_type"] == {"embedding": {"pooling": "mean"}}
        status, body, _ = post(f"{url}/predict", {"inputs": "gem"})
        assert status == 424 and "/embed" in body["error"]
    status, body, _ = post(f"{server_url}/embed", {"inputs": "gem"})  # the classifier's server
    assert status == 424 and "/predict" in body["error"]

"""Serving benchmark: `hf-fastbert serve` on 127.0.0.1 under 1, 8 and 32 concurrent clients (CPU).

The trained demo model (`make demo`: all-MiniLM-L6-v2 fine-tuned and self-distilled on Rotten Tomatoes) answers
real held-out snippets (the test split of `hf_fastbert.demo_data.load_rotten_tomatoes`, never seen in training or
calibration), one snippet per request, from closed-loop clients (each sends its next request when the last one is
answered) over keep-alive HTTP connections, for a fixed number of requests per run. Server modes, each a fresh
`hf-fastbert serve` process with 1 torch thread, dynamic batching (32 inputs, 5 ms):

- speed 0 (every layer: BERT's answer and cost);
- the calibrated no-loss speed (`calibrate --max-accuracy-drop 0` on the validation split);
- speed 0.5;
- adaptive: from the calibrated speed up the validation curve's ladder (accuracy floor `--max-accuracy-drop`), with a
  p95 target that speed 0 misses at 32 clients (by default 0.7 x speed 0's measured p95 there).

Reported per run: throughput, client-side p50/p95/p99 latency, accuracy on the gold labels, mean exit layer, mean
batch size (from the server's /metrics) and the speeds served. A last run drives a fresh adaptive server through
1 -> 32 -> 1 clients and records the speed it serves over time (plot).

Usage:
    make demo                                    # once: trains outputs/fastbert-demo (about 7 minutes)
    python benchmarks/bench_serving.py           # about 4 minutes on 2 CPU cores
"""

import argparse
import http.client
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]
CLIENTS = (1, 8, 32)
REQUESTS = {1: 100, 8: 300, 32: 600}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "outputs" / "fastbert-demo"), help="The trained demo model.")
    parser.add_argument("--output-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--work-dir", default=str(ROOT / "outputs" / "bench_serving"), help="Curve file, server logs.")
    parser.add_argument("--target-p95-ms", type=float, help="Adaptive target (default: 0.7 x speed 0 p95 at 32).")
    parser.add_argument("--max-accuracy-drop", type=float, default=0.01, help="Adaptive accuracy floor (fraction).")
    parser.add_argument("--scale", type=float, default=1.0, help="Multiply the request counts (0.2 for a smoke run).")
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds (medians are reported).")
    return parser.parse_args()


# ----------------------------------------------------------------------------------------------------
# Offline: calibration on validation data, exact accuracy and FLOPs on the requests
# ----------------------------------------------------------------------------------------------------


def full_pass(model, tokenizer, split):
    """Every classifier's logits on a split (no truncation: what the server sees), token lengths, labels."""
    from datasets import Dataset

    from hf_fastbert.evaluation import predict_all_logits
    from hf_fastbert.prediction import tokenize

    rows = tokenize(tokenizer, list(split["text"]))
    for row, label in zip(rows, split["label"], strict=True):
        row["labels"] = label
    return predict_all_logits(model, Dataset.from_list(rows), batch_size=64)


def offline_analysis(model_dir, work_dir, drop):
    from hf_fastbert.analysis import calibrate_speed
    from hf_fastbert.constants import CALIBRATION_SPEEDS
    from hf_fastbert.demo_data import load_rotten_tomatoes
    from hf_fastbert.evaluation import metrics_at_speeds
    from hf_fastbert.loading import load_fastbert

    model, tokenizer = load_fastbert(model_dir)
    splits = load_rotten_tomatoes()
    all_logits, lengths, labels = full_pass(model, tokenizer, splits["validation"])
    validation = metrics_at_speeds(all_logits, lengths, model.config, CALIBRATION_SPEEDS, labels=labels)
    no_loss = calibrate_speed(validation, max_accuracy_drop=0.0)["speed"]
    curve = [row for row in validation if round(row["speed"] * 100) % 5 == 0]  # a 0.05 grid for the ladder
    curve_path = Path(work_dir) / "validation_curve.json"
    curve_path.write_text(json.dumps(curve, indent=1))
    test = splits["test"]
    test_logits, test_lengths, test_labels = full_pass(model, tokenizer, test)
    return {
        "model": model,
        "texts": list(test["text"]),
        "labels": [model.config.id2label[label] for label in test["label"]],
        "test_pass": (test_logits, test_lengths, test_labels),
        "no_loss_speed": no_loss,
        "curve_path": curve_path,
        "validation_curve": curve,
    }


def exact_at(offline, speeds, count):
    """Accuracy, mean exit layer and FLOPs speed-up at each speed on the first `count` test snippets (the requests)."""
    from hf_fastbert.evaluation import metrics_at_speeds

    logits, lengths, labels = offline["test_pass"]
    rows = metrics_at_speeds(logits[:count], lengths[:count], offline["model"].config, speeds, labels=labels[:count])
    return {row["speed"]: row for row in rows}


# ----------------------------------------------------------------------------------------------------
# The server and the clients
# ----------------------------------------------------------------------------------------------------


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, model_dir, extra, log_path, port):
        self.port = port or free_port()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "hf_fastbert", "serve", model_dir, "--port", str(self.port), "--threads", "1"]
        self.log = open(log_path, "w")  # noqa: SIM115
        self.process = subprocess.Popen([*command, *extra], stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: see {log_path}")
            try:
                if self.get("/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start in 120 s")
            time.sleep(0.2)

    def get(self, path):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read().decode()
        finally:
            connection.close()

    def metric(self, name):
        text = self.get("/metrics")[1]
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.split(" ")[0] == name)

    def stop(self):
        self.process.terminate()  # SIGTERM: graceful shutdown
        self.process.wait(timeout=60)
        self.log.close()


def load(server, texts, clients, requests=None, seconds=None):
    """`clients` closed-loop clients; stop after `requests` in total or `seconds`. One record per request."""
    lock = threading.Lock()
    counter = iter(range(10**9))
    records = []
    started = time.perf_counter()

    def client():
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        headers = {"Content-Type": "application/json"}
        while True:
            with lock:
                index = next(counter)
            if requests is not None and index >= requests:
                break
            if seconds is not None and time.perf_counter() - started > seconds:
                break
            body = json.dumps({"inputs": texts[index % len(texts)]})
            sent = time.perf_counter()
            connection.request("POST", "/predict", body, headers)
            response = connection.getresponse()
            answer = json.loads(response.read())
            done = time.perf_counter()
            top = answer[0] if response.status == 200 else {}
            with lock:
                records.append(
                    {
                        "index": index,
                        "sent": sent - started,
                        "latency": done - sent,
                        "status": response.status,
                        "label": top.get("label"),
                        "exit_layer": top.get("exit_layer"),
                        "speed": top.get("speed"),
                    }
                )
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return records


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[max(0, round(fraction * len(ordered) + 0.5) - 1)]


def summarize(records, labels):
    ok = [record for record in records if record["status"] == 200]
    wall = max(r["sent"] + r["latency"] for r in records) - min(r["sent"] for r in records)
    latencies = [1000 * record["latency"] for record in ok]
    speeds = [record["speed"] for record in ok]
    return {
        "requests": len(records),
        "errors": len(records) - len(ok),
        "throughput_rps": len(ok) / wall,
        "p50_ms": percentile(latencies, 0.50),
        "p95_ms": percentile(latencies, 0.95),
        "p99_ms": percentile(latencies, 0.99),
        "accuracy": sum(r["label"] == labels[r["index"] % len(labels)] for r in ok) / len(ok),
        "mean_exit_layer": statistics.fmean(record["exit_layer"] for record in ok),
        "mean_speed": statistics.fmean(speeds),
        "min_speed": min(speeds),
        "max_speed": max(speeds),
    }


def cpu_seconds(pid):
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(server, offline, clients, requests):
    """One run: `requests` requests from `clients` closed-loop clients; summary with batch sizes and server CPU."""
    batches, inputs = server.metric("fastbert_batch_size_count"), server.metric("fastbert_batch_size_sum")
    cpu = cpu_seconds(server.process.pid)
    row = summarize(load(server, offline["texts"], clients, requests=requests), offline["labels"])
    row["server_cpu_ms_per_request"] = 1000 * (cpu_seconds(server.process.pid) - cpu) / row["requests"]
    batches = server.metric("fastbert_batch_size_count") - batches
    row["mean_batch_size"] = (server.metric("fastbert_batch_size_sum") - inputs) / batches
    return row


def median_row(rows):
    """The median of every timing over the rounds; accuracy and speeds over all of them."""
    row = {key: statistics.median(r[key] for r in rows) for key in rows[0] if isinstance(rows[0][key], float)}
    row["requests"] = rows[0]["requests"]
    row["min_speed"] = min(r["min_speed"] for r in rows)
    row["max_speed"] = max(r["max_speed"] for r in rows)
    row["mean_speed"] = statistics.fmean(r["mean_speed"] for r in rows)
    row["errors"] = sum(r["errors"] for r in rows)
    row["rounds"] = rows
    return row


def profile(args, extra, offline, work_dir, phases):
    """A fresh adaptive server through load phases [(clients, seconds)]; every request's time, latency and speed."""
    server = Server(args.model, extra, Path(work_dir) / "server_profile.log", None)
    records, offset = [], 0.0
    try:
        load(server, offline["texts"], 8, requests=64)
        for index, (clients, seconds) in enumerate(phases):
            phase = load(server, offline["texts"], clients, seconds=seconds * max(args.scale, 0.25))
            for record in phase:
                record["sent"] += offset
                record["clients"], record["phase"] = clients, index
            records += phase
            offset = max(record["sent"] + record["latency"] for record in records)
    finally:
        server.stop()
    return records


def plot_profile(records, target_ms, path):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=120)
    top, bottom = figure.subplots(2, 1, sharex=True)
    times = [record["sent"] + record["latency"] for record in records]
    top.scatter(times, [1000 * record["latency"] for record in records], s=2, alpha=0.4, label="request latency")
    top.axhline(target_ms, color="red", linestyle="--", label=f"p95 target {target_ms:.0f} ms")
    top.set_ylabel("latency (ms)")
    top.set_yscale("log")
    top.legend(fontsize=7, loc="upper right")
    bottom.plot(times, [record["speed"] for record in records], drawstyle="steps-post", label="speed served")
    clients = [record["clients"] for record in records]
    twin = bottom.twinx()
    twin.plot(times, clients, color="gray", alpha=0.5, drawstyle="steps-post")
    twin.set_ylabel("clients", color="gray")
    bottom.set_ylabel("speed")
    bottom.set_xlabel("time (s)")
    top.set_title("Adaptive speed: 1 -> 32 -> 1 closed-loop clients", fontsize=10)
    figure.tight_layout()
    figure.savefig(path)


# ----------------------------------------------------------------------------------------------------


def markdown(report):
    lines = [
        f"Serving benchmark ({report['date']}, {report['machine']}; 1 torch thread in the server, clients in another "
        f"process on the same cores; 1-minute load average {report['load_before']:.1f} before, "
        f"{report['load_after']:.1f} after).",
        "",
        "| mode | clients | req/s | p50 ms | p95 ms | p99 ms | accuracy % | mean exit layer | mean batch | speeds "
        "served | FLOPs speed-up | req/s vs speed 0 | server CPU ms/req | CPU vs speed 0 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    base = report["modes"]["speed 0"]
    for name, rows in report["modes"].items():
        for clients, row in rows.items():
            served = (
                f"{row['min_speed']:g}"
                if row["min_speed"] == row["max_speed"]
                else (f"{row['min_speed']:g}-{row['max_speed']:g} (mean {row['mean_speed']:.2f})")
            )
            speedup = row.get("flops_speedup")
            lines.append(
                f"| {name} | {clients} | {row['throughput_rps']:.1f} | {row['p50_ms']:.0f} | {row['p95_ms']:.0f} | "
                f"{row['p99_ms']:.0f} | {100 * row['accuracy']:.1f} | {row['mean_exit_layer']:.2f} | "
                f"{row['mean_batch_size']:.1f} | {served} | {'-' if speedup is None else f'{speedup:.2f}x'} | "
                f"{row['throughput_rps'] / base[clients]['throughput_rps']:.2f}x | "
                f"{row['server_cpu_ms_per_request']:.1f} | "
                f"{base[clients]['server_cpu_ms_per_request'] / row['server_cpu_ms_per_request']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def main():
    args = parse_args()
    if not (Path(args.model) / "config.json").is_file():
        sys.exit(f"{args.model} holds no model: run `make demo` first (it trains outputs/fastbert-demo)")
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    offline = offline_analysis(args.model, work_dir, args.max_accuracy_drop)
    no_loss = offline["no_loss_speed"]
    print(f"calibrated no-loss speed on the validation split: {no_loss:g}", flush=True)

    no_loss_name = f"speed {no_loss:g} (no loss)"
    logs = Path(work_dir)
    servers = {"speed 0": Server(args.model, ["--speed", "0"], logs / "server_speed0.log", None)}
    try:
        load(servers["speed 0"], offline["texts"], 8, requests=64)  # warm-up
        pilot = measure(servers["speed 0"], offline, 32, max(32, round(200 * args.scale)))
        target = args.target_p95_ms or round(0.7 * pilot["p95_ms"], -1)
        print(f"pilot: speed 0 at 32 clients p95 {pilot['p95_ms']:.0f} ms -> adaptive target {target:.0f} ms")
        adaptive = [
            "--adaptive",
            "--speed",
            str(no_loss),
            "--target-p95-ms",
            str(target),
            "--speed-curve",
            str(offline["curve_path"]),
            "--max-accuracy-drop",
            str(args.max_accuracy_drop),
        ]
        adaptive_name = f"adaptive (p95 <= {target:.0f} ms)"
        servers[no_loss_name] = Server(args.model, ["--speed", str(no_loss)], logs / "server_noloss.log", None)
        servers["speed 0.5"] = Server(args.model, ["--speed", "0.5"], logs / "server_speed05.log", None)
        servers[adaptive_name] = Server(args.model, adaptive, logs / "server_adaptive.log", None)
        for server in list(servers.values())[1:]:
            load(server, offline["texts"], 8, requests=64)  # warm-up
        runs = {name: {clients: [] for clients in CLIENTS} for name in servers}
        order = random.Random(0)
        for round_index in range(args.rounds):
            names = list(servers)
            order.shuffle(names)
            for name in names:
                for clients in CLIENTS:
                    requests = max(clients, round(REQUESTS[clients] * args.scale))
                    row = measure(servers[name], offline, clients, requests)
                    runs[name][clients].append(row)
                    print(
                        f"round {round_index + 1} {name:>24} | {clients:>2} clients | {row['throughput_rps']:6.1f} "
                        f"req/s | p50 {row['p50_ms']:6.1f} p95 {row['p95_ms']:6.1f} ms | cpu/req "
                        f"{row['server_cpu_ms_per_request']:5.1f} ms | acc {row['accuracy']:.4f} | batch "
                        f"{row['mean_batch_size']:.1f} | speed {row['min_speed']:g}-{row['max_speed']:g}",
                        flush=True,
                    )
    finally:
        for server in servers.values():
            server.stop()
    modes = {
        name: {clients: median_row(rows) for clients, rows in by_clients.items()} for name, by_clients in runs.items()
    }
    records = profile(args, adaptive, offline, work_dir, [(1, 6), (32, 15), (1, 15)])
    plot_profile(records, target, output_dir / "serving_adaptive.png")

    from hf_fastbert.serving import load_speed_curve, speed_ladder

    ladder = speed_ladder(
        load_speed_curve(offline["curve_path"]), max_accuracy_drop=args.max_accuracy_drop, min_speed=no_loss
    )
    fixed = {"speed 0": 0.0, no_loss_name: no_loss, "speed 0.5": 0.5}
    for name, rows in modes.items():
        for row in rows.values():
            if name in fixed:
                count = min(row["requests"], len(offline["texts"]))
                exact = exact_at(offline, [fixed[name]], count)[fixed[name]]
                row["flops_speedup"] = exact["flops_speedup"]
                row["offline_accuracy"] = exact["accuracy"]
    reference = exact_at(offline, [0.0], min(modes["speed 0"][32]["requests"], len(offline["texts"])))[0.0]
    adaptive_32 = modes[adaptive_name][32]
    checks = {
        "throughput_over_flops_at_32_clients": {
            name: modes[name][32]["throughput_rps"]
            / modes["speed 0"][32]["throughput_rps"]
            / modes[name][32]["flops_speedup"]
            for name in fixed
            if fixed[name] > 0
        },
        "cpu_time_throughput_over_flops_at_32_clients": {
            name: modes["speed 0"][32]["server_cpu_ms_per_request"]
            / modes[name][32]["server_cpu_ms_per_request"]
            / modes[name][32]["flops_speedup"]
            for name in fixed
            if fixed[name] > 0
        },
        "adaptive_p95_ms_at_32_clients": adaptive_32["p95_ms"],
        "adaptive_target_ms": target,
        "speed0_p95_ms_at_32_clients": modes["speed 0"][32]["p95_ms"],
        "adaptive_accuracy_at_32_clients": adaptive_32["accuracy"],
        "speed0_accuracy_same_requests": reference["accuracy"],
        "accuracy_floor": reference["accuracy"] - args.max_accuracy_drop,
    }
    phases = []
    for phase in sorted({record["phase"] for record in records}):
        rows = sorted((r for r in records if r["phase"] == phase), key=lambda r: r["sent"])
        phases.append(
            {
                "clients": rows[0]["clients"],
                "seconds": rows[-1]["sent"] - rows[0]["sent"],
                "requests": len(rows),
                "p95_ms": percentile([1000 * r["latency"] for r in rows], 0.95),
                "speeds_served": sorted({r["speed"] for r in rows}),
                "last_speed": rows[-1]["speed"],
            }
        )
    checks["profile_phases"] = phases
    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "command": " ".join(["python", "benchmarks/bench_serving.py", *sys.argv[1:]]),
        "model": "outputs/fastbert-demo (make demo)",
        "requests_per_run": {clients: max(clients, round(count * args.scale)) for clients, count in REQUESTS.items()},
        "rounds": args.rounds,
        "pilot_speed0_p95_ms_at_32_clients": pilot["p95_ms"],
        "no_loss_speed": no_loss,
        "max_accuracy_drop": args.max_accuracy_drop,
        "validation_curve": offline["validation_curve"],
        "ladder": ladder,
        "modes": modes,
        "checks": checks,
        "profile": [
            {key: record[key] for key in ("sent", "latency", "speed", "clients", "status")} for record in records
        ],
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "seconds": time.perf_counter() - started,
    }
    (output_dir / "serving.json").write_text(json.dumps(report, indent=1) + "\n")
    table = markdown(report)
    (output_dir / "serving.md").write_text(table + "\n```\n" + json.dumps(checks, indent=1) + "\n```\n")
    print(table)
    print(json.dumps(checks, indent=1))
    print(f"done in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()

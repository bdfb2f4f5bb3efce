"""
Where FastBERT's ONNX Runtime stages lose to the stock graph at batch 1 with several threads: thread spinning and
thread pools. One short text (the demo's length), speed 0 (every layer, no student), fp32, medians of interleaved
rounds; the stock graph carries the same fusions (`bench_onnx.stock_onnx`).

Contenders, per-session thread pools: the stock graph with ONNX Runtime's default spinning and without; FastBERT's
stages without spinning (the runtime's setting) and with it. Then, in a second process (the pools are process-wide,
set before the runtime starts): both with one global thread pool (`set_global_thread_pool_sizes`,
`use_per_session_threads=False`).

    python benchmarks/bench_onnx_threads.py --model outputs/demo-seed-42 --threads 2
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


TEXT = "an engaging , if uneven , portrait of a young woman finding her voice in a world that won't listen"


def measure(model_dir, work, threads, global_pool, rounds, runs):
    import onnxruntime as ort

    if global_pool:
        from onnxruntime.capi import _pybind_state

        _pybind_state.set_global_thread_pool_sizes(threads, 1)  # before the runtime's environment exists
    from transformers import AutoTokenizer

    from hf_fastbert.modeling_ort import ORTFastBertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    feed = {key: value.astype(np.int64) for key, value in tokenizer([TEXT], return_tensors="np").items()}

    def options(spin):
        options = ort.SessionOptions()
        if global_pool:
            options.use_per_session_threads = False
        else:
            options.intra_op_num_threads = threads
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        return options

    def stock(spin):
        session = ort.InferenceSession(str(work / "stock.onnx"), options(spin), providers=["CPUExecutionProvider"])
        return lambda: session.run(None, feed)

    def fastbert(spin):
        model = ORTFastBertForSequenceClassification.from_pretrained(work / "fp32", session_options=options(spin))
        return lambda: model(**feed, speed=0.0)

    if global_pool:
        contenders = {"stock, global pool": stock(None), "FastBERT speed 0, global pool": fastbert(None)}
    else:
        contenders = {
            "stock, spinning": stock(True),
            "stock, no spinning": stock(False),
            "FastBERT speed 0, no spinning (the runtime's setting)": fastbert(False),
            "FastBERT speed 0, spinning": fastbert(True),
        }
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, run in contenders.items():
            for _ in range(runs // 10):
                run()
            start = time.perf_counter()
            for _ in range(runs):
                run()
            times[name].append(1e3 * (time.perf_counter() - start) / runs)
    return {"tokens": int(feed["input_ids"].shape[1]), "ms": {name: float(np.median(v)) for name, v in times.items()}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a trained FastBERT folder (bench_demo.py's, for example)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=200, help="runs per contender and round")
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--name", default="onnx_threads")
    parser.add_argument("--measure", choices=["local", "global"], help=argparse.SUPPRESS)  # the child processes
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        result = measure(args.model, Path(args.work), args.threads, args.measure == "global", args.rounds, args.runs)
        print(json.dumps(result))
        return
    import torch
    from bench_onnx import stock_onnx
    from transformers import BertForSequenceClassification

    from hf_fastbert.onnx_export import export_onnx

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-onnx-threads-"))
    shutil.copytree(args.model, work / "fp32", ignore=shutil.ignore_patterns("onnx", "sweep", "_finetune"))
    export_onnx(str(work / "fp32"))
    stock_onnx(BertForSequenceClassification.from_pretrained(args.model).eval(), work)
    results = {}
    for mode in ("local", "global"):
        command = [sys.executable, __file__, "--model", args.model, "--threads", str(args.threads), "--rounds",
                   str(args.rounds), "--runs", str(args.runs), "--measure", mode, "--work", str(work)]  # fmt: skip
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results[mode] = json.loads(output.strip().splitlines()[-1])
    shutil.rmtree(work)
    tokens = results["local"]["tokens"]
    ms = {**results["local"]["ms"], **results["global"]["ms"]}
    command = f"python benchmarks/bench_onnx_threads.py --model {args.model} --threads {args.threads}"
    lines = [
        f"One {tokens}-token text, batch 1, speed 0, fp32, {args.threads} threads; medians of {args.rounds} "
        f"interleaved rounds of {args.runs} runs (the global-pool pair in a second process). Command: `{command}`",
        "",
        "| contender | ms | x stock with spinning |",
        "|---|---:|---:|",
    ]
    reference = ms["stock, spinning"]
    lines += [f"| {name} | {value:.2f} | {reference / value:.2f}x |" for name, value in ms.items()]
    output_dir = Path(args.output_dir)
    (output_dir / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    (output_dir / f"{args.name}.json").write_text(json.dumps({"command": command, **results}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

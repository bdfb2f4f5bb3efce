"""
FastBERT's ONNX Runtime sessions at batch 1 with several threads: which thread-pool policy keeps their many short
session runs as fast as the stock graph's one.

Each session has its own pool of `--threads` threads. The choices:
- no spinning (`session.intra_op.allow_spinning=0`): a worker sleeps between operators and is woken for each one;
- spinning stopped after each run (`allow_spinning=1`, `session.force_spinning_stop=1`): workers spin between the
  operators of a run and sleep once it returns, so they do not take the cores from the next session's run;
- one global pool shared by every session (`set_global_thread_pool_sizes`, `use_per_session_threads=False`), with
  spinning: process-wide state, so it is measured in a second process.
(Spinning without the stop, ONNX Runtime's default, made FastBERT's stages 5-7x slower than the stock graph: the
workers of the sessions that had just run kept spinning. It is left out: it would slow the contenders after it.)

Real held-out snippets one at a time; contenders: the stock graph (same fusions, `bench_onnx.stock_onnx`) and
FastBERT at speed 0 (one run of `onnx/model.onnx`) and at `--speed` (one run of the layer graphs nested in one,
`early_exit_graph`; before it, one run per layer reached), fp32 and int8; medians of interleaved rounds. Times are
compared within one process only (the pair of processes is run one after the other).

    python benchmarks/bench_onnx_threads.py --model outputs/demo-seed-42 --threads 2 --speed 0.75
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


POLICIES = {  # name: session config entries
    "no spinning": {"session.intra_op.allow_spinning": "0"},
    "spinning stopped after each run": {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "1"},
}


def measure(model_dir, work, threads, global_pool, speed, samples, max_length, rounds):
    import onnxruntime as ort

    if global_pool:
        from onnxruntime.capi import _pybind_state

        _pybind_state.set_global_thread_pool_sizes(threads, 1)  # before the runtime's environment exists
    from transformers import AutoTokenizer

    from hf_fastbert.demo_data import load_rotten_tomatoes
    from hf_fastbert.modeling_ort import ORTFastBertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = list(load_rotten_tomatoes()["test"]["text"])[:samples]
    feeds = [dict(tokenizer([text], truncation=True, max_length=max_length, return_tensors="np")) for text in texts]

    def options(entries):
        options = ort.SessionOptions()
        if global_pool:
            options.use_per_session_threads = False
        else:
            options.intra_op_num_threads = threads
            for key, value in entries.items():
                options.add_session_config_entry(key, value)
        return options

    policies = {"global pool": {}} if global_pool else POLICIES
    contenders = {}
    for precision in ("fp32", "int8"):
        stock = ort.InferenceSession(
            str(work / f"stock-{precision}.onnx"), options({}), providers=["CPUExecutionProvider"]
        )  # ONNX Runtime's default: spinning
        contenders[f"stock {precision}"] = lambda feed, stock=stock: stock.run(None, feed)
        for policy, entries in policies.items():
            model = ORTFastBertForSequenceClassification.from_pretrained(
                work / precision, session_options=options(entries)
            )
            for value in (0.0, speed):
                name = f"FastBERT {precision} speed {value:g}, {policy}"
                contenders[name] = lambda feed, model=model, value=value: model(**feed, speed=value)
    times = {name: [] for name in contenders}
    for run in contenders.values():  # warm-up
        for feed in feeds[:16]:
            run(feed)
    for _ in range(rounds):
        for name, run in contenders.items():
            start = time.perf_counter()
            for feed in feeds:
                run(feed)
            times[name].append(1e3 * (time.perf_counter() - start) / len(feeds))
    return {name: float(np.median(values)) for name, values in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a trained FastBERT folder (bench_demo.py's, for example)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--speed", type=float, required=True, help="the early-exit speed timed beside speed 0")
    parser.add_argument("--samples", type=int, default=128, help="test snippets per contender and round")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--name", default="onnx_threads")
    parser.add_argument("--measure", choices=["local", "global"], help=argparse.SUPPRESS)  # the child processes
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        ms = measure(args.model, Path(args.work), args.threads, args.measure == "global", args.speed, args.samples,
                     args.max_length, args.rounds)  # fmt: skip
        print(json.dumps(ms))
        return
    import onnxruntime
    import torch
    from bench_onnx import stock_onnx
    from transformers import BertForSequenceClassification

    from hf_fastbert.onnx_export import export_onnx

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-onnx-threads-"))
    for precision in ("fp32", "int8"):
        shutil.copytree(args.model, work / precision, ignore=shutil.ignore_patterns("onnx", "sweep", "_finetune"))
        export_onnx(str(work / precision), int8=precision == "int8")
    fp32, int8, _ = stock_onnx(BertForSequenceClassification.from_pretrained(args.model).eval(), work)
    fp32.rename(work / "stock-fp32.onnx")
    int8.rename(work / "stock-int8.onnx")
    results = {}
    for mode in ("local", "global"):
        command = [sys.executable, __file__, "--model", args.model, "--threads", str(args.threads), "--speed",
                   str(args.speed), "--samples", str(args.samples), "--max-length", str(args.max_length),
                   "--rounds", str(args.rounds), "--measure", mode, "--work", str(work)]  # fmt: skip
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results[mode] = json.loads(output.strip().splitlines()[-1])
    shutil.rmtree(work)
    command = (
        f"python benchmarks/bench_onnx_threads.py --model {args.model} --threads {args.threads} --speed {args.speed:g}"
    )
    lines = [
        f"{args.samples} Rotten Tomatoes test snippets one at a time, {args.threads} threads, onnxruntime "
        f"{onnxruntime.__version__}; medians of {args.rounds} interleaved rounds. The global pool runs in a second "
        f"process, with its own stock reference. Command: `{command}`",
        "",
        "| process | contender | ms / sample | x stock graph, same precision and process |",
        "|---|---|---:|---:|",
    ]
    for mode, ms in results.items():
        for name, value in ms.items():
            reference = ms[f"stock {'int8' if 'int8' in name else 'fp32'}"]
            lines.append(f"| {mode} | {name} | {value:.2f} | {reference / value:.2f}x |")
    output_dir = Path(args.output_dir)
    (output_dir / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    (output_dir / f"{args.name}.json").write_text(
        json.dumps({"command": command, "threads": args.threads, "speed": args.speed, **results}, indent=2) + "\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()

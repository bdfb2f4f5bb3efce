"""
What the ONNX Runtime engine's sessions hold in memory, and how long they take to create: the layer sessions and
`model.onnx` (one per file of the export), and the session a sample alone runs, the layer graphs nested in `If`s
(`early_exit_graph`), given to ONNX Runtime inline (from bytes) or through an external-data file (as
`ORTFastBertForSequenceClassification.from_pretrained` does). Each case runs in a fresh process: resident memory
grown while its sessions were created, the time that took, and resident memory again after every layer's weights
were read (mapped weights count once touched). Then, in one more process, the two nested sessions' speed on real
held-out snippets one at a time at `--speed`: interleaved rounds, session runs only.

    hf-fastbert export outputs/demo-seed-42 --output-dir /tmp/demo-fp32
    hf-fastbert export outputs/demo-seed-42 --int8 --output-dir /tmp/demo-int8
    python benchmarks/bench_onnx_memory.py /tmp/demo-fp32 /tmp/demo-int8
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path


CASE = """
import gc, json, sys, time
from pathlib import Path
import numpy as np, onnx, onnxruntime as ort
from hf_fastbert.modeling_ort import _early_exit_session
from hf_fastbert.onnx_export import early_exit_graph

def resident_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024

folder, case = Path(sys.argv[1]), sys.argv[2]
stages = json.loads((folder / "onnx" / "fastbert_onnx.json").read_text())["stages"]
options, provider = ort.SessionOptions(), "CPUExecutionProvider"
ort.InferenceSession(str(folder / "onnx" / stages[-1]), options, providers=[provider])  # the runtime's own start-up
gc.collect()
before, start = resident_mb(), time.perf_counter()
if case == "files":
    sessions = [ort.InferenceSession(str(folder / "onnx" / name), options, providers=[provider])
                for name in stages + ["model.onnx"]]
elif case == "nested, inline":
    graph = early_exit_graph([onnx.load(str(folder / "onnx" / name)) for name in stages]).SerializeToString()
    sessions = [ort.InferenceSession(graph, options, providers=[provider])]
    del graph
else:
    sessions = [_early_exit_session(ort, folder, stages, options, provider)]
seconds = time.perf_counter() - start
gc.collect()
loaded = resident_mb() - before
feed = {value.name: np.ones((1, 32), dtype=np.int64) for value in sessions[0].get_inputs() if value.name != "speed"}
for session in sessions:  # every layer once: the nested graph at speed 0 runs them all
    inputs = [value.name for value in session.get_inputs()]
    if "hidden_states" in inputs:
        hidden = np.zeros((1, 32, session.get_inputs()[0].shape[2]), dtype=np.float32)
        session.run(None, {"hidden_states": hidden, "attention_mask": feed["attention_mask"]})
    else:
        session.run(None, {**feed, **({"speed": np.array(0.0, dtype=np.float32)} if "speed" in inputs else {})})
gc.collect()
print(json.dumps({"mb": loaded, "seconds": seconds, "mb_after_runs": resident_mb() - before}))
"""

TIMING = """
import json, statistics, sys, time
from pathlib import Path
import numpy as np, onnx, onnxruntime as ort
from transformers import AutoTokenizer
from hf_fastbert.demo_data import load_rotten_tomatoes
from hf_fastbert.modeling_ort import _early_exit_session
from hf_fastbert.onnx_export import early_exit_graph

folder, speed, threads, rounds = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
stages = json.loads((folder / "onnx" / "fastbert_onnx.json").read_text())["stages"]
options = ort.SessionOptions()
options.intra_op_num_threads = threads
options.add_session_config_entry("session.intra_op.allow_spinning", "1")
options.add_session_config_entry("session.force_spinning_stop", "1")
provider = "CPUExecutionProvider"
graph = early_exit_graph([onnx.load(str(folder / "onnx" / name)) for name in stages]).SerializeToString()
sessions = {
    "inline": ort.InferenceSession(graph, options, providers=[provider]),
    "external data": _early_exit_session(ort, folder, stages, options, provider),
}
tokenizer = AutoTokenizer.from_pretrained(folder)
names = {value.name for value in sessions["inline"].get_inputs()}
feeds = [
    {key: value for key, value in tokenizer([text], truncation=True, max_length=64, return_tensors="np").items()
     if key in names}
    for text in list(load_rotten_tomatoes()["test"]["text"])[:192]
]
threshold = np.array(speed, dtype=np.float32)
exits = {name: [int(s.run(None, {**f, "speed": threshold})[1][0]) for f in feeds] for name, s in sessions.items()}
assert exits["inline"] == exits["external data"]
times = {name: [] for name in sessions}
for _ in range(rounds):
    for name, session in sessions.items():
        start = time.perf_counter()
        for feed in feeds:
            session.run(None, {**feed, "speed": threshold})
        times[name].append(time.perf_counter() - start)
print(json.dumps({
    "inline_ms": 1e3 * statistics.median(times["inline"]) / len(feeds),
    "external_ms": 1e3 * statistics.median(times["external data"]) / len(feeds),
    "inline_over_external": statistics.median(a / b for a, b in zip(times["inline"], times["external data"])),
    "mean_exit_layer": float(np.mean(exits["inline"])),
}))
"""

CASES = {
    "files": "the export's files: layer sessions and model.onnx",
    "nested, inline": "nested graph, weights inline",
    "nested, external data": "nested graph, weights through an external-data file (the engine's)",
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exports", nargs="+", help="model folders exported with `hf-fastbert export`")
    parser.add_argument(
        "--speed", type=float, default=0.38, help="the early-exit speed the nested sessions are timed at"
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra-op threads, timed for each")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--name", default="onnx_memory")
    args = parser.parse_args(argv)
    rows, timings = [], []
    for folder in args.exports:
        manifest = json.loads((Path(folder) / "onnx" / "fastbert_onnx.json").read_text())
        layer_mib = sum((Path(folder) / "onnx" / name).stat().st_size for name in manifest["stages"]) / 2**20
        for case in CASES:
            result = subprocess.run(
                [sys.executable, "-c", CASE, folder, case], capture_output=True, text=True, check=True
            )
            measured = json.loads(result.stdout.strip().splitlines()[-1])
            precision = "int8" if manifest["int8"] else "fp32"
            rows.append({"export": precision, "case": case, "layer_files_mib": layer_mib, **measured})
            print(rows[-1], file=sys.stderr)
        for threads in args.threads:
            result = subprocess.run(
                [sys.executable, "-c", TIMING, folder, str(args.speed), str(threads), str(args.rounds)],
                capture_output=True,
                text=True,
                check=True,
            )
            timed = json.loads(result.stdout.strip().splitlines()[-1])
            timings.append({"export": precision, "threads": threads, **timed})
            print(timings[-1], file=sys.stderr)
    lines = [
        "Resident memory grown while the sessions were created (fresh process each), and the time it took. Command: "
        f"`python benchmarks/bench_onnx_memory.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        "| export | sessions | layer files MiB | + MB resident | seconds to create "
        "| + MB after a run of every layer |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['export']} | {CASES[row['case']]} | {row['layer_files_mib']:.0f} | {row['mb']:.0f} | "
            f"{row['seconds']:.2f} | {row['mb_after_runs']:.0f} |"
        )
    lines += [
        "",
        "The nested session, weights inline against through the file: 192 Rotten Tomatoes test snippets one at a "
        f"time at speed {args.speed:g}, the same exits checked; medians of {args.rounds} interleaved rounds.",
        "",
        "| export | threads | mean exit layer | inline ms / sample | external data ms / sample "
        "| inline time / external |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for timing in timings:
        lines.append(
            f"| {timing['export']} | {timing['threads']} | {timing['mean_exit_layer']:.2f} | "
            f"{timing['inline_ms']:.3f} | {timing['external_ms']:.3f} | {timing['inline_over_external']:.3f} |"
        )
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{args.name}.json").write_text(json.dumps({"memory": rows, "speed": timings}, indent=2) + "\n")
    (output_dir / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

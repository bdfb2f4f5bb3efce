"""
What the ONNX Runtime engine's sessions hold in memory, and how long they take to create: the layer sessions and
`model.onnx` (one per file of the export), and the session a sample alone runs, the layer graphs nested in `If`s
(`early_exit_graph`), given to ONNX Runtime inline (from bytes) or through an external-data file (as
`ORTFastBertForSequenceClassification.from_pretrained` does). Each case runs in a fresh process: resident memory
grown while its sessions were created, and the time that took.

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
import onnx, onnxruntime as ort
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
print(json.dumps({"mb": resident_mb() - before, "seconds": seconds}))
"""

CASES = {
    "files": "the export's files: layer sessions and model.onnx",
    "nested, inline": "nested graph, weights inline",
    "nested, external data": "nested graph, weights through an external-data file (the engine's)",
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exports", nargs="+", help="model folders exported with `hf-fastbert export`")
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--name", default="onnx_memory")
    args = parser.parse_args(argv)
    rows = []
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
    lines = [
        "Resident memory grown while the sessions were created (fresh process each), and the time it took. Command: "
        f"`python benchmarks/bench_onnx_memory.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        "| export | sessions | layer files MiB | + MB resident | seconds to create |",
        "|---|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['export']} | {CASES[row['case']]} | {row['layer_files_mib']:.0f} | {row['mb']:.0f} | "
            f"{row['seconds']:.2f} |"
        )
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{args.name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    (output_dir / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""The offline demo (`hf-fastbert train` with no arguments, what `make demo` runs) over several seeds: its wall time,
the speed-0 accuracy, the default speed it calibrates and saves, and what that speed gives on the demo's test split,
which neither training nor the calibration saw.

Each seed trains in a fresh process into `outputs/demo-seed-<seed>`; then `hf-fastbert evaluate --split test` measures
the saved model at speed 0 and at its saved speed. The report is the min-max over seeds, beside each seed's row.

    python benchmarks/bench_demo.py --seeds 42 1 2 --output benchmarks/results/demo.md
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench_inference import cpu_model


def run_seed(seed: int, outputs: Path) -> dict:
    folder = outputs / f"demo-seed-{seed}"
    command = [sys.executable, "-m", "hf_fastbert", "train", "--output-dir", str(folder), "--seed", str(seed)]
    if folder.exists():
        command.append("--overwrite-output-dir")
    started = time.perf_counter()
    subprocess.run(command, check=True)
    train_minutes = (time.perf_counter() - started) / 60
    summary = json.loads((folder / "speed_results.json").read_text())
    chosen = summary["default_speed"]
    speeds = sorted({0.0, chosen["speed"]})
    test_file = folder / "test_results.json"
    subprocess.run(
        [sys.executable, "-m", "hf_fastbert", "evaluate", str(folder), "--split", "test", "--no-timing"]
        + ["--speeds", *map(str, speeds), "--output", str(test_file)],
        check=True,
    )
    test = {row["speed"]: row for row in json.loads(test_file.read_text())["results"]}
    validation = {row["speed"]: row for row in summary["results"]}
    return {
        "seed": seed,
        "train_minutes": train_minutes,
        "speed": chosen["speed"],
        "validation_accuracy_speed_0": validation[0.0]["accuracy"],
        "validation_accuracy": chosen["accuracy"],
        "validation_flops_speedup": chosen["flops_speedup"],
        "test_accuracy_speed_0": test[0.0]["accuracy"],
        "test_accuracy": test[chosen["speed"]]["accuracy"],
        "test_flops_speedup": test[chosen["speed"]]["flops_speedup"],
    }


def report(rows: list[dict]) -> str:
    lines = [
        f"# The offline demo over {len(rows)} seeds",
        "",
        f"`python benchmarks/bench_demo.py --seeds {' '.join(str(row['seed']) for row in rows)}` on {cpu_model()}, "
        f"{time.strftime('%Y-%m-%d')}. Validation: the 1,000 held-out snippets `train` sweeps and calibrates its "
        "default speed on (the largest speed within 0.5 points of full depth). Test: the demo's 2,000 test snippets, "
        "seen by neither, through `hf-fastbert evaluate --split test` at speed 0 and at the saved speed.",
        "",
        "| seed | train (min) | saved speed | validation acc. speed 0 | validation acc. saved | validation FLOPs "
        "speed-up | test acc. speed 0 | test acc. saved | test FLOPs speed-up |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['seed']} | {row['train_minutes']:.1f} | {row['speed']:g} | "
            f"{row['validation_accuracy_speed_0']:.2%} | {row['validation_accuracy']:.2%} | "
            f"{row['validation_flops_speedup']:.2f}x | {row['test_accuracy_speed_0']:.2%} | "
            f"{row['test_accuracy']:.2%} | {row['test_flops_speedup']:.2f}x |"
        )

    def spread(key, fmt):
        values = [row[key] for row in rows]
        return f"{fmt.format(min(values))} - {fmt.format(max(values))}"

    lines += [
        f"| **min - max** | {spread('train_minutes', '{:.1f}')} | {spread('speed', '{:g}')} | "
        f"{spread('validation_accuracy_speed_0', '{:.2%}')} | {spread('validation_accuracy', '{:.2%}')} | "
        f"{spread('validation_flops_speedup', '{:.2f}x')} | {spread('test_accuracy_speed_0', '{:.2%}')} | "
        f"{spread('test_accuracy', '{:.2%}')} | {spread('test_flops_speedup', '{:.2f}x')} |",
        "",
    ]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("--outputs", default="outputs", help="Where the trained demo models go.")
    parser.add_argument("--output", default="benchmarks/results/demo.md")
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        rows.append(run_seed(seed, Path(args.outputs)))
        text = report(rows)  # written after every seed: a stopped run keeps what it measured
        Path(args.output).write_text(text)
        Path(args.output).with_suffix(".json").write_text(json.dumps(rows, indent=2))
    print(text)


if __name__ == "__main__":
    main()

"""How long `import hf_fastbert` takes against `import transformers` plus its text-classification pipeline.

Each statement runs in a fresh interpreter (`python -X importtime` is not used: it slows imports down), alternating
the two so that machine noise hits both alike; the median over the rounds is reported. The target (issue 12): the
plugin costs at most 10% over transformers + its pipeline, which every plugin user loads anyway.

    python benchmarks/bench_import.py --rounds 15 --output benchmarks/results/import.md
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


STATEMENTS = {
    "transformers + pipeline": "import transformers; from transformers import TextClassificationPipeline, pipeline",
    "hf_fastbert": "import hf_fastbert",
    "hf_fastbert + training names": "import hf_fastbert; hf_fastbert.FastBertDistillationTrainer",
}
TRAINING_MODULES = ("datasets", "pandas", "transformers.trainer", "matplotlib", "evaluate")


def seconds(statement: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=True)
    return time.perf_counter() - start


def loaded_modules(statement: str) -> list[str]:
    """Which of the heavy training-side modules `statement` loads."""
    probe = f"{statement}; import sys; print(' '.join(m for m in {TRAINING_MODULES!r} if m in sys.modules))"
    return subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout.split()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--output", help="Also write the table to this Markdown file.")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    for statement in STATEMENTS.values():  # warm the file cache
        seconds(statement)
    times = {name: [] for name in STATEMENTS}
    for _ in range(args.rounds):
        for name, statement in STATEMENTS.items():
            times[name].append(seconds(statement))
    reference = statistics.median(times["transformers + pipeline"])
    lines = [
        f"Median of {args.rounds} fresh interpreters each (python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
        f"1-minute load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after: a shared machine, so "
        "compare the ratios, not the seconds); command: `python benchmarks/bench_import.py`.",
        "",
        "| statement | median (s) | min (s) | ratio to transformers + pipeline | heavy modules loaded |",
        "|---|---:|---:|---:|---|",
    ]
    for name, statement in STATEMENTS.items():
        median = statistics.median(times[name])
        heavy = ", ".join(loaded_modules(statement)) or "none"
        fastest = min(times[name])
        lines.append(f"| `{statement}` | {median:.2f} | {fastest:.2f} | {median / reference:.2f}x | {heavy} |")
    text = "\n".join(lines) + "\n"
    print(text)  # noqa: T201
    if args.output:
        Path(args.output).write_text(text)


if __name__ == "__main__":
    main()

"""The batched early-exit engine on a GPU: speed-0 overhead and wall / ideal speed-up for forced exits.

Random weights in the all-MiniLM-L6-v2 shape (6 layers, hidden 384), BERT and ModernBERT, fp16 and bf16, batch 1, 32
and 128 x 128 tokens. Contenders run interleaved (every one once per round, shuffled; medians over rounds), each call
followed by `torch.cuda.synchronize()`. Exits are forced as in `bench_inference.py` (students' last layer fitted by
least squares, checked before timing).

Usage (on a machine with a CUDA GPU):
    python benchmarks/bench_gpu.py --output-dir results/gpu
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from bench_families import build
from bench_inference import (
    FIRST,
    HALVING,
    NONE,
    SPEED,
    UNIFORM,
    Contender,
    exit_distributions,
    expect_exits,
    force_students,
    run_rounds,
    student_features,
)


DISTRIBUTIONS = (FIRST, "all exit at layer 3", UNIFORM, HALVING, NONE)


def synced(call):
    def run():
        output = call()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return output

    return run


BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)


def measure(family, dtype, batch_size, args, folder):
    stock, fastbert = build(family, folder, **(BASE if args.shape == "base" else {}))
    stock, fastbert = stock.to(args.device, dtype), fastbert.to(args.device, dtype)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, stock.config.vocab_size, (batch_size, args.seq_length), generator=generator)
    inputs = {"input_ids": input_ids.to(args.device), "attention_mask": torch.ones_like(input_ids).to(args.device)}
    num_layers = fastbert.config.num_hidden_layers
    distributions = exit_distributions(batch_size, num_layers)
    distributions = {name: distributions[name] for name in DISTRIBUTIONS}
    with torch.inference_mode():
        features = [feature.cpu() for feature in student_features(fastbert, inputs)]
        label = f"{family} {dtype} batch {batch_size}"
        forced = force_students(fastbert, features, distributions, label=label, skip_misses=True)
        distributions = {name: distributions[name] for name in forced}
        contenders = {
            "stock": Contender(synced(lambda: stock(**inputs))),
            "speed0": Contender(synced(lambda: fastbert(**inputs, speed=0.0))),
        }
        for name, exits in distributions.items():
            contenders[name] = Contender(
                synced(lambda: fastbert(**inputs, speed=SPEED)),
                lambda name=name: fastbert.load_state_dict(forced[name], strict=False),
                expect_exits(name, exits),
            )
        times = run_rounds(contenders, args.rounds, args.warmup)
    wall = {name: value["wall"] for name, value in times.items()}

    def paired(numerator, denominator):
        return statistics.median(a / b for a, b in zip(wall[numerator], wall[denominator], strict=True))

    rows = []
    for name, exits in distributions.items():
        ideal = num_layers * len(exits) / sum(exits)
        rows.append({"distribution": name, "ideal": ideal, "measured": paired("stock", name)})
        rows[-1]["measured_over_ideal"] = rows[-1]["measured"] / ideal
    return {
        "family": family,
        "dtype": str(dtype).removeprefix("torch."),
        "batch_size": batch_size,
        "stock_ms": 1000 * statistics.median(wall["stock"]),
        "speed0_overhead": paired("speed0", "stock") - 1,
        "forced": rows,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=["bert", "modernbert"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32, 128])
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    parser.add_argument("--shape", choices=["minilm", "base"], default="minilm", help="base: 12 layers x 768")
    parser.add_argument("--device", default="cuda", help="cpu only for a smoke test of the script")
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU")
    transformers.logging.set_verbosity_error()
    started, rows = time.time(), []
    with tempfile.TemporaryDirectory() as folder:
        for family in args.families:
            for dtype in [getattr(torch, name) for name in args.dtypes]:
                for batch_size in args.batch_sizes:
                    rows.append(measure(family, dtype, batch_size, args, Path(folder)))
                    print(json.dumps(rows[-1]), file=sys.stderr)
    lines = [
        f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {args.shape} shape, "
        f"{args.seq_length} tokens, {args.rounds} interleaved rounds",
        "",
        "| family | dtype | batch | stock ms | speed-0 overhead "
        "| measured / ideal (all at 1, at 3, uniform, halving, none) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for row in rows:
        by_name = {r["distribution"]: r["measured_over_ideal"] for r in row["forced"]}
        ratios = ", ".join(f"{by_name[name]:.2f}" if name in by_name else "-" for name in DISTRIBUTIONS)
        lines.append(
            f"| {row['family']} | {row['dtype']} | {row['batch_size']} | {row['stock_ms']:.2f} | "
            f"{100 * row['speed0_overhead']:+.1f}% | {ratios} |"
        )
    table = "\n".join(lines) + "\n"
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "command": "python benchmarks/bench_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "wall_s": time.time() - started,
        "rows": rows,
    }
    suffix = "" if args.shape == "minilm" else f"_{args.shape}"
    (output_dir / f"gpu{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    (output_dir / f"gpu{suffix}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

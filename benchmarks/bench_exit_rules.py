"""Exit rules against the oracle bound, on a trained FastBERT model and real held-out data (CPU).

One full-depth pass over the validation and test splits gives every classifier's logits. The `"thresholds"` and
`"learned"` rules are calibrated on the validation pass (`model.calibrate_exit_rules`). For each rule, over a grid of
speeds:
- **test curve**: the largest FLOPs speed-up on the test split within `--budget` accuracy points of full depth;
- **calibrated**: the speed picked on validation by the same criterion, then measured on test (what a user gets);
- both as a fraction of the **oracle** (every sample leaves at the first layer whose answer is the teacher's: the
  teacher's accuracy at the largest speed-up any rule could reach without losing accuracy).
Wall time per sample at batch 1 and 32 is measured for each rule at its calibrated speed (interleaved rounds, medians),
so the per-layer cost of patience and the learned exit is visible.

The calibrated rules are chosen as `hf-fastbert calibrate` chooses them: fitted on the validation pass, their speed
picked on the cross-fitted validation curve (each half measured with the rule fitted on the other half).

Usage:
    make demo   # trains outputs/fastbert-demo (Rotten Tomatoes)
    python benchmarks/bench_exit_rules.py --model outputs/fastbert-demo --dataset rotten_tomatoes
    python benchmarks/bench_many_class.py --dataset r52 --save-model /tmp/r52   # Reuters: validation documents are
    python benchmarks/bench_exit_rules.py --model /tmp/r52 --dataset r52      # training ones the model never saw
"""

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from bench_inference import Contender, run_rounds
from transformers import AutoTokenizer

from hf_fastbert import FastBertForSequenceClassification
from hf_fastbert.analysis import CALIBRATED_RULES, cross_fitted_metrics
from hf_fastbert.demo_data import load_crowdflower_tweets, load_reuters, load_rotten_tomatoes
from hf_fastbert.evaluation import metrics_at_speeds
from hf_fastbert.exit_rules import EXIT_RULES, oracle_exits
from hf_fastbert.flops import fastbert_flops, stock_flops


DATASETS = ["rotten_tomatoes", "crowdflower_tweets", "r8", "r52"]
SPEEDS = [round(i / 50, 2) for i in range(51)]


@torch.no_grad()
def full_pass(model, tokenizer, texts, max_length, batch_size=64):
    """(N, L, C) logits of every classifier and (N,) token counts."""
    all_logits, lengths = [], []
    for start in range(0, len(texts), batch_size):
        inputs = tokenizer(
            texts[start : start + batch_size],
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        all_logits.append(model(**inputs, output_all_logits=True).all_logits.float())
        lengths.append(inputs["attention_mask"].sum(dim=1))
    return torch.cat(all_logits), torch.cat(lengths)


def load_splits(name, train_size, validation_size, test_size):
    """Validation and test splits. Reuters has no validation split: it takes training documents after the first
    `train_size` (the ones `bench_many_class.py` trains on), which the model never saw."""
    if name in ("r8", "r52"):
        data = load_reuters(name)
        train = data["train"]
        end = min(train_size + validation_size, len(train))
        test = data["test"].select(range(min(test_size, len(data["test"]))))
        return {"validation": train.select(range(train_size, end)), "test": test}
    data = load_rotten_tomatoes() if name == "rotten_tomatoes" else load_crowdflower_tweets()
    return {"validation": data["validation"], "test": data["test"].select(range(min(test_size, len(data["test"]))))}


def add_split_arguments(parser, default_dataset="rotten_tomatoes"):
    """The model, data and output options the exit-rule benchmarks share (what `validation_and_test_passes` and
    `write_results` read)."""
    parser.add_argument("--model", required=True, help="a trained (distilled) FastBERT model folder")
    parser.add_argument("--dataset", choices=DATASETS, default=default_dataset)
    parser.add_argument("--max-length", type=int, help="default: 128 for Reuters, 64 otherwise")
    parser.add_argument("--train-size", type=int, default=3000, help="Reuters: documents the model trained on")
    parser.add_argument("--validation-size", type=int, default=1000, help="Reuters: validation documents")
    parser.add_argument("--test-size", type=int, default=4000)
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))


def parse_split_arguments(parser, argv):
    """`parser.parse_args(argv)`, with `--max-length` defaulting by dataset (128 for Reuters, 64 otherwise)."""
    args = parser.parse_args(argv)
    if args.max_length is None:
        args.max_length = 128 if args.dataset in ("r8", "r52") else 64
    return args


def write_results(args, default_name, result, table):
    """Write `result` as JSON and `table` as Markdown under `--output-dir` (stem `--name` or `default_name`), and print
    the table."""
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    name = args.name or default_name
    (output_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (output_dir / f"{name}.md").write_text(table)
    print(table)


def validation_and_test_passes(model, tokenizer, args, log=None):
    """{"validation": ..., "test": ...}: each split's (N, L, C) logits, (N,) token counts and (N,) labels, from one
    full-depth pass (`args`: dataset, sizes, max_length)."""
    data = load_splits(args.dataset, args.train_size, args.validation_size, args.test_size)
    passes = {}
    for split in ("validation", "test"):
        texts, labels = list(data[split]["text"]), torch.tensor(data[split]["label"])
        passes[split] = (*full_pass(model, tokenizer, texts, args.max_length), labels)
        if log is not None:
            log(f"{split}: {len(texts)} samples")
    return passes, data


def best_within(rows, budget):
    """The row with the largest speed-up whose accuracy is within `budget` of the speed-0 row's."""
    floor = rows[0]["accuracy"] - budget
    return max((row for row in rows if row["accuracy"] >= floor - 1e-12), key=lambda row: row["flops_speedup"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_split_arguments(parser)
    parser.add_argument("--uncertainty-top-k", type=int, help="override the model's config.uncertainty_top_k")
    parser.add_argument("--name", help="results file stem (default: exit_rules_DATASET)")
    parser.add_argument("--budget", type=float, default=0.01, help="accuracy drop allowed (0.01 = 1 point)")
    parser.add_argument("--timing-samples", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parse_split_arguments(parser, argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    started = time.time()
    model = FastBertForSequenceClassification.from_pretrained(args.model).eval()
    if args.uncertainty_top_k is not None:
        model.config.uncertainty_top_k = args.uncertainty_top_k
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    passes, data = validation_and_test_passes(
        model, tokenizer, args, log=lambda line: print(f"{line}, {time.time() - started:.0f} s", file=sys.stderr)
    )
    model.calibrate_exit_rules(passes["validation"][0])
    config = model.config

    test_logits, test_lengths, test_labels = passes["test"]
    oracle = oracle_exits(test_logits)
    teacher_accuracy = (test_logits[:, -1].argmax(dim=-1) == test_labels).double().mean().item()
    oracle_speedup = (
        stock_flops(config, test_lengths).sum() / fastbert_flops(config, test_lengths, oracle).sum()
    ).item()
    results = {}
    for rule in EXIT_RULES:
        if rule in CALIBRATED_RULES:  # as `calibrate` does: the speed is chosen on the cross-fitted curve
            validation_curve = cross_fitted_metrics(*passes["validation"], config, SPEEDS, rule)
        else:
            validation_curve = metrics_at_speeds(
                *passes["validation"][:2], config, SPEEDS, passes["validation"][2], rule
            )
        test_curve = metrics_at_speeds(test_logits, test_lengths, config, SPEEDS, test_labels, rule)
        chosen_speed = best_within(validation_curve, args.budget)["speed"]
        calibrated = next(row for row in test_curve if row["speed"] == chosen_speed)
        best = best_within(test_curve, args.budget)
        results[rule] = {
            "test_best": best,
            "test_best_over_oracle": best["flops_speedup"] / oracle_speedup,
            "calibrated": calibrated,
            "calibrated_over_oracle": calibrated["flops_speedup"] / oracle_speedup,
            "test_curve": test_curve,
        }

    # Wall time per sample at the calibrated speed, batch 1 and 32.
    texts = list(data["test"]["text"])[: args.timing_samples]
    batch = dict(tokenizer(texts[:32], truncation=True, max_length=args.max_length, padding=True, return_tensors="pt"))
    singles = [
        dict(tokenizer([text], truncation=True, max_length=args.max_length, return_tensors="pt")) for text in texts
    ]
    contenders = {}
    for rule in EXIT_RULES:
        speed = results[rule]["calibrated"]["speed"]

        def batched(rule=rule, speed=speed):
            return model(**batch, speed=speed, exit_rule=rule)

        def one_by_one(rule=rule, speed=speed):
            return [model(**inputs, speed=speed, exit_rule=rule) for inputs in singles]

        contenders[f"{rule} batch 32"] = Contender(batched)
        contenders[f"{rule} batch 1"] = Contender(one_by_one)
    contenders["speed 0 batch 32"] = Contender(lambda: model(**batch, speed=0.0))
    contenders["speed 0 batch 1"] = Contender(lambda: [model(**inputs, speed=0.0) for inputs in singles])
    with torch.inference_mode():
        times = run_rounds(contenders, args.rounds, 1)
    wall = {name: statistics.median(value["wall"]) for name, value in times.items()}
    for rule in EXIT_RULES:
        results[rule]["ms_per_sample_batch32"] = 1000 * wall[f"{rule} batch 32"] / len(batch["input_ids"])
        results[rule]["ms_per_sample_batch1"] = 1000 * wall[f"{rule} batch 1"] / len(singles)

    result = {
        "command": "python benchmarks/bench_exit_rules.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": args.dataset,
        "uncertainty_top_k": model.config.uncertainty_top_k,
        "validation_samples": len(passes["validation"][2]),
        "test_samples": len(test_labels),
        "budget": args.budget,
        "threads": args.threads,
        "teacher_accuracy": teacher_accuracy,
        "oracle_flops_speedup": oracle_speedup,
        "speed0_ms_per_sample": {
            "batch32": 1000 * wall["speed 0 batch 32"] / len(batch["input_ids"]),
            "batch1": 1000 * wall["speed 0 batch 1"] / len(singles),
        },
        "rules": results,
        "wall_s": time.time() - started,
    }
    lines = [
        f"{args.dataset} (uncertainty_top_k {model.config.uncertainty_top_k}): {result['test_samples']} test "
        f"samples (rules calibrated on {result['validation_samples']} validation samples), budget "
        f"{100 * args.budget:g} point(s); teacher accuracy {100 * teacher_accuracy:.1f}%, "
        f"oracle FLOPs speed-up {oracle_speedup:.2f}x; command: `{result['command']}`",
        "",
        "| rule | best on test: speed-up (x oracle) "
        "| calibrated on validation: speed, test accuracy, speed-up (x oracle) | ms / sample, batch 1 / 32 |",
        "|---|---|---|---|",
    ]
    for rule, row in results.items():
        best, chosen = row["test_best"], row["calibrated"]
        lines.append(
            f"| {rule} | {best['flops_speedup']:.2f}x ({row['test_best_over_oracle']:.2f}) | {chosen['speed']:g}, "
            f"{100 * chosen['accuracy']:.1f}%, {chosen['flops_speedup']:.2f}x ({row['calibrated_over_oracle']:.2f}) | "
            f"{row['ms_per_sample_batch1']:.2f} / {row['ms_per_sample_batch32']:.2f} |"
        )
    speed0 = result["speed0_ms_per_sample"]
    lines.append(f"| speed 0 (full depth) | 1.00x | - | {speed0['batch1']:.2f} / {speed0['batch32']:.2f} |")
    write_results(args, f"exit_rules_{args.dataset}", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

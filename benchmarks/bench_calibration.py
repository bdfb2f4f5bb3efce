"""How well a calibrated speed keeps its accuracy promise on data it was not chosen on.

`train` and `calibrate` choose the largest speed whose accuracy on the validation samples stays within
`max_accuracy_drop` of full depth (`analysis.calibrate_speed`). This benchmark measures what that promise is worth on
new data. One full-depth pass over the validation and test splits is pooled; then, many times over, a random
`--calibration-size` of the pool is the validation data a user would calibrate on, and the rest is new data. For each
budget, the share of draws whose drop on the new data breaks the budget, the mean and 90th percentile of that drop,
and the FLOPs speed-up on the new data, for the package's choice (the point estimate, and with `confidence=0.95`) and
for two stricter readings of the point estimate:
- **monotone**: the largest speed whose drop stays within the budget on the closest curve that never falls as the
  speed rises (a least-squares isotonic fit, pool adjacent violators), so that a speed passing by luck after a
  failing one is not taken;
- **first failure**: the largest speed below the first that breaks the budget;
- **confidence 0.95** (`calibrate_speed(..., confidence=0.95)`, `hf-fastbert calibrate --confidence 0.95`): each
  speed's drop read at its one-sided 95% upper confidence bound (per sample: answer right at full depth minus right
  at the speed), the speeds tested in increasing order up to the first that fails: a promise meant to hold on new
  data 19 times in 20.
The pooled curve itself (drop and speed-up at speeds 0.1 ... 0.9) is printed beside them: where it is not monotone,
the stricter choices give up speed-ups that are real.

Usage:
    python benchmarks/bench_calibration.py --model outputs/demo-seed-42 --dataset rotten_tomatoes
    python benchmarks/bench_calibration.py --model /tmp/r8 --dataset r8 --calibration-sizes 500 1000 2000
"""

import argparse
import sys
import time
from datetime import datetime, timezone

import torch
import transformers
from bench_exit_rules import add_split_arguments, parse_split_arguments, validation_and_test_passes, write_results
from transformers import AutoTokenizer

from hf_fastbert import FastBertForSequenceClassification
from hf_fastbert.analysis import CALIBRATED_RULES, calibrate_speed, describe_drop
from hf_fastbert.constants import CALIBRATION_SPEEDS
from hf_fastbert.evaluation import accuracy_drop_standard_error, metrics_at_speeds
from hf_fastbert.exit_rules import select_exits
from hf_fastbert.flops import fastbert_flops, stock_flops


METHODS = ("package", "monotone", "first failure", "confidence 0.95")
CURVE_SPEEDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def per_sample_tables(all_logits, seq_lengths, labels, config, rule):
    """(S, N) right answers and FLOPs at each calibration speed, and (N,) stock FLOPs: any subset's curve in O(S)."""
    right, flops = [], []
    for speed in CALIBRATION_SPEEDS:
        logits, exit_layers = select_exits(all_logits, speed, config, rule)
        right.append((logits.argmax(dim=-1) == labels).double())
        flops.append(fastbert_flops(config, seq_lengths, exit_layers, branches_ran=speed > 0).double())
    return torch.stack(right), torch.stack(flops), stock_flops(config, seq_lengths).double()


def curve(right, flops, stock, index):
    """The rows `metrics_at_speeds` gives on the samples `index`."""
    accuracy = right[:, index].mean(dim=1)
    speedup = stock[index].sum() / flops[:, index].sum(dim=1)
    full_depth, here = right[0, index][None], right[:, index]
    lost, gained = (full_depth * (1 - here)).sum(dim=1), ((1 - full_depth) * here).sum(dim=1)
    return [
        {
            "speed": speed,
            "accuracy": accuracy[k].item(),
            "flops_speedup": speedup[k].item(),
            "accuracy_drop_se": accuracy_drop_standard_error(int(lost[k]), int(gained[k]), len(index), speed),
        }
        for k, speed in enumerate(CALIBRATION_SPEEDS)
    ]


def isotonic_increasing(values):
    """The non-decreasing sequence closest to `values` in least squares (pool adjacent violators)."""
    blocks = []  # [mean, count]
    for value in values:
        blocks.append([value, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            mean, count = blocks.pop()
            previous, before = blocks[-1]
            blocks[-1] = [(previous * before + mean * count) / (before + count), before + count]
    return [mean for mean, count in blocks for _ in range(count)]


def choose(method, right, index, rows, budget):
    """The chosen speed's position in CALIBRATION_SPEEDS."""
    if method in ("package", "confidence 0.95"):
        confidence = 0.95 if method == "confidence 0.95" else None
        row = calibrate_speed(rows, max_accuracy_drop=budget, confidence=confidence)
        return CALIBRATION_SPEEDS.index(row["speed"])
    drop = torch.tensor([rows[0]["accuracy"] - row["accuracy"] for row in rows])
    if method == "monotone":
        return max(k for k, value in enumerate(isotonic_increasing(drop.tolist())) if value <= budget + 1e-9)
    failing = torch.nonzero(drop > budget + 1e-9)  # first failure
    return int(failing.min()) - 1 if len(failing) else len(CALIBRATION_SPEEDS) - 1


def held_out(right, flops, stock, index, k):
    """(accuracy drop, FLOPs speed-up) at speed position `k` on the samples `index`."""
    drop = (right[0, index].mean() - right[k, index].mean()).item()
    return drop, (stock[index].sum() / flops[k, index].sum()).item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_split_arguments(parser)
    parser.add_argument("--exit-rule", help="default: the model's (a rule that is not fitted on validation data)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.005, 0.01])
    parser.add_argument("--calibration-sizes", type=int, nargs="+", default=[1000])
    parser.add_argument("--draws", type=int, default=300, help="random calibration / new-data splits per setting")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", help="results file stem (default: calibration_DATASET)")
    args = parse_split_arguments(parser, argv)
    transformers.logging.set_verbosity_error()
    started = time.time()
    model = FastBertForSequenceClassification.from_pretrained(args.model).eval()
    config = model.config
    rule = args.exit_rule or config.exit_rule
    if rule in CALIBRATED_RULES:
        parser.error(f"the {rule!r} rule is fitted on the calibration data; give --exit-rule with another rule")
    passes, _ = validation_and_test_passes(model, AutoTokenizer.from_pretrained(args.model), args)
    pooled = [torch.cat([passes["validation"][i], passes["test"][i]]) for i in range(3)]
    right, flops, stock = per_sample_tables(pooled[0].float(), pooled[1].long(), pooled[2].long(), config, rule)
    num_validation, num_samples = len(passes["validation"][2]), len(pooled[2])
    if max(args.calibration_sizes) >= num_samples:
        parser.error(f"--calibration-sizes must leave new data: the pool has {num_samples} samples")

    # The tables reproduce the package's own curve on the validation split.
    validation = torch.arange(num_validation)
    reference = metrics_at_speeds(*passes["validation"][:2], config, CALIBRATION_SPEEDS, passes["validation"][2], rule)
    for mine, package in zip(curve(right, flops, stock, validation), reference, strict=True):
        assert abs(mine["accuracy"] - package["accuracy"]) < 1e-9, (mine, package)
        assert abs(mine["flops_speedup"] / package["flops_speedup"] - 1) < 1e-6, (mine, package)
        assert abs(mine["accuracy_drop_se"] - package["accuracy_drop_se"]) < 1e-9, (mine, package)

    everyone = torch.arange(num_samples)
    pooled_curve = curve(right, flops, stock, everyone)
    shipped = {}  # the splits as they come: calibrate on validation, measure on test
    test = torch.arange(num_validation, num_samples)
    rows = curve(right, flops, stock, validation)
    for budget in args.budgets:
        for method in METHODS:
            k = choose(method, right, validation, rows, budget)
            drop, speedup = held_out(right, flops, stock, test, k)
            shipped[f"{budget}/{method}"] = {
                "speed": CALIBRATION_SPEEDS[k],
                "drop": drop,
                "flops_speedup": speedup,
                "validation_flops_speedup": rows[k]["flops_speedup"],
                # What `train` / `calibrate` print for this choice on the validation split.
                "validation_description": describe_drop(rows[k], rows[0]),
            }

    generator = torch.Generator().manual_seed(args.seed)
    settings = []
    for size in args.calibration_sizes:
        draws = {(budget, method): [] for budget in args.budgets for method in METHODS}
        for _ in range(args.draws):
            order = torch.randperm(num_samples, generator=generator)
            calibration, new = order[:size], order[size:]
            rows = curve(right, flops, stock, calibration)
            for budget in args.budgets:
                for method in METHODS:
                    k = choose(method, right, calibration, rows, budget)
                    draws[budget, method].append((CALIBRATION_SPEEDS[k], *held_out(right, flops, stock, new, k)))
        for (budget, method), values in draws.items():
            columns = zip(*values, strict=True)
            speeds, drops, speedups = (torch.tensor(column, dtype=torch.float64) for column in columns)
            settings.append(
                {
                    "calibration_size": size,
                    "budget": budget,
                    "method": method,
                    "median_speed": speeds.median().item(),
                    "mean_drop": drops.mean().item(),
                    "p90_drop": drops.quantile(0.9).item(),
                    "over_budget": (drops > budget + 1e-9).double().mean().item(),
                    "mean_flops_speedup": speedups.mean().item(),
                }
            )

    result = {
        "command": "python benchmarks/bench_calibration.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": args.dataset,
        "exit_rule": rule,
        "uncertainty_top_k": config.uncertainty_top_k,
        "validation_samples": num_validation,
        "test_samples": num_samples - num_validation,
        "draws": args.draws,
        "pooled_curve": [row for row in pooled_curve if row["speed"] in CURVE_SPEEDS or row["speed"] == 0],
        "shipped_split": shipped,
        "settings": settings,
        "wall_s": time.time() - started,
    }
    full_depth = pooled_curve[0]["accuracy"]
    lines = [
        f"{args.dataset}, {rule} rule (uncertainty_top_k {config.uncertainty_top_k}): {num_samples} samples pooled "
        f"({num_validation} validation + {num_samples - num_validation} test), {args.draws} random splits per "
        f"calibration size. Command: `{result['command']}`",
        "",
        "Pooled curve (accuracy drop in points / FLOPs speed-up): "
        + ", ".join(
            f"{row['speed']:g}: {100 * (full_depth - row['accuracy']):.2f} / {row['flops_speedup']:.2f}x"
            for row in result["pooled_curve"][1:]
        ),
        "",
        "| calibration samples | budget (points) | choice | median speed | drop on new data: mean / p90 (points) "
        "| draws over budget | FLOPs speed-up on new data | validation -> test split: speed, drop, speed-up |",
        "|---:|---:|---|---:|---|---:|---:|---|",
    ]
    for row in settings:
        split = shipped[f"{row['budget']}/{row['method']}"]
        lines.append(
            f"| {row['calibration_size']} | {100 * row['budget']:g} | {row['method']} | {row['median_speed']:g} | "
            f"{100 * row['mean_drop']:.2f} / {100 * row['p90_drop']:.2f} | {100 * row['over_budget']:.0f}% | "
            f"{row['mean_flops_speedup']:.2f}x | {split['speed']:g}, {100 * split['drop']:.2f}, "
            f"{split['flops_speedup']:.2f}x |"
        )
    lines += ["", "On the validation split as shipped, what `train` and `calibrate` print for each choice:", ""]
    for budget in args.budgets:
        for method in ("package", "confidence 0.95"):
            split = shipped[f"{budget}/{method}"]
            lines.append(
                f"- budget {100 * budget:g} points, {method}: speed {split['speed']:g}, "
                f"{split['validation_flops_speedup']:.2f}x fewer FLOPs, {split['validation_description']}"
            )
    write_results(args, f"calibration_{args.dataset}", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

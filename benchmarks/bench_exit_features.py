"""Does the learned exit gain from seeing more than one layer, or from a per-class calibration? (issue 26)

The `"learned"` rule fits, per student, a logistic head on a few features of that student's answer (top probability,
margin, top-k entropy, agreement streak) that predicts "this student already answers as the teacher". This benchmark
fits three richer variants on the same validation pass and judges all four as `hf-fastbert calibrate` judges a rule:
- **current**: the package's rule (`hf_fastbert.exit_rules.fit_exit_heads`, through `calibrate_exit_rules`);
- **all layers**: the current features plus a view of every student so far: the mean probability they gave the
  current answer, the previous student's probability of it, whether the running mean of their probabilities picks it,
  and that running mean's top probability;
- **per class**: the current features plus one intercept per predicted class, shrunk towards the shared intercept
  (L2, `--class-l2`): a calibration per class group, for students that are reliable on some classes only;
- **all layers + per class**.

For each variant: the speed chosen on the cross-fitted validation curve (2 interleaved folds, each measured with the
heads fitted on the other) and its test accuracy and FLOPs speed-up, the best speed-up on the test curve within
`--budget`, both as a fraction of the oracle's, and the heads' ranking quality (AUC of the head's score against
"agrees with the teacher", test, per student). The default rule (entropy) is the reference row.

Usage (the model of `bench_cached_distillation.py --save-model` or `bench_many_class.py --save-model`):
    python benchmarks/bench_exit_features.py --model /tmp/runs/r52 --dataset r52
"""

import argparse
import sys
from datetime import datetime, timezone

import torch
from bench_exit_rules import (
    SPEEDS,
    add_split_arguments,
    best_within,
    parse_split_arguments,
    validation_and_test_passes,
    write_results,
)
from transformers import AutoTokenizer

from hf_fastbert import FastBertForSequenceClassification
from hf_fastbert.analysis import cross_fitted_metrics
from hf_fastbert.evaluation import metrics_at_speeds
from hf_fastbert.exit_rules import agreement_streak, exit_features, fit_logistic, oracle_exits
from hf_fastbert.flops import fastbert_flops, stock_flops


VARIANTS = {"current": (False, False), "all layers": (False, True), "per class": (True, False)}
VARIANTS["all layers + per class"] = (True, True)


def variant_features(all_logits, top_k, per_class, all_layers):
    """Per student: ((N, F) float64 features, (N,) answers). The first 5 features are the package's."""
    num_samples, num_layers, num_labels = all_logits.shape
    rows, state, probability_sum, previous = [], None, 0.0, None
    for index in range(num_layers - 1):
        logits = all_logits[:, index].float()
        probabilities = logits.softmax(dim=-1)
        answers = logits.argmax(dim=-1)
        streak = agreement_streak(answers, state)
        state = (answers, streak)
        columns = [exit_features(logits, streak, num_layers, top_k)]
        probability_sum = probability_sum + probabilities
        if all_layers:
            mean = probability_sum / (index + 1)
            previous_of_answer = (
                torch.zeros(num_samples) if previous is None else previous.gather(1, answers[:, None])[:, 0]
            )
            views = [mean.gather(1, answers[:, None])[:, 0], previous_of_answer, (mean.argmax(-1) == answers).float()]
            columns.append(torch.stack([*views, mean.max(dim=-1).values], dim=-1))
        if per_class:
            columns.append(torch.nn.functional.one_hot(answers, num_labels).float())
        rows.append((torch.cat(columns, dim=-1).double(), answers))
        previous = probabilities
    return rows


def fit_heads(all_logits, top_k, per_class, all_layers, class_l2, steps=200):
    """Logistic heads as `fit_exit_heads` fits them (its L2 on the shared weights); per-class intercepts get
    `class_l2`."""
    teacher = all_logits[:, -1].argmax(dim=-1)
    heads = []
    for features, answers in variant_features(all_logits, top_k, per_class, all_layers):
        shared = features.shape[1] - (all_logits.shape[2] if per_class else 0)
        l2 = torch.full((features.shape[1],), 1e-4, dtype=torch.double)
        l2[0], l2[shared:] = 0.0, class_l2
        heads.append(fit_logistic(features, (answers == teacher).double(), l2, steps))
    return heads


def curve(all_logits, seq_lengths, labels, config, heads, per_class, all_layers):
    """`metrics_at_speeds` rows for a variant: leave at the first student whose head says > 1 - speed."""
    rows = variant_features(all_logits, config.uncertainty_top_k, per_class, all_layers)
    scores = torch.stack(
        [torch.sigmoid(features @ w) for (features, _), w in zip(rows, heads, strict=True)], dim=1
    )  # (N, L-1)
    num_samples, num_layers = all_logits.shape[:2]
    stock = stock_flops(config, seq_lengths).sum().item()
    result = []
    for speed in SPEEDS:
        exit_layers = torch.full((num_samples,), num_layers)
        if speed > 0:
            leaves = scores > 1.0 - speed
            exit_layers = torch.where(leaves.any(dim=1), leaves.int().argmax(dim=1) + 1, num_layers)
        answers = all_logits[torch.arange(num_samples), exit_layers - 1].argmax(dim=-1)
        spent = fastbert_flops(config, seq_lengths, exit_layers, branches_ran=speed > 0).sum().item()
        accuracy = (answers == labels).double().mean().item()
        result.append({"speed": speed, "accuracy": accuracy, "flops_speedup": stock / spent, "flops": spent})
    return result


def cross_fitted(all_logits, seq_lengths, labels, config, per_class, all_layers, class_l2, folds=2):
    """As `analysis.cross_fitted_metrics`: each fold measured with the heads fitted on the others, pooled."""
    fold_of = torch.arange(len(labels)) % folds
    correct, spent = torch.zeros(len(SPEEDS), dtype=torch.double), torch.zeros(len(SPEEDS), dtype=torch.double)
    for fold in range(folds):
        held, fit = fold_of == fold, fold_of != fold
        heads = fit_heads(all_logits[fit], config.uncertainty_top_k, per_class, all_layers, class_l2)
        rows = curve(all_logits[held], seq_lengths[held], labels[held], config, heads, per_class, all_layers)
        correct += torch.tensor([row["accuracy"] * int(held.sum()) for row in rows], dtype=torch.double)
        spent += torch.tensor([row["flops"] for row in rows], dtype=torch.double)
    stock = stock_flops(config, seq_lengths).sum().item()
    return [
        {"speed": speed, "accuracy": (c / len(labels)).item(), "flops_speedup": stock / s.item()}
        for speed, c, s in zip(SPEEDS, correct, spent, strict=True)
    ]


def auc(scores, positives):
    """Probability that a random positive scores above a random negative (tied scores ranked in argsort's order;
    the heads' scores are continuous)."""
    ranks = torch.empty_like(scores)
    ranks[scores.argsort()] = torch.arange(1, len(scores) + 1, dtype=scores.dtype)
    count = positives.sum()
    if count in (0, len(scores)):
        return float("nan")
    return ((ranks[positives].sum() - count * (count + 1) / 2) / (count * (len(scores) - count))).item()


def confidence_groups(all_logits, labels, edges=(0.0, 0.5, 0.9, 1.0)):
    """Per classifier and per group of its top probability: samples, agreement with the teacher, accuracy."""
    teacher = all_logits[:, -1].argmax(dim=-1)
    table = []
    for index in range(all_logits.shape[1]):
        top, answers = all_logits[:, index].float().softmax(dim=-1).max(dim=-1)
        for low, high in zip(edges, edges[1:], strict=False):
            group = (top >= low) & ((top < high) if high < 1.0 else (top <= high))
            count = int(group.sum())
            table.append(
                {
                    "layer": index + 1,
                    "top_probability": [low, high],
                    "samples": count,
                    "agreement": (answers[group] == teacher[group]).double().mean().item() if count else None,
                    "accuracy": (answers[group] == labels[group]).double().mean().item() if count else None,
                }
            )
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_split_arguments(parser, default_dataset="r52")
    parser.add_argument("--budget", type=float, default=0.01, help="accuracy drop allowed (0.01 = 1 point)")
    parser.add_argument("--class-l2", type=float, default=1e-2, help="L2 on the per-class intercepts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", help="results file stem (default: exit_features_DATASET)")
    args = parse_split_arguments(parser, argv)
    torch.set_num_threads(args.threads)
    model = FastBertForSequenceClassification.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    passes, _ = validation_and_test_passes(model, tokenizer, args)
    (val_logits, val_lengths, val_labels), (test_logits, test_lengths, test_labels) = (
        passes["validation"],
        passes["test"],
    )
    config = model.config
    model.calibrate_exit_rules(val_logits)  # the package's "learned" heads, for the check below
    oracle = (
        stock_flops(config, test_lengths).sum() / fastbert_flops(config, test_lengths, oracle_exits(test_logits)).sum()
    ).item()
    teacher = test_logits[:, -1].argmax(dim=-1)

    def judged(validation_curve, test_curve):
        chosen = best_within(validation_curve, args.budget)["speed"]
        calibrated = next(row for row in test_curve if row["speed"] == chosen)
        best = best_within(test_curve, args.budget)
        return {
            "calibrated": {key: calibrated[key] for key in ("speed", "accuracy", "flops_speedup")},
            "calibrated_over_oracle": calibrated["flops_speedup"] / oracle,
            "test_best": {key: best[key] for key in ("speed", "accuracy", "flops_speedup")},
            "test_best_over_oracle": best["flops_speedup"] / oracle,
        }

    results = {
        "entropy (default)": judged(
            metrics_at_speeds(val_logits, val_lengths, config, SPEEDS, val_labels, "entropy"),
            metrics_at_speeds(test_logits, test_lengths, config, SPEEDS, test_labels, "entropy"),
        )
    }
    for name, (per_class, all_layers) in VARIANTS.items():
        heads = fit_heads(val_logits, config.uncertainty_top_k, per_class, all_layers, args.class_l2)
        test_curve = curve(test_logits, test_lengths, test_labels, config, heads, per_class, all_layers)
        validation_curve = cross_fitted(
            val_logits, val_lengths, val_labels, config, per_class, all_layers, args.class_l2
        )
        if name == "current":  # this script's heads are the package's: same test curve, same cross-fitted curve
            package = metrics_at_speeds(test_logits, test_lengths, config, SPEEDS, test_labels, "learned")
            package_cv = cross_fitted_metrics(val_logits, val_lengths, val_labels, config, SPEEDS, "learned")
            for ours, theirs in zip(test_curve + validation_curve, package + package_cv, strict=True):
                same_flops = abs(ours["flops_speedup"] / theirs["flops_speedup"] - 1) < 2e-3
                if abs(ours["accuracy"] - theirs["accuracy"]) > 2e-3 or not same_flops:  # LBFGS: a sample or two
                    raise AssertionError(f"'current' differs from the package's learned rule: {ours}, {theirs}")
        rows = variant_features(test_logits, config.uncertainty_top_k, per_class, all_layers)
        aucs = [
            auc((features @ w).float(), answers == teacher) for (features, answers), w in zip(rows, heads, strict=True)
        ]
        results[name] = {**judged(validation_curve, test_curve), "auc_per_student": aucs}
        print(name, results[name], flush=True)

    command = "python benchmarks/bench_exit_features.py " + " ".join(argv if argv is not None else sys.argv[1:])
    teacher_accuracy = (teacher == test_labels).double().mean().item()
    report = {
        "command": command,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": args.dataset,
        "validation_samples": len(val_labels),
        "test_samples": len(test_labels),
        "teacher_accuracy": teacher_accuracy,
        "oracle_flops_speedup": oracle,
        "budget": args.budget,
        "class_l2": args.class_l2,
        "threads": args.threads,
        "results": results,
        "confidence_groups": confidence_groups(test_logits, test_labels),
    }
    lines = [
        f"{args.dataset}: {len(test_labels)} test samples, heads fitted on {len(val_labels)} validation samples, "
        f"budget {100 * args.budget:g} point(s); teacher {100 * teacher_accuracy:.1f}%, oracle {oracle:.2f}x. "
        f"Command: `{command}`",
        "",
        "| learned exit features | calibrated on validation: speed, test accuracy, speed-up (x oracle) "
        "| best on test: speed-up (x oracle) | AUC per student (test) |",
        "|---|---|---|---|",
    ]
    for name, row in results.items():
        chosen = row["calibrated"]
        aucs = " / ".join(f"{value:.3f}" for value in row.get("auc_per_student", []))
        lines.append(
            f"| {name} | {chosen['speed']:g}, {100 * chosen['accuracy']:.1f}%, {chosen['flops_speedup']:.2f}x "
            f"({row['calibrated_over_oracle']:.2f}) | {row['test_best']['flops_speedup']:.2f}x "
            f"({row['test_best_over_oracle']:.2f}) | {aucs or '-'} |"
        )
    lines += [
        "",
        "Test samples by the classifier's top probability: count, agreement with the teacher, accuracy.",
        "",
        "| layer | "
        + " | ".join(f"top probability {low:g}-{high:g}" for low, high in [(0, 0.5), (0.5, 0.9), (0.9, 1)])
        + " |",
        "|---|---|---|---|",
    ]
    groups = report["confidence_groups"]
    for start in range(0, len(groups), 3):
        cells = [
            "-" if g["samples"] == 0 else f"{g['samples']}: {100 * g['agreement']:.1f}%, {100 * g['accuracy']:.1f}%"
            for g in groups[start : start + 3]
        ]
        lines.append(f"| {groups[start]['layer']} | " + " | ".join(cells) + " |")
    write_results(args, f"exit_features_{args.dataset}", report, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

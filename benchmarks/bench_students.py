"""What the students cost against what their FLOPs say: the trained model's layers, students and exit test timed apart.

Issue 9 asks that the students' share of the wall time be at most 1.5x their share of the FLOPs, at batch 1 and 32,
and the same of the engine's per-layer work. On real test snippets, the hidden states every layer reads and writes are
computed once; then, in interleaved rounds, they are run in the engine's order (each layer, then its student
(`FastBertBranch`), then the exit test: the exit rule on the student's logits and the engine's host sync), each part
timed, and the students alone, back to back. Shares are of the engine-order total; the students' FLOPs share is
`flops.branch_flops` over layers plus students at the real lengths. The two student timings differ: in the engine's
order each student runs after a layer whose weights (7 MB here) have pushed its own out of the cache.

Also, for target 4, FastBERT at speed 0 against the stock classifier, and at speed 1e-6 (the students run, nobody
leaves) against speed 0, with the calls alternating input by input, which cancels more of the machine's drift than
whole interleaved rounds.

Variants: fp32, as loaded and folded (`fold_students`: each student's attention folded into two matrices); int8 as
`quantize_int8` makes it (folded students, their first-token layers float) and unfolded (what `quantize_int8` made
before); with `--compile`, `model.compile()`.

Usage:
    make demo
    python benchmarks/bench_students.py --model outputs/fastbert-demo --compile
"""

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from bench_inference import Contender, run_rounds
from transformers import AutoTokenizer, BertForSequenceClassification

from hf_fastbert import FastBertForSequenceClassification, fold_students
from hf_fastbert.demo_data import load_rotten_tomatoes
from hf_fastbert.exit_rules import exits_at_layer
from hf_fastbert.flops import branch_flops, layer_flops
from hf_fastbert.modeling_fastbert import FastBertBranch, last_needed_columns
from hf_fastbert.quantization import quantize_int8


PARTS = ("layers", "students", "exit test")


@torch.inference_mode()
def layer_inputs(model, batch):
    """For one batch: the (mask, per-layer state, [hidden state entering layer i for i in 0..L]) the engine sees."""
    backbone, mask = model.backbone, batch["attention_mask"]
    inputs = {"input_ids": batch["input_ids"], "inputs_embeds": None, "token_type_ids": batch.get("token_type_ids")}
    hidden = backbone.embed(model, inputs, mask)
    state = backbone.prepare(model, hidden, mask)
    states = [hidden]
    for index in range(model.config.num_hidden_layers):
        states.append(backbone.run_layer(model, index, states[-1], state, mask, states[0]))
    return mask, state, states


def contenders_for(name, model, prepared, speed, part_times):
    """
    Two contenders: the engine's order (each layer, then its student and the exit test, each part timed and its
    seconds appended to `part_times[name]` per call) and the students alone, back to back on the same states.
    """
    backbone, num_layers = model.backbone, model.config.num_hidden_layers
    student_inputs = [
        [backbone.student_input(model, states[index + 1]) for index in range(num_layers - 1)]
        for _, _, states in prepared
    ]
    last_columns = [last_needed_columns(mask) for mask, _, _ in prepared]  # what the engine keeps for its host sync
    student_masks = [None if mask.all() else mask for mask, _, _ in prepared]  # the engine's: None without padding
    part_times[name] = []

    def engine_order():
        spent = dict.fromkeys(PARTS, 0.0)
        for (mask, state, states), inputs, columns, student_mask in zip(
            prepared, student_inputs, last_columns, student_masks, strict=True
        ):
            rule_state = None
            for index in range(num_layers):
                start = time.perf_counter()
                backbone.run_layer(model, index, states[index], state, mask, states[0])
                layer_done = time.perf_counter()
                spent["layers"] += layer_done - start
                if index == num_layers - 1:
                    break
                branch_logits = model.branches[index](inputs[index], student_mask)
                student_done = time.perf_counter()
                spent["students"] += student_done - layer_done
                exits, rule_state = exits_at_layer(model.config, speed, index, branch_logits, rule_state)
                torch.where(exits, -1, columns).tolist()  # the engine's host sync
                spent["exit test"] += time.perf_counter() - student_done
        part_times[name].append(spent)

    def students_alone():
        for inputs, student_mask in zip(student_inputs, student_masks, strict=True):
            for index, hidden in enumerate(inputs):
                model.branches[index](hidden, student_mask)

    return {f"{name} engine order": Contender(engine_order), f"{name} students alone": Contender(students_alone)}


def int8_unfolded(model):
    """What `quantize_int8` made before the students were folded: int8 but the students' first-token layers."""
    kept_float = {
        f"{name}.{layer}"
        for name, module in model.named_modules()
        if isinstance(module, FastBertBranch)
        for layer in module.first_token_layers
    }
    names = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)} - kept_float
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), names, dtype=torch.qint8)


def alternating_ratios(calls, inputs_list, repeats, pairs):
    """
    For each `(name, reference)` in `pairs`, the median of per-input ratios of name's time over reference's: the
    calls alternate input by input (in a rotating order, after one warm-up pass), so that the machine's drift hits
    them alike; finer than whole rounds.
    """
    names = list(calls)
    seconds = {name: [] for name in names}
    for repeat in range(repeats + 1):
        for index, inputs in enumerate(inputs_list):
            shift = (index + repeat) % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                calls[name](inputs)
                if repeat:
                    seconds[name].append(time.perf_counter() - start)
    return [
        statistics.median(a / b for a, b in zip(seconds[name], seconds[reference], strict=True))
        for name, reference in pairs
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--samples", type=int, default=128, help="test snippets (batch 1: one call each)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument(
        "--speed", type=float, default=0.5, help="the exit rule's speed (its cost hardly depends on it)"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="add model.compile() (inductor)")
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--name", default="students", help="results file stem")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = FastBertForSequenceClassification.from_pretrained(args.model).eval()
    variants = {
        "fp32": model,
        "fp32 folded": fold_students(model),
        "int8": quantize_int8(model),
        "int8 unfolded": int8_unfolded(model),
    }
    if args.compile:
        variants["fp32 compiled"] = FastBertForSequenceClassification.from_pretrained(args.model).eval().compile()
    texts = list(load_rotten_tomatoes()["test"]["text"])[: args.samples]
    encode = dict(truncation=True, max_length=args.max_length, return_tensors="pt")
    batches = {
        1: [dict(tokenizer([text], **encode)) for text in texts],
        32: [dict(tokenizer(texts[i : i + 32], padding=True, **encode)) for i in range(0, len(texts), 32)],
    }
    prepared = {size: [layer_inputs(model, batch) for batch in batches[size]] for size in batches}
    contenders, part_times = {}, {}
    with torch.inference_mode():
        for variant, variant_model in variants.items():
            for size in batches:
                name = f"{variant} b{size}"
                contenders.update(contenders_for(name, variant_model, prepared[size], args.speed, part_times))
        times = run_rounds(contenders, args.rounds, 1)  # the warm-up round also compiles
        # Target 4 of issue 9: speed 0 against the stock classifier, and speed 1e-6 (the students run, nobody
        # leaves) against speed 0, per variant.
        stock = BertForSequenceClassification.from_pretrained(args.model).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stocks = {"fp32": stock, "int8": torch.ao.quantization.quantize_dynamic(stock, {torch.nn.Linear})}
        overhead = []
        for base, stock_model in stocks.items():
            # Speed 0 runs no student, so one speed-0 call serves both forms of the students.
            forms = [name for name in variants if name.split()[0] == base and "compiled" not in name]
            calls = {
                "stock": lambda inputs, stock_model=stock_model: stock_model(**inputs),
                "speed 0": lambda inputs, fast=variants[base]: fast(**inputs, speed=0.0),
                **{name: lambda inputs, fast=variants[name]: fast(**inputs, speed=1e-6) for name in forms},
            }
            pairs = [("speed 0", "stock"), *((name, "speed 0") for name in forms)]
            for size in batches:
                zero_over_stock, *students_over_zero = alternating_ratios(calls, batches[size], args.rounds, pairs)
                for name, ratio in zip(forms, students_over_zero, strict=True):
                    overhead.append(
                        {
                            "variant": name,
                            "batch_size": size,
                            "speed_0_over_stock": zero_over_stock,
                            "speed_1e-6_over_speed_0": ratio,
                        }
                    )
    config = model.config
    lengths = torch.cat([batch["attention_mask"].sum(dim=1) for batch in batches[1]])
    student_flops = (config.num_hidden_layers - 1) * branch_flops(config, lengths).sum().item()
    all_flops = config.num_hidden_layers * layer_flops(config, lengths).sum().item() + student_flops
    flops_share = student_flops / all_flops
    rows = []
    for variant in variants:
        for size in batches:
            measured = part_times[f"{variant} b{size}"][1:]  # the warm-up round's call is not timed
            total = [sum(spent.values()) for spent in measured]
            share = {
                part: statistics.median(s[part] / t for s, t in zip(measured, total, strict=True)) for part in PARTS
            }
            alone = times[f"{variant} b{size} students alone"]["wall"]
            rows.append(
                {
                    "variant": variant,
                    "batch_size": size,
                    **{
                        f"{part}_ms_per_sample": 1000 * statistics.median(s[part] for s in measured) / len(texts)
                        for part in PARTS
                    },
                    "students_alone_ms_per_sample": 1000 * statistics.median(alone) / len(texts),
                    "students_share": share["students"],
                    "exit_test_share": share["exit test"],
                    "students_flops_share": flops_share,
                    "students_share_over_flops_share": share["students"] / flops_share,
                }
            )
    result = {
        "command": "python benchmarks/bench_students.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "threads": args.threads,
        "samples": len(texts),
        "mean_tokens": lengths.float().mean().item(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "wall_s": time.time() - started,
        "rows": rows,
        "overhead": overhead,
    }
    lines = [
        f"Students and exit test against the layers: {len(texts)} Rotten Tomatoes test snippets "
        f"({result['mean_tokens']:.1f} tokens on average), {args.threads} torch thread(s), {args.rounds} interleaved "
        f"rounds (medians); the students are {100 * flops_share:.1f}% of the FLOPs of layers + students. "
        f"Command: `{result['command']}`",
        "",
        "| variant | batch | layers ms | students ms | exit test ms | students alone ms | students % of time "
        "| x FLOPs share | exit test % of time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['variant']} | {row['batch_size']} | {row['layers_ms_per_sample']:.3f} "
            f"| {row['students_ms_per_sample']:.3f} | {row['exit test_ms_per_sample']:.3f} "
            f"| {row['students_alone_ms_per_sample']:.3f} | {100 * row['students_share']:.1f} "
            f"| {row['students_share_over_flops_share']:.1f} | {100 * row['exit_test_share']:.1f} |"
        )
    lines += [
        "",
        "Time of FastBERT at speed 0 over the stock classifier's (same weights, same variant), and at speed 1e-6 (the "
        "students run, nobody leaves) over speed 0: medians of per-input ratios, the calls alternating input by input "
        f"({args.rounds} passes). The students' FLOPs share: {100 * flops_share:.1f}%.",
        "",
        "| variant | batch | speed 0 / stock | speed 1e-6 / speed 0 |",
        "|---|---:|---:|---:|",
        *(
            f"| {row['variant']} | {row['batch_size']} | {row['speed_0_over_stock']:.3f} "
            f"| {row['speed_1e-6_over_speed_0']:.3f} |"
            for row in overhead
        ),
    ]
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (output_dir / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))  # noqa: T201


if __name__ == "__main__":
    main()

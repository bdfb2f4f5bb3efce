"""Early exit stacked on int8, torch.compile and beside ONNX Runtime: the trained model on CPU, at several speeds.

On real held-out snippets, batch 1 and 32, interleaved rounds (medians of paired ratios): ms per sample and accuracy
of the stock `BertForSequenceClassification` (same weights) and of FastBERT at each speed, in fp32 (as loaded and with
its students folded, `fold_students`), with int8 linear layers (`hf_fastbert.quantization.quantize_int8`, which folds
the students too; `--int8` in the CLI) and, with `--compile`, compiled
(`torch.compile(stock, dynamic=True)` beside `fastbert.compile()`). For FastBERT the wall-time speed-up over speed 0 of
the same variant is given beside its FLOPs speed-up (`wall / FLOPs`: 1.0 = the exits save all the time their FLOPs
promise). `--onnx` adds the stock model exported with `torch.onnx.export` and run by ONNX Runtime, in fp32 and int8
(`onnxruntime.quantization.quantize_dynamic`): what a user would otherwise deploy. (`optimum[onnxruntime]` itself
requires transformers < 4.58 and does not install beside transformers 5.)

The int8 speed for target 3 of issue 9 is calibrated, not picked on the test data: the largest speed whose accuracy on
the validation split stays within `--int8-budget` of int8 at speed 0 (`--calibrate-int8`).

Usage:
    make demo
    python benchmarks/bench_quantized.py --model outputs/fastbert-demo --compile --onnx --calibrate-int8
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from bench_inference import Contender, run_rounds
from transformers import AutoTokenizer, BertForSequenceClassification

from hf_fastbert import FastBertForSequenceClassification, fold_students
from hf_fastbert.analysis import calibrate_speed
from hf_fastbert.demo_data import load_rotten_tomatoes
from hf_fastbert.evaluation import metrics_at_speeds
from hf_fastbert.quantization import quantize_int8


CALIBRATION_SPEEDS = [round(0.02 * i, 2) for i in range(50)]


def stock_int8(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


@torch.inference_mode()
def calibrated_int8_speed(model, tokenizer, texts, labels, max_length, budget):
    """The largest speed whose validation accuracy is within `budget` of speed 0 (the int8 model's own pass)."""
    all_logits, lengths = [], []
    for start in range(0, len(texts), 64):
        inputs = tokenizer(texts[start : start + 64], truncation=True, max_length=max_length, padding=True,
                           return_tensors="pt")  # fmt: skip
        all_logits.append(model(**inputs, output_all_logits=True).all_logits.float())
        lengths.append(inputs["attention_mask"].sum(dim=1))
    rows = metrics_at_speeds(torch.cat(all_logits), torch.cat(lengths), model.config, CALIBRATION_SPEEDS, labels)
    return calibrate_speed(rows, max_accuracy_drop=budget)


def onnx_sessions(model, tokenizer, threads, work_dir):
    """The stock model exported to ONNX (dynamic batch and length) and its int8 dynamic quantization, as sessions."""
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    sample = dict(tokenizer(["a fine film", "long and dull"], padding=True, return_tensors="pt"))
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length", max=512)
    fp32_path, int8_path = Path(work_dir) / "model.onnx", Path(work_dir) / "model-int8.onnx"
    torch.onnx.export(
        model, (), kwargs=sample, f=str(fp32_path), dynamo=True, input_names=list(sample), output_names=["logits"],
        dynamic_shapes={name: {0: batch, 1: length} for name in sample},
    )  # fmt: skip
    quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    return {
        name: onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for name, path in (("onnx fp32", fp32_path), ("onnx int8", int8_path))
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument(
        "--speeds", nargs="+", type=float, default=[1e-6, 0.3, 0.5, 0.8],
        help="1e-6: the students run but (almost) nobody leaves, so the row prices the students themselves",
    )  # fmt: skip
    parser.add_argument("--samples", type=int, default=256, help="test snippets timed (and scored) per contender")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="add compiled fp32 contenders (inductor)")
    parser.add_argument("--onnx", action="store_true", help="add the stock model in ONNX Runtime (fp32 and int8)")
    parser.add_argument("--calibrate-int8", action="store_true", help="time int8 at its calibrated speed too")
    parser.add_argument("--int8-budget", type=float, default=0.005, help="accuracy drop for the calibrated speed")
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--name", default="quantized", help="results file stem")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    fastbert = FastBertForSequenceClassification.from_pretrained(args.model).eval()
    stock = BertForSequenceClassification.from_pretrained(args.model).eval()
    variants = {
        "fp32": (stock, fastbert),
        "fp32 folded": (stock, fold_students(fastbert)),
        "int8": (stock_int8(stock), quantize_int8(fastbert)),
    }
    if args.compile:
        compiled_fastbert = FastBertForSequenceClassification.from_pretrained(args.model).eval().compile()
        variants["fp32 compiled"] = (torch.compile(stock, dynamic=True), compiled_fastbert)
    data = load_rotten_tomatoes()
    test = data["test"]
    texts, labels = list(test["text"])[: args.samples], torch.tensor(test["label"][: args.samples])
    int8_choice = None
    if args.calibrate_int8:
        validation = data["validation"]
        validation_texts, validation_labels = list(validation["text"]), torch.tensor(validation["label"])
        int8_choice = calibrated_int8_speed(
            variants["int8"][1], tokenizer, validation_texts, validation_labels, args.max_length, args.int8_budget
        )
        print(f"int8 calibrated speed: {int8_choice['speed']:g} (validation)", file=sys.stderr)
    batches = {
        1: [dict(tokenizer([t], truncation=True, max_length=args.max_length, return_tensors="pt")) for t in texts],
        32: [
            dict(
                tokenizer(
                    texts[i : i + 32], truncation=True, max_length=args.max_length, padding=True, return_tensors="pt"
                )
            )  # fmt: skip
            for i in range(0, len(texts), 32)
        ],
    }
    speeds = sorted({0.0, *args.speeds, *([int8_choice["speed"]] if int8_choice else [])})
    contenders, outputs = {}, {}

    def contender(name, model, inputs_list, **kwargs):
        def call():
            result = [model(**inputs, **kwargs) for inputs in inputs_list]
            outputs[name] = result
            return result

        contenders[name] = Contender(call)

    for variant, (stock_model, fast_model) in variants.items():
        for batch_size, inputs_list in batches.items():
            contender(f"stock {variant} b{batch_size}", stock_model, inputs_list)
            for speed in speeds:
                contender(f"fastbert {variant} b{batch_size} s{speed:g}", fast_model, inputs_list, speed=speed)
    references = ["stock fp32", "stock int8"] + (["stock fp32 compiled"] if args.compile else [])
    work_dir = tempfile.TemporaryDirectory()
    if args.onnx:
        for name, session in onnx_sessions(stock, tokenizer, args.threads, work_dir.name).items():
            input_names = [node.name for node in session.get_inputs()]
            references.append(name)
            for batch_size, inputs_list in batches.items():
                feeds = [{key: inputs[key].numpy() for key in input_names} for inputs in inputs_list]

                def run_session(session=session, feeds=feeds, name=f"{name} b{batch_size}"):
                    outputs[name] = [session.run(None, feed)[0] for feed in feeds]
                    return outputs[name]

                contenders[f"{name} b{batch_size}"] = Contender(run_session)
    with torch.inference_mode():
        times = run_rounds(contenders, args.rounds, 1)  # the warm-up round also compiles
    wall = {name: value["wall"] for name, value in times.items()}

    def paired(numerator, denominator):
        return statistics.median(a / b for a, b in zip(wall[numerator], wall[denominator], strict=True))

    def accuracy(result):  # model outputs, or ONNX Runtime's logits arrays
        logits = torch.cat([torch.as_tensor(getattr(out, "logits", out)) for out in result])
        return (logits.argmax(dim=-1) == labels).double().mean().item()

    reference_rows = [
        {
            "model": name,
            "batch_size": batch_size,
            "accuracy": accuracy(outputs[f"{name} b{batch_size}"]),
            "ms_per_sample": 1000 * statistics.median(wall[f"{name} b{batch_size}"]) / len(texts),
            "over_stock_fp32": paired(f"stock fp32 b{batch_size}", f"{name} b{batch_size}"),
        }
        for name in references
        for batch_size in batches
    ]
    rows = []
    for variant in variants:
        for batch_size in batches:
            for speed in speeds:
                name = f"fastbert {variant} b{batch_size} s{speed:g}"
                flops = torch.cat([out.flops for out in outputs[name]]).sum().item()
                zero = f"fastbert {variant} b{batch_size} s0"
                zero_flops = torch.cat([out.flops for out in outputs[zero]]).sum().item()
                wall_speedup = paired(zero, name)
                rows.append(
                    {
                        "variant": variant,
                        "batch_size": batch_size,
                        "speed": speed,
                        "calibrated": bool(int8_choice and variant == "int8" and speed == int8_choice["speed"]),
                        "accuracy": accuracy(outputs[name]),
                        "ms_per_sample": 1000 * statistics.median(wall[name]) / len(texts),
                        "over_stock_fp32": paired(f"stock fp32 b{batch_size}", name),
                        "over_stock_same_variant": paired(f"stock {variant} b{batch_size}", name),
                        "wall_speedup_over_speed0": wall_speedup,
                        "flops_speedup_over_speed0": zero_flops / flops,
                        "wall_over_flops": wall_speedup / (zero_flops / flops),
                    }
                )
    result = {
        "command": "python benchmarks/bench_quantized.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "threads": args.threads,
        "samples": len(texts),
        "int8_calibrated": int8_choice,
        "references": reference_rows,
        "rows": rows,
        "wall_s": time.time() - started,
    }
    lines = [
        f"{len(texts)} Rotten Tomatoes test snippets, {args.threads} torch thread(s), {args.rounds} interleaved "
        f"rounds (medians of paired ratios); command: `{result['command']}`",
        "",
        "| model | batch | accuracy | ms / sample | x stock fp32 |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in reference_rows:
        lines.append(
            f"| {row['model']} | {row['batch_size']} | {100 * row['accuracy']:.1f}% | {row['ms_per_sample']:.2f} | "
            f"{row['over_stock_fp32']:.2f}x |"
        )
    lines += [
        "",
        "| FastBERT | batch | speed | accuracy | ms / sample | x stock fp32 | x stock same variant "
        "| wall / FLOPs speed-up over speed 0 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        speed = f"{row['speed']:g}" + (" (calibrated)" if row["calibrated"] else "")
        lines.append(
            f"| {row['variant']} | {row['batch_size']} | {speed} | {100 * row['accuracy']:.1f}% | "
            f"{row['ms_per_sample']:.2f} | {row['over_stock_fp32']:.2f}x | {row['over_stock_same_variant']:.2f}x | "
            f"{row['wall_over_flops']:.2f} |"
        )
    table = "\n".join(lines) + "\n"
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (output_dir / f"{args.name}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

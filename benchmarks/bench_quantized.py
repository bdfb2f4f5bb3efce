"""Early exit on top of int8: the trained model in fp32 and with int8 dynamic quantization, at several speeds (CPU).

On real held-out snippets, batch 1 and 32, interleaved rounds (medians): ms per sample and accuracy of the stock
`BertForSequenceClassification` (same weights) and of FastBERT at each speed, both in fp32 and after
`torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)`; for FastBERT the wall-time speed-up
over speed 0 of the same precision beside its FLOPs speed-up (`wall / FLOPs`: 1.0 means the exits save all the time
their FLOPs promise).

Usage:
    make demo
    python benchmarks/bench_quantized.py --model outputs/fastbert-demo
"""

import argparse
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

from hf_fastbert import FastBertForSequenceClassification
from hf_fastbert.demo_data import load_rotten_tomatoes


def quantized(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--speeds", nargs="+", type=float, default=[0.3, 0.5, 0.8])
    parser.add_argument("--samples", type=int, default=256, help="test snippets timed (and scored) per contender")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    fastbert = FastBertForSequenceClassification.from_pretrained(args.model).eval()
    stock = BertForSequenceClassification.from_pretrained(args.model).eval()
    models = {"fp32": (stock, fastbert), "int8": (quantized(stock), quantized(fastbert))}
    test = load_rotten_tomatoes()["test"]
    texts, labels = list(test["text"])[: args.samples], torch.tensor(test["label"][: args.samples])
    batches = {
        1: [dict(tokenizer([t], truncation=True, max_length=args.max_length, return_tensors="pt")) for t in texts],
        32: [
            dict(
                tokenizer(
                    texts[i : i + 32], truncation=True, max_length=args.max_length, padding=True, return_tensors="pt"
                )
            )
            for i in range(0, len(texts), 32)
        ],
    }
    speeds = [0.0, *args.speeds]
    contenders, outputs = {}, {}

    def contender(name, model, inputs_list, **kwargs):
        def call():
            result = [model(**inputs, **kwargs) for inputs in inputs_list]
            outputs[name] = result
            return result

        contenders[name] = Contender(call)

    for precision, (stock_model, fast_model) in models.items():
        for batch_size, inputs_list in batches.items():
            contender(f"stock {precision} b{batch_size}", stock_model, inputs_list)
            for speed in speeds:
                contender(f"fastbert {precision} b{batch_size} s{speed:g}", fast_model, inputs_list, speed=speed)
    with torch.inference_mode():
        times = run_rounds(contenders, args.rounds, 1)
    wall = {name: value["wall"] for name, value in times.items()}

    def paired(numerator, denominator):
        return statistics.median(a / b for a, b in zip(wall[numerator], wall[denominator], strict=True))

    rows = []
    for precision in models:
        for batch_size in batches:
            stock_name = f"stock {precision} b{batch_size}"
            for speed in speeds:
                name = f"fastbert {precision} b{batch_size} s{speed:g}"
                result = outputs[name]
                predictions = torch.cat([out.logits.argmax(dim=-1) for out in result])
                flops = torch.cat([out.flops for out in result]).sum().item()
                zero = outputs[f"fastbert {precision} b{batch_size} s0"]
                zero_flops = torch.cat([out.flops for out in zero]).sum().item()
                wall_speedup = paired(f"fastbert {precision} b{batch_size} s0", name)
                rows.append(
                    {
                        "precision": precision,
                        "batch_size": batch_size,
                        "speed": speed,
                        "accuracy": (predictions == labels).double().mean().item(),
                        "ms_per_sample": 1000 * statistics.median(wall[name]) / len(texts),
                        "over_stock_fp32": paired(f"stock fp32 b{batch_size}", name),
                        "over_stock_same_precision": paired(stock_name, name),
                        "wall_speedup_over_speed0": wall_speedup,
                        "flops_speedup_over_speed0": zero_flops / flops,
                        "wall_over_flops": wall_speedup / (zero_flops / flops),
                    }
                )
    stock_ms = {
        f"{precision} b{batch_size}": 1000 * statistics.median(wall[f"stock {precision} b{batch_size}"]) / len(texts)
        for precision in models
        for batch_size in batches
    }
    result = {
        "command": "python benchmarks/bench_quantized.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "threads": args.threads,
        "samples": len(texts),
        "stock_ms_per_sample": stock_ms,
        "rows": rows,
        "wall_s": time.time() - started,
    }
    lines = [
        f"{len(texts)} Rotten Tomatoes test snippets, {args.threads} torch thread(s), {args.rounds} interleaved "
        "rounds; stock BERT ms/sample: " + ", ".join(f"{k} {v:.2f}" for k, v in stock_ms.items()),
        "",
        "| precision | batch | speed | accuracy | ms / sample | x stock fp32 | x stock same precision "
        "| wall / FLOPs speed-up over speed 0 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['precision']} | {row['batch_size']} | {row['speed']:g} | {100 * row['accuracy']:.1f}% | "
            f"{row['ms_per_sample']:.2f} | {row['over_stock_fp32']:.2f}x | {row['over_stock_same_precision']:.2f}x | "
            f"{row['wall_over_flops']:.2f} |"
        )
    table = "\n".join(lines) + "\n"
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "quantized.json").write_text(json.dumps(result, indent=2) + "\n")
    (output_dir / "quantized.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

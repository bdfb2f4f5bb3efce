"""FastBERT on ONNX Runtime against the stock classifier on ONNX Runtime, with the same fusions, and against PyTorch.

On real held-out snippets, batch 1 and 32, interleaved rounds (medians of per-round ratios), in one run:
- the stock `BertForSequenceClassification` (same weights) in fp32 PyTorch;
- the stock model exported as one graph (`torch.onnx.export(dynamo=True)`), fused by onnxscript's ONNX Runtime
  rewriter exactly as FastBERT's stages are (Attention, SkipLayerNormalization, BiasGelu), in fp32 and dynamically
  quantized to int8;
- FastBERT in PyTorch, fp32 and int8 (`quantize_int8`), at the model's saved speed;
- FastBERT on ONNX Runtime (`hf-fastbert export`, fp32 and `--int8`) at speed 0 and at the speed calibrated on the
  validation split on its own outputs (the largest within `--budget` of its own speed 0, entropy rule; with
  `--confidence 0.95`, the budget read at its 95% bound on new data, as `calibrate(..., confidence=0.95)` does).
With `--shared-thread-pool`, every session shares one global pool (the opt-in of `docs/onnx.md`; the stock graph's
too, as ONNX Runtime requires once the process has one).
Also measured: the cost of one session run (an Identity graph on a batch of hidden states), the per-stage overhead.

Accuracy is on `--accuracy-samples` test snippets, scored at each batch size as it is timed (the stock int8 graph
quantizes a batch's activations together, so its answers at batch 32 are not its answers at batch 1; FastBERT's int8
runs each sample alone at any batch); times are on the first `--samples`. Each FastBERT ONNX Runtime row also gives
its accuracy minus the stock graph's of the same precision and batch size, with a 95% interval (paired, on the same
samples). The wall-time speed-up over the same backend's speed 0 is given beside the FLOPs speed-up (`wall /
FLOPs`: 1.0 = the exits save all the time their FLOPs promise).

    make demo
    python benchmarks/bench_onnx.py --model outputs/fastbert-demo --threads 1
    python benchmarks/bench_onnx.py --model outputs/fastbert-demo --threads 2 --name onnx_2threads
    python benchmarks/bench_many_class.py --dataset r8 --save-model outputs/r8      # the default recipe, ~70 min
    python benchmarks/bench_onnx.py --model outputs/r8 --dataset r8 --max-length 128 --name onnx_r8

With `--dataset r8` (Reuters R8, as `bench_many_class.py` loads it with its seed), the validation split is the 1,000
training documents after the first 3,000 (which `bench_many_class.py` trains on), and the test documents are scored.
"""

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import transformers
from bench_inference import Contender, cpu_model, run_rounds
from transformers import AutoTokenizer, BertForSequenceClassification

from hf_fastbert import FastBertForSequenceClassification
from hf_fastbert.analysis import calibrate
from hf_fastbert.data import prepare_dataset
from hf_fastbert.demo_data import load_reuters, load_rotten_tomatoes
from hf_fastbert.modeling_ort import ORTFastBertForSequenceClassification
from hf_fastbert.onnx_export import (
    EARLY_EXIT,
    _export_stage,
    _fuse,
    _operator_counts,
    _quantize,
    _save,
    export_onnx,
)
from hf_fastbert.quantization import quantize_int8


class StockClassifier(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits


def stock_onnx(stock, work_dir: Path):
    """The stock classifier as one fused graph, fp32 and int8 files; and its fused operator counts."""
    sample = torch.randint(1000, 2000, (2, 16))
    mask = torch.ones_like(sample)
    mask[1, 11:] = 0
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    axes = {0: batch, 1: length}
    graph = _export_stage(
        StockClassifier(stock).eval(),
        (sample, mask, torch.zeros_like(sample)),
        ["input_ids", "attention_mask", "token_type_ids"],
        ["logits"],
        (axes, axes, axes),
    )
    graph = _fuse(graph, padding_mask=True)  # as the stages are
    counts = _operator_counts(graph)
    fp32, int8 = work_dir / "stock.onnx", work_dir / "stock-int8.onnx"
    _save(graph, fp32)
    _quantize(fp32, int8, [])
    return fp32, int8, counts


def paired_difference(correct, reference, z=1.96):
    """
    Accuracy of `correct` minus that of `reference` (per-sample 0/1 on the same samples) with its 95% interval: the
    normal approximation of the mean of the per-sample differences, which only the samples where the two disagree
    move.
    """
    difference = correct - reference
    mean = difference.mean().item()
    half = z * difference.std().item() / len(difference) ** 0.5
    return {"mean": mean, "low": mean - half, "high": mean + half, "disagreements": int(difference.abs().sum())}


def session_run_cost(options, hidden_size, batch_size, length, runs=2000):
    """Microseconds of one `InferenceSession.run` of an Identity graph on a (batch, length, hidden) float tensor."""
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper

    shape = [None, None, hidden_size]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {"x": np.zeros((batch_size, length, hidden_size), dtype=np.float32)}
    for _ in range(100):
        session.run(None, feed)
    start = time.perf_counter()
    for _ in range(runs):
        session.run(None, feed)
    return 1e6 * (time.perf_counter() - start) / runs


def host_step_cost(session, feed, runs=200):
    """
    Microseconds of the batched engine's host work between two layers at batch 1 (compare the uncertainties with the
    speed, count the exits), timed right after a run of `session` (cold: the run has pushed the interpreter's code and
    data out of the CPU caches) and again at once (warm). Medians.
    """
    uncertainty = np.zeros(1, dtype=np.float32)
    cold, warm = [], []
    for _ in range(runs):
        session.run(None, feed)
        for times in (cold, warm):
            start = time.perf_counter()
            int((uncertainty < 0.5).sum())
            times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(cold), 1e6 * statistics.median(warm)


def nested_against_chained(model, feeds, speed, rounds):
    """
    A sample alone run as the engine runs it, its layers nested in one session (`early_exit_graph`), against the same
    layer sessions chained by the host, one scalar comparison between two runs (the engine before it). Session runs
    only, on each of `feeds` (batch-1 numpy inputs of the first layer's graph) at `speed`, in interleaved rounds:
    `(nested ms, chained ms, median of per-round chained / nested)`. The exit layers are checked to be the same.
    """
    threshold = np.float32(speed)
    layers, nested = model._layers, model.sessions[EARLY_EXIT]

    def chained(feed):
        mask = feed["attention_mask"]
        for index in range(len(layers) - 1):
            hidden, logits, uncertainty = layers[index].run(None, feed)
            if uncertainty.item() < threshold:
                return index + 1
            feed = {"hidden_states": hidden, "attention_mask": mask}
        layers[-1].run(None, feed)
        return len(layers)

    def in_one(feed):
        return int(nested.run(None, {**feed, "speed": np.array(threshold)})[1][0])

    if [chained(feed) for feed in feeds] != [in_one(feed) for feed in feeds]:
        raise RuntimeError("The nested graph and the chained layer sessions disagree on an exit.")
    times = {"nested": [], "chained": []}
    for _ in range(rounds):
        for name, call in (("nested", in_one), ("chained", chained)):
            start = time.perf_counter()
            for feed in feeds:
                call(feed)
            times[name].append(time.perf_counter() - start)
    ratio = statistics.median(a / b for a, b in zip(times["chained"], times["nested"], strict=True))
    return tuple(1e3 * statistics.median(times[name]) / len(feeds) for name in times) + (ratio,)


def main(argv=None):
    import onnxruntime

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a trained FastBERT folder (make demo: outputs/fastbert-demo)")
    parser.add_argument("--samples", type=int, default=256, help="test snippets timed per contender")
    parser.add_argument("--accuracy-samples", type=int, default=2000, help="test snippets scored per contender")
    parser.add_argument("--dataset", choices=["rotten_tomatoes", "r8"], default="rotten_tomatoes")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget", type=float, default=0.005, help="accuracy drop of the calibrated speed")
    parser.add_argument(
        "--confidence", type=float, help="calibrate so that the budget holds on new data at this confidence (0.95)"
    )
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--name", default="onnx", help="results file stem")
    parser.add_argument(
        "--quantized-students", action="store_true", help="add an int8 export whose students are quantized whole"
    )
    parser.add_argument(
        "--shared-thread-pool",
        action="store_true",
        help="every session shares one global thread pool of --threads (onnxruntime.set_global_thread_pool_sizes,"
        " process-wide: the stock graph's sessions too) instead of one pool per session",
    )
    args = parser.parse_args(argv)
    if args.shared_thread_pool:  # before this process creates its first session
        onnxruntime.set_global_thread_pool_sizes(args.threads)
    if args.confidence is not None and not 0 < args.confidence < 1:
        parser.error(f"--confidence must be strictly between 0 and 1, got {args.confidence}")
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    fastbert = FastBertForSequenceClassification.from_pretrained(args.model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = BertForSequenceClassification.from_pretrained(args.model).eval()
    work = Path(tempfile.mkdtemp(prefix="bench-onnx-"))
    exports = {}
    for precision in ("fp32", "int8") + (("int8-students",) if args.quantized_students else ()):
        folder = work / precision
        shutil.copytree(args.model, folder, ignore=shutil.ignore_patterns("onnx", "sweep", "*.json.partial"))
        export_onnx(str(folder), int8=precision != "fp32", quantize_students=precision == "int8-students")
        exports[precision] = folder
    stock_fp32, stock_int8, stock_fusions = stock_onnx(stock, work)
    options = onnxruntime.SessionOptions()
    if args.shared_thread_pool:  # a process with global pools runs every session on them
        options.use_per_session_threads = False
    else:
        options.intra_op_num_threads = args.threads
    stock_sessions = {
        precision: onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for precision, path in (("fp32", stock_fp32), ("int8", stock_int8))
    }
    ort_options = {"session_options": options} if args.shared_thread_pool else {"threads": args.threads}
    ort = {
        precision: ORTFastBertForSequenceClassification.from_pretrained(folder, **ort_options)
        for precision, folder in exports.items()
    }
    torch_models = {"fp32": fastbert, "int8": quantize_int8(fastbert)}

    if args.dataset == "r8":  # the documents bench_many_class.py (--train-size 3000) did not train on
        data = load_reuters("r8", seed=42)
        data["validation"] = data["train"].select(range(3000, 4000))
    else:
        data = load_rotten_tomatoes()
    label_names = [fastbert.config.id2label[index] for index in range(fastbert.config.num_labels)]
    validation = prepare_dataset(
        data["validation"], tokenizer, "text", None, "label", label_names, args.max_length, "validation"
    )
    calibrated = {}
    for precision, model in ort.items():  # on the runtime's own outputs: int8 shifts the students' confidence
        choice = calibrate(
            model,
            validation,
            max_accuracy_drop=args.budget,
            confidence=args.confidence,
            exit_rules=["entropy"],
            batch_size=64,
        )
        calibrated[precision] = {"speed": choice.speed, "validation": choice.row, "reference": choice.reference}
        print(f"ONNX Runtime {precision}: calibrated speed {choice.speed:g} on validation", file=sys.stderr)

    test = data["test"]
    texts, labels = list(test["text"]), torch.tensor(test["label"])
    accuracy_texts, accuracy_labels = texts[: args.accuracy_samples], labels[: args.accuracy_samples]
    timed_texts = texts[: args.samples]

    def encode(batch_texts):
        return dict(tokenizer(batch_texts, truncation=True, max_length=args.max_length, padding=True,
                              return_tensors="pt"))  # fmt: skip

    batches = {
        1: [encode([text]) for text in timed_texts],
        32: [encode(timed_texts[i : i + 32]) for i in range(0, len(timed_texts), 32)],
    }
    accuracy_batches = {
        1: [encode([text]) for text in accuracy_texts],
        32: [encode(accuracy_texts[i : i + 32]) for i in range(0, len(accuracy_texts), 32)],
    }

    # (name, kind, callable on one batch dict) for every contender; FastBERT ones also report FLOPs.
    variants = [("stock PyTorch fp32", lambda batch: stock(**batch).logits, None)]
    for precision, session in stock_sessions.items():
        variants.append(
            (
                f"stock ONNX Runtime {precision}",
                lambda batch, session=session: torch.from_numpy(
                    session.run(None, {key: value.numpy() for key, value in batch.items()})[0]
                ),
                None,
            )
        )
    for precision, model in torch_models.items():
        speed = fastbert.config.speed
        variants.append(
            (f"FastBERT PyTorch {precision} s{speed:g}", lambda batch, m=model, s=speed: m(**batch, speed=s), speed)
        )
    for precision, model in ort.items():
        for speed in sorted({0.0, calibrated[precision]["speed"]}):
            variants.append(
                (
                    f"FastBERT ONNX Runtime {precision} s{speed:g}",
                    lambda batch, m=model, s=speed: m(**batch, speed=s),
                    speed,
                )
            )

    def logits_of(output):
        return getattr(output, "logits", output)

    scores, flops, correct = {}, {}, {}  # by "<name> b<batch size>"
    with torch.inference_mode():
        for name, call, _ in variants:
            for batch_size, inputs_list in accuracy_batches.items():
                key = f"{name} b{batch_size}"
                outputs = [call(batch) for batch in inputs_list]
                predictions = torch.cat([logits_of(output).argmax(dim=-1) for output in outputs])
                correct[key] = (predictions == accuracy_labels).double()
                scores[key] = correct[key].mean().item()
                if hasattr(outputs[0], "flops"):
                    flops[key] = torch.cat([output.flops for output in outputs]).double().sum().item()

    contenders = {}
    for name, call, _ in variants:
        for batch_size, inputs_list in batches.items():
            contenders[f"{name} b{batch_size}"] = Contender(
                lambda call=call, inputs_list=inputs_list: [call(batch) for batch in inputs_list]
            )
    with torch.inference_mode():
        times = run_rounds(contenders, args.rounds, 1)
    wall = {name: value["wall"] for name, value in times.items()}

    def over(reference, name):  # median over rounds of reference time / name time
        return statistics.median(a / b for a, b in zip(wall[reference], wall[name], strict=True))

    rows = []
    for name, _, speed in variants:
        for batch_size in batches:
            key = f"{name} b{batch_size}"
            row = {
                "model": name,
                "batch_size": batch_size,
                "accuracy": scores[key],
                "ms_per_sample": 1000 * statistics.median(wall[key]) / len(timed_texts),
                "x_stock_pytorch_fp32": over(f"stock PyTorch fp32 b{batch_size}", key),
            }
            if name.startswith("FastBERT ONNX Runtime"):
                precision = name.split()[3]
                zero = f"FastBERT ONNX Runtime {precision} s0"
                stock_precision = precision.split("-")[0]
                row["x_stock_onnx_same_precision"] = over(f"stock ONNX Runtime {stock_precision} b{batch_size}", key)
                row["accuracy_vs_stock_onnx"] = paired_difference(
                    correct[key], correct[f"stock ONNX Runtime {stock_precision} b{batch_size}"]
                )
                if speed:
                    row["wall_speedup_over_speed0"] = over(f"{zero} b{batch_size}", key)
                    row["flops_speedup_over_speed0"] = flops[f"{zero} b{batch_size}"] / flops[key]
                    row["wall_over_flops"] = row["wall_speedup_over_speed0"] / row["flops_speedup_over_speed0"]
                    row["calibrated"] = True
            rows.append(row)
    run_costs = {
        batch_size: session_run_cost(options, fastbert.config.hidden_size, batch_size, 24) for batch_size in (1, 32)
    }
    # The timed snippets one at a time, as the first layer's graph reads them (the same inputs in every export).
    layer_session = ort["int8"].sessions["layer_0.onnx"]
    inputs = {value.name for value in layer_session.get_inputs()}
    alone_feeds = [{key: value.numpy() for key, value in batch.items() if key in inputs} for batch in batches[1]]
    # After a run of the engine's own session of the int8 export's first layer, on the first timed snippet.
    host_cold, host_warm = host_step_cost(layer_session, alone_feeds[0])
    alone = {
        precision: nested_against_chained(model, alone_feeds, calibrated[precision]["speed"], args.rounds)
        for precision, model in ort.items()
    }
    result = {
        "command": "python benchmarks/bench_onnx.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "threads": args.threads,
        "shared_thread_pool": args.shared_thread_pool,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "samples_timed": len(timed_texts),
        "samples_scored": len(accuracy_texts),
        "calibrated": calibrated,
        "stock_fusions": {op: n for op, n in stock_fusions.items() if op[0].isupper() and op in FUSED},
        "session_run_us": run_costs,
        "host_step_us": {"after_a_session_run": host_cold, "warm": host_warm},
        "alone_nested_vs_chained": {
            precision: {"nested_ms": nested, "chained_ms": chained, "chained_over_nested": ratio}
            for precision, (nested, chained, ratio) in alone.items()
        },
        "rows": rows,
        "wall_s": time.time() - started,
    }
    lines = [
        f"{len(timed_texts)} {DATASETS[args.dataset]} timed, {len(accuracy_texts)} scored; {args.threads} "
        f"thread(s){' (one global pool)' if args.shared_thread_pool else ''}; {cpu_model()}; "
        f"{args.rounds} interleaved rounds (medians of per-round ratios); "
        f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}. Command: `{result['command']}`",
        "",
        "Calibrated speeds (validation, entropy rule, within "
        f"{100 * args.budget:g} points of the same backend's speed 0"
        + (f" at {args.confidence:.0%} confidence on new data" if args.confidence else "")
        + "): "
        + ", ".join(f"ONNX Runtime {p} {c['speed']:g}" for p, c in calibrated.items())
        + f". One session run (Identity graph, length 24): {run_costs[1]:.1f} us at batch 1, "
        f"{run_costs[32]:.1f} us at batch 32. The batched engine's numpy work between two layers at batch 1 (compare, "
        f"count): {host_cold:.1f} us right after a layer's session run, {host_warm:.1f} us warm. A sample alone "
        "(batch 1, session runs only, at the calibrated speed): its layers nested in one session against the layer "
        "sessions chained by the host, "
        + ", ".join(f"{p} {n:.2f} ms against {c:.2f} ({r:.2f}x)" for p, (n, c, r) in alone.items())
        + f". Stock graph fusions: {result['stock_fusions']}.",
        "",
        "| model | batch | accuracy | accuracy - stock ONNX Runtime (same precision and batch), 95% interval "
        "| ms / sample "
        "| x stock PyTorch fp32 | x stock ONNX Runtime (same precision) | wall / FLOPs speed-up over its speed 0 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        same = f"{row['x_stock_onnx_same_precision']:.2f}x" if "x_stock_onnx_same_precision" in row else ""
        difference = row.get("accuracy_vs_stock_onnx")
        difference = (
            f"{100 * difference['mean']:+.2f} [{100 * difference['low']:+.2f}, {100 * difference['high']:+.2f}]"
            if difference
            else ""
        )
        ratio = (
            f"{row['wall_speedup_over_speed0']:.2f}x / {row['flops_speedup_over_speed0']:.2f}x = "
            f"{row['wall_over_flops']:.2f}"
            if "wall_over_flops" in row
            else ""
        )
        lines.append(
            f"| {row['model']} | {row['batch_size']} | {100 * row['accuracy']:.2f}% | {difference} | "
            f"{row['ms_per_sample']:.2f} | "
            f"{row['x_stock_pytorch_fp32']:.2f}x | {same} | {ratio} |"
        )
    table = "\n".join(lines) + "\n"
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (output_dir / f"{args.name}.md").write_text(table)
    shutil.rmtree(work, ignore_errors=True)
    print(table)


DATASETS = {"rotten_tomatoes": "Rotten Tomatoes test snippets", "r8": "Reuters R8 test documents"}
FUSED = ("Attention", "SkipLayerNormalization", "BiasGelu", "FastGelu", "Gelu", "EmbedLayerNormalization")


if __name__ == "__main__":
    main()

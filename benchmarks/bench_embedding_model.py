"""
The library's FastBERT sentence embedding model, end to end (issue 24), on the real all-MiniLM-L6-v2: its heads
self-distilled with `train_embedding_heads` on training texts (labels unused), then measured on held-out texts used as
queries and as the corpus (indexed at full depth, so existing indexes stay valid).

- per speed: mean cosine to the full-depth embedding, overlap of the 10 nearest neighbours with full depth's, same-
  class precision@10 (labels used only here), mean exit layer, FLOPs speed-up (`embedding_metrics_at_speeds`);
- at equal FLOPs: uniform truncation to k layers, with the distilled head of layer k and without a head (the layer's
  own mean-pooled states);
- wall time at batch 32 (texts in their given order), per speed against speed 0, in interleaved rounds (medians),
  and its ratio to the FLOPs speed-up;
- a check that speed 0 is the stock embedding: `SentenceTransformer(all-MiniLM-L6-v2).encode` against the model.

    python benchmarks/bench_embedding_model.py --dataset r8
    python benchmarks/bench_embedding_model.py --dataset tweets
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from hf_fastbert import FastBertForSentenceEmbedding
from hf_fastbert.demo_data import load_crowdflower_tweets, load_reuters, minilm_path
from hf_fastbert.evaluation import embedding_metrics_at_speeds, embedding_quality
from hf_fastbert.flops import embedding_flops, embedding_head_flops
from hf_fastbert.modeling_fastbert_embedding import pool_tokens
from hf_fastbert.training.embedding import embed_all_layers, train_embedding_heads


SPEEDS = (0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2)


def layer_states(model, tokenizer, texts, max_length, batch_size=64):
    """(N, L, H) mean-pooled, normalized states of layers 1 .. L (truncation without a head)."""
    pooled = []
    base = model.backbone.base_model(model)
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length,
            return_tensors="pt",
        )  # fmt: skip
        with torch.no_grad():
            states = base(**batch, output_hidden_states=True).hidden_states[1:]
        pooled.append(torch.stack([pool_tokens(s, batch["attention_mask"], "mean") for s in states], dim=1))
    return F.normalize(torch.cat(pooled), dim=-1)


def wall_times(model, tokenizer, texts, max_length, speeds, rounds, batch_size=32):
    """Median seconds of one pass over `texts` at each speed, rounds interleaved."""
    batches = [
        tokenizer(texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt")
        for start in range(0, len(texts), batch_size)
    ]  # fmt: skip
    times = {speed: [] for speed in speeds}
    with torch.no_grad():
        for batch in batches[:2]:  # warm-up
            model(**batch, speed=speeds[-1])
        for _ in range(rounds):
            for speed in speeds:
                started = time.perf_counter()
                for batch in batches:
                    model(**batch, speed=speed)
                times[speed].append(time.perf_counter() - started)
    return {speed: statistics.median(values) for speed, values in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=["r8", "tweets"], default="r8")
    parser.add_argument("--train-samples", type=int, default=5000)
    parser.add_argument("--eval-samples", type=int, default=2000)
    parser.add_argument("--max-epochs", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    if args.dataset == "r8":
        data, max_length = load_reuters("r8", seed=42), 128
    else:
        data, max_length = load_crowdflower_tweets(), 64
    train = data["train"].select(range(min(args.train_samples, len(data["train"]))))
    evaluation = data["test"].select(range(min(args.eval_samples, len(data["test"]))))
    texts, labels = evaluation["text"], evaluation["label"]
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = FastBertForSentenceEmbedding.from_pretrained(minilm_path())
    config = model.config

    from sentence_transformers import SentenceTransformer

    stock = SentenceTransformer(minilm_path(), device="cpu")
    stock.max_seq_length = max_length
    reference = torch.as_tensor(stock.encode(texts[:64], batch_size=32))
    with torch.no_grad():
        batch = tokenizer(texts[:64], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        ours = model.eval()(**batch).embeddings
    stock_difference = float((ours - reference).abs().max())

    with tempfile.TemporaryDirectory() as folder:
        trained = time.time()
        output = train_embedding_heads(
            model, tokenizer, train["text"], folder, max_length=max_length, max_epochs=args.max_epochs
        )
        training_seconds = time.time() - trained
    all_embeddings, lengths = embed_all_layers(model, tokenizer, texts, max_length)
    rows = [
        {"method": "FastBERT exit", "setting": f"speed {row['speed']:g}", **row}
        for row in embedding_metrics_at_speeds(all_embeddings, lengths, config, SPEEDS, labels=labels)
    ]
    full_flops = embedding_flops(config, lengths, torch.full_like(lengths, config.num_hidden_layers), False).sum()
    truncated = layer_states(model, tokenizer, texts, max_length)
    corpus = all_embeddings[:, -1]
    for layer in range(1, config.num_hidden_layers):
        exits = torch.full_like(lengths, layer)
        layers_only = embedding_flops(config, lengths, exits, heads_ran=False)
        for method, queries, flops in (
            ("truncation, no head", truncated[:, layer - 1], layers_only),
            ("truncation + head", all_embeddings[:, layer - 1], layers_only + embedding_head_flops(config, lengths)),
        ):
            rows.append(
                {"method": method, "setting": f"{layer} layers", "speed": None,
                 **embedding_quality(queries, corpus, labels), "mean_exit_layer": float(layer),
                 "flops_speedup": float(full_flops / flops.sum())}
            )  # fmt: skip
    wall = wall_times(model.eval(), tokenizer, texts, max_length, SPEEDS, args.rounds)
    for row in rows:
        if row["speed"] is not None:
            row["wall_speedup"] = wall[0.0] / wall[row["speed"]]
            row["wall_over_flops"] = row["wall_speedup"] / row["flops_speedup"]

    command = f"python benchmarks/bench_embedding_model.py --dataset {args.dataset}"
    suffix = ""
    for option, value, default in (("max-epochs", args.max_epochs, 10.0), ("rounds", args.rounds, 3)):
        if value != default:
            command += f" --{option} {value:g}"
            suffix += f"_{option.split('-')[-1]}{value:g}"
    convergence = output.convergence or {}
    lines = [
        f"all-MiniLM-L6-v2 as `FastBertForSentenceEmbedding` (mean pooling + normalization read from its "
        f"sentence-transformers files), {args.dataset}: heads distilled by `train_embedding_heads` on {len(train)} "
        f"training texts (labels unused; {convergence.get('stopped', '?')} after {convergence.get('steps', '?')} "
        f"steps, {training_seconds / 60:.1f} min), measured on {len(texts)} test texts as queries and corpus "
        f"(full-depth index), max length {max_length}, {args.threads} threads. Speed 0 against "
        f"`SentenceTransformer.encode`: max abs difference {stock_difference:.2e}. Wall time: batch 32, median of "
        f"{args.rounds} interleaved rounds. {time.time() - started:.0f} s in all. Command: `{command}`",
        "",
        "| method | setting | FLOPs speed-up | wall speed-up | wall / FLOPs | mean exit layer | cosine to full | "
        "overlap@10 | precision@10 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        wall_cells = f"{row['wall_speedup']:.2f}x | {row['wall_over_flops']:.2f}" if "wall_speedup" in row else "- | -"
        lines.append(
            f"| {row['method']} | {row['setting']} | {row['flops_speedup']:.2f}x | {wall_cells} | "
            f"{row['mean_exit_layer']:.2f} | {row['cosine']:.4f} | {row['overlap']:.3f} | {row['precision']:.4f} |"
        )
    name = f"embedding_model_{args.dataset}{suffix}"
    output_dir = Path(args.output_dir)
    (output_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    (output_dir / f"{name}.json").write_text(
        json.dumps({"command": command, "convergence": convergence, "rows": rows}, indent=2, default=str) + "\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()

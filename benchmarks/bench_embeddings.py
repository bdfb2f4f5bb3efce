"""
Early exit for sentence embeddings, measured before it is built (issue 24): what per-sample exits with small
per-layer heads could give over uniform truncation, on the real all-MiniLM-L6-v2 (mean pooling + normalization, as
its sentence-transformers files say) and held-out texts.

One full-depth pass keeps every layer's mean-pooled states; everything else is computed from them:

- heads: per layer k, a linear map (ridge regression, closed form) from the layer's pooled states to the final
  embedding, fitted on training texts (labels unused): the simplest "distilled" head;
- uniform truncation to k layers, without a head (the layer's own pooled states) and with one;
- per-sample exit with the heads, by two rules: "consecutive" (leave at the first layer whose head embedding has
  cosine >= 1 - t with the previous layer's) and "learned" (leave when a per-layer linear fit of the cosine to the
  final embedding, from the consecutive cosine, predicts >= 1 - t); speed 0 is the stock embedding, exactly;
- the oracle: leave at the first layer whose head embedding has cosine >= 1 - t with the final one (it needs the
  final embedding, so it is a bound, not a rule).

Quality, with queries encoded by each method and the corpus indexed at full depth (existing indexes stay valid):
mean cosine to the full-depth embedding, overlap of the 10 nearest neighbours with full depth's, same-class
precision@10 (labels used only here). Cost: FLOPs per sample at its real length (`hf_fastbert.flops` conventions,
heads included), as a speed-up over full depth.

    python benchmarks/bench_embeddings.py --dataset r8
    python benchmarks/bench_embeddings.py --dataset tweets
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, BertModel

from hf_fastbert.backbones import BACKBONES
from hf_fastbert.demo_data import load_crowdflower_tweets, load_reuters, minilm_path


THRESHOLDS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3)
RIDGE = 1e-2


def pooled_states(model, tokenizer, texts, max_length, batch_size=64):
    """(N, L + 1, H) masked mean of the embeddings' and every layer's states, and (N,) token counts."""
    pooled, lengths = [], []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size],
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            states = model(**batch, output_hidden_states=True).hidden_states  # L + 1 of (B, T, H)
        mask = batch["attention_mask"][:, :, None].float()  # (B, T, 1)
        pooled.append(torch.stack([(s * mask).sum(1) / mask.sum(1) for s in states], dim=1))  # (B, L + 1, H)
        lengths.append(batch["attention_mask"].sum(1))
    return torch.cat(pooled).double().numpy(), torch.cat(lengths).numpy()


def normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def fit_heads(pooled, num_layers):
    """Per layer k < L: (W, b) with pooled_k @ W + b ~ pooled_L (ridge), fitted on the training texts."""
    target = pooled[:, num_layers]
    heads = []
    for layer in range(1, num_layers):
        x = np.concatenate([pooled[:, layer], np.ones((len(pooled), 1))], axis=1)  # (N, H + 1)
        w = np.linalg.solve(x.T @ x + RIDGE * len(x) * np.eye(x.shape[1]), x.T @ target)
        heads.append(w)
    return heads


def fit_mlp_heads(pooled, num_layers, epochs=300, seed=0):
    """
    Per layer k < L: a two-layer MLP (H -> 4H -> H, GELU) with a linear shortcut, trained by gradient (Adam, full
    batch) on 1 - cosine to the final embedding: a non-linear head on the same pooled states, to see how much of the
    gap to the final embedding a better head on pooled states closes.
    """
    torch.manual_seed(seed)
    target = torch.nn.functional.normalize(torch.as_tensor(pooled[:, num_layers]).float(), dim=-1)
    heads = []
    for layer in range(1, num_layers):
        x = torch.as_tensor(pooled[:, layer]).float()
        size = x.shape[1]
        mlp = torch.nn.Sequential(torch.nn.Linear(size, 4 * size), torch.nn.GELU(), torch.nn.Linear(4 * size, size))
        shortcut = torch.nn.Linear(size, size)
        parameters = [*mlp.parameters(), *shortcut.parameters()]
        optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=1e-2)
        for _ in range(epochs):
            optimizer.zero_grad()
            out = torch.nn.functional.normalize(mlp(x) + shortcut(x), dim=-1)
            loss = 1 - (out * target).sum(-1).mean()
            loss.backward()
            optimizer.step()
        heads.append(lambda h, mlp=mlp, shortcut=shortcut: (mlp(h) + shortcut(h)).detach())
    return heads


def token_states(model, tokenizer, texts, max_length, batch_size=64):
    """(N, L - 1, T, H) float16 states of layers 1 .. L-1 padded to `max_length`, and (N, T) masks."""
    states, masks = [], []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size], truncation=True, max_length=max_length, padding="max_length",
            return_tensors="pt",
        )  # fmt: skip
        with torch.no_grad():
            hidden = model(**batch, output_hidden_states=True).hidden_states[1:-1]  # L - 1 of (B, T, H)
        states.append(torch.stack(hidden, dim=1).half())
        masks.append(batch["attention_mask"])
    return torch.cat(states), torch.cat(masks)


class AttentionHead(torch.nn.Module):
    """Attention pooling over every token (learned queries, keys folded into them) plus the mean, to H."""

    def __init__(self, size, heads=4):
        super().__init__()
        self.scores = torch.nn.Linear(size, heads)  # one folded query per attention head
        self.output = torch.nn.Linear(heads * size + size, size)

    def forward(self, x, mask):  # (B, T, H), (B, T) -> (B, H)
        scores = self.scores(x).masked_fill(mask[:, :, None] == 0, float("-inf")).softmax(dim=1)  # (B, T, heads)
        pooled = torch.einsum("bth,btd->bhd", scores, x).flatten(1)  # (B, heads * H)
        mean = (x * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True)
        return self.output(torch.cat([pooled, mean], dim=1))

    @staticmethod
    def flops(size, lengths, heads=4):
        return 2 * lengths * size * heads * 2 + 2 * (heads * size + size) * size


def fit_attention_heads(states, masks, final, epochs=8, batch_size=128, seed=0):
    """Per layer 1 .. L-1: an `AttentionHead` trained by gradient (AdamW) on 1 - cosine to the final embedding."""
    torch.manual_seed(seed)
    target = torch.nn.functional.normalize(torch.as_tensor(final).float(), dim=-1)
    heads = []
    for layer in range(states.shape[1]):
        head = AttentionHead(states.shape[-1])
        optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-2)
        for _ in range(epochs):
            for index in torch.randperm(len(states)).split(batch_size):
                optimizer.zero_grad()
                out = torch.nn.functional.normalize(head(states[index, layer].float(), masks[index]), dim=-1)
                (1 - (out * target[index]).sum(-1).mean()).backward()
                optimizer.step()
        heads.append(head.eval())
    return heads


def attention_embeddings(heads, states, masks, pooled, num_layers):
    """(N, L, H) normalized embeddings: the attention heads for layers 1 .. L-1, the stock embedding at L."""
    out = []
    with torch.no_grad():
        for layer, head in enumerate(heads):
            rows = [head(states[i : i + 256, layer].float(), masks[i : i + 256]) for i in range(0, len(states), 256)]
            out.append(normalize(torch.cat(rows).double().numpy()))
    out.append(normalize(pooled[:, num_layers]))
    return np.stack(out, axis=1)


def head_embeddings(pooled, heads, num_layers):
    """(N, L, H) normalized embeddings per layer: heads for layers 1 .. L-1, the stock embedding at L."""
    if callable(heads[0]):  # MLP heads
        with torch.no_grad():
            out = [
                normalize(head(torch.as_tensor(pooled[:, k + 1]).float()).double().numpy())
                for k, head in enumerate(heads)
            ]
        out.append(normalize(pooled[:, num_layers]))
        return np.stack(out, axis=1)
    out = [
        normalize(np.concatenate([pooled[:, k + 1], np.ones((len(pooled), 1))], axis=1) @ w)
        for k, w in enumerate(heads)
    ]
    out.append(normalize(pooled[:, num_layers]))
    return np.stack(out, axis=1)


def consecutive_cosines(embeddings):
    """(N, L) cosine of each layer's embedding with the previous layer's (layer 1: 0, it never leaves)."""
    cos = np.zeros(embeddings.shape[:2])
    cos[:, 1:] = (embeddings[:, 1:] * embeddings[:, :-1]).sum(-1)
    return cos


def first_layer(leave):
    """(N, L) booleans -> (N,) 1-based first layer that leaves (the last layer always answers)."""
    leave = leave.copy()
    leave[:, -1] = True
    return leave.argmax(axis=1) + 1


def flops_per_sample(config, lengths, exit_layers, heads_run, head="linear"):
    """FLOPs of the backbone up to each sample's exit layer, plus `heads_run` heads (linear: H x H; MLP: 9 H x H)."""
    backbone = BACKBONES["bert"]
    n = torch.as_tensor(lengths).long()
    per_layer = backbone.layer_flops(config, n).double().numpy()
    fixed = backbone.fixed_flops(config, n).double().numpy()
    size = config.hidden_size
    head_flops = {
        "linear": 2 * size * (size + 1),
        "mlp": 2 * (4 * size * size * 2 + size * size),
        "attention": AttentionHead.flops(size, lengths),
    }[head]
    return fixed + exit_layers * per_layer + heads_run * head_flops


def quality(queries, full_queries, corpus, labels):
    """Mean cosine to full depth, top-10 overlap with full depth, same-class precision@10 (self excluded)."""

    def top10(q):
        sims = q @ corpus.T
        np.fill_diagonal(sims, -np.inf)
        return np.argsort(-sims, axis=1)[:, :10]

    got, reference = top10(queries), top10(full_queries)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, reference, strict=True)])
    precision = np.mean(labels[got] == labels[:, None])
    return {
        "cosine": float((queries * full_queries).sum(-1).mean()),
        "overlap@10": float(overlap),
        "precision@10": float(precision),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=["r8", "tweets"], default="r8")
    parser.add_argument("--fit-samples", type=int, default=2000, help="training texts the heads are fitted on")
    parser.add_argument("--eval-samples", type=int, default=2000, help="held-out texts: queries and corpus")
    parser.add_argument("--head", choices=["linear", "mlp", "attention"], default="linear", help="the per-layer heads")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    if args.dataset == "r8":
        data, max_length = load_reuters("r8", seed=42), 128
        fit, evaluation = data["train"].select(range(args.fit_samples)), data["test"]
    else:
        data, max_length = load_crowdflower_tweets(), 64
        fit, evaluation = data["train"].select(range(args.fit_samples)), data["test"]
    evaluation = evaluation.select(range(min(args.eval_samples, len(evaluation))))
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = BertModel.from_pretrained(minilm_path()).eval()
    config, num_layers = model.config, model.config.num_hidden_layers
    fit_pooled, _ = pooled_states(model, tokenizer, fit["text"], max_length)
    pooled, lengths = pooled_states(model, tokenizer, evaluation["text"], max_length)
    labels = np.asarray(evaluation["label"])
    if args.head == "attention":
        fit_states, fit_masks = token_states(model, tokenizer, fit["text"], max_length)
        states, masks = token_states(model, tokenizer, evaluation["text"], max_length)
        heads = fit_attention_heads(fit_states, fit_masks, fit_pooled[:, num_layers])
        embeddings = attention_embeddings(heads, states, masks, pooled, num_layers)  # (N, L, H)
        fit_embeddings = attention_embeddings(heads, fit_states, fit_masks, fit_pooled, num_layers)
    else:
        heads = fit_heads(fit_pooled, num_layers) if args.head == "linear" else fit_mlp_heads(fit_pooled, num_layers)
        embeddings = head_embeddings(pooled, heads, num_layers)  # (N, L, H)
        fit_embeddings = head_embeddings(fit_pooled, heads, num_layers)
    full = embeddings[:, -1]
    full_flops = flops_per_sample(config, lengths, np.full(len(lengths), num_layers), 0).mean()

    rows = []

    def add(method, setting, queries, exit_layers, heads_run):
        flops = flops_per_sample(config, lengths, exit_layers, heads_run, args.head).mean()
        rows.append(
            {"method": method, "setting": setting, "flops_speedup": float(full_flops / flops),
             "mean_exit_layer": float(np.mean(exit_layers)), **quality(queries, full, full, labels)}
        )  # fmt: skip

    add("full depth", "-", full, np.full(len(full), num_layers), 0)
    for k in range(1, num_layers):
        exits = np.full(len(full), k)
        add("truncation, no head", f"{k} layers", normalize(pooled[:, k]), exits, 0)
        add("truncation + head", f"{k} layers", embeddings[:, k - 1], exits, 1)

    consecutive = consecutive_cosines(embeddings)
    # "learned": per layer, a linear fit of the cosine to the final embedding from the consecutive cosine (on the
    # fitting texts' own head embeddings, so that nothing of the evaluation texts is used).
    fit_consecutive = consecutive_cosines(fit_embeddings)
    fit_to_final = (fit_embeddings * fit_embeddings[:, -1:]).sum(-1)  # (N, L)
    predicted = np.zeros_like(consecutive)
    for layer in range(1, num_layers - 1):  # 0-based layers 1 .. L-2 may leave by this rule
        x = np.stack([fit_consecutive[:, layer], np.ones(len(fit_consecutive))], axis=1)
        coef, *_ = np.linalg.lstsq(x, fit_to_final[:, layer], rcond=None)
        predicted[:, layer] = np.stack([consecutive[:, layer], np.ones(len(consecutive))], axis=1) @ coef
    to_final = (embeddings * full[:, None]).sum(-1)  # (N, L): the oracle's measure
    rules = {"exit: consecutive cosine": consecutive, "exit: learned": predicted, "oracle": to_final}
    for name, measure in rules.items():
        for threshold in THRESHOLDS:
            leave = measure >= 1 - threshold
            if name != "oracle":
                leave[:, 0] = False  # the first layer has nothing to compare with
            exits = first_layer(leave)
            queries = embeddings[np.arange(len(exits)), exits - 1]
            add(name, f"t={threshold:g}", queries, exits, np.minimum(exits, num_layers - 1))

    variant = ("" if args.head == "linear" else f"_{args.head}") + (
        f"_fit{args.fit_samples}" if args.fit_samples != 2000 else ""
    )
    name = f"embeddings_{args.dataset}{variant}"
    command = f"python benchmarks/bench_embeddings.py --dataset {args.dataset}"
    command += ("" if args.head == "linear" else f" --head {args.head}") + (
        f" --fit-samples {args.fit_samples}" if args.fit_samples != 2000 else ""
    )
    header = (
        f"all-MiniLM-L6-v2 (mean pooling + normalization), {args.dataset}: {args.head} heads fitted on {len(fit)} "
        "training texts, "
        f"{len(evaluation)} test texts as queries and corpus (full-depth index), max length {max_length}. "
        f"Full depth: precision@10 {rows[0]['precision@10']:.4f}. {time.time() - started:.0f} s. Command: `{command}`"
    )
    lines = [
        header,
        "",
        "| method | setting | FLOPs speed-up | mean exit layer | cosine to full | overlap@10 | precision@10 |",
    ]
    lines.append("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['setting']} | {row['flops_speedup']:.2f}x | {row['mean_exit_layer']:.2f} | "
            f"{row['cosine']:.4f} | {row['overlap@10']:.3f} | {row['precision@10']:.4f} |"
        )
    output_dir = Path(args.output_dir)
    (output_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    (output_dir / f"{name}.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

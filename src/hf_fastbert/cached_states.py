"""
Self-distillation on cached states. Backbone and final head are frozen while the students (or the embedding heads)
learn, so what the heads read never changes: the backbone runs once over the data, and every epoch after that costs
the heads alone. One entry per sample holds its heads' inputs without padding, in float16.
"""

import torch


# Cached head inputs above this: the backbone runs every epoch instead.
MAX_CACHE_BYTES = 8 * 2**30


class CachedHeadInputs(list):
    """The entries of [`cache_head_inputs`], one dict per sample."""

    @property
    def lengths(self) -> list[int]:
        """Each sample's number of real tokens (for samplers that batch similar lengths together)."""
        return [entry["states"].shape[1] for entry in self]


def cache_bytes(config, datasets) -> int:
    """
    The bytes [`cache_head_inputs`] will keep for these tokenized datasets (`datasets.Dataset`s or sequences of
    dicts with `input_ids`; None skipped): tokens x (L-1) x hidden size x 2 (float16). Counted before any backbone
    pass, so that data too large to cache costs nothing (padded tokens are counted: an upper bound).
    """
    tokens = 0
    for data in datasets:
        if data is not None:
            ids = data["input_ids"] if hasattr(data, "column_names") else (sample["input_ids"] for sample in data)
            tokens += sum(len(sample) for sample in ids)
    return tokens * (config.num_hidden_layers - 1) * config.hidden_size * 2


def cache_head_inputs(model, batches) -> CachedHeadInputs:
    """
    Run the frozen model once over `batches` (tokenized, padded batches; a `labels` entry is kept) and return one
    entry per sample: `states`, its heads' inputs on its real tokens ((L-1, t, H) float16, [`head_inputs`]),
    `target`, the (D,) final output they learn from (the teacher's logits, or the final embedding), and `labels` when
    the batches have them. [`cache_bytes`] says beforehand how much memory they take.
    """
    entries = CachedHeadInputs()
    model.eval()
    for batch in batches:
        labels = batch.get("labels")
        inputs = {name: value.to(model.device) for name, value in batch.items() if name != "labels"}
        states, final = model.head_inputs(**inputs)
        stacked = torch.stack(states, dim=1).half().cpu()  # (B, L-1, T, H)
        final, mask = final.float().cpu(), batch["attention_mask"].bool().cpu()  # (B, D), (B, T)
        for row in range(stacked.shape[0]):
            keep = mask[row] if mask[row].any() else torch.ones_like(mask[row])  # real tokens, wherever they are
            entry = {"states": stacked[row][:, keep].clone(), "target": final[row]}
            if labels is not None:
                entry["labels"] = labels[row]
            entries.append(entry)
    return entries


def collate_head_inputs(entries: list[dict]) -> dict:
    """Cached entries ([`cache_head_inputs`]) -> a batch padded to its longest sample, with its attention mask."""
    layers, _, size = entries[0]["states"].shape
    length = max(entry["states"].shape[1] for entry in entries)
    states = torch.zeros(len(entries), layers, length, size, dtype=entries[0]["states"].dtype)
    mask = torch.zeros(len(entries), length, dtype=torch.long)
    for row, entry in enumerate(entries):
        states[row, :, : entry["states"].shape[1]] = entry["states"]
        mask[row, : entry["states"].shape[1]] = 1
    batch = {"states": states, "attention_mask": mask, "target": torch.stack([entry["target"] for entry in entries])}
    if "labels" in entries[0]:
        batch["labels"] = torch.stack([torch.as_tensor(entry["labels"]) for entry in entries])
    return batch


__all__ = ["MAX_CACHE_BYTES", "CachedHeadInputs", "cache_bytes", "cache_head_inputs", "collate_head_inputs"]

"""The plots: accuracy against FLOPs speed-up (one curve per exit rule, the oracle bound as a star) and the LUHA view.

Used by the `sweep`/`train` commands, `hf_fastbert.analysis.write_sweep` and the model card. Each function draws on a
`matplotlib.figure.Figure` (no pyplot global state) and saves a PNG to the path it is given; callers that must never
leave a half-written file pass a temporary path and rename it. `save_pretrained` copies this module with the model
card's code, so it imports only the standard library, and matplotlib inside a `try` block.
"""


def _figure(size):
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("The plots need matplotlib: `pip install matplotlib`.") from error
    return Figure(figsize=size, dpi=120)


def plot_sweep(rows, path, title=None, oracle=None):
    """
    Accuracy against FLOPs speed-up, one labelled point per speed, saved as a PNG.

    Args:
        rows (`list[dict]`): `speed`, `accuracy`, `flops_speedup` per speed (a sweep's results); rows with an
            `exit_rule` key are drawn as one curve per rule. Rows without an accuracy are left out.
        path: where the PNG goes.
        title (`str`, *optional*): the plot's title.
        oracle (`dict`, *optional*): `accuracy` and `flops_speedup` of the oracle exits
            (`hf_fastbert.analysis.oracle_metrics`), drawn as a star: the bound no exit rule reaches without a loss.
    """
    figure = _figure((6, 4))
    axes = figure.subplots()
    rows = [row for row in rows if row.get("accuracy") is not None]
    rules = list(dict.fromkeys(row.get("exit_rule") for row in rows))
    for rule in rules:
        curve = [row for row in rows if row.get("exit_rule") == rule]
        speedups = [row["flops_speedup"] for row in curve]
        accuracies = [100 * row["accuracy"] for row in curve]
        label = "FastBERT" if rule is None else rule
        axes.plot(speedups, accuracies, marker="o", label=label)
        for row, x, y in zip(curve, speedups, accuracies, strict=True):
            axes.annotate(f"{row['speed']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if oracle is not None and oracle.get("accuracy") is not None:
        point = [oracle["flops_speedup"]], [100 * oracle["accuracy"]]
        axes.plot(*point, marker="*", markersize=12, linestyle="", label="oracle")
    axes.set_xlabel("FLOPs speed-up over full depth (x)")
    axes.set_ylabel("accuracy (%)")
    axes.set_title(f"{title or 'Accuracy against speed-up'} (point labels: speed)", fontsize=10)
    axes.grid(alpha=0.3)
    if len(rules) > 1 or oracle is not None:
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, format="png", metadata={"Software": None})


def plot_luha(rows, path, min_samples=5, warning=None):
    """Each classifier's accuracy by uncertainty bin (`hf_fastbert.analysis.luha_table` rows), saved as a PNG; bins
    with fewer than `min_samples` samples are left out. A `warning` (a failed distillation) is written across it."""
    figure = _figure((6, 4))
    axes = figure.subplots()
    layers = sorted({row["layer"] for row in rows})
    for layer in layers:
        points = [row for row in rows if row["layer"] == layer and row["samples"] >= min_samples]
        centers = [(row["uncertainty_low"] + row["uncertainty_high"]) / 2 for row in points]
        label = "teacher" if layer == layers[-1] else f"student {layer}"
        axes.plot(centers, [100 * row["accuracy"] for row in points], marker=".", label=label)
    axes.set_xlabel("uncertainty (normalized entropy)")
    axes.set_ylabel("accuracy (%)")
    axes.set_title(f"LUHA: accuracy by uncertainty bin (bins with >= {min_samples} samples)")
    if warning:
        axes.text(0.5, 0.5, warning, transform=axes.transAxes, ha="center", va="center", color="red", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, format="png", metadata={"Software": None})


def plot_model_card(rows, path, title):
    """The model card's plot: accuracy against FLOPs speed-up, one point per speed with an accuracy, as a PNG."""
    figure = _figure((5.5, 4))
    figure.set_dpi(100)
    axes = figure.subplots()
    rows = [row for row in rows if row["accuracy"] is not None]
    speedups = [row["flops_speedup"] for row in rows]
    accuracies = [100 * row["accuracy"] for row in rows]
    axes.plot(speedups, accuracies, marker="o")
    for row, x, y in zip(rows, speedups, accuracies, strict=True):
        axes.annotate(f"speed {row['speed']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xlabel("FLOPs speedup over full depth (x)")
    axes.set_ylabel("accuracy (%)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, format="png", metadata={"Software": None})


__all__ = ["plot_luha", "plot_model_card", "plot_sweep"]

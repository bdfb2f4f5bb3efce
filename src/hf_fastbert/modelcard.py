"""Model cards for FastBERT models: Hub metadata, usage with a chosen speed, and the speed/accuracy trade-off.

`save_pretrained` copies this module next to the modeling code (the model's `push_to_hub` imports it), so it imports
only the standard library, huggingface_hub and its siblings (the plot comes from `plotting.py`).
"""

import json
import math
import os
import re
import tempfile
from numbers import Real
from pathlib import Path

from huggingface_hub import HfApi, ModelCardData

from .configuration_fastbert import is_fastbert_model_type, validate_speed
from .files import atomic_path
from .plotting import plot_model_card


RESULT_KEYS = ("speed", "accuracy", "mean_exit_layer", "flops_speedup")
PLOT_FILENAME = "accuracy_vs_speedup.png"
CARD_TAGS = ("fastbert", "early-exit", "hf-fastbert")
BACKBONE_NAMES = {
    "bert": "BERT",
    "roberta": "RoBERTa",
    "xlm-roberta": "XLM-RoBERTa",
    "electra": "ELECTRA",
    "distilbert": "DistilBERT",
    "albert": "ALBERT",
    "deberta-v2": "DeBERTa-v2",
    "modernbert": "ModernBERT",
}
NOT_DISTILLED_TAG = "fastbert-not-distilled"
PAPER_URL = "https://aclanthology.org/2020.acl-main.537/"
HUB_MODEL_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")

_CITATION = """```bibtex
@inproceedings{liu-etal-2020-fastbert,
    title = "{F}ast{BERT}: a Self-distilling {BERT} with Adaptive Inference Time",
    author = "Liu, Weijie and Zhou, Peng and Wang, Zhiruo and Zhao, Zhe and Deng, Haotang and Ju, Qi",
    booktitle = "Proceedings of the 58th Annual Meeting of the Association for Computational Linguistics",
    year = "2020",
    pages = "6035--6044",
}
```"""


def _as_name_list(value, name: str) -> list[str] | None:
    """None, a string or a sequence of non-empty strings -> None or a list; anything else -> ValueError."""
    if value is None:
        return None
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list | tuple) or not values or not all(isinstance(v, str) and v for v in values):
        raise ValueError(f"`{name}` must be a non-empty string or a list of non-empty strings, got {value!r}.")
    return list(values)


def _check_results(results, num_layers: int) -> list[dict] | None:
    """Validate evaluation results; return them as plain floats sorted by speed."""
    if results is None:
        return None
    if not isinstance(results, list | tuple) or not results:
        raise ValueError(f"`results` must be a non-empty list of dicts with keys {RESULT_KEYS}, got {results!r}.")
    rows = []
    for index, row in enumerate(results):
        if not isinstance(row, dict) or set(RESULT_KEYS) - set(row):
            raise ValueError(f"`results[{index}]` must be a dict with keys {RESULT_KEYS}, got {row!r}.")
        for key in RESULT_KEYS:
            value = row[key]
            if key == "accuracy" and value is None:  # evaluated without labels
                continue
            if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
                raise ValueError(f"`results[{index}]['{key}']` must be a finite number, got {value!r}.")
        validate_speed(row["speed"], name=f"results[{index}]['speed']")
        if row["accuracy"] is not None and not 0.0 <= row["accuracy"] <= 1.0:
            raise ValueError(f"`results[{index}]['accuracy']` must be a fraction in [0, 1], got {row['accuracy']!r}.")
        if not 1.0 <= row["mean_exit_layer"] <= num_layers:
            raise ValueError(
                f"`results[{index}]['mean_exit_layer']` must be in [1, {num_layers}] (the model's layers), "
                f"got {row['mean_exit_layer']!r}."
            )
        if row["flops_speedup"] <= 0:
            raise ValueError(f"`results[{index}]['flops_speedup']` must be positive, got {row['flops_speedup']!r}.")
        rows.append({key: None if row[key] is None else float(row[key]) for key in RESULT_KEYS})
    return sorted(rows, key=lambda row: row["speed"])


def _check_results_source(results, results_data, results_samples) -> str:
    """Validate where the results come from; return the card's words for it ("1,000 samples of ...")."""
    if results is None:
        if results_data is not None or results_samples is not None:
            raise ValueError("`results_data` and `results_samples` describe `results`: give the results too.")
        return ""
    if results_data is not None and (
        not isinstance(results_data, str) or not results_data.strip() or "\n" in results_data
    ):
        raise ValueError(f"`results_data` must be a non-empty one-line string, got {results_data!r}.")
    if results_samples is not None and (
        isinstance(results_samples, bool) or not isinstance(results_samples, int) or results_samples <= 0
    ):
        raise ValueError(f"`results_samples` must be a positive integer, got {results_samples!r}.")
    if results_data is None and results_samples is None:
        return "data that was not recorded (which data, how many samples)"
    samples = "an unrecorded number of samples" if results_samples is None else f"{results_samples:,} samples"
    return f"{samples} of {results_data}" if results_data is not None else f"{samples} (data not recorded)"


def _fastbert_config(model):
    config = getattr(model, "config", None)
    if not is_fastbert_model_type(getattr(config, "model_type", None)):
        raise ValueError(
            "A FastBERT model card needs a FastBERT model (config.model_type 'fastbert' or 'fastbert-<family>'), got "
            f"{type(model).__name__} with model_type={getattr(config, 'model_type', None)!r}."
        )
    return config


def _percent(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.2f}%"


def _results_table(rows: list[dict]) -> str:
    lines = ["| speed | accuracy | mean exit layer | FLOPs speedup |", "|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(
            f"| {row['speed']:g} | {_percent(row['accuracy'])} | {row['mean_exit_layer']:.2f} | "
            f"{row['flops_speedup']:.2f}x |"
        )
    return "\n".join(lines)


def exit_rule_description(config, uncertainty: str = "normalized entropy") -> str:
    """How the model's `config.exit_rule` decides that a sample leaves, and how it reads `speed`, in words."""
    rule = getattr(config, "exit_rule", "entropy")
    return {
        "entropy": f"FastBERT's rule: a sample leaves at the first student whose {uncertainty} is below `speed`",
        "patience": "PABEE's patience: a sample leaves once the last `1 + round((1 - speed) * (layers - 2))` "
        "students agree on its label",
        "thresholds": f"per-layer thresholds on the {uncertainty}, calibrated on validation data so that at least "
        "`1 - speed` of the samples each layer lets out answer as the teacher",
        "learned": "a learned exit (a tiny head per layer, fitted on the frozen model's validation outputs) lets a "
        "sample leave when its probability that the student agrees with the teacher exceeds `1 - speed`",
    }.get(rule, f"`{rule}`")


def _usage(repo_id: str, config) -> str:
    speed = 0.1 if config.speed == 0 else config.speed
    rule = getattr(config, "exit_rule", "entropy")
    return f"""## Usage

`speed` in [0, 1] is the one knob: `0` runs every layer (the stock classifier); higher values are faster and may be
less accurate. This model's exit rule is `{rule}` ({exit_rule_description(config)}).
This model's default is `config.speed = {config.speed:g}`, `config.exit_rule = "{rule}"`.

### With the hf-fastbert plugin (`pip install hf-fastbert`)

```python
import hf_fastbert  # noqa: F401  registers FastBERT with the Auto classes and gives pipelines `speed`
from transformers import pipeline

classifier = pipeline("text-classification", model="{repo_id}", speed={speed:g})
classifier("A gripping, beautifully shot film.", return_exit_layer=True)
classifier(["Too long.", "A gem."], speed=0.5)  # per-call speed
```

### Without the plugin (`trust_remote_code=True`)

The repository ships its modeling code. Without the plugin the pipeline runs at the model's `config.speed`:
choose it when loading, with `model_kwargs`.

```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

classifier = pipeline(
    "text-classification", model="{repo_id}", trust_remote_code=True, model_kwargs={{"speed": {speed:g}}}
)
classifier("A gripping, beautifully shot film.")

# Or call the model, choosing the speed per call:
tokenizer = AutoTokenizer.from_pretrained("{repo_id}", trust_remote_code=True)
model = AutoModelForSequenceClassification.from_pretrained("{repo_id}", trust_remote_code=True).eval()
outputs = model(**tokenizer(["Too long.", "A gem."], padding=True, return_tensors="pt"), speed={speed:g})
outputs.logits, outputs.exit_layers  # exit_layers: the 1-based layer each sample left at
```
"""


def render_model_card(
    model,
    *,
    repo_id: str | None = None,
    base_model=None,
    datasets=None,
    results=None,
    results_data: str | None = None,
    results_samples: int | None = None,
    tags=None,
    plot_filename: str | None = None,
    training: str | None = None,
    onnx: dict | None = None,
) -> str:
    """
    The text of a FastBERT model card (README.md), YAML metadata included. See [`write_model_card`].

    Args:
        plot_filename (`str`, *optional*):
            Relative path of the accuracy/speedup plot to link from the results section.
        training (`str`, *optional*):
            How the model was trained (e.g. how each stage stopped), for a "Training" section.
    """
    config = _fastbert_config(model)
    base_models = _as_name_list(base_model, "base_model")
    for name in base_models or []:
        if not HUB_MODEL_ID.match(name):
            raise ValueError(f"`base_model` must be Hub model ids (`name` or `namespace/name`), not {name!r}.")
    dataset_names = _as_name_list(datasets, "datasets")
    extra_tags = _as_name_list(tags, "tags") or []
    rows = _check_results(results, config.num_hidden_layers)
    source = _check_results_source(results, results_data, results_samples)
    repo_id = repo_id or "your-namespace/fastbert-model"
    distilled = config.branches_distilled is True

    card_tags = list(CARD_TAGS) + ([] if distilled else [NOT_DISTILLED_TAG])
    card_tags += [tag for tag in extra_tags if tag not in card_tags]
    metadata = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-classification",
        tags=card_tags,
        base_model=base_models[0] if base_models and len(base_models) == 1 else base_models,
        datasets=dataset_names,
    )
    labels = [str(config.id2label[index]) for index in sorted(config.id2label)]
    uncertainty = "normalized entropy of the predicted distribution"
    if config.uncertainty_top_k is not None and config.uncertainty_top_k < config.num_labels:
        uncertainty = f"normalized entropy of the top-{config.uncertainty_top_k} probabilities, renormalized"

    parts = [
        f"---\n{metadata.to_yaml()}\n---\n",
        f"# {repo_id.split('/')[-1]}\n",
        f"A [FastBERT]({PAPER_URL}) text classifier made with the `hf-fastbert` plugin for Transformers: a "
        f"{BACKBONE_NAMES.get(config.backbone_model_type, config.backbone_model_type)} encoder with a small student "
        "classifier after each layer but the last, self-distilled from the final (teacher) "
        "classifier, so that at inference each input leaves at the first layer that is confident enough.\n",
    ]
    if not distilled:
        parts.append(
            "> **Not distilled.** The student classifiers of this model were never self-distilled from the teacher "
            "(`config.branches_distilled` is false): early exits (`speed > 0`) use untrained students and their "
            "predictions are meaningless. Use `speed=0` (the stock classifier), or distill the students first with "
            "`hf_fastbert.FastBertDistillationTrainer`.\n"
        )
    details = [
        f"- Backbone: {BACKBONE_NAMES.get(config.backbone_model_type, config.backbone_model_type)} "
        f"(`{config.backbone_model_type}`)",
        f"- Layers: {config.num_hidden_layers} (students after layers 1-{config.num_hidden_layers - 1})",
        f"- Labels ({config.num_labels}): {', '.join(f'`{label}`' for label in labels)}",
        f"- Default speed: `{config.speed:g}`",
        f"- Exit rule: `{getattr(config, 'exit_rule', 'entropy')}`: {exit_rule_description(config, uncertainty)}",
        f"- Teacher head: `{config.teacher_head}`; student width {config.branch_hidden_size}, "
        f"{config.branch_num_attention_heads} attention heads",
        f"- Students self-distilled: {'yes' if distilled else '**no**'}",
    ]
    if base_models:
        details.append(f"- Base model: {', '.join(f'[{m}](https://huggingface.co/{m})' for m in base_models)}")
    if dataset_names:
        details.append(f"- Data: {', '.join(dataset_names)}")
    parts.append("\n".join(details) + "\n")
    parts.append(_usage(repo_id, config))
    if onnx is not None:
        parts.append(_onnx_usage(repo_id, config, onnx))
    if training is not None:
        if not isinstance(training, str) or not training.strip():
            raise ValueError(f"`training` must be a non-empty string, got {training!r}.")
        parts.append(f"## Training\n\n{training.strip()}\n")
    if rows:
        section = [
            "## Speed and accuracy\n",
            f"Measured on {source}: accuracy, mean exit layer and FLOPs speedup over running every layer, at each "
            "speed.\n",
            _results_table(rows) + "\n",
        ]
        if plot_filename:
            section.append(f"![Accuracy against FLOPs speedup]({plot_filename})\n")
        parts.append("\n".join(section))
    parts.append(f"## Citation\n\n{_CITATION}\n")
    return "\n".join(parts)


def _onnx_usage(repo_id: str, config, manifest: dict) -> str:
    """The card's section on the `onnx/` stages `hf-fastbert export` wrote (`manifest`: their fastbert_onnx.json)."""
    precision = "int8 (dynamic quantization)" if manifest.get("int8") else "float32"
    calibration = manifest.get("calibration") or {}
    speed = calibration.get("speed", config.speed)
    rule = calibration.get("exit_rule", getattr(config, "exit_rule", "entropy"))
    chosen = "calibrated on the runtime's own outputs" if calibration else "the model's"
    return f"""## ONNX Runtime

`onnx/` holds this model as ONNX Runtime stages ({precision}): one graph per layer with its student (the first also
computes the embeddings), so that each input still leaves at the first confident layer, and `model.onnx`, the whole
model, for speed 0. Default on the runtime: speed {speed:g}, exit rule `{rule}` ({chosen}).

```python
import hf_fastbert  # noqa: F401  (pip install 'hf-fastbert[onnx]')
from hf_fastbert.modeling_ort import ORTFastBertForSequenceClassification
from transformers import AutoTokenizer, pipeline

model = ORTFastBertForSequenceClassification.from_pretrained("{repo_id}", threads=1)
classifier = pipeline("text-classification", model=model, tokenizer=AutoTokenizer.from_pretrained("{repo_id}"))
classifier("A gem.", return_exit_layer=True)
```

or `hf-fastbert predict {repo_id} "A gem." --backend onnx`.
"""


def write_model_card(
    save_directory,
    model,
    *,
    base_model=None,
    datasets=None,
    results=None,
    results_data: str | None = None,
    results_samples: int | None = None,
    repo_id: str | None = None,
    tags=None,
    training: str | None = None,
) -> Path:
    """
    Write the model card (README.md) of a FastBERT model into `save_directory`, and with `results` the plot
    `accuracy_vs_speedup.png` next to it.

    The card holds Hub metadata (library_name, tags `fastbert` and `early-exit`, pipeline_tag, base_model and
    datasets when known), the model's settings, usage snippets with a chosen speed (with the plugin, and without it
    through `trust_remote_code=True`) and, when `results` is given, a table of speed / accuracy / mean exit layer /
    FLOPs speedup and the plot. A model whose `config.branches_distilled` is false is labelled as not distilled.
    Everything is validated before anything is written.

    Args:
        save_directory (`str` or `os.PathLike`):
            Folder to write into (created if missing), usually the one `save_pretrained` wrote.
        model ([`FastBertForSequenceClassification`]):
            The model (or anything with a FastBERT `config`).
        base_model (`str` or `list[str]`, *optional*):
            Hub id(s) of the checkpoint(s) the model was fine-tuned from.
        datasets (`str` or `list[str]`, *optional*):
            Hub id(s) or names of the training data.
        results (`list[dict]`, *optional*):
            Evaluation results, one dict per speed with keys `speed`, `accuracy` (a fraction in [0, 1], or `None`
            when evaluated without labels), `mean_exit_layer` and `flops_speedup`.
        results_data (`str`, *optional*):
            Which data the results were measured on, e.g. `"rotten_tomatoes (validation split)"`; the card says so.
        results_samples (`int`, *optional*):
            How many samples the results were measured on; the card says so. Without these two the card says that
            the results' data was not recorded.
        training (`str`, *optional*):
            How the model was trained, e.g. how each stage stopped (a "Training" section).
        repo_id (`str`, *optional*):
            The Hub repository the card is for, used in the title and the usage snippets; defaults to the name of
            `save_directory`.
        tags (`str` or `list[str]`, *optional*):
            Extra Hub tags.

    Returns:
        `pathlib.Path`: the path of the README.md written.

    Example:

    ```python
    >>> from hf_fastbert.modelcard import write_model_card

    >>> results = [{"speed": 0.0, "accuracy": 0.81, "mean_exit_layer": 6.0, "flops_speedup": 1.0}]
    >>> write_model_card(
    ...     "out/fastbert-rt", model, base_model="bert-base-uncased", results=results, results_samples=1000,
    ...     results_data="rotten_tomatoes (validation split)",
    ... )
    ```"""
    directory = Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"`save_directory` must be a folder, got the file {str(directory)!r}.")
    rows = _check_results(results, _fastbert_config(model).num_hidden_layers)
    plot = rows is not None and any(row["accuracy"] is not None for row in rows)
    manifest_path = directory / "onnx" / "fastbert_onnx.json"  # ONNX Runtime stages (`hf-fastbert export`)
    onnx = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    text = render_model_card(
        model,
        repo_id=repo_id or directory.resolve().name,
        base_model=base_model,
        datasets=datasets,
        results=results,
        results_data=results_data,
        results_samples=results_samples,
        tags=tags,
        plot_filename=PLOT_FILENAME if plot else None,
        training=training,
        onnx=onnx,
    )
    directory.mkdir(parents=True, exist_ok=True)
    if plot:
        title = f"{(repo_id or directory.resolve().name).split('/')[-1]}: accuracy vs FLOPs speedup"
        with atomic_path(directory / PLOT_FILENAME) as path:
            plot_model_card(rows, path, title)
    readme = directory / "README.md"
    with atomic_path(readme) as path:
        path.write_text(text, encoding="utf-8")
    return readme


def push_model_to_hub(
    model,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | None = None,
    tokenizer=None,
    base_model=None,
    datasets=None,
    results=None,
    results_data: str | None = None,
    results_samples: int | None = None,
    training: str | None = None,
    add_files=None,
):
    """
    Every push of a FastBERT model (`FastBertForSequenceClassification.push_to_hub`, the distillation trainer's
    `push_to_hub`, `train_fastbert(push_to_hub=True)`, `hf-fastbert push`): [`~PreTrainedModel.push_to_hub`] (same
    arguments, same result: a `CommitInfo`) with the FastBERT model card of [`write_model_card`].

    Uploads exactly the model's files, written afresh into an empty folder: weights (safetensors), config, modeling
    code, the tokenizer's files with `tokenizer`, the card (README.md) and, with `results`, its plot. Never a pickle
    (`training_args.bin`), a checkpoint or any other file of a training folder. Everything is written and validated
    before the repository is created (an existing one is reused), and the files go up in one commit.

    Args:
        tokenizer (*optional*): uploaded with the model (its `save_pretrained` files).
        add_files (`Callable[[Path], None]`, *optional*): called with the folder to upload once the model and
            tokenizer are saved in it, before the card is written: `hf-fastbert push` adds the model's `onnx/` stages
            ([`hf_fastbert.onnx_export.copy_onnx_stages`]), which the card then describes.
        base_model, datasets, results, results_data, results_samples, training: the card's, see
            [`write_model_card`].
    """
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo_id)
    card = dict(
        base_model=base_model,
        datasets=datasets,
        results=results,
        results_data=results_data,
        results_samples=results_samples,
        training=training,
    )
    model_tags = list(getattr(model, "model_tags", None) or [])
    tags = [tags] if isinstance(tags, str) else list(tags or [])
    card["tags"] = (model_tags + tags) or None
    # HF_ENDPOINT read now rather than when huggingface_hub was imported: same result, and a test Hub can be used.
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    with tempfile.TemporaryDirectory() as work_dir:
        model.save_pretrained(work_dir, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(work_dir)
        if add_files is not None:
            add_files(Path(work_dir))
        write_model_card(work_dir, model, repo_id=repo_id, **card)  # validates the card's inputs
        created = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if created != repo_id:  # a name without namespace: the card's snippets need the full id
            write_model_card(work_dir, model, repo_id=created, **card)
        if revision is not None and not revision.startswith("refs/pr"):
            api.create_branch(repo_id=created, branch=revision, exist_ok=True)
        # Pushed ONNX stages replace the repo's `onnx/`: files of an older export would be downloaded with them.
        stale = ["onnx/*"] if (Path(work_dir) / "onnx").is_dir() else None
        return api.upload_folder(
            repo_id=created,
            folder_path=work_dir,
            commit_message=commit_message or "Upload model",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
            delete_patterns=stale,
        )


def render_embedding_model_card(
    model, *, repo_id: str, results=None, results_data: str | None = None, training: str | None = None, base_model=None
) -> str:
    """
    The text of a FastBERT sentence embedding model card (README.md): Hub metadata, settings, usage with
    sentence-transformers and with Transformers at a chosen speed, and the quality table (rows of
    [`embedding_metrics_at_speeds`]: speed, cosine to full depth, overlap@10, mean exit layer, FLOPs speed-up).
    """
    config = model.config
    base_models = _as_name_list(base_model, "base_model")
    distilled = config.embedding_heads_distilled is True
    tags = ["fastbert", "early-exit", "hf-fastbert", "sentence-transformers", "sentence-similarity"]
    metadata = ModelCardData(
        library_name="sentence-transformers",
        pipeline_tag="sentence-similarity",
        tags=tags + ([] if distilled else [NOT_DISTILLED_TAG]),
        base_model=base_models[0] if base_models and len(base_models) == 1 else base_models,
    )
    family = BACKBONE_NAMES.get(config.backbone_model_type, config.backbone_model_type)
    parts = [
        f"---\n{metadata.to_yaml()}\n---\n",
        f"# {repo_id.split('/')[-1]}\n",
        f"A sentence embedding model with [FastBERT]({PAPER_URL})'s early exit, made with the `hf-fastbert` plugin: a "
        f"frozen {family} encoder with a small embedding head after each layer but the last, self-distilled to the "
        "model's own final embedding. Each text leaves at the first layer whose embedding has stopped moving "
        "(cosine to the previous layer's above `1 - speed`). At `speed=0` the output is exactly the stock embedding, "
        "so vectors already indexed stay valid.\n",
    ]
    if not distilled:
        parts.append(
            "> **Not distilled.** The embedding heads were never distilled (`embedding_heads_distilled` is false): "
            "only `speed=0` (the stock embedding) is available.\n"
        )
    parts.append(
        "\n".join(
            [
                f"- Backbone: {family} (`{config.backbone_model_type}`), {config.num_hidden_layers} layers",
                f"- Embedding: {config.hidden_size} dimensions, `{config.embedding_pooling}` pooling"
                + (", normalized" if config.normalize_embeddings else ""),
                f"- Default speed: `{config.speed:g}`",
                f"- Heads distilled: {'yes' if distilled else '**no**'}",
            ]
        )
        + "\n"
    )
    parts.append(
        f"""## Usage

```bash
pip install "hf-fastbert[embeddings]"
```

```python
from sentence_transformers import SentenceTransformer

# trust_remote_code=True lets sentence-transformers import the installed hf_fastbert module (the folder holds no code)
model = SentenceTransformer("{repo_id}", trust_remote_code=True)
embeddings = model.encode(["A query", "A document"], speed=0.05)  # speed=0: the stock embedding
```

With Transformers:

```python
from transformers import AutoTokenizer
from hf_fastbert import FastBertForSentenceEmbedding

tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
model = FastBertForSentenceEmbedding.from_pretrained("{repo_id}").eval()
output = model(**tokenizer(["A query"], return_tensors="pt"), speed=0.05)
output.embeddings, output.exit_layers, output.flops
```
"""
    )
    if training:
        parts.append(f"## Training\n\n{training.strip()}\n")
    if results:
        lines = [
            "## Quality and speed\n",
            f"Measured on {results_data or 'data that was not recorded'}, each text a query against all of them "
            "indexed at full depth: mean cosine to the full-depth embedding, share of the 10 nearest neighbours that "
            "full depth also finds, mean exit layer and FLOPs speed-up over the stock model.\n",
            "| speed | cosine to full depth | overlap@10 | mean exit layer | FLOPs speed-up |",
            "|---:|---:|---:|---:|---:|",
        ]
        for row in results:
            lines.append(
                f"| {row['speed']:g} | {row['cosine']:.4f} | {row['overlap']:.3f} | {row['mean_exit_layer']:.2f} | "
                f"{row['flops_speedup']:.2f}x |"
            )
        parts.append("\n".join(lines) + "\n")
    parts.append(f"## Citation\n\n{_CITATION}\n")
    return "\n".join(parts)


def write_embedding_model_card(save_directory, model, *, repo_id: str | None = None, **card) -> Path:
    """Write the card of [`render_embedding_model_card`] as README.md into `save_directory`; returns its path."""
    directory = Path(save_directory)
    text = render_embedding_model_card(model, repo_id=repo_id or directory.resolve().name, **card)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / "README.md") as path:
        path.write_text(text, encoding="utf-8")
    return directory / "README.md"


def push_embedding_model_to_hub(
    model,
    repo_id: str,
    *,
    tokenizer,
    commit_message: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    **card,
):
    """
    Push a FastBERT sentence embedding model as a sentence-transformers repository: the model, its tokenizer,
    `modules.json` and the card of [`render_embedding_model_card`] (`card`: its `results`, `results_data`,
    `training`, `base_model`), written afresh into an empty folder and uploaded in one commit. Returns the
    `CommitInfo`.
    """
    from huggingface_hub.utils import validate_repo_id

    from .sentence_transformers_module import save_sentence_transformer

    validate_repo_id(repo_id)
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    with tempfile.TemporaryDirectory() as work_dir:
        save_sentence_transformer(model, tokenizer, work_dir, repo_id=repo_id, **card)
        created = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if created != repo_id:  # a name without namespace: the card's snippets need the full id
            write_embedding_model_card(work_dir, model, repo_id=created, **card)
        return api.upload_folder(
            repo_id=created, folder_path=work_dir, commit_message=commit_message or "Upload sentence embedding model"
        )


__all__ = [
    "push_embedding_model_to_hub",
    "push_model_to_hub",
    "render_embedding_model_card",
    "render_model_card",
    "write_embedding_model_card",
    "write_model_card",
]

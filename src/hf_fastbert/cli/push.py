"""`hf-fastbert push`: a FastBERT model, its tokenizer and its model card to the Hub."""

import argparse
import json
import logging
from pathlib import Path

from ..analysis import (
    describe_source,
    read_results_file,
    rows_of_rule,
)
from ..constants import (
    RESULT_COLUMNS,
    RESULTS_FILENAME,
    SWEEP_FILENAME,
)
from ..loading import is_embedding_config, load_fastbert, load_model_config
from .common import (
    _HelpFormatter,
    _RefuseTokenArgument,
    input_file,
)


logger = logging.getLogger(__name__)


def register(commands):
    """Add the `push` command to `commands` (the subcommands of `hf-fastbert`)."""
    push = commands.add_parser(
        "push",
        help="Upload a FastBERT model, its tokenizer and its model card to the Hub.",
        description="Pushes a local FastBERT model folder in one commit: weights (safetensors), config with its "
        "default speed and labels, the modeling code for users without the plugin (trust_remote_code), the "
        "tokenizer, and a generated model card with the speed/accuracy table and plot when results exist, saying "
        "which data and how many samples they come from. Nothing else: no training_args.bin, checkpoints or other "
        "files. Everything is checked before the repository is created. Authenticate with `hf auth login` or "
        "HF_TOKEN.",
        formatter_class=_HelpFormatter,
    )
    push.add_argument("model", help="Local FastBERT model folder.")
    push.add_argument("repo_id", help="Target Hub repository, e.g. your-name/fastbert-rotten-tomatoes.")
    push.add_argument(
        "--results",
        help="Results .json for the card: sweep.json, speed_results.json or `evaluate --output x.json` (default: "
        "<model>/sweep/sweep.json, else <model>/speed_results.json).",
    )
    push.add_argument(
        "--allow-undistilled", action="store_true", help="Push even if the students were never self-distilled."
    )
    push.add_argument("--base-model", help="The checkpoint it was fine-tuned from, for the card's metadata.")
    push.add_argument("--dataset-name", nargs="+", help="Dataset name(s) for the card's metadata.")
    push.add_argument("--private", action="store_true", help="Create the repository as private.")
    push.add_argument("--token", nargs="?", action=_RefuseTokenArgument, help=argparse.SUPPRESS)
    push.add_argument("--commit-message", default="Upload FastBERT model", help="Commit message.")
    push.set_defaults(run=run_push)


def card_results(model_dir, results_path=None, exit_rule=None):
    """
    The card's results: `results_path`, else the train command's sweep, else `speed_results.json`, else None. With
    `exit_rule` (the model's), a sweep of several rules gives that rule's rows, and a sweep of another rule is refused:
    the card would show one rule's curve under another's name.

    Returns:
        `None` or a dict with `results` (rows with the card's columns), `data` and `samples` (None when the file does
        not say) and `path`.
    """

    model_dir = Path(model_dir)
    if results_path is not None:
        candidates = [input_file(results_path, "results file")]
        if Path(results_path).suffix != ".json":
            raise ValueError(
                "--results takes a .json results file (sweep.json, speed_results.json or `evaluate --output "
                f"x.json`), got {results_path}"
            )
    else:
        candidates = [model_dir / SWEEP_FILENAME, model_dir / RESULTS_FILENAME]
    for path in candidates:
        if path.is_file():
            rows, source = read_results_file(path)
            rows = rows_of_rule(json.loads(path.read_text(encoding="utf-8")), exit_rule, path)
            if rows:
                if not all(isinstance(row, dict) for row in rows):
                    raise ValueError(f"the results in {path} are not rows of named columns")
                missing = sorted({key for row in rows for key in RESULT_COLUMNS if key not in row})
                if missing:
                    raise ValueError(f"the results in {path} lack the columns {missing}")
                rows = [{key: row[key] for key in RESULT_COLUMNS} for row in rows]
                source = source or {}
                return {"results": rows, "data": source.get("data"), "samples": source.get("samples"), "path": path}
    return None


def training_notes_of(model_dir):
    """The card's "Training" section that `train` recorded in `speed_results.json`, or None."""

    try:
        notes = json.loads((Path(model_dir) / RESULTS_FILENAME).read_text(encoding="utf-8")).get("training_notes")
    except (OSError, ValueError, AttributeError):
        return None
    return notes if isinstance(notes, str) and notes.strip() else None


def push_embedding_folder(path: Path, args):
    """`push` of a sentence embedding model (`hf-fastbert train-embedding`'s folder): a sentence-transformers
    repository whose card reports the quality per speed of its `embedding_results.json`."""
    from huggingface_hub import get_token

    from ..constants import EMBEDDING_RESULTS_FILENAME
    from ..convergence import describe_convergence
    from ..modelcard import push_embedding_model_to_hub

    if args.results is not None:
        raise ValueError("--results is for classifiers: an embedding model's card reads its embedding_results.json")
    model, tokenizer = load_fastbert(str(path), embeddings=True)
    if not model.config.embedding_heads_distilled and not args.allow_undistilled:
        raise ValueError(
            f"the embedding heads of {args.model} were never distilled, so early exits are meaningless: distill them "
            "with `hf-fastbert train-embedding` or pass --allow-undistilled (the card will say so)"
        )
    if get_token() is None:
        raise ValueError("not logged in to the Hub: run `hf auth login` or set HF_TOKEN")
    card = {}
    try:
        saved = json.loads((path / EMBEDDING_RESULTS_FILENAME).read_text(encoding="utf-8"))
        card = {"results": saved["results"], "results_data": f"{saved['texts']} held-out texts"}
        if saved.get("convergence"):
            card["training"] = describe_convergence(saved["convergence"], "embedding self-distillation")
    except (OSError, ValueError, KeyError, TypeError):
        logger.warning("%s has no readable %s: the card has no quality table.", path, EMBEDDING_RESULTS_FILENAME)
    commit = push_embedding_model_to_hub(
        model,
        args.repo_id,
        tokenizer=tokenizer,
        commit_message=args.commit_message,
        private=args.private or None,
        base_model=args.base_model,
        **card,
    )
    print(f"pushed the sentence embedding model, its tokenizer and its card to {args.repo_id}: {commit.commit_url}")


def run_push(args):
    from huggingface_hub import get_token
    from huggingface_hub.utils import validate_repo_id

    from ..modelcard import PLOT_FILENAME, push_model_to_hub

    path = Path(args.model).expanduser()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{args.model} is a file: push takes a local model folder")
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {args.model} does not exist (push takes a local folder)")
    try:
        validate_repo_id(args.repo_id)
    except ValueError as error:
        raise ValueError(f"invalid repo id {args.repo_id!r}: {error}") from None
    config = load_model_config(str(path))[1]
    if is_embedding_config(config):
        return push_embedding_folder(path, args)
    card = card_results(path, args.results, getattr(config, "exit_rule", None))
    model, tokenizer = load_fastbert(str(path))
    add_onnx = None
    if (path / "onnx").is_dir():  # `hf-fastbert export` stages go up with the weights they belong to
        from ..onnx_export import copy_onnx_stages

        def add_onnx(folder):  # checks the stages first; push_model_to_hub calls it before creating the repository
            copy_onnx_stages(path, folder, model.config)

    if not model.config.branches_distilled:
        if not args.allow_undistilled:
            raise ValueError(
                f"the students of {args.model} were never self-distilled, so early exits are meaningless: distill "
                "them with `hf-fastbert train` or pass --allow-undistilled (the card will say so)"
            )
        logger.warning("Pushing a model whose students were never distilled; its card says so.")
    if get_token() is None:
        raise ValueError("not logged in to the Hub: run `hf auth login` or set HF_TOKEN")
    if card is not None:
        if card["data"] is None or card["samples"] is None:
            logger.warning("%s does not say which data its results come from; the card says so.", card["path"])
        print(f"card results: {describe_source(card)}, from {card['path']}")
    commit = push_model_to_hub(
        model,
        args.repo_id,
        commit_message=args.commit_message,
        private=args.private or None,
        tokenizer=tokenizer,
        base_model=args.base_model,
        datasets=args.dataset_name,
        results=card and card["results"],
        results_data=card and card["data"],
        results_samples=card and card["samples"],
        training=training_notes_of(path),
        add_files=add_onnx,
    )
    extra = f" and the plot {PLOT_FILENAME}" if card else ""
    extra += ", its ONNX Runtime stages (onnx/)" if add_onnx else ""
    print(f"pushed the model, its tokenizer{extra}, the model card to {args.repo_id}: {commit.commit_url}")

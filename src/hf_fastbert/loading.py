"""
Loading a FastBERT model for inference, the one loader of the command line and the server: a local folder or a Hub
id, float32, int8 or ONNX Runtime stages, with a one-line error naming what is wrong before anything long starts.
"""

import logging
from pathlib import Path

from .configuration_fastbert import is_fastbert_model_type
from .constants import PROG


def model_source(name_or_path):
    """
    A local model folder (its path) or a Hub repo id, told apart without the network: a name that cannot be a repo id,
    or whose first part is a local folder (`outputs/fastbrt`), is a mistyped folder.
    """
    from huggingface_hub.utils import validate_repo_id

    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{name_or_path} is a file, not a model folder")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{name_or_path} holds no config.json: it is not a saved model folder")
        return str(path)
    first_part = Path(name_or_path.split("/")[0]).expanduser()
    local = path.is_absolute() or name_or_path.startswith((".", "~")) or ("/" in name_or_path and first_part.is_dir())
    try:
        validate_repo_id(name_or_path)
    except ValueError:
        local = True
    if local:
        raise FileNotFoundError(f"no such model folder: {name_or_path}")
    return name_or_path


def load_model_config(name_or_path):
    """`(source, config)` of a model folder or Hub id, with a one-line error naming what is wrong."""
    from transformers import AutoConfig

    source = model_source(name_or_path)
    try:
        return source, AutoConfig.from_pretrained(source)
    except OSError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if Path(source).is_dir():
            raise OSError(f"cannot load the model in {name_or_path}: {reason}") from error
        raise OSError(
            f"no folder {name_or_path} here, and no Hub model of that name could be loaded: {reason}"
        ) from error


class _HeldRecords(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def load_fastbert_weights(source, name_or_path, config):
    """The model, or a one-line error when its weights do not fit its config.json (e.g. an edited id2label)."""
    from .modeling_fastbert import FastBertForSequenceClassification

    # The loading report is held back: on a size mismatch the error below says it in one line.
    load_logger = logging.getLogger("transformers.modeling_utils")
    held, propagate = _HeldRecords(), load_logger.propagate
    load_logger.addHandler(held)
    load_logger.propagate = False
    try:
        model, info = FastBertForSequenceClassification.from_pretrained(
            source, ignore_mismatched_sizes=True, output_loading_info=True
        )
    finally:
        load_logger.removeHandler(held)
        load_logger.propagate = propagate
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        key, saved, expected = min(mismatched, key=lambda item: item[0])
        raise ValueError(
            f"the weights in {name_or_path} do not fit its config.json: {key} is {list(saved)} in the weights but "
            f"{list(expected)} for the config ({config.num_labels} labels in id2label) - was config.json edited?"
        )
    # A FastBERT checkpoint's weights are all the model's: left-over ones mean config.json lost layers or students.
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        raise ValueError(
            f"the weights in {name_or_path} hold {len(unexpected)} tensors its config.json has no place for (e.g. "
            f"{unexpected[0]}; the config says {config.num_hidden_layers} layers) - was config.json edited?"
        )
    for record in held.records:
        load_logger.handle(record)
    return model


def is_embedding_config(config) -> bool:
    """Whether a FastBERT config is a sentence embedding model's ([`FastBertForSentenceEmbedding`])."""
    return any(name.endswith("ForSentenceEmbedding") for name in getattr(config, "architectures", None) or [])


def load_fastbert(name_or_path, int8=False, backend="torch", embeddings=False):
    """
    Load a FastBERT model (eval mode, int8 linear layers with `int8`) and its tokenizer; a clear error otherwise. With
    `backend="onnx"`, its ONNX Runtime stages ([`ORTFastBertForSequenceClassification`]); `int8` then requires an int8
    export. With `embeddings`, a sentence embedding model ([`FastBertForSentenceEmbedding`], float32 PyTorch) is
    loaded too; otherwise it is refused with a line saying what takes it.
    """
    from transformers import AutoTokenizer

    if backend == "onnx":
        from .modeling_ort import ORTFastBertForSequenceClassification

        model = ORTFastBertForSequenceClassification.from_pretrained(name_or_path)
        if int8 and not model.manifest["int8"]:
            raise ValueError(
                f"--int8 with --backend onnx needs an int8 export, and {name_or_path}/onnx is float32: run "
                f"`{PROG} export {name_or_path} --int8`"
            )
        return model, AutoTokenizer.from_pretrained(model.name_or_path)
    if int8:  # before anything loads
        from .quantization import check_int8_supported

        check_int8_supported()
    source, config = load_model_config(name_or_path)
    if not is_fastbert_model_type(config.model_type):
        raise ValueError(
            f"{name_or_path} is a {config.model_type!r} model, not FastBERT: make one with "
            f"`{PROG} train --model {name_or_path}`"
        )
    if is_embedding_config(config):
        if not embeddings:
            raise ValueError(
                f"{name_or_path} is a FastBERT sentence embedding model, not a classifier: `{PROG} serve` answers "
                "/embed with it, and SentenceTransformer(folder, trust_remote_code=True) encodes with it"
            )
        if int8:
            raise ValueError("--int8 is for FastBERT classifiers; sentence embedding models run in float32 for now")
        from .modeling_fastbert_embedding import FastBertForSentenceEmbedding

        return FastBertForSentenceEmbedding.from_pretrained(source).eval(), AutoTokenizer.from_pretrained(source)
    model = load_fastbert_weights(source, name_or_path, config).eval()
    if int8:
        from .quantization import quantize_int8

        model = quantize_int8(model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    return model, tokenizer


__all__ = ["is_embedding_config", "load_fastbert", "load_model_config", "model_source"]

"""
FastBERT's training, end to end: [`train_fastbert`] fine-tunes backbone + teacher, self-distills the students,
sweeps the speeds and saves the model, with every option declared once in [`FastBertTrainingConfig`].

- `config`: the options (torch-free; `hf-fastbert train` and the example script parse them with `HfArgumentParser`);
- `output_dir`: the output folder, checked before any work and written all at once;
- `train`: the two stages and the final sweep;
- `embedding_config`, `embedding`: the same for sentence embedding models ([`train_embedding_heads`]).
"""

import importlib

from ..constants import MAX_ACCURACY_DROP, RESULTS_FILENAME, RUN_MANIFEST
from .config import FastBertTrainingConfig
from .embedding_config import EmbeddingTrainingConfig
from .output_dir import PARTIAL_SUFFIX, check_output_dir, staged_output_dir


# The training stack (torch, datasets, Trainer) loads on first use: the command line reads the options without it.
_TRAIN_NAMES = {
    "FastBertTrainingOutput": "train",
    "calibrate_default_speed": "train",
    "default_finetune_learning_rate": "train",
    "describe_default_speed": "train",
    "train_fastbert": "train",
    "EmbeddingTrainingOutput": "embedding",
    "train_embedding_heads": "embedding",
}


def __getattr__(name):
    if name not in _TRAIN_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_TRAIN_NAMES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_TRAIN_NAMES))


__all__ = [
    "MAX_ACCURACY_DROP",
    "PARTIAL_SUFFIX",
    "RESULTS_FILENAME",
    "RUN_MANIFEST",
    "EmbeddingTrainingConfig",
    "EmbeddingTrainingOutput",
    "FastBertTrainingConfig",
    "FastBertTrainingOutput",
    "calibrate_default_speed",
    "check_output_dir",
    "default_finetune_learning_rate",
    "describe_default_speed",
    "staged_output_dir",
    "train_embedding_heads",
    "train_fastbert",
]

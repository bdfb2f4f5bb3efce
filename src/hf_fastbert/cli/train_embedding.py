"""`hf-fastbert train-embedding`: self-distill the embedding heads of a sentence embedding model on unlabeled text."""

import time
from dataclasses import dataclass, field

from ..constants import EMBEDDING_COLUMNS, PROG
from ..training.embedding_config import EmbeddingTrainingConfig
from .common import _HelpFormatter, dataclass_from_namespace, input_file


@dataclass
class TrainEmbeddingArguments:
    """What `hf-fastbert train-embedding` takes besides MODEL, TRAIN_FILE and the run's options
    ([`EmbeddingTrainingConfig`])."""

    eval_file: str | None = field(
        default=None, metadata={"help": "Held-out texts (same formats); default: a slice of --train-file."}
    )
    text_column: str = field(default="text", metadata={"help": "The text column of .csv/.json/.parquet files."})
    output_dir: str = field(
        default="outputs/fastbert-embedding",
        metadata={"help": "Where the sentence-transformers folder goes; replaced only once the new one is complete."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training texts."})

    def __post_init__(self):
        if self.max_train_samples is not None and self.max_train_samples < 2:
            raise ValueError(f"`max_train_samples` must be at least 2, got {self.max_train_samples!r}.")


TRAIN_EMBEDDING_ARGUMENTS = (TrainEmbeddingArguments, EmbeddingTrainingConfig)


def register(commands):
    """Add the `train-embedding` command to `commands`."""
    command = commands.add_parser(
        "train-embedding",
        dataclass_types=TRAIN_EMBEDDING_ARGUMENTS,
        help="Self-distill per-layer embedding heads of a sentence embedding model, for per-sample early exit.",
        description="FastBERT for sentence embeddings: the encoder stays frozen (speed 0 is exactly its embedding), "
        "a small head after every layer learns the final embedding from unlabeled texts until the held-out loss "
        "stops improving, and each text then leaves at the first layer whose embedding stops moving. Writes a "
        "sentence-transformers folder (SentenceTransformer(folder, trust_remote_code=True).encode(texts, "
        "speed=0.05)) and prints the quality at each speed on held-out texts.",
        formatter_class=_HelpFormatter,
    )
    command.add_argument(
        "model",
        help="A sentence embedding checkpoint (a sentence-transformers folder or Hub id, e.g. "
        "sentence-transformers/all-MiniLM-L6-v2, or a base encoder); its pooling and normalization are read from its "
        "sentence-transformers files.",
    )
    command.add_argument(
        "train_file", help="Unlabeled in-domain texts: a .txt file (one per line) or .csv/.json/.jsonl/.parquet."
    )
    command.set_defaults(run=run_train_embedding, parse=parse_train_embedding_arguments)


def parse_train_embedding_arguments(args) -> EmbeddingTrainingConfig:
    dataclass_from_namespace(TrainEmbeddingArguments, args)
    return dataclass_from_namespace(EmbeddingTrainingConfig, args)


def run_train_embedding(args):
    from transformers import AutoTokenizer

    from ..analysis import format_table
    from ..data import read_texts_file
    from ..modeling_fastbert_embedding import FastBertForSentenceEmbedding
    from ..training import check_output_dir
    from ..training.embedding import train_embedding_heads

    config = args.config
    check_output_dir(args.output_dir, config.overwrite_output_dir, flag="--overwrite-output-dir")
    for path in filter(None, (args.train_file, args.eval_file)):
        input_file(path, "data file")
    texts = read_texts_file(args.train_file, args.text_column)[: args.max_train_samples]
    eval_texts = read_texts_file(args.eval_file, args.text_column) if args.eval_file else None
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = FastBertForSentenceEmbedding.from_pretrained(args.model)
    started = time.perf_counter()
    output = train_embedding_heads(model, tokenizer, texts, args.output_dir, config, eval_texts=eval_texts)
    minutes = (time.perf_counter() - started) / 60
    print(f"Distilled the embedding heads in {minutes:.1f} min; saved to {args.output_dir}")
    print("\nQuality on held-out texts (cosine and top-10 overlap with the full-depth embedding):")
    print(format_table(output.results, [column for column in EMBEDDING_COLUMNS if column != "precision"]))
    print(
        f"\nNext: SentenceTransformer({args.output_dir!r}, trust_remote_code=True).encode(texts, speed=...)  "
        f"# {PROG}: speed 0 is the stock embedding"
    )

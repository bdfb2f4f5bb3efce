"""Self-distillation of a sentence embedding model's heads, end to end: [`train_embedding_heads`] trains the heads on
unlabeled texts until the held-out loss converges, measures the quality at each speed on the held-out texts, and
writes a sentence-transformers folder with a model card, all at once."""

import json
import logging
import shutil
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from datasets import Dataset
from transformers import DataCollatorWithPadding

from ..backbones import max_input_length
from ..cached_states import MAX_CACHE_BYTES, cache_bytes, cache_head_inputs, collate_head_inputs
from ..constants import EMBEDDING_RESULTS_FILENAME
from ..convergence import describe_convergence
from ..data import check_max_length
from ..evaluation import embedding_metrics_at_speeds
from ..modeling_fastbert_embedding import FastBertEmbeddingMixin
from ..sentence_transformers_module import save_sentence_transformer
from ..trainer_fastbert_embedding import EmbeddingHeadsOnStates, FastBertEmbeddingTrainer, check_embedding_model
from ..training_args_fastbert import FastBertTrainingArguments
from .embedding_config import EmbeddingTrainingConfig
from .output_dir import check_output_dir, staged_output_dir


logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 128


@dataclass
class EmbeddingTrainingOutput:
    """What [`train_embedding_heads`] returns: the model (heads distilled), how training stopped, the quality per
    speed on the held-out texts ([`embedding_metrics_at_speeds`]) and the output folder."""

    model: FastBertEmbeddingMixin
    convergence: dict | None
    results: list[dict]
    output_dir: str


def check_texts(texts, what: str) -> list[str]:
    """`texts` as a list of non-empty strings; a `ValueError` naming `what` otherwise."""
    if isinstance(texts, str) or not hasattr(texts, "__iter__"):
        raise ValueError(f"{what} must be a list of texts, got {type(texts).__name__}.")
    texts = list(texts)
    bad = next((index for index, text in enumerate(texts) if not isinstance(text, str) or not text.strip()), None)
    if bad is not None:
        raise ValueError(f"{what}: text {bad} is empty or not a string ({texts[bad]!r:.60}).")
    if len(texts) < 2:
        raise ValueError(f"{what} must hold at least 2 texts, got {len(texts)}.")
    return texts


def embed_all_layers(model, tokenizer, texts, max_length: int, batch_size: int = 64):
    """`(all_embeddings, seq_lengths)`: (N, L, D) every head's embedding then the final one, and (N,) token counts."""
    model.eval()
    embeddings, lengths = [], []
    for start in range(0, len(texts), batch_size):
        texts_batch = texts[start : start + batch_size]
        batch = tokenizer(texts_batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batch = {name: value.to(model.device) for name, value in batch.items() if _takes(model, name)}
        with torch.no_grad():
            embeddings.append(model(**batch, output_all_embeddings=True).all_embeddings.float().cpu())
        lengths.append(batch["attention_mask"].sum(dim=1).cpu())
    return torch.cat(embeddings), torch.cat(lengths)


def padded_batches(dataset, collator, batch_size: int):
    """Padded batches of a tokenized `datasets.Dataset`, shortest texts first (the least padding)."""
    if dataset is None:
        return
    lengths = [len(ids) for ids in dataset["input_ids"]]  # one read of the column, not of every row
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    for start in range(0, len(order), batch_size):
        yield collator([dataset[index] for index in order[start : start + batch_size]])


def _takes(model, name: str) -> bool:
    return name in ("input_ids", "attention_mask") or name in model.backbone.embedding_inputs


def train_embedding_heads(
    model,
    tokenizer,
    texts,
    output_dir,
    config: EmbeddingTrainingConfig | None = None,
    *,
    eval_texts=None,
    **options,
) -> EmbeddingTrainingOutput:
    """
    Self-distill the embedding heads of `model` on `texts` (backbone frozen, [`FastBertEmbeddingTrainer`]) until the
    held-out loss converges, measure the quality at `config.speeds` on the held-out texts, and write `output_dir` as
    a sentence-transformers folder (`SentenceTransformer(output_dir, trust_remote_code=True)`), with the quality
    table in `embedding_results.json` and the model card. The folder is written all at once when training succeeded;
    everything is checked before training starts.

    Args:
        model ([`FastBertForSentenceEmbedding`]): the embedding model (a classifier, or a model loaded from a
            classification checkpoint, raises a `ValueError`).
        tokenizer: its tokenizer.
        texts (`list[str]`): unlabeled in-domain texts.
        output_dir: the output folder.
        config ([`EmbeddingTrainingConfig`]), or its fields as keywords.
        eval_texts (`list[str]`, *optional*): held-out texts; default: a slice of `texts`.
    """
    if config is None:
        names = {field.name for field in fields(EmbeddingTrainingConfig)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"train_embedding_heads got unknown options {unknown}; see EmbeddingTrainingConfig.")
        config = EmbeddingTrainingConfig(**options)
    elif options:
        raise TypeError("Pass either `config` or its fields as keywords, not both.")
    check_embedding_model(model, "train_embedding_heads")
    texts = check_texts(texts, "texts")
    eval_texts = None if eval_texts is None else check_texts(eval_texts, "eval_texts")
    longest = max_input_length(model.config)
    if config.max_length is not None and config.max_length > longest:
        raise ValueError(f"`max_length` {config.max_length} exceeds the {longest} tokens the model's positions allow.")
    max_length = config.max_length or int(min(DEFAULT_MAX_LENGTH, longest))
    check_max_length(tokenizer, max_length)
    check_output_dir(output_dir, config.overwrite_output_dir, flag="overwrite_output_dir=True")

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=max_length)

    def tokenized(values):
        dataset = Dataset.from_dict({"text": values}).map(tokenize, batched=True, remove_columns=["text"])
        extra = [name for name in dataset.column_names if not _takes(model, name)]
        return dataset.remove_columns(extra)

    with staged_output_dir(output_dir) as staging:
        args = FastBertTrainingArguments(
            output_dir=str(Path(staging) / "_checkpoints"),
            learning_rate=config.learning_rate,
            num_train_epochs=config.max_epochs,
            convergence_patience=config.patience,
            held_out_fraction=config.held_out_fraction,
            per_device_train_batch_size=config.batch_size,
            per_device_eval_batch_size=config.batch_size,
            save_strategy="no",
            report_to=[],
            logging_strategy="epoch",
            seed=config.seed,
            disable_tqdm=True,
            dataloader_pin_memory=torch.cuda.is_available(),
        )
        train_dataset = Dataset.from_dict({"text": texts})
        held_out = eval_texts
        if eval_texts is None and config.patience is not None:
            from ..convergence import split_held_out

            train_dataset, held_out_dataset = split_held_out(train_dataset, config.held_out_fraction, seed=config.seed)
            held_out = held_out_dataset["text"]
        train_data = tokenized(train_dataset["text"])
        eval_data = None if held_out is None else tokenized(held_out)
        trainee, collator = model, DataCollatorWithPadding(tokenizer)
        if config.cache_states:
            size = cache_bytes(model.config, [train_data, eval_data])
            if size > MAX_CACHE_BYTES:
                logger.warning(
                    "The cached layer states would take %.1f GiB (more than %.0f): the frozen backbone runs every "
                    "epoch instead.", size / 2**30, MAX_CACHE_BYTES / 2**30
                )  # fmt: skip
            else:
                logger.info("Caching the heads' inputs of %d texts (%.2f GiB)", len(train_data), size / 2**30)
                batches = [padded_batches(data, collator, config.batch_size) for data in (train_data, eval_data)]
                train_data = cache_head_inputs(model, batches[0])
                eval_data = None if eval_data is None else cache_head_inputs(model, batches[1])
                trainee, collator = EmbeddingHeadsOnStates(model), collate_head_inputs
        trainer = FastBertEmbeddingTrainer(
            model=trainee,
            args=args,
            train_dataset=train_data,
            eval_dataset=eval_data,
            data_collator=collator,
            processing_class=tokenizer,
        )
        trainer.train()
        convergence = trainer.convergence
        report_texts = held_out if held_out is not None else texts
        all_embeddings, lengths = embed_all_layers(model, tokenizer, report_texts, max_length)
        results = embedding_metrics_at_speeds(all_embeddings, lengths, model.config, config.speeds)
        training = describe_convergence(convergence, "embedding self-distillation") if convergence else None
        data = f"{len(report_texts)} {'held-out' if held_out is not None else 'training'} texts"
        save_sentence_transformer(model, tokenizer, staging, results=results, results_data=data, training=training)
        (Path(staging) / EMBEDDING_RESULTS_FILENAME).write_text(
            json.dumps({"results": results, "convergence": convergence, "texts": len(report_texts)}, indent=2) + "\n"
        )
        shutil.rmtree(Path(staging) / "_checkpoints", ignore_errors=True)
    return EmbeddingTrainingOutput(model=model, convergence=convergence, results=results, output_dir=str(output_dir))


__all__ = ["EmbeddingTrainingOutput", "train_embedding_heads"]

"""Self-distillation of a sentence embedding model's heads as a `Trainer`: each head learns the frozen model's own
final embedding from unlabeled text."""

import inspect

import torch
from torch import nn
from transformers import Trainer

from .cached_states import cache_head_inputs, collate_head_inputs
from .distillation import embedding_distillation_loss
from .modeling_fastbert import FastBertModelMixin
from .modeling_fastbert_embedding import FastBertEmbeddingMixin, FastBertEmbeddingOutput, finish_embedding
from .trainer_fastbert import converge_on_held_out


class EmbeddingHeadsOnStates(nn.Module):
    """
    The embedding heads of a [`FastBertForSentenceEmbedding`] (the same modules: training this trains the model's
    heads), run on cached head inputs ([`FastBertEmbeddingMixin.head_inputs`]) instead of the frozen backbone, so that
    an epoch costs the heads alone. [`FastBertEmbeddingTrainer`] trains it like the model; batches come from
    [`collate_head_inputs`].
    """

    def __init__(self, model: FastBertEmbeddingMixin):
        super().__init__()
        self.embedding_heads = model.embedding_heads
        self.config = model.config

    def forward(self, states, attention_mask, target, return_loss=True, output_all_embeddings=False):
        """(B, L-1, T, H) cached states, (B, T) mask and (B, D) final embeddings -> the distillation loss."""
        heads = self.embedding_heads
        embeddings = [
            finish_embedding(self.config, head(states[:, index].float(), attention_mask))
            for index, head in enumerate(heads)
        ]
        all_embeddings = torch.stack(embeddings + [target.to(embeddings[0].dtype)], dim=1)  # (B, L, D)
        loss = embedding_distillation_loss(all_embeddings)[0]
        return FastBertEmbeddingOutput(loss=loss, all_embeddings=all_embeddings if output_all_embeddings else None)


def check_embedding_model(model, who: str):
    """
    A `ValueError` naming `who` unless `model` is a sentence embedding model whose backbone was not fine-tuned to
    classify: a text classifier, or an embedding model loaded from a classification checkpoint (its config's
    `architectures`), has a last layer trained for its labels, not an embedding to distill.
    """
    if isinstance(model, EmbeddingHeadsOnStates):
        return
    if isinstance(model, FastBertModelMixin):
        raise ValueError(
            f"{who} distills the heads of a sentence embedding model, but got a text classifier "
            f"({type(model).__name__}); its exits are distilled by FastBertDistillationTrainer."
        )
    if not isinstance(model, FastBertEmbeddingMixin):
        raise ValueError(f"{who} needs a FastBertForSentenceEmbedding (of any family), got {type(model).__name__}.")
    classifiers = [name for name in model.config.architectures or [] if name.endswith("ForSequenceClassification")]
    if classifiers:
        raise ValueError(
            f"{who}: the model was loaded from a text classification checkpoint ({classifiers[0]}), whose last layer "
            "was fine-tuned for its labels, not to embed sentences. Start from a sentence embedding checkpoint (a "
            "sentence-transformers model), or set model.config.architectures = None to distill it anyway."
        )


class FastBertEmbeddingTrainer(Trainer):
    r"""
    FastBERT's self-distillation for sentence embeddings: the backbone is frozen and each embedding head learns the
    model's own final embedding, with loss 1 - cosine summed over the heads ([`embedding_distillation_loss`]). No
    labels: any in-domain text works.

    - Frozen: every parameter but `model.embedding_heads` gets `requires_grad=False` and the frozen modules run in
      eval mode, so the final embedding (speed 0) stays bit-for-bit the stock one and existing indexes stay valid.
    - Converges by default, as [`FastBertDistillationTrainer`] does: until the held-out loss (`eval_loss`) has not
      improved by `convergence_min_improvement` for `convergence_patience` evaluations, the held-out data being
      `eval_dataset` or a seeded slice of `train_dataset` ([`FastBertTrainingArguments`] or plain
      [`TrainingArguments`], whose defaults apply); the heads of the best evaluation are kept.
    - `evaluate()` reports `eval_loss` and `eval_distance_head_{layer}` (1 - cosine to the final embedding) per head.
    - `model.config.embedding_heads_distilled` becomes `True` once `train()` completes.

    Args:
        model ([`FastBertForSentenceEmbedding`] or [`EmbeddingHeadsOnStates`]):
            The embedding model, or its heads on cached states (`train_embedding_heads` does that). A classifier,
            or a model loaded from a classification checkpoint, raises a
            `ValueError` ([`check_embedding_model`]).
        args, train_dataset, eval_dataset, processing_class, data_collator, callbacks, ...:
            As in [`Trainer`]. Datasets hold `input_ids` and `attention_mask` (and `token_type_ids`).

    Example:

    ```python
    >>> from hf_fastbert import FastBertEmbeddingTrainer, FastBertForSentenceEmbedding, FastBertTrainingArguments

    >>> model = FastBertForSentenceEmbedding.from_pretrained("sentence-transformers/all-MiniLM-L6-v2")
    >>> trainer = FastBertEmbeddingTrainer(model, FastBertTrainingArguments("out"), train_dataset=tokenized_texts)
    >>> trainer.train()
    ```"""

    def __init__(self, model=None, args=None, *trainer_args, **kwargs):
        names = list(inspect.signature(Trainer.__init__).parameters)[3:]
        kwargs.update(zip(names, trainer_args, strict=False))
        check_embedding_model(model, type(self).__name__)
        for name in ("model_init", "compute_loss_func"):
            if kwargs.get(name) is not None:
                raise ValueError(f"FastBertEmbeddingTrainer does not take `{name}`: it computes the loss itself.")
        model.requires_grad_(False)
        model.embedding_heads.requires_grad_(True)
        if args is not None and args.ddp_find_unused_parameters is None:
            args.ddp_find_unused_parameters = False  # every head gets a gradient
        self.convergence_callback = converge_on_held_out(args, kwargs, "embedding self-distillation")
        super().__init__(model, args, **kwargs)
        self.model_accepts_loss_kwargs = False  # a per-batch mean, scaled by the Trainer for accumulation
        self.can_return_loss = True  # evaluation without labels computes the loss
        self.label_names = []

    @property
    def convergence(self) -> dict | None:
        """How the last `train()` stopped ([`ConvergenceCallback.summary`]); `None` for a fixed number of epochs."""
        return None if self.convergence_callback is None else self.convergence_callback.summary()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The heads' distillation loss of the batch (labels, if any, are dropped)."""
        inputs = {key: value for key, value in inputs.items() if key not in ("labels", "label", "label_ids")}
        unwrapped = self.accelerator.unwrap_model(model)
        if model.training:
            for module in unwrapped.children():
                if module is not unwrapped.embedding_heads:
                    module.eval()
        outputs = model(**inputs, return_loss=True, output_all_embeddings=not model.training)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """`(loss, per_sample_distances, None)`: each sample's 1 - cosine to the final embedding per head (B, L-1)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        all_embeddings = outputs.all_embeddings.float()  # (B, L, D)
        distances = 1.0 - torch.nn.functional.cosine_similarity(all_embeddings[:, :-1], all_embeddings[:, -1:], dim=-1)
        return loss.detach(), distances, None

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        output = super().evaluation_loop(dataloader, description, False, ignore_keys, metric_key_prefix)
        if self.args.eval_do_concat_batches and output.predictions is not None:
            for layer, value in enumerate(output.predictions.mean(axis=0), start=1):
                output.metrics[f"{metric_key_prefix}_distance_head_{layer}"] = float(value)
        return output

    def train(self, *args, **kwargs):
        """[`Trainer.train`]; `config.embedding_heads_distilled` is `False` until it completes."""
        config = self.accelerator.unwrap_model(self.model).config
        config.embedding_heads_distilled = False
        output = super().train(*args, **kwargs)
        config.embedding_heads_distilled = True
        return output


__all__ = [
    "EmbeddingHeadsOnStates",
    "FastBertEmbeddingTrainer",
    "cache_head_inputs",  # from cached_states, where the classifier's distillation finds them too
    "check_embedding_model",
    "collate_head_inputs",
]

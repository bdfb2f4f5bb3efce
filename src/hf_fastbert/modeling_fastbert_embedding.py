"""FastBERT for sentence embeddings: a small head after every layer maps that layer's token states to the final
embedding space, and each sample leaves at the first layer whose embedding has stopped moving.

The recipe is FastBERT's: the backbone is frozen, so at speed 0 the model *is* the stock embedding model (existing
vector indexes stay valid), and the heads are self-distilled on unlabeled text to the model's own final embedding
([`FastBertEmbeddingTrainer`], `hf-fastbert train-embedding`). The layers run on the classifier's engine
([`EarlyExitEngineMixin.run_with_exits`]): batched per-sample exits, exact FLOPs per sample, batch invariance.

The exit rule, chosen by measurement (`benchmarks/bench_embeddings.py`): a sample leaves after layer k >= 2 when the
cosine between the embeddings of heads k and k - 1 is above `1 - speed` (the embedding no longer moves). A learned
predictor of the cosine to the final embedding from the same number did no better, and the consecutive cosine needs
no calibration.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AlbertPreTrainedModel,
    BertPreTrainedModel,
    DebertaV2PreTrainedModel,
    DistilBertPreTrainedModel,
    ElectraPreTrainedModel,
    ModernBertPreTrainedModel,
    PreTrainedConfig,
    RobertaPreTrainedModel,
    XLMRobertaPreTrainedModel,
)
from transformers.modeling_outputs import ModelOutput
from transformers.utils import cached_file
from transformers.utils.generic import can_return_tuple

from .configuration_fastbert import (
    FastBertAlbertConfig,
    FastBertConfig,
    FastBertDebertaV2Config,
    FastBertDistilBertConfig,
    FastBertElectraConfig,
    FastBertModernBertConfig,
    FastBertRobertaConfig,
    FastBertXLMRobertaConfig,
    validate_speed,
)
from .distillation import embedding_distillation_loss
from .flops import embedding_flops
from .modeling_fastbert import FASTBERT_BASE_MODELS, EarlyExitEngineMixin, fastbert_model_class, hub_kwargs


def pool_tokens(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """
    (B, T, H) token states and (B, T) padding mask -> (B, H) sentence vectors, as sentence-transformers' `Pooling`
    computes them: `"mean"` over real tokens, `"cls"` the first token, `"max"` over real tokens.
    """
    if mode == "cls":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    if mode == "max":
        return hidden.masked_fill(weights == 0, -1e9).amax(dim=1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def embedding_uncertainty(embeddings: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """(..., D) embeddings of one layer's head and (..., D) of the previous layer's -> (...) 1 - their cosine."""
    return 1.0 - F.cosine_similarity(embeddings.float(), previous.float(), dim=-1)


def select_embedding_exits(all_embeddings: torch.Tensor, speed: float):
    """
    What early exit at `speed` answers for each sample, from every layer's embedding (the same decisions as the
    engine's, layer by layer).

    Args:
        all_embeddings: (B, L, D) embeddings of the heads (layers 1 .. L-1), then the final embedding.
        speed: in [0, 1]; 0 = full depth.

    Returns:
        `(embeddings, exit_layers)`: (B, D) and (B,) 1-based exit layers.
    """
    batch_size, num_layers = all_embeddings.shape[:2]
    exit_layers = torch.full((batch_size,), num_layers, dtype=torch.long, device=all_embeddings.device)
    if speed > 0:
        settled = embedding_uncertainty(all_embeddings[:, 1:-1], all_embeddings[:, :-2]) < speed  # (B, L-2): 2..L-1
        first = settled.int().argmax(dim=1) + 2
        exit_layers = torch.where(settled.any(dim=1), first, exit_layers)
    rows = torch.arange(batch_size, device=all_embeddings.device)
    return all_embeddings[rows, exit_layers - 1], exit_layers


@dataclass
class FastBertEmbeddingOutput(ModelOutput):
    r"""
    Output of [`FastBertForSentenceEmbedding`].

    Args:
        loss (`torch.FloatTensor` of shape `(1,)`, *optional*, returned with `return_loss=True`):
            The heads' self-distillation loss ([`embedding_distillation_loss`]); the model then runs at full depth.
        embeddings (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
            The sentence embedding of the layer each sample left at (unit length with `normalize_embeddings`).
        exit_layers (`torch.LongTensor` of shape `(batch_size,)`):
            1-based layer each sample left at; `num_hidden_layers` for the stock embedding.
        flops (`torch.LongTensor` of shape `(batch_size,)`):
            Matrix-multiply FLOPs spent on each sample at its real token length (`hf_fastbert.flops.embedding_flops`).
        all_embeddings (`torch.FloatTensor` of shape `(batch_size, num_hidden_layers, hidden_size)`, *optional*):
            Returned with `output_all_embeddings=True`: every head's embedding (layers 1 .. L-1), the final one last.
    """

    loss: torch.FloatTensor | None = None
    embeddings: torch.FloatTensor | None = None
    exit_layers: torch.LongTensor | None = None
    flops: torch.LongTensor | None = None
    all_embeddings: torch.FloatTensor | None = None


def finish_embedding(config, embeddings: torch.Tensor) -> torch.Tensor:
    """What every embedding, a head's or the final one, goes through last: unit length with `normalize_embeddings`."""
    return F.normalize(embeddings, dim=-1) if config.normalize_embeddings else embeddings


class FastBertEmbeddingHead(nn.Module):
    """
    One layer's embedding head: attention pooling of the layer's token states by `embedding_head_queries` learned
    queries (keys folded into them: one score per token and query), plus their mean over real tokens, projected to the
    embedding size. Measured against a linear or an MLP head on the mean (`benchmarks/bench_embeddings.py`), pooling
    every token with learned weights brings the early layers' embeddings closest to the final one.
    """

    def __init__(self, config):
        super().__init__()
        size, queries = config.hidden_size, config.embedding_head_queries
        self.scores = nn.Linear(size, queries)
        self.output = nn.Linear((queries + 1) * size, size)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, H) token states and (B, T) padding mask (None: no padding) -> (B, H) embeddings."""
        scores = self.scores(hidden_states)  # (B, T, Q)
        if attention_mask is None:
            mean = hidden_states.mean(dim=1)  # (B, H)
        else:
            scores = scores.masked_fill(attention_mask[:, :, None] == 0, torch.finfo(scores.dtype).min)
            mean = pool_tokens(hidden_states, attention_mask, "mean")
        pooled = torch.bmm(scores.softmax(dim=1).transpose(1, 2), hidden_states)  # (B, Q, H)
        return self.output(torch.cat([pooled.flatten(1), mean], dim=1))  # (B, H)


def sentence_transformers_pooling(pretrained_model_name_or_path, **hub_options) -> dict:
    """
    The pooling, normalization and truncation a stock sentence-transformers folder declares (`modules.json`, its
    `Pooling` module's `config.json`, `sentence_bert_config.json`) as FastBERT config values (`embedding_pooling`,
    `normalize_embeddings`, `embedding_max_length`); `{}` without a `Pooling` module. A pooling mode FastBERT does
    not implement raises a `ValueError` naming it.
    """
    import json

    def read(name):
        path = cached_file(
            pretrained_model_name_or_path, name, _raise_exceptions_for_missing_entries=False, **hub_options
        )
        return None if path is None else json.loads(open(path, encoding="utf-8").read())

    modules = read("modules.json") or []
    pooling_paths = [module["path"] for module in modules if module["type"].endswith("Pooling")]
    if not pooling_paths:  # not the stock layout (FastBERT's own folders pool inside the model)
        return {}
    values = {"normalize_embeddings": any(module["type"].endswith("Normalize") for module in modules)}
    pooling = read(f"{pooling_paths[0]}/config.json")
    if pooling:
        modes = [key for key, value in pooling.items() if key.startswith("pooling_mode_") and value is True]
        mode = pooling.get("pooling_mode") or (modes[0] if len(modes) == 1 else modes)
        names = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}
        mode = names.get(mode, mode) if isinstance(mode, str) else mode
        if mode not in ("mean", "cls", "max"):
            raise ValueError(
                f"{pretrained_model_name_or_path} pools its embeddings with {mode!r} "
                f"({pooling_paths[0]}/config.json); FastBERT sentence embeddings support mean, cls and max pooling."
            )
        values["embedding_pooling"] = mode
    max_length = (read("sentence_bert_config.json") or {}).get("max_seq_length")
    if isinstance(max_length, int) and max_length > 0:
        values["embedding_max_length"] = max_length
    return values


class FastBertEmbeddingMixin(EarlyExitEngineMixin):
    r"""
    FastBERT's adaptive inference for sentence embeddings, for every supported family: the family's class is
    `class FastBert<Family>ForSentenceEmbedding(FastBertEmbeddingMixin, <Family>PreTrainedModel)`. It holds the
    family's base model under its usual prefix (so stock and sentence-transformers checkpoints load unchanged) and an
    embedding head ([`FastBertEmbeddingHead`]) after every layer but the last.

    At speed 0 it runs the stock base model and pools its last layer: the stock embedding. At `speed > 0` (eval mode,
    heads distilled) each sample leaves at the first layer k >= 2 whose head embedding has cosine above `1 - speed`
    with layer k - 1's, and gets that head's embedding.
    """

    _keys_to_ignore_on_load_missing = [r"embedding_heads\.", r"pooler\."]
    # The heads of other checkpoints of the family: classifiers (stock and FastBERT) and pre-training heads.
    _keys_to_ignore_on_load_unexpected = [
        r"^branches\.", r"^classifier\.", r"^pre_classifier\.", r"^pooler\.", r"^head\.", r"^drop\.", r"^dropout\.",
        r"^cls\.", r"^lm_head\.", r"^vocab_", r"^discriminator_predictions\.", r"^generator_", r"^predictions\.",
        r"^sop_classifier\.", r"^lm_predictions\.", r"^mask_predictions\.", r"^decoder\.",
    ]  # fmt: skip

    def __init__(self, config):
        self.check_config_family(config, FASTBERT_EMBEDDING_MODELS)
        config.validate_fastbert()
        super().__init__(config)
        setattr(self, self.base_model_prefix, FASTBERT_BASE_MODELS[type(config)](config))
        heads = config.num_hidden_layers - 1
        self.embedding_heads = nn.ModuleList(FastBertEmbeddingHead(config) for _ in range(heads))
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """
        [`~PreTrainedModel.from_pretrained`] from a stock, sentence-transformers or FastBERT checkpoint of the
        family. A sentence-transformers folder's pooling and normalization (`1_Pooling/config.json`, `modules.json`)
        set `embedding_pooling` and `normalize_embeddings`; a FastBERT config that says otherwise raises a
        `ValueError`, as does a checkpoint that would leave backbone weights random or that claims distilled heads
        without their weights.
        """
        hub = hub_kwargs(kwargs)
        declared = sentence_transformers_pooling(pretrained_model_name_or_path, **hub)
        if declared and not isinstance(kwargs.get("config"), PreTrainedConfig):
            saved = PreTrainedConfig.get_config_dict(pretrained_model_name_or_path, **hub)[0]
            for name, value in declared.items():
                if saved.get(name, value) != value:
                    raise ValueError(
                        f"{pretrained_model_name_or_path}: config.json says {name}={saved[name]!r} but its "
                        f"sentence-transformers files say {value!r}; fix one of them so that they agree."
                    )
                kwargs.setdefault(name, value)  # a value passed here overrides both
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        model._check_loaded_weights(pretrained_model_name_or_path, info["missing_keys"])
        return (model, info) if output_loading_info else model

    def _adjust_missing_and_unexpected_keys(self, loading_info):
        # Missing heads are hidden from the load report (`_keys_to_ignore_on_load_missing`): remember them first.
        self._heads_missing = any(key.startswith("embedding_heads.") for key in loading_info.missing_keys)
        super()._adjust_missing_and_unexpected_keys(loading_info)

    def _check_loaded_weights(self, source, missing_keys):
        self.check_backbone_loaded(source, missing_keys, (f"{self.base_model_prefix}.pooler.",))  # pooler: unused
        if self.config.embedding_heads_distilled and getattr(self, "_heads_missing", False):
            raise ValueError(
                f"{source} says its embedding heads were distilled (embedding_heads_distilled=true) but holds no head "
                "weights (embedding_heads.*): the checkpoint is incomplete."
            )

    def exit_flops(self, seq_lengths, exit_layers, heads_ran):
        """[`embedding_flops`] of this model: what a sample of each length spent, exiting at each layer."""
        return embedding_flops(self.config, seq_lengths, exit_layers, heads_ran)

    def final_embedding(self, last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H) last layer's states and (B, T) mask -> (B, H) the stock embedding."""
        hidden = self.backbone.student_input(self, last_hidden_state)  # ModernBERT's final norm
        return finish_embedding(self.config, pool_tokens(hidden, attention_mask, self.config.embedding_pooling))

    final_output = final_embedding  # the last layer's head, for the engine (`head_inputs`)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        speed: float | None = None,
        output_all_embeddings: bool = False,
        return_loss: bool | None = None,
        **kwargs,
    ) -> FastBertEmbeddingOutput:
        r"""
        speed (`float`, *optional*):
            Early-exit threshold in [0, 1] for this call; defaults to `config.speed`. 0: the stock embedding. Used in
            eval mode only; needs distilled heads (`config.embedding_heads_distilled`).
        output_all_embeddings (`bool`, *optional*, defaults to `False`):
            Run every sample through every layer and head and return every embedding in `all_embeddings`; the
            returned `embeddings` and `exit_layers` are still the ones the exit rule picks at `speed`.
        return_loss (`bool`, *optional*):
            Return the heads' self-distillation loss (full depth); defaults to `True` in training mode.
        """
        speed = validate_speed(self.config.speed if speed is None else speed)
        inputs, attention_mask = self.check_inputs(
            input_ids, inputs_embeds, attention_mask, token_type_ids, position_ids
        )
        batch_size, seq_length = attention_mask.shape
        return_loss = self.training if return_loss is None else return_loss
        exits_at_speed = not self.training and speed > 0
        if exits_at_speed and not self.config.embedding_heads_distilled:
            raise ValueError(
                f"This model's embedding heads were never distilled (embedding_heads_distilled=False), so it cannot "
                f"exit early (speed={speed}): distill them first (`hf-fastbert train-embedding`, "
                "FastBertEmbeddingTrainer), or use speed=0 for the stock embedding."
            )
        full_depth = output_all_embeddings or return_loss
        if not exits_at_speed and not full_depth:
            base = self.backbone.base_model(self)
            stock_inputs = {name: value for name, value in inputs.items() if value is not None}
            last_hidden_state = base(**stock_inputs, attention_mask=attention_mask, return_dict=True)[0]
            hidden = finish_embedding(
                self.config, pool_tokens(last_hidden_state, attention_mask, self.config.embedding_pooling)
            )
            exit_layers = torch.full((batch_size,), self.config.num_hidden_layers, device=hidden.device)
            output = FastBertEmbeddingOutput(embeddings=hidden, exit_layers=exit_layers)
        else:
            output = self._forward_layers(inputs, attention_mask, speed, full_depth)
            if return_loss:
                output.loss = embedding_distillation_loss(output.all_embeddings)[0]
            if not output_all_embeddings:
                output.all_embeddings = None
        output.flops = self._sample_flops(attention_mask.sum(dim=1), output.exit_layers, speed > 0, seq_length)
        return output

    def _forward_layers(self, inputs, mask, speed, full_depth) -> FastBertEmbeddingOutput:
        """The engine with the embedding heads; `full_depth`: every layer and head, then the exit rule on them."""

        def head(index, hidden, head_mask):
            return finish_embedding(
                self.config, self.embedding_heads[index](self.backbone.student_input(self, hidden), head_mask)
            )

        def leaves(index, embeddings, state):
            if state is None:  # the first head: nothing to compare with yet
                return torch.zeros(embeddings.shape[0], dtype=torch.bool, device=embeddings.device), (embeddings,)
            return embedding_uncertainty(embeddings, state[0]) < speed, (embeddings,)

        embeddings, exit_layers, _, all_embeddings = self.run_with_exits(
            inputs,
            mask,
            self.config.hidden_size,
            head,
            None if full_depth else leaves,
            self.final_embedding,
            collect=full_depth,
        )
        if full_depth and not self.training and speed > 0:
            embeddings, exit_layers = select_embedding_exits(all_embeddings, speed)
        return FastBertEmbeddingOutput(embeddings=embeddings, exit_layers=exit_layers, all_embeddings=all_embeddings)


class FastBertForSentenceEmbedding(FastBertEmbeddingMixin, BertPreTrainedModel):
    r"""
    FastBERT sentence embeddings on BERT, and the entry point for every family: `from_pretrained` accepts a stock,
    sentence-transformers or FastBERT checkpoint of any supported family and returns the embedding model of that
    family.

    Example:

    ```python
    >>> from transformers import AutoTokenizer
    >>> from hf_fastbert import FastBertForSentenceEmbedding

    >>> model = FastBertForSentenceEmbedding.from_pretrained("path/to/distilled").eval()
    >>> inputs = tokenizer(["a short query", "a longer document ..."], padding=True, return_tensors="pt")
    >>> model(**inputs).embeddings  # speed 0: the stock embedding
    >>> model(**inputs, speed=0.1).exit_layers
    ```"""

    config_class = FastBertConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        if cls is FastBertForSentenceEmbedding:
            family_class = fastbert_model_class(pretrained_model_name_or_path, FASTBERT_EMBEDDING_MODELS, **kwargs)
            if family_class is not cls:
                return family_class.from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)


class FastBertRobertaForSentenceEmbedding(FastBertEmbeddingMixin, RobertaPreTrainedModel):
    """FastBERT sentence embeddings on RoBERTa."""

    config_class = FastBertRobertaConfig


class FastBertXLMRobertaForSentenceEmbedding(FastBertEmbeddingMixin, XLMRobertaPreTrainedModel):
    """FastBERT sentence embeddings on XLM-RoBERTa."""

    config_class = FastBertXLMRobertaConfig


class FastBertElectraForSentenceEmbedding(FastBertEmbeddingMixin, ElectraPreTrainedModel):
    """FastBERT sentence embeddings on ELECTRA."""

    config_class = FastBertElectraConfig


class FastBertDistilBertForSentenceEmbedding(FastBertEmbeddingMixin, DistilBertPreTrainedModel):
    """FastBERT sentence embeddings on DistilBERT."""

    config_class = FastBertDistilBertConfig


class FastBertAlbertForSentenceEmbedding(FastBertEmbeddingMixin, AlbertPreTrainedModel):
    """FastBERT sentence embeddings on ALBERT."""

    config_class = FastBertAlbertConfig


class FastBertDebertaV2ForSentenceEmbedding(FastBertEmbeddingMixin, DebertaV2PreTrainedModel):
    """FastBERT sentence embeddings on DeBERTa-v2 and -v3."""

    config_class = FastBertDebertaV2Config


class FastBertModernBertForSentenceEmbedding(FastBertEmbeddingMixin, ModernBertPreTrainedModel):
    """FastBERT sentence embeddings on ModernBERT."""

    config_class = FastBertModernBertConfig


# FastBERT config class -> sentence embedding model class, for every supported family.
FASTBERT_EMBEDDING_MODELS = {
    model_class.config_class: model_class
    for model_class in (
        FastBertForSentenceEmbedding,
        FastBertRobertaForSentenceEmbedding,
        FastBertXLMRobertaForSentenceEmbedding,
        FastBertElectraForSentenceEmbedding,
        FastBertDistilBertForSentenceEmbedding,
        FastBertAlbertForSentenceEmbedding,
        FastBertDebertaV2ForSentenceEmbedding,
        FastBertModernBertForSentenceEmbedding,
    )
}


__all__ = [
    "FASTBERT_EMBEDDING_MODELS",
    "FastBertAlbertForSentenceEmbedding",
    "FastBertDebertaV2ForSentenceEmbedding",
    "FastBertDistilBertForSentenceEmbedding",
    "FastBertElectraForSentenceEmbedding",
    "FastBertEmbeddingHead",
    "FastBertEmbeddingMixin",
    "FastBertEmbeddingOutput",
    "FastBertForSentenceEmbedding",
    "FastBertModernBertForSentenceEmbedding",
    "FastBertRobertaForSentenceEmbedding",
    "FastBertXLMRobertaForSentenceEmbedding",
    "embedding_uncertainty",
    "finish_embedding",
    "pool_tokens",
    "select_embedding_exits",
    "sentence_transformers_pooling",
]

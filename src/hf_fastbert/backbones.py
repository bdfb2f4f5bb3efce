"""What differs between the encoder families FastBERT runs on, one small declaration per family.

The early-exit engine (`modeling_fastbert.py`) never asks which family it runs. It asks the model's `Backbone` to:
- `embed` the inputs into the (B, T, H) states the first layer reads;
- `prepare` what the layers need besides the states, from the (b, t) padding mask of the samples still running
  (attention masks, relative or rotary positions); the engine calls it again whenever the batch shrinks;
- `run_layer` number `index` (1 layer of FastBERT = one student: an ALBERT "layer" is its shared layer group);
- `student_input`: the states a student reads after a layer (pre-norm families normalize them first);
- `teacher_logits`: the family's own classification head, exactly as its `<Family>ForSequenceClassification` runs it;
- count FLOPs (`fixed_flops`: paid once by every sample, `layer_flops`, `teacher_flops`): matrix-multiply work per
  sample at its real length.

A family is added by subclassing `Backbone` and registering it in `BACKBONES` (with its config and model classes in
`configuration_fastbert.py` and `modeling_fastbert.py`).
"""

import math

import torch
import torch.nn.functional as F
from transformers.masking_utils import create_bidirectional_mask, create_bidirectional_sliding_window_mask


def _attention_flops(n, hidden, intermediate):
    """A post-norm BERT layer: Q, K, V, O projections, scores and weighted sum, two feed-forward matmuls."""
    return 2 * n * hidden * hidden * 4 + 2 * n * n * hidden * 2 + 2 * n * hidden * intermediate * 2


class Backbone:
    """The BERT declaration; other families override what differs. Methods take the FastBERT model first."""

    # Where the family keeps its layers inside the base model, for the default `run_layer`.
    layers_path = "encoder.layer"
    # Inputs of `forward` the family's embeddings accept besides input_ids / inputs_embeds.
    embedding_inputs = ("token_type_ids", "position_ids")
    # Attributes of the stock classification head, replaced by one FastBERT branch when `teacher_head="branch"`.
    stock_head_modules = ("classifier", "dropout", "bert.pooler")

    def base_model(self, model):
        return getattr(model, model.base_model_prefix)

    def layers(self, model):
        module = self.base_model(model)
        for name in self.layers_path.split("."):
            module = getattr(module, name)
        return module

    def max_length(self, config):
        """The longest input the position embeddings allow; None when positions are relative or rotary."""
        return config.max_position_embeddings

    def embed(self, model, inputs, mask) -> torch.Tensor:
        """`inputs`: input_ids or inputs_embeds and the `embedding_inputs` given; (B, T) mask -> (B, T, H)."""
        return self.base_model(model).embeddings(**inputs)

    def prepare(self, model, hidden, mask, position_ids=None):
        """(b, t, H) states and (b, t) 0/1 mask -> what every layer needs besides the states."""
        return create_bidirectional_mask(config=model.config, inputs_embeds=hidden, attention_mask=mask)

    def run_layer(self, model, index, hidden, state, mask, embeddings=None) -> torch.Tensor:
        return self.layers(model)[index](hidden, state)

    def student_input(self, model, hidden):
        return hidden

    def teacher_logits(self, model, hidden, mask) -> torch.Tensor:
        return model.classifier(model.dropout(self.base_model(model).pooler(hidden)))

    def fixed_flops(self, config, n):
        return 0 * n  # embedding lookups and sums are not matrix multiplies

    def layer_flops(self, config, n):
        return _attention_flops(n, config.hidden_size, config.intermediate_size)

    def teacher_flops(self, config, n):
        h, c = config.hidden_size, config.num_labels
        return torch.full_like(n, 2 * h * h + 2 * h * c)  # pooler + classifier


class RobertaBackbone(Backbone):
    """RoBERTa and XLM-RoBERTa: BERT's layers; the head is `classifier.dense` + `classifier.out_proj` on `<s>`."""

    stock_head_modules = ("classifier",)

    def max_length(self, config):
        return config.max_position_embeddings - config.pad_token_id - 1  # positions start after the padding index

    def teacher_logits(self, model, hidden, mask):
        return model.classifier(hidden)


class ElectraBackbone(RobertaBackbone):
    """ELECTRA: BERT's layers after an optional embedding projection; RoBERTa's head (with GELU); BERT's positions."""

    max_length = Backbone.max_length

    def embed(self, model, inputs, mask):
        hidden = super().embed(model, inputs, mask)
        project = getattr(self.base_model(model), "embeddings_project", None)
        return hidden if project is None else project(hidden)

    def fixed_flops(self, config, n):
        if config.embedding_size == config.hidden_size:
            return 0 * n
        return 2 * n * config.embedding_size * config.hidden_size


class DistilBertBackbone(Backbone):
    """DistilBERT: no token types; head = `pre_classifier` + ReLU + `classifier` on the first token."""

    layers_path = "transformer.layer"
    embedding_inputs = ("position_ids",)
    stock_head_modules = ("classifier", "dropout", "pre_classifier")

    def embed(self, model, inputs, mask):
        return self.base_model(model).embeddings(inputs["input_ids"], inputs["inputs_embeds"], inputs["position_ids"])

    def layer_flops(self, config, n):
        return _attention_flops(n, config.dim, config.hidden_dim)

    def teacher_logits(self, model, hidden, mask):
        return model.classifier(model.dropout(F.relu(model.pre_classifier(hidden[:, 0]))))


class AlbertBackbone(Backbone):
    """
    ALBERT: embeddings of width `embedding_size` projected to `hidden_size`; FastBERT layer `i` runs the shared layer
    group `i * num_hidden_groups // num_hidden_layers` (each group holds `inner_group_num` layers); the head is the
    base model's pooler + tanh, then `dropout` and `classifier`.
    """

    layers_path = "encoder.albert_layer_groups"  # the shared groups
    stock_head_modules = ("classifier", "dropout", "albert.pooler", "albert.pooler_activation")

    def embed(self, model, inputs, mask):
        albert = self.base_model(model)
        hidden = albert.embeddings(**inputs)
        return albert.encoder.embedding_hidden_mapping_in(hidden)

    def run_layer(self, model, index, hidden, state, mask, embeddings=None):
        config = model.config
        group = int(index / (config.num_hidden_layers / config.num_hidden_groups))  # as AlbertTransformer does
        return self.layers(model)[group](hidden, state)

    def teacher_logits(self, model, hidden, mask):
        albert = self.base_model(model)
        return model.classifier(model.dropout(albert.pooler_activation(albert.pooler(hidden[:, 0]))))

    def fixed_flops(self, config, n):
        return 2 * n * config.embedding_size * config.hidden_size

    def layer_flops(self, config, n):
        return config.inner_group_num * super().layer_flops(config, n)


class DebertaV2Backbone(Backbone):
    """
    DeBERTa-v2 and -v3: disentangled attention over relative positions (content-to-position and position-to-content
    scores, relative embeddings projected in every layer), an optional convolution after the first layer, and a
    `ContextPooler` head (`pooler`, `dropout`, `classifier`). Layers return `(states, attentions)`.
    """

    stock_head_modules = ("classifier", "dropout", "pooler")

    def max_length(self, config):
        return config.max_position_embeddings if config.position_biased_input else None

    def embed(self, model, inputs, mask):
        if inputs["token_type_ids"] is None:  # as DebertaV2Model does
            inputs = {**inputs, "token_type_ids": torch.zeros_like(mask, dtype=torch.long)}
        return self.base_model(model).embeddings(**inputs, mask=mask)  # zeroes the padding

    def prepare(self, model, hidden, mask, position_ids=None):
        encoder = self.base_model(model).encoder
        return {
            "attention_mask": encoder.get_attention_mask(mask),
            "relative_pos": encoder.get_rel_pos(hidden),
            "rel_embeddings": encoder.get_rel_embedding(),
        }

    def run_layer(self, model, index, hidden, state, mask, embeddings=None):
        encoder = self.base_model(model).encoder
        output, _ = encoder.layer[index](
            hidden,
            state["attention_mask"],
            relative_pos=state["relative_pos"],
            rel_embeddings=state["rel_embeddings"],
        )
        if index == 0 and encoder.conv is not None:
            output = encoder.conv(embeddings, output, mask)
        return output

    def teacher_logits(self, model, hidden, mask):
        return model.classifier(model.dropout(model.pooler(hidden)))

    def fixed_flops(self, config, n):
        h = config.hidden_size
        embedding_size = getattr(config, "embedding_size", None) or h
        projection = 0 if embedding_size == h else 2 * n * embedding_size * h
        kernel = getattr(config, "conv_kernel_size", 0)
        convolution = 2 * n * h * (h // getattr(config, "conv_groups", 1)) * kernel  # after the first layer
        return projection + convolution

    def layer_flops(self, config, n):
        h = config.hidden_size
        flops = _attention_flops(n, h, config.intermediate_size)
        if not config.relative_attention:
            return flops
        span = config.position_buckets if config.position_buckets > 0 else config.max_relative_positions
        if span < 1:
            span = config.max_position_embeddings
        kinds = [kind for kind in ("c2p", "p2c") if kind in (config.pos_att_type or [])]
        # Each kind projects the 2 * span relative embeddings (once per layer: counted in full for every sample, as
        # if it ran alone) and scores every token against them.
        return flops + len(kinds) * (2 * (2 * span) * h * h + 2 * n * (2 * span) * h)

    def teacher_flops(self, config, n):
        h, c = config.hidden_size, config.num_labels
        return torch.full_like(n, 2 * config.pooler_hidden_size * h + 2 * h * c)


class ModernBertBackbone(Backbone):
    """
    ModernBERT: pre-norm layers with rotary positions, full or sliding-window attention by `config.layer_types`, a
    gated feed-forward, a final norm; the head (`head`, `drop`, `classifier`) pools the normed states (CLS or mean).
    Students read the final norm of their layer's states, as the head does.
    """

    layers_path = "layers"
    embedding_inputs = ("position_ids",)
    stock_head_modules = ("classifier", "drop", "head")

    def max_length(self, config):
        return None

    def embed(self, model, inputs, mask):
        return self.base_model(model).embeddings(input_ids=inputs["input_ids"], inputs_embeds=inputs["inputs_embeds"])

    def prepare(self, model, hidden, mask, position_ids=None):
        base = self.base_model(model)
        if position_ids is None:
            position_ids = torch.arange(hidden.shape[1], device=hidden.device)[None, :]  # (1, t)
        masks = {
            "full_attention": create_bidirectional_mask(
                config=model.config, inputs_embeds=hidden, attention_mask=mask
            ),
            "sliding_attention": create_bidirectional_sliding_window_mask(
                config=model.config, inputs_embeds=hidden, attention_mask=mask
            ),
        }
        rotary = {kind: base.rotary_emb(hidden, position_ids, kind) for kind in set(model.config.layer_types)}
        return {"masks": masks, "rotary": rotary}

    def run_layer(self, model, index, hidden, state, mask, embeddings=None):
        layer = self.base_model(model).layers[index]
        kind = layer.attention_type
        return layer(hidden, attention_mask=state["masks"][kind], position_embeddings=state["rotary"][kind])

    def student_input(self, model, hidden):
        return self.base_model(model).final_norm(hidden)

    def teacher_logits(self, model, hidden, mask):
        hidden = self.base_model(model).final_norm(hidden)
        if model.config.classifier_pooling == "mean":
            weights = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
        else:
            pooled = hidden[:, 0]
        return model.classifier(model.drop(model.head(pooled)))

    def layer_flops(self, config, n):
        h, i = config.hidden_size, config.intermediate_size
        projections = 2 * n * h * 3 * h + 2 * n * h * h  # Wqkv, Wo
        attention = 2 * n * n * h * 2  # eager and sdpa score every pair; the sliding window only masks
        feed_forward = 2 * n * h * 2 * i + 2 * n * i * h  # gated Wi (two halves), Wo
        return projections + attention + feed_forward


BACKBONES = {
    "bert": Backbone(),
    "roberta": RobertaBackbone(),
    "xlm-roberta": RobertaBackbone(),
    "electra": ElectraBackbone(),
    "distilbert": DistilBertBackbone(),
    "albert": AlbertBackbone(),
    "deberta-v2": DebertaV2Backbone(),
    "modernbert": ModernBertBackbone(),
}


def get_backbone(config) -> Backbone:
    """The declaration of `config`'s family (`config.backbone_model_type`)."""
    return BACKBONES[config.backbone_model_type]


def _family(config) -> str | None:
    """The family of a stock or a FastBERT config."""
    return getattr(config, "backbone_model_type", None) or getattr(config, "model_type", None)


def max_input_length(config) -> float:
    """
    The longest input (in tokens, special ones included) to run the models of `config` (a stock or a FastBERT config)
    on: [`Backbone.max_length`] where position embeddings set it (it knows RoBERTa's offset of 2); for relative or
    rotary positions, the length the model was configured for (`max_position_embeddings`); `math.inf` without either.
    """
    family = _family(config)
    longest = BACKBONES[family].max_length(config) if family in BACKBONES else None
    if longest is None:
        longest = getattr(config, "max_position_embeddings", None)
    return math.inf if longest is None else longest


def takes_token_type_ids(config) -> bool:
    """Whether the models of `config`'s family (a stock or a FastBERT config) take `token_type_ids`: a tokenizer
    borrowed from BERT makes them for DistilBERT and ModernBERT too, which must leave them out."""
    family = _family(config)
    return family not in BACKBONES or "token_type_ids" in BACKBONES[family].embedding_inputs

"""FastBERT: a classifier with a student classifier after every layer and per-sample early exit, for every supported
encoder family (BERT, RoBERTa, XLM-RoBERTa, ELECTRA, DistilBERT, ALBERT, DeBERTa-v2/v3, ModernBERT).

One engine (`FastBertModelMixin`) serves every family; what differs is declared in `backbones.py`. Each family's model
class subclasses its stock `<Family>ForSequenceClassification`, so the teacher is the stock head with its parameter
names and, at speed 0, the model is the stock classifier.
"""

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AlbertForSequenceClassification,
    AlbertModel,
    BertForSequenceClassification,
    BertModel,
    DebertaV2ForSequenceClassification,
    DebertaV2Model,
    DistilBertForSequenceClassification,
    DistilBertModel,
    ElectraForSequenceClassification,
    ElectraModel,
    ModernBertForSequenceClassification,
    ModernBertModel,
    PreTrainedConfig,
    RobertaForSequenceClassification,
    RobertaModel,
    XLMRobertaForSequenceClassification,
    XLMRobertaModel,
)
from transformers.modeling_outputs import ModelOutput
from transformers.utils.generic import can_return_tuple

from .backbones import get_backbone
from .configuration_fastbert import (
    FastBertAlbertConfig,
    FastBertConfig,
    FastBertConfigMixin,
    FastBertDebertaV2Config,
    FastBertDistilBertConfig,
    FastBertElectraConfig,
    FastBertModernBertConfig,
    FastBertRobertaConfig,
    FastBertXLMRobertaConfig,
    fastbert_config_class,
    validate_speed,
)
from .exit_rules import (
    calibrate_thresholds,
    check_exit_rule,
    exits_at_layer,
    fit_exit_heads,
    normalized_entropy,
    select_exits,
)
from .flops import fastbert_flops


def first_confident_layer(uncertainties: torch.Tensor, speed: float) -> torch.Tensor:
    """
    The exit rule: the 1-based layer of the first student whose uncertainty is below `speed`.

    Args:
        uncertainties: (B, L - 1) uncertainty of each student (layers 1 .. L - 1).
        speed: threshold in [0, 1].

    Returns:
        (B,) int64 exit layers; L (the teacher's layer) where no student qualifies.
    """
    confident = uncertainties < speed  # (B, L - 1)
    num_layers = confident.shape[1] + 1
    first = confident.int().argmax(dim=1) + 1  # argmax returns the first maximum
    return torch.where(confident.any(dim=1), first, num_layers)


def stack_sample_outputs(outputs: list) -> "FastBertSequenceClassifierOutput":
    """The outputs of samples run one by one -> one batch's output (the mean loss when they have one)."""
    stacked = {
        name: torch.cat([output[name] for output in outputs])
        for name in ("logits", "exit_layers", "flops", "all_logits")
        if outputs[0].get(name) is not None
    }
    if outputs[0].get("loss") is not None:
        stacked["loss"] = torch.stack([output.loss for output in outputs]).mean()
    return FastBertSequenceClassifierOutput(**stacked)


def sample_columns(mask_row):
    """
    (T,) padding mask of one sample (torch or numpy) -> (T,) boolean: the columns it keeps when it runs alone (the
    int8 paths), its real tokens; an all-padding row keeps every column, as the batched engine runs it.
    """
    keep = mask_row != 0
    return keep if keep.any() else keep | True


def last_needed_columns(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) padding mask -> (B,) the 1-based last column each sample needs (0 for an all-zero mask)."""
    return ((mask != 0) * torch.arange(1, mask.shape[1] + 1, device=mask.device)).amax(dim=1)


@dataclass
class FastBertSequenceClassifierOutput(ModelOutput):
    r"""
    Output of [`FastBertForSequenceClassification`].

    Args:
        loss (`torch.FloatTensor` of shape `(1,)`, *optional*, returned when `labels` is provided):
            Cross-entropy of the teacher's logits against the labels (the fine-tuning loss, FastBERT's stage 2).
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
            Logits of the classifier each sample exited at.
        exit_layers (`torch.LongTensor` of shape `(batch_size,)`):
            1-based layer each sample exited at; `num_hidden_layers` for samples answered by the teacher.
        flops (`torch.LongTensor` of shape `(batch_size,)`):
            Matrix-multiply FLOPs inference spent on each sample at its real token length (see `hf_fastbert.flops`).
        all_logits (`torch.FloatTensor` of shape `(batch_size, num_hidden_layers, num_labels)`, *optional*):
            Returned with `output_all_logits=True`: the logits of every classifier, students first (layers 1 .. L-1),
            the teacher last.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            As the stock classifier returns them, when `output_hidden_states=True` (the backbone then runs at full
            depth for them).
        attentions (`tuple(torch.FloatTensor)`, *optional*):
            As the stock classifier returns them, when `output_attentions=True`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    exit_layers: torch.LongTensor | None = None
    flops: torch.LongTensor | None = None
    all_logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


def is_quantized(model: nn.Module) -> bool:
    """Whether `model` holds dynamically quantized (int8) layers, whose `weight` is a method, not a parameter."""
    return any(callable(getattr(module, "weight", None)) for module in model.modules())


def _linear_parameters(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """
    A linear layer's float (weight, bias), also for a dynamically quantized one (`torch.ao` int8), whose frozen
    weights are unpacked and dequantized once and kept on the module.
    """
    if not callable(linear.weight):
        return linear.weight, linear.bias
    if getattr(linear, "_float_parameters", None) is None:
        linear._float_parameters = (linear.weight().dequantize(), linear.bias())
    return linear._float_parameters


class FastBertBranch(nn.Module):
    """
    The paper's classifier: hidden -> width + tanh, multi-head self-attention over the sequence, first token,
    width -> width + tanh, width -> num_labels.

    Only the first token's attention output is used, so only its query is computed, and the key and value projections
    are folded into it instead of being applied to every token: per head, `q . (K x_t + b_k) = (K^T q) . x_t + const`
    (the constant cancels in the softmax) and `sum_t a_t (V x_t + b_v) = V (sum_t a_t x_t) + b_v` (the weights sum to
    1). The result equals full self-attention followed by taking position 0 (within float rounding) with the same
    parameters, and the per-token work is the input projection plus two dot products per head: about half the FLOPs.
    Every step is one batched matrix product over the heads, so a small batch pays for few kernel launches. For
    inference, [`fold`] folds the weights themselves once ([`FoldedFastBertBranch`]).
    """

    # The layers that see one vector per sample (the first token's), not every token: `quantize_int8` keeps them float.
    first_token_layers = ("query", "key", "value", "attention_output", "dense", "classifier")

    def __init__(self, config: FastBertConfigMixin):
        super().__init__()
        width = config.branch_hidden_size
        self.num_heads = config.branch_num_attention_heads
        self.dense_in = nn.Linear(config.hidden_size, width)
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.attention_output = nn.Linear(width, width)
        self.dense = nn.Linear(width, width)
        self.classifier = nn.Linear(width, config.num_labels)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, H) hidden states and (B, T) padding mask -> (B, num_labels) logits."""
        x = torch.tanh(self.dense_in(hidden_states))  # (B, T, W)
        batch_size, _, width = x.shape
        heads, head_size = self.num_heads, width // self.num_heads
        scale = 1.0 / math.sqrt(head_size)
        (query_weight, query_bias), (key_weight, key_bias), (value_weight, value_bias) = (
            _linear_parameters(linear) for linear in (self.query, self.key, self.value)
        )
        query = torch.addmm(query_bias, x[:, 0], query_weight.T, beta=scale, alpha=scale)  # (B, W): q / sqrt(d)
        query = query.view(batch_size, heads, head_size).transpose(0, 1)  # (heads, B, d)
        folded_query = torch.bmm(query, key_weight.view(heads, head_size, width))  # (heads, B, W): K_h^T q_h
        scores = torch.bmm(folded_query.transpose(0, 1), x.transpose(1, 2))  # (B, heads, T)
        if torch.is_grad_enabled():
            # q_h . b_k,h is the same for every token and cancels in the softmax; it is added in training so that every
            # parameter takes part in the graph (DDP without find_unused_parameters).
            key_term = (query * key_bias.view(heads, 1, head_size)).sum(dim=-1).T  # (B, heads)
            scores = scores + key_term[:, :, None]
        pooled = _attention_pool(scores, x, attention_mask)  # (B, heads, W)
        value_weight = value_weight.view(heads, head_size, width).transpose(1, 2)  # (heads, W, d)
        context = torch.bmm(pooled.transpose(0, 1), value_weight).transpose(0, 1)  # (B, heads, d): V_h p_h
        context = self.attention_output(context.reshape(batch_size, width) + value_bias)  # (B, W)
        return self.classifier(torch.tanh(self.dense(context)))  # (B, C)

    def fold(self) -> "FoldedFastBertBranch | FastBertBranch":
        """
        This student for inference, its attention weights folded once ([`FoldedFastBertBranch`]); itself with more
        than 2 heads, where the folded matrices (heads x width x width each) would outgrow the four they replace.
        """
        return FoldedFastBertBranch(self) if self.num_heads <= 2 else self


def _attention_pool(scores: torch.Tensor, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, heads, T) scores of the first token's query, (B, T, W) tokens -> (B, heads, W) softmax-weighted means."""
    if attention_mask is not None:
        scores = scores.masked_fill(attention_mask[:, None, :] == 0, torch.finfo(scores.dtype).min)
    return torch.bmm(scores.softmax(dim=-1), x)


class FoldedFastBertBranch(nn.Module):
    """
    A trained [`FastBertBranch`] for inference: the same function (within float rounding) in fewer kernels, its
    attention's four projections folded into two matrices once, when it is made (`FastBertBranch.fold`,
    [`fold_students`]). Per head h, with `d` the head size, the query and key give
    `A_h = K_h^T Q_h / sqrt(d)` and `a_h = K_h^T b_q,h / sqrt(d)` (scores `x_t . (A_h x_0 + a_h)`), and the value and
    output projections `M_h = O_h V_h` and `m = O b_v + b_o` (output `sum_h M_h p_h + m`, `p_h` the head's weighted
    mean of the tokens). A student call is then 12 operators instead of 16 (10 without padding): at batch 1 the
    operators, not the FLOPs, are its cost.

    Inference only: its parameters are not the checkpoint's, so a model holding it refuses `save_pretrained` and the
    distillation trainer; fold a copy (`fold_students`) and keep the original for those.
    """

    # The layers that see one vector per sample (the first token's), not every token: `quantize_int8` keeps them float.
    first_token_layers = ("query_key", "value_output", "dense", "classifier")

    def __init__(self, branch: FastBertBranch):
        super().__init__()
        self.num_heads = heads = branch.num_heads
        self.dense_in, self.dense, self.classifier = branch.dense_in, branch.dense, branch.classifier
        (query, query_bias), (key, _), (value, value_bias), (output, output_bias) = (
            (weight.double(), bias.double())
            for weight, bias in map(
                _linear_parameters, (branch.query, branch.key, branch.value, branch.attention_output)
            )
        )
        width = query.shape[0]
        head_size = width // heads
        scale = 1.0 / math.sqrt(head_size)
        key = key.view(heads, head_size, width)
        query_key = scale * torch.einsum("hdw,hdv->hwv", key, query.view(heads, head_size, width))  # (heads, W, W)
        query_key_bias = scale * torch.einsum("hdw,hd->hw", key, query_bias.view(heads, head_size))  # (heads, W)
        value_output = torch.einsum(
            "ohd,hdw->ohw", output.view(width, heads, head_size), value.view(heads, head_size, width)
        )
        like = {"device": branch.dense.weight.device, "dtype": branch.dense.weight.dtype}
        self.query_key = nn.Linear(width, heads * width, **like)
        self.value_output = nn.Linear(heads * width, width, **like)
        with torch.no_grad():
            self.query_key.weight.copy_(query_key.reshape(heads * width, width))
            self.query_key.bias.copy_(query_key_bias.reshape(heads * width))
            self.value_output.weight.copy_(value_output.reshape(width, heads * width))  # (W, heads * W)
            self.value_output.bias.copy_(output @ value_bias + output_bias)
        self.train(branch.training)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, H) hidden states and (B, T) padding mask -> (B, num_labels) logits."""
        x = torch.tanh(self.dense_in(hidden_states))  # (B, T, W)
        batch_size = x.shape[0]
        folded_query = self.query_key(x[:, 0]).view(batch_size, self.num_heads, -1)  # (B, heads, W): A_h x_0 + a_h
        pooled = _attention_pool(torch.bmm(folded_query, x.transpose(1, 2)), x, attention_mask)  # (B, heads, W)
        context = self.value_output(pooled.view(batch_size, -1))  # (B, W)
        return self.classifier(torch.tanh(self.dense(context)))  # (B, C)


def check_cpp_compiler():
    """`torch.compile`'s default backend builds C++ for the CPU: a `RuntimeError` naming the compiler it would use when
    that compiler is not installed (raised before compiling, instead of at the first forward pass)."""
    import shutil

    from torch._inductor import config as inductor_config

    names = [name for name in inductor_config.cpp.cxx if name]
    if not any(shutil.which(name) for name in names):
        raise RuntimeError(
            f"torch.compile's inductor backend needs a C++ compiler on the CPU ({', '.join(names)}) and none was "
            "found on PATH: install one (e.g. g++) or compile with backend='eager' / 'aot_eager'"
        )


class EarlyExitEngineMixin:
    """
    The early-exit engine, for every family and every kind of head: the classifier
    ([`FastBertModelMixin`]) and the sentence embedder ([`hf_fastbert.modeling_fastbert_embedding`]) run their layers
    through [`run_with_exits`] and differ only in the head after each layer, the exit decision and the last layer's
    output. The model provides `config`, `backbone` (its family's `backbones.Backbone`) and `exit_flops(seq_lengths,
    exit_layers, heads_ran)`, the FLOPs of a sample of each length exiting at each layer.
    """

    @property
    def backbone(self):
        """This family's declaration (`backbones.Backbone`)."""
        return get_backbone(self.config)

    def check_backbone_loaded(self, source, missing_keys, not_backbone: tuple = ()):
        """A `ValueError` when loading `source` left weights of the backbone (but those under `not_backbone`)
        random: a checkpoint of another architecture."""
        prefix = f"{self.base_model_prefix}."
        missing = sorted(key for key in missing_keys if key.startswith(prefix) and not key.startswith(not_backbone))
        if missing:
            raise ValueError(
                f"{source} lacks {len(missing)} weights of the {self.config.backbone_model_type} backbone "
                f"(e.g. {missing[0]}): they would be random. Is it a checkpoint of another architecture?"
            )

    def check_inputs(
        self, input_ids, inputs_embeds, attention_mask=None, token_type_ids=None, position_ids=None
    ) -> tuple[dict, torch.Tensor]:
        """
        `(inputs, mask)`: the inputs for `backbone.embed` and the (B, T) padding mask (all ones when
        `attention_mask` is None). Exactly one of `input_ids` and `inputs_embeds`, no longer than the position
        embeddings allow, and only the extra inputs (`token_type_ids`, `position_ids`) the family takes; a
        `ValueError` naming the problem otherwise.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        batch_size, seq_length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        max_length = self.backbone.max_length(self.config)
        if max_length is not None and seq_length > max_length:
            raise ValueError(
                f"The input has {seq_length} tokens but this {self.config.backbone_model_type} model accepts at most "
                f"{max_length} (max_position_embeddings): truncate it (tokenizer(..., truncation=True))."
            )
        inputs = {"input_ids": input_ids, "inputs_embeds": inputs_embeds}
        for name, value in (("token_type_ids", token_type_ids), ("position_ids", position_ids)):
            if name in self.backbone.embedding_inputs:
                inputs[name] = value
            elif value is not None:
                raise ValueError(f"{self.config.backbone_model_type} models take no `{name}`; leave it out.")
        if attention_mask is None:
            attention_mask = torch.ones(batch_size, seq_length, dtype=torch.long, device=self.device)
        return inputs, attention_mask

    @classmethod
    def check_config_family(cls, config, models):
        """
        `ValueError` unless `config` is this class's config type; the message names the class of `models` (FastBERT
        config class -> model class, the task's family table) that takes it.
        """
        if getattr(config, "model_type", None) != cls.config_class.model_type:
            raise ValueError(
                f"{cls.__name__} needs a {cls.config_class.__name__}, got a {type(config).__name__}: the FastBERT "
                f"class for it is {models[fastbert_config_class(config.model_type)].__name__}."
            )

    def _sample_flops(self, seq_lengths, exit_layers, branches_ran, seq_length):
        """
        `exit_flops` of each sample, read from a table of every (length, exit layer) pair: two kernels instead of
        a few dozen, which a batch of one pays for. The table is built once per device, `branches_ran` and a size
        covering `seq_length`.
        """
        table = self._flops_table(exit_layers.device, branches_ran, seq_length)  # (size, L)
        return table[seq_lengths.long(), exit_layers.long() - 1]  # (B,)

    def _flops_table(self, device, branches_ran, seq_length) -> torch.Tensor:
        """(size, L) `exit_flops` of every length 0 .. size - 1 (size > seq_length) and exit layer, kept."""
        tables = self.__dict__.setdefault("_flops_tables", {})
        key = (device, bool(branches_ran))
        if key not in tables or tables[key].shape[0] <= seq_length:
            size = 2 ** max(7, math.ceil(math.log2(seq_length + 1)))  # lengths 0 .. size - 1
            lengths = torch.arange(size, device=device)[:, None]  # (size, 1)
            layers = torch.arange(1, self.config.num_hidden_layers + 1, device=device)[None, :]  # (1, L)
            tables[key] = self.exit_flops(lengths, layers, branches_ran)  # (size, L)
        return tables[key]

    @torch.no_grad()
    def head_inputs(
        self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """
        What the heads (the students, or the embedding heads) read, for training them on cached states (backbone and
        final head are frozen during self-distillation, so these never change): `(states, final)`, the (B, T, H)
        inputs of the heads after layers 1 .. L-1 and the (B, D) `final_output` they learn from, computed by the
        engine as inference computes them.
        """
        inputs, attention_mask = self.check_inputs(
            input_ids, inputs_embeds, attention_mask, token_type_ids, position_ids
        )
        states = []

        def record(index, hidden, head_mask):
            states.append(self.backbone.student_input(self, hidden))
            return hidden.new_zeros(hidden.shape[0], 1)

        final = self.run_with_exits(inputs, attention_mask, 1, record, None, self.final_output)[2]
        return states, final

    def run_with_exits(self, inputs, mask, width, head=None, leaves=None, finish=None, collect=False):
        """
        Run the layers with batched per-sample early exit. After each layer but the last, `head` computes its output
        for the samples still running and `leaves` says which of them stop there; they leave the batch (the states,
        the mask, the positions, the exit rule's state and the map back to the caller's batch shrink, trailing padding
        columns that no remaining sample needs are cut, the layers' masks and positions are prepared again) and the
        loop ends once no sample remains. Samples that never leave take `finish` of the last layer.

        Args:
            inputs: input_ids or inputs_embeds, and the family's `embedding_inputs`.
            mask: (B, T) padding mask.
            width: the size D of one sample's output.
            head: `head(index, hidden, head_mask) -> (b, D)` after the 0-based layer `index` (1 .. L - 1); None runs
                no head (full depth). `head_mask` is None when no sample is padded and `collect` is off.
            leaves: `leaves(index, outputs, state) -> (exits, state)`: (b,) bool and what the rule carries to the
                next layer (None, or a tuple of (b, ...) tensors); None: no sample leaves.
            finish: `finish(hidden, mask) -> (b, D)`, the last layer's output.
            collect: also return every head's output.

        Returns:
            `(outputs, exit_layers, final, all_outputs)`: (B, D) output each sample left with, (B,) 1-based exit
            layers, the (b, D) `finish` of the samples that reached the last layer (None when none did), and with
            `collect` the (B, L, D) outputs of every head then `finish` (else None).
        """
        backbone, num_layers = self.backbone, self.config.num_hidden_layers
        hidden = backbone.embed(self, inputs, mask)  # (B, T, H)
        embeddings = hidden  # DeBERTa's convolution after the first layer reads them
        batch_size = hidden.shape[0]
        positions = inputs.get("position_ids")  # (B or 1, T) or None
        rows = torch.arange(batch_size, device=hidden.device)  # (b,) caller's index of each remaining sample
        outputs = hidden.new_empty(batch_size, width)  # (B, D)
        exit_layers = torch.full((batch_size,), num_layers, dtype=torch.long, device=hidden.device)  # (B,)
        head_outputs, final = [], None
        rule_state = None  # what the exit rule carries from layer to layer, per remaining sample
        state = backbone.prepare(self, hidden, mask, positions)
        last_columns = last_needed_columns(mask)  # (b,): trailing columns no staying sample needs are cut
        # Exiting without padding (a batch of one, say), the heads skip their masking: one host sync per forward.
        head_mask = mask if collect or not bool(mask.all()) else None
        for index in range(num_layers):
            hidden = backbone.run_layer(self, index, hidden, state, mask, embeddings)  # (b, t, H)
            if index == num_layers - 1:
                final = finish(hidden, mask)  # (b, D)
                if leaves is None:  # every sample is here, in order
                    outputs = final
                else:
                    outputs[rows] = final.to(outputs.dtype)
                break
            if head is None:
                continue
            values = head(index, hidden, head_mask)  # (b, D)
            if collect:
                head_outputs.append(values)
            if leaves is None:
                continue
            exits, rule_state = leaves(index, values, rule_state)  # (b,)
            # The layer's one host sync: who leaves (-1), and the last column each sample that stays needs.
            needed_columns = torch.where(exits, -1, last_columns).tolist()
            num_exits = needed_columns.count(-1)
            if num_exits == 0:
                continue
            if num_exits == len(needed_columns):  # all leave
                outputs[rows] = values.to(outputs.dtype)
                exit_layers[rows] = index + 1
                break
            order = torch.argsort(exits.to(torch.int8), descending=True, stable=True)  # leavers first, in order
            leave, stay = order[:num_exits], order[num_exits:]
            outputs[rows[leave]] = values[leave].to(outputs.dtype)
            exit_layers[rows[leave]] = index + 1
            used_columns = max(needed_columns) or mask.shape[1]  # all-zero masks staying: keep every column
            rows, hidden, mask = rows[stay], hidden[stay, :used_columns], mask[stay, :used_columns]
            head_mask = None if head_mask is None else mask
            last_columns = last_columns[stay]
            if rule_state is not None:
                rule_state = tuple(value[stay] for value in rule_state)
            if positions is not None:
                positions = positions[stay] if positions.shape[0] > 1 else positions
                positions = positions[:, :used_columns]
            state = backbone.prepare(self, hidden, mask, positions)
        all_outputs = torch.stack(head_outputs + [final], dim=1) if collect else None  # (B, L, D)
        return outputs, exit_layers, final, all_outputs


class FastBertModelMixin(EarlyExitEngineMixin):
    r"""
    FastBERT's adaptive inference (Liu et al., ACL 2020) for a stock `<Family>ForSequenceClassification`: the family's
    model class is `class FastBert<Family>ForSequenceClassification(FastBertModelMixin,
    <Family>ForSequenceClassification)`, and everything family-specific comes from its declaration in `backbones.py`.

    A student classifier ([`FastBertBranch`]) follows every layer but the last; the teacher is the family's own
    classification head on the last layer. In eval mode with `speed > 0`, every sample leaves the batch at the first
    layer whose student is confident enough (normalized entropy below `speed`); the rest of the batch goes on, and
    samples that never qualify take the teacher's prediction. At `speed=0` the model runs the stock classifier.
    """

    _auto_class = "AutoModelForSequenceClassification"
    # Students are new in every checkpoint but a distilled FastBERT one (see `_check_loaded_weights`).
    _keys_to_ignore_on_load_missing = [r"^branches\."]

    def __init__(self, config):
        self.check_config_family(config, FASTBERT_MODELS)
        config.validate_fastbert()
        super().__init__(config)
        if config.teacher_head == "branch":
            for path in self.backbone.stock_head_modules:
                *parents, name = path.split(".")
                owner = self
                for parent in parents:
                    owner = getattr(owner, parent)
                setattr(owner, name, None)
            self.classifier = FastBertBranch(config)
        self.branches = nn.ModuleList(FastBertBranch(config) for _ in range(config.num_hidden_layers - 1))
        self.post_init()  # initializes the new modules only: the stock ones are marked initialized

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """
        [`~PreTrainedModel.from_pretrained`], which also refuses a checkpoint that would leave weights of the backbone
        random, or that claims distilled students (`branches_distilled`) without their weights.
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        model._check_loaded_weights(pretrained_model_name_or_path, info["missing_keys"])
        return (model, info) if output_loading_info else model

    def _adjust_missing_and_unexpected_keys(self, loading_info):
        # Missing students are hidden from the load report (`_keys_to_ignore_on_load_missing`): remember them first.
        self._students_missing = any(key.startswith("branches.") for key in loading_info.missing_keys)
        super()._adjust_missing_and_unexpected_keys(loading_info)

    def _check_loaded_weights(self, source, missing_keys):
        head = tuple(f"{path}." for path in self.backbone.stock_head_modules)  # BERT's pooler is in `bert.`
        self.check_backbone_loaded(source, missing_keys, head)
        if self.config.branches_distilled and getattr(self, "_students_missing", False):
            raise ValueError(
                f"{source} says its students were distilled (branches_distilled=true) but holds no student weights "
                "(branches.*): the checkpoint is incomplete. Pass branches_distilled=False to load its backbone and "
                "teacher with new students, and distill them again."
            )

    @property
    def is_inference_copy(self) -> bool:
        """Whether this model is an inference copy (`fold_students`, `quantize_int8`): it runs, but cannot be saved or
        trained, as a checkpoint holds neither folded students nor int8 weights."""
        return is_quantized(self) or any(isinstance(module, FoldedFastBertBranch) for module in self.modules())

    def save_pretrained(self, save_directory, *args, **kwargs):
        """
        [`~PreTrainedModel.save_pretrained`]; `config.json`'s `auto_map` also maps `AutoModel` to the backbone. An
        inference copy (`is_inference_copy`) raises a `ValueError` before anything is written.
        """
        if self.is_inference_copy:
            raise ValueError(
                f"This {type(self).__name__} is an inference copy (students folded by fold_students, or int8 weights "
                "from quantize_int8), which a checkpoint cannot hold: save the float model it was made from."
            )
        backbone_class = FASTBERT_BACKBONE_MODELS[type(self.config).__name__]
        self.config.auto_map = {
            **(getattr(self.config, "auto_map", None) or {}),
            "AutoModel": f"modeling_fastbert.{backbone_class}",
        }
        return super().save_pretrained(save_directory, *args, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs):
        """
        [`~PreTrainedModel.push_to_hub`] (same arguments), publishing the FastBERT model card
        (`hf_fastbert.modelcard`). Loaded as remote code without the plugin installed: the stock push, without it.
        """
        try:  # not a relative import: the model card is the plugin's, and a checkpoint does not carry its code
            from hf_fastbert.modelcard import push_model_to_hub
        except ImportError:
            return super().push_to_hub(repo_id, **kwargs)
        return push_model_to_hub(self, repo_id, **kwargs)

    def exit_flops(self, seq_lengths, exit_layers, branches_ran):
        """[`fastbert_flops`] of this model: what a sample of each length spent, exiting at each layer."""
        return fastbert_flops(self.config, seq_lengths, exit_layers, branches_ran)

    def uncertainty(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., num_labels) logits -> (...) uncertainty in [0, 1], as configured (`config.uncertainty_top_k`)."""
        return normalized_entropy(logits, self.config.uncertainty_top_k)

    def compile(self, *args, **kwargs):
        """
        `torch.compile` the modules that do the work: each transformer layer, each student and the embeddings
        (`nn.Module.compile` on each, same arguments, `dynamic=True` unless given). The engine's per-layer decisions
        (who leaves, one host sync per layer, trimming the batch) stay in Python, so batch sizes, lengths, speeds and
        exits reuse a handful of graphs shared by all layers. Compiling the whole forward instead
        (`torch.compile(model)`) splits it at every layer's host sync and recompiles per layer index, which passes
        Dynamo's recompile limit on deeper models and falls back to eager mode.

        A layer's graph has a variant per batch of one or more, padded or not, and engine or stock (speed 0) call:
        within Dynamo's default `recompile_limit` (8) for BERT-style layers; ModernBERT's alternating layers and
        ALBERT's shared ones need up to 16 (`torch._dynamo.config.recompile_limit = 16`; past the limit a variant runs
        uncompiled, with the same results). Whether compiling pays on your hardware: `benchmarks/bench_quantized.py
        --compile`.

        Returns:
            The model itself, compiled in place.

        Raises:
            `RuntimeError` naming the missing C++ compiler when the default backend (inductor) would need one on the
            CPU and none is installed (pass `backend="eager"` or install g++).
        """
        if kwargs.get("backend", "inductor") == "inductor" and self.device.type == "cpu":
            check_cpp_compiler()
        kwargs.setdefault("dynamic", True)
        base = self.backbone.base_model(self)
        modules = [*self.backbone.layers(self), *self.branches, getattr(base, "embeddings", None)]
        for module in modules:
            if module is not None:
                module.compile(*args, **kwargs)
        return self

    def calibrate_exit_rules(self, all_logits: torch.Tensor):
        """
        Calibrate the `"thresholds"` rule and fit the `"learned"` rule's heads from the (N, L, C) `all_logits` of a
        validation pass (`model(..., output_all_logits=True)`); both are stored in the config, saved with the model.
        Seconds, no backbone pass. See `hf_fastbert.exit_rules`.
        """
        all_logits = all_logits.detach().float().cpu()
        self.config.exit_thresholds = calibrate_thresholds(all_logits, self.config.uncertainty_top_k)
        self.config.exit_heads = fit_exit_heads(all_logits, self.config.uncertainty_top_k)
        return self

    def teacher_logits(self, last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H) last-layer states and (B, T) mask -> (B, num_labels) teacher logits."""
        if self.config.teacher_head == "branch":
            return self.classifier(self.backbone.student_input(self, last_hidden_state), attention_mask)
        return self.backbone.teacher_logits(self, last_hidden_state, attention_mask)

    final_output = teacher_logits  # the last layer's head, for the engine (`head_inputs`)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        speed: float | None = None,
        output_all_logits: bool = False,
        exit_rule: str | None = None,
        **kwargs,
    ) -> FastBertSequenceClassifierOutput:
        r"""
        token_type_ids, position_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            As the family's stock classifier takes them (DistilBERT and ModernBERT have no token types).
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class indices in `[0, num_labels)`. The loss is the teacher's cross-entropy.
        speed (`float`, *optional*):
            Early-exit threshold in [0, 1] for this call; defaults to `config.speed`. Used in eval mode only: in
            training mode every sample runs at full depth.
        output_all_logits (`bool`, *optional*, defaults to `False`):
            Run every sample through every layer and return the logits of every classifier in `all_logits`. The
            returned `logits` and `exit_layers` are still the ones the exit rule picks at `speed`.
        exit_rule (`str`, *optional*):
            The exit rule for this call (`hf_fastbert.exit_rules`); defaults to `config.exit_rule` (`"entropy"`).
        """
        speed = validate_speed(self.config.speed if speed is None else speed)
        exit_rule = check_exit_rule(self.config, exit_rule)
        inputs, attention_mask = self.check_inputs(
            input_ids, inputs_embeds, attention_mask, token_type_ids, position_ids
        )
        batch_size, seq_length = attention_mask.shape
        if labels is not None:
            self._check_labels(labels)
        if (
            self.__dict__.get("int8_per_sample")
            and batch_size > 1
            and input_ids is not None
            and not (kwargs.get("output_hidden_states") or kwargs.get("output_attentions"))
        ):
            return self._forward_each_sample(inputs, attention_mask, labels, speed, output_all_logits, exit_rule)

        stock_teacher = self.config.teacher_head != "branch"
        exits_at_speed = not self.training and speed > 0
        if stock_teacher and not exits_at_speed and not output_all_logits:
            output, teacher_logits = self._forward_stock(inputs, attention_mask, **kwargs)
        else:
            full_depth = self.training or output_all_logits or labels is not None
            students = exits_at_speed or output_all_logits
            output, teacher_logits = self._forward_layers(
                inputs, attention_mask, speed, full_depth, students, exit_rule
            )
            if not output_all_logits:
                output.all_logits = None
            if kwargs.get("output_hidden_states") or kwargs.get("output_attentions"):
                # The stock backbone's outputs, for every layer: a second, full-depth pass.
                outputs = self.backbone.base_model(self)(**inputs, attention_mask=attention_mask, **kwargs)
                output.hidden_states, output.attentions = outputs.hidden_states, outputs.attentions

        output.flops = self._sample_flops(attention_mask.sum(dim=1), output.exit_layers, speed > 0, seq_length)
        if labels is not None:
            loss = F.cross_entropy(teacher_logits.view(-1, self.num_labels), labels.view(-1))
            output = FastBertSequenceClassifierOutput(loss=loss, **output)
        return output

    def _forward_each_sample(self, inputs, attention_mask, labels, speed, output_all_logits, exit_rule):
        """
        Every sample alone, without its padding, then the outputs stacked: the int8 copies' path (`quantize_int8`,
        `int8_per_sample`). Dynamic quantization scales activations per call, so in one batched call a sample's
        answer would depend on the other samples (and on its own padding); alone, it is the same in any batch.
        """
        outputs = []
        for row in range(attention_mask.shape[0]):
            keep = sample_columns(attention_mask[row])
            sample = {name: None if value is None else value[row : row + 1, keep] for name, value in inputs.items()}
            outputs.append(
                self(
                    **sample,
                    attention_mask=attention_mask[row : row + 1, keep],
                    labels=None if labels is None else labels[row : row + 1],
                    speed=speed,
                    output_all_logits=output_all_logits,
                    exit_rule=exit_rule,
                )
            )
        return stack_sample_outputs(outputs)

    def _check_labels(self, labels: torch.Tensor):
        if labels.is_floating_point():
            raise ValueError(
                "FastBERT supports single-label classification only: labels must be integer class indices, "
                f"got dtype {labels.dtype}."
            )
        if ((labels < 0) | (labels >= self.num_labels)).any():
            raise ValueError(
                f"labels must be in [0, {self.num_labels}) (num_labels={self.num_labels}); got values "
                f"{sorted(set(labels.flatten().tolist()))[:10]}."
            )

    def _forward_stock(self, inputs, attention_mask, **kwargs):
        """The stock classifier (speed 0, or training the teacher): its logits, hidden states and attentions."""
        inputs = {name: value for name, value in inputs.items() if value is not None}
        stock = super().forward(attention_mask=attention_mask, return_dict=True, **inputs, **kwargs)
        exit_layers = torch.full((stock.logits.shape[0],), self.config.num_hidden_layers, device=stock.logits.device)
        output = FastBertSequenceClassifierOutput(
            logits=stock.logits,
            exit_layers=exit_layers,
            hidden_states=stock.hidden_states,
            attentions=stock.attentions,
        )
        return output, stock.logits

    def _forward_layers(self, inputs, mask, speed, full_depth, students, exit_rule):
        """
        The classifier on the engine ([`EarlyExitEngineMixin.run_with_exits`]). With `full_depth`, every sample runs
        every layer and every classifier (training, `output_all_logits`, labels at a speed); the exit rule then picks
        from `all_logits`, and `students` says whether the students run at all. Otherwise batched per-sample early
        exit, each sample leaving at the first student that `exits_at_layer` lets out. Returns the output and the
        (b, C) teacher logits (None when every sample exited early).
        """

        def student(index, hidden, student_mask):
            return self.branches[index](self.backbone.student_input(self, hidden), student_mask)  # (b, C)

        def leaves(index, logits, state):
            return exits_at_layer(self.config, speed, index, logits, state, exit_rule)

        logits, exit_layers, teacher_logits, all_logits = self.run_with_exits(
            inputs,
            mask,
            self.num_labels,
            student if students else None,
            None if full_depth else leaves,
            self.teacher_logits,
            collect=full_depth and students,
        )
        if not full_depth or not students:
            return FastBertSequenceClassifierOutput(logits=logits, exit_layers=exit_layers), teacher_logits
        if not self.training and speed > 0:
            logits, exit_layers = select_exits(all_logits, speed, self.config, exit_rule)  # (B, C), (B,)
        output = FastBertSequenceClassifierOutput(logits=logits, exit_layers=exit_layers, all_logits=all_logits)
        return output, teacher_logits


class FastBertForSequenceClassification(FastBertModelMixin, BertForSequenceClassification):
    r"""
    FastBERT on BERT, and the entry point for every family: `FastBertForSequenceClassification.from_pretrained`
    accepts a checkpoint of any supported family (base encoder, masked LM or fine-tuned
    `<Family>ForSequenceClassification`, stock or FastBERT) and returns the FastBERT model of that family (e.g. a
    [`FastBertRobertaForSequenceClassification`]). A checkpoint of another family raises a `ValueError` that lists
    the supported ones, before any weight is read.

    Example:

    ```python
    >>> from transformers import AutoTokenizer
    >>> from hf_fastbert import FastBertForSequenceClassification

    >>> tokenizer = AutoTokenizer.from_pretrained("bert-base-uncased")
    >>> model = FastBertForSequenceClassification.from_pretrained("bert-base-uncased", num_labels=2).eval()
    >>> inputs = tokenizer(["a gem", "not my cup of tea"], padding=True, return_tensors="pt")
    >>> model(**inputs, speed=0.3).exit_layers
    ```"""

    config_class = FastBertConfig
    _keys_to_ignore_on_load_unexpected = [r"^cls\."]  # pre-training heads

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        if cls is FastBertForSequenceClassification:
            family_class = fastbert_model_class(pretrained_model_name_or_path, **kwargs)
            if family_class is not cls:
                return family_class.from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)


class FastBertRobertaForSequenceClassification(FastBertModelMixin, RobertaForSequenceClassification):
    """FastBERT on RoBERTa: [`RobertaForSequenceClassification`] with students and early exit."""

    config_class = FastBertRobertaConfig
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]


class FastBertXLMRobertaForSequenceClassification(FastBertModelMixin, XLMRobertaForSequenceClassification):
    """FastBERT on XLM-RoBERTa: [`XLMRobertaForSequenceClassification`] with students and early exit."""

    config_class = FastBertXLMRobertaConfig
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]


class FastBertElectraForSequenceClassification(FastBertModelMixin, ElectraForSequenceClassification):
    """FastBERT on ELECTRA: [`ElectraForSequenceClassification`] with students and early exit."""

    config_class = FastBertElectraConfig
    _keys_to_ignore_on_load_unexpected = [r"^discriminator_predictions\.", r"^generator_"]


class FastBertDistilBertForSequenceClassification(FastBertModelMixin, DistilBertForSequenceClassification):
    """FastBERT on DistilBERT: [`DistilBertForSequenceClassification`] with students and early exit."""

    config_class = FastBertDistilBertConfig
    _keys_to_ignore_on_load_unexpected = [r"^vocab_(transform|layer_norm|projector)\."]


class FastBertAlbertForSequenceClassification(FastBertModelMixin, AlbertForSequenceClassification):
    """FastBERT on ALBERT: [`AlbertForSequenceClassification`] with students and early exit."""

    config_class = FastBertAlbertConfig
    _keys_to_ignore_on_load_unexpected = [r"^predictions\.", r"^sop_classifier\."]


class FastBertDebertaV2ForSequenceClassification(FastBertModelMixin, DebertaV2ForSequenceClassification):
    """FastBERT on DeBERTa-v2 and -v3: [`DebertaV2ForSequenceClassification`] with students and early exit."""

    config_class = FastBertDebertaV2Config
    _keys_to_ignore_on_load_unexpected = [r"^lm_predictions\.", r"^mask_predictions\.", r"^cls\."]


class FastBertModernBertForSequenceClassification(FastBertModelMixin, ModernBertForSequenceClassification):
    """FastBERT on ModernBERT: [`ModernBertForSequenceClassification`] with students and early exit."""

    config_class = FastBertModernBertConfig
    _keys_to_ignore_on_load_unexpected = [r"^decoder\."]


# `AutoModel` of a FastBERT checkpoint gives its backbone, as it does for stock classifiers: the family's base model
# (hidden states, no exits), its weights read from the checkpoint's backbone. `AutoModelForSequenceClassification`
# gives the FastBERT model.


class FastBertModel(BertModel):
    """The BERT backbone of a FastBERT checkpoint (what `AutoModel` loads)."""

    config_class = FastBertConfig


class FastBertRobertaModel(RobertaModel):
    """The RoBERTa backbone of a FastBERT checkpoint (what `AutoModel` loads)."""

    config_class = FastBertRobertaConfig


class FastBertXLMRobertaModel(XLMRobertaModel):
    """The XLM-RoBERTa backbone of a FastBERT checkpoint (what `AutoModel` loads)."""

    config_class = FastBertXLMRobertaConfig


class FastBertElectraModel(ElectraModel):
    """The ELECTRA backbone of a FastBERT checkpoint (what `AutoModel` loads)."""

    config_class = FastBertElectraConfig


class FastBertDistilBertModel(DistilBertModel):
    """The DistilBERT backbone of a FastBERT checkpoint (what `AutoModel` loads)."""

    config_class = FastBertDistilBertConfig


class FastBertAlbertModel(AlbertModel):
    """The ALBERT backbone of a FastBERT checkpoint (what `AutoModel` loads)."""

    config_class = FastBertAlbertConfig


class FastBertDebertaV2Model(DebertaV2Model):
    """The DeBERTa-v2 backbone of a FastBERT checkpoint (what `AutoModel` loads)."""

    config_class = FastBertDebertaV2Config


class FastBertModernBertModel(ModernBertModel):
    """The ModernBERT backbone of a FastBERT checkpoint (what `AutoModel` loads)."""

    config_class = FastBertModernBertConfig


FASTBERT_BASE_MODELS = {
    model_class.config_class: model_class
    for model_class in (
        FastBertModel,
        FastBertRobertaModel,
        FastBertXLMRobertaModel,
        FastBertElectraModel,
        FastBertDistilBertModel,
        FastBertAlbertModel,
        FastBertDebertaV2Model,
        FastBertModernBertModel,
    )
}
# Config class name -> backbone class name, for `auto_map` (names: remote code has its own copies of the classes).
FASTBERT_BACKBONE_MODELS = {config.__name__: model.__name__ for config, model in FASTBERT_BASE_MODELS.items()}

# FastBERT config class -> FastBERT model class, for every supported family.
FASTBERT_MODELS = {
    model_class.config_class: model_class
    for model_class in (
        FastBertForSequenceClassification,
        FastBertRobertaForSequenceClassification,
        FastBertXLMRobertaForSequenceClassification,
        FastBertElectraForSequenceClassification,
        FastBertDistilBertForSequenceClassification,
        FastBertAlbertForSequenceClassification,
        FastBertDebertaV2ForSequenceClassification,
        FastBertModernBertForSequenceClassification,
    )
}

_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


def fold_students(model: FastBertModelMixin) -> FastBertModelMixin:
    """
    An inference copy of a FastBERT model (eval mode) whose students, and the teacher when it is a student-shaped head
    (`teacher_head="branch"`), are folded ([`FoldedFastBertBranch`]; students of more than 2 heads are left as they
    are, `FastBertBranch.fold`): the same answers within float rounding, each student in 12 operators instead of 16
    (what a batch of one pays for). The original model is left untouched; the copy cannot be saved or distilled
    (`is_inference_copy`). `quantize_int8` folds too.

    Example:

    ```python
    >>> from hf_fastbert import FastBertForSequenceClassification, fold_students

    >>> model = fold_students(FastBertForSequenceClassification.from_pretrained("path/to/fastbert"))
    >>> model(**inputs, speed=0.5).exit_layers
    ```"""
    if not isinstance(model, FastBertModelMixin):
        raise ValueError(f"fold_students takes a FastBERT model, got {type(model).__name__}.")
    folded = copy.deepcopy(model).eval()
    folded.branches = nn.ModuleList(branch.fold() for branch in folded.branches)
    if isinstance(folded.classifier, FastBertBranch):
        folded.classifier = folded.classifier.fold()
    return folded


def hub_kwargs(kwargs: dict) -> dict:
    """The Hub arguments (revision, token, cache ...) among `from_pretrained`'s keyword arguments."""
    return {name: kwargs[name] for name in _HUB_KWARGS if name in kwargs}


def fastbert_model_class(pretrained_model_name_or_path, models=FASTBERT_MODELS, **kwargs):
    """
    The FastBERT model class for a checkpoint (a stock or FastBERT one of any supported family), read from its
    config (or from `config=` when given) before any weight is loaded: the value of `models` (FastBERT config class
    -> model class; the classifiers by default) for its family. `ValueError` for an unsupported family.
    """
    config = kwargs.get("config")
    if isinstance(config, PreTrainedConfig):
        model_type = config.model_type
    else:
        config_dict, _ = PreTrainedConfig.get_config_dict(pretrained_model_name_or_path, **hub_kwargs(kwargs))
        model_type = config_dict.get("model_type")
    return models[fastbert_config_class(model_type)]


__all__ = [
    "EarlyExitEngineMixin",
    "FASTBERT_BASE_MODELS",
    "FASTBERT_MODELS",
    "FastBertAlbertModel",
    "FastBertDebertaV2Model",
    "FastBertDistilBertModel",
    "FastBertElectraModel",
    "FastBertModel",
    "FastBertModernBertModel",
    "FastBertRobertaModel",
    "FastBertXLMRobertaModel",
    "FastBertAlbertForSequenceClassification",
    "FastBertBranch",
    "FastBertDebertaV2ForSequenceClassification",
    "FastBertDistilBertForSequenceClassification",
    "FastBertElectraForSequenceClassification",
    "FastBertForSequenceClassification",
    "FastBertModelMixin",
    "FastBertModernBertForSequenceClassification",
    "FastBertRobertaForSequenceClassification",
    "FastBertSequenceClassifierOutput",
    "FastBertXLMRobertaForSequenceClassification",
    "FoldedFastBertBranch",
    "fastbert_model_class",
    "first_confident_layer",
    "fold_students",
    "normalized_entropy",
    "select_exits",
]

"""FastBERT: a BERT classifier with a student classifier after every layer and per-sample early exit."""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import ModelOutput
from transformers.models.bert.modeling_bert import BertModel, BertPreTrainedModel
from transformers.utils.generic import can_return_tuple

from .configuration_fastbert import FastBertConfig, validate_speed
from .flops import fastbert_flops


def normalized_entropy(logits: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
    """
    The paper's uncertainty: entropy of softmax(logits) divided by log(num_labels), in [0, 1].

    Args:
        logits: (..., C) classifier logits.
        top_k: when set and smaller than C, the entropy of the `top_k` largest probabilities renormalized, divided by
            log(top_k). Keeps the measure useful with many labels, where the full entropy stays close to 1.

    Returns:
        (...) float32 tensor.
    """
    num_labels = logits.shape[-1]
    if top_k is not None and top_k < num_labels:
        logits = logits.topk(top_k, dim=-1).values
        num_labels = top_k
    log_probs = logits.float().log_softmax(dim=-1)
    probs = log_probs.exp()
    entropy = -torch.where(probs > 0, probs * log_probs, 0.0).sum(dim=-1)
    return (entropy / math.log(num_labels)).clamp(0.0, 1.0)


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


def select_exits(all_logits: torch.Tensor, speed: float, top_k: int | None = None):
    """
    What early-exit inference at `speed` answers for each sample, from every classifier's logits.

    Args:
        all_logits: (B, L, C) logits of the students (layers 1 .. L-1), then the teacher.
        speed: threshold in [0, 1].
        top_k: `config.uncertainty_top_k`.

    Returns:
        `(logits, exit_layers)`: (B, C) logits of the classifier each sample exits at and (B,) 1-based exit layers.
    """
    exit_layers = first_confident_layer(normalized_entropy(all_logits[:, :-1], top_k), speed)  # (B,)
    rows = torch.arange(all_logits.shape[0], device=all_logits.device)
    return all_logits[rows, exit_layers - 1], exit_layers  # (B, C), (B,)


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
            As in BERT, when `output_hidden_states=True` and the model runs at full depth.
        attentions (`tuple(torch.FloatTensor)`, *optional*):
            As in BERT, when `output_attentions=True` and the model runs at full depth.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    exit_layers: torch.LongTensor | None = None
    flops: torch.LongTensor | None = None
    all_logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class FastBertBranch(nn.Module):
    """
    The paper's classifier: hidden -> width + tanh, multi-head self-attention over the sequence, first token,
    width -> width + tanh, width -> num_labels. Only the first token's attention output is used, so only its query is
    computed: the result is the same as full self-attention followed by taking position 0.
    """

    def __init__(self, config: FastBertConfig):
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
        batch_size, seq_length, _ = hidden_states.shape
        x = torch.tanh(self.dense_in(hidden_states))  # (B, T, W)
        heads = (batch_size, -1, self.num_heads, x.shape[-1] // self.num_heads)
        query = self.query(x[:, :1]).view(heads).transpose(1, 2)  # (B, heads, 1, W / heads)
        key = self.key(x).view(heads).transpose(1, 2)  # (B, heads, T, W / heads)
        value = self.value(x).view(heads).transpose(1, 2)  # (B, heads, T, W / heads)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)  # (B, heads, 1, W / heads)
        context = self.attention_output(context.reshape(batch_size, -1))  # (B, W)
        return self.classifier(torch.tanh(self.dense(context)))  # (B, C)


class FastBertForSequenceClassification(BertPreTrainedModel):
    r"""
    BERT for sequence classification with FastBERT's adaptive inference (Liu et al., ACL 2020).

    A student classifier ([`FastBertBranch`]) follows every layer but the last; the teacher is BERT's own
    classification head on the last layer. In eval mode with `speed > 0`, every sample leaves the batch at the first
    layer whose student is confident enough (normalized entropy below `speed`); the rest of the batch goes on, and
    samples that never qualify take the teacher's prediction. At `speed=0` this is exactly
    [`BertForSequenceClassification`].

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
    _auto_class = "AutoModelForSequenceClassification"
    # Students are new in every checkpoint but a distilled FastBERT one; pre-training heads are not used.
    _keys_to_ignore_on_load_missing = [r"^branches\."]
    _keys_to_ignore_on_load_unexpected = [r"^cls\."]

    def __init__(self, config: FastBertConfig):
        super().__init__(config)
        config.validate_fastbert()
        self.num_labels = config.num_labels
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=config.teacher_head == "bert")
        if config.teacher_head == "bert":
            dropout = config.classifier_dropout
            self.dropout = nn.Dropout(config.hidden_dropout_prob if dropout is None else dropout)
            self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        else:
            self.classifier = FastBertBranch(config)
        self.branches = nn.ModuleList(FastBertBranch(config) for _ in range(config.num_hidden_layers - 1))
        self.post_init()

    def teacher_logits(self, last_hidden_state: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T, H) last-layer hidden states -> (B, num_labels) teacher logits."""
        if self.config.teacher_head == "bert":
            return self.classifier(self.dropout(self.bert.pooler(last_hidden_state)))
        return self.classifier(last_hidden_state, attention_mask)

    def push_to_hub(self, repo_id: str, **kwargs):
        """[`~PreTrainedModel.push_to_hub`] (same arguments), publishing the FastBERT model card (`modelcard.py`)."""
        from .modelcard import push_model_to_hub

        return push_model_to_hub(self, repo_id, **kwargs)

    def uncertainty(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., num_labels) logits -> (...) uncertainty in [0, 1], as configured (`config.uncertainty_top_k`)."""
        return normalized_entropy(logits, self.config.uncertainty_top_k)

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
        **kwargs,
    ) -> FastBertSequenceClassifierOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class indices in `[0, num_labels)`. The loss is the teacher's cross-entropy.
        speed (`float`, *optional*):
            Early-exit threshold in [0, 1] for this call; defaults to `config.speed`. Used in eval mode only: in
            training mode every sample runs at full depth.
        output_all_logits (`bool`, *optional*, defaults to `False`):
            Run every sample through every layer and return the logits of every classifier in `all_logits`. The
            returned `logits` and `exit_layers` are still the ones the exit rule picks at `speed`.
        """
        speed = self.config.speed if speed is None else speed
        validate_speed(speed)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        batch_size, seq_length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if seq_length > self.config.max_position_embeddings:
            raise ValueError(
                f"The input has {seq_length} tokens but the model accepts at most max_position_embeddings="
                f"{self.config.max_position_embeddings}: truncate it (tokenizer(..., truncation=True))."
            )
        if labels is not None:
            self._check_labels(labels)
        inputs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
        )
        full_depth_outputs = kwargs.get("output_hidden_states") or kwargs.get("output_attentions")
        if self.training or output_all_logits or speed == 0 or labels is not None or full_depth_outputs:
            output, teacher_logits = self._forward_full_depth(inputs, speed, output_all_logits, **kwargs)
        else:
            output = self._forward_early_exit(inputs, speed)

        if attention_mask is None:
            seq_lengths = torch.full((batch_size,), seq_length, device=output.logits.device)
        else:
            seq_lengths = attention_mask.sum(dim=1)
        output.flops = fastbert_flops(self.config, seq_lengths, output.exit_layers, branches_ran=speed > 0)
        if labels is not None:
            loss = F.cross_entropy(teacher_logits.view(-1, self.num_labels), labels.view(-1))
            output = FastBertSequenceClassifierOutput(loss=loss, **output)
        return output

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

    def _forward_full_depth(self, inputs, speed, output_all_logits, **kwargs):
        """
        Every sample through every layer: training, speed 0, `output_all_logits=True`, evaluation with labels (the
        loss needs the teacher) and `output_hidden_states`/`output_attentions` (BERT's outputs, for every layer). Out
        of training, `logits` and `exit_layers` follow the exit rule at `speed`. Returns the output and the (B, C)
        teacher logits.
        """
        exits_at_speed = not self.training and speed > 0
        output_hidden_states = kwargs.pop("output_hidden_states", False)
        outputs = self.bert(
            **inputs,
            output_hidden_states=output_all_logits or exits_at_speed or output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        teacher_logits = self.teacher_logits(outputs.last_hidden_state, inputs["attention_mask"])  # (B, C)
        batch_size = teacher_logits.shape[0]
        logits = teacher_logits
        exit_layers = torch.full((batch_size,), self.config.num_hidden_layers, device=logits.device)  # (B,)
        all_logits = None
        if output_all_logits or exits_at_speed:
            student_logits = [
                branch(hidden, inputs["attention_mask"])
                for branch, hidden in zip(self.branches, outputs.hidden_states[1:-1], strict=True)
            ]
            all_logits = torch.stack(student_logits + [teacher_logits], dim=1)  # (B, L, C)
        if exits_at_speed:
            logits, exit_layers = select_exits(all_logits, speed, self.config.uncertainty_top_k)  # (B, C), (B,)
        output = FastBertSequenceClassifierOutput(
            logits=logits,
            exit_layers=exit_layers,
            all_logits=all_logits if output_all_logits else None,
            hidden_states=outputs.hidden_states if output_hidden_states else None,
            attentions=outputs.attentions,
        )
        return output, teacher_logits

    def _forward_early_exit(self, inputs, speed) -> FastBertSequenceClassifierOutput:
        """
        Batched per-sample early exit. After each layer the samples whose student is confident leave the batch: the
        hidden states, the mask and the map back to the caller's batch shrink, trailing padding columns that no
        remaining sample needs are cut, and the loop ends once no sample remains.
        """
        hidden = self.bert.embeddings(
            input_ids=inputs["input_ids"],
            token_type_ids=inputs["token_type_ids"],
            position_ids=inputs["position_ids"],
            inputs_embeds=inputs["inputs_embeds"],
        )  # (B, T, H)
        batch_size, seq_length = hidden.shape[:2]
        mask = inputs["attention_mask"]
        if mask is None:
            mask = torch.ones(batch_size, seq_length, dtype=torch.long, device=hidden.device)
        rows = torch.arange(batch_size, device=hidden.device)  # (b,) caller's index of each remaining sample
        num_layers = self.config.num_hidden_layers
        logits = hidden.new_empty(batch_size, self.num_labels)  # (B, C)
        exit_layers = torch.full((batch_size,), num_layers, dtype=torch.long, device=hidden.device)  # (B,)

        layer_mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=mask)
        for index, layer in enumerate(self.bert.encoder.layer):
            hidden = layer(hidden, layer_mask)  # (b, t, H)
            if index == num_layers - 1:
                logits[rows] = self.teacher_logits(hidden, mask).to(logits.dtype)
                break
            student_logits = self.branches[index](hidden, mask)  # (b, C)
            exits = self.uncertainty(student_logits) < speed  # (b,)
            if not exits.any():
                continue
            logits[rows[exits]] = student_logits[exits].to(logits.dtype)
            exit_layers[rows[exits]] = index + 1
            stay = ~exits
            if not stay.any():
                break
            rows, hidden, mask = rows[stay], hidden[stay], mask[stay]
            used_columns = int(mask.any(dim=0).nonzero().max()) + 1 if mask.any() else mask.shape[1]
            hidden, mask = hidden[:, :used_columns], mask[:, :used_columns]
            layer_mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=mask)
        return FastBertSequenceClassifierOutput(logits=logits, exit_layers=exit_layers)


__all__ = [
    "FastBertBranch",
    "FastBertForSequenceClassification",
    "FastBertSequenceClassifierOutput",
    "first_confident_layer",
    "normalized_entropy",
    "select_exits",
]

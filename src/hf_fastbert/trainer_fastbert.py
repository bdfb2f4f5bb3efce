"""FastBERT's self-distillation stage as a `Trainer`: the students learn the frozen teacher's soft labels.

Stage 2 (fine-tuning backbone + teacher) needs nothing special: the stock `Trainer` on a
`FastBertForSequenceClassification` with labels minimizes the teacher's cross-entropy. Stage 3 is
[`FastBertDistillationTrainer`].
"""

import contextlib
import inspect
import logging
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from .cached_states import MAX_CACHE_BYTES, CachedHeadInputs, cache_bytes, cache_head_inputs, collate_head_inputs
from .convergence import ConvergenceCallback, describe_convergence, split_held_out
from .distillation import branch_kl, distillation_loss
from .evaluation import flatten_speed_metrics, metrics_at_speeds
from .modeling_fastbert import FastBertModelMixin, FastBertSequenceClassifierOutput, normalized_entropy
from .training_args_fastbert import (
    DISTILL_MIN_IMPROVEMENT,
    DISTILL_PATIENCE,
    HELD_OUT_FRACTION,
    validate_temperature,
)


logger = logging.getLogger(__name__)

# Mean normalized entropy of the teacher above which it looks like it was never fine-tuned (near-uniform outputs).
UNTRAINED_TEACHER_ENTROPY = 0.9


def converge_on_held_out(args, trainer_kwargs: dict, description: str) -> ConvergenceCallback | None:
    """
    Set up a distillation trainer to train until its held-out loss converges, as `args` ask (their
    `convergence_patience`, `convergence_min_improvement` and `held_out_fraction`, or the defaults with plain
    `TrainingArguments`): without an `eval_dataset`, a seeded slice of `train_dataset` is held out (`trainer_kwargs`
    are the Trainer's keyword arguments, updated in place). Returns the [`ConvergenceCallback`] added to the
    callbacks, or `None` for a fixed number of epochs (`convergence_patience=None`) or without data to hold out.
    """
    patience = getattr(args, "convergence_patience", DISTILL_PATIENCE) if args is not None else DISTILL_PATIENCE
    if patience is None:
        return None
    if trainer_kwargs.get("eval_dataset") is None and trainer_kwargs.get("train_dataset") is not None:
        fraction = (getattr(args, "held_out_fraction", None) if args is not None else None) or HELD_OUT_FRACTION
        dataset, seed = trainer_kwargs["train_dataset"], getattr(args, "seed", 42)
        if hasattr(dataset, "select"):
            train, held_out = split_held_out(dataset, fraction, seed=seed)
            trainer_kwargs["train_dataset"], trainer_kwargs["eval_dataset"] = train, held_out
        else:  # a sized torch dataset
            from torch.utils.data import Subset

            train_indices, held_out_indices = split_held_out(range(len(dataset)), fraction, seed=seed)
            trainer_kwargs["train_dataset"] = Subset(dataset, train_indices)
            trainer_kwargs["eval_dataset"] = Subset(dataset, held_out_indices)
    if trainer_kwargs.get("eval_dataset") is None:
        return None
    improvement = getattr(args, "convergence_min_improvement", DISTILL_MIN_IMPROVEMENT)
    callback = ConvergenceCallback(
        "eval_loss",
        patience=patience,
        min_relative_improvement=improvement if args is not None else DISTILL_MIN_IMPROVEMENT,
        description=description,
    )
    trainer_kwargs["callbacks"] = [*(trainer_kwargs.get("callbacks") or []), callback]
    return callback


class _MarkDistilledAtLastStep(TrainerCallback):
    """Sets `config.branches_distilled` at the last training step, before that step's checkpoint is saved."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None and state.max_steps > 0 and state.global_step >= state.max_steps:
            model.config.branches_distilled = True


class FastBertDistillationTrainer(Trainer):
    r"""
    FastBERT's self-distillation (stage 3): backbone and teacher are frozen, each student classifier learns the
    teacher's soft labels with KL(teacher || student) summed over the students ([`distillation_loss`]).

    - Frozen: every parameter but `model.branches` gets `requires_grad=False` at construction, so the optimizer
      never sees them (they stay bit-for-bit unchanged) and no autograd graph is built through the backbone: only the
      students' own layers are differentiated. The frozen modules also run in eval mode (no dropout), so the
      students learn from the same hidden states and teacher outputs they will see at inference.
    - Labels are not needed and, when present, not used by the loss (the paper has no label term): any unlabeled
      in-domain text works. In `evaluate()` labels, when present, give accuracy, mean exit layer and FLOPs speed-up
      at `args.eval_speeds` (or whatever `compute_metrics` reports, e.g. [`FastBertMetrics`]).
    - `evaluate()` reports `eval_loss` (the distillation loss) and `eval_kl_branch_{layer}` per student; training
      logs report `kl_branch_{layer}` next to `loss`.
    - Converges by default: it distills until the students' held-out KL to the teacher (`eval_loss`, summed over the
      students) has not improved by `args.convergence_min_improvement` (1%) for `args.convergence_patience` (2)
      evaluations, at every epoch's end (and every 500 steps in long epochs), then restores the students of the best
      evaluation; `args.num_train_epochs` is the budget. The held-out data is `eval_dataset`, or else a seeded slice
      of `train_dataset` (`args.held_out_fraction`, at most 2,000 samples), removed from training; labels are not
      needed. [`convergence`] says how it stopped (also logged, and written into the model card). With plain
      [`TrainingArguments`] the same defaults apply; `convergence_patience=None` trains exactly `num_train_epochs`.
    - Cached states (`args.cache_states`, on by default): `train()` runs the frozen backbone and teacher once over
      the training and evaluation data ([`cache_head_inputs`], float16, in memory) and the students train on those
      states, so an epoch costs the students alone. Without room (8 GiB), with several processes or with
      `train_sampling_strategy="batch_rebalance"`, the backbone runs every step instead.
    - Multi-process (DDP): only the students train and all of them get gradients, so `ddp_find_unused_parameters`
      is set to `False` when left unset.
    - `model.config.branches_distilled` is `False` while the students train and becomes `True` only once `train()`
      completes (set at the last step, so the final checkpoint carries it): the checkpoints of an interrupted run
      do not claim distilled students, and resuming from one sets it when the run completes.

    Works with plain [`TrainingArguments`] and with [`FastBertTrainingArguments`] (temperature, eval speeds). The
    paper's setting (learning rate 2e-4, 5 epochs) was sized for BERT-base on large data; the defaults of
    [`FastBertTrainingArguments`] (learning rate 1e-3, until convergence) were chosen by measurement.

    Args:
        model ([`FastBertForSequenceClassification`]):
            A model whose backbone and teacher were fine-tuned (stage 2). Anything else raises a `ValueError`.
        args, train_dataset, eval_dataset, processing_class, data_collator, callbacks, ...:
            As in [`Trainer`]. Datasets hold `input_ids` (`attention_mask`, `token_type_ids`), with or without
            `labels`.

    Example:

    ```python
    >>> from hf_fastbert import FastBertDistillationTrainer, FastBertTrainingArguments

    >>> args = FastBertTrainingArguments("out/distill")  # until the held-out KL stops improving
    >>> trainer = FastBertDistillationTrainer(
    ...     model=fine_tuned_model, args=args, train_dataset=unlabeled, processing_class=tokenizer
    ... )
    >>> trainer.train()
    >>> trainer.convergence["stopped"]  # "converged", or "budget" when num_train_epochs ran out first
    >>> trainer.save_model()  # config.branches_distilled is now True
    ```"""

    def __init__(self, model=None, args=None, *trainer_args, **kwargs):
        # Positional arguments after `args` by name, as the Trainer's signature orders them.
        names = list(inspect.signature(Trainer.__init__).parameters)[3:]
        kwargs.update(zip(names, trainer_args, strict=False))
        if not isinstance(model, FastBertModelMixin):
            raise ValueError(
                "FastBertDistillationTrainer distills the students of a FastBERT model: `model` must be a "
                "FastBertForSequenceClassification (or the FastBERT class of another family, fine-tuned first), got "
                f"{type(model).__name__}."
            )
        if model.is_inference_copy:
            raise ValueError(
                "FastBertDistillationTrainer needs the float model with its students' own weights, but this is an "
                "inference copy (int8 weights from quantize_int8, or students folded by fold_students): distill the "
                "float model, then make the copy."
            )
        if kwargs.get("model_init") is not None:
            raise ValueError("FastBertDistillationTrainer does not support `model_init`: pass the fine-tuned model.")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                "FastBertDistillationTrainer computes the distillation loss itself: drop compute_loss_func."
            )
        if args is not None and args.push_to_hub and args.hub_strategy != "end":
            strategy = getattr(args.hub_strategy, "value", args.hub_strategy)
            raise ValueError(
                f"hub_strategy={strategy!r} pushes whole training folders (training_args.bin, a pickle, and "
                "checkpoints) during training: use hub_strategy='end', which pushes exactly the model's files."
            )
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for parameter in model.branches.parameters():
            parameter.requires_grad_(True)
        if args is not None and args.ddp_find_unused_parameters is None:
            # Every trainable parameter (the students) gets a gradient: DDP need not search for unused ones. Read
            # when the Trainer builds its Accelerator, so it is set before.
            args.ddp_find_unused_parameters = False
        self.convergence_callback = converge_on_held_out(args, kwargs, "self-distillation")
        super().__init__(model, args, **kwargs)
        # The loss is a per-batch mean computed here, not by the model: the Trainer scales it for accumulation.
        self.model_accepts_loss_kwargs = False
        self.temperature = getattr(self.args, "distillation_temperature", 1.0)
        validate_temperature(self.temperature)
        self.eval_speeds = list(getattr(self.args, "eval_speeds", [0.0, 0.1, 0.5]))
        self.speed_results = None  # list of dicts from the last labelled evaluation, for the model card
        self.speed_results_samples = None  # how many samples they were measured on
        self.speed_results_data = None  # and which data, in words, when known (the card says so)
        self.training_notes = None  # how the model was trained, for the card; default: how distillation stopped
        self._kl_sum = None
        self._kl_steps = 0
        self._teacher_checked = False
        self.add_callback(_MarkDistilledAtLastStep())

    @property
    def convergence(self) -> dict | None:
        """How the last `train()` stopped ([`ConvergenceCallback.summary`]); `None` for a fixed number of epochs."""
        return None if self.convergence_callback is None else self.convergence_callback.summary()

    def _frozen_modules_eval(self, model):
        """Put every module but the students in eval mode (no dropout in the frozen backbone and teacher)."""
        unwrapped = self.accelerator.unwrap_model(model)
        for module in unwrapped.children():
            if module is not unwrapped.branches:
                module.eval()

    def _check_teacher(self, teacher_logits: torch.Tensor):
        self._teacher_checked = True
        uncertainty = normalized_entropy(
            teacher_logits, self.accelerator.unwrap_model(self.model).config.uncertainty_top_k
        )
        if uncertainty.mean().item() > UNTRAINED_TEACHER_ENTROPY:
            logger.warning(
                "The teacher's predictions are almost uniform (mean normalized entropy %.2f on the first batch): it "
                "looks like it was never fine-tuned. Fine-tune backbone + teacher on labelled data first (stage 2, "
                "the stock Trainer), or the students will learn nothing useful.",
                uncertainty.mean().item(),
            )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The distillation loss of the batch (labels, if any, are dropped: the loss does not use them)."""
        inputs = {key: value for key, value in inputs.items() if key not in ("labels", "label", "label_ids")}
        if model.training:
            self._frozen_modules_eval(model)
        if "states" in inputs:  # a batch of cached states (`train()` with `args.cache_states`)
            outputs = FastBertSequenceClassifierOutput(all_logits=self._students_on_states(model, **inputs))
        else:
            outputs = model(**inputs, output_all_logits=True)
        all_logits = outputs.all_logits  # (B, L, C): students with grad, teacher without
        loss, per_branch_kl = distillation_loss(all_logits[:, :-1], all_logits[:, -1], self.temperature)
        if model.training:
            if not self._teacher_checked:
                self._check_teacher(all_logits[:, -1].detach())
            kl = per_branch_kl.detach()
            self._kl_sum = kl if self._kl_sum is None else self._kl_sum + kl
            self._kl_steps += 1
        return (loss, outputs) if return_outputs else loss

    def _students_on_states(self, model, states, attention_mask, target) -> torch.Tensor:
        """(B, L-1, T, H) cached student inputs, (B, T) mask and (B, C) teacher logits -> (B, L, C) all logits."""
        branches = self.accelerator.unwrap_model(model).branches
        dtype = next(branches.parameters()).dtype
        logits = [branch(states[:, index].to(dtype), attention_mask) for index, branch in enumerate(branches)]
        return torch.stack(logits + [target.to(logits[0].dtype)], dim=1)

    def train(self, *args, **kwargs):
        """
        [`Trainer.train`], on cached states with `args.cache_states`; `config.branches_distilled` is `False` until
        the distillation completes.
        """
        config = self.accelerator.unwrap_model(self.model).config
        config.branches_distilled = False  # the students are being changed: partial until the last step
        with self._on_cached_states():
            output = super().train(*args, **kwargs)
        config.branches_distilled = True
        return output

    @contextlib.contextmanager
    def _on_cached_states(self):
        """While it lasts, the training and evaluation data are the frozen model's cached states, when asked and
        possible (see the class docstring); the datasets and the collator are restored after."""
        datasets = (self.train_dataset, self.eval_dataset, self.data_collator)
        cached = self._cache_states()
        signature = getattr(self, "_signature_columns", None)
        if cached is not None:
            self.train_dataset, self.eval_dataset = cached
            self.data_collator = collate_head_inputs
            # The Trainer drops what the model's forward does not name (`remove_unused_columns`); keep the cache.
            self._set_signature_columns_if_needed()
            self._signature_columns = [*self._signature_columns, "states", "target"]
        try:
            yield
        finally:
            self.train_dataset, self.eval_dataset, self.data_collator = datasets
            self._signature_columns = signature

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if isinstance(dataset, CachedHeadInputs) and self.args.train_sampling_strategy == "group_by_length":
            size = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return LengthGroupedSampler(size, lengths=dataset.lengths)
        return super()._get_train_sampler(train_dataset)

    def _get_eval_sampler(self, eval_dataset):
        if isinstance(eval_dataset, CachedHeadInputs):  # the order does not change the loss or the metrics
            return torch.utils.data.SequentialSampler(eval_dataset)
        return super()._get_eval_sampler(eval_dataset)

    def _cache_states(self):
        """`(train, eval)` as cached entries ([`cache_head_inputs`]), or `None` to run the backbone every step."""
        args = self.args
        if not getattr(args, "cache_states", True) or self.train_dataset is None:
            return None
        if args.world_size > 1 or args.train_sampling_strategy == "batch_rebalance":
            # Several processes each run their own copy of the students; that sampler reads the tokenized dataset.
            logger.info("Not caching the students' inputs (several processes, or batch_rebalance sampling).")
            return None
        model, evaluation = self.accelerator.unwrap_model(self.model), self.eval_dataset
        named = evaluation if isinstance(evaluation, dict) else {None: evaluation}
        datasets = [("train", self.train_dataset), *named.items()]
        size = cache_bytes(model.config, [dataset for _, dataset in datasets])
        if size > MAX_CACHE_BYTES:
            logger.warning(
                "The students' cached inputs would take %.1f GiB (more than %.0f): the frozen backbone runs every "
                "step instead.", size / 2**30, MAX_CACHE_BYTES / 2**30
            )  # fmt: skip
            return None
        cached = {}
        for name, dataset in datasets:
            if dataset is None:
                cached[name] = None
                continue
            if hasattr(dataset, "column_names"):  # a datasets.Dataset: the columns the collator can pad
                dataset = self._remove_unused_columns(dataset, description="caching")
            batches = torch.utils.data.DataLoader(
                dataset, batch_size=args.per_device_eval_batch_size, collate_fn=self.data_collator
            )
            cached[name] = cache_head_inputs(model, batches)
        train = cached.pop("train")
        return train, (cached if isinstance(evaluation, dict) else cached[None])

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """
        Returns `(loss, (all_logits, seq_lengths, per_sample_kl), labels)`: every classifier's logits (B, L, C), the
        real token lengths (B,) and each sample's KL per student (B, L-1), so that metrics at every speed and the
        per-student KL come out of one pass. `labels` is `None` for unlabeled data.
        """
        inputs = self._prepare_inputs(inputs)
        has_labels = bool(self.label_names) and all(inputs.get(name) is not None for name in self.label_names)
        labels = inputs[self.label_names[0]].detach() if has_labels else None
        with torch.no_grad():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        loss = loss.detach()
        if prediction_loss_only:
            return loss, None, None
        all_logits = outputs.all_logits.detach()  # (B, L, C)
        mask = inputs.get("attention_mask")
        if mask is None:
            seq_lengths = torch.full(all_logits.shape[:1], inputs["input_ids"].shape[1], device=all_logits.device)
        else:
            seq_lengths = mask.sum(dim=1)  # (B,)
        per_sample_kl = branch_kl(all_logits[:, :-1], all_logits[:, -1], self.temperature)  # (B, L-1)
        return loss, (all_logits, seq_lengths, per_sample_kl), labels

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        # `evaluate()` asks for the loss only when there is no `compute_metrics`; the per-student KL and the speed
        # metrics need the predictions, so only `args.prediction_loss_only` turns them off.
        prediction_loss_only = self.args.prediction_loss_only
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        predictions = output.predictions
        if not self.args.eval_do_concat_batches or not isinstance(predictions, (tuple, list)) or len(predictions) != 3:
            return output  # per-batch lists (eval_do_concat_batches=False) or loss only
        all_logits, seq_lengths, per_sample_kl = (np.asarray(p) for p in predictions)
        for layer, value in enumerate(per_sample_kl.mean(axis=0), start=1):
            output.metrics[f"{metric_key_prefix}_kl_branch_{layer}"] = float(value)
        if output.label_ids is not None:
            config = self.accelerator.unwrap_model(self.model).config
            self.speed_results = metrics_at_speeds(
                all_logits, seq_lengths, config, self.eval_speeds, labels=output.label_ids
            )
            self.speed_results_samples, self.speed_results_data = len(seq_lengths), None
            if self.compute_metrics is None:
                for key, value in flatten_speed_metrics(self.speed_results).items():
                    output.metrics[f"{metric_key_prefix}_{key}"] = value
        return output

    def log(self, logs, start_time=None):
        if "loss" in logs and self._kl_steps:
            # Called on every process when training logs: average the students' KL since the last log everywhere.
            kl = self.accelerator.reduce(self._kl_sum / self._kl_steps, reduction="mean")
            for layer, value in enumerate(kl.tolist(), start=1):
                logs[f"kl_branch_{layer}"] = value
            self._kl_sum, self._kl_steps = None, 0
        super().log(logs, start_time)

    def create_model_card(
        self,
        language=None,
        license=None,
        tags=None,
        model_name=None,
        finetuned_from=None,
        tasks=None,
        dataset_tags=None,
        dataset=None,
        dataset_args=None,
    ):
        """The FastBERT model card ([`hf_fastbert.modelcard.write_model_card`]), with the last labelled evaluation's
        speed / accuracy / mean exit layer / FLOPs speed-up table and its number of samples when there is one."""
        if not self.is_world_process_zero():
            return
        from .modelcard import write_model_card

        write_model_card(
            self.args.output_dir,
            self.accelerator.unwrap_model(self.model),
            repo_id=getattr(self, "hub_model_id", None) or self.args.hub_model_id,
            **self._card_arguments(finetuned_from=finetuned_from, dataset=dataset, tags=tags),
        )

    def _card_arguments(self, finetuned_from=None, dataset=None, tags=None) -> dict:
        return dict(
            base_model=finetuned_from,
            datasets=dataset,
            tags=tags,
            results=self.speed_results,
            results_data=self.speed_results_data if self.speed_results else None,
            results_samples=self.speed_results_samples if self.speed_results else None,
            training=self.training_notes
            or (describe_convergence(self.convergence, "self-distillation") if self.convergence else None),
        )

    def push_to_hub(
        self, commit_message="End of training", blocking=True, token=None, revision=None, private=None, **kwargs
    ):
        """
        Save the model to `args.output_dir` (as [`Trainer.push_to_hub`] does), then upload exactly the model's files
        to `args.hub_model_id` (default: the output folder's name) in one commit: weights, config, modeling code, the
        tokenizer (`processing_class`), the FastBERT model card and its plot
        ([`hf_fastbert.modelcard.push_model_to_hub`]). Unlike [`Trainer.push_to_hub`], nothing else in the output
        folder goes up: no `training_args.bin` (a pickle), no checkpoints, no stray files. The upload always
        completes before returning (`blocking` is ignored).

        Args:
            kwargs: the card's `finetuned_from`, `dataset` and `tags` (as in [`Trainer.create_model_card`]).
        """
        from .modelcard import push_model_to_hub

        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        card = self._card_arguments(
            finetuned_from=kwargs.get("finetuned_from"), dataset=kwargs.get("dataset"), tags=kwargs.get("tags")
        )
        self.create_model_card(finetuned_from=card["base_model"], dataset=card["datasets"], tags=card["tags"])
        return push_model_to_hub(
            self.accelerator.unwrap_model(self.model),
            self.hub_model_id or self.args.hub_model_id or Path(self.args.output_dir).name,
            commit_message=commit_message,
            token=token if token is not None else self.args.hub_token,
            revision=revision if revision is not None else self.args.hub_revision,
            private=private if private is not None else self.args.hub_private_repo,
            tokenizer=self.processing_class,
            **card,
        )


__all__ = ["FastBertDistillationTrainer"]

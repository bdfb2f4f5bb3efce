"""Both training stages through the Trainer: the distillation loss, the distillation trainer, resume, end to end."""

import json
import logging
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from tiny_models import tiny_config
from tolerances import clear_speed
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    BertTokenizerFast,
    Trainer,
    TrainingArguments,
)

from hf_fastbert import (
    FastBertConfig,
    FastBertDistillationTrainer,
    FastBertForSequenceClassification,
    FastBertMetrics,
    FastBertTrainingArguments,
    distillation_loss,
    train_fastbert,
)
from hf_fastbert.constants import DEFAULT_SPEEDS
from hf_fastbert.data import prepare_dataset
from hf_fastbert.distillation import branch_kl
from hf_fastbert.evaluation import metrics_at_speeds


POSITIVE, NEGATIVE, FILLER = ["good", "great", "fine"], ["bad", "awful", "poor"], ["movie", "plot", "the", "was"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER]
QUIET = dict(report_to="none", disable_tqdm=True, save_strategy="no", logging_steps=2, use_cpu=True)


@pytest.fixture(scope="module")
def tokenizer():
    return BertTokenizerFast(vocab={token: i for i, token in enumerate(VOCAB)})


def sentiment_texts(num_samples: int, seed: int = 0) -> Dataset:
    """A toy task a tiny BERT learns in a few steps: the label is the sentiment word hidden among filler words."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(num_samples):
        label = rng.randint(0, 1)
        words = rng.choices(FILLER, k=rng.randint(1, 6)) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
    features = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    return Dataset.from_dict({"text": texts, "label": labels}, features=features)


def tokenized(tokenizer, num_samples=32, seed=0, labelled=True):
    return prepare_dataset(sentiment_texts(num_samples, seed), tokenizer, label_column="label" if labelled else None)


def confident_model(seed: int = 0) -> FastBertForSequenceClassification:
    """A tiny FastBERT whose teacher gives confident (non-uniform) predictions, as a fine-tuned one would."""
    torch.manual_seed(seed)
    model = FastBertForSequenceClassification(tiny_config(vocab_size=len(VOCAB), num_labels=2))
    with torch.no_grad():
        model.classifier.weight.mul_(200.0)
    return model


def distill_args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "distill"),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=1e-3,
        num_train_epochs=1,
        seed=0,
        **QUIET,
    )
    settings.update(overrides)
    return FastBertTrainingArguments(**settings)


# The loss


def test_distillation_loss_is_kl_teacher_to_student_summed_over_students():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 3, 4, generator=generator), torch.randn(5, 4, generator=generator)
    loss, per_branch = distillation_loss(student, teacher)
    assert per_branch.shape == (3,)
    p_teacher = teacher.softmax(-1)[:, None]  # (B, 1, C)
    expected = (p_teacher * (p_teacher.log() - student.log_softmax(-1))).sum(-1).mean(0)  # KL(teacher || student)
    torch.testing.assert_close(per_branch, expected)
    torch.testing.assert_close(loss, expected.sum())
    reverse = (student.softmax(-1) * (student.log_softmax(-1) - p_teacher.log())).sum(-1).mean(0)
    assert not torch.allclose(per_branch, reverse)  # the direction matters, and it is the paper's
    assert distillation_loss(teacher[:, None].repeat(1, 3, 1), teacher)[0].abs().item() < 1e-6


def test_temperature_scales_and_teacher_gets_no_gradient():
    student = torch.randn(4, 2, 3, requires_grad=True)
    teacher = torch.randn(4, 3, requires_grad=True)
    loss, _ = distillation_loss(student, teacher, temperature=2.0)
    loss.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    manual = 4.0 * F.kl_div(
        (student / 2).log_softmax(-1), (teacher / 2).softmax(-1)[:, None].expand(-1, 2, -1), reduction="none"
    )
    torch.testing.assert_close(branch_kl(student, teacher, 2.0), manual.sum(-1))
    with pytest.raises(ValueError, match="student_logits"):
        distillation_loss(torch.randn(4, 3), teacher)


# The distillation trainer


def test_refuses_a_model_that_is_not_fastbert(tmp_path, tokenizer):
    bert = BertForSequenceClassification(
        BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    )
    with pytest.raises(ValueError, match="FastBertForSequenceClassification"):
        FastBertDistillationTrainer(model=bert, args=distill_args(tmp_path), train_dataset=tokenized(tokenizer))


@pytest.mark.parametrize(
    "overrides",
    [
        {"distillation_temperature": 0},
        {"distillation_temperature": float("nan")},
        {"eval_speeds": [1.5]},
        {"eval_speeds": []},
    ],
)
def test_training_arguments_are_validated(tmp_path, overrides):
    with pytest.raises(ValueError, match=next(iter(overrides))):
        distill_args(tmp_path, **overrides)


def test_distillation_trains_only_the_students_without_a_graph_through_the_backbone(tmp_path, tokenizer):
    model = confident_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    seen = {"backbone": [], "students": []}
    hooks = [
        layer.register_forward_hook(lambda m, i, o: seen["backbone"].append(o.requires_grad))
        for layer in model.bert.encoder.layer
    ]
    hooks += [
        # Training passes only: the convergence check's held-out evaluations run without gradients.
        branch.register_forward_hook(lambda m, i, o: seen["students"].append(o.requires_grad) if m.training else None)
        for branch in model.branches
    ]
    # Plain TrainingArguments work too (distilling until convergence on a held-out slice); unlabeled text is enough.
    args = TrainingArguments(
        str(tmp_path / "plain"), per_device_train_batch_size=8, learning_rate=1e-2, seed=0, num_train_epochs=1, **QUIET
    )
    trainer = FastBertDistillationTrainer(
        model=model, args=args, train_dataset=tokenized(tokenizer, 48, labelled=False), processing_class=tokenizer
    )
    trainer.train()
    for hook in hooks:
        hook.remove()
    assert seen["backbone"] and not any(seen["backbone"])  # no autograd graph through the frozen layers
    assert seen["students"] and all(seen["students"])
    for name, parameter in model.named_parameters():
        if name.startswith("branches."):
            assert parameter.requires_grad
        else:
            assert torch.equal(parameter, before[name]), name  # bit-for-bit
            assert parameter.grad is None and not parameter.requires_grad
    assert all(
        not torch.equal(p, before[f"branches.{n}"])
        for n, p in model.branches.named_parameters()
        if n.endswith("weight")
    )
    assert model.config.branches_distilled is True
    assert args.ddp_find_unused_parameters is False  # only the students train, and all of them get gradients
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and {f"kl_branch_{layer}" for layer in (1, 2, 3)} <= set(logged[0])
    assert logged[-1]["loss"] < 0.95 * logged[0]["loss"]  # the students learn the teacher


def test_labels_do_not_change_the_loss(tmp_path, tokenizer):
    model = confident_model()
    trainer = FastBertDistillationTrainer(
        model=model, args=distill_args(tmp_path), train_dataset=tokenized(tokenizer), processing_class=tokenizer
    )
    batch = trainer.data_collator([tokenized(tokenizer)[i] for i in range(8)])
    without = {key: value for key, value in batch.items() if key != "labels"}
    model.eval()
    # Bit for bit: the same computation on the same tensors (the loss never reads the labels).
    assert torch.equal(trainer.compute_loss(model, batch), trainer.compute_loss(model, without))


def test_evaluate_reports_the_loss_per_student_kl_and_speed_metrics(tmp_path, tokenizer):
    model = confident_model()
    trainer = FastBertDistillationTrainer(
        model=model,
        args=distill_args(tmp_path, eval_speeds=[0.0, 0.5]),
        train_dataset=tokenized(tokenizer),
        processing_class=tokenizer,
    )
    labelled = trainer.evaluate(tokenized(tokenizer, 24, seed=1))
    kl = [labelled[f"eval_kl_branch_{layer}"] for layer in (1, 2, 3)]
    assert labelled["eval_loss"] == pytest.approx(sum(kl), rel=1e-4)  # equal batch sizes: mean of means
    for key in ("accuracy", "mean_exit_layer", "flops_speedup"):
        assert f"eval_{key}_speed_0" in labelled and f"eval_{key}_speed_0.5" in labelled
    assert labelled["eval_mean_exit_layer_speed_0"] == 4.0
    assert [row["speed"] for row in trainer.speed_results] == [0.0, 0.5]

    unlabelled = trainer.evaluate(tokenized(tokenizer, 24, seed=1, labelled=False))
    assert unlabelled["eval_loss"] == pytest.approx(labelled["eval_loss"])
    assert "eval_kl_branch_3" in unlabelled and not any("accuracy" in key for key in unlabelled)

    trainer.compute_metrics = FastBertMetrics(model.config, speeds=[0.1])
    custom = trainer.evaluate(tokenized(tokenizer, 24, seed=1))
    assert "eval_accuracy_speed_0.1" in custom and "eval_accuracy_speed_0.5" not in custom
    assert custom["eval_accuracy"] == labelled["eval_accuracy_speed_0"]

    trainer.create_model_card()
    card = (tmp_path / "distill" / "README.md").read_text()
    assert "fastbert" in card and (tmp_path / "distill" / "accuracy_vs_speedup.png").exists()


def test_a_teacher_that_was_never_fine_tuned_is_warned_about(tmp_path, tokenizer, caplog):
    def first_steps(model):
        args = distill_args(tmp_path, max_steps=1)
        FastBertDistillationTrainer(
            model=model, args=args, train_dataset=tokenized(tokenizer), processing_class=tokenizer
        ).train()

    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="hf_fastbert"):
        first_steps(FastBertForSequenceClassification(tiny_config(vocab_size=len(VOCAB), num_labels=2)))
    assert "never fine-tuned" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_fastbert"):
        first_steps(confident_model())
    assert "never fine-tuned" not in caplog.text


def test_resuming_from_a_checkpoint_ends_with_the_same_weights(tmp_path, tokenizer):
    data = tokenized(tokenizer, 24)

    def run(output_dir, resume=None):
        args = distill_args(
            tmp_path,
            output_dir=str(output_dir),
            num_train_epochs=2,
            save_strategy="steps",
            save_steps=2,
            learning_rate=1e-2,
            warmup_steps=0.2,
        )
        trainer = FastBertDistillationTrainer(
            model=confident_model(), args=args, train_dataset=data, processing_class=tokenizer
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer.model

    uninterrupted = run(tmp_path / "a")  # 6 steps, checkpoints at 2, 4, 6
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-2"))  # interrupted in the first epoch
    # Within rounding, not bit for bit: the resumed run starts from weights loaded from disk (other memory offsets,
    # hence other BLAS summation orders in the last bits on some CPUs).
    for (name, expected), got in zip(uninterrupted.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)
    # Only the checkpoint of the last step claims distilled students; a resumed run claims them once it completes.
    for step, distilled in ((2, False), (4, False), (6, True)):
        config = json.loads((tmp_path / "a" / f"checkpoint-{step}" / "config.json").read_text())
        assert config["branches_distilled"] is distilled, step
    assert resumed.config.branches_distilled is True


def test_an_interrupted_distillation_does_not_claim_distilled_students(tmp_path, tokenizer):
    model = confident_model()
    model.config.branches_distilled = True  # distilled before: changing the students makes that claim stale
    args = distill_args(tmp_path, save_strategy="steps", save_steps=1)
    trainer = FastBertDistillationTrainer(
        model=model, args=args, train_dataset=tokenized(tokenizer, 24), processing_class=tokenizer
    )
    original_step = trainer.training_step

    def step_then_interrupt(*step_args, **step_kwargs):
        if trainer.state.global_step == 2:
            raise KeyboardInterrupt  # Ctrl-C in the third of 3 steps
        return original_step(*step_args, **step_kwargs)

    trainer.training_step = step_then_interrupt
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert model.config.branches_distilled is False
    checkpoints = sorted(path.name for path in (tmp_path / "distill").iterdir())
    assert checkpoints == ["checkpoint-1", "checkpoint-2"]
    for name in checkpoints:
        assert json.loads((tmp_path / "distill" / name / "config.json").read_text())["branches_distilled"] is False


# Stage 2 with the stock Trainer, the whole pipeline, and its checkpoints


def test_stage_two_is_the_stock_trainer(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = FastBertForSequenceClassification(tiny_config(vocab_size=len(VOCAB), num_labels=2))
    model.branches.requires_grad_(False)  # optional: the students get no gradient in stage 2
    students = {name: p.detach().clone() for name, p in model.branches.named_parameters()}
    args = TrainingArguments(
        str(tmp_path / "finetune"),
        per_device_train_batch_size=16,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        num_train_epochs=8,
        seed=0,
        include_for_metrics=["inputs"],
        **QUIET,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=tokenized(tokenizer, 64),
        eval_dataset=tokenized(tokenizer, 32, seed=1),
        processing_class=tokenizer,
        compute_metrics=FastBertMetrics(model.config),
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < 0.7 * before["eval_loss"] and after["eval_accuracy"] >= 0.9
    assert after["eval_mean_exit_layer_speed_0"] == 4.0 and after["eval_flops_speedup_speed_0"] == pytest.approx(1.0)
    assert all(torch.equal(p, students[name]) for name, p in model.branches.named_parameters())


@pytest.fixture
def base_checkpoint(tmp_path, tokenizer):
    torch.manual_seed(0)
    path = tmp_path / "base"
    FastBertForSequenceClassification(tiny_config(vocab_size=len(VOCAB), num_labels=2)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_train_fastbert_runs_both_stages_and_its_checkpoints_load(tmp_path, base_checkpoint, tokenizer):
    raw = DatasetDict(train=sentiment_texts(64), validation=sentiment_texts(32, seed=1))
    unlabeled = sentiment_texts(32, seed=2).remove_columns("label")
    output = train_fastbert(
        base_checkpoint,
        raw,
        str(tmp_path / "out"),
        unlabeled_dataset=unlabeled,
        max_length=32,
        batch_size=16,
        finetune_epochs=4,
        finetune_learning_rate=5e-3,
        distill_epochs=2,
        distill_learning_rate=1e-2,
        eval_speeds=[0.0, 0.5],
        progress=False,
        finetune_args={"lr_scheduler_type": "constant", "save_strategy": "epoch", "save_total_limit": 1},
    )
    assert output.model.config.branches_distilled and output.label_names == ["neg", "pos"]
    assert output.model.config.id2label == {0: "neg", 1: "pos"}
    assert [row["speed"] for row in output.results] == [0.0, 0.5] and output.results[0]["accuracy"] >= 0.9
    assert output.distill_metrics["train_loss"] < 0.5  # mean KL summed over the 3 students; about 1.5 at first
    saved = json.loads((tmp_path / "out" / "speed_results.json").read_text())
    assert saved["results"] == output.results and saved["num_processes"] == 1
    assert saved["finetune_steps"] == 4 * 64 // 16
    assert saved["distill_steps"] == 2 * (64 + 32) // 16  # the training texts plus the unlabeled ones
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(os.listdir(tmp_path / "out"))

    # Saved with the default speed chosen on the validation split: the largest within half a point of full depth.
    chosen = output.default_speed
    assert chosen["data"] == "32 samples of the data (validation split)" and chosen["exit_rule"] == "entropy"
    assert output.model.config.speed == chosen["speed"] == saved["default_speed"]["speed"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["speed"] == chosen["speed"]
    grid = [round(0.01 * i, 2) for i in range(100)]
    rows = metrics_at_speeds(*output.eval_logits[:2], output.model.config, grid, labels=output.eval_logits[2])
    floor = rows[0]["accuracy"] - 0.005 - 1e-9
    assert chosen["speed"] in grid and rows[grid.index(chosen["speed"])]["accuracy"] >= floor
    assert all(row["accuracy"] < floor for row in rows if row["speed"] > chosen["speed"])
    assert chosen["reference_accuracy"] == rows[0]["accuracy"] and chosen["samples"] == 32
    assert f"Default speed {chosen['speed']:g}" in (tmp_path / "out" / "README.md").read_text()

    # Checkpoints of both stages load with the Auto classes (plugin) and with trust_remote_code (no plugin).
    stages = {"stage2": str(tmp_path / "out" / "_finetune" / "checkpoint-16"), "stage3": str(tmp_path / "out")}
    batch = dict(tokenizer(["good movie", "the plot was awful", "fine"], padding=True))
    expected, speeds = {}, {}
    for stage, path in stages.items():
        loaded = AutoModelForSequenceClassification.from_pretrained(path).eval()
        assert isinstance(loaded, FastBertForSequenceClassification)
        assert loaded.config.branches_distilled is (stage == "stage3")
        inputs = {key: torch.tensor(value) for key, value in batch.items()}
        speeds[stage] = clear_speed(loaded, inputs["input_ids"], inputs["attention_mask"], near=0.3)  # trained
        with torch.no_grad():
            out = loaded(**inputs, speed=speeds[stage])
        expected[stage] = {"logits": out.logits.tolist(), "exits": out.exit_layers.tolist()}
    script = f"""
import sys
sys.modules["hf_fastbert"] = None  # the plugin cannot be imported
import json, torch
from transformers import AutoModelForSequenceClassification
batch = {{key: torch.tensor(value) for key, value in {batch!r}.items()}}
result = {{}}
for stage, path in {stages!r}.items():
    model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True).eval()
    with torch.no_grad():
        out = model(**batch, speed={speeds!r}[stage])
    result[stage] = {{"logits": out.logits.tolist(), "exits": out.exit_layers.tolist()}}
print(json.dumps(result))
"""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # as this process runs
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    got = json.loads(result.stdout.strip().splitlines()[-1])
    for stage in stages:
        assert got[stage]["exits"] == expected[stage]["exits"]
        torch.testing.assert_close(torch.tensor(got[stage]["logits"]), torch.tensor(expected[stage]["logits"]))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"text_column": "sentence"}, "no column 'sentence'"),
        ({"validation": {"text": ["good"], "label": ["meh"]}}, "outside the label set"),
        ({"train": {"text": [], "label": []}}, "empty"),
        ({"eval_speeds": [2.0]}, "speeds"),
    ],
)
def test_train_fastbert_checks_its_input_before_any_work(tmp_path, base_checkpoint, change, message):
    splits = {
        "train": {"text": ["good", "bad"], "label": ["pos", "neg"]},
        "validation": {"text": ["good"], "label": ["pos"]},
    }
    splits.update({key: value for key, value in change.items() if key in splits})
    kwargs = {key: value for key, value in change.items() if key not in splits}
    raw = DatasetDict({name: Dataset.from_dict(columns) for name, columns in splits.items()})
    with pytest.raises(ValueError, match=message):
        train_fastbert(base_checkpoint, raw, str(tmp_path / "out"), max_length=32, progress=False, **kwargs)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_the_default_speed_is_never_chosen_on_the_test_split(tmp_path, base_checkpoint):
    raw = DatasetDict(train=sentiment_texts(64), test=sentiment_texts(32, seed=1))
    settings = dict(max_length=32, batch_size=16, finetune_epochs=0, distill_max_epochs=1, progress=False)
    output = train_fastbert(base_checkpoint, raw, str(tmp_path / "a"), eval_split="test", **settings)
    # Distilling until convergence held out 10% of the training split: the speed is chosen there.
    assert output.default_speed["data"] == "6 samples of the held-out slice of the data (train split)"
    assert output.results_data == "the data (test split)"
    assert output.model.config.speed == output.default_speed["speed"]
    kept = train_fastbert(
        base_checkpoint, raw, str(tmp_path / "b"), eval_split="test", max_accuracy_drop=None, **settings
    )
    assert kept.default_speed is None and kept.model.config.speed == 0.0


def test_a_fine_tuned_classifier_keeps_its_label_order(tmp_path, tokenizer):
    torch.manual_seed(0)
    config = tiny_config(
        vocab_size=len(VOCAB), num_labels=2, id2label={0: "pos", 1: "neg"}, label2id={"pos": 0, "neg": 1}
    )
    path = tmp_path / "classifier"
    FastBertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    raw = DatasetDict(train=sentiment_texts(16), validation=sentiment_texts(8, seed=1))  # ClassLabel ["neg", "pos"]
    output = train_fastbert(
        str(path),
        raw,
        str(tmp_path / "out"),
        finetune_epochs=0,
        distill_epochs=1,
        batch_size=8,
        max_length=32,
        progress=False,
    )
    assert output.label_names == ["pos", "neg"] and output.model.config.id2label == {0: "pos", 1: "neg"}


@pytest.mark.parametrize(
    "labels, message",
    [({0: "good", 1: "bad"}, "not the data's labels"), (None, "not a fine-tuned sequence classifier")],
)
def test_distilling_without_fine_tuning_needs_a_classifier_of_the_data_labels(tmp_path, tokenizer, labels, message):
    torch.manual_seed(0)
    path = tmp_path / "checkpoint"
    if labels is None:
        BertModel(tiny_config(vocab_size=len(VOCAB))).save_pretrained(path)
    else:
        config = tiny_config(vocab_size=len(VOCAB), id2label=labels, label2id={v: k for k, v in labels.items()})
        FastBertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    raw = DatasetDict(train=sentiment_texts(16))
    with pytest.raises(ValueError, match=message):
        train_fastbert(str(path), raw, str(tmp_path / "out"), finetune_epochs=0, max_length=32, progress=False)
    assert not (tmp_path / "out").exists()


def test_max_length_beyond_the_position_embeddings_is_refused(tmp_path, base_checkpoint):
    raw = DatasetDict(train=sentiment_texts(16))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        train_fastbert(base_checkpoint, raw, str(tmp_path / "out"), max_length=65, progress=False)


@pytest.mark.parametrize("family", ["roberta", "modernbert"])
def test_train_fastbert_on_other_families(tmp_path, tokenizer, family):
    from tiny_models import family_config

    torch.manual_seed(0)
    path = tmp_path / "base"
    config = family_config(family, fastbert=False, vocab_size=len(VOCAB), num_labels=2)
    AutoModel.from_config(config).save_pretrained(path)  # a pre-trained encoder, no classification head
    family_tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(VOCAB)})
    if family == "modernbert":  # ModernBERT has no token types
        family_tokenizer.model_input_names = ["input_ids", "attention_mask"]
    family_tokenizer.save_pretrained(path)
    output = train_fastbert(
        str(path),
        DatasetDict(train=sentiment_texts(64), validation=sentiment_texts(32, seed=1)),
        str(tmp_path / "out"),
        max_length=32,
        batch_size=16,
        finetune_epochs=4,
        finetune_learning_rate=5e-3,
        distill_epochs=2,
        distill_learning_rate=1e-2,
        eval_speeds=[0.0, 0.5],
        progress=False,
        finetune_args={"lr_scheduler_type": "constant"},
    )
    assert output.model.config.backbone_model_type == family and output.model.config.branches_distilled
    assert output.results[0]["accuracy"] >= 0.9
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert type(loaded) is type(output.model)
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"(`{family}`)" in card


def test_fine_tuning_a_distilled_checkpoint_marks_its_students_stale(tmp_path, tokenizer):
    torch.manual_seed(0)
    config = tiny_config(vocab_size=len(VOCAB), num_labels=2, branches_distilled=True)
    path = tmp_path / "distilled"
    FastBertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    raw = DatasetDict(train=sentiment_texts(16))
    output = train_fastbert(
        str(path), raw, str(tmp_path / "out"), finetune_epochs=1, distill_epochs=0, max_length=32, progress=False
    )
    assert output.model.config.branches_distilled is False  # a new teacher, students not distilled from it
    assert json.loads((tmp_path / "out" / "config.json").read_text())["branches_distilled"] is False


def test_inference_copies_are_refused_by_the_distillation_trainer(tmp_path, tokenizer):
    from hf_fastbert import fold_students
    from hf_fastbert.quantization import quantize_int8

    for make_copy in (quantize_int8, fold_students):
        with pytest.raises(ValueError, match="inference copy"):
            FastBertDistillationTrainer(model=make_copy(confident_model()), args=distill_args(tmp_path))


# Convergence: both stages train until a held-out metric stops improving and keep the best weights


class _State:
    def __init__(self, step, epoch=None, max_steps=100):
        self.global_step, self.epoch, self.max_steps = step, epoch if epoch is not None else float(step), max_steps


class _Control:
    should_evaluate = should_training_stop = False


def test_convergence_stops_after_patience_and_restores_the_best_weights():
    from hf_fastbert.convergence import ConvergenceCallback

    model = torch.nn.Linear(2, 1)
    frozen = torch.nn.Linear(2, 1).requires_grad_(False)
    model.frozen = frozen
    callback = ConvergenceCallback(patience=2, min_relative_improvement=0.1, description="self-distillation")
    args = TrainingArguments("unused", report_to="none")
    control = _Control()
    callback.on_train_begin(args, _State(0), control)
    best_weight = None
    for step, loss in enumerate([1.0, 0.5, 0.48, 0.47, 0.2], start=1):
        with torch.no_grad():
            model.weight.fill_(float(step))
        callback.on_evaluate(args, _State(step), control, metrics={"eval_loss": loss}, model=model)
        if loss == 0.47:
            best_weight = model.weight.detach().clone()
        if control.should_training_stop:
            break
    # 0.48 and 0.47 improve on 0.5 by less than 10%: two evaluations without progress -> stop at step 4,
    # keeping the weights of step 4 (0.47, the lowest loss seen).
    assert control.should_training_stop and step == 4
    callback.on_train_end(args, _State(4), control, model=model)
    torch.testing.assert_close(model.weight, best_weight)
    summary = callback.summary()
    assert summary["stopped"] == "converged" and summary["best"] == 0.47 and summary["best_step"] == 4
    assert [row["value"] for row in summary["history"]] == [1.0, 0.5, 0.48, 0.47]
    assert "converged" in callback.message() and "(restored)" in callback.message()

    # A budget that ends while the metric still improves says so; earlier weights come back if the last was worse.
    callback = ConvergenceCallback(patience=3)
    callback.on_train_begin(args, _State(0), control)
    for step, loss in enumerate([1.0, 0.8, 0.9], start=1):
        with torch.no_grad():
            model.weight.fill_(float(step))
        callback.on_evaluate(args, _State(step, max_steps=3), control, metrics={"eval_loss": loss}, model=model)
    callback.on_train_end(args, _State(3, max_steps=3), control, model=model)
    assert (model.weight == 2.0).all() and callback.summary()["stopped"] == "budget"
    assert "whole budget" in callback.message()


def test_convergence_schedules_evaluations_only_when_the_arguments_do_not():
    from hf_fastbert.convergence import ConvergenceCallback

    callback = ConvergenceCallback(eval_every=3)
    control = _Control()
    callback.on_train_begin(TrainingArguments("unused", report_to="none"), _State(0), control)
    callback.on_step_end(None, _State(2), control)
    assert not control.should_evaluate
    callback.on_step_end(None, _State(3), control)
    assert control.should_evaluate
    control.should_evaluate = False
    callback.on_epoch_end(None, _State(4), control)
    assert control.should_evaluate  # every epoch's end
    control.should_evaluate = False
    callback.on_train_begin(TrainingArguments("unused", report_to="none", eval_strategy="epoch"), _State(0), control)
    callback.on_step_end(None, _State(3), control)
    callback.on_epoch_end(None, _State(4), control)
    assert not control.should_evaluate  # the arguments' own schedule
    with pytest.raises(ValueError, match="patience"):
        ConvergenceCallback(patience=0)


def test_split_held_out_is_seeded_and_sized():
    from hf_fastbert.convergence import split_held_out

    data = Dataset.from_dict({"x": list(range(50))})
    train, held_out = split_held_out(data, 0.1, seed=3)
    assert len(held_out) == 5 and len(train) == 45 and not set(train["x"]) & set(held_out["x"])
    assert split_held_out(data, 0.1, seed=3)[1]["x"] == held_out["x"]
    assert len(split_held_out(data, 0.5, max_samples=7)[1]) == 7
    assert [len(part) for part in split_held_out(list(range(2)), 0.1)] == [1, 1]


def test_distillation_converges_by_default_on_a_held_out_slice(tmp_path, tokenizer):
    model = confident_model()
    data = tokenized(tokenizer, 60, labelled=False)
    args = FastBertTrainingArguments(
        str(tmp_path / "converge"), per_device_train_batch_size=8, seed=0, num_train_epochs=30, **QUIET
    )
    assert args.learning_rate == 1e-3 and args.convergence_patience == 2
    trainer = FastBertDistillationTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    assert len(trainer.train_dataset) == 54 and len(trainer.eval_dataset) == 6  # 10% held out, not trained on
    trainer.train()
    summary = trainer.convergence
    assert summary["stopped"] == "converged" and summary["steps"] < summary["max_steps"] == 30 * 7
    assert summary["evaluations"] == summary["steps"] // 7 and summary["best"] < summary["first"] / 2
    # The students of the best evaluation were restored. Training evaluated them on the float16 cache of the
    # students' inputs (`cache_states`), evaluate() on the float32 states: they agree to that rounding.
    assert trainer.evaluate()["eval_loss"] == pytest.approx(summary["best"], rel=1e-3)
    assert model.config.branches_distilled
    trainer.save_model(str(tmp_path / "saved"))
    trainer.create_model_card()
    assert "Self-distillation converged" in (tmp_path / "converge" / "README.md").read_text()

    # A fixed number of epochs on all the data, as before.
    fixed = FastBertTrainingArguments(
        str(tmp_path / "fixed"), per_device_train_batch_size=8, num_train_epochs=1, convergence_patience=None, **QUIET
    )
    trainer = FastBertDistillationTrainer(model=confident_model(), args=fixed, train_dataset=data)
    assert trainer.eval_dataset is None and len(trainer.train_dataset) == 60 and trainer.convergence is None


def test_train_fastbert_converges_both_stages_by_default(tmp_path, base_checkpoint):
    raw = DatasetDict(train=sentiment_texts(80), validation=sentiment_texts(16, seed=1))
    output = train_fastbert(
        base_checkpoint,
        raw,
        str(tmp_path / "out"),
        max_length=32,
        batch_size=16,
        finetune_max_epochs=3,
        distill_max_epochs=3,
        finetune_learning_rate=5e-3,
        eval_speeds=[0.0, 0.5],
        progress=False,
    )
    assert set(output.convergence) == {"finetune", "distill"}
    saved = json.loads((tmp_path / "out" / "speed_results.json").read_text())
    assert saved["held_out_samples"] == 8 and saved["distill_learning_rate"] == 1e-3
    assert saved["finetune_learning_rate"] == 5e-3 and saved["convergence"]["distill"]["max_steps"] == 3 * 5
    assert saved["finetune_steps"] <= 3 * 5  # 72 training samples, batch 16
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Training" in card and "- Fine-tuning (backbone + teacher" in card and "- Self-distillation" in card


def test_fixed_epoch_finetuning_learns_from_the_held_out_slice_too(tmp_path, base_checkpoint):
    raw = DatasetDict(train=sentiment_texts(80), validation=sentiment_texts(16, seed=1))
    train_fastbert(
        base_checkpoint,
        raw,
        str(tmp_path / "out"),
        max_length=32,
        batch_size=8,
        finetune_epochs=1,  # fixed: no stopping data needed
        distill_max_epochs=1,  # converging: stops on the held-out slice, which the students never train on
        eval_speeds=[0.0],
        progress=False,
    )
    saved = json.loads((tmp_path / "out" / "speed_results.json").read_text())
    assert saved["held_out_samples"] == 8
    assert saved["finetune_steps"] == 80 // 8 and saved["distill_steps"] == 72 // 8
    assert FastBertConfig.from_pretrained(tmp_path / "out").uncertainty_top_k is None  # two labels: full entropy


def test_many_label_models_measure_uncertainty_over_the_top_two_labels_by_default(tmp_path, base_checkpoint):
    three = ClassLabel(names=["neg", "pos", "other"])
    raw = DatasetDict(
        train=sentiment_texts(32).cast_column("label", three),
        validation=sentiment_texts(16, seed=1).cast_column("label", three),
    )
    quick = dict(max_length=32, batch_size=16, finetune_epochs=1, distill_epochs=0, eval_speeds=[0.0], progress=False)
    output = train_fastbert(base_checkpoint, raw, str(tmp_path / "auto"), **quick)
    assert output.model.config.uncertainty_top_k == 2  # measured default for more than two labels
    output = train_fastbert(base_checkpoint, raw, str(tmp_path / "full"), uncertainty_top_k=None, **quick)
    assert output.model.config.uncertainty_top_k is None
    with pytest.raises(ValueError, match="uncertainty_top_k"):
        train_fastbert(base_checkpoint, raw, str(tmp_path / "bad"), uncertainty_top_k=1, **quick)


def test_default_finetune_learning_rate_follows_the_model_size():
    from hf_fastbert.training import default_finetune_learning_rate

    assert default_finetune_learning_rate(BertConfig(hidden_size=384)) == 1e-4
    assert default_finetune_learning_rate(BertConfig(hidden_size=768)) == 2e-5


def test_train_fastbert_takes_a_config_or_its_fields_and_names_an_unknown_option(tmp_path, base_checkpoint):
    from hf_fastbert.training import FastBertTrainingConfig

    raw = DatasetDict(train=sentiment_texts(16))
    with pytest.raises(TypeError, match=r"unknown options \['epochs'\].*FastBertTrainingConfig"):
        train_fastbert(base_checkpoint, raw, str(tmp_path / "out"), epochs=1)
    with pytest.raises(ValueError, match="finetune_epochs"):
        FastBertTrainingConfig(finetune_epochs=-1)
    config = FastBertTrainingConfig(max_length=32, batch_size=8, finetune_epochs=1, distill_epochs=0, progress=False)
    output = train_fastbert(base_checkpoint, raw, str(tmp_path / "out"), config, eval_speeds=[0.0])
    assert output.results is None and output.model.config.num_labels == 2
    assert config.finetune_epochs == 1 and config.eval_speeds == list(DEFAULT_SPEEDS)  # keywords do not change it
    assert not (tmp_path / "out" / "sweep").exists()  # no evaluation split: no sweep


@pytest.mark.parametrize("family", ["bert", "modernbert", "deberta-v2", "albert", "distilbert"])
def test_students_on_cached_states_match_the_model(tmp_path, family):
    from tiny_models import family_config, random_batch

    from hf_fastbert.cached_states import cache_head_inputs, collate_head_inputs
    from hf_fastbert.modeling_fastbert import FASTBERT_MODELS

    torch.manual_seed(0)
    config = family_config(family)
    model = FASTBERT_MODELS[type(config)](config).eval()
    trainer = FastBertDistillationTrainer(model=model, args=distill_args(tmp_path))
    input_ids, attention_mask = random_batch(batch_size=6)
    labels = torch.arange(6) % config.num_labels
    entries = cache_head_inputs(model, [{"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}])
    assert [entry["states"].shape[1] for entry in entries] == attention_mask.sum(1).tolist()  # no padding kept
    batch = collate_head_inputs(entries[::-1])  # another batch, padded to its own longest sample
    assert torch.equal(batch["labels"], labels.flip(0))
    with torch.no_grad():
        cached_loss, cached = trainer.compute_loss(model, batch, return_outputs=True)
        loss, expected = trainer.compute_loss(
            model, {"input_ids": input_ids, "attention_mask": attention_mask}, return_outputs=True
        )
    # The cache holds float16 states: the students' logits agree to its rounding, the teacher's as computed.
    torch.testing.assert_close(cached.all_logits, expected.all_logits.flip(0), rtol=0, atol=5e-3)
    torch.testing.assert_close(cached.all_logits[:, -1], expected.all_logits.flip(0)[:, -1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached_loss, loss, rtol=1e-2, atol=1e-5)


@pytest.mark.parametrize("sampling", ["random", "group_by_length"])
def test_distillation_on_cached_states_runs_the_backbone_once(tmp_path, tokenizer, sampling):
    data, held_out = tokenized(tokenizer, 48), tokenized(tokenizer, 16, seed=1)
    calls, losses = {}, {}
    for cache in (True, False):
        model = confident_model()
        count = []
        hook = model.bert.encoder.layer[0].register_forward_hook(lambda m, i, o, seen=count: seen.append(o.shape[0]))
        args = distill_args(
            tmp_path / str(cache),
            per_device_train_batch_size=8,
            num_train_epochs=3,
            convergence_patience=None,
            eval_strategy="epoch",
            cache_states=cache,
            train_sampling_strategy=sampling,
        )
        trainer = FastBertDistillationTrainer(
            model=model, args=args, train_dataset=data, eval_dataset=held_out, processing_class=tokenizer
        )
        trainer.train()
        hook.remove()
        calls[cache] = sum(count)
        losses[cache] = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
        assert trainer.train_dataset is data and trainer.eval_dataset is held_out  # restored after training
        assert model.config.branches_distilled
    assert calls[True] == 48 + 16  # one pass over the training and the evaluation data
    assert calls[False] == 3 * (48 + 16)  # every epoch and every evaluation
    # The same training, on float16 states: the same losses to that rounding.
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)


def test_data_too_large_to_cache_is_refused_before_any_backbone_pass(tmp_path, tokenizer, monkeypatch):
    from hf_fastbert import trainer_fastbert
    from hf_fastbert.cached_states import cache_bytes

    data, held_out = tokenized(tokenizer, 48), tokenized(tokenizer, 16, seed=1)
    model = confident_model()
    size = cache_bytes(model.config, [data, held_out])
    tokens = sum(len(ids) for ids in [*data["input_ids"], *held_out["input_ids"]])
    assert size == tokens * (model.config.num_hidden_layers - 1) * model.config.hidden_size * 2
    monkeypatch.setattr(trainer_fastbert, "MAX_CACHE_BYTES", size - 1)
    count = []
    model.bert.encoder.layer[0].register_forward_hook(lambda m, i, o: count.append(o.shape[0]))
    args = distill_args(tmp_path, per_device_train_batch_size=8, num_train_epochs=1, convergence_patience=None)
    trainer = FastBertDistillationTrainer(
        model=model, args=args, train_dataset=data, eval_dataset=held_out, processing_class=tokenizer
    )
    assert trainer._cache_states() is None and count == []  # refused from the token count alone
    monkeypatch.setattr(trainer_fastbert, "MAX_CACHE_BYTES", size)
    train, evaluation = trainer._cache_states()
    assert len(train) == 48 and len(evaluation) == 16 and sum(count) == 48 + 16

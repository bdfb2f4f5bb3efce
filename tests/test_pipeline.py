"""The text-classification pipeline with FastBERT's `speed`, and `hf_fastbert.pipeline`."""

import inspect
import json

import pytest
import torch
import transformers
from tiny_models import sentiment_fastbert
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    TextClassificationPipeline,
)
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.testing_utils import CaptureLogger

import hf_fastbert
from hf_fastbert import FastBertTextClassificationPipeline


NUM_LAYERS = 4
WORDS = "the a film movie good bad great awful plot actor boring fun long short gem mess".split()
TEXTS = [
    "the film good",
    "a bad movie long boring",
    "gem",
    "the plot actor awful mess fun",
    "great fun",
    "short mess",
    "the the the",
    "actor",
]
PAIR = {"text": "gem", "text_pair": "bad bad"}  # exits at layer 2 at speed 0.6, at full depth at the default 0.3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one intra-op thread, and stay fast when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fastbert_and_tokenizer():
    """A seeded 4-layer FastBERT with default speed 0.3; branch weights scaled so that samples exit early."""
    return sentiment_fastbert(WORDS)


@pytest.fixture(scope="module")
def tokenizer(fastbert_and_tokenizer):
    return fastbert_and_tokenizer[1]


@pytest.fixture(scope="module")
def fastbert(fastbert_and_tokenizer):
    return fastbert_and_tokenizer[0]


@pytest.fixture(scope="module")
def bert(tokenizer):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        num_labels=3,
    )
    return BertForSequenceClassification(config).eval()


def expected(model, tokenizer, speed, texts=TEXTS):
    """What the model itself says for each text alone: (labels, softmax scores, exit layers, logits)."""
    labels, scores, exits, logits = [], [], [], []
    with torch.no_grad():
        for text in texts:
            inputs = tokenizer(**text) if isinstance(text, dict) else tokenizer(text)
            output = model(**{key: torch.tensor([value]) for key, value in inputs.items()}, speed=speed)
            probabilities = output.logits[0].softmax(-1)
            labels.append(model.config.id2label[int(probabilities.argmax())])
            scores.append(float(probabilities.max()))
            exits.append(int(output.exit_layers[0]))
            logits.append(output.logits[0])
    return labels, scores, exits, logits


def assert_results(results, model, tokenizer, speed, texts=TEXTS):
    labels, scores, exits, _ = expected(model, tokenizer, speed, texts)
    assert [r["label"] for r in results] == labels
    assert [r["exit_layer"] for r in results] == exits
    assert [r["score"] for r in results] == pytest.approx(scores, abs=1e-5)


def test_import_registers_the_pipeline_for_text_classification_only(fastbert, tokenizer, tmp_path):
    entry = PIPELINE_REGISTRY.supported_tasks["text-classification"]
    assert entry["impl"] is FastBertTextClassificationPipeline
    # Everything else in the entry is the stock one.
    assert entry["pt"] == (transformers.AutoModelForSequenceClassification,)
    assert entry["default"]["model"][0] == "distilbert/distilbert-base-uncased-finetuned-sst-2-english"
    assert entry["type"] == "text"
    for task in ("text-classification", "sentiment-analysis"):
        assert (
            type(transformers.pipeline(task, model=fastbert, tokenizer=tokenizer))
            is FastBertTextClassificationPipeline
        )
    # A saved pipeline is not a custom pipeline: no custom_pipelines entry, no pipeline code in the folder.
    transformers.pipeline("text-classification", model=fastbert, tokenizer=tokenizer).save_pretrained(tmp_path)
    assert "custom_pipelines" not in json.loads((tmp_path / "config.json").read_text())
    assert not (tmp_path / "pipeline_fastbert.py").exists()


def test_speed_at_construction_is_honoured(fastbert, tokenizer):
    classifier = transformers.pipeline("text-classification", model=fastbert, tokenizer=tokenizer, speed=0.6)
    results = classifier(TEXTS, return_exit_layer=True)
    assert_results(results, fastbert, tokenizer, 0.6)
    exits = [r["exit_layer"] for r in results]
    assert min(exits) < NUM_LAYERS and max(exits) == NUM_LAYERS  # both early and full-depth exits are covered


def test_per_call_speed_overrides_and_does_not_stick(fastbert, tokenizer):
    classifier = transformers.pipeline("text-classification", model=fastbert, tokenizer=tokenizer, speed=0.6)
    assert_results(classifier(TEXTS, speed=0.9, return_exit_layer=True), fastbert, tokenizer, 0.9)
    assert_results(classifier(TEXTS, speed=0.0, return_exit_layer=True), fastbert, tokenizer, 0.0)
    assert_results(classifier(TEXTS, return_exit_layer=True), fastbert, tokenizer, 0.6)


def test_without_speed_the_model_default_applies(fastbert, tokenizer):
    classifier = transformers.pipeline("text-classification", model=fastbert, tokenizer=tokenizer)
    assert_results(classifier(TEXTS, return_exit_layer=True), fastbert, tokenizer, fastbert.config.speed)
    assert all(set(result) == {"label", "score"} for result in classifier(TEXTS))  # stock shape by default


def test_batch_size_gives_the_same_results(fastbert, tokenizer):
    classifier = transformers.pipeline("text-classification", model=fastbert, tokenizer=tokenizer, speed=0.6)
    unbatched = classifier(TEXTS, return_exit_layer=True, top_k=None)
    for batched in (
        classifier(TEXTS, return_exit_layer=True, top_k=None, batch_size=3),
        transformers.pipeline(
            "text-classification", model=fastbert, tokenizer=tokenizer, speed=0.6, batch_size=8, top_k=None
        )(TEXTS, return_exit_layer=True),
    ):
        for one, other in zip(unbatched, batched, strict=True):
            assert [(r["label"], r["exit_layer"]) for r in one] == [(r["label"], r["exit_layer"]) for r in other]
            assert [r["score"] for r in one] == pytest.approx([r["score"] for r in other], abs=1e-5)


def test_top_k_and_function_to_apply_follow_the_exit(fastbert, tokenizer):
    classifier = transformers.pipeline("text-classification", model=fastbert, tokenizer=tokenizer)
    _, _, exits, logits = expected(fastbert, tokenizer, 0.6)
    results = classifier(TEXTS, speed=0.6, top_k=None, function_to_apply="none", return_exit_layer=True)
    for result, exit_layer, sample_logits in zip(results, exits, logits, strict=True):
        assert [r["label"] for r in result] == [["negative", "positive"][i] for i in sample_logits.argsort(-1, True)]
        assert sorted(r["score"] for r in result) == pytest.approx(sorted(sample_logits.tolist()), abs=1e-5)
        assert {r["exit_layer"] for r in result} == {exit_layer}
    single = classifier(TEXTS[0], speed=0.6, top_k=1, function_to_apply="sigmoid")
    assert single[0]["score"] == pytest.approx(float(logits[0].sigmoid().max()), abs=1e-5)


def test_sentence_pairs(fastbert, tokenizer):
    classifier = transformers.pipeline("text-classification", model=fastbert, tokenizer=tokenizer, speed=0.6)
    result = classifier(PAIR, return_exit_layer=True)
    assert_results([result], fastbert, tokenizer, 0.6, texts=[PAIR])
    assert result["exit_layer"] < NUM_LAYERS
    assert_results(classifier([PAIR, PAIR], return_exit_layer=True), fastbert, tokenizer, 0.6, texts=[PAIR, PAIR])


@pytest.mark.parametrize(
    "inputs, kwargs",
    [
        (TEXTS, {}),
        (TEXTS[0], {}),
        (TEXTS, {"top_k": None}),
        (TEXTS[1], {"top_k": 2}),
        (TEXTS, {"function_to_apply": "sigmoid"}),
        (TEXTS, {"function_to_apply": "none", "top_k": None}),
        (PAIR, {}),
        ([PAIR, PAIR], {"top_k": 1}),
        (TEXTS, {"batch_size": 3}),
        (TEXTS, {"truncation": True, "max_length": 4}),
    ],
)
def test_same_as_stock_pipeline_without_fastbert_options(fastbert, bert, tokenizer, inputs, kwargs):
    for model in (fastbert, bert):
        ours = transformers.pipeline("text-classification", model=model, tokenizer=tokenizer)
        stock = TextClassificationPipeline(model=model, tokenizer=tokenizer)
        assert ours(inputs, **kwargs) == stock(inputs, **kwargs)


def test_exit_rule_at_construction_and_per_call(fastbert, tokenizer):
    def exits(rule, speed):
        with torch.no_grad():
            return [
                int(
                    fastbert(
                        **{k: torch.tensor([v]) for k, v in tokenizer(text).items()}, speed=speed, exit_rule=rule
                    ).exit_layers[0]
                )  # fmt: skip
                for text in TEXTS
            ]

    classifier = hf_fastbert.pipeline("text-classification", model=fastbert, tokenizer=tokenizer, exit_rule="patience")
    results = classifier(TEXTS, speed=0.9, return_exit_layer=True)
    assert [r["exit_layer"] for r in results] == exits("patience", 0.9)
    assert exits("patience", 0.9) != exits("entropy", 0.9)  # the rule made a difference
    results = classifier(TEXTS, speed=0.9, exit_rule="entropy", return_exit_layer=True)
    assert [r["exit_layer"] for r in results] == exits("entropy", 0.9)
    with pytest.raises(ValueError, match="`exit_rule` must be one of"):
        classifier(TEXTS, exit_rule="fastest")


def test_non_fastbert_models_refuse_fastbert_options(bert, tokenizer):
    with pytest.raises(ValueError, match="`speed` is a FastBERT option.*BertForSequenceClassification"):
        transformers.pipeline("text-classification", model=bert, tokenizer=tokenizer, speed=0.1)
    classifier = transformers.pipeline("text-classification", model=bert, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="`speed` is a FastBERT option"):
        classifier(TEXTS, speed=0.1)
    with pytest.raises(ValueError, match="`return_exit_layer` is a FastBERT option"):
        classifier(TEXTS, return_exit_layer=True)


def test_fastbert_is_a_supported_model(fastbert, tokenizer):
    logger = transformers.utils.logging.get_logger("transformers.pipelines.base")
    with CaptureLogger(logger) as captured:
        transformers.pipeline("text-classification", model=fastbert, tokenizer=tokenizer)
    assert "is not supported" not in captured.out


@pytest.mark.parametrize("speed", [1.5, -0.1, float("nan"), "fast", True])
def test_invalid_speed_is_refused(fastbert, tokenizer, speed):
    with pytest.raises(ValueError, match="speed"):
        transformers.pipeline("text-classification", model=fastbert, tokenizer=tokenizer, speed=speed)
    classifier = transformers.pipeline("text-classification", model=fastbert, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="speed"):
        classifier(TEXTS, speed=speed)
    with pytest.raises(ValueError, match="speed"):
        hf_fastbert.pipeline("text-classification", model=fastbert, tokenizer=tokenizer, speed=speed)


def test_training_mode_with_speed_is_refused(fastbert, tokenizer):
    classifier = transformers.pipeline("text-classification", model=fastbert, tokenizer=tokenizer)
    fastbert.train()
    try:
        with pytest.raises(ValueError, match=r"training mode.*model\.eval\(\)"):
            classifier(TEXTS[0], speed=0.6)
        torch.manual_seed(0)
        assert classifier(TEXTS[0], speed=0.0)[0]["label"] in ("negative", "positive")  # as stock: runs, dropout on
    finally:
        fastbert.eval()


def test_from_a_local_path(fastbert, tokenizer, tmp_path):
    fastbert.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    classifier = transformers.pipeline("text-classification", model=str(tmp_path), speed=0.6)
    assert_results(classifier(TEXTS, return_exit_layer=True), fastbert, tokenizer, 0.6)


def test_hf_fastbert_pipeline_signature_is_transformers_plus_speed():
    ours = inspect.signature(hf_fastbert.pipeline).parameters
    theirs = inspect.signature(transformers.pipeline).parameters
    assert [name for name in ours if name not in ("speed", "exit_rule")] == list(theirs)
    for name, parameter in theirs.items():
        assert (ours[name].kind, ours[name].default) == (parameter.kind, parameter.default), name
    assert (ours["speed"].kind, ours["speed"].default) == (inspect.Parameter.KEYWORD_ONLY, None)
    assert (ours["exit_rule"].kind, ours["exit_rule"].default) == (inspect.Parameter.KEYWORD_ONLY, None)


def test_hf_fastbert_pipeline_has_no_global_side_effects(fastbert, tokenizer, monkeypatch):
    stock = {**PIPELINE_REGISTRY.supported_tasks["text-classification"], "impl": TextClassificationPipeline}
    monkeypatch.setitem(PIPELINE_REGISTRY.supported_tasks, "text-classification", stock)  # as if never registered
    registry = {task: dict(entry) for task, entry in PIPELINE_REGISTRY.supported_tasks.items()}

    classifier = hf_fastbert.pipeline(model=fastbert, tokenizer=tokenizer, speed=0.6)  # task inferred
    assert type(classifier) is FastBertTextClassificationPipeline
    assert_results(classifier(TEXTS, return_exit_layer=True), fastbert, tokenizer, 0.6)
    assert type(hf_fastbert.pipeline("sentiment-analysis", model=fastbert, tokenizer=tokenizer)) is (
        FastBertTextClassificationPipeline
    )
    assert {task: dict(entry) for task, entry in PIPELINE_REGISTRY.supported_tasks.items()} == registry
    assert type(transformers.pipeline("text-classification", model=fastbert, tokenizer=tokenizer)) is (
        TextClassificationPipeline
    )


def test_hf_fastbert_pipeline_refuses_speed_for_other_tasks(fastbert, tokenizer):
    with pytest.raises(ValueError, match="text-classification"):
        hf_fastbert.pipeline("fill-mask", model=fastbert, tokenizer=tokenizer, speed=0.1)

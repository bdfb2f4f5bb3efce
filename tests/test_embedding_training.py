"""Training FastBERT sentence embedding heads: the trainer, `train_embedding_heads`, the sentence-transformers folder
it writes, `hf-fastbert train-embedding` and their bad inputs, on a tiny BERT built in code."""

import json
import random

import pytest
import torch
from tiny_models import family_config
from tolerances import LOGITS_ATOL
from transformers import BertTokenizerFast

from hf_fastbert import (
    FastBertConfig,
    FastBertEmbeddingTrainer,
    FastBertForSentenceEmbedding,
    FastBertForSequenceClassification,
    FastBertTrainingArguments,
    train_embedding_heads,
)
from hf_fastbert.cli import main
from hf_fastbert.data import read_texts_file
from hf_fastbert.modelcard import render_embedding_model_card


WORDS = "good bad movie film plot actor great terrible boring fun the a was is".split()


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {token: index for index, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}
    return BertTokenizerFast(vocab=vocab)


def tiny_embedder(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = FastBertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=64,
    )  # fmt: skip
    return FastBertForSentenceEmbedding(config)


def random_texts(count, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(count)]


def encode(model, tokenizer, texts, **kwargs):
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**batch, **kwargs)


def test_trainer_distills_the_heads_only(tokenizer, tmp_path):
    model = tiny_embedder(tokenizer)
    base_before = {name: value.clone() for name, value in model.bert.state_dict().items()}
    heads_before = [parameter.clone() for parameter in model.embedding_heads.parameters()]
    tokenized = [tokenizer(text) for text in random_texts(160)]
    args = FastBertTrainingArguments(
        str(tmp_path),
        num_train_epochs=3,
        per_device_train_batch_size=16,
        save_strategy="no",
        report_to=[],
        dataloader_pin_memory=False,  # no accelerator here: pinning would only warn
    )
    trainer = FastBertEmbeddingTrainer(model, args, train_dataset=tokenized, processing_class=tokenizer)
    first = trainer.evaluate()
    assert not model.config.embedding_heads_distilled
    trainer.train()
    last = trainer.evaluate()
    assert last["eval_loss"] < first["eval_loss"]
    assert {f"eval_distance_head_{layer}" for layer in (1, 2, 3)} <= set(last)
    assert model.config.embedding_heads_distilled and trainer.convergence["steps"] > 0
    # Frozen parameters are never touched by the optimizer: the same bytes.
    assert all(torch.equal(value, model.bert.state_dict()[name]) for name, value in base_before.items())
    assert not all(torch.equal(a, b) for a, b in zip(heads_before, model.embedding_heads.parameters(), strict=True))


def test_trainer_refuses_classifiers(tokenizer, tmp_path):
    args = FastBertTrainingArguments(str(tmp_path), report_to=[])
    with pytest.raises(ValueError, match="text classifier"):
        FastBertEmbeddingTrainer(FastBertForSequenceClassification(family_config("bert")), args)
    classifier = FastBertForSequenceClassification(family_config("bert"))
    classifier.save_pretrained(tmp_path / "classifier")
    from_classifier = FastBertForSentenceEmbedding.from_pretrained(tmp_path / "classifier")
    with pytest.raises(ValueError, match="classification checkpoint"):
        FastBertEmbeddingTrainer(from_classifier, args)
    with pytest.raises(ValueError, match="classification checkpoint"):
        train_embedding_heads(from_classifier, tokenizer, random_texts(10), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_train_embedding_heads_writes_a_sentence_transformers_folder(tokenizer, tmp_path):
    from sentence_transformers import SentenceTransformer

    model = tiny_embedder(tokenizer)
    texts = random_texts(200)
    output = train_embedding_heads(model, tokenizer, texts, tmp_path / "out", max_epochs=2, speeds=[0, 0.05, 0.3])
    files = set(path.name for path in (tmp_path / "out").iterdir())
    assert {"modules.json", "README.md", "embedding_results.json", "config.json", "model.safetensors"} <= files
    assert "_checkpoints" not in files and "training_run.json" in files
    assert [row["speed"] for row in output.results] == [0.0, 0.05, 0.3]
    assert output.results[0]["cosine"] == pytest.approx(1.0) and output.results[0]["flops_speedup"] == 1.0
    saved = json.loads((tmp_path / "out" / "embedding_results.json").read_text())
    assert saved["results"] == output.results and saved["texts"] == 20  # the held-out tenth
    card = (tmp_path / "out" / "README.md").read_text()
    assert "library_name: sentence-transformers" in card and "| 0.05 |" in card

    with pytest.raises(ValueError, match="trust_remote_code"):
        SentenceTransformer(str(tmp_path / "out"), device="cpu")
    loaded = SentenceTransformer(str(tmp_path / "out"), device="cpu", trust_remote_code=True)
    some = texts[:7]
    for speed in (0.0, 0.3):
        expected = encode(model, tokenizer, some, speed=speed)
        got = loaded.encode(some, speed=speed, convert_to_tensor=True)
        torch.testing.assert_close(got, expected.embeddings, rtol=0, atol=LOGITS_ATOL)
    features = loaded.encode(some, speed=0.3, output_value=None)
    assert [int(feature["exit_layers"]) for feature in features] == expected.exit_layers.tolist()
    assert loaded.get_embedding_dimension() == 32


@pytest.mark.parametrize(
    "texts, options, error, match",
    [
        (["only one"], {}, ValueError, "at least 2"),
        (["fine", ""], {}, ValueError, "text 1 is empty"),
        ("a string", {}, ValueError, "list of texts"),
        (["a", "b"], {"max_epochs": 0}, ValueError, "max_epochs"),
        (["a", "b"], {"epochs": 3}, TypeError, "unknown options"),
        (["a", "b"], {"max_length": 10_000}, ValueError, "max_length"),
    ],
)
def test_bad_inputs_are_refused_before_training(tokenizer, tmp_path, texts, options, error, match):
    with pytest.raises(error, match=match):
        train_embedding_heads(tiny_embedder(tokenizer), tokenizer, texts, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_a_foreign_output_folder_is_not_replaced(tokenizer, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a previous training run"):
        train_embedding_heads(tiny_embedder(tokenizer), tokenizer, random_texts(20), tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_read_texts_file(tmp_path):
    (tmp_path / "texts.txt").write_text("first text\n\n  second text  \n")
    assert read_texts_file(tmp_path / "texts.txt") == ["first text", "second text"]
    (tmp_path / "texts.csv").write_text("body,other\nhello there,1\nsecond,2\n")
    assert read_texts_file(tmp_path / "texts.csv", "body") == ["hello there", "second"]
    with pytest.raises(ValueError, match="no column 'text'"):
        read_texts_file(tmp_path / "texts.csv")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no text"):
        read_texts_file(tmp_path / "empty.txt")


def test_train_embedding_command(tokenizer, tmp_path, capsys):
    model = tiny_embedder(tokenizer)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "texts.txt").write_text("\n".join(random_texts(120)))
    out = tmp_path / "out"
    code = main(["train-embedding", str(tmp_path / "model"), str(tmp_path / "texts.txt"), "--output-dir", str(out),
                 "--max-epochs", "1", "--speeds", "0", "0.1"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "mean_exit_layer" in printed and "trust_remote_code=True" in printed
    assert (out / "modules.json").is_file()
    # The classifier commands refuse it with a line saying what takes it; the server's loader takes it.
    assert main(["predict", str(out), "good movie"]) == 1
    assert "sentence embedding model" in capsys.readouterr().err
    from hf_fastbert.loading import load_fastbert

    loaded, _ = load_fastbert(str(out), embeddings=True)
    assert isinstance(loaded, FastBertForSentenceEmbedding) and loaded.config.embedding_heads_distilled
    # Bad input: one line, the right exit code, nothing written.
    assert main(["train-embedding", str(tmp_path / "model"), str(tmp_path / "missing.txt")]) == 1
    assert "missing.txt does not exist" in capsys.readouterr().err
    assert main(["train-embedding", str(tmp_path / "model"), str(tmp_path / "texts.txt"), "--max-epochs", "0"]) == 2
    assert "--max-epochs" in capsys.readouterr().err
    classifier = FastBertForSequenceClassification(family_config("bert", vocab_size=tokenizer.vocab_size))
    classifier.save_pretrained(tmp_path / "classifier")
    tokenizer.save_pretrained(tmp_path / "classifier")
    code = main(["train-embedding", str(tmp_path / "classifier"), str(tmp_path / "texts.txt"),
                 "--output-dir", str(tmp_path / "never")])  # fmt: skip
    assert code == 1 and "classification checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_card_of_undistilled_heads_says_so(tokenizer):
    card = render_embedding_model_card(tiny_embedder(tokenizer), repo_id="me/model")
    assert "Not distilled" in card and "fastbert-not-distilled" in card and 'SentenceTransformer("me/model"' in card


def test_feature_extraction_pipeline_with_speed(tokenizer):
    from transformers import pipeline as transformers_pipeline

    from hf_fastbert import pipeline
    from hf_fastbert.pipeline_fastbert import FastBertFeatureExtractionPipeline

    model = tiny_embedder(tokenizer).eval()
    model.config.embedding_heads_distilled = True
    texts = random_texts(5, seed=3)
    embed = transformers_pipeline("feature-extraction", model=model, tokenizer=tokenizer)
    assert isinstance(embed, FastBertFeatureExtractionPipeline)
    for speed in (0.0, 0.5):
        got = torch.tensor([row[0] for row in embed(texts, speed=speed)])  # one (1, D) embedding per input
        expected = torch.cat([encode(model, tokenizer, [text], speed=speed).embeddings for text in texts])
        torch.testing.assert_close(got, expected, rtol=0, atol=LOGITS_ATOL)
    assert isinstance(pipeline(model=model, tokenizer=tokenizer, speed=0.5), FastBertFeatureExtractionPipeline)
    with pytest.raises(ValueError, match="speed"):
        embed(texts, speed=1.5)
    from transformers import BertModel

    stock = transformers_pipeline("feature-extraction", model=BertModel(family_config("bert", fastbert=False)),
                                  tokenizer=tokenizer)  # fmt: skip
    assert len(stock("good movie")[0]) == 4  # per-token states, as stock: [CLS] good movie [SEP]
    with pytest.raises(ValueError, match="sentence embedding models"):
        stock("good movie", speed=0.5)


@pytest.mark.parametrize("family", ["bert", "modernbert", "deberta-v2", "albert"])
def test_heads_on_cached_states_match_the_model(family):
    from tiny_models import random_batch

    from hf_fastbert.modeling_fastbert_embedding import FASTBERT_EMBEDDING_MODELS
    from hf_fastbert.trainer_fastbert_embedding import (
        EmbeddingHeadsOnStates,
        cache_head_inputs,
        collate_head_inputs,
    )

    torch.manual_seed(0)
    config = family_config(family)
    model = FASTBERT_EMBEDDING_MODELS[type(config)](config).eval()
    input_ids, attention_mask = random_batch(batch_size=6)
    entries = cache_head_inputs(model, [{"input_ids": input_ids, "attention_mask": attention_mask}])
    assert [entry["states"].shape[1] for entry in entries] == attention_mask.sum(1).tolist()
    batch = collate_head_inputs(entries)
    with torch.no_grad():
        cached = EmbeddingHeadsOnStates(model)(**batch, output_all_embeddings=True)
        expected = model(input_ids, attention_mask, output_all_embeddings=True, return_loss=True)
    # The cache holds float16 states: the heads' embeddings agree to its rounding; the targets exactly as computed.
    torch.testing.assert_close(cached.all_embeddings, expected.all_embeddings, rtol=0, atol=5e-3)
    torch.testing.assert_close(cached.loss, expected.loss, rtol=0, atol=5e-3)


def test_training_without_the_cache(tokenizer, tmp_path):
    output = train_embedding_heads(
        tiny_embedder(tokenizer), tokenizer, random_texts(60), tmp_path / "out", max_epochs=1, cache_states=False
    )
    assert output.model.config.embedding_heads_distilled and output.convergence["steps"] > 0


def test_push_command_uploads_a_sentence_transformers_repository(tokenizer, tmp_path, monkeypatch, capsys):
    from hub_server import HubServer

    model = tiny_embedder(tokenizer)
    train_embedding_heads(model, tokenizer, random_texts(60), tmp_path / "out", max_epochs=1, speeds=[0, 0.1])
    with HubServer(tokens={"hf_test_token": "alice"}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        assert main(["push", str(tmp_path / "out"), "alice/embedder"]) == 0
        files = hub.files("alice/embedder")
    assert {"modules.json", "sentence_bert_config.json", "config.json", "model.safetensors", "README.md"} <= set(files)
    assert not {"training_run.json", "embedding_results.json"} & set(files)
    card = files["README.md"].decode()
    assert "| 0.1 |" in card and 'SentenceTransformer("alice/embedder"' in card and "## Training" in card
    assert "pushed the sentence embedding model" in capsys.readouterr().out

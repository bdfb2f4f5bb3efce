"""sentence-transformers integration: a FastBERT embedding model as one sentence-transformers input module, so that
`SentenceTransformer(folder, trust_remote_code=True).encode(texts, speed=0.1)` exits early.

One module does the work of the stock `Transformer` + `Pooling` + `Normalize` trio: the pooling and normalization
are the model's own (`embedding_pooling`, `normalize_embeddings` in its config), because the exits need them after
every layer, not only after the last. sentence-transformers 6 imports a module class from outside its own package
only with `trust_remote_code=True`, for local folders too: here that trusts the installed `hf_fastbert` package,
not code from the folder (the folder holds none).

Requires `pip install hf-fastbert[embeddings]` (sentence-transformers >= 6).
"""

from sentence_transformers.base.modules import InputModule
from transformers import AutoTokenizer

from .modeling_fastbert_embedding import FastBertForSentenceEmbedding


class FastBertSentenceEmbedding(InputModule):
    """
    A [`FastBertForSentenceEmbedding`] and its tokenizer as a sentence-transformers input module. `forward` adds
    `sentence_embedding`, `exit_layers` and `flops` to the features; `speed` comes per call
    (`model.encode(texts, speed=0.1)`) or from the module (`speed`, saved with it), else from the model's config.

    Args:
        model: the embedding model.
        tokenizer: its tokenizer.
        max_seq_length: longer inputs are truncated (default: the model's `embedding_max_length`, the stock
            sentence-transformers model's; else the tokenizer's `model_max_length`, capped by the model's positions).
        speed: the default speed of this module (`None`: the model's `config.speed`).
    """

    config_file_name = "sentence_bert_config.json"
    config_keys = ["max_seq_length", "speed"]
    forward_kwargs = {"speed"}

    def __init__(self, model: FastBertForSentenceEmbedding, tokenizer, max_seq_length: int | None = None, speed=None):
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        if max_seq_length is None:
            from .backbones import max_input_length

            longest = min(getattr(tokenizer, "model_max_length", 512), max_input_length(model.config))
            max_seq_length = model.config.embedding_max_length or (int(longest) if longest < 10**6 else 512)
        self.max_seq_length = max_seq_length
        self.speed = speed

    def preprocess(self, inputs, prompt: str | None = None, **kwargs) -> dict:
        """Tokenize texts (or text pairs) into padded tensors."""
        texts = [prompt + text for text in inputs] if prompt else list(inputs)
        if texts and isinstance(texts[0], (list, tuple)):
            first, second = zip(*texts, strict=True)
            texts, pairs = list(first), list(second)
        else:
            pairs = None
        return self.tokenizer(
            texts, pairs, padding=True, truncation=True, max_length=self.max_seq_length, return_tensors="pt"
        )

    def forward(self, features: dict, speed: float | None = None, **kwargs) -> dict:
        names = ("input_ids", "attention_mask", "token_type_ids")
        inputs = {name: features[name] for name in names if features.get(name) is not None}
        if "token_type_ids" not in self.model.backbone.embedding_inputs:
            inputs.pop("token_type_ids", None)
        output = self.model(**inputs, speed=self.speed if speed is None else speed)
        features.update(sentence_embedding=output.embeddings, exit_layers=output.exit_layers, flops=output.flops)
        return features

    def get_embedding_dimension(self) -> int:
        return self.model.config.hidden_size

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.model.save_pretrained(output_path, safe_serialization=safe_serialization)
        self.tokenizer.save_pretrained(output_path)
        self.save_config(output_path)

    @classmethod
    def load(
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        token=None,
        cache_folder=None,
        revision=None,
        local_files_only: bool = False,
        **kwargs,
    ):
        hub = {"token": token, "cache_dir": cache_folder, "revision": revision, "local_files_only": local_files_only}
        if subfolder:
            hub["subfolder"] = subfolder
        config = cls.load_config(
            model_name_or_path,
            subfolder=subfolder,
            token=token,
            cache_folder=cache_folder,
            revision=revision,
            local_files_only=local_files_only,
        )
        model = FastBertForSentenceEmbedding.from_pretrained(model_name_or_path, **hub)
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, **hub)
        return cls(model, tokenizer, **config)


def to_sentence_transformer(model: FastBertForSentenceEmbedding, tokenizer, speed: float | None = None, **kwargs):
    """
    A `SentenceTransformer` around `model` (one [`FastBertSentenceEmbedding`] module); `save(folder)` writes a folder
    that `SentenceTransformer(folder, trust_remote_code=True)` loads. `kwargs` go to `FastBertSentenceEmbedding`.
    """
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(
        modules=[FastBertSentenceEmbedding(model, tokenizer, speed=speed, **kwargs)], device=str(model.device)
    )


def save_sentence_transformer(model, tokenizer, folder, **card):
    """Write `model` and `tokenizer` into `folder` as a sentence-transformers folder, with the FastBERT embedding
    model card ([`hf_fastbert.modelcard.write_embedding_model_card`]; `card`: its arguments)."""
    from .modelcard import write_embedding_model_card

    to_sentence_transformer(model, tokenizer).save(str(folder), create_model_card=False)
    write_embedding_model_card(folder, model, **card)


__all__ = ["FastBertSentenceEmbedding", "save_sentence_transformer", "to_sentence_transformer"]

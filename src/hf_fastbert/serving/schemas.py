"""Requests: TEI's `POST /predict` and `POST /embed` shapes, parsed and checked, with the errors the server answers."""

import json
from dataclasses import dataclass

from ..configuration_fastbert import validate_speed
from ..prediction import check_text


class RequestError(Exception):
    """A request the server refuses: HTTP `status`, TEI's `error_type` and a message naming the problem."""

    def __init__(self, status: int, error_type: str, message: str):
        super().__init__(message)
        self.status, self.error_type, self.message = status, error_type, message


@dataclass
class PredictRequest:
    """A parsed `POST /predict` body (TEI's `PredictRequest` plus FastBERT's `speed`)."""

    texts: list[str]
    pairs: list[str | None]
    single: bool
    raw_scores: bool = False
    truncate: bool | None = None
    truncation_direction: str = "right"
    speed: float | None = None


@dataclass
class EmbedRequest:
    """A parsed `POST /embed` body (TEI's `EmbedRequest` plus FastBERT's `speed`)."""

    texts: list[str]
    single: bool
    normalize: bool = True
    truncate: bool | None = None
    truncation_direction: str = "right"
    speed: float | None = None

    @property
    def pairs(self) -> list[None]:
        return [None] * len(self.texts)


BATCH_SHAPE_HINT = 'a batch is a list of lists: [["text 1"], ["text 2"], ["first text", "second text"]]'


def _text(value: str, where: str) -> str:
    try:
        return check_text(value, where)
    except ValueError as error:  # a lone surrogate: JSON allows it, the tokenizer does not
        raise RequestError(422, "validation", str(error)) from None


def _sequence(value, where: str) -> tuple[str, str | None]:
    if isinstance(value, list) and len(value) in (1, 2) and all(isinstance(text, str) for text in value):
        return _text(value[0], where), _text(value[1], where) if len(value) == 2 else None
    raise RequestError(
        422, "validation", f"{where} must be a list of one text or a pair of texts, got {json.dumps(value)[:100]}"
    )


def parse_inputs(inputs) -> tuple[list[tuple[str, str | None]], bool]:
    """
    TEI's `inputs`: a string; a list of one string or a pair of strings (one input); or a batch, a list of such
    lists (`[["a"], ["b", "c"]]`). Returns `(inputs as (text, pair or None), single)`.

    As in TEI, a list of two strings is ONE sentence pair, not two texts, and a list of three or more strings is
    refused.
    """
    if isinstance(inputs, str):
        return [(_text(inputs, "`inputs`"), None)], True
    if not isinstance(inputs, list):
        raise RequestError(
            422, "validation", f"`inputs` must be a string, a pair of strings or a batch; {BATCH_SHAPE_HINT}"
        )
    if not inputs:
        raise RequestError(400, "empty", "`inputs` cannot be empty")
    if all(isinstance(value, str) for value in inputs):
        if len(inputs) > 2:
            raise RequestError(
                422,
                "validation",
                f"a list of strings is one text or one sentence pair, not {len(inputs)} strings; {BATCH_SHAPE_HINT}",
            )
        return [_sequence(inputs, "`inputs`")], True
    return [_sequence(value, f"`inputs[{index}]`") for index, value in enumerate(inputs)], False


def parse_predict_request(payload) -> PredictRequest:
    """Validate a decoded `POST /predict` JSON body; raises [`RequestError`] naming the problem."""
    if not isinstance(payload, dict):
        raise RequestError(422, "validation", 'the body must be a JSON object such as {"inputs": "some text"}')
    if "inputs" not in payload:
        raise RequestError(422, "validation", 'the body has no `inputs` field: send {"inputs": "some text"}')
    inputs, single = parse_inputs(payload["inputs"])
    request = PredictRequest([text for text, _ in inputs], [pair for _, pair in inputs], single)
    _parse_options(payload, request, ("raw_scores", "truncate"))
    request.raw_scores = bool(payload.get("raw_scores") or False)
    return request


def parse_embed_request(payload) -> EmbedRequest:
    """
    Validate a decoded `POST /embed` JSON body: TEI's `inputs` (a string or a list of strings), `normalize` (default
    true), `truncate`, `truncation_direction`, plus `speed`; raises [`RequestError`] naming the problem.
    """
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise RequestError(422, "validation", 'the body must be a JSON object such as {"inputs": "some text"}')
    inputs = payload["inputs"]
    if isinstance(inputs, str):
        request = EmbedRequest([_text(inputs, "`inputs`")], True)
    elif isinstance(inputs, list) and all(isinstance(text, str) for text in inputs):
        if not inputs:
            raise RequestError(400, "empty", "`inputs` cannot be empty")
        request = EmbedRequest([_text(text, f"`inputs[{index}]`") for index, text in enumerate(inputs)], False)
    else:
        raise RequestError(422, "validation", "`inputs` must be a string or a list of strings")
    _parse_options(payload, request, ("normalize", "truncate"))
    request.normalize = payload.get("normalize") is not False
    return request


def _parse_options(payload: dict, request, flags) -> None:
    """The options both routes share: boolean `flags`, `truncate`, `truncation_direction` and `speed`."""
    for name in flags:
        value = payload.get(name)
        if value is not None and not isinstance(value, bool):
            raise RequestError(422, "validation", f"`{name}` must be true or false, got {json.dumps(value)}")
    request.truncate = payload.get("truncate")
    direction = payload.get("truncation_direction", "right")
    if not isinstance(direction, str) or direction.lower() not in ("left", "right"):
        raise RequestError(422, "validation", f'`truncation_direction` must be "Left" or "Right", got {direction!r}')
    request.truncation_direction = direction.lower()
    speed = payload.get("speed")
    if speed is not None:
        if isinstance(speed, bool) or not isinstance(speed, (int, float)):
            raise RequestError(422, "validation", f"`speed` must be a number in [0, 1], got {json.dumps(speed)}")
        try:
            validate_speed(float(speed))
        except ValueError:
            raise RequestError(422, "validation", f"`speed` must be a number in [0, 1], got {speed}") from None
        request.speed = float(speed)

"""The request and response bodies of the served OpenAI endpoints, as Pydantic models.

They follow the OpenAI API's ``CreateCompletionRequest`` / ``CreateChatCompletionRequest`` for
the fields this server serves (types, enums, required fields, ranges; a field the API does not
define is refused, as the API refuses it) plus three extensions (``top_k``, ``ignore_eos`` and
the ``redrafter`` object of a response). :func:`validate_body` checks a request against them;
:func:`openapi_components` publishes them in ``/openapi.json``. What the schema allows but this
engine cannot serve (``n`` > 1, non-zero penalties, a prompt longer than the engine takes, an
unknown model) is refused by name in :mod:`redrafter_trt.serve.app`.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

STRICT = ConfigDict(extra="forbid", strict=True)
#: seeds are 64-bit, as the sampling uniforms' key
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: a token id or a top-k value fits in int32 (the step's tensors)
INT32 = 2**31 - 1

Stop = str | list[str]


class TextPart(BaseModel):
    """``{"type": "text", "text": ...}``: the content part a text-only model takes."""

    model_config = STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One turn; ``developer`` is rendered as a system turn. ``content``: a string or an array
    of text parts (concatenated)."""

    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(min_length=1)]
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool | None = None


class CommonRequest(BaseModel):
    model_config = STRICT
    model: str
    max_tokens: int | None = Field(None, ge=1, le=INT32)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(
        None, ge=-1, le=INT32, description="extension: top-k filter, 0 or -1 = off"
    )
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: Stop | None = Field(None, description="up to 4 strings, excluded from the text")
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=128, description="only 1 is served")
    user: str | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="only 0 is served")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="only 0 is served")
    ignore_eos: bool | None = Field(None, description="extension: do not stop at end-of-sequence")


class CompletionRequest(CommonRequest):
    """``POST /v1/completions`` (one prompt per request)."""

    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=1)]
        | Annotated[list[Annotated[int, Field(ge=0, le=INT32)]], Field(min_length=1)]
    ) = Field(description="a string, a list of one string, or a list of token ids")
    logprobs: int | None = Field(
        None, ge=0, le=5, description="log-probabilities of the tokens and of the N most likely"
    )


class ChatCompletionRequest(CommonRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32)
    logprobs: bool | None = Field(None, description="log-probabilities of the output tokens")
    top_logprobs: int | None = Field(
        None, ge=0, le=20, description="with logprobs: the N most likely tokens at each position"
    )


# --------------------------------------------------------------------------- responses
class OpenModel(BaseModel):
    model_config = ConfigDict(extra="allow")


class Usage(OpenModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Redrafter(OpenModel):
    """Extension: the request's mean tokens per generation step and tokens per step."""

    tokens_per_step: float
    accepted_per_step: list[int]


class CompletionLogprobs(OpenModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(OpenModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(OpenModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    redrafter: Redrafter | None = None


class TopLogprob(OpenModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(OpenModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class AssistantMessage(OpenModel):
    role: Literal["assistant"]
    content: str | None


class ChatChoice(OpenModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(OpenModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    redrafter: Redrafter | None = None


class ErrorObject(OpenModel):
    message: str
    type: str
    param: str | None
    code: int | str | None


class ErrorResponse(OpenModel):
    error: ErrorObject


REQUESTS: dict[str, type[BaseModel]] = {
    "completion": CompletionRequest,
    "chat": ChatCompletionRequest,
}
RESPONSES: dict[str, type[BaseModel]] = {
    "completion": CompletionResponse,
    "chat": ChatCompletionResponse,
}


PROMPT_SHAPES = (
    "expected a non-empty string, a list of one non-empty string, or a non-empty list of "
    f"token ids in [0, {INT32}]"
)


def fields_of(kind: str) -> set[str]:
    """The body fields an endpoint takes."""
    return set(REQUESTS[kind].model_fields)


def _path(loc: tuple) -> str:
    """``messages[0].content`` from a Pydantic error location (union member tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part[:1].islower():
            if part in ("str", "int", "float", "bool", "list", "dict"):
                continue
            out += ("." if out else "") + part
    return out


def validate_body(body: dict, kind: str) -> tuple[str, str | None] | None:
    """None when ``body`` conforms to the endpoint's request schema, else (message, param):
    the first violation, naming the field path and what was expected."""
    try:
        REQUESTS[kind].model_validate(body)
    except ValidationError as e:
        errs = e.errors(include_url=False)
        err = max(errs, key=lambda x: len(x["loc"]))  # the most specific (a union's deepest)
        path = _path(err["loc"]) or "body"
        field = path.split("[")[0].split(".")[0]
        if field == "prompt":  # a union of three shapes: say all three
            err = {"msg": PROMPT_SHAPES, "input": body.get("prompt")}  # type: ignore[typeddict-item]
            path = field
        got = json.dumps(err.get("input"), default=str)
        got = got if len(got) <= 80 else got[:77] + "..."
        return f"'{path}': {err['msg']}, got {got}", field
    return None


def openapi_components() -> dict[str, Any]:
    """JSON schemas of every request and response model, for ``components.schemas``."""
    from pydantic.json_schema import models_json_schema

    Mode = Literal["validation", "serialization"]
    models: list[tuple[type[BaseModel], Mode]] = [(m, "validation") for m in REQUESTS.values()]
    responses: list[type[BaseModel]] = [*RESPONSES.values(), ErrorResponse]
    models += [(m, "serialization") for m in responses]
    _, top = models_json_schema(models, ref_template="#/components/schemas/{model}")
    return top.get("$defs", {})

"""The OpenAI-compatible HTTP app (FastAPI) over one in-flight :class:`Scheduler`.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus text format). Each response carries the request's
mean tokens per generation step in the ``x-redrafter-tokens-per-step`` header (non-streaming) and
in a ``redrafter`` object (``tokens_per_step``, ``accepted_per_step``) of the body or of the last
stream chunk. Stop strings are excluded from the returned text, as the OpenAI API does.

Every request body is checked against the endpoint's request schema
(:mod:`redrafter_trt.serve.schema`, published with the response bodies in ``/openapi.json``),
then against what this engine serves; ``logprobs`` answers carry the base model's own
log-probabilities of the output tokens (the backend's optional ``output_logprobs``).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from .._version import __version__
from ..errors import RedrafterError
from ..runtime.scheduler import Event, QueueFull, SamplingParams, Scheduler, SchedulerClosed
from ..runtime.scheduler import Request as QueuedRequest
from .metrics import ServeMetrics
from .schema import (
    REQUESTS,
    RESPONSES,
    ErrorResponse,
    fields_of,
    openapi_components,
    validate_body,
)

DEFAULT_MAX_TOKENS = {"completion": 16, "chat": 256}
#: a log-probability JSON can hold (the OpenAI API's floor for impossible tokens)
LOGPROB_FLOOR = -9999.0


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type_: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.headers = (
            status,
            message,
            param,
            type_,
            headers,
        )


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


def _number(
    body: dict,
    key: str,
    default: float,
    lo: float | None = None,
    hi: float | None = None,
    integer: bool = False,
) -> Any:
    v = body.get(key, default)
    if v is None:
        return default
    if (
        isinstance(v, bool)
        or not isinstance(v, (int, float))
        or (integer and not isinstance(v, int))
    ):
        raise _bad(
            f"'{key}' must be {'an integer' if integer else 'a number'}, got {json.dumps(v)}", key
        )
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise _bad(f"'{key}' must be in {rng}, got {v}", key)
    return v


class ServeState:
    """What the routes share: the scheduler, tokenizer, model name and metrics."""

    def __init__(self, scheduler: Scheduler, model_name: str, speculative: bool = True):
        self.scheduler = scheduler
        self.tokenizer = scheduler.tokenizer
        self.model_name = model_name
        self.speculative = speculative
        self.metrics = ServeMetrics(scheduler)
        self.created = int(time.time())
        self.closing = False


def _stop_list(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise _bad("'stop' must be a string or a list of at most 4 strings", "stop")
    return tuple(s for s in stop if s)


def parse_request(
    state: ServeState, body: Any, kind: str
) -> tuple[list[int], SamplingParams, bool, bool]:
    """Validate an OpenAI request body; returns (prompt ids, params, stream, include_usage)."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    allowed = fields_of(kind)
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise _bad(
            f"unsupported parameter '{unknown[0]}' (this server supports "
            f"{', '.join(sorted(allowed))})",
            unknown[0],
        )
    invalid = validate_body(body, kind)  # the OpenAI request schema: types, enums, ranges
    if invalid:
        raise _bad(*invalid)
    model = body.get("model")
    if not isinstance(model, str) or model != state.model_name:
        raise _bad(
            f"unknown model {json.dumps(model)}; this server serves '{state.model_name}'", "model"
        )
    if _number(body, "n", 1, integer=True) != 1:
        raise _bad("unsupported parameter 'n': only n = 1 is served", "n")
    for key in ("presence_penalty", "frequency_penalty"):
        if _number(body, key, 0.0) != 0:
            raise _bad(f"unsupported parameter '{key}': only 0 is served", key)
    sched = state.scheduler
    tok = state.tokenizer
    if kind == "completion":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            prompt = prompt[0]  # the schema allows a list of one string
        if isinstance(prompt, str):
            if prompt == "":
                raise _bad("'prompt' is empty", "prompt")
            if tok is None:
                raise _bad(
                    "this engine has no tokenizer: send 'prompt' as a list of token ids", "prompt"
                )
            ids = list(tok(prompt, add_special_tokens=True)["input_ids"])
        elif isinstance(prompt, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            if not prompt:
                raise _bad("'prompt' is empty", "prompt")
            ids = prompt
        else:
            raise _bad(
                "'prompt' must be a string or a list of token ids (one prompt per request)",
                "prompt",
            )
    else:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise _bad("'messages' must be a non-empty list", "messages")
        if tok is None or getattr(tok, "chat_template", None) is None:
            raise _bad(
                "this engine's tokenizer has no chat template: use /v1/completions", "messages"
            )
        ids = tok.apply_chat_template(
            [
                {
                    "role": "system" if m["role"] == "developer" else m["role"],
                    "content": message_text(m["content"]),
                }
                for m in msgs
            ],
            add_generation_prompt=True,
            tokenize=True,
        )
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        ids = list(ids)
    be = sched.backend
    bad = [t for t in ids if not 0 <= t < be.vocab_size]
    if bad:
        raise _bad(f"'prompt' has token ids outside [0, {be.vocab_size}): {bad[:5]}", "prompt")
    if len(ids) > be.max_input_len:
        raise _bad(
            f"the prompt has {len(ids)} tokens, more than the engine takes ({be.max_input_len})",
            "messages" if kind == "chat" else "prompt",
        )
    room = sched.tokens_per_slot - len(ids)
    if room < 1:
        raise _bad(
            f"the prompt has {len(ids)} tokens, leaving no room under the {sched.tokens_per_slot} "
            "tokens a request may hold",
            "messages" if kind == "chat" else "prompt",
        )
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, min(DEFAULT_MAX_TOKENS[kind], room), lo=1, integer=True)
    if max_tokens > room:
        raise _bad(
            f"'{key}' = {max_tokens} is beyond the engine: this prompt ({len(ids)} tokens) leaves "
            f"room for {room}",
            key,
        )
    temperature = _number(body, "temperature", 1.0, lo=0.0, hi=2.0)
    top_p = _number(body, "top_p", 1.0, lo=0.0, hi=1.0)
    if top_p == 0:
        raise _bad("'top_p' must be in (0, 1]", "top_p")
    top_k = min(_number(body, "top_k", 0, lo=-1, integer=True), be.vocab_size)
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbits(63)
    elif isinstance(seed, bool) or not isinstance(seed, int):
        raise _bad(f"'seed' must be an integer, got {json.dumps(seed)}", "seed")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
        raise _bad("'stream_options' supports only include_usage", "stream_options")
    if body.get("stream_options") is not None and not stream:
        raise _bad("'stream_options' is only allowed with 'stream': true", "stream_options")
    logprobs = requested_logprobs(body, kind)
    if logprobs is not None and not getattr(be, "logprobs", False):
        raise _bad(
            f"'logprobs': the {getattr(be, 'name', '?')} backend does not return "
            "log-probabilities (the torch backend does)",
            "logprobs",
        )
    stop = _stop_list(body)
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _bad("'ignore_eos' must be a boolean", "ignore_eos")
    params = SamplingParams(
        max_new_tokens=int(max_tokens),
        temperature=float(temperature),
        top_k=max(int(top_k), 0),
        top_p=float(top_p),
        seed=int(seed),
        stop=stop,
        ignore_eos=ignore_eos,
        speculative=state.speculative,
        logprobs=logprobs,
    )
    return ids, params, stream, opts.get("include_usage") is not False


def message_text(content: str | list) -> str:
    """A message's text: the string, or its text parts concatenated."""
    return content if isinstance(content, str) else "".join(p["text"] for p in content)


def requested_logprobs(body: dict, kind: str) -> int | None:
    """None (no log-probabilities), or how many most likely tokens to give per position:
    completions ``logprobs: N``; chat ``logprobs: true`` with ``top_logprobs: N`` (default 0)."""
    if kind == "completion":
        return body.get("logprobs")
    top = body.get("top_logprobs")
    if not body.get("logprobs"):
        if top is not None:
            raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return None
    return top or 0


class StopHoldback:
    """Text deltas that never show a stop string: the tail that could start one is held back."""

    def __init__(self, stop: tuple[str, ...]):
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.sent = 0

    def push(self, delta: str) -> str:
        self.text += delta
        safe = max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent : safe]
        self.sent = safe
        return out

    def finish(self, delta: str, reason: str | None) -> str:
        self.text += delta
        end = len(self.text)
        if reason == "stop":
            hits = [self.text.find(s) for s in self.stop if s in self.text]
            end = min(hits) if hits else end
        out = self.text[self.sent : max(end, self.sent)]
        self.sent = max(end, self.sent)
        return out


def token_text(tok, t: int) -> str:
    """A token's own text (``token_id:N`` without a tokenizer)."""
    return f"token_id:{t}" if tok is None else tok.decode([t])


def format_logprobs(tok, kind: str, toks: list[int], lps: list[float], tops: list) -> dict:
    """Log-probabilities in the endpoint's OpenAI format: chat ``{"content": [{"token",
    "logprob", "bytes", "top_logprobs"}], "refusal"}``, completions ``{"tokens",
    "token_logprobs", "top_logprobs", "text_offset"}``."""

    def lp(x: float) -> float:
        return max(float(x), LOGPROB_FLOOR) if x == x else LOGPROB_FLOOR

    texts = [token_text(tok, t) for t in toks]
    if kind == "chat":

        def entry(text, value):
            return {"token": text, "logprob": lp(value), "bytes": list(text.encode("utf-8"))}

        return {
            "content": [
                {
                    **entry(text, value),
                    "top_logprobs": [entry(token_text(tok, a), v) for a, v in top],
                }
                for text, value, top in zip(texts, lps, tops)
            ],
            "refusal": None,
        }
    offsets, at = [], 0
    for text in texts:
        offsets.append(at)
        at += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [lp(v) for v in lps],
        "top_logprobs": [{token_text(tok, a): lp(v) for a, v in top} for top in tops],
        "text_offset": offsets,
    }


def final_text(text: str | None, stop: tuple[str, ...], reason: str | None) -> str:
    text = text or ""
    if reason == "stop":
        hits = [text.find(s) for s in stop if s in text]
        if hits:
            return text[: min(hits)]
    return text


def openai_finish(reason: str | None) -> str:
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(reason or "", reason or "stop")


def create_app(state: ServeState) -> FastAPI:
    """The app over ``state``'s scheduler: it starts the scheduler's loop (unless it runs
    already) and, at shutdown, cancels what is still running."""

    @asynccontextmanager
    async def lifespan(app):
        if not state.scheduler.running:
            state.scheduler.start()
        yield
        state.closing = True
        # uvicorn has stopped accepting and waited for open requests; cancel what is left.
        await asyncio.to_thread(state.scheduler.shutdown, True, 30.0)

    app = FastAPI(title="redrafter-serve", version=__version__, lifespan=lifespan)
    app.openapi = lambda: openapi_document(app, state)  # type: ignore[method-assign]
    add_error_handlers(app, state)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(state, request, "completion")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await generate(state, request, "chat")

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": state.model_name,
                    "object": "model",
                    "created": state.created,
                    "owned_by": "redrafter",
                }
            ],
        }

    @app.get("/health")
    async def health():
        if state.closing:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def openapi_document(app: FastAPI, state: ServeState) -> dict:
    """The generated document plus the request and response bodies of the two endpoints
    (the routes read their body themselves, so FastAPI cannot see them); built once."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(openapi_components())
    for name in (REQUESTS["completion"].__name__, REQUESTS["chat"].__name__):
        schemas[name]["properties"]["model"]["enum"] = [state.model_name]  # the one served

    def ref(name: str) -> dict:
        return {"$ref": f"#/components/schemas/{name}"}

    error = {"content": {"application/json": {"schema": ref(ErrorResponse.__name__)}}}
    for path, kind in (("/v1/completions", "completion"), ("/v1/chat/completions", "chat")):
        op = doc["paths"][path]["post"]
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": ref(REQUESTS[kind].__name__)}},
        }
        op["responses"] = {
            "200": {
                "description": "the completion; with stream: true, server-sent events of "
                "chunks ending with data: [DONE]",
                "content": {
                    "application/json": {"schema": ref(RESPONSES[kind].__name__)},
                    "text/event-stream": {
                        "schema": {
                            "description": "an event: data holds a chunk object as JSON, or [DONE]",
                            "type": "object",
                            "properties": {"data": {"type": "string"}},
                            "required": ["data"],
                        }
                    },
                },
            },
            "400": {"description": "invalid or unsupported request", **error},
            "429": {"description": "the queue is full (Retry-After)", **error},
            "503": {"description": "shutting down", **error},
        }
    app.openapi_schema = doc
    return doc


def add_error_handlers(app: FastAPI, state: ServeState) -> None:
    """Every error answers the OpenAI error object and is counted by its status."""

    def error_response(e: ApiError) -> JSONResponse:
        state.metrics.requests.labels(outcome=str(e.status)).inc()
        return JSONResponse(
            {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.status}},
            status_code=e.status,
            headers=e.headers,
        )

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        # unknown paths (404), wrong methods (405): the OpenAI error object too
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(
            ApiError(exc.status_code, str(exc.detail), None, kind, dict(exc.headers or {}))
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc):
        return error_response(_bad(f"invalid request: {exc.errors()[:1]}"))


async def read_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad(f"the request body is not valid JSON ({e})") from None


def submit(state: ServeState, ids, params: SamplingParams, on_event) -> QueuedRequest:
    """Queue the request; a full queue is HTTP 429, a closing scheduler 503, bad input 400."""
    try:
        return state.scheduler.submit(ids, params, on_event=on_event)
    except QueueFull as e:
        raise ApiError(429, str(e), None, "rate_limit_exceeded", {"Retry-After": "1"}) from None
    except SchedulerClosed as e:
        raise ApiError(503, str(e), None, "server_unavailable", {"Retry-After": "5"}) from None
    except RedrafterError as e:
        raise _bad(str(e)) from None


async def generate(state: ServeState, request: Request, kind: str) -> Response:
    """``POST /v1/completions`` (``kind`` completion) and ``/v1/chat/completions`` (chat): the
    request is validated, queued, and answered whole or as a stream of server-sent events."""
    if state.closing:
        raise ApiError(
            503, "the server is shutting down", None, "server_unavailable", {"Retry-After": "5"}
        )
    body = await read_body(request)
    ids, params, stream, include_usage = parse_request(state, body, kind)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()
    req = submit(state, ids, params, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
    out = Completion(state, req, params, kind, include_usage)
    if not stream:
        return await whole_response(request, queue, out)
    return StreamingResponse(
        stream_events(queue, out),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )


class Completion:
    """One queued request's answer in its endpoint's format (``kind``: completion or chat): the
    parts of the whole body and of the stream's chunks."""

    def __init__(
        self,
        state: ServeState,
        req: QueuedRequest,
        params: SamplingParams,
        kind: str,
        include_usage: bool,
    ):
        self.state, self.req, self.params, self.kind = state, req, params, kind
        self.include_usage = include_usage
        self.id = ("cmpl-" if kind == "completion" else "chatcmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.object = "text_completion" if kind == "completion" else "chat.completion"
        self.chunk_object = "text_completion" if kind == "completion" else "chat.completion.chunk"
        self.lp_sent = 0  # tokens whose log-probabilities a stream chunk carried already

    def usage(self) -> dict:
        req = self.req
        return {
            "prompt_tokens": len(req.prompt),
            "completion_tokens": len(req.tokens),
            "total_tokens": len(req.prompt) + len(req.tokens),
        }

    def extra(self) -> dict:
        return {
            "tokens_per_step": round(self.req.tokens_per_step, 4),
            "accepted_per_step": self.req.accepted,
        }

    def logprobs(self, upto: int | None = None) -> dict | None:
        """The log-probabilities of the tokens after ``lp_sent`` (up to ``upto``), in the
        endpoint's format; None when the request did not ask for them."""
        if self.params.logprobs is None:
            return None
        req = self.req
        end = len(req.tokens) if upto is None else upto
        toks, lps = req.tokens[self.lp_sent : end], req.logprobs[self.lp_sent : end]
        tops = req.top_logprobs[self.lp_sent : end]
        self.lp_sent = end
        return format_logprobs(self.state.tokenizer, self.kind, toks, lps, tops)

    def choice(self, text: str, finish: str | None, delta: bool, lp=None) -> dict:
        if self.kind == "completion":
            return {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}
        key = "delta" if delta else "message"
        msg = (
            {"role": "assistant", "content": text}
            if not delta
            else ({"content": text} if text else {})
        )
        return {"index": 0, key: msg, "logprobs": lp, "finish_reason": finish}

    def body(self) -> dict:
        """The whole (non-streamed) answer of the finished request."""
        req = self.req
        text = final_text(req.text, self.params.stop, req.finish_reason)
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.state.model_name,
            "choices": [
                self.choice(text, openai_finish(req.finish_reason), False, self.logprobs())
            ],
            "usage": self.usage(),
            "redrafter": self.extra(),
        }

    def chunk(self, text: str, finish: str | None, last: bool = False, lp=None) -> str:
        """One server-sent event of the stream; the last carries usage and the statistics."""
        c = {
            "id": self.id,
            "object": self.chunk_object,
            "created": self.created,
            "model": self.state.model_name,
            "choices": [self.choice(text, finish, True, lp)],
        }
        if last:
            if self.include_usage:
                c["usage"] = self.usage()
            c["redrafter"] = self.extra()
        return "data: " + json.dumps(c) + "\n\n"

    def role_chunk(self) -> str:
        """A chat stream's first event: the assistant role, no text yet."""
        c = {
            "id": self.id,
            "object": self.chunk_object,
            "created": self.created,
            "model": self.state.model_name,
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
        }
        return "data: " + json.dumps(c) + "\n\n"


async def whole_response(request: Request, queue: asyncio.Queue, out: Completion) -> Response:
    """Wait for the request to finish (cancelling it when the client goes away) and answer it
    whole."""
    state, req = out.state, out.req
    try:
        while not req.done.is_set():
            try:
                await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    state.scheduler.cancel(req)
                    state.metrics.requests.labels(outcome="cancelled").inc()
                    return Response(status_code=499)
    except asyncio.CancelledError:
        state.scheduler.cancel(req)
        raise
    if req.finish_reason == "error":
        state.metrics.requests.labels(outcome="500").inc()
        return JSONResponse(
            {"error": {"message": req.error, "type": "server_error", "param": None, "code": 500}},
            status_code=500,
        )
    state.metrics.finished(req)
    return JSONResponse(
        out.body(), headers={"x-redrafter-tokens-per-step": f"{req.tokens_per_step:.4f}"}
    )


async def stream_events(queue: asyncio.Queue, out: Completion):
    """The stream's server-sent events as the scheduler's events arrive: text held back until it
    cannot be part of a stop string, the last chunk, then ``[DONE]``. A client that goes away
    mid-stream cancels the request, freeing its slot."""
    state, req = out.state, out.req
    hold = StopHoldback(out.params.stop)
    try:
        if out.kind == "chat":
            yield out.role_chunk()
        while True:
            ev = await queue.get()
            if ev.finished:
                if ev.finish_reason == "error":
                    error = {"message": req.error, "type": "server_error", "code": 500}
                    yield "data: " + json.dumps({"error": error}) + "\n\n"
                    state.metrics.requests.labels(outcome="500").inc()
                    return
                text = hold.finish(ev.text or "", ev.finish_reason)
                state.metrics.finished(req)
                yield out.chunk(text, openai_finish(ev.finish_reason), True, out.logprobs())
                yield "data: [DONE]\n\n"
                return
            text = hold.push(ev.text or "")
            lp = out.logprobs(out.lp_sent + len(ev.token_ids)) if ev.token_ids else None
            if text or lp:
                yield out.chunk(text, None, lp=lp)
    finally:
        if not req.finished:  # the client went away mid-stream: free its slot now
            state.scheduler.cancel(req)
            state.metrics.requests.labels(outcome="cancelled").inc()

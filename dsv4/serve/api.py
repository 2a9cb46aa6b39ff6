"""The OpenAI-compatible HTTP API over an `Engine`: /v1/models, /v1/completions, /v1/chat/completions,
/health and /metrics.

Each choice is one engine request. Its tokens are detokenized incrementally, cut at the first stop string
(the request is then cancelled), and for chat split by `ReplyParser` into reasoning, content and tool calls.
A non-streamed reply is built by the same steps as a streamed one, so the two carry the same text. A client
that hangs up cancels its requests at once, so its cache rows are freed at the next engine step. A body is parsed
and validated in one pass (`_read_body`), and token-id prompts reach the engine as one int64 array (its `submit`
takes any integer sequence), so a 32K-token prompt costs the host a few ms, not tens.
"""
from __future__ import annotations

import asyncio
import email.message
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Sequence, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import DsV4Error
from ..generate.chat import encode_chat
from ..generate.detokenize import StreamDecoder
from .metrics import ServerMetrics
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, TokenIdsFirst, error_body
from .textstream import ReplyParser, StopCutter
from .types import QueueFull, SamplingParams

COMPLETIONS_DEFAULT_MAX_TOKENS = 16   # the OpenAI default; chat defaults to the rest of the context

# one encoder for every chunk: json.dumps with a non-default argument builds a new JSONEncoder per call
_to_json = json.JSONEncoder(ensure_ascii=False).encode


_Body = TypeVar("_Body", bound=BaseModel)


async def _read_body(request: Request, cls: type[_Body], fast: type[_Body] | None = None) -> _Body:
    """The JSON body as `cls` (or as `fast`, a subclass validating the same bodies to the same values faster),
    parsed and validated in one pass of pydantic's JSON parser (a 32K-token prompt's ids in ~1 ms; json.loads then
    validating the objects took ~4x that). A body that fails it goes the way FastAPI takes a declared body
    (json.loads, then validation of the objects as `cls`), so errors read exactly as before."""
    body = await request.body()
    is_json = False
    if request.headers.get("content-type"):
        kind = email.message.Message()
        kind["content-type"] = request.headers["content-type"]
        sub = kind.get_content_subtype()
        is_json = kind.get_content_maintype() == "application" and (sub == "json" or sub.endswith("+json"))
    if body and is_json:
        try:
            return (fast or cls).model_validate_json(body)
        except ValidationError:
            pass   # (the errors of the path below)
    if not body:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    value: Any = body
    if is_json:
        try:
            value = json.loads(body)
        except json.JSONDecodeError as e:
            raise RequestValidationError([{"type": "json_invalid", "loc": ("body", e.pos), "msg": "JSON decode error",
                                           "input": {}, "ctx": {"error": e.msg}}]) from None
    try:
        return cls.model_validate(value, from_attributes=True)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None


def _body_schema(cls: type[BaseModel]) -> dict:
    """The OpenAPI entry of a body read by `_read_body` (FastAPI only sees the request)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": cls.model_json_schema()}}}}


def _token_ids(prompt: list[int]) -> np.ndarray | list[int]:
    """Validated token ids as the int64 array the engine keeps (one C pass; the engine takes it with one copy), or
    the list itself when an id is beyond int64 (the engine names it)."""
    try:
        return np.fromiter(prompt, dtype=np.int64, count=len(prompt))
    except OverflowError:
        return prompt


@dataclass
class _Step:
    """What one engine event adds to a choice: released text, the tokens' logprobs, and the finish."""
    text: str = ""
    logprobs: list[tuple[int, float, list | None]] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None


class _Choice:
    """One engine request seen as text: stop strings cut, stop tokens kept out of the text."""

    def __init__(self, index: int, handle: Any, tokenizer: Any, stops: list[str], stop_ids: tuple[int, ...],
                 skip_special: bool):
        self.index, self.handle = index, handle
        self.decoder = StreamDecoder(tokenizer, skip_special=skip_special)
        self.cutter = StopCutter(stops)
        self.stop_ids = set(stop_ids)
        self.completion_tokens = 0
        self.done = False

    def cancel(self) -> None:
        if not self.done:
            self.done = True
            self.handle.cancel()

    async def steps(self) -> AsyncIterator[_Step]:
        """One step per batch of engine events that arrived together: under load a stream sends several tokens
        in one chunk (as OpenAI's and vLLM's streams may), so the server's work per chunk is paid once."""
        # without stop strings no token can end the text early, so a batch's tokens are detokenized in one
        # push (two tokenizer calls per chunk instead of two per token)
        whole = not self.cutter.stops
        try:
            async for events in self.handle.batches():
                step = _Step()
                pending: list[int] = []
                for ev in events:
                    if ev.token is not None:
                        self.completion_tokens += 1
                        if ev.logprob is not None:
                            step.logprobs.append((ev.token, ev.logprob, ev.top_logprobs))
                        if ev.token not in self.stop_ids:
                            if whole:
                                pending.append(ev.token)
                            else:
                                step.text += self.cutter.push(self.decoder.push(ev.token))
                        if self.cutter.stopped:
                            self.cancel()
                            step.finish_reason = "stop"
                            yield step
                            return
                    if ev.finish_reason is not None:
                        if pending:
                            step.text += self.decoder.push(pending)
                        step.text += self.cutter.push(self.decoder.flush())
                        step.text += self.cutter.flush()
                        step.finish_reason = "stop" if self.cutter.stopped else ev.finish_reason
                        step.error = ev.error
                        self.done = True
                        yield step
                        return
                if pending:
                    step.text += self.decoder.push(pending)
                if step.text or step.logprobs:
                    yield step
        finally:
            self.cancel()


async def _merged(streams: list[AsyncIterator]) -> AsyncIterator:
    """Items of several async iterators as they come (choices of one request stream side by side)."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield item
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                await queue.put(item)
            await queue.put(end)
        except BaseException as e:   # handed to the consumer, which re-raises it
            await queue.put(e)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        left = len(tasks)
        while left:
            item = await queue.get()
            if item is end:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()


def _watch_disconnect(request: Request, choices: list[_Choice]) -> asyncio.Task:
    """Cancels the choices as soon as the client hangs up (uvicorn reports it while we wait for tokens)."""
    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                for c in choices:
                    c.cancel()
                return
    return asyncio.create_task(watch())


def _event_stream(request: Request, choices: list[_Choice], streams: list[AsyncIterator[dict]], head: dict,
                  usage: Callable[[], dict] | None) -> StreamingResponse:
    """The SSE response of a streamed request: each choice's chunks as they come (a failed choice also gets an
    error event), the usage chunk when asked for, then `[DONE]`; a hang-up or the end cancels every choice."""
    # every chunk is `head` with one choice (and "usage": null when usage comes last): the JSON around the
    # choice is made once per request, so a chunk costs one json.dumps of its choice
    framed = json.dumps({**head, "choices": [None], **({"usage": None} if usage is not None else {})},
                        ensure_ascii=False)
    before, after = framed.split('"choices": [null]')
    before, after = "data: " + before + '"choices": [', "]" + after + "\n\n"

    async def events() -> AsyncIterator[str]:
        watcher = _watch_disconnect(request, choices)
        try:
            async for ch in _merged(streams):
                if (failure := ch.pop("_error")):
                    yield _sse(error_body(f"choice {ch['index']}: generation failed: {failure}", type="server_error"))
                yield before + _to_json(ch) + after
            if usage is not None:
                yield _sse({**head, "choices": [], "usage": usage()})
            yield _sse("[DONE]")
        finally:
            watcher.cancel()
            for c in choices:
                c.cancel()
    return StreamingResponse(events(), media_type="text/event-stream")


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else _to_json(obj)}\n\n"


class _Server:
    """The state behind one app: the engine, the tokenizer and the metrics."""

    def __init__(self, engine: Any, tokenizer: Any, model_name: str):
        self.engine, self.tok, self.model_name = engine, tokenizer, model_name
        self.max_seq_len = int(getattr(engine, "max_seq_len", 4096))
        self.eos_ids = tuple(t for t in (getattr(tokenizer, "eos_id", None),) if t is not None)
        self.metrics = ServerMetrics(engine.stats)
        self.created = int(time.time())
        self._token_text: dict[int, str] = {}

    # ---- requests -> engine
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def budget(self, prompt: Sequence[int], limit: int | None, default: int | None, field_name: str) -> int:
        """max_tokens for a prompt, checked against the context."""
        n = len(prompt)
        if n >= self.max_seq_len:
            raise APIError(400, f"the prompt has {n} tokens; the context holds {self.max_seq_len} "
                                "(prompt + max_tokens must fit)", param=field_name, code="context_length_exceeded")
        max_tokens = limit if limit is not None else (default or self.max_seq_len - n)
        if n + max_tokens > self.max_seq_len:
            raise APIError(400, f"max_tokens={max_tokens}: the prompt has {n} tokens and the context holds "
                                f"{self.max_seq_len}, so at most {self.max_seq_len - n} can be generated",
                           param="max_tokens", code="context_length_exceeded")
        return max_tokens

    def submit(self, prompt: Sequence[int], kwargs: dict, n: int, stops: list[str],
               skip_special: bool) -> list[_Choice]:
        """n engine requests (choice i samples with seed + i); all or none are submitted."""
        choices: list[_Choice] = []
        try:
            for i in range(n):
                seed = None if kwargs["seed"] is None else kwargs["seed"] + i
                params = SamplingParams(**{**kwargs, "seed": seed})
                handle = self.engine.submit(prompt, params)
                choices.append(_Choice(i, handle, self.tok, stops, params.stop_token_ids, skip_special))
        except BaseException:
            for c in choices:
                c.cancel()
            raise
        return choices

    def token_text(self, token: int) -> str:
        text = self._token_text.get(token)
        if text is None:
            text = self._token_text[token] = self.tok.decode([token])
        return text

    def usage(self, prompt: Sequence[int], choices: list[_Choice]) -> dict:
        done = sum(c.completion_tokens for c in choices)
        cached = int(getattr(choices[0].handle, "cached_tokens", 0) or 0) if choices else 0
        return {"prompt_tokens": len(prompt), "completion_tokens": done, "total_tokens": len(prompt) + done,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def finished(self, reason: str | None) -> None:
        if reason is not None:
            self.metrics.finished.labels(finish_reason=reason).inc()

    # ---- logprobs in the two OpenAI shapes
    def completion_logprobs(self, entries: list, offset: int) -> dict:
        tokens, lps, tops, offsets = [], [], [], []
        for token, lp, top in entries:
            text = self.token_text(token)
            tokens.append(text)
            lps.append(lp)
            tops.append({self.token_text(t): v for t, v in top or ()})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(self, entries: list) -> dict:
        def one(token: int, lp: float) -> dict:
            text = self.token_text(token)
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
        return {"content": [{**one(t, lp), "top_logprobs": [one(u, v) for u, v in top or ()]}
                            for t, lp, top in entries]}


def _tool_calls(calls: list[dict]) -> list[dict]:
    return [{"index": j, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}}
            for j, c in enumerate(calls)]


def build_app(engine: Any, tokenizer: Any, model_name: str) -> FastAPI:
    """The FastAPI app serving `engine` (started by the caller) as `model_name`."""
    srv = _Server(engine, tokenizer, model_name)
    app = FastAPI(title="dsv4", docs_url=None, redoc_url=None)
    app.state.server = srv

    def error(status: int, body: dict) -> JSONResponse:
        srv.metrics.errors.labels(status=str(status)).inc()
        return JSONResponse(body, status_code=status)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return error(e.status, e.body())

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param, where = (loc[0] if loc else None), ".".join(loc)
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, param, where = f"the body is not valid JSON: {first.get('ctx', {}).get('error', message)}", None, ""
        return error(400, error_body(f"{where}: {message}" if where else message, param=param))

    @app.exception_handler(QueueFull)
    async def _queue_full(_: Request, e: QueueFull):
        return error(429, error_body(str(e) or "the request queue is full; retry later", type="rate_limit_error",
                                     code="queue_full"))

    @app.exception_handler(DsV4Error)
    async def _bad_argument(_: Request, e: DsV4Error):
        return error(400, error_body(str(e)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error(e.status_code, error_body(str(e.detail), type=kind))

    @app.get("/health")
    async def health():
        try:
            stats = engine.stats()
        except Exception as e:   # an engine that cannot answer cannot serve
            return error(503, error_body(f"the engine does not answer: {e}", type="server_error"))
        return {"status": "ok", "running": stats.get("running"), "queue_len": stats.get("queue_len")}

    @app.get("/metrics")
    async def metrics():
        return Response(srv.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": srv.created,
                                            "owned_by": "dsv4", "max_model_len": srv.max_seq_len}]}

    @app.post("/v1/completions", openapi_extra=_body_schema(CompletionRequest))
    async def completions(request: Request):
        req = await _read_body(request, CompletionRequest, TokenIdsFirst)
        srv.check_model(req.model)
        req.check_unsupported()
        if req.echo:
            raise APIError(400, "echo: not supported", param="echo")
        prompt = req.single_prompt()
        ids = await asyncio.to_thread(srv.tok.encode, prompt) if isinstance(prompt, str) else _token_ids(prompt)
        if not len(ids):
            raise APIError(400, "prompt: encodes to no tokens", param="prompt")
        if (ids.min() if isinstance(ids, np.ndarray) else min(ids)) < 0:
            raise APIError(400, "prompt: token ids must be >= 0", param="prompt")
        max_tokens = srv.budget(ids, req.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS, "prompt")
        kwargs = req.sampling_kwargs(max_tokens, req.logprobs, srv.eos_ids)
        choices = srv.submit(ids, kwargs, req.n, req.stop_strings(), skip_special=True)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": model_name}
        want_lp = req.logprobs is not None

        async def choice_chunks(c: _Choice) -> AsyncIterator[dict]:
            offset = 0
            async for step in c.steps():
                lp = srv.completion_logprobs(step.logprobs, offset) if want_lp else None
                offset += len(step.text)
                srv.finished(step.finish_reason)
                yield {"index": c.index, "text": step.text, "logprobs": lp, "finish_reason": step.finish_reason,
                       "_error": step.error}

        if req.stream:
            return _event_stream(request, choices, [choice_chunks(c) for c in choices], head,
                                 (lambda: srv.usage(ids, choices)) if req.include_usage() else None)

        async def collect(c: _Choice) -> dict:
            text, finish, error_msg, lps = "", None, None, []
            async for ch in choice_chunks(c):
                text += ch["text"]
                finish, error_msg = ch["finish_reason"], ch["_error"] or error_msg
                lps.append(ch["logprobs"])
            lp = None
            if want_lp:
                lp = {k: [x for d in lps if d for x in d[k]] for k in ("tokens", "token_logprobs", "top_logprobs",
                                                                          "text_offset")}
            return {"index": c.index, "text": text, "logprobs": lp, "finish_reason": finish, "_error": error_msg}

        out = await _collect_all(request, choices, collect)
        return {**head, "choices": out, "usage": srv.usage(ids, choices)}

    @app.post("/v1/chat/completions", openapi_extra=_body_schema(ChatCompletionRequest))
    async def chat_completions(request: Request):
        req = await _read_body(request, ChatCompletionRequest)
        srv.check_model(req.model)
        req.check_unsupported()
        thinking = req.thinking_mode()
        messages = req.encoder_messages()
        drop = req.chat_template_kwargs.drop_thinking if req.chat_template_kwargs else True
        try:
            text = encode_chat(messages, thinking=thinking, reasoning_effort=req.effort(), drop_thinking=drop)
        except (ValueError, KeyError, TypeError) as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        ids = await asyncio.to_thread(srv.tok.encode, text)   # a long prompt must not stall the other streams
        max_tokens = srv.budget(ids, req.token_limit(), None, "messages")
        kwargs = req.sampling_kwargs(max_tokens, req.top_k_logprobs(), srv.eos_ids)
        choices = srv.submit(ids, kwargs, req.n, req.stop_strings(), skip_special=False)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name}
        want_lp = req.logprobs

        async def choice_deltas(c: _Choice) -> AsyncIterator[dict]:
            """Stream choices: {"index", "delta", "logprobs", "finish_reason"} (+ "_error")."""
            parser = ReplyParser(thinking)
            pending: list = []
            yield {"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                   "finish_reason": None, "_error": None}
            async for step in c.steps():
                pending += step.logprobs
                deltas = parser.push(step.text)
                calls: list[dict] = []
                if step.finish_reason is not None:
                    tail, calls = parser.finish()
                    deltas += tail
                for name, piece in deltas:
                    yield {"index": c.index, "delta": {name: piece},
                           "logprobs": srv.chat_logprobs(pending) if want_lp and pending else None,
                           "finish_reason": None, "_error": None}
                    pending = []
                if step.finish_reason is not None:
                    reason = "tool_calls" if calls else step.finish_reason
                    srv.finished(reason)
                    if calls:
                        yield {"index": c.index, "delta": {"tool_calls": _tool_calls(calls)}, "logprobs": None,
                               "finish_reason": None, "_error": None}
                    yield {"index": c.index, "delta": {},
                           "logprobs": srv.chat_logprobs(pending) if want_lp and pending else None,
                           "finish_reason": reason, "_error": step.error}

        if req.stream:
            return _event_stream(request, choices, [choice_deltas(c) for c in choices], head,
                                 (lambda: srv.usage(ids, choices)) if req.include_usage() else None)

        async def collect(c: _Choice) -> dict:
            fields = {"reasoning_content": "", "content": ""}
            calls, finish, error_msg, lps = [], None, None, []
            async for ch in choice_deltas(c):
                for k, v in ch["delta"].items():
                    if k in fields:
                        fields[k] += v
                    elif k == "tool_calls":
                        calls = v
                finish, error_msg = ch["finish_reason"] or finish, ch["_error"] or error_msg
                if ch["logprobs"]:
                    lps += ch["logprobs"]["content"]
            message: dict = {"role": "assistant", "content": fields["content"] if fields["content"] or not calls
                             else None}
            if thinking or fields["reasoning_content"]:
                message["reasoning_content"] = fields["reasoning_content"]
            if calls:
                message["tool_calls"] = [{k: v for k, v in call.items() if k != "index"} for call in calls]
            return {"index": c.index, "message": message, "logprobs": {"content": lps} if want_lp else None,
                    "finish_reason": finish, "_error": error_msg}

        out = await _collect_all(request, choices, collect)
        return {**head, "object": "chat.completion", "choices": out, "usage": srv.usage(ids, choices)}

    return app


async def _collect_all(request: Request, choices: list[_Choice], collect: Callable) -> list[dict]:
    """Every choice's whole reply; the requests are cancelled if the client hangs up first. A choice the
    engine failed makes the response a 500 (the other requests and the server carry on)."""
    watcher = _watch_disconnect(request, choices)
    try:
        out = await asyncio.gather(*(collect(c) for c in choices))
    finally:
        watcher.cancel()
        for c in choices:
            c.cancel()
    failed = [c["_error"] for c in out if c["_error"]]
    if failed:
        raise APIError(500, f"generation failed: {failed[0]}", type="server_error")
    for c in out:
        c.pop("_error")
    return out

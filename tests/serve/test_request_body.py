"""The API's body reading (one pass of pydantic's JSON parser) against FastAPI's own handling of a declared body
(json.loads, then validation of the objects): the same values for good bodies, the same errors for bad ones; and
TokenIdsFirst validates every prompt as CompletionRequest does."""
from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

pytest.importorskip("fastapi")
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from dsv4.serve.api import _read_body  # noqa: E402
from dsv4.serve.protocol import ChatCompletionRequest, CompletionRequest, TokenIdsFirst  # noqa: E402

PROMPTS = [[1, 2, 3], ["1", "2"], [[1, 2]], [[1, 2], [3]], [1.0, 2.0], [True, 1], [], "x", "", ["a", 1], [1.5],
           [2**70], [-3], 5, None, {"a": 1}, [["x"]], [1, "2"], ["a", "b"]]


def _outcome(cls, value):
    try:
        req = cls.model_validate({"prompt": value})
    except ValidationError:
        return "error"
    return json.dumps(req.prompt), [type(p).__name__ for p in (req.prompt if isinstance(req.prompt, list) else [])]


@pytest.mark.parametrize("prompt", PROMPTS, ids=repr)
def test_token_ids_first_validates_every_prompt_as_completion_request(prompt):
    assert _outcome(TokenIdsFirst, prompt) == _outcome(CompletionRequest, prompt)
    raw = json.dumps({"prompt": prompt}).encode()
    try:
        want = CompletionRequest.model_validate_json(raw).prompt
    except ValidationError:
        with pytest.raises(ValidationError):
            TokenIdsFirst.model_validate_json(raw)
    else:
        assert TokenIdsFirst.model_validate_json(raw).prompt == want


def _apps() -> tuple[TestClient, TestClient]:
    """(FastAPI's declared body, _read_body), each answering the parsed body or the validation errors."""
    def errors(_: Request, e: RequestValidationError):
        return JSONResponse({"errors": [{k: err.get(k) for k in ("type", "loc", "msg", "ctx")} for err in e.errors()]},
                            status_code=400)
    declared, read = FastAPI(), FastAPI()
    for app in (declared, read):
        app.add_exception_handler(RequestValidationError, errors)

    @declared.post("/c")
    async def c1(req: CompletionRequest):
        return req.model_dump()

    @declared.post("/chat")
    async def chat1(req: ChatCompletionRequest):
        return req.model_dump()

    @read.post("/c")
    async def c2(request: Request):
        return (await _read_body(request, CompletionRequest, TokenIdsFirst)).model_dump()

    @read.post("/chat")
    async def chat2(request: Request):
        return (await _read_body(request, ChatCompletionRequest)).model_dump()
    return TestClient(declared), TestClient(read)


JSON = {"content-type": "application/json"}
BODIES = [
    ("/c", b'{"prompt": [1, 2, 3], "max_tokens": 4, "stream": true}', JSON),
    ("/c", b'{"prompt": "hi", "stop": ["a"], "n": 2, "seed": 3}', {"content-type": "application/json; charset=utf-8"}),
    ("/c", b'{"prompt": [1, 2]}', {"content-type": "application/vnd.api+json"}),
    ("/c", b'{"prompt": [1, 2]}', {"content-type": "text/plain"}),
    ("/c", b'{"prompt": [1, 2]}', {}),
    ("/c", b"", JSON),
    ("/c", b"{not json", JSON),
    ("/c", b'{"prompt": [1, NaN]}', JSON),
    ("/c", b'{"prompt": 5}', JSON),
    ("/c", b'{"prompt": ["a", 1], "max_tokens": 0}', JSON),
    ("/c", b'{"prompt": [1], "temperature": -1}', JSON),
    ("/c", b'{"max_tokens": 3}', JSON),
    ("/c", b"[1, 2]", JSON),
    ("/chat", b'{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}', JSON),
    ("/chat", b'{"messages": [', JSON),
    ("/chat", b'{"messages": []}', JSON),
    ("/chat", b'{"messages": [{"role": "user"}], "chat_template_kwargs": {"bogus": 1}}', JSON),
]


@pytest.mark.parametrize("path, body, headers", BODIES, ids=lambda v: repr(v)[:40])
def test_bodies_read_as_fastapi_reads_a_declared_body(path, body, headers):
    declared, read = _apps()
    want = declared.post(path, content=body, headers=headers)
    got = read.post(path, content=body, headers=headers)
    assert (got.status_code, got.json()) == (want.status_code, want.json())

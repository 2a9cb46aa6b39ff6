"""The OpenAI request shapes the server accepts, and the error body it answers with.

Field names follow the OpenAI API (plus `top_k`, `stop_token_ids`, `ignore_eos` and `chat_template_kwargs`,
as vLLM and SGLang accept them), so agents and evaluation harnesses can point their clients here. Values are
checked here and in `SamplingParams`; a bad one becomes an HTTP 400 that names the field.
"""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 64            # choices per request (each is one engine request)
MAX_LOGPROBS = 20     # as in the OpenAI API


class APIError(Exception):
    """An error the client caused (or a full server), answered as {"error": {...}} with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields both endpoints share."""
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0     # accepted so clients that always send 0 work; other values are refused
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    def check_unsupported(self) -> None:
        """Refuse what the engine does not do rather than silently sample differently than asked."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name}={getattr(self, name)}: not supported (only 0)", param=name)
        if self.logit_bias:
            raise APIError(400, "logit_bias: not supported", param="logit_bias")

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_kwargs(self, max_tokens: int, logprobs: int | None, eos_ids: tuple[int, ...]) -> dict:
        """Keyword arguments of SamplingParams for choice 0 (choice i adds i to the seed)."""
        stops = tuple(dict.fromkeys([*self.stop_token_ids, *(() if self.ignore_eos else eos_ids)]))
        return dict(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                    seed=self.seed, stop_token_ids=stops, logprobs=logprobs, ignore_eos=self.ignore_eos)


class CompletionRequest(_Sampling):
    """POST /v1/completions: a prompt as text or token ids (one prompt per request)."""
    prompt: Union[str, list[int], list[str], list[list[int]]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise APIError(400, f"prompt: {len(p)} prompts in one request; send one prompt per request",
                               param="prompt")
            p = p[0]
        if not p:
            raise APIError(400, "prompt: must not be empty", param="prompt")
        return p


class TokenIdsFirst(CompletionRequest):
    """CompletionRequest with the token-id member of `prompt` tried first. Pydantic's smart union picks the member
    that matches exactly, so it validates every body to the same values, but a prompt of 32K ids in half the time;
    its errors list the members in another order, so the API reports a failing body's errors from
    CompletionRequest."""
    prompt: Union[list[int], str, list[str], list[list[int]]]


class ChatTemplateKwargs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    thinking: bool = False
    reasoning_effort: Literal["high", "max"] | None = None
    drop_thinking: bool = True


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions: messages in the OpenAI format, encoded with the V4 chat format."""
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[Literal["none", "auto"], dict[str, Any], str, None] = None
    thinking: bool | None = None                    # shorthand for chat_template_kwargs.thinking
    reasoning_effort: Literal["high", "max"] | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def thinking_mode(self) -> bool:
        if self.thinking is not None:
            return self.thinking
        return bool(self.chat_template_kwargs and self.chat_template_kwargs.thinking)

    def effort(self) -> str | None:
        return self.reasoning_effort or (self.chat_template_kwargs.reasoning_effort
                                         if self.chat_template_kwargs else None)

    def top_k_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs=true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def encoder_messages(self) -> list[dict]:
        """The messages as `encode_chat` takes them: text parts joined, the tools on the system message."""
        if self.tool_choice not in (None, "none", "auto"):
            raise APIError(400, f"tool_choice: {self.tool_choice!r} is not supported; use 'auto' or 'none'",
                           param="tool_choice")
        out = []
        for i, m in enumerate(self.messages):
            m = dict(m)
            content = m.get("content")
            if isinstance(content, list):
                texts = []
                for part in content:
                    if not isinstance(part, dict) or part.get("type") != "text":
                        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                        raise APIError(400, f"messages[{i}].content: only text parts are supported, got {kind!r}",
                                       param=f"messages[{i}].content")
                    texts.append(str(part.get("text", "")))
                m["content"] = "".join(texts)
            elif content is not None and not isinstance(content, str):
                raise APIError(400, f"messages[{i}].content: must be a string or a list of text parts",
                               param=f"messages[{i}].content")
            for call in m.get("tool_calls") or ():
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise APIError(400, f"messages[{i}].tool_calls: each call needs function.name",
                                   param=f"messages[{i}].tool_calls")
            out.append(m)
        if self.tools and self.tool_choice != "none":
            for j, t in enumerate(self.tools):
                if not isinstance(t.get("function"), dict) or "name" not in t["function"]:
                    raise APIError(400, f"tools[{j}]: expected {{'type': 'function', 'function': {{'name': ...}}}}",
                                   param=f"tools[{j}]")
            if out[0].get("role") == "system":
                out[0] = {**out[0], "tools": self.tools}
            else:
                out.insert(0, {"role": "system", "content": "", "tools": self.tools})
        return out

"""A chat conversation on one persistent cache.

Every turn re-encodes the whole conversation in the official V4 format (so earlier reasoning is dropped
exactly as the model was trained), then feeds only the tokens the cache does not already hold. If the
new encoding does not extend what the cache holds (e.g. thinking was dropped from an earlier turn), the
cache restarts from a fresh prefill: correctness first, reuse when possible.
"""
from __future__ import annotations

from typing import Callable

import torch

from .chat import EOS, encode_chat, parse_completion
from .engine import _prefill, decode_loop
from .sampling import SamplingConfig
from .tokenizer import Tokenizer


class ChatSession:
    def __init__(self, model, tok: Tokenizer, *, thinking: bool = False, system: str | None = None,
                 max_seq_len: int = 32768, sampling: SamplingConfig | None = None, seed: int = 0,
                 kv_dtype: str = "auto", index_dtype: str = "auto"):
        self.model, self.tok, self.thinking = model, tok, thinking
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.sampling = sampling or SamplingConfig()
        self.gen = torch.Generator(device=model.embed.weight.device).manual_seed(seed)
        self.cache = model.new_cache(1, max_seq_len, kv_dtype, index_dtype)
        self.fed: list[int] = []          # exactly the tokens the cache holds
        self.reused = 0                   # prompt tokens not recomputed in the last turn

    @torch.no_grad()
    def send(self, text: str, max_new_tokens: int = 512, on_text: Callable[[str], None] | None = None) -> dict:
        """Add a user turn, generate the assistant turn (streamed to on_text) and return it as a message."""
        self.messages.append({"role": "user", "content": text})
        ids = self.tok.encode(encode_chat(self.messages, thinking=self.thinking))
        if len(ids) + max_new_tokens > self.cache.max_seq_len:
            raise ValueError(f"conversation of {len(ids)} tokens + {max_new_tokens} new exceeds the cache "
                             f"({self.cache.max_seq_len}); start a new session with a larger max_seq_len")
        if len(ids) > len(self.fed) and ids[:len(self.fed)] == self.fed:
            new = ids[len(self.fed):]
        else:
            self.cache.reset()
            self.fed, new = [], ids
        self.reused = len(self.fed)
        last = _prefill(self.model, self.cache, new, 4096, progress=len(new) > 4096)
        self.fed = list(ids)
        out: list[int] = []
        shown = ""
        stops = {self.tok.eos_id} if self.tok.eos_id is not None else set()
        for step in decode_loop(self.model, self.cache, last, max_new_tokens, self.sampling, self.gen, stops):
            out.append(step[0])
            visible = self.tok.decode([t for t in out if t not in stops])
            if on_text is not None and not visible.endswith("\ufffd"):
                on_text(visible[len(shown):])
                shown = visible
        self.fed += out[:-1]  # the last token was sampled but not fed
        completion = self.tok.decode(out)
        if not completion.endswith(EOS):
            completion += EOS  # cut by max_new_tokens: close the turn as the format requires
        try:
            reply = parse_completion(completion, thinking=self.thinking)
        except ValueError:  # an untrained or truncated model may not follow the format
            reply = {"role": "assistant", "content": completion[: -len(EOS)]}
        self.messages.append({k: v for k, v in reply.items() if v not in (None, "", [])} | {"role": "assistant"})
        return reply

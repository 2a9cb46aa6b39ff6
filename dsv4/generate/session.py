"""A chat conversation on one persistent cache.

Chat mode is append-only in the official V4 format, so a new turn feeds only its own tokens: the end of
the previous assistant turn (its last sampled token, EOS), then the new user turn rendered with the
conversation as context. The model's own reply stays in the cache exactly as it was generated (never
re-tokenised). Thinking mode drops earlier reasoning from the prompt, so each turn re-encodes the whole
conversation and reuses the cache only as far as it still matches (else a fresh prefill).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import InvalidArgument
from .chat import EOS, encode_chat, parse_completion
from .detokenize import StreamDecoder
from .engine import _prefill, decode_loop
from .sampling import SamplingConfig, check_generation_args
from .tokenizer import Tokenizer


class ChatSession:
    """The conversation (`messages`, and in chat mode `history`: its tokens as the model saw and produced them)
    is kept apart from what the cache holds (`fed`): a send that fails leaves the conversation as it was."""

    def __init__(self, model, tok: Tokenizer, *, thinking: bool = False, system: str | None = None,
                 max_seq_len: int = 32768, sampling: SamplingConfig | None = None, seed: int = 0,
                 kv_dtype: str = "auto", index_dtype: str = "auto"):
        self.model, self.tok, self.thinking = model, tok, thinking
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.sampling = sampling or SamplingConfig()
        _, seed = check_generation_args(0, seed)
        self.gen = torch.Generator(device=model.embed.weight.device).manual_seed(seed)
        self.cache = model.new_cache(1, max_seq_len, kv_dtype, index_dtype)
        self.history: list[int] = []      # the conversation's tokens, each turn closed (chat mode's context)
        self.fed: list[int] = []          # exactly the tokens the cache holds
        self.reused = 0                   # prompt tokens not recomputed in the last turn
        self.last_prompt: list[int] = []  # the whole token sequence the last reply was generated from

    @torch.no_grad()
    def send(self, text: str, max_new_tokens: int = 512, on_text: Callable[[str], None] | None = None) -> dict:
        """Add a user turn, generate the assistant turn (streamed to on_text) and return it as a message.

        A send that is rejected (too long) or fails midway (an error, an interrupt) keeps neither the user turn
        nor any part of the reply, and the sampling generator is rewound: later sends answer as a session that never
        saw it. The cache it may have advanced or damaged is reset; the next send refills it from `history`."""
        max_new_tokens, _ = check_generation_args(max_new_tokens)
        messages = self.messages + [{"role": "user", "content": text}]
        if self.thinking or not self.history:
            ids = self.tok.encode(encode_chat(messages, thinking=self.thinking))
        else:
            turn = encode_chat(messages[-1:], thinking=False, context=self.messages)
            ids = self.history + self.tok.encode(turn)
        if len(ids) + max_new_tokens > self.cache.max_seq_len:
            raise InvalidArgument(f"conversation of {len(ids)} tokens + {max_new_tokens} new exceeds the cache "
                             f"({self.cache.max_seq_len}); start a new session with a larger max_seq_len")
        rng = self.gen.get_state()
        try:
            out, reused = self._generate(ids, max_new_tokens, on_text)
        except BaseException:
            self.cache.reset()
            self.fed = []
            self.gen.set_state(rng)
            raise
        eos = [self.tok.eos_id] if self.tok.eos_id is not None else []
        self.history = ids + out + ([] if out[-1:] == eos else eos)
        self.reused, self.last_prompt = reused, list(ids)
        completion = self.tok.decode(out)
        if not completion.endswith(EOS):
            completion += EOS  # cut by max_new_tokens: close the turn as the format requires
        try:
            reply = parse_completion(completion, thinking=self.thinking)
        except ValueError:  # an untrained or truncated model may not follow the format
            reply = {"role": "assistant", "content": completion[: -len(EOS)]}
        self.messages = messages + [{k: v for k, v in reply.items() if v not in (None, "", [])} | {"role": "assistant"}]
        return reply

    def _generate(self, ids: list[int], max_new_tokens: int,
                  on_text: Callable[[str], None] | None) -> tuple[list[int], int]:
        """Bring the cache to `ids` (reusing what it holds of them), generate; returns (new tokens, reused)."""
        if self.fed and len(ids) > len(self.fed) and ids[:len(self.fed)] == self.fed:
            new = ids[len(self.fed):]
        else:
            self.cache.reset()
            self.fed, new = [], ids
        reused = len(self.fed)
        last = _prefill(self.model, self.cache, new, 4096, progress=len(new) > 4096)
        out: list[int] = []
        stream = StreamDecoder(self.tok)
        stops = {self.tok.eos_id} if self.tok.eos_id is not None else set()
        for step in decode_loop(self.model, self.cache, last, max_new_tokens, self.sampling, self.gen, stops,
                                contexts=[ids]):
            if step[0] is None:  # non-finite logits: stopped, with a NonFiniteWarning
                break
            out.append(step[0])
            piece = stream.push(step[0]) if step[0] not in stops else ""
            if piece and on_text is not None:
                on_text(piece)
        rest = stream.flush()  # whatever the stream still held back (an unfinished character)
        if rest and on_text is not None:
            on_text(rest)
        self.fed = (ids + out)[: self.cache.lengths()[0]]  # the last token is sampled but not fed
        return out, reused

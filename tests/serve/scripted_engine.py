"""An engine stand-in that replies with a scripted token sequence: the API tests use it where the reply must
have a given shape (tool calls, stop strings, hang-ups mid-stream) that a random tiny model never writes."""
from __future__ import annotations

import asyncio
import itertools
import threading
from typing import Callable

from dsv4.errors import InvalidArgument
from dsv4.serve.types import QueueFull, SamplingParams, TokenEvent


class ScriptedHandle:
    _ids = itertools.count()

    def __init__(self, engine: "ScriptedEngine", prompt: list[int], params: SamplingParams, tokens: list[int]):
        self.id, self.prompt_tokens, self.cached_tokens = f"req-{next(self._ids)}", len(prompt), 0
        self.engine, self.params, self.tokens = engine, params, tokens
        self.cancelled = False
        self.finished = False

    def cancel(self) -> None:
        self.cancelled = True
        self._finish()

    def _finish(self) -> None:
        with self.engine.lock:
            if not self.finished:
                self.finished = True
                self.engine.running -= 1

    async def __aiter__(self):
        for i, t in enumerate(self.tokens[:self.params.max_tokens]):
            await asyncio.sleep(self.engine.delay)
            if self.cancelled:
                yield TokenEvent(None, finish_reason="abort")
                return
            lp = -0.5 if self.params.logprobs is not None else None
            top = None if self.params.logprobs is None else [(u, -2.0) for u in range(self.params.logprobs)]
            stop = t in self.params.stop_token_ids
            last = stop or i + 1 == self.params.max_tokens
            if last:
                self._finish()
            yield TokenEvent(t, lp, top, finish_reason=("stop" if stop else "length") if last else None)
            if last:
                return
        self._finish()
        yield TokenEvent(None, finish_reason="length")

    async def batches(self):
        """The events in groups of 1, 3, 2, 1, 3, ... as the engine hands over everything that arrived since the
        consumer's last wake-up: the API must give the same text whatever the grouping."""
        sizes, batch = itertools.cycle(self.engine.batch_sizes), []
        size = next(sizes)
        async for ev in self:
            batch.append(ev)
            if len(batch) == size or ev.finish_reason is not None:
                yield batch
                batch, size = [], next(sizes)
        if batch:
            yield batch


class ScriptedEngine:
    """submit() -> a handle replaying script(prompt); a token every `delay` seconds."""

    def __init__(self, script: Callable[[list[int]], list[int]], max_seq_len: int = 256, max_queue: int = 64,
                 delay: float = 0.002, batch_sizes: tuple[int, ...] = (1, 3, 2)):
        self.script, self.max_seq_len, self.max_queue, self.delay = script, max_seq_len, max_queue, delay
        self.batch_sizes = batch_sizes
        self.lock = threading.Lock()
        self.running = 0
        self.submitted: list[ScriptedHandle] = []

    def submit(self, prompt: list[int], params: SamplingParams) -> ScriptedHandle:
        if len(prompt) == 0:   # (the API sends token ids as an int64 array)
            raise InvalidArgument("prompt: empty")
        if len(prompt) + params.max_tokens > self.max_seq_len:
            raise InvalidArgument("prompt + max_tokens exceeds max_seq_len")
        with self.lock:
            if self.running >= self.max_queue:
                raise QueueFull(f"queue full ({self.max_queue} requests)")
            self.running += 1
        h = ScriptedHandle(self, prompt, params, self.script(prompt))
        self.submitted.append(h)
        return h

    def stats(self) -> dict:
        return {"queue_len": 0, "running": self.running, "prefill_tokens": 10, "decode_tokens": 20,
                "prefix_lookup_tokens": 8, "prefix_hit_tokens": 2, "spec_drafted": 0, "spec_accepted": 0}

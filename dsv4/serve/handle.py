"""A request's stream of token events (`RequestHandle`): what `Engine.submit` returns. The engine's thread pushes
events; a thread or an asyncio task reads them, and leaving the read early cancels the request."""
from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator, Iterator, Protocol

from .types import TokenEvent

__all__ = ["RequestHandle"]


class _Engine(Protocol):
    """What a handle needs of its engine: a nudge to look at cancellations now."""
    def _wake(self) -> None: ...

_pending_wakes: dict[asyncio.AbstractEventLoop, list[asyncio.Event]] = {}
_pending_lock = threading.Lock()


def _wake_later(loop: asyncio.AbstractEventLoop, ready: asyncio.Event) -> None:
    """Set `ready` on its event loop. The engine thread pushes one event per running request per step: the
    first push to a loop schedules one callback that sets every Event queued for it by then, so 64 streams
    cost one cross-thread wake-up per step rather than 64."""
    with _pending_lock:
        queued = _pending_wakes.setdefault(loop, [])
        queued.append(ready)
        if len(queued) > 1:
            return

    def flush() -> None:
        with _pending_lock:
            events = _pending_wakes.pop(loop, [])
        for event in events:
            event.set()
    try:
        loop.call_soon_threadsafe(flush)
    except RuntimeError:  # that event loop has closed: nobody is listening there any more
        with _pending_lock:
            _pending_wakes.pop(loop, None)


class RequestHandle:
    """One request's stream of TokenEvents; the last one has a finish_reason. Iterate it from a thread
    (`for event in handle`) or from asyncio (`async for event in handle`); the engine's thread fills it.
    Leaving either loop before the last event cancels the request."""

    def __init__(self, request_id: str, prompt_tokens: int, engine: _Engine):
        self.id, self.prompt_tokens, self.cached_tokens = request_id, prompt_tokens, 0
        self._engine = engine
        self._events: list[TokenEvent] = []
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.cancelled = False

    @property
    def finished(self) -> bool:
        with self._cond:
            return bool(self._events) and self._events[-1].finish_reason is not None

    def cancel(self) -> None:
        """Stop the request; its row is freed at the engine's next step (a no-op once it has finished)."""
        self.cancelled = True
        self._engine._wake()

    def _push(self, event: TokenEvent) -> None:
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()
            waiters = list(self._waiters)
        for loop, ready in waiters:
            _wake_later(loop, ready)

    def __iter__(self) -> Iterator[TokenEvent]:
        """Blocking iteration. A consumer that stops early (breaks, or the generator is closed) cancels the
        request, as a client hanging up does."""
        i = 0
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: len(self._events) > i)
                    new = self._events[i:]
                i += len(new)
                for event in new:
                    yield event
                    if event.finish_reason is not None:
                        return
        finally:
            if not self.finished:
                self.cancel()

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        async for batch in self.batches():
            for event in batch:
                yield event

    async def batches(self) -> AsyncIterator[list[TokenEvent]]:
        """The events in lists of all that arrived since the last one: a consumer that falls behind the engine
        (64 streams at thousands of tokens/s) handles several tokens per wake-up instead of one. The last list
        ends with the event that has a finish_reason. Leaving the loop early cancels the request."""
        loop, ready = asyncio.get_running_loop(), asyncio.Event()
        with self._cond:
            self._waiters.append((loop, ready))
        try:
            i = 0
            while True:
                with self._cond:
                    new = self._events[i:]
                    if not new:
                        ready.clear()   # under the lock: a push after this schedules a set() we will see
                if not new:
                    await ready.wait()
                    continue
                i += len(new)
                end = next((j for j, e in enumerate(new) if e.finish_reason is not None), None)
                yield new if end is None else new[:end + 1]
                if end is not None:
                    return
        finally:   # closed early (the client went away): the request is cancelled
            with self._cond:
                self._waiters.remove((loop, ready))
            if not self.finished:
                self.cancel()

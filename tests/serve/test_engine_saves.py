"""End-of-request prefix saves leave the critical path: the engine copies the row's state when the request ends
(`PrefixCache.snapshot`) and stores it after the step's launches (`saves_per_step`, all once idle, and before a
lookup any queued save its prompt extends). The reference is the same engine storing each save at once (a prefix
cache without `snapshot`): the same entries, bit for bit, and the same events, whatever reuses the rows."""
from __future__ import annotations

import pytest
import torch

from dsv4 import ModelConfig
from dsv4.model import Transformer
from dsv4.serve.engine import Engine
from dsv4.serve.prefix_cache import PrefixCache
from dsv4.serve.types import SamplingParams
from conftest import random_prompts


@pytest.fixture(scope="module")
def model():
    return Transformer(ModelConfig.preset("tiny")).init_weights(seed=0).eval()


def prompts(model, lengths, seed=5):
    return random_prompts(model, lengths, seed)


class Immediate:
    """A PrefixCache without `snapshot`: the engine stores its end-of-request saves at once (the reference)."""

    def __init__(self, pc: PrefixCache):
        self.pc = pc

    def __getattr__(self, name):
        if name in ("snapshot", "save_snapshot"):
            raise AttributeError(name)
        return getattr(self.pc, name)


def entries(pc: PrefixCache) -> dict:
    """Every held entry: key -> (tokens, parent length, each tensor's bytes)."""
    out = {}
    for tier in pc._tiers.values():
        for e in tier.values():
            out[e.key] = (e.n, e.base, {k: v.contiguous().view(torch.uint8).flatten().tolist()
                                        for k, v in e.state.items()})
    return out


def events(handle):
    return [(e.token, e.logprob, e.finish_reason) for e in handle._events]


def pair(model, overlap, **kw):
    """(deferred engine, its cache), (reference engine, its cache)."""
    kw = dict(max_seq_len=96, prefill_chunk=8, overlap=overlap, **kw)
    pcs = [PrefixCache(model, 1 << 26, 0, block=4, verify_model=False) for _ in range(2)]
    return (Engine(model, prefix_cache=pcs[0], **kw), pcs[0]), (Engine(model, prefix_cache=Immediate(pcs[1]), **kw),
                                                                 pcs[1])


@pytest.mark.parametrize("overlap", [False, True])
def test_the_next_turn_hits_a_save_still_queued(model, overlap):
    """saves_per_step=0 and a long request keeps the engine busy: the first turn's saves (its prompt's end, its
    end) stay queued until the second turn's lookup, which stores them first, hits all the first turn's row held
    and continues bitwise as with the saves stored at once."""
    p1, other, new = prompts(model, [11, 6, 3])
    runs = []
    for engine, pc in pair(model, overlap, max_batch=2, saves_per_step=0):
        busy = engine.submit(other, SamplingParams(max_tokens=40, temperature=0))
        turn1 = engine.submit(p1, SamplingParams(max_tokens=5, temperature=0))
        while not turn1.finished:
            engine.step()
        queued = len(engine._saves)
        reply = [e.token for e in turn1._events]
        turn2 = engine.submit(p1 + reply + new, SamplingParams(max_tokens=6, temperature=0, logprobs=1))
        engine.run_until_idle()
        runs.append((queued, turn2.cached_tokens, events(turn1), events(turn2), events(busy), entries(pc)))
    (queued, hit, *got), (_, ref_hit, *want) = runs
    # queued: both prompts' ends and the first turn's end; with overlap the row held the 5th token
    assert queued == 3 and hit == ref_hit == len(p1) + 4 + overlap
    assert got == want


@pytest.mark.parametrize("overlap", [False, True])
def test_a_row_reused_at_once_never_saves_the_next_request(model, overlap):
    """One row, three requests queued: each request's row is reset and refilled by the next one in the step where
    it ends, before that step stores its save. The stored entries are the reference's, byte for byte, and each
    request's next turn hits its own end state."""
    ps = prompts(model, [9, 7, 13])
    runs = []
    for engine, pc in pair(model, overlap, max_batch=1, saves_per_step=1):
        hs = [engine.submit(p, SamplingParams(max_tokens=4, temperature=0)) for p in ps]
        engine.run_until_idle()
        nexts = [engine.submit(p + [e.token for e in h._events] + [3], SamplingParams(max_tokens=3, temperature=0))
                 for p, h in zip(ps, hs)]
        engine.run_until_idle()
        runs.append(([events(h) for h in hs + nexts], [h.cached_tokens for h in nexts], entries(pc),
                     pc.stats()["saves"]))
    got, want = runs
    assert got[1] == want[1] == [len(p) + 3 + overlap for p in ps]
    assert got == want and got[3] > 3


def test_the_engine_stores_every_queued_save_when_it_stops_or_idles(model):
    p = prompts(model, [10])[0]
    pc = PrefixCache(model, 1 << 26, 0, block=4, verify_model=False)
    engine = Engine(model, max_batch=1, max_seq_len=64, prefill_chunk=8, prefix_cache=pc, saves_per_step=0)
    engine.submit(p, SamplingParams(max_tokens=3, temperature=0))
    engine.run_until_idle()
    assert not engine._saves and pc.stats()["entries"]["device"] == 4   # blocks 4, 8, the prompt, the end
    engine.start()
    h = engine.submit(p[:6], SamplingParams(max_tokens=3, temperature=0))
    list(h)
    engine.stop()
    assert not engine._saves and pc.stats()["entries"]["device"] == 6

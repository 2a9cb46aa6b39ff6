"""The host's path of a prefix-cache hit: the first event goes out before the save at the prompt's end (a snapshot,
stored later), a request that ends holding exactly a prompt the cache holds already takes no end-of-request
snapshot, and the prompt is converted once (int64 ids the prefix cache takes as they are). Events and stored
entries stay those of the unchanged paths."""
from __future__ import annotations

import numpy as np
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


class Logged(PrefixCache):
    """A PrefixCache that logs its saves, snapshots and stored snapshots (token counts, with a tail?)."""

    def __init__(self, *a, log: list, **k):
        super().__init__(*a, **k)
        self.log = log

    def save(self, cache_row, tokens, tail=None):
        self.log.append(("save", len(tokens), tail is not None))
        return super().save(cache_row, tokens, tail)

    def snapshot(self, cache_row, tokens, tail=None):
        self.log.append(("snapshot", len(tokens), tail is not None))
        return super().snapshot(cache_row, tokens, tail)

    def save_snapshot(self, snap):
        self.log.append(("store", len(snap.tokens), snap.tail is not None))
        return super().save_snapshot(snap)


def engine_with_log(model, overlap=False):
    log: list = []
    pc = Logged(model, 1 << 26, 0, block=8, verify_model=False, log=log)
    return Engine(model, max_seq_len=128, prefill_chunk=16, overlap=overlap, prefix_cache=pc), pc, log


def submit_logged(engine, prompt, max_tokens, log):
    handle = engine.submit(prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    push = handle._push

    def logged(event):
        log.append(("event", event.finish_reason))
        push(event)
    handle._push = logged
    engine.run_until_idle()
    return handle


@pytest.mark.parametrize("overlap", [False, True])
def test_the_first_event_goes_out_before_the_prompt_end_save(model, overlap):
    engine, pc, log = engine_with_log(model, overlap)
    prompt = random_prompts(model, [21], 3)[0]
    submit_logged(engine, prompt, 3, log)
    first = log.index(("event", None))
    # the blocks saved at once; the prompt's end (with its logits) copied (before the event with overlap, whose
    # first token goes out in the next step) and stored after the event
    assert [e for e in log[:first] if e[0] != "snapshot"] == [("save", 8, True), ("save", 16, True)]
    assert ("snapshot", 21, True) in log and log.index(("store", 21, True)) > first
    n, tail = pc.load_full(engine.model.new_cache(1, 64), prompt)
    with torch.no_grad():   # (the engine's chunks: the saves' 8 and 16, then the rest)
        row = engine.model.new_cache(1, 64)
        for a, b in ((0, 8), (8, 16), (16, 21)):
            want = engine.model(torch.tensor([prompt[a:b]]), cache=row, last_only=True)[0, -1]
    assert n == 21 and torch.equal(tail["logits"], want)


def test_a_request_ending_on_a_prompt_the_cache_holds_takes_no_snapshot(model):
    engine, pc, log = engine_with_log(model)
    prompt = random_prompts(model, [21], 4)[0]
    cold = submit_logged(engine, prompt, 1, log)
    # the row holds the prompt, saved whole at its end: no other snapshot
    assert log[2:] == [("event", "length"), ("snapshot", 21, True), ("store", 21, True)]
    log.clear()
    again = submit_logged(engine, prompt, 1, log)        # a whole-prompt hit: no forward, no save, no snapshot
    assert again.cached_tokens == 21 and log == [("event", "length")]
    assert [e.token for e in again._events] == [e.token for e in cold._events]
    log.clear()
    longer = submit_logged(engine, prompt, 3, log)        # the row ends holding generated tokens: a snapshot of them
    assert ("snapshot", 23, False) in log and longer.cached_tokens == 21


@pytest.mark.parametrize("overlap", [False, True])
def test_hits_equal_cold_requests_with_the_reordered_saves(model, overlap):
    """Every request's events (hits, whole-prompt hits, misses) equal those of the same request on an engine whose
    prefix cache is empty (the same chunks: a hit equals a cold prefill computed in the same chunks)."""
    base = random_prompts(model, [30], 6)[0]
    tails = random_prompts(model, [5, 9], 7)
    reqs = [base + tails[0], base + tails[1], base + tails[1], base, base + tails[0][:2]]
    engine, pc, _ = engine_with_log(model, overlap)
    for p in reqs:
        params = SamplingParams(max_tokens=3, temperature=0.8, seed=11, logprobs=2)
        cold = engine_with_log(model, overlap)[0]
        got, want = engine.submit(p, params), cold.submit(p, params)
        engine.run_until_idle()
        cold.run_until_idle()
        assert [(e.token, e.logprob, e.top_logprobs, e.finish_reason) for e in got._events] == \
            [(e.token, e.logprob, e.top_logprobs, e.finish_reason) for e in want._events]
    assert engine.stats()["prefix_hit_tokens"] == 24 + 39 + 24 + 32   # (blocks of 8; 39 and 32 whole)


def test_the_prefix_cache_takes_int64_ids_as_lists(model):
    """Ids as an int64 array, another integer array and a list find, store and restore the same entries."""
    pc = PrefixCache(model, 1 << 26, 0, block=8, verify_model=False)
    prompt = random_prompts(model, [20], 8)[0]
    with torch.no_grad():
        row = model.new_cache(1, 64)
        model(torch.tensor([prompt[:8]]), cache=row)
        pc.save(row, np.asarray(prompt[:8], dtype=np.int64))
        logits = model(torch.tensor([prompt[8:]]), cache=row)[0, -1]
    pc.save(row, np.asarray(prompt, dtype=np.int64), tail={"logits": logits})
    for ids in (prompt, np.asarray(prompt, dtype=np.int64), np.asarray(prompt, dtype=np.int32)):
        n, tail = pc.load_full(model.new_cache(1, 64), ids)
        assert n == 20 and torch.equal(tail["logits"], logits)
        assert pc.load(model.new_cache(1, 64), ids) == 8    # (shorter than the tokens: the block save)
    pc.save(row, prompt)                                    # held already (under the array's key): kept as it is
    assert pc.stats()["saves"] == 2


def test_host_ids_give_the_device_ids_logits(model):
    """A forward takes its ids on the host (where they are checked) as it takes them on the model's device."""
    ids = torch.tensor([random_prompts(model, [12], 9)[0]])
    with torch.no_grad():
        a = model(ids, cache=model.new_cache(1, 32))
        b = model(ids.to(model.embed.weight.device), cache=model.new_cache(1, 32))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="must lie in"):
        model(torch.tensor([[model.config.vocab_size]]))

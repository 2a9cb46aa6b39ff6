"""The device-side speculative step against its host-side oracles: `accept_batch` (every row at once, no host sync)
gives `accept_drafts`'s accepted counts and next tokens, greedy and sampled with the same generators; the step
makes one host transfer."""
import sys

import pytest
import torch

import dsv4
from conftest import agreeing_model
from dsv4.generate import SamplingConfig
from dsv4.generate import speculative
from dsv4.generate.speculative import SpeculativeDecoder, accept_batch, accept_drafts

V = 7


def _case(seed: int, B: int, k: int):
    """Target and draft logits over a small vocabulary, drafts drawn from the drafts' own distributions (so both
    acceptances and rejections occur) and for greedy rows often equal to the target's argmax."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(B, k + 1, V, generator=g) * 2
    draft = target[:, :k] + torch.randn(B, k, V, generator=g)
    drafts = torch.multinomial(draft.softmax(-1).view(-1, V), 1, generator=g).view(B, k)
    exact = torch.rand(B, k, generator=g) < 0.6
    drafts = torch.where(exact, target[:, :k].argmax(-1), drafts)
    return target, draft, drafts


@pytest.mark.parametrize("k", [0, 1, 3])
def test_accept_batch_equals_accept_drafts(k):
    """Mixed greedy and sampling rows (top-k / top-p too), each with its own seeded generator and its own draft
    count (limits below k): the batch gives every row the oracle's (accepted count, next token), drawing the same
    random numbers."""
    B = 6
    cfgs = [SamplingConfig(temperature=0), SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.7, top_k=3),
            SamplingConfig(temperature=0), SamplingConfig(temperature=1.3, top_p=0.8), SamplingConfig(temperature=1.0)]
    for seed in range(12):
        target, draft, drafts = _case(seed, B, k)
        limits = [min(k, (seed + b) % (k + 1)) for b in range(B)]
        padded = torch.where(torch.arange(k) < torch.tensor(limits)[:, None], drafts, 0)
        gens = [torch.Generator().manual_seed(100 * seed + b) for b in range(B)]
        a, y = accept_batch(target, draft, padded, torch.tensor(limits), cfgs, gens, limits)
        for b in range(B):
            oracle_gen = torch.Generator().manual_seed(100 * seed + b)
            d = drafts[b, :limits[b]].tolist()
            want = accept_drafts(target[b, :limits[b] + 1], draft[b, :limits[b]], d, cfgs[b], oracle_gen)
            got_a = int(a[b])
            assert (got_a, int(y[b])) == want, (seed, b, limits[b])
            assert torch.equal(gens[b].get_state(), oracle_gen.get_state()), (seed, b)   # same draws


def test_accept_batch_stops_at_a_shorter_draft_count():
    """Drafts cut short on the device (a drafted stop token: n_drafts below the host's limit) are accepted at most
    up to their count; greedy rows then take the target's token after them, as the oracle with those drafts."""
    target, draft, drafts = _case(3, 4, 3)
    drafts = torch.where(torch.rand(4, 3, generator=torch.Generator().manual_seed(1)) < 2, target[:, :3].argmax(-1),
                         drafts)                                     # every draft matches: only the count limits a
    n = torch.tensor([0, 1, 2, 3])
    a, y = accept_batch(target, draft, drafts, n, [SamplingConfig(temperature=0)] * 4, [None] * 4, [3] * 4)
    for b in range(4):
        assert (int(a[b]), int(y[b])) == accept_drafts(target[b, :int(n[b]) + 1], None, drafts[b, :int(n[b])].tolist(),
                                                       SamplingConfig(temperature=0))


def test_step_makes_one_host_transfer(monkeypatch):
    """After a row's first step, a speculative step moves its results to the host in one `to_host` call and
    reads no other tensor value on the host outside the model's own input check (and the CPU reference MoE's
    routing counts, ops/reference, which a GPU never runs)."""
    model = agreeing_model()
    dec = SpeculativeDecoder(model, model.new_cache(2, 64), n_draft=2)
    for r in range(2):
        dec.prefill(r, list(range(10 + r, 30)))
    cfgs, gens = [SamplingConfig(temperature=0), SamplingConfig(temperature=1.0)], [None, torch.Generator()]
    dec.step_rows(slice(0, 2), cfgs, gens, [(), ()], [20, 20])         # first step: chooses the first tokens
    calls, reads = [], []
    real = speculative.to_host
    monkeypatch.setattr(speculative, "to_host", lambda ts: calls.append(len(ts)) or real(ts))
    for name in ("tolist", "item", "__bool__", "__int__", "__float__"):
        method = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _m=method, _n=name: _read(reads, _n) or _m(self, *a))
    monkeypatch.setattr(model, "_check_tokens", lambda tokens: None)   # (the eager model's own id check)
    dec.step_rows(slice(0, 2), cfgs, gens, [(), ()], [20, 20])
    assert len(calls) == 1
    assert len(reads) == calls[0]      # the transfer's own tolist per tensor (CPU), nothing else


def _read(reads: list, name: str) -> None:
    caller = sys._getframe(2).f_code.co_filename
    if "ops/reference" not in caller.replace("\\", "/"):
        reads.append((name, caller))


TINY = dsv4.ModelConfig.preset("tiny")   # window 32, ratios (0, 4, 16, 4): a 4-token step crosses group ends


@pytest.mark.parametrize("dtypes", [{}, {"kv_dtype": "fp8", "index_dtype": "fp4"}], ids=["fp32", "fp8-fp4"])
@torch.no_grad()
def test_rollback_on_device_equals_rollback(dtypes):
    """The rollback by device data alone (every count's work, no host value) leaves every tensor of the cache,
    the scratch rows included, bitwise as the host-guided rollback does, for rows keeping 0 .. all tokens."""
    model = dsv4.Transformer(TINY).init_weights(seed=3).eval()
    g = torch.Generator().manual_seed(0)
    lengths, steps = [27, 30, 31, 33, 46, 47], 4
    prompts = [torch.randint(0, TINY.vocab_size, (1, n), generator=g) for n in lengths]
    step = torch.randint(0, TINY.vocab_size, (len(lengths), steps), generator=g)
    keep = [0, 1, 2, 3, 4, 2]
    caches = []
    for on_device in (False, True):
        cache = model.new_cache(len(lengths), 96, **dtypes)
        for r, p in enumerate(prompts):
            model(p, cache=cache.select(r))
        ckpt = cache.checkpoint(steps)
        model(step, cache=cache)
        if on_device:
            cache.rollback_on_device(ckpt, torch.tensor(keep))
            cache.end_rollback(ckpt, keep)
        else:
            cache.rollback(ckpt, keep)
        caches.append(cache)
    host, device = caches
    assert host.lengths() == device.lengths() == [n + k for n, k in zip(lengths, keep)]
    for a, b in zip(_all_tensors(host), _all_tensors(device)):
        assert torch.equal(a, b)


def _all_tensors(cache):
    return [cache.positions] + [t for layer in cache.layers for t in [s.buf for s in layer.stores()]
                                + [x for st in layer.states() for x in (st.kv, st.score)]]

"""The single greedy row step's op cuts (dsv4.generate.greedy_row) change no result: the step equals the step as
first written (per-draft masks, `greedy_verify`, per-kind state updates, the mode flag in the host row; kept here as
the oracle) bit for bit over whole streams with stops, budgets and dead steps; the forwards planned by
`plan_window` / `Attention.plan_cached` equal unplanned ones bit for bit and make none of the values planned; the
planned index lists equal brute-force ones; the finite check and the memo of constants."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dsv4
from conftest import agreeing_model, read_tensors
from dsv4.cache import KVCache
from dsv4.cache.step_memo import constant
from dsv4.generate import speculative
from dsv4.generate.fused_verify import greedy_verify
from dsv4.generate.greedy_row import RowOut, _finite_rows, mtp_forward
from dsv4.generate.speculative import SpeculativeDecoder
from dsv4.model.attention import plan_window, ring_chunk_indices, ring_indices

TINY = dsv4.ModelConfig.preset("tiny")   # window 32, ratios (0, 4, 16, 4 | MTP 0)


# ------------------------------------------------------------------ the oracle: the step as first written
def _reference_step(model, main, mtp, state, budget_t, mode_t):
    """greedy_draft_verify as first written, on state's buffers with the host row as (budget, mode 1 / 0 / -1);
    returns (packed, logits [1, k+1, V], next budget, next mode)."""
    k = state.n_draft
    lanes, ids = state.lanes, state.ids
    stop_t = state.host[:, 2:]
    budget_live = torch.stack((budget_t, mode_t)).clamp(min=0)
    live, dead = mode_t > 0, mode_t < 0
    limit = torch.where(live, (budget_t - 1).clamp(max=k), 0)
    x_finite = torch.isfinite(state.x_logits).all(-1)
    mtp_ckpt = mtp.checkpoint(2 * k)
    out, draft_logits = mtp_forward(model, mtp, lanes, ids)
    alive = limit > 0
    drafts, counted = [], []
    for j in range(k):
        if j:
            alive = alive & (limit > j)
        drafts.append(torch.where(alive, draft_logits.argmax(-1), 0))
        counted.append(alive)
        if j == k - 1:
            break
        out, draft_logits = mtp_forward(model, mtp, out[:, -1:], drafts[j][:, None])
        alive = alive & ~(drafts[j][:, None] == stop_t).any(-1)
    drafts_t = torch.stack(drafts, 1)
    n_drafts = torch.stack(counted, 1).long().sum(1)
    res = greedy_verify(model, main, ids[:, -1], drafts_t, n_drafts, stop_t, budget_live, x_finite=x_finite)
    a = res.a
    mtp.rollback_on_device(mtp_ckpt, res.keep)
    logits = torch.cat((state.x_logits[:, None], res.target[:, :k]), 1)
    shift = (a + 1)[:, None] + torch.arange(k + 1)
    R, C = lanes.shape[2:]
    moved_lanes = torch.cat((lanes, res.h), 1).gather(1, shift[:, :, None, None].expand(-1, -1, R, C))
    moved_ids = torch.cat((torch.cat((ids, drafts_t), 1).gather(1, shift[:, :k]), res.y[:, None]), 1)
    x_logits = res.target.gather(1, a.view(-1, 1, 1).expand(-1, 1, res.target.shape[2]))[:, 0]
    lanes.copy_(torch.where(dead.view(-1, 1, 1, 1), lanes, moved_lanes))
    ids.copy_(torch.where(dead[:, None], ids, moved_ids))
    state.x_logits.copy_(torch.where(dead[:, None], state.x_logits, x_logits))
    go = live & (res.keep > a)
    left = budget_t - 1 - a
    on = go & ~(res.y[:, None] == stop_t).any(-1) & (left > 1)
    mode = torch.where(on, 1, torch.where(go, 0, -1))
    return res.packed, logits, torch.where(live, left, budget_t), mode


def _stream(model, prompt, n, stops, k, kv_dtype, reference: bool):
    """greedy_row_stream of n tokens, every single-row step recorded: (packed, logits, lanes, ids, x_logits, the
    main and MTP cache tensors a later step reads). With `reference`, the steps run `_reference_step`, the host row
    translated both ways (a live row's budget, else 0; the moves flag <-> the mode)."""
    dec = SpeculativeDecoder(model, model.new_cache(1, len(prompt) + n + 16, kv_dtype=kv_dtype), n_draft=k)
    dec.prefill(0, prompt)
    steps = []
    real = speculative.greedy_draft_verify

    def step(model_, main, mtp, state):
        if reference:
            budget_t, moves = state.host[:, 0].clone(), state.host[:, 1]
            mode_t = torch.where(moves == 0, -1, (budget_t >= 2).long())
            packed, logits, budget_t, mode_t = _reference_step(model_, main, mtp, state, budget_t, mode_t)
            state.host[:, 0] = torch.where(mode_t > 0, budget_t, 0)
            state.host[:, 1] = (mode_t >= 0).long()
            out = RowOut(packed, logits)
        else:
            out = real(model_, main, mtp, state)
        steps.append([out.packed.clone(), out.logits.clone(), state.lanes.clone(), state.ids.clone(),
                      state.x_logits.clone(), state.host.clone()]
                     + [t.clone() for c in (main, mtp) for t in read_tensors(c)])
        return out
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(speculative, "greedy_draft_verify", step)
        results = list(dec.greedy_row_stream(0, n, stops))
    return [(r.tokens, r.accepted, r.drafted, r.finished, r.finite) for r in results], steps


def _host_meaning(host: torch.Tensor) -> torch.Tensor:
    """The host row as the next step reads it: a budget of at most 1 (0 or 1) means the same: not live."""
    host = host.clone()
    host[:, 0] = torch.where(host[:, 0] >= 2, host[:, 0], 0)
    return host


@pytest.fixture(scope="module")
def agreeing():
    return agreeing_model()


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("case", ["plain", "stop", "budget", "fp8"])
@torch.no_grad()
def test_row_step_equals_the_step_as_first_written(agreeing, k, case):
    """Whole streams (every acceptance count, a drafted stop accepted, a budget ending inside a step's drafts, the
    dead step launched after the last, FP8 rings the attention does not read in place): every step's packed
    results, logits, state and both caches equal the oracle's bit for bit, and so do the StepResults."""
    prompt = list(range(10, 37))
    plain = dsv4.generate(agreeing, [prompt], 40)[0]
    n, stops, kv = {"plain": (40, (), "auto"), "stop": (30, (plain[9], 99999), "auto"),
                    "budget": (7, (), "auto"), "fp8": (24, (), "fp8")}[case]
    mine, my_steps = _stream(agreeing, prompt, n, stops, k, kv, reference=False)
    theirs, their_steps = _stream(agreeing, prompt, n, stops, k, kv, reference=True)
    assert mine == theirs
    assert [t for toks, *_ in mine for t in toks] == plain[:len([t for toks, *_ in mine for t in toks])]
    assert len(my_steps) == len(their_steps) >= len(mine)
    if len(my_steps) > len(mine):   # the dead step launched after the last: it keeps nothing, the state stays
        assert my_steps[-1][0][0, 4] == 0 and my_steps[-1][5][0, 1] == 0
        assert all(torch.equal(x, y) for x, y in zip(my_steps[-1][2:5], my_steps[-2][2:5]))
    _same_steps(my_steps, their_steps)
    if case == "plain":
        assert set(range(k + 1)) <= {acc for _, acc, *_ in mine}


def _same_steps(my_steps, their_steps):
    for i, (a, b) in enumerate(zip(my_steps, their_steps)):
        a[5], b[5] = _host_meaning(a[5]), _host_meaning(b[5])
        for j, (x, y) in enumerate(zip(a, b)):
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True, msg=f"step {i}, tensor {j}")


@pytest.mark.parametrize("k", [1, 2, 3])
@torch.no_grad()
def test_row_step_with_nonfinite_logits_equals_the_step_as_first_written(agreeing, k):
    """A generated token whose embedding is NaN (the logits after it turn non-finite), accepted as a draft with
    drafts after it: the finite flags (x_P's logits checked with the emitted target rows) and everything else as
    the oracle's; a step with finite x_P logits is flagged for a non-finite target row it emits."""
    prompt = list(range(10, 37))
    plain = dsv4.generate(agreeing, [prompt], 14)[0]
    model = agreeing_model()
    with torch.no_grad():
        model.embed.weight[plain[7]] = float("nan")
    mine, my_steps = _stream(model, prompt, 14, (), k, "auto", reference=False)
    theirs, their_steps = _stream(model, prompt, 14, (), k, "auto", reference=True)
    assert mine == theirs
    assert mine[0][-1] and not mine[-1][-1]
    assert any(s[0][0, 3] == 0 and s[0][0, 0] > 0 and torch.isfinite(s[1][0, 0]).all() for s in my_steps)
    assert len(my_steps) == len(their_steps)
    _same_steps(my_steps, their_steps)


# ------------------------------------------------------------------ planned forwards
def _brute_ring(p: int, W: int) -> list[int]:
    return [q % W if q >= 0 else -1 for q in range(p - W + 1, p + 1)]


def _brute_chunk(p0: int, i: int, W: int) -> list[int]:
    """Query i of a chunk at p0: positions p0+i, p0+i-1, .., p0+i-W+1 as [ring (W slots) | chunk rows]."""
    out = []
    for b in range(W):
        q = p0 + i - b
        out.append(-1 if q < 0 else q % W if q < p0 else W + q - p0)
    return out


@pytest.mark.parametrize("p0", [0, 1, 5, 30, 31, 32, 33, 61, 100])
def test_window_index_lists_equal_brute_force(p0):
    """ring_indices, ring_chunk_indices and plan_window's planned lists against their definitions, before and past
    the ring's wrap, for two rows at different positions."""
    W, k = 32, 3
    starts = torch.tensor([p0, p0 + 7])
    assert ring_indices(starts, W).tolist() == [[_brute_ring(p, W)] for p in starts.tolist()]
    assert ring_chunk_indices(starts, 4, W).tolist() == [[_brute_chunk(p, i, W) for i in range(4)]
                                                         for p in starts.tolist()]
    cache = dsv4.Transformer(TINY).init_weights(seed=0).new_cache(2, 256, kv_dtype="fp32").layer(0)
    positions = starts[:, None] + torch.arange(2 * k)
    spans = [(0, k + 1)] + [(k + j, 1) for j in range(1, k)]
    memo = {}
    for _ in range(2):   # (the second from the memo's offsets)
        planned = plan_window(cache, positions, positions % W, spans, torch.float32, memo)
        for (off, S), pos0 in zip(spans, planned):
            memo_ = pos0.__dict__["_dsv4_step_memo"]
            assert pos0.tolist() == [p + off for p in starts.tolist()]
            assert memo_["pos", S].tolist() == [[p + off + i for i in range(S)] for p in starts.tolist()]
            assert memo_["write_slots", S, W].tolist() == [[(p + off + i) % W for i in range(S)]
                                                           for p in starts.tolist()]
            if S == 1:
                assert memo_["ring_idx", W].tolist() == [[_brute_ring(p + off, W)] for p in starts.tolist()]
            else:
                assert memo_["ring_chunk_idx", S, W].tolist() == [[_brute_chunk(p + off, i, W) for i in range(S)]
                                                                  for p in starts.tolist()]
    assert len(memo) == 1


class _Names(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8"])
@torch.no_grad()
def test_planned_mtp_forwards_equal_unplanned_ones(agreeing, kv_dtype):
    """A catch-up of 4 pairs and two one-token MTP forwards past the ring's wrap, planned inside a checkpoint of the
    MTP cache (then rolled back to keep all): outputs, logits and MTP cache bit for bit those of the forwards
    one by one; the planned forwards compute no position, RoPE angle or slot (no arange, cos, remainder) and
    leave the device positions to the rollback."""
    model, k = agreeing, 3
    g = torch.Generator().manual_seed(0)
    lanes = torch.randn(1, 45, TINY.hc_mult, TINY.dim, generator=g)
    ids = torch.randint(0, TINY.vocab_size, (1, 45), generator=g)
    caches = [KVCache(TINY, 1, 64, kv_dtype, mtp=True) for _ in range(2)]
    for c in caches:
        mtp_forward(model, c, lanes[:, :38], ids[:, :38])
    mine, theirs = caches
    one = [mtp_forward(model, theirs, lanes[:, 38:42], ids[:, 38:42])]
    one.append(mtp_forward(model, theirs, one[-1][0][:, -1:], ids[:, 42:43]))
    one.append(mtp_forward(model, theirs, one[-1][0][:, -1:], ids[:, 43:44]))
    ckpt = mine.checkpoint(2 * k)
    spans = [(0, k + 1), (k + 1, 1), (k + 2, 1)]
    starts = model.mtp[0].attn.plan_cached(mine.layer(0), ckpt.parts.positions, ckpt.parts.slots, spans,
                                           model.dtype, {})
    with _Names() as seen:
        planned = [mtp_forward(model, mine, lanes[:, 38:42], ids[:, 38:42], starts[0])]
        planned.append(mtp_forward(model, mine, planned[-1][0][:, -1:], ids[:, 42:43], starts[1]))
        planned.append(mtp_forward(model, mine, planned[-1][0][:, -1:], ids[:, 43:44], starts[2]))
    in_place = kv_dtype == "auto"   # (FP8 rings: the forwards gather their window themselves)
    assert not ({"cos", "sin"} | ({"arange", "remainder"} if in_place else set())) & set(seen.names)
    assert mine.positions.tolist() == [38] and mine.lengths() == [44]
    mine.rollback_on_device(ckpt, torch.tensor([2 * k]))
    for (h, lg), (h2, lg2) in zip(planned, one):
        assert torch.equal(h[:, -1:], h2[:, -1:]) and torch.equal(lg, lg2)
    assert torch.equal(planned[0][0], one[0][0])
    for x, y in zip(read_tensors(mine), read_tensors(theirs)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8"])
@torch.no_grad()
def test_planned_verify_forward_equals_the_unplanned_one(agreeing, kv_dtype):
    """A 4-token verify forward inside a checkpoint (past the ring's wrap and group ends of 4 and 16) with its start
    planned by plan_window: lanes and every cache tensor bit for bit the unplanned forward's (after both roll back
    to 2 tokens), and it computes neither its positions nor its ring slots."""
    model = agreeing
    prompt = torch.arange(5, 50)[None] % TINY.vocab_size
    caches = [model.new_cache(1, 96, kv_dtype=kv_dtype) for _ in range(2)]
    for c in caches:
        model(prompt, cache=c)
    tokens = torch.tensor([[3, 1, 4, 1]])
    out = []
    for c, planned in zip(caches, (True, False)):
        ckpt = c.checkpoint(4)
        with _Names() as seen:
            if planned:
                (start,) = plan_window(c.layer(0), ckpt.parts.positions, ckpt.parts.slots, [(0, 4)], model.dtype,
                                       {})
                assert c.positions.tolist() == [45]
                h = model.hidden(tokens, cache=c, pos0=start)
                assert c.positions.tolist() == [45]              # (the rollback's to set)
            else:
                h = model.hidden(tokens, cache=c)
        c.rollback_on_device(ckpt, torch.tensor([2]))
        c.end_rollback(ckpt, [2])
        out.append((h, seen.names))
    assert torch.equal(out[0][0], out[1][0])
    assert out[0][1].count("arange") < out[1][1].count("arange")
    assert out[0][1].count("clone") < out[1][1].count("clone")
    for x, y in zip(read_tensors(caches[0]), read_tensors(caches[1])):
        assert torch.equal(x, y)
    step = torch.tensor([[7]])
    assert torch.equal(model(step, cache=caches[0]), model(step, cache=caches[1]))


# ------------------------------------------------------------------ small pieces
def test_finite_rows_is_isfinite_all():
    x = torch.randn(2, 5, 33)
    x[0, 1, 3], x[0, 2, 0], x[1, 4, 32] = float("inf"), float("nan"), float("-inf")
    x[1, 0, 5], x[1, 1, 7] = torch.finfo(torch.float32).max, torch.finfo(torch.float32).tiny / 4   # (subnormal)
    assert torch.equal(_finite_rows(x), torch.isfinite(x).all(-1))
    assert _finite_rows(x).tolist() == [[True, False, False, True, True], [True, True, True, True, False]]


def test_constant_is_kept_across_steps_but_not_while_capturing(monkeypatch):
    made = []
    memo = {}
    make = lambda: made.append(1) or torch.arange(3)   # noqa: E731
    a = constant(memo, "k", make)
    assert constant(memo, "k", make) is a and len(made) == 1
    constant(None, "k", make)
    assert len(made) == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    fresh = {}
    constant(fresh, "k", make)
    assert fresh == {} and len(made) == 3

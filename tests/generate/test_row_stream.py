"""A single greedy row's pipelined speculative decoding (SpeculativeDecoder.greedy_row_stream): each step launched
before the previous one's results are read gives the steps of the `step_row` loop (tokens, counts, logits), plain
greedy decoding's tokens, and the same caches afterwards, with stops and budgets met inside a step's drafts, as a
step's own first token, or with the step ahead already launched (it must change nothing)."""
import os
import subprocess
import sys

import pytest
import torch

import dsv4
from conftest import agreeing_model, read_tensors
from dsv4.generate import SamplingConfig, host
from dsv4.generate.speculative import SpeculativeDecoder

GREEDY = SamplingConfig(temperature=0.0)
PROMPT = list(range(10, 37))   # 27 tokens: decoding passes the window wrap at 32 and groups of 4 and 16


@pytest.fixture(scope="module")
def agreeing():
    return agreeing_model()


@pytest.fixture(scope="module")
def plain(agreeing):
    return dsv4.generate(agreeing, [PROMPT], 40)[0]


def _decoder(model, n_draft, room=80, prompt=PROMPT):
    dec = SpeculativeDecoder(model, model.new_cache(1, room), n_draft=n_draft)
    dec.prefill(0, prompt)
    return dec


def _loop(model, n, n_draft, stops=(), room=80, steps=None):
    """The `step_row` loop (fixed-shape reads, as the stream's): its StepResults and the decoder."""
    dec = _decoder(model, n_draft, room)
    dec.fixed_shapes = True
    out = []
    while not out or not out[-1].finished:
        if steps is not None and len(out) == steps:
            break
        out.append(dec.step_row(0, GREEDY, None, stops, n - sum(len(r.tokens) for r in out)))
    return out, dec


def _stream(model, n, n_draft, stops=(), room=80):
    """The stream's StepResults, the decoder, and the order of its step launches (L) and result reads (W)."""
    dec, order = _decoder(model, n_draft, room), []
    real_launch, real_wait = SpeculativeDecoder._launch, host.HostCopy.wait
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SpeculativeDecoder, "_launch", staticmethod(lambda *a: order.append("L") or real_launch(*a)))
        mp.setattr(host.HostCopy, "wait", lambda self: order.append("W") or real_wait(self))
        out = list(dec.greedy_row_stream(0, n, stops))
    return out, dec, "".join(order)


def _same_steps(mine, theirs):
    assert [(r.tokens, r.accepted, r.drafted, r.finished, r.finite) for r in mine] == \
        [(r.tokens, r.accepted, r.drafted, r.finished, r.finite) for r in theirs]
    for a, b in zip(mine, theirs):
        assert torch.equal(a.logits, b.logits)


def _same_caches(mine, theirs, last):
    """Equal host and device lengths, equal bytes wherever a later step reads, the same row state, and the same
    logits from one more plain decode step of `last` on each main cache."""
    for a, b in ((mine.cache, theirs.cache), (mine.mtp_cache, theirs.mtp_cache)):
        assert a.lengths() == b.lengths() == a.positions.tolist()
        for x, y in zip(read_tensors(a), read_tensors(b)):
            assert torch.equal(x, y)
    assert mine.rows[0].next_token == theirs.rows[0].next_token
    a, b = mine.rows[0].fused, theirs.rows[0].fused        # (what a next turn on the row goes on from)
    if a is not None or b is not None:
        for name in ("lanes", "ids", "x_logits", "x_finite"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    step = torch.tensor([[last]])
    assert torch.equal(mine.model(step, cache=mine.cache), theirs.model(step, cache=theirs.cache))


def _pipelined(order, steps):
    """Every result read but the last comes after the next step's launch, and a dead step was launched after the
    last one exactly when that one was live (a live step finishes with at least 2 tokens: an accepted stop, or a
    budget of 2 or more reached)."""
    reads = [j for j, c in enumerate(order) if c == "W"]
    for i in range(len(reads) - 1):
        assert order[:reads[i]].count("L") >= i + 2, order
    assert order.count("L") == order.count("W") + (len(steps[-1].tokens) > 1), order


@pytest.mark.parametrize("n_draft", [1, 2, 3])
@torch.no_grad()
def test_stream_equals_the_step_loop_and_plain_decoding(agreeing, plain, n_draft):
    """40 tokens with every acceptance count 0 .. n_draft met: the stream's steps are the step_row loop's (tokens,
    counts, logits), its tokens plain greedy decoding's, every step after the first launched before its
    predecessor's results were read, the last one (its budget ended it) with a dead step in flight, and both caches
    end as the loop's."""
    mine, dec, order = _stream(agreeing, 40, n_draft)
    theirs, ref = _loop(agreeing, 40, n_draft)
    _same_steps(mine, theirs)
    assert [t for r in mine for t in r.tokens] == plain
    assert set(range(n_draft + 1)) <= {r.accepted for r in mine}
    _pipelined(order, mine)
    assert order.count("L") == order.count("W") + 1 == len(mine) + 1   # (one dead step launched at the end)
    assert dec.stats == ref.stats
    _same_caches(dec, ref, plain[-1])


@pytest.mark.parametrize("n_draft", [1, 3])
@torch.no_grad()
def test_stream_keeps_stops_and_budgets(agreeing, plain, n_draft):
    """A stop token accepted as a draft (the step ahead is dead), or chosen as a step's next token (the step ahead
    emits it alone, and the one after is dead), and budgets ending inside a step's drafts or at 1 (nothing
    launched ahead): the loop's steps and caches, plain decoding's tokens."""
    starts, at = set(), 0          # where the steps of an unstopped run start (their x: the last step's y)
    for r in _loop(agreeing, 40, n_draft)[0]:
        starts.add(at)
        at += len(r.tokens)
    first = [p for p in range(1, 30) if plain.index(plain[p]) == p]   # (the token's first occurrence)
    alone, drafted = [p for p in first if p in starts], [p for p in first if p not in starts]
    ends = set()
    for stop_at in alone[:2] + drafted[:2]:
        stops = (plain[stop_at], 99999)
        want = plain[:plain.index(plain[stop_at]) + 1]
        mine, dec, order = _stream(agreeing, 40, n_draft, stops)
        theirs, ref = _loop(agreeing, 40, n_draft, stops)
        _same_steps(mine, theirs)
        assert [t for r in mine for t in r.tokens] == want
        _pipelined(order, mine)
        _same_caches(dec, ref, want[-1])
        ends.add("alone" if mine[-1].tokens == [want[-1]] and len(mine) > 1 else "drafted")
    assert ends == {"alone", "drafted"}             # (both ways of meeting the stop)
    for budget in (1, 2, 3, 7, 8):
        mine, dec, order = _stream(agreeing, budget, n_draft)
        theirs, ref = _loop(agreeing, budget, n_draft)
        _same_steps(mine, theirs)
        assert [t for r in mine for t in r.tokens] == plain[:budget]
        _pipelined(order, mine)
        assert budget > 1 or order == "LW"              # budget 1: the row does not go on, nothing launched ahead
        _same_caches(dec, ref, plain[budget - 1])


@torch.no_grad()
def test_stream_near_the_end_of_the_cache(agreeing, plain):
    """A cache with room for the tokens alone: the stream launches ahead while two steps fit, then steps one at
    a time (the fused step, then shorter batched ones); tokens and caches as the loop's."""
    room = len(PROMPT) + 40
    mine, dec, order = _stream(agreeing, 40, 3, room=room)
    theirs, ref = _loop(agreeing, 40, 3, room=room)
    _same_steps(mine, theirs)
    assert [t for r in mine for t in r.tokens] == plain
    assert order.startswith("LLWLW") and order.endswith("WW")   # (launched ahead, then one step at a time)
    assert order.count("W") == len(mine)
    assert dec.cache.lengths() == ref.cache.lengths() == [room - 1]


@torch.no_grad()
def test_closing_the_stream_settles_the_step_in_flight(agreeing, plain):
    """A stream closed after two steps has launched a third: the row ends after that third step (host mirrors
    exact, caches as the loop's after three steps; the step's result handed over in `settled`), and decoding on
    from there gives plain decoding's tokens."""
    dec, settled = _decoder(agreeing, 3), []
    stream = dec.greedy_row_stream(0, 40, settled=settled)
    got = [t for _, r in zip(range(2), stream) for t in r.tokens]
    assert settled == []
    stream.close()
    theirs, ref = _loop(agreeing, 40, 3, steps=3)
    assert got == [t for r in theirs[:2] for t in r.tokens]
    _same_steps(settled, theirs[2:])
    assert dec.cache.lengths() == ref.cache.lengths() == dec.cache.positions.tolist()
    assert dec.mtp_cache.lengths() == ref.mtp_cache.lengths() == dec.mtp_cache.positions.tolist()
    done = len(got) + len(theirs[2].tokens)
    more = [t for r in dec.greedy_row_stream(0, 40 - done) for t in r.tokens]
    assert got + theirs[2].tokens + more == plain


@torch.no_grad()
def test_a_resumed_row_streams_from_the_batched_path(agreeing, plain):
    """A row resumed from a prefix cache's tail (one lane pending, no MTP pair before it) takes the batched step
    until it has the lanes for the single-row step, then streams it: plain decoding's tokens."""
    dec = _decoder(agreeing, 3)
    tail = dec.tail(0)
    dec.begin(0)
    dec.resume(0, tail)
    assert [t for r in dec.greedy_row_stream(0, 40) for t in r.tokens] == plain
    assert dec.rows[0].fused is not None


def test_stream_refuses_bad_arguments(agreeing):
    dec = _decoder(agreeing, 1)
    with pytest.raises(dsv4.errors.InvalidArgument):
        next(dec.greedy_row_stream(0, 0))
    with pytest.raises(dsv4.errors.InvalidArgument):
        next(dec.greedy_row_stream(1, 4))


def test_a_stream_left_open_at_interpreter_exit(tmp_path):
    """A process that exits with a stream still open (a step in flight: a server's engine mid-request) exits
    cleanly: the stream's finalization at exit does not settle the step."""
    script = tmp_path / "left_open.py"
    script.write_text(
        "import dsv4\n"
        "from dsv4.generate.speculative import SpeculativeDecoder\n"
        "model = dsv4.Transformer(dsv4.ModelConfig.preset('tiny')).init_weights(seed=0).eval()\n"
        "dec = SpeculativeDecoder(model, model.new_cache(1, 64), n_draft=2)\n"
        "dec.prefill(0, list(range(10, 20)))\n"
        "stream = dec.greedy_row_stream(0, 30)\n"
        "next(stream)\n"
        "print('open')\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout == "open\n", done.stderr[-2000:]

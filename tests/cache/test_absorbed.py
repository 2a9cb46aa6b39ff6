"""The rollback's state rebuild (`absorbed_table` looked up per row + `absorbed`: one gather from the old states,
the token rows and an empty row, several states stacked) against `absorb` itself, run on only the kept token rows
of each state: bit for bit, for every kept count 0..S, both state layouts, rows starting anywhere in their group.
And absorb of a state held as one (kv, score) pair against the same state held as two tensors."""
import pytest
import torch

from dsv4.cache import state as state_module
from dsv4.cache.state import CompressorState, absorb, absorbed, absorbed_table
from conftest import read_tensors

EMPTY = torch.tensor([0.0, float("-inf")]).view(1, 2, 1, 1, 1)


def _state(pos0: torch.Tensor, m: int, width: int, overlap: bool, g: torch.Generator) -> CompressorState:
    """A state in the layout absorb keeps: the unfinished group's pos0 % m rows hold data, the rest are empty
    (kv 0, score -inf); with overlap, the previous group's rows hold data."""
    B = pos0.shape[0]
    st = CompressorState.empty(B, m, width, overlap)
    off = m if overlap else 0
    for b in range(B):
        r0 = int(pos0[b]) % m
        st.kv[b, off:off + r0] = torch.randn(r0, width, generator=g)
        st.score[b, off:off + r0] = torch.randn(r0, width, generator=g)
        if overlap and int(pos0[b]) >= m:
            st.kv[b, :m] = torch.randn(m, width, generator=g)
            st.score[b, :m] = torch.randn(m, width, generator=g)
    return st


@pytest.mark.parametrize("m,overlap", [(4, True), (4, False), (16, False), (2, True)])
@pytest.mark.parametrize("S", [1, 2, 5])
def test_absorbed_equals_absorb_of_the_kept_rows(m, overlap, S):
    g = torch.Generator().manual_seed(m * 10 + S)
    width = 6
    pos0 = torch.tensor([0, 1, m - 1, m, 3 * m - 2, 5 * m + 1, 7, 2 * m - 1])
    B = pos0.shape[0]
    table = absorbed_table(m, overlap, S)
    for trial in range(3):
        states = [_state(pos0, m, width, overlap, g) for _ in range(2)]   # two layers' states, stacked
        kv, score = torch.randn(2, B, S, width, generator=g), torch.randn(2, B, S, width, generator=g)
        count = torch.randint(0, S + 1, (B,), generator=g)
        count[trial % B] = S
        count[(trial + 1) % B] = 0
        old = torch.stack([torch.stack((st.kv, st.score)) for st in states])
        got = absorbed(old, torch.stack((kv, score), 1), table[pos0 % m, count], EMPTY)
        for li, state in enumerate(states):
            for b in range(B):
                k = int(count[b])
                want = CompressorState(state.kv[b:b + 1].clone(), state.score[b:b + 1].clone())
                if k:
                    absorb(want, kv[li, b:b + 1, :k], score[li, b:b + 1, :k], pos0[b:b + 1], m, overlap)
                assert torch.equal(got[li, 0, b], want.kv[0]), (li, b, k)
                assert torch.equal(got[li, 1, b], want.score[0]), (li, b, k)


@pytest.mark.parametrize("m,overlap", [(4, True), (4, False), (16, False), (2, True)])
@pytest.mark.parametrize("S", [1, 3, 9, 40])
def test_a_paired_state_absorbs_as_kv_and_score_apart(m, overlap, S, monkeypatch):
    """At inference a state whose kv and score lie as one tensor (a state stack's member, or `empty`'s) moves both
    with one op per step (`_absorb_pair`): its outputs and the state it leaves equal, bit for bit, absorb's on the
    same state held as two tensors, over chunks that start anywhere in a group."""
    calls = []
    real = state_module._absorb_pair
    monkeypatch.setattr(state_module, "_absorb_pair", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(m * 100 + S)
    width = 6
    pos0 = torch.tensor([0, 1, m - 1, m, 3 * m - 2, 5 * m + 1, 7, 2 * m - 1])
    B = pos0.shape[0]
    paired = _state(pos0, m, width, overlap, g)
    apart = CompressorState(paired.kv.clone(), paired.score.clone())
    assert paired.pair is not None and apart.pair is None
    for chunk in range(3):
        kv, score = torch.randn(B, S, width, generator=g), torch.randn(B, S, width, generator=g)
        with torch.no_grad():
            got = absorb(paired, kv, score, pos0, m, overlap)
            want = absorb(apart, kv, score, pos0, m, overlap)
        assert len(calls) == chunk + 1
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])            # the group-aligned rows
        assert got[2] == want[2] and torch.equal(got[3], want[3])                        # groups, which complete
        assert (got[4] is None) == (want[4] is None) == (not overlap)
        if overlap:                                                                      # the previous group
            assert torch.equal(got[4][0], want[4][0]) and torch.equal(got[4][1], want[4][1])
        assert torch.equal(paired.kv, apart.kv) and torch.equal(paired.score, apart.score)
        pos0 = pos0 + S


@pytest.mark.parametrize("chunks", [[9, 1, 7, 1], [33, 2]])
def test_a_cache_without_pairs_computes_the_same_bytes(chunks):
    """The model's cached forwards (rows at different positions, chunks and decode steps) give the same logits
    and leave the same cache bytes whether its compressor states absorb as pairs or as kv and score apart."""
    import dsv4
    model = dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=2).eval()
    g = torch.Generator().manual_seed(len(chunks))
    head = [torch.randint(0, model.config.vocab_size, (1, n), generator=g) for n in (3, 6)]
    steps = [torch.randint(0, model.config.vocab_size, (2, n), generator=g) for n in chunks]
    runs = []
    for pairs in (True, False):
        cache = model.new_cache(2, 64)
        if not pairs:
            for layer in cache.layers:
                for st in layer.states():
                    st.pair = None
        logits = []
        with torch.no_grad():
            for r, ids in enumerate(head):   # the rows apart first: they continue at different positions
                logits.append(model(ids, cache=cache.select(r)))
            for ids in steps:
                logits.append(model(ids, cache=cache))
        runs.append((logits, [t.clone() for t in read_tensors(cache)]))
    (got, got_cache), (want, want_cache) = runs
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert all(torch.equal(a, b) for a, b in zip(got_cache, want_cache))

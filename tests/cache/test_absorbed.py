"""The rollback's state rebuild (`absorbed_index` + `absorbed`: one gather from the old state and the token rows)
against `absorb` itself, run on only the kept token rows: bit for bit, for every kept count 0..S, both state
layouts, rows starting anywhere in their group."""
import pytest
import torch

from dsv4.cache.state import CompressorState, absorb, absorbed, absorbed_index


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
    for trial in range(3):
        state = _state(pos0, m, width, overlap, g)
        kv, score = torch.randn(B, S, width, generator=g), torch.randn(B, S, width, generator=g)
        count = torch.randint(0, S + 1, (B,), generator=g)
        count[trial % B] = S
        count[(trial + 1) % B] = 0
        index, live = absorbed_index(pos0, count, S, m, overlap)
        got_kv, got_score = absorbed(state, kv, score, index, live)
        for b in range(B):
            k = int(count[b])
            want = CompressorState(state.kv[b:b + 1].clone(), state.score[b:b + 1].clone())
            if k:
                absorb(want, kv[b:b + 1, :k], score[b:b + 1, :k], pos0[b:b + 1], m, overlap)
            assert torch.equal(got_kv[b], want.kv[0]), (b, k)
            assert torch.equal(got_score[b], want.score[0]), (b, k)

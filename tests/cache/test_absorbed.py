"""The rollback's state rebuild (`absorbed_table` looked up per row + `absorbed`: one gather from the old states,
the token rows and an empty row, several states stacked) against `absorb` itself, run on only the kept token rows
of each state: bit for bit, for every kept count 0..S, both state layouts, rows starting anywhere in their group."""
import pytest
import torch

from dsv4.cache.state import CompressorState, absorb, absorbed, absorbed_table

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

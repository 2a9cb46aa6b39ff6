"""dsv4/model/compressor.py, the CSA/HCA compressor (docs/architecture.md#compressor), on tiny dims: its entries
against a float64 hand computation of the softmax-gated pooling, and its incremental forms (chunks through a
CompressorState, one-token decode steps, rows at different phases) against the one-shot sequence result."""
import pytest
import torch

from conftest import assert_rel_close
from dsv4 import ops
from dsv4.cache.state import CompressorState
from dsv4.model.compressor import STEPWISE_MAX, Compressor

DIM, D, ROPE = 16, 8, 4  # model width, entry width Dc, rope channels
EPS = 1e-6


def _compressor(ratio: int, overlap: bool, seed: int = 0) -> Compressor:
    """A compressor with random weights, position bias and norm weight (not their init values)."""
    c = Compressor(DIM, D, ROPE, ratio, overlap, rotate=False, eps=EPS)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (c.wkv.weight, c.wgate.weight):
            p.copy_(torch.randn(p.shape, generator=g) / DIM ** 0.5)
        c.ape.copy_(torch.randn(c.ape.shape, generator=g))
        c.norm.weight.copy_(1 + 0.2 * torch.randn(D, generator=g))
    return c.eval()


def _freqs(seed: int = 1) -> torch.Tensor:
    return torch.rand(ROPE // 2, generator=torch.Generator().manual_seed(seed)) + 0.1


@torch.no_grad()
def _by_hand(c: Compressor, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """The entries of a whole sequence from position 0, in float64, written from the docs' formulas:
    k_t = wkv x_t, z_t = wgate x_t + ape[t mod m]; per channel a softmax over the group's candidate tokens (with
    overlap: the previous group's tokens with their A half, the group's own with their B half); RMSNorm; RoPE of
    the trailing channels at the group's first position. [B, S // m, D]."""
    B, S, _ = x.shape
    m = c.ratio
    k = x.double() @ c.wkv.weight.double().T
    z = x.double() @ c.wgate.weight.double().T + c.ape.double()[torch.arange(S) % m]
    out = torch.zeros(B, S // m, D, dtype=torch.float64)
    for i in range(S // m):
        own = slice(i * m, (i + 1) * m)
        if c.overlap:  # channels [A | B]; entry 0 has no previous group
            prev = slice(max(i - 1, 0) * m, i * m)
            cand_k = torch.cat((k[:, prev, :D], k[:, own, D:]), 1)
            cand_z = torch.cat((z[:, prev, :D], z[:, own, D:]), 1)
        else:
            cand_k, cand_z = k[:, own], z[:, own]
        pooled = (torch.softmax(cand_z, dim=1) * cand_k).sum(1)                          # [B, D]
        normed = pooled / (pooled.square().mean(-1, keepdim=True) + EPS).sqrt() * c.norm.weight.double()
        u, v = normed[:, D - ROPE::2].clone(), normed[:, D - ROPE + 1::2].clone()         # adjacent pairs
        angle = i * m * freqs.double()
        normed[:, D - ROPE::2] = u * angle.cos() - v * angle.sin()
        normed[:, D - ROPE + 1::2] = u * angle.sin() + v * angle.cos()
        out[:, i] = normed
    return out


def _x(B: int, S: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(B, S, DIM, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("ratio, overlap, S", [(4, True, 23), (4, False, 23), (128, False, 300)])
def test_entries_are_the_gated_pooling_by_hand(ratio, overlap, S):
    """CSA (ratio 4, overlapping halves), and HCA (no overlap) at ratio 4 and the real 128; the unfinished tail
    (S mod ratio tokens) gives no entry."""
    c, freqs, x = _compressor(ratio, overlap), _freqs(), _x(2, S)
    with torch.no_grad():
        out = c(x, torch.zeros(2, dtype=torch.long), freqs, quant_sim=False)
    assert out.entries.shape == (2, S // ratio, D) and out.valid is None and out.first_group.tolist() == [0, 0]
    assert_rel_close("entries", out.entries, _by_hand(c, x, freqs), 1e-5)


def _feed(c: Compressor, x: torch.Tensor, pos0: list[int], sizes: list[int], state: CompressorState,
          freqs: torch.Tensor, got: list[dict[int, torch.Tensor]]) -> None:
    """Feed x [B, sum(sizes), DIM] in chunks of `sizes` (1: a decode step) to rows at positions pos0, collecting
    each row's emitted entries by group in got[b]; a group emitted twice fails."""
    at = 0
    for n in sizes:
        pos = torch.tensor(pos0) + at
        with torch.no_grad():
            out = c(x[:, at:at + n], pos, freqs, quant_sim=False, state=state)
        valid = out.valid if out.valid is not None else torch.ones(out.entries.shape[:2], dtype=torch.bool)
        for b in range(x.shape[0]):
            for j in range(out.entries.shape[1]):
                if valid[b, j]:
                    group = int(out.first_group[b]) + j
                    assert group not in got[b], f"row {b}: group {group} emitted twice"
                    got[b][group] = out.entries[b, j]
        at += n


@pytest.mark.parametrize("ratio, overlap", [(4, True), (4, False), (3, True)])
@pytest.mark.parametrize("sizes", [[1] * 23, [5, 1, 1, 1, 7, 1, 1, 6], [23], [2, 9, 1, 11]])
def test_incremental_equals_one_shot(ratio, overlap, sizes):
    """Chunks through the state and decode steps emit each complete group once, as the one-shot forward
    computes it, and nothing for the unfinished tail."""
    c, freqs, x = _compressor(ratio, overlap), _freqs(), _x(2, 23)
    with torch.no_grad():
        whole = c(x, torch.zeros(2, dtype=torch.long), freqs, quant_sim=False).entries
    state = CompressorState.empty(2, ratio, (2 if overlap else 1) * D, overlap)
    got: list[dict] = [{}, {}]
    _feed(c, x, [0, 0], sizes, state, freqs, got)
    for b in range(2):
        assert sorted(got[b]) == list(range(23 // ratio)), f"row {b} emitted groups {sorted(got[b])}"
        assert_rel_close(f"row {b}", torch.stack([got[b][i] for i in sorted(got[b])]), whole[b], 1e-5)


@pytest.mark.parametrize("overlap", [True, False])
def test_rows_at_different_phases(overlap):
    """Two sequences started apart (3 and 6 tokens in, each alone), then continued together in one batch at their
    own positions: each row emits its own one-shot entries."""
    m, freqs, c = 4, _freqs(), _compressor(4, overlap)
    width = (2 if overlap else 1) * D
    seqs, head = [_x(1, 3 + 17, seed=3), _x(1, 6 + 17, seed=4)], [3, 6]
    states, got = [], [{}, {}]
    for b in range(2):  # each row's first tokens alone
        states.append(CompressorState.empty(1, m, width, overlap))
        row = [{}]
        _feed(c, seqs[b][:, :head[b]], [0], [head[b]], states[-1], freqs, row)
        got[b] = row[0]
    state = CompressorState(torch.cat([s.kv for s in states]), torch.cat([s.score for s in states]))
    rest = torch.cat([seqs[b][:, head[b]:] for b in range(2)])
    _feed(c, rest, head, [1, 2, 1, 5, 1, 1, 6], state, freqs, got)
    for b in range(2):
        with torch.no_grad():
            whole = c(seqs[b], torch.zeros(1, dtype=torch.long), freqs, quant_sim=False).entries[0]
        assert sorted(got[b]) == list(range(whole.shape[0]))
        assert_rel_close(f"row {b}", torch.stack([got[b][i] for i in sorted(got[b])]), whole, 1e-5)


def test_partial_groups_are_not_emitted():
    """A group counts once its m-th token arrives: without state a prompt shorter than m gives no entry; with state
    a chunk marks the groups it leaves unfinished invalid, and a decode step emits only on the group's last token."""
    m, c, freqs = 4, _compressor(4, True), _freqs()
    with torch.no_grad():
        assert c(_x(2, m - 1), torch.zeros(2, dtype=torch.long), freqs, quant_sim=False).entries.shape == (2, 0, D)
        state = CompressorState.empty(2, m, 2 * D, True)
        out = c(_x(2, 6), torch.tensor([0, 0]), freqs, quant_sim=False, state=state)  # group 0 done, group 1 not
        assert out.valid.tolist() == [[True, False]] * 2
        for p in range(6, 10):  # groups complete at positions 7 (group 1) and 11
            out = c(_x(2, 1, seed=p), torch.tensor([p, p]), freqs, quant_sim=False, state=state)
            assert out.first_group.tolist() == [p // m] * 2 and out.valid.tolist() == [[p % m == m - 1]] * 2


@pytest.mark.parametrize("ratio,overlap", [(4, True), (4, False), (2, True)])
@pytest.mark.parametrize("S", [2, 3, STEPWISE_MAX])
@torch.no_grad()
def test_short_step_in_a_checkpoint_equals_one_token_steps(ratio, overlap, S, monkeypatch):
    """A short step while a cache checkpoint is open (a speculative verify: the state journals) runs token by
    token through the decode op: its state and the entries of the groups it completes are bit for bit those of
    S one-token decode steps, rows at different phases; the journal keeps the token rows."""
    c, freqs = _compressor(ratio, overlap), _freqs()
    g = torch.Generator().manual_seed(S)
    pos0 = torch.tensor([0, 1, ratio - 1, 2 * ratio + 1])
    B = pos0.shape[0]
    prefix = torch.randn(B, 3 * ratio, DIM, generator=g)
    x = torch.randn(B, S, DIM, generator=g)
    states = []
    for _ in range(2):   # each row's state after its own prefix (pos0[b] tokens), decoded one token at a time
        st = CompressorState.empty(B, ratio, (2 if overlap else 1) * D, overlap)
        for b in range(B):
            for t in range(int(pos0[b])):
                c(prefix[b:b + 1, t:t + 1], torch.tensor([t]), freqs, False, st.select(slice(b, b + 1)))
        states.append(st)
    step, steps = states
    step.journal = []
    calls, real = [], ops.compress_steps
    monkeypatch.setattr(ops, "compress_steps", lambda *a, **k: calls.append(a[0].shape[1]) or real(*a, **k))
    got = c(x, pos0, freqs, False, step)
    monkeypatch.setattr(ops, "compress_steps", real)
    assert calls == [S]                                      # token by token, through the decode's multi-token op
    assert len(step.journal) == 1 and step.journal[0][0].shape == (B, S, step.kv.shape[2])
    want = [c(x[:, t:t + 1], pos0 + t, freqs, False, steps) for t in range(S)]
    assert torch.equal(step.kv, steps.kv) and torch.equal(step.score, steps.score)
    n_checked = 0
    groups = got.groups()
    for b in range(B):
        written = {int(groups[b, i]): got.entries[b, i] for i in range(groups.shape[1]) if got.valid[b, i]}
        completed = {}
        for t in range(S):
            p = int(pos0[b]) + t
            if p % ratio == ratio - 1:   # token t completes group p // ratio
                completed[p // ratio] = want[t].entries[b, 0]
        assert written.keys() == completed.keys()
        for group, entry in completed.items():
            assert torch.equal(written[group], entry)
            n_checked += 1
    assert n_checked > 0

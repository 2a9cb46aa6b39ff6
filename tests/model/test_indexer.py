"""dsv4/model/indexer.py, the lightning indexer of CSA layers (docs/architecture.md#lightning-indexer), on tiny
dims: its scores against I(s, j) = sum_h w_h(s) ReLU(q_h(s) . K_j) in float64 by hand, and its selection against
the true top-k of the entries each query sees."""
import pytest
import torch

from conftest import assert_rel_close
from dsv4.model.indexer import Indexer
from dsv4.model.rope import rope_angles

DIM, Q_LORA, HEADS, HEAD_DIM, ROPE, RATIO, TOPK = 16, 12, 4, 8, 4, 4, 3


def _indexer(seed: int = 0) -> Indexer:
    idx = Indexer(DIM, Q_LORA, HEADS, HEAD_DIM, ROPE, RATIO, TOPK, eps=1e-6)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in idx.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5 if p.dim() == 2 else
                    1 + 0.2 * torch.randn(p.shape, generator=g))
    return idx.eval()


def _inputs(S: int, B: int = 2, seed: int = 1):
    """x [B, S, DIM], the attention's query latent qr [B, S, Q_LORA], the rope frequencies, positions 0..S-1."""
    g = torch.Generator().manual_seed(seed)
    x, qr = torch.randn(B, S, DIM, generator=g), torch.randn(B, S, Q_LORA, generator=g)
    freqs = torch.rand(ROPE // 2, generator=g) + 0.1
    return x, qr, freqs, torch.arange(S).expand(B, S)


@torch.no_grad()
def _scores_by_hand(idx: Indexer, x, qr, freqs, pos) -> torch.Tensor:
    """[B, S, T] float64: the keys are the indexer's compressor entries (tests/model/test_compressor.py checks
    those); queries wq_b qr per head with RoPE on their trailing channels at the query's position, head weights
    weights_proj x * Di^-0.5 * Hi^-0.5."""
    keys = idx.compressor(x, torch.zeros(x.shape[0], dtype=torch.long), freqs, False).entries.double()
    q = (qr.double() @ idx.wq_b.weight.double().T).unflatten(-1, (HEADS, HEAD_DIM))
    u, v = q[..., HEAD_DIM - ROPE::2].clone(), q[..., HEAD_DIM - ROPE + 1::2].clone()
    angle = (pos.double().unsqueeze(-1) * freqs.double()).unsqueeze(2)                   # [B, S, 1, ROPE / 2]
    q[..., HEAD_DIM - ROPE::2] = u * angle.cos() - v * angle.sin()
    q[..., HEAD_DIM - ROPE + 1::2] = u * angle.sin() + v * angle.cos()
    w = x.double() @ idx.weights_proj.weight.double().T * (HEAD_DIM ** -0.5 * HEADS ** -0.5)   # [B, S, Hi]
    return sum(w[..., h, None] * (q[:, :, h] @ keys.transpose(1, 2)).relu() for h in range(HEADS))


def _run(idx: Indexer, x, qr, freqs, pos, **kw) -> torch.Tensor:
    cos, sin = rope_angles(pos, freqs)
    n_visible = (pos + 1) // RATIO  # entry j is complete at the token that closes group j
    with torch.no_grad():
        return idx(x, qr, pos[:, 0], cos, sin, freqs, n_visible, **kw)


def test_scores_by_hand():
    idx, (x, qr, freqs, pos) = _indexer(), _inputs(23)
    cos, sin = rope_angles(pos, freqs)
    with torch.no_grad():
        got = idx.sequence_scores(x, qr, cos, sin, freqs)
    want = _scores_by_hand(idx, x, qr, freqs, pos)
    assert got.shape == (2, 23, 23 // RATIO) and (want > 0).any() and (want == 0).any()  # ReLU cuts some heads
    assert_rel_close("scores", got, want, 1e-5)


def test_selects_the_true_topk_of_the_complete_entries():
    """Per query, the top min(k, visible) entries by the hand scores among the entries already complete (the entry
    its own token completes included), -1 filling the rest, although later entries often score higher; with a
    prefix, the attention's list [prefix | entries + offset]."""
    idx, (x, qr, freqs, pos) = _indexer(), _inputs(23)
    got = _run(idx, x, qr, freqs, pos)
    scores = _scores_by_hand(idx, x, qr, freqs, pos)
    assert got.shape == (2, 23, TOPK)
    future_best = 0
    for b in range(2):
        for s in range(23):
            visible = (s + 1) // RATIO
            want = scores[b, s, :visible].topk(min(TOPK, visible)).indices
            chosen = got[b, s][got[b, s] >= 0]
            assert sorted(chosen.tolist()) == sorted(want.tolist()), (b, s)
            assert (got[b, s] == -1).sum() == TOPK - min(TOPK, visible)
            future_best += int(0 < visible < scores.shape[-1] and scores[b, s].argmax() >= visible)
    assert future_best > 0, "no query where an incomplete entry scores best: the masking is untested"
    prefix = torch.randint(-1, 9, (2, 23, 5), generator=torch.Generator().manual_seed(3))
    listed = _run(idx, x, qr, freqs, pos, prefix=prefix, offset=9)
    assert torch.equal(listed, torch.cat((prefix, torch.where(got >= 0, got + 9, -1)), -1))


def test_ties_go_to_the_older_entries():
    """Zero queries score every entry 0: the choice is the oldest min(k, visible) entries, whatever comes after."""
    idx, (x, qr, freqs, pos) = _indexer(), _inputs(23)
    with torch.no_grad():
        idx.wq_b.weight.zero_()
    got = _run(idx, x, qr, freqs, pos)
    for s in range(23):
        n = min(TOPK, (s + 1) // RATIO)
        assert got[:, s].tolist() == [list(range(n)) + [-1] * (TOPK - n)] * 2, s


@pytest.mark.parametrize("S", [3, 10])
def test_fewer_entries_than_k(S):
    """Fewer entries than index_topk (none at all, or 2 < 3): the list is min(k, T) wide and holds every complete
    entry."""
    idx, (x, qr, freqs, pos) = _indexer(), _inputs(S)
    got = _run(idx, x, qr, freqs, pos)
    assert got.shape == (2, S, min(TOPK, S // RATIO))
    for s in range(S):
        n = (s + 1) // RATIO
        assert [sorted(row[row >= 0].tolist()) for row in got[:, s]] == [list(range(n))] * 2

"""ops/triton/indexer.py (the lightning indexer's scores and top-k, inference and training) against the
references."""
import pytest
import torch

from dsv4.cache.layout import RowStore
from dsv4.ops.reference.indexer import index_scores as ref_scores
from dsv4.ops.reference.indexer import indexer_topk as ref_top
from dsv4.ops.triton import indexer as tri_idx
from dsv4.ops.triton.indexer import index_scores_masked
from dsv4.ops.triton.indexer import indexer_topk as tri_top

from .device import AGREE, DEV, DT, TOL, TRAIN_TOL, agreement, cases, gen, randn, rel_err


def _queries(B, S, HI, DI, T, g):
    """Indexer queries, head weights, keys and each query's visible count (0..T)."""
    q, w = randn(B, S, HI, DI, g=g, dtype=DT), randn(B, S, HI, g=g)
    keys = randn(B, T, DI, g=g, dtype=DT)
    nv = torch.randint(0, T + 1, (B, S), generator=g).to(DEV)
    return q, w, keys, nv


@pytest.mark.parametrize("B, S, HI, DI, T, k", cases(cpu=[(2, 3, 16, 32, 40, 5), (1, 4, 20, 64, 100, 8)],
                                                     gpu=[(2, 3, 64, 128, 3000, 512), (1, 2, 64, 128, 800, 1024)]))
def test_topk(B, S, HI, DI, T, k):
    q, w, keys, nv = _queries(B, S, HI, DI, T, gen())
    a, b = tri_top(q, w, keys, nv, k), ref_top(q.float(), w, keys.float(), nv, k)
    assert agreement(a, b) > AGREE


@pytest.mark.parametrize("B, S, HI, DI, T, k, P, chunk", [(2, 5, 16, 32, 40, 6, 3, 2),
                                                          (1, 3, 8, 64, 20, 30, 0, 1 << 28)])
def test_topk_as_the_attention_list(B, S, HI, DI, T, k, P, chunk, monkeypatch):
    """The attention's index list from the indexer, [prefix | entries + offset], in query chunks (as at long
    contexts); more wanted than there are keys (k 30 > T 20) gives min(k, T) slots."""
    monkeypatch.setattr(tri_idx, "SCORE_BUFFER_ELEMENTS", chunk * T * B)
    g = gen()
    q, w, keys, nv = _queries(B, S, HI, DI, T, g)
    pre = torch.randint(-1, 50, (B, S, P), generator=g).to(DEV)
    a = tri_top(q, w, keys, nv, k, pre, 100)
    r = ref_top(q.float(), w, keys.float(), nv, k, pre, 100)
    assert a.shape == r.shape == (B, S, P + min(k, T)) and torch.equal(a[..., :P], pre)
    assert agreement(a[..., P:], r[..., P:]) > AGREE


@pytest.mark.parametrize("B, S, HI, DI, T, k", [(2, 3, 16, 64, 50, 8), (1, 2, 8, 128, 70, 16)])
def test_topk_of_fp4_key_records(B, S, HI, DI, T, k):
    """Keys as the cache stores them (FP4 records), read in place."""
    g = gen()
    q, w = randn(B, S, HI, DI, g=g, dtype=DT), randn(B, S, HI, g=g)
    keys = RowStore("fp4", B, T, DI, 16, "index", DT, DEV)
    keys.write(torch.arange(T, device=DEV).expand(B, T), randn(B, T, DI, g=g))
    nv = torch.randint(0, T + 1, (B, S), generator=g).to(DEV)
    a, r = tri_top(q, w, keys.records(T), nv, k), ref_top(q, w, keys.read(T), nv, k)
    assert agreement(a, r) > AGREE


@pytest.mark.parametrize("B, S, HI, DI, T", [(1, 70, 20, 64, 150), (2, 67, 64, 32, 600)])  # 600 > 512 keys a program
def test_masked_scores_prefill(B, S, HI, DI, T):
    """Prefill scores in query blocks x key tiles: -inf past each query's visible count, queries that see nothing."""
    q, w, keys, nv = _queries(B, S, HI, DI, T, gen())
    nv[0, :3] = 0
    a, r = index_scores_masked(q, w, keys, nv), ref_scores(q.float(), w, keys.float())
    vis = torch.arange(T, device=DEV) < nv.unsqueeze(-1)
    assert torch.isinf(a[~vis]).all() and (a[~vis] < 0).all()
    assert ((a[vis] - r[vis]).abs().max() / r.abs().max()).item() < TOL * 10


def test_masked_scores_decode_in_steps_per_program():
    """Decode scores with 1, 3 or 8 steps of 64 keys per program: the same arithmetic per score, however split."""
    q, w, keys, nv = _queries(3, 2, 16, 32, 300, gen())
    r = ref_scores(q.float(), w, keys.float())
    vis = torch.arange(300, device=DEV) < nv.unsqueeze(-1)
    runs = [index_scores_masked(q, w, keys, nv, steps_per_program=n) for n in (1, 3, 8)]
    for a in runs:
        assert torch.equal(a, runs[0]) and torch.isinf(a[~vis]).all()
        assert ((a[vis] - r[vis]).abs().max() / r.abs().max()).item() < TOL * 10


@pytest.mark.parametrize("B, S, HI, DI, T, splits", [(2, 37, 4, 16, 21, None), (1, 70, 16, 32, 80, 3)])
def test_score_gradients(B, S, HI, DI, T, splits):
    """Training: the scores and d q, d weights, d keys against float64 autograd through the reference, with
    causal-like zero output gradients (tiles the backward skips); the key gradient also in slices."""
    g = gen()
    q, w = randn(B, S, HI, DI, g=g, dtype=DT), randn(B, S, HI, g=g)
    keys = randn(B, T, DI, g=g, dtype=DT)
    dout = randn(B, S, T, g=g).double()
    dout[:, :, T // 2:] *= (torch.arange(S, device=DEV) >= S // 2)[:, None]
    leaves_t = [x.detach().clone().requires_grad_(True) for x in (q, w, keys)]
    leaves_r = [x.detach().double().requires_grad_(True) for x in (q, w, keys)]
    o_t, o_r = tri_idx.index_scores(*leaves_t), ref_scores(*leaves_r)
    (o_t.double() * dout).sum().backward()
    (o_r * dout).sum().backward()
    assert rel_err(o_t, o_r) < TRAIN_TOL
    for name, a, r, x in zip(("q", "weights", "keys"), leaves_t, leaves_r, (q, w, keys)):
        assert a.grad.dtype == x.dtype and rel_err(a.grad, r.grad) < TRAIN_TOL, (name, rel_err(a.grad, r.grad))
    parts = tri_idx.index_scores_backward(q, w, keys, dout.float(), splits=splits)
    assert rel_err(parts[2], leaves_r[2].grad) < TRAIN_TOL, ("keys, split", rel_err(parts[2], leaves_r[2].grad))


def test_launches_build_for_gpus(native_build):
    native_build()

"""ops/invariant/linear.py's split-K matmul: a row's bits do not depend on M or on the other rows, and the split
and the one-program-per-tile paths give the same bits; accuracy against float64 products."""
import pytest
import torch

from dsv4.ops.invariant import linear as inv

from .device import DT, TOL, gen, randn, rel_err


def _row_in_batch(row: torch.Tensor, M: int, pos: int, w: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """matmul_nt of `row` placed at `pos` among M-1 other random rows."""
    a = randn(M, row.shape[0], g=g, dtype=row.dtype)
    a[pos] = row
    return inv.matmul_nt(a, w)[pos]


@pytest.mark.parametrize("K", [96, 1100])   # one split; two splits with a short last BLOCK_K step
def test_row_bits_do_not_depend_on_the_batch(K):
    """M = 1, 3, 17, 64 with different other rows. (On the CPU the row keeps its place in its 16-row tile: the
    interpreter's numpy matmul may round a tile's rows differently by position; the GPU test moves it anywhere.)"""
    g = gen()
    w, row = randn(70, K, g=g, dtype=DT), randn(K, g=g, dtype=DT)
    want = inv.matmul_nt(row[None], w)[0]
    for M, pos in ((3, 0), (17, 16), (64, 32)):
        assert torch.equal(_row_in_batch(row, M, pos, w, g), want), (M, pos)
    assert rel_err(want, w.double() @ row.double()) < TOL * 10


def test_partials_and_one_program_paths_agree(monkeypatch):
    """The same rows through the fp32 partials + sum kernel and through one program per tile: equal bits."""
    g = gen(1)
    a, w = randn(20, 1100, g=g, dtype=DT), randn(33, 1100, g=g, dtype=DT)
    split = inv.matmul_nt(a, w)
    monkeypatch.setattr(inv, "_SPLIT_MAX_ROWS", 0)
    assert torch.equal(inv.matmul_nt(a, w), split)
    assert rel_err(split, a.double() @ w.double().T) < TOL * 10


def test_batched_and_split_rule():
    g = gen(2)
    a3, w3 = randn(3, 5, 1030, g=g, dtype=DT), randn(3, 24, 1030, g=g, dtype=DT)
    assert rel_err(inv.matmul_nt(a3, w3), a3.double() @ w3.double().transpose(1, 2)) < TOL * 10
    for K in (16, 1024, 4096, 16384, 1100):
        s, per = inv.split_k(K, 64)
        assert per % 64 == 0 and (s - 1) * per < K <= s * per and s <= inv._MAX_SPLITS


def test_launches_build_for_gpus(native_build):
    native_build()

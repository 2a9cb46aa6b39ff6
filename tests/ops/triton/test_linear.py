"""ops/triton/linear.py (fp32 matmul of bf16 activations) and ops/invariant/linear.py (the fixed-configuration
matmul of batch-invariant mode) against float64 products."""
import pytest
import torch

from dsv4.ops.invariant.linear import matmul_nt
from dsv4.ops.triton.linear import bf16_parts, linear_fp32

from .device import DT, TOL, gen, randn, rel_err


@pytest.mark.parametrize("M, N, K, bf16_w", [(3, 70, 64, True), (130, 24, 128, False), (200, 300, 96, False),
                                             (2, 16, 64, "bf16")])
def test_linear_fp32(M, N, K, bf16_w):
    """fp32 weights, fp32 weights holding bf16 values (which take one part), and bf16 weights."""
    g = gen()
    x = randn(M, K, g=g, dtype=torch.bfloat16)
    w = randn(N, K, g=g)
    w = w.bfloat16().float() if bf16_w is True else w.bfloat16() if bf16_w else w
    a, r = linear_fp32(x, w), x.double() @ w.double().T
    assert a.dtype == torch.float32 and ((a.double() - r).abs().max() / r.abs().max()).item() < 1e-5


@pytest.mark.parametrize("M, N, K", [(1, 70, 130), (67, 33, 64)])
def test_invariant_matmul(M, N, K):
    """2-D and batched 3-D products; a row's result does not depend on the other rows."""
    g = gen()
    a, w = randn(M, K, g=g, dtype=DT), randn(N, K, g=g, dtype=DT)
    c = matmul_nt(a, w)
    assert rel_err(c, a.double() @ w.double().T) < TOL * 10
    assert torch.equal(matmul_nt(a[:1], w), c[:1])
    a3, w3 = randn(3, M, K, g=g, dtype=DT), randn(3, N, K, g=g, dtype=DT)
    assert rel_err(matmul_nt(a3, w3), a3.double() @ w3.double().transpose(1, 2)) < TOL * 10


def test_weight_split_is_refreshed_in_place():
    """After an in-place update of the weight, its cached bf16 split is rewritten where it lies: a CUDA graph that
    captured a read of the split never reads memory the refresh freed (and so handed to other tensors)."""
    g = gen()
    w = randn(24, 128, g=g)
    before = bf16_parts(w, trim=True)
    at = before.data_ptr()
    w.mul_(1.5).add_(randn(24, 128, g=g))
    after = bf16_parts(w, trim=True)
    assert after.data_ptr() == at and torch.equal(after.float().sum(0), w)
    w.copy_(w.bfloat16().float())                      # now one part: a new shape, a new tensor
    assert bf16_parts(w, trim=True).shape[0] == 1 and torch.equal(bf16_parts(w, trim=True)[0].float(), w)


def test_launches_build_for_gpus(native_build):
    native_build()

"""ops/triton/norm.py (RMSNorm, alone and with the RoPE of its result) and ops/invariant/norm.py (the row
reduction of batch-invariant mode) against the references."""
import pytest
import torch

from dsv4.ops.invariant.norm import rms_rsqrt
from dsv4.ops.reference.norm import rms_norm as ref_norm
from dsv4.ops.triton.norm import rms_norm as tri_norm

from .device import DEV, DT, TOL, gen, randn

BF16 = DT != torch.float32


@pytest.mark.parametrize("shape, weighted", [((3, 5, 96), True), ((2, 7, 64), False), ((1, 1, 4096), True),
                                             ((4, 64, 512), False)])
def test_norm(shape, weighted):
    """One rounding of the result (bf16: 1 ulp where the fp32 sums round differently; the CPU interpreter
    truncates instead of rounding)."""
    g = gen()
    x = randn(*shape, g=g, dtype=DT) * 3
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(DEV) if weighted else None
    a, r = tri_norm(x, w, 1e-6), ref_norm(x, w, 1e-6)
    assert a.shape == r.shape and a.dtype == r.dtype
    assert (a.float() - r.float()).abs().max() <= (TOL * 1e-2 + 2 * BF16 * 2 ** -8) * r.float().abs().max() + 1e-6


@pytest.mark.parametrize("shape, half, weighted", [((2, 3, 4, 64), 8, False), ((1, 5, 96), 16, True),
                                                   ((3, 1, 2, 32), 4, True)])
def test_norm_with_rope(shape, half, weighted):
    """The norm with the rope of its result's trailing channels (the attention's q: per head; kv: per token)."""
    g = gen()
    x = randn(*shape, g=g, dtype=DT) * 3
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(DEV) if weighted else None
    cos, sin = randn(shape[0], shape[1], half, g=g), randn(shape[0], shape[1], half, g=g)
    a, r = tri_norm(x, w, 1e-6, (cos, sin)), ref_norm(x, w, 1e-6, (cos, sin))
    assert a.shape == r.shape and a.dtype == r.dtype
    assert (a.float() - r.float()).abs().max() <= (TOL * 1e-2 + 4 * BF16 * 2 ** -8) * r.float().abs().max() + 1e-5


@pytest.mark.parametrize("M, K", [(1, 130), (67, 64)])
def test_invariant_rms_rsqrt(M, K):
    a = randn(M, K, g=gen(), dtype=DT)
    rr = rms_rsqrt(a, 1e-6)
    assert (rr.double() - torch.rsqrt(a.double().square().mean(-1, keepdim=True) + 1e-6)).abs().max() < 1e-3 * rr.max()


def test_launches_build_for_gpus(native_build):
    native_build()

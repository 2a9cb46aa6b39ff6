"""ops/triton/rope.py (in-place RoPE for inference, the differentiable one for training) against the reference."""
import pytest

from dsv4.ops.reference import rope as ref_rope
from dsv4.ops.triton import rope as tri_rope

from .device import DT, TOL, TRAIN_TOL, gen, randn, rel_err


@pytest.mark.parametrize("shape, half, inverse", [((2, 5, 3, 64), 8, False), ((1, 4, 32), 16, True),
                                                  ((3, 1, 70, 16), 4, True)])
def test_rope_in_place(shape, half, inverse):
    g = gen()
    x = randn(*shape, g=g, dtype=DT)
    cos, sin = randn(shape[0], shape[1], half, g=g), randn(shape[0], shape[1], half, g=g)
    a, r = tri_rope.rope_(x.clone(), cos, sin, inverse), ref_rope.rope_(x.clone(), cos, sin, inverse)
    assert (a.float() - r.float()).abs().max() <= TOL * 10 * r.float().abs().max(), (a - r).abs().max()


@pytest.mark.parametrize("shape, half, inverse, strided", [((2, 5, 3, 64), 8, False, True),
                                                           ((1, 4, 32), 16, True, False)])
def test_rope_gradients(shape, half, inverse, strided):
    """Training: the rotation and its input gradient against float64 autograd, also of a non-contiguous view
    (batch and sequence swapped in memory)."""
    g = gen()
    x = randn(*shape, g=g, dtype=DT)
    if strided:
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    cos, sin = randn(shape[0], shape[1], half, g=g), randn(shape[0], shape[1], half, g=g)
    dout = randn(*shape, g=g).double()
    x_t, x_r = x.detach().clone().requires_grad_(True), x.detach().double().requires_grad_(True)
    o_t, o_r = tri_rope.rope(x_t, cos, sin, inverse), ref_rope.rope(x_r, cos.double(), sin.double(), inverse)
    (o_t.double() * dout).sum().backward()
    (o_r * dout).sum().backward()
    assert rel_err(o_t, o_r) < TRAIN_TOL and rel_err(x_t.grad, x_r.grad) < TRAIN_TOL
    assert x_t.grad.dtype == x.dtype


def test_launches_build_for_gpus(native_build):
    native_build()

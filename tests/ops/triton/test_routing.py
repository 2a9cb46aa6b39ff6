"""ops/triton/routing.py (the MoE router's scores, top-k and weights) against the float64 reference."""
import pytest
import torch

from dsv4.ops.reference.routing import moe_route as ref_route
from dsv4.ops.triton.routing import moe_route as tri_route

from .device import DEV, gen, randn


@pytest.mark.parametrize("N, E, k", [(1, 16, 6), (37, 256, 8), (5, 7, 3)])
def test_route(N, E, k):
    """The same experts in the same (descending) order and their weights, chosen by score or fixed (hash
    routing); logits in softplus's linear and tiny tails."""
    g = gen()
    logits = randn(N, E, g=g) * 3
    logits[0, :2] = torch.tensor([30.0, -40.0])
    bias = randn(E, g=g) * 0.1
    fixed = torch.rand(N, E, generator=g).argsort(-1)[:, :k].to(DEV)
    for fx in (None, fixed):
        (wa, ia, sa), (wr, ir, sr) = tri_route(logits, bias, fx, k, 2.5), ref_route(logits.double(), bias, fx, k, 2.5)
        assert torch.equal(ia, ir), (ia, ir)
        assert (wa.double() - wr).abs().max() < 1e-6 and ((sa.double() - sr).abs() / sr).max() < 1e-6


def test_launches_build_for_gpus(native_build):
    native_build()

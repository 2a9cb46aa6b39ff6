"""ops/triton/experts.py (routed and dense SwiGLU experts, and the pieces of the grouped path) against the
references."""
import pytest
import torch

from dsv4.ops.reference.experts import moe_experts as ref_moe
from dsv4.ops.reference.experts import swiglu
from dsv4.ops.reference.experts import swiglu_expert as ref_dense
from dsv4.ops.triton.experts import moe_experts as tri_moe
from dsv4.ops.triton.experts import slot_sum, swiglu_rows
from dsv4.ops.triton.experts import swiglu_expert as tri_dense

from .device import DEV, DT, TOL, gen, randn, rel_err


@pytest.mark.parametrize("N, C, F, E, k, limit", [(1, 64, 48, 8, 6, 7.0), (3, 40, 96, 5, 2, 0.0)])
def test_routed_experts(N, C, F, E, k, limit):
    """Decode-sized expert batches, with and without the SwiGLU clamp."""
    g = gen()
    x = randn(N, C, g=g, dtype=DT)
    w1, w3 = (torch.randn(E, F, C, generator=g).div(C ** 0.5).to(DEV, DT) for _ in range(2))
    w2 = torch.randn(E, C, F, generator=g).div(F ** 0.5).to(DEV, DT)
    idx = torch.rand(N, E, generator=g).argsort(-1)[:, :k].to(DEV)
    rw = torch.rand(N, k, generator=g).to(DEV)
    a = tri_moe(x, w1, w2, w3, idx, rw, limit)
    r = ref_moe(x.double(), w1.double(), w2.double(), w3.double(), idx, rw.double(), limit)
    assert rel_err(a, r) < TOL * 10


@pytest.mark.parametrize("N, C, F, limit", [(1, 64, 48, 7.0), (3, 40, 96, 0.0)])
def test_dense_expert(N, C, F, limit):
    g = gen()
    x = randn(N, C, g=g, dtype=DT)
    w1, w3 = (torch.randn(F, C, generator=g).div(C ** 0.5).to(DEV, DT) for _ in range(2))
    w2 = torch.randn(C, F, generator=g).div(F ** 0.5).to(DEV, DT)
    a, r = tri_dense(x, w1, w2, w3, limit), ref_dense(x, w1, w2, w3, limit)
    assert a.dtype == x.dtype and rel_err(a, r) < TOL * 10


@pytest.mark.parametrize("limit", [0.0, 3.0])
def test_swiglu_rows(limit):
    """SwiGLU of gathered rows times their routing weight, in the activations' dtype."""
    g = gen()
    gate, up = (randn(13, 40, g=g, dtype=DT) * 4 for _ in range(2))
    rw = torch.rand(13, generator=g).to(DEV)
    a, r = swiglu_rows(gate, up, rw, limit), (swiglu(gate, up, limit) * rw[:, None]).to(DT)
    assert a.dtype == DT
    assert (a.float() - r.float()).abs().max() <= 1e-2 * (DT != torch.float32) * r.float().abs().max() + 1e-5


def test_slot_sum():
    """Each token's k expert outputs (at their slots in the expert-sorted rows) summed in fp32."""
    g = gen()
    y = randn(12, 40, g=g, dtype=DT)
    at = torch.randperm(12, generator=g).to(DEV)
    assert (slot_sum(y, at, 3) - y.float()[at].view(4, 3, 40).sum(1)).abs().max() < 1e-5


def test_launches_build_for_gpus(native_build):
    native_build()

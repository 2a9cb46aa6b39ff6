"""ops/triton/packed_dequant.py (packed weights -> a dense copy in one pass) and the prefill paths built on it: the
FP8 / FP4 linears from DEQUANT_MIN_ROWS rows on and the FP4 experts from EXPERT_DEQUANT_MIN_PAIRS pairs per expert
on, which must multiply exactly the reference's dequantised values."""
import pytest
import torch

from dsv4 import ops
from dsv4.ops.reference import packed as ref
from dsv4.ops.triton import packed_experts as tpe
from dsv4.ops.triton import packed_linear as tri
from dsv4.ops.triton.packed_dequant import dequant_fp4, dequant_fp8
from dsv4.quant.packed import Fp4GroupWeight, Fp8BlockWeight

from .device import DEV, DT, TOL, gen, randn, rel_err


def _to(w):
    return type(w)(w.data.to(DEV), w.scale.to(DEV))


def test_every_code_dequantises_exactly():
    """All 254 finite e4m3 bytes and all 16 e2m1 codes under several scales (subnormal e4m3 included), in bf16
    and fp32, against the reference decode (quant.packed: a different route to the values); tails on both dims."""
    b = torch.arange(256, dtype=torch.uint8)
    b[(b & 0x7F) == 0x7F] = 0
    w8 = _to(Fp8BlockWeight(b.view(1, 256).repeat(130, 1), torch.tensor([[120, 131], [100, 140]], dtype=torch.uint8)))
    w4 = _to(Fp4GroupWeight(b.view(2, 128), torch.tensor([[100, 110, 120, 127, 130, 140, 150, 160]] * 2,
                                                          dtype=torch.uint8)))
    for dt in (torch.bfloat16, torch.float32):
        assert torch.equal(dequant_fp8(w8, dt), w8.dequantize(dt))
        assert torch.equal(dequant_fp4(w4, dt), w4.dequantize(dt))
    g = gen(7)
    odd = _to(Fp8BlockWeight.quantize(torch.randn(150, 200, generator=g)))   # partial 128-tiles on both dims
    assert torch.equal(dequant_fp8(odd, torch.bfloat16), odd.dequantize(torch.bfloat16))
    stack = _to(Fp4GroupWeight.quantize(torch.randn(3, 37, 96, generator=g)))  # experts, K not a multiple of 128
    assert torch.equal(dequant_fp4(stack, torch.bfloat16), stack.dequantize(torch.bfloat16))


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_linear_prefill_runs_on_the_dequantised_copy(fmt):
    """From DEQUANT_MIN_ROWS rows the linears are a matmul on the exact dequantised weight: bit-equal to the same
    matmul on the reference's dequantisation, and within TOL of the float64 reference; one row fewer takes the
    register kernel (test_packed_linear.py)."""
    g = gen(8)
    N, K = 72, 256
    kind, fn, want_fn = ((Fp8BlockWeight, tri.linear_fp8_weight, ref.linear_fp8_weight) if fmt == "fp8"
                         else (Fp4GroupWeight, tri.linear_fp4_weight, ref.linear_fp4_weight))
    w = _to(kind.quantize(torch.randn(N, K, generator=g)))
    M = tri.DEQUANT_MIN_ROWS
    x = randn(M, K, g=g, dtype=DT)
    assert tri.dequantises(x, K) and not tri.dequantises(x[1:], K)
    got = fn(x, w)
    assert torch.equal(got, torch.matmul(x, w.dequantize(DT).t()))
    assert rel_err(got, want_fn(x.double(), w)) < TOL


def _experts(E, F, C, g):
    w1, w3 = (Fp4GroupWeight.quantize(torch.randn(E, F, C, generator=g) / C ** 0.5) for _ in range(2))
    w2 = Fp4GroupWeight.quantize(torch.randn(E, C, F, generator=g) / F ** 0.5)
    return [_to(w) for w in (w1, w2, w3)]


def test_experts_prefill_runs_on_the_dequantised_copy():
    """EXPERT_DEQUANT_MIN_PAIRS pairs per expert: the FP4 experts are the dense experts op on the dequantised
    stacks, bit for bit, and within tolerance of the float64 reference; one token fewer takes the register
    kernels (test_packed_experts.py)."""
    g = gen(9)
    E, C, F, k = 3, 64, 96, 2
    w1, w2, w3 = _experts(E, F, C, g)
    N = tpe.EXPERT_DEQUANT_MIN_PAIRS * E // k
    x = randn(N, C, g=g, dtype=DT)
    idx = torch.rand(N, E, generator=g).argsort(-1)[:, :k].to(DEV)
    rw = torch.rand(N, k, generator=g).to(DEV)
    assert tpe.dequantises(idx, E, x.device) and not tpe.dequantises(idx[1:], E, x.device)
    got = tpe.moe_experts_fp4(x, w1, w2, w3, idx, rw, 7.0)
    dense = ops.moe_experts(x, *(w.dequantize(DT) for w in (w1, w2, w3)), idx, rw, 7.0)
    assert torch.equal(got, dense)
    assert rel_err(got, ref.moe_experts_fp4(x.double(), w1, w2, w3, idx, rw.double(), 7.0)) < TOL * 10


def test_experts_prefill_in_chunks(monkeypatch):
    """Experts that do not fit the scratch budget run a chunk of experts at a time (here 2 of 5: chunks of 2, 2
    and 1, one of them without tokens) and give the unchunked result up to fp32 summation order."""
    g = gen(10)
    E, C, F, k = 5, 64, 32, 2
    w1, w2, w3 = _experts(E, F, C, g)
    N = 90
    x = randn(N, C, g=g, dtype=DT)
    idx = torch.rand(N, 4, generator=g).argsort(-1)[:, :k].to(DEV)   # experts 0-3 only: the last chunk is empty
    rw = torch.rand(N, k, generator=g).to(DEV)
    monkeypatch.setattr(tpe, "EXPERT_DEQUANT_MIN_PAIRS", 1)
    whole = tpe.moe_experts_fp4(x, w1, w2, w3, idx, rw, 7.0)
    monkeypatch.setattr(tpe, "EXPERT_SCRATCH_BYTES", 2 * 3 * F * C * x.element_size())
    assert tpe._chunk(E, 3 * F * C * x.element_size()) == 2
    chunked = tpe.moe_experts_fp4(x, w1, w2, w3, idx, rw, 7.0)
    assert rel_err(chunked, whole) < 1e-6
    assert rel_err(chunked, ref.moe_experts_fp4(x.double(), w1, w2, w3, idx, rw.double(), 7.0)) < TOL * 10


def test_launches_build_for_gpus(native_build):
    native_build()

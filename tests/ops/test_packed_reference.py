"""ops/reference/packed.py against independent formulations: the FP8 x FP8 product as the official kernel sums it
(per 128-wide K block, e4m3 products times both scales), and the FP4 experts against the bf16-weight experts
reference given the dequantised weights."""
import pytest
import torch

from dsv4 import ops
from dsv4.ops.reference import experts as ref_experts
from dsv4.ops.reference import packed as ref
from dsv4.quant.packed import Fp4GroupWeight, Fp8BlockWeight


def test_fp8_fp8_product_sums_scaled_blocks():
    g = torch.Generator().manual_seed(0)
    M, N, K = 3, 130, 300
    x = torch.randn(M, K, generator=g) * torch.logspace(-2, 2, K)    # block amaxes far apart
    w = Fp8BlockWeight.quantize(torch.randn(N, K, generator=g))
    wd = w.dequantize().double()
    want = torch.zeros(M, N, dtype=torch.float64)
    for k0 in range(0, K, 128):
        xb = x[:, k0:k0 + 128].double()
        s = torch.exp2(torch.ceil(torch.log2(xb.abs().amax(1, keepdim=True).clamp(min=1e-4) / 448)))
        q = (xb / s).float().to(torch.float8_e4m3fn).double()          # e4m3 codes of the block
        want += (q @ wd[:, k0:k0 + 128].T) * s
    got = ref.linear_fp8_fp8(x, w)
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-6
    exact = ref.linear_fp8_weight(x, w).double()
    assert 1e-4 < ((got.double() - exact).norm() / exact.norm()).item() < 0.05   # the activation rounding shows


@pytest.mark.parametrize("limit", [0.0, 1.5])
def test_fp4_experts_match_the_dequantised_experts(limit):
    g = torch.Generator().manual_seed(1)
    N, C, F, E, k = 5, 64, 96, 4, 2
    w1, w3 = (Fp4GroupWeight.quantize(torch.randn(E, F, C, generator=g) / C ** 0.5) for _ in range(2))
    w2 = Fp4GroupWeight.quantize(torch.randn(E, C, F, generator=g) / F ** 0.5)
    x = torch.randn(N, C, generator=g)
    idx = torch.rand(N, E, generator=g).argsort(-1)[:, :k]
    rw = torch.rand(N, k, generator=g)
    got = ops.moe_experts_fp4(x, w1, w2, w3, idx, rw, limit, backend="reference")
    want = ref_experts.moe_experts(x.double(), w1.dequantize().double(), w2.dequantize().double(),
                                   w3.dequantize().double(), idx, rw.double(), limit)
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-5


def test_packed_ops_take_leading_dims_and_name_bad_k():
    w = Fp8BlockWeight.quantize(torch.randn(40, 256))
    x = torch.randn(2, 3, 256, dtype=torch.bfloat16)
    y = ops.linear_fp8_weight(x, w)
    assert y.shape == (2, 3, 40) and y.dtype == torch.bfloat16
    with pytest.raises(RuntimeError):
        ops.linear_fp8_weight(torch.randn(2, 100), w)

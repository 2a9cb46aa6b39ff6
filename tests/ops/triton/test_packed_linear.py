"""ops/triton/packed_linear.py (weight-only GEMMs over FP8 / FP4 bytes) against ops/reference/packed.py, at odd
row counts, K tails and split-K."""
import pytest
import torch

from dsv4.ops.reference import packed as ref
from dsv4.ops.triton import packed_linear as tri
from dsv4.quant.packed import Fp4GroupWeight, Fp8BlockWeight

from .device import DEV, DT, TOL, gen, randn, rel_err



def _to(w):
    return type(w)(w.data.to(DEV), w.scale.to(DEV))


@pytest.mark.parametrize("M, N, K, config", [(1, 72, 256, None), (5, 130, 200, None), (3, 64, 384, (16, 32, 1, 4)),
                                             (70, 40, 128, None)], ids=["decode", "tails", "split-k", "prefill"])
def test_fp8_weight_gemm(M, N, K, config):
    g = gen()
    w = _to(Fp8BlockWeight.quantize(torch.randn(N, K, generator=g)))
    x = randn(M, K, g=g, dtype=DT)
    got = tri.linear_fp8_weight(x, w, config)
    want = ref.linear_fp8_weight(x.double(), w)          # float64 products of the exactly dequantised weight
    assert got.shape == (M, N) and got.dtype == x.dtype
    assert rel_err(got, want) < TOL


@pytest.mark.parametrize("M, N, K, config", [(1, 48, 256, None), (7, 33, 96, None), (2, 64, 512, (16, 32, 1, 4))],
                         ids=["decode", "tails", "split-k"])
def test_fp4_weight_gemm(M, N, K, config):
    g = gen(1)
    w = _to(Fp4GroupWeight.quantize(torch.randn(N, K, generator=g)))
    x = randn(2, M, K, g=g, dtype=DT)                       # leading dims are flattened
    got = tri.linear_fp4_weight(x, w, config)
    assert got.shape == (2, M, N)
    assert rel_err(got, ref.linear_fp4_weight(x.double(), w)) < TOL


def test_launches_build_for_gpus(native_build):
    native_build()

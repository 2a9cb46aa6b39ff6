"""ops/triton/sinkhorn.py (mHC's split of the mixes and the Sinkhorn normalisation) against the reference."""
import pytest
import torch

from dsv4.ops.reference.sinkhorn import hc_split_sinkhorn as ref_hc
from dsv4.ops.triton.sinkhorn import hc_split_sinkhorn as tri_hc

from .device import DEV, gen, randn


@pytest.mark.parametrize("n", [1, 37, 130])
def test_split_sinkhorn(n):
    g = gen()
    mixes, scale, base = randn(n, 24, g=g), (torch.rand(3, generator=g) + 0.5).to(DEV), randn(24, g=g)
    for a, r in zip(tri_hc(mixes, scale, base, 4, 20, 1e-6), ref_hc(mixes, scale, base, 4, 20, 1e-6)):
        assert (a - r).abs().max() < 1e-5, (a - r).abs().max()


def test_launches_build_for_gpus(native_build):
    native_build()

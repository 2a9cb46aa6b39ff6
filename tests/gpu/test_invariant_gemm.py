"""Batch-invariant matmul at the V4-Flash bench projection shapes on the GPU: a row's bits are the same at M = 1,
3, 17, 64 and 300 (the one-program path), at any place in its tile, whatever the other rows hold."""
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# (N, K) of the bench geometry's projections: wq_a, wq_b, wkv, wo_b, shared expert up / down, LM head slice
SHAPES = [(1024, 4096), (32768, 1024), (512, 4096), (4096, 8192), (2048, 4096), (4096, 2048), (8192, 4096)]


@pytest.mark.parametrize("N, K", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_row_bits_do_not_depend_on_the_batch(N, K, dtype):
    from dsv4.ops.invariant.linear import matmul_nt
    g = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(N, K, device="cuda", generator=g) * 0.02).to(dtype)
    row = torch.randn(K, device="cuda", generator=g).to(dtype)
    want = matmul_nt(row[None], w)[0]
    for M, pos in ((3, 2), (17, 9), (64, 37), (300, 131)):
        a = torch.randn(M, K, device="cuda", generator=g).to(dtype)
        a[pos] = row
        assert torch.equal(matmul_nt(a, w)[pos], want), (M, pos)
    ref = w.double() @ row.double()
    assert ((want.double() - ref).norm() / ref.norm()).item() < (2e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("N", [1, 16, 17, 64])
def test_experts_bits_do_not_depend_on_the_batch(N):
    """Batch-invariant mode's routed and shared experts at the bench geometry (C 4096, F 2048, 6 of 256 experts):
    token 0's output is the same alone and among N-1 other tokens (before and after the 16-pair boundary)."""
    import dsv4
    from dsv4.ops import dispatch
    g = torch.Generator(device="cuda").manual_seed(0)
    E, F, C, k = 256, 2048, 4096, 6
    w1, w3 = ((torch.randn(E, F, C, device="cuda", generator=g) * 0.02).bfloat16() for _ in range(2))
    w2 = (torch.randn(E, C, F, device="cuda", generator=g) * 0.02).bfloat16()
    x = torch.randn(N, C, device="cuda", generator=g).bfloat16()
    idx = torch.stack([torch.randperm(E, device="cuda", generator=g)[:k] for _ in range(N)])
    wts = torch.rand(N, k, device="cuda", generator=g)
    with torch.no_grad(), dsv4.ops.batch_invariant():
        moe = dispatch._pick("moe_experts", None, x, w1, w2, w3, idx, wts, 10.0)
        dense = dispatch._pick("swiglu_expert", None, x, w1[0], w2[0], w3[0], 10.0)
        alone = moe(x[:1], w1, w2, w3, idx[:1], wts[:1], 10.0)
        assert torch.equal(moe(x, w1, w2, w3, idx, wts, 10.0)[:1], alone)
        assert torch.equal(dense(x, w1[0], w2[0], w3[0], 10.0)[:1], dense(x[:1], w1[0], w2[0], w3[0], 10.0))
    from dsv4.ops.reference.experts import moe_experts
    ref = moe_experts(x[:1], w1, w2, w3, idx[:1], wts[:1], 10.0)
    assert ((alone.double() - ref.double()).norm() / ref.double().norm()).item() < 2e-2

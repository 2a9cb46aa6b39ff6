"""The reference ops against independent float64 formulations."""

import pytest
import torch

from dsv4 import ops


def test_sinkhorn_doubly_stochastic():
    g = torch.Generator().manual_seed(0)
    hc = 4
    mixes = torch.randn(1000, (2 + hc) * hc, generator=g)
    scale, base = torch.ones(3), torch.zeros((2 + hc) * hc)  # logits of std 1 (moderate, as the oracle needs)
    pre, post, comb = ops.hc_split_sinkhorn(mixes, scale, base, hc, 20, 1e-6)
    assert (comb >= 0).all()
    assert (comb.sum(-2) - 1).abs().max() < 1e-5        # the last step normalises columns
    assert (comb.sum(-1) - 1).abs().max() < 1e-3        # rows converge for moderate logits
    assert torch.linalg.matrix_norm(comb.double(), ord=2).max() < 1 + 1e-3   # non-expansive
    assert ((pre > 0) & (pre < 1 + 1e-6 + 1e-7)).all() and ((post > 0) & (post < 2)).all()


def test_sinkhorn_layout_and_transpose_convention():
    """Logit 2*hc + hc*j + k is comb[j, k]; a dominant permutation moves lane j to lane pi(j) under hc_post."""
    from dsv4.model.mhc import hc_post
    hc = 4
    perm = [2, 0, 3, 1]
    base = torch.zeros((2 + hc) * hc)
    for j, k in enumerate(perm):
        base[2 * hc + hc * j + k] = 30.0
    _, post, comb = ops.hc_split_sinkhorn(torch.zeros(1, 1, (2 + hc) * hc), torch.ones(3), base, hc, 20, 1e-6)
    lanes = torch.arange(hc, dtype=torch.float32).view(1, 1, hc, 1).expand(1, 1, hc, 3)
    out = hc_post(torch.zeros(1, 1, 3), lanes, post * 0, comb)
    for j, k in enumerate(perm):
        assert torch.allclose(out[0, 0, k], torch.full((3,), float(j)), atol=1e-4)


def _dense_attention_f64(q, kv, sink, idx, scale):
    B, S, H, D = q.shape
    out = torch.zeros(B, S, H, D, dtype=torch.float64)
    for b in range(B):
        for s in range(S):
            rows = [int(j) for j in idx[b, s] if j >= 0]
            k = kv[b, rows].double()
            logits = q[b, s].double() @ k.T * scale                       # [H, K]
            m = torch.maximum(logits.max(-1).values, sink.double())
            e = torch.exp(logits - m[:, None])
            out[b, s] = (e @ k) / (e.sum(-1) + torch.exp(sink.double() - m))[:, None]
    return out


def test_sparse_attn_matches_f64():
    g = torch.Generator().manual_seed(0)
    B, S, H, D, N, K = 2, 7, 3, 16, 20, 9
    q, kv = torch.randn(B, S, H, D, generator=g), torch.randn(B, N, D, generator=g)
    sink = torch.randn(H, generator=g)
    idx = torch.randint(0, N, (B, S, K), generator=g)
    idx[torch.rand(B, S, K, generator=g) < 0.3] = -1
    idx[..., 0] = torch.arange(S)  # every query sees at least one row
    got = ops.sparse_attn(q, kv, sink, idx, D ** -0.5)
    want = _dense_attention_f64(q, kv, sink, idx, D ** -0.5)
    assert (got.double() - want).abs().max() < 1e-5


def test_indexer_topk_matches_bruteforce():
    g = torch.Generator().manual_seed(1)
    B, S, Hi, Di, T, k = 2, 6, 16, 8, 12, 4
    q, keys = torch.randn(B, S, Hi, Di, generator=g), torch.randn(B, T, Di, generator=g)
    w = torch.randn(B, S, Hi, generator=g)
    n_visible = torch.tensor([[0, 1, 3, 4, 8, 12]] * B)
    got = ops.indexer_topk(q, w, keys, n_visible, k)
    assert got.shape == (B, S, k)
    for b in range(B):
        for s in range(S):
            nv = int(n_visible[b, s])
            scores = [(float(sum(w[b, s, h] * torch.relu(q[b, s, h] @ keys[b, t]) for h in range(Hi))), t)
                      for t in range(nv)]
            want = {t for _, t in sorted(scores, reverse=True)[:k]}
            sel = {int(t) for t in got[b, s] if t >= 0}
            assert sel == want and (got[b, s] >= 0).sum() == min(k, nv)


def test_compress_pool_is_per_channel_softmax():
    g = torch.Generator().manual_seed(2)
    kv, score = torch.randn(2, 3, 8, 5, generator=g), torch.randn(2, 3, 8, 5, generator=g)
    score[:, :, :2] = float("-inf")  # padded candidates get zero weight
    got = ops.compress_pool(kv, score)
    w = torch.exp(score.double() - score.double().amax(2, keepdim=True))
    want = (w * kv.double()).sum(2) / w.sum(2)
    assert (got.double() - want).abs().max() < 1e-6


def test_moe_experts_matches_per_token_loop():
    g = torch.Generator().manual_seed(3)
    N, C, F, E, k = 11, 8, 6, 5, 2
    x = torch.randn(N, C, generator=g)
    w1, w3, w2 = torch.randn(E, F, C, generator=g), torch.randn(E, F, C, generator=g), torch.randn(E, C, F, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    wt = torch.rand(N, k, generator=g)
    limit = 2.0
    got = ops.moe_experts(x, w1, w2, w3, idx, wt, limit)
    for n in range(N):
        want = torch.zeros(C, dtype=torch.float64)
        for j in range(k):
            e = int(idx[n, j])
            gate = (w1[e].double() @ x[n].double()).clamp(max=limit)
            up = (w3[e].double() @ x[n].double()).clamp(-limit, limit)
            want += w2[e].double() @ (torch.nn.functional.silu(gate) * up * wt[n, j])
        assert (got[n].double() - want).abs().max() < 1e-4 * want.abs().max()


@pytest.mark.parametrize("S, W", [(1, 4), (7, 4), (20, 8), (13, 32)])
def test_sequence_attn_equals_sparse_attn(S, W):
    """The whole-sequence form (block-local window + masked entries) is the same math as index lists."""
    g = torch.Generator().manual_seed(S)
    B, H, D, N = 2, 3, 8, 5
    q, kv, ent = torch.randn(B, S, H, D, generator=g), torch.randn(B, S, D, generator=g), torch.randn(B, N, D, generator=g)
    sink = torch.randn(H, generator=g)
    mask = torch.rand(B, S, N, generator=g) < 0.5
    o, p = ops.sequence_attn(q, kv, ent, mask, sink, 0.3, W, return_entry_probs=True)
    i = torch.arange(S).view(S, 1)
    widx = i - torch.arange(W)
    widx = torch.where(widx >= 0, widx, -1).expand(B, S, W)
    eidx = torch.where(mask, torch.arange(N) + S, -1)
    want = ops.sparse_attn(q, torch.cat((kv, ent), 1), sink, torch.cat((widx, eidx), -1), 0.3)
    assert (o - want).abs().max() < 1e-5
    assert p.shape == (B, S, N) and (p[~mask] == 0).all() and not p.requires_grad


def test_sequence_attn_chunked_and_checkpointed(monkeypatch):
    """Query chunks (each starting on a window block, with the previous block's rows) and their checkpointed
    backward give the one-shot result and gradients."""
    from dsv4.ops.reference import sequence_attn as mod
    g = torch.Generator().manual_seed(9)
    B, S, H, D, N, W = 2, 45, 3, 8, 6, 4
    leaves = [torch.randn(B, S, H, D, generator=g), torch.randn(B, S, D, generator=g),
              torch.randn(B, N, D, generator=g), torch.randn(H, generator=g)]
    mask = torch.rand(B, S, N, generator=g) < 0.6
    results = []
    for elements in (1 << 28, 2 * W * H * (2 * W + N + 1)):    # one chunk; chunks of two window blocks
        monkeypatch.setattr(mod, "CHUNK_ELEMENTS", elements)
        xs = [t.clone().requires_grad_(True) for t in leaves]
        o, mass = mod.sequence_attn(xs[0], xs[1], xs[2], mask, xs[3], 0.3, W, return_entry_probs=True)
        (o * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum().backward()
        results.append([o.detach(), mass] + [t.grad for t in xs])
    for a, b in zip(*results):
        assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("impl", ["gathered", "grouped"])
def test_expert_kernels_equal_reference(impl):
    """The sync-free expert paths (gathered batched matmuls; grouped GEMMs, which also train) against the loop:
    outputs and, for grouped, the gradients of the input, every weight and the routing weights."""
    if impl == "grouped" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("this PyTorch has no torch._grouped_mm")
    import importlib
    fn = importlib.import_module(f"dsv4.ops.{impl}.experts").moe_experts
    from dsv4.ops.reference.experts import moe_experts as ref
    g = torch.Generator().manual_seed(4)
    N, C, F, E, k = 9, 16, 24, 8, 3
    x = torch.randn(N, C, generator=g)
    w1, w3, w2 = torch.randn(E, F, C, generator=g), torch.randn(E, F, C, generator=g), torch.randn(E, C, F, generator=g)
    idx = torch.stack([torch.randperm(E - 2, generator=g)[:k] for _ in range(N)])  # two experts get no token
    wt = torch.rand(N, k, generator=g)
    leaves = [t.clone().requires_grad_(impl == "grouped") for t in (x, w1, w2, w3, wt)]
    got = fn(leaves[0], *leaves[1:4], idx, leaves[4], 3.0)
    want_leaves = [t.clone().requires_grad_(True) for t in (x, w1, w2, w3, wt)]
    want = ref(want_leaves[0], *want_leaves[1:4], idx, want_leaves[4], 3.0)
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
    if impl == "grouped":
        probe = torch.randn(want.shape, generator=g)
        (got * probe).sum().backward()
        (want * probe).sum().backward()
        for a, b in zip(leaves, want_leaves):
            assert (a.grad - b.grad).abs().max() <= 1e-4 * b.grad.abs().max()

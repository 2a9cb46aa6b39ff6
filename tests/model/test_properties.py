"""Properties of the forward pass that hold for any weights."""
import functools

import numpy as np
import pytest
import torch

import dsv4
from dsv4.model.mhc import hc_post


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=1).eval()


def _tokens(n, b=2, seed=0, vocab=2048):
    return torch.randint(0, vocab, (b, n), generator=torch.Generator().manual_seed(seed))


def test_shapes_and_dtype(tiny):
    logits = tiny(_tokens(37))
    assert logits.shape == (2, 37, tiny.config.vocab_size) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("t", [0, 15, 31, 33, 64, 90])
def test_causality_bitwise(tiny, t):
    """Changing tokens after t leaves logits at positions <= t bitwise unchanged."""
    a = _tokens(100)
    b = a.clone()
    b[:, t + 1:] = _tokens(100 - t - 1, seed=7)
    with torch.no_grad():
        la, lb = tiny(a), tiny(b)
    assert torch.equal(la[:, : t + 1], lb[:, : t + 1])
    if t < 99:
        assert not torch.equal(la[:, t + 1:], lb[:, t + 1:])


def test_prefix_length_invariance(tiny):
    """Logits at position t do not depend on the total length T (up to matmul blocking)."""
    tok = _tokens(100)
    with torch.no_grad():
        full = tiny(tok)
        for t in (1, 17, 64, 99):
            part = tiny(tok[:, :t])
            assert torch.allclose(part, full[:, :t], rtol=0, atol=1e-5 * full.abs().max())


def test_batch_rows_independent(tiny):
    tok = _tokens(50, b=3)
    with torch.no_grad():
        both = tiny(tok)
        one = tiny(tok[1:2])
    assert torch.allclose(both[1:2], one, atol=1e-5 * one.abs().max(), rtol=0)


def test_quant_sim_switch(tiny):
    tok = _tokens(80)
    with torch.no_grad():
        plain = tiny(tok)
        sim = tiny.set_quant_sim(True)(tok)
        tiny.set_quant_sim(False)
        again = tiny(tok)
    assert torch.equal(plain, again)
    rel = ((sim - plain).abs().max() / plain.abs().max()).item()
    assert 0 < rel < 0.2, rel  # the FP8/FP4 round trips perturb, but do not wreck, the logits


def test_hash_layers_route_by_table(tiny):
    """Layer 0 (hash) picks exactly tid2eid[token]; its gate weights still come from the learned scores."""
    moe = tiny.layers[0].ffn
    assert moe.gate.hashed and not tiny.layers[1].ffn.gate.hashed
    tok = _tokens(30)
    with torch.no_grad():
        tiny(tok)
    idx, scores = moe.last_routing
    assert torch.equal(idx, moe.gate.tid2eid[tok.flatten()])
    with torch.no_grad():  # a different table changes the routing accordingly
        moe.gate.tid2eid.copy_(moe.gate.tid2eid.roll(1, dims=1))
        tiny(tok)
        assert torch.equal(moe.last_routing[0], moe.gate.tid2eid[tok.flatten()])
        moe.gate.tid2eid.copy_(moe.gate.tid2eid.roll(-1, dims=1))


def test_bias_affects_selection_only(tiny):
    gate = tiny.layers[1].ffn.gate
    x = torch.randn(64, tiny.config.dim)
    w0, i0, s0 = gate(x, None)
    with torch.no_grad():
        gate.bias[3] = 100.0  # force expert 3 into every selection
    w1, i1, s1 = gate(x, None)
    with torch.no_grad():
        gate.bias.zero_()
    assert (i1 == 3).any(-1).all() and torch.equal(s0, s1)
    chosen = s1.gather(1, i1)
    assert torch.allclose(w1, chosen / chosen.sum(-1, keepdim=True) * tiny.config.route_scale)


def test_mtp_logits(tiny):
    tok = _tokens(40)
    h = tiny.hidden(tok)
    (mtp,) = tiny.mtp_logits(h[:, :-1], [tok[:, 1:]])
    assert mtp.shape == (2, 39, tiny.config.vocab_size) and torch.isfinite(mtp).all()


def test_mhc_reduces_to_residual_at_init():
    """With identical lanes and the documented init, a block is exactly x + f(norm(x)) per lane."""
    cfg = dsv4.ModelConfig.preset("tiny")
    block = dsv4.Transformer(cfg).init_weights().layers[1]
    x = torch.randn(2, 5, cfg.dim).unsqueeze(2).expand(-1, -1, cfg.hc_mult, -1).contiguous()
    with torch.no_grad():
        block.hc_attn_fn.zero_()
        y, post, comb = block._hc_pre(x, "attn")
        f = torch.randn(2, 5, cfg.dim)
        out = hc_post(f, x, post, comb)
    assert torch.allclose(y, x[:, :, 0], atol=1e-5)  # pre = 1/4 each: the mean of 4 identical lanes
    assert torch.allclose(out, (x[:, :, 0] + f).unsqueeze(2).expand_as(out), atol=1e-5)


def test_token_validation(tiny):
    with pytest.raises(ValueError, match="token ids must lie in"):
        tiny(torch.tensor([[0, 5000]]))
    with pytest.raises(TypeError, match="int64"):
        tiny(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        tiny(torch.zeros(4, dtype=torch.long))


def test_activation_checkpointing_gives_the_same_gradients():
    """Recomputing blocks in the backward pass changes memory, not the gradients (incl. MTP and indexer KL)."""
    cfg = dsv4.ModelConfig.preset("tiny")
    tokens = torch.randint(0, cfg.vocab_size, (2, 70), generator=torch.Generator().manual_seed(0))
    grads, routes = [], []
    for ckpt in (False, True):
        model = dsv4.Transformer(cfg).init_weights(seed=3).train().set_activation_checkpointing(ckpt)
        for b in list(model.layers) + list(model.mtp):  # several token chunks per block
            b.forward_recomputed = functools.partial(b.forward_recomputed, chunk=16)
            b.record_hc = True
        for m in model.modules():
            if getattr(m, "kind", None) == "csa":
                m.indexer_loss = True
        h = model.hidden(tokens)
        loss = model.logits(h).logsumexp(-1).mean() + model.mtp_logits(h, [tokens])[0].logsumexp(-1).mean()
        loss = loss + sum(m.indexer_kl for m in model.modules() if getattr(m, "indexer_kl", None) is not None)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        routes.append([torch.cat(b.ffn.last_routing[0:1] + (b.ffn.last_routing[1],), 1) for b in model.layers]
                      + [c for b in model.layers for c in b.last_combs])  # and the mHC record, after backward
    for a, b in zip(*routes):  # routing recorded in [B*S] order either way (balance loss, expert loads)
        assert torch.allclose(a, b)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 50
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6), n


@pytest.mark.parametrize("batch, seq, half", [(2, 300, 8), (3, 1000, 32), (1, 4096, 32)])
def test_rope_angles_are_the_rounded_cos_and_sin(batch, seq, half):
    """RoPE's cos/sin are the fp32 roundings of the float64 functions of the fp32 angles, for tensors the CPU
    splits across threads (torch 2.13's fp32 CPU cos was off by ~2e-4 on part of such tensors in some processes,
    which made the plain forward of tests/cache/test_incremental.py differ from the cached one by 6e-2)."""
    from dsv4.model.rope import rope_angles, rope_frequencies
    freqs = rope_frequencies(2 * half, 10000.0)
    pos = torch.arange(seq).expand(batch, seq)
    cos, sin = rope_angles(pos, freqs)
    angles = (pos.float().unsqueeze(-1) * freqs).double().numpy()
    assert cos.dtype == sin.dtype == torch.float32
    for name, got, want in (("cos", cos, np.cos(angles)), ("sin", sin, np.sin(angles))):
        err = np.abs(got.double().numpy() - want).max()
        assert err <= 1.2e-7, f"{name} off by {err:.1e} (more than one fp32 ulp of 1)"

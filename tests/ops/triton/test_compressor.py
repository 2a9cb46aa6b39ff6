"""ops/triton/compressor.py (the compressor's pooling: decode steps, whole groups in prefill and training) against
the references."""
import pytest
import torch

from dsv4.ops.reference import compressor as ref_comp
from dsv4.ops.triton import compressor as tri_comp

from .device import DEV, DT, TOL, TRAIN_TOL, gen, randn, rel_err


@pytest.mark.parametrize("B, m, d, overlap", [(3, 4, 48, True), (2, 8, 64, False), (1, 3, 32, True)])
def test_decode_steps(B, m, d, overlap):
    """Through group completions (2m + 1 steps), rows at different phases: the entries, and the states updated
    in place alike (the position bias added in the op)."""
    g = gen()
    W2, R = (2 if overlap else 1) * d, (2 if overlap else 1) * m
    states = [[torch.zeros(B, R, W2).to(DEV), torch.full((B, R, W2), float("-inf")).to(DEV)] for _ in range(2)]
    w, freqs = (torch.rand(d, generator=g) + 0.5).to(DEV), torch.rand(8, generator=g).to(DEV)
    pos = torch.randint(0, 50, (B,), generator=g).to(DEV)
    ape = randn(m, W2, g=g) if overlap else None
    for step in range(2 * m + 1):
        kv, sc = randn(B, W2, g=g), randn(B, W2, g=g)
        a = tri_comp.compress_step(kv, sc, *states[0], pos, m, overlap, w, 1e-6, freqs, DT, ape)
        r = ref_comp.compress_step(kv, sc, *states[1], pos, m, overlap, w, 1e-6, freqs, DT, ape)
        bound = TOL * 10 * r.float().abs().max() + 1e-2 * (DT != torch.float32)
        assert (a.float() - r.float()).abs().max() <= bound, step
        for x, y in zip(*states):
            assert torch.equal(x.isinf(), y.isinf())
            assert (x.nan_to_num(0, 0, 0) - y.nan_to_num(0, 0, 0)).abs().max() < 1e-5
        pos = pos + 1


@pytest.mark.parametrize("B, L, m, d, overlap, with_prev, with_ape", [
    (2, 19, 4, 24, True, False, True), (1, 13, 4, 16, True, True, False), (2, 40, 8, 20, False, False, True),
    (1, 256, 128, 8, False, False, True)])
def test_groups(B, L, m, d, overlap, with_prev, with_ape):
    """Prefill pooling: overlapping halves, the state's previous group, the position bias; padded candidates, and
    a group without candidates (NaN, as the reference) unless a previous group's rows join it."""
    g = gen()
    W2 = (2 if overlap else 1) * d
    kv, sc = randn(B, L, W2, g=g), randn(B, L, W2, g=g)
    sc[0, :2] = float("-inf")
    sc[-1, :m] = float("-inf")
    prev = (randn(B, m, d, g=g), randn(B, m, d, g=g)) if with_prev else None
    ape = randn(m, W2, g=g) if with_ape else None
    a = tri_comp.compress_groups(kv, sc, m, overlap, L // m, prev, ape)
    r = ref_comp.compress_groups(kv, sc, m, overlap, L // m, prev, ape)
    assert a.shape == r.shape == (B, L // m, d) and torch.equal(a.isnan(), r.isnan())
    assert a.isnan().any() != (overlap and with_prev)
    assert (a.nan_to_num() - r.nan_to_num()).abs().max() <= 1e-5 * r.nan_to_num().abs().max()


@pytest.mark.parametrize("B, L, m, d, overlap, with_ape", [(2, 19, 4, 24, True, True), (1, 40, 8, 20, False, True),
                                                           (1, 12, 4, 16, True, False)])
def test_group_gradients(B, L, m, d, overlap, with_ape):
    """Training: the pooled entries and d kv, d score, d bias against float64 autograd through the reference."""
    g = gen()
    W2 = (2 if overlap else 1) * d
    leaves = [randn(B, L, W2, g=g), randn(B, L, W2, g=g)] + ([randn(m, W2, g=g)] if with_ape else [])
    dout = randn(B, L // m, d, g=g).double()
    a = [x.detach().clone().requires_grad_(True) for x in leaves]
    r = [x.detach().double().requires_grad_(True) for x in leaves]
    o_t = tri_comp.compress_groups(a[0], a[1], m, overlap, L // m, None, *a[2:])
    o_r = ref_comp.compress_groups(r[0], r[1], m, overlap, L // m, None, *r[2:])
    (o_t.double() * dout).sum().backward()
    (o_r * dout).sum().backward()
    assert rel_err(o_t, o_r) < TRAIN_TOL, ("pool", rel_err(o_t, o_r))
    for name, x_t, x_r in zip(("kv", "score", "ape"), a, r):
        err = rel_err(x_t.grad, x_r.grad)
        assert x_t.grad.dtype == torch.float32 and err < TRAIN_TOL, (name, err)


@pytest.mark.parametrize("B, S, m, d, overlap", [(3, 2, 4, 48, True), (2, 3, 8, 64, False), (1, 4, 3, 32, True),
                                                 (2, 2, 2, 16, False)])
def test_multi_token_steps(B, S, m, d, overlap):
    """S tokens per row in one call (a speculative verify), rows at different phases, through group completions:
    entries and states bit for bit those of S one-token steps of the same kernels, and the reference's within
    rounding."""
    g = gen(S)
    W2, R = (2 if overlap else 1) * d, (2 if overlap else 1) * m
    states = [[torch.zeros(B, R, W2).to(DEV), torch.full((B, R, W2), float("-inf")).to(DEV)] for _ in range(3)]
    w, freqs = (torch.rand(d, generator=g) + 0.5).to(DEV), torch.rand(8, generator=g).to(DEV)
    pos = torch.randint(0, 50, (B,), generator=g).to(DEV)
    ape = randn(m, W2, g=g)
    for _ in range(3):
        kv, sc = randn(B, S, W2, g=g), randn(B, S, W2, g=g)
        many = tri_comp.compress_steps(kv, sc, *states[0], pos, m, overlap, w, 1e-6, freqs, DT, ape)
        one = torch.stack([tri_comp.compress_step(kv[:, t], sc[:, t], *states[1], pos + t, m, overlap, w, 1e-6, freqs,
                                                  DT, ape) for t in range(S)], 1)
        ref = ref_comp.compress_steps(kv, sc, *states[2], pos, m, overlap, w, 1e-6, freqs, DT, ape)
        assert many.shape == (B, S, d) and torch.equal(many, one)
        assert all(torch.equal(x, y) for x, y in zip(*states[:2]))
        bound = TOL * 10 * ref.float().abs().max() + 1e-2 * (DT != torch.float32)
        assert (many.float() - ref.float()).abs().max() <= bound
        for x, y in zip(states[0], states[2]):
            assert torch.equal(x.isinf(), y.isinf())
            assert (x.nan_to_num(0, 0, 0) - y.nan_to_num(0, 0, 0)).abs().max() < 1e-5
        pos = pos + S


def test_launches_build_for_gpus(native_build):
    native_build()

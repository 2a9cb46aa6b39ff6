"""The full-vocabulary reverse KL: value and gradient against float64 autograd of the naive formula, chunking
changes nothing, and a student identical to its teacher has zero KL and zero gradient."""
from __future__ import annotations

import copy

import pytest
import torch

import dsv4
from dsv4.errors import InvalidArgument
from dsv4.posttrain.reverse_kl import policy_positions, reverse_kl, token_reverse_kl


def naive_kl(zs: torch.Tensor, zt: torch.Tensor) -> torch.Tensor:
    ps, pt = torch.softmax(zs, -1), torch.softmax(zt, -1)
    return (ps * (ps.log() - pt.log())).sum(-1)


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_value_and_gradient_match_float64_naive(chunk):
    g = torch.Generator().manual_seed(0)
    N, C, V = 7, 5, 11
    hs = torch.randn(N, C, generator=g, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(N, C, generator=g, dtype=torch.float64)
    ws = torch.randn(V, C, generator=g, dtype=torch.float64, requires_grad=True)
    wt = torch.randn(V, C, generator=g, dtype=torch.float64)
    weights = torch.rand(N, generator=g, dtype=torch.float64)    # a loss that weighs tokens unequally

    kl = token_reverse_kl(lambda h: h @ ws.T, lambda h: h @ wt.T, hs, ht, chunk=chunk)
    (kl * weights).sum().backward()
    got = kl.detach(), hs.grad.clone(), ws.grad.clone()
    hs.grad = ws.grad = None
    want_kl = naive_kl(hs @ ws.T, ht @ wt.T)
    (want_kl * weights).sum().backward()
    torch.testing.assert_close(got[0], want_kl.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got[1], hs.grad, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(got[2], ws.grad, rtol=1e-10, atol=1e-13)
    assert (got[0] > 0).all()


def test_gradient_is_the_analytic_one():
    """d KL / d z_s = p_s (log p_s - log p_t - KL): the formula the docstring promises."""
    g = torch.Generator().manual_seed(1)
    zs = torch.randn(4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(4, 9, generator=g, dtype=torch.float64)
    kl = token_reverse_kl(lambda z: z, lambda z: z, zs, zt, chunk=2)
    kl.sum().backward()
    ps, lps, lpt = zs.detach().softmax(-1), zs.detach().log_softmax(-1), zt.log_softmax(-1)
    torch.testing.assert_close(zs.grad, ps * (lps - lpt - kl.detach()[:, None]), rtol=1e-10, atol=1e-14)


def _tiny(seed: int) -> dsv4.Transformer:
    torch.manual_seed(seed)
    return dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=seed, std=0.1)


def _batch():
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 2048, (2, 12), generator=g)
    mask = torch.zeros(2, 12, dtype=torch.long)
    mask[0, 5:] = 1
    mask[1, 3:9] = 1
    return tokens, policy_positions(mask)


def test_model_chunked_equals_unchunked_and_naive():
    student, teacher = _tiny(0), _tiny(1).requires_grad_(False)
    tokens, pos = _batch()
    inputs = tokens[:, :-1]
    with torch.no_grad():
        ht = teacher.hidden(inputs)
    results = []
    for chunk in (3, 10_000):
        student.zero_grad()
        kl = reverse_kl(student, teacher, student.hidden(inputs), ht, pos, chunk=chunk)
        kl.mean().backward()
        results.append((kl.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}))
    (kl3, g3), (kl_all, g_all) = results
    torch.testing.assert_close(kl3, kl_all, rtol=1e-5, atol=1e-8)   # fp32 matmuls of other sizes round apart
    assert g3.keys() == g_all.keys() and len(g3) > 10
    scale = max(float(g.abs().max()) for g in g_all.values())   # some entries are sums that nearly cancel
    for n in g3:
        torch.testing.assert_close(g3[n], g_all[n], rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{n}: {m}")
    with torch.no_grad():  # naive: whole [B, T, vocab] logits, then the positions
        want = naive_kl(student(inputs).double(), teacher(inputs).double())[pos]
    assert kl3.shape == (int(pos.sum()),)
    torch.testing.assert_close(kl3.double(), want, rtol=1e-4, atol=1e-6)
    assert float(kl3.min()) > 0


def test_identical_teacher_gives_zero_kl_and_zero_gradient():
    student = _tiny(0)
    teacher = copy.deepcopy(student).requires_grad_(False)
    tokens, pos = _batch()
    with torch.no_grad():
        ht = teacher.hidden(tokens[:, :-1])
    kl = reverse_kl(student, teacher, student.hidden(tokens[:, :-1]), ht, pos, chunk=4)
    kl.mean().backward()
    assert float(kl.detach().abs().max()) == 0.0
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(float(g.abs().max()) == 0.0 for g in grads)


def test_mismatched_inputs_are_refused():
    student, teacher = _tiny(0), _tiny(1)
    tokens, pos = _batch()
    h = student.hidden(tokens[:, :-1])
    with pytest.raises(InvalidArgument, match="positions"):
        reverse_kl(student, teacher, h, h, pos[:, :-1])
    with pytest.raises(InvalidArgument, match="chunk"):
        token_reverse_kl(lambda x: x, lambda x: x, torch.zeros(2, 3), torch.zeros(2, 3), chunk=0)

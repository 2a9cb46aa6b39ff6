"""OPD on a GPU: a bf16 teacher sharing the device with an fp32 student under bf16 autocast, and the chunked
reverse KL's memory (the [tokens, vocab] logits never exist whole)."""
from __future__ import annotations

import copy

import pytest
import torch

import dsv4
from dsv4.posttrain.reverse_kl import reverse_kl

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _student() -> dsv4.Transformer:
    return dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=0, std=0.1).cuda().train()


def test_bf16_teacher_copy_gives_near_zero_kl_and_a_different_one_does_not():
    student = _student()
    same = copy.deepcopy(student).to_dtype(torch.bfloat16).requires_grad_(False).eval()
    other = dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=1, std=0.1).cuda()
    other = other.to_dtype(torch.bfloat16).requires_grad_(False).eval()
    tokens = torch.randint(0, 2048, (2, 64), device="cuda")
    pos = torch.ones(2, 64, dtype=torch.bool, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h = student.hidden(tokens)
        with torch.no_grad():
            kl_same = reverse_kl(student, same, h, same.hidden(tokens), pos, chunk=32)
            kl_other = reverse_kl(student, other, h, other.hidden(tokens), pos, chunk=32)
    assert torch.isfinite(kl_same).all() and torch.isfinite(kl_other).all()
    assert float(kl_same.mean()) < 0.05 * float(kl_other.mean())
    kl = reverse_kl(student, other, h, other.hidden(tokens).detach(), pos, chunk=32)
    kl.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def test_chunked_reverse_kl_memory_stays_below_the_whole_logits():
    student = _student()
    teacher = copy.deepcopy(student).requires_grad_(False).eval()
    V, N, C = student.config.vocab_size, 16384, 256
    h = torch.randn(1, N, student.config.hc_mult, student.config.dim, device="cuda", requires_grad=True)
    ht = torch.randn(1, N, student.config.hc_mult, student.config.dim, device="cuda")
    pos = torch.ones(1, N, dtype=torch.bool, device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    reverse_kl(student, teacher, h, ht, pos, chunk=C).sum().backward()
    torch.cuda.synchronize()
    whole = N * V * 4
    assert torch.cuda.max_memory_allocated() - base < whole // 2, (torch.cuda.max_memory_allocated() - base, whole)

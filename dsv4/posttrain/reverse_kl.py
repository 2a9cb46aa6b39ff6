"""The exact full-vocabulary reverse KL, KL(student || teacher), per token, in token chunks.

At every position whose next token the student sampled, OPD minimises

    KL(p_s || p_t) = sum_v p_s(v) (log p_s(v) - log p_t(v)),

summed over the whole vocabulary (not a one-sample estimate). Its gradient w.r.t. the student's logits z is
p_s * (log p_s - log p_t - KL): every vocabulary entry moves, the teacher's whole distribution is matched.

The [tokens, vocab] logits would dominate memory at a real vocabulary (T x 129K fp32), so only the policy
positions' hidden states are gathered, and the heads, softmaxes and KL run on `chunk` of them at a time. With
gradients on, each chunk is checkpointed: only its hidden states are kept, the logits are recomputed in the
backward pass, one chunk at a time. The teacher's head runs without gradients.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import InvalidArgument
from ..generate.host import to_device
from ..model import Transformer

__all__ = ["token_reverse_kl", "reverse_kl", "policy_positions", "select_positions", "DEFAULT_CHUNK"]

DEFAULT_CHUNK = 1024

Head = Callable[[torch.Tensor], torch.Tensor]


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log-softmax in at least fp32 (float64 stays float64: the gradient check runs in it)."""
    return F.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)


class _ReverseKL(torch.autograd.Function):
    """KL(softmax(z_s) || p_t) per row from the student's logits and the teacher's log-probabilities, with the
    analytic gradient p_s (log p_s - log p_t - KL): exactly zero where the two distributions are equal (autograd
    through log_softmax leaves p_s (1 - sum p_s) of rounding there)."""

    @staticmethod
    def forward(ctx, z_s: torch.Tensor, logp_t: torch.Tensor) -> torch.Tensor:
        logp_s = _log_probs(z_s)
        p_s = logp_s.exp()
        diff = logp_s - logp_t
        kl = (p_s * diff).sum(-1)
        ctx.save_for_backward(p_s, diff, kl)
        ctx.logits_dtype = z_s.dtype
        return kl

    @staticmethod
    def backward(ctx, grad_kl: torch.Tensor):
        p_s, diff, kl = ctx.saved_tensors
        grad = grad_kl.unsqueeze(-1) * p_s * (diff - kl.unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None


def _chunk_kl(student_head: Head, teacher_head: Head, hs: torch.Tensor, ht: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logp_t = _log_probs(teacher_head(ht))
    return _ReverseKL.apply(student_head(hs), logp_t)


def token_reverse_kl(student_head: Head, teacher_head: Head, h_student: torch.Tensor, h_teacher: torch.Tensor,
                     chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """KL(student || teacher) [N] of N positions: `student_head(h_student[i:j])` and `teacher_head(h_teacher[i:j])`
    give the logits [n, vocab] of positions i..j-1; they run on `chunk` positions at a time. Differentiable in
    the student's hidden states and head; the teacher's side carries no gradient."""
    if h_student.shape[0] != h_teacher.shape[0]:
        raise InvalidArgument(f"reverse KL: {h_student.shape[0]} student positions but {h_teacher.shape[0]} "
                              "teacher positions; they must be the same tokens")
    if chunk < 1:
        raise InvalidArgument(f"reverse KL chunk={chunk}: must be >= 1")
    n = h_student.shape[0]
    if n == 0:
        return h_student.new_zeros(0, dtype=torch.float32)
    recompute = torch.is_grad_enabled() and n > chunk   # one chunk: nothing to save by recomputing
    parts = []
    for s in range(0, n, chunk):
        hs, ht = h_student[s:s + chunk], h_teacher[s:s + chunk]
        if recompute:
            parts.append(checkpoint(_chunk_kl, student_head, teacher_head, hs, ht, use_reentrant=False))
        else:
            parts.append(_chunk_kl(student_head, teacher_head, hs, ht))
    return torch.cat(parts)


def policy_positions(policy_mask: torch.Tensor) -> torch.Tensor:
    """policy_mask [B, T] (1 where tokens[b, t] was sampled by the policy) -> bool [B, T - 1]: the positions
    whose next-token distribution produced a policy token (position t predicts token t + 1)."""
    return policy_mask[:, 1:].bool()


def select_positions(x: torch.Tensor, positions: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """x[positions] for a bool `positions` [B, S] and x [B, S, ...]: the rows at the True positions, in row-major
    order. With `positions` on the host and `x` on a GPU, the indices are found on the host and sent without a
    wait, so the selection's data-dependent size never makes the host read the device (x[mask] would). `index`:
    position_index(positions, x.device), when the caller selects several tensors at the same positions."""
    return x.flatten(0, 1).index_select(0, position_index(positions, x.device) if index is None else index)


def position_index(positions: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The flat row-major indices of the True `positions`, on `device` (found where `positions` is)."""
    return to_device(positions.reshape(-1).nonzero().squeeze(1), device)


def reverse_kl(student: Transformer, teacher: Transformer, h_student: torch.Tensor, h_teacher: torch.Tensor,
               positions: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """KL(student || teacher) [N] at the N True `positions` [B, S] of the lanes h_student / h_teacher [B, S, R, C]
    (`model.hidden` outputs of the same tokens), in row-major order. Only those positions' logits are computed,
    `chunk` at a time. The caller runs the teacher's `hidden` without gradients. `positions` on the host: no
    read of the device (select_positions)."""
    if student.config.vocab_size != teacher.config.vocab_size:
        raise InvalidArgument(f"reverse KL: the student's vocabulary has {student.config.vocab_size} entries and "
                              f"the teacher's {teacher.config.vocab_size}; distillation needs one vocabulary")
    if h_student.shape[:2] != positions.shape or h_teacher.shape[:2] != positions.shape:
        raise InvalidArgument(f"reverse KL: positions {tuple(positions.shape)} must match the [batch, seq] of the "
                              f"student's {tuple(h_student.shape[:2])} and teacher's {tuple(h_teacher.shape[:2])} "
                              "hidden states")
    index = position_index(positions, h_student.device)
    hs = select_positions(h_student, positions, index)   # [N, R, C]
    ht = select_positions(h_teacher, positions, index if h_teacher.device == h_student.device else None)

    def student_head(h: torch.Tensor) -> torch.Tensor:
        return student.logits(h.unsqueeze(0))[0]

    def teacher_head(h: torch.Tensor) -> torch.Tensor:
        return teacher.logits(h.unsqueeze(0))[0]

    return token_reverse_kl(student_head, teacher_head, hs, ht, chunk)

"""The compressor's pooling. Decode: two kernels, one token per row into the fp32 state, the
softmax-gated pooling of its group, the state shift when the group completes; then the entry's RMSNorm and
RoPE. The reference spells this as ~50 small tensor ops per compressor per step (six compressors per
CSA+HCA layer pair), which at batch 1 cost more in launches than in work. Prefill: one kernel reads each
group's candidate rows where the projections left them (the overlapping windows' halves, the position bias
by phase), where the reference first builds the [groups, 2 * ratio, d] candidate tensors with four copies; in
training it keeps each channel's log-denominator, and its backward is one elementwise pass over the rows."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.compressor import compress_groups as reference_compress_groups
from .launch import autograd_tracks, falls_back_to, reference_grads, training_kernels_enabled


@triton.jit
def _new_score(sc_ptr, ape_ptr, b, XS, r0, W2, at, cm, HAS_APE: tl.constexpr):
    """The token's gate scores at channels `at` (row b at b * XS), plus the position bias of its phase r0."""
    s = tl.load(sc_ptr + b * XS + at, mask=cm, other=0.0)
    if HAS_APE:
        s += tl.load(ape_ptr + r0 * W2 + at, mask=cm, other=0.0)
    return s


@triton.jit
def _state_pool_kernel(kv_ptr, sc_ptr, ape_ptr, skv_ptr, ssc_ptr, pos_ptr, pooled_ptr, t, XS, PS, d, m, R, W2,
                       OVERLAP: tl.constexpr, HAS_APE: tl.constexpr, MP: tl.constexpr, BLOCK_C: tl.constexpr):
    """Row b's token (kv, score at b * XS) at position pos[b] + t into the state; its group's pooled entry to
    pooled_ptr + b * PS."""
    b = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cs < d
    r0 = (tl.load(pos_ptr + b) + t) % m
    done = r0 == m - 1
    rows = tl.arange(0, MP)
    rm = rows < m
    mask = rm[:, None] & cm[None, :]
    base = b * R * W2
    new = rows[:, None] == r0
    if OVERLAP:
        cur = base + (m + rows[:, None]) * W2                       # the unfinished group (rows m..2m-1)
        prv = base + rows[:, None] * W2                             # the previous group (rows 0..m-1)
        a_kv = tl.load(skv_ptr + cur + cs[None, :], mask=mask, other=0.0)
        a_sc = tl.load(ssc_ptr + cur + cs[None, :], mask=mask, other=float("-inf"))
        b_kv = tl.load(skv_ptr + cur + d + cs[None, :], mask=mask, other=0.0)
        b_sc = tl.load(ssc_ptr + cur + d + cs[None, :], mask=mask, other=float("-inf"))
        a_kv = tl.where(new, tl.load(kv_ptr + b * XS + cs, mask=cm, other=0.0)[None, :], a_kv)
        a_sc = tl.where(new, _new_score(sc_ptr, ape_ptr, b, XS, r0, W2, cs, cm, HAS_APE)[None, :], a_sc)
        b_kv = tl.where(new, tl.load(kv_ptr + b * XS + d + cs, mask=cm, other=0.0)[None, :], b_kv)
        b_sc = tl.where(new, _new_score(sc_ptr, ape_ptr, b, XS, r0, W2, d + cs, cm, HAS_APE)[None, :], b_sc)
        p_kv = tl.load(skv_ptr + prv + cs[None, :], mask=mask, other=0.0)
        p_sc = tl.load(ssc_ptr + prv + cs[None, :], mask=mask, other=float("-inf"))
        p_sc = tl.where(rm[:, None], p_sc, float("-inf"))
        b_sc = tl.where(rm[:, None], b_sc, float("-inf"))
        mx = tl.maximum(tl.max(p_sc, 0), tl.max(b_sc, 0))
        wp = tl.exp(p_sc - mx[None, :])
        wb = tl.exp(b_sc - mx[None, :])
        pooled = (tl.sum(wp * p_kv, 0) + tl.sum(wb * b_kv, 0)) / (tl.sum(wp, 0) + tl.sum(wb, 0))
        if done:  # the group becomes the previous one, the unfinished rows empty
            tl.store(skv_ptr + prv + cs[None, :], a_kv, mask=mask)
            tl.store(ssc_ptr + prv + cs[None, :], a_sc, mask=mask)
            tl.store(skv_ptr + prv + d + cs[None, :], b_kv, mask=mask)
            tl.store(ssc_ptr + prv + d + cs[None, :], b_sc, mask=mask)
            zero = tl.zeros([MP, BLOCK_C], tl.float32)
            tl.store(skv_ptr + cur + cs[None, :], zero, mask=mask)
            tl.store(ssc_ptr + cur + cs[None, :], zero - float("inf"), mask=mask)
            tl.store(skv_ptr + cur + d + cs[None, :], zero, mask=mask)
            tl.store(ssc_ptr + cur + d + cs[None, :], zero - float("inf"), mask=mask)
        else:
            tl.store(skv_ptr + cur + cs[None, :], a_kv, mask=mask)
            tl.store(ssc_ptr + cur + cs[None, :], a_sc, mask=mask)
            tl.store(skv_ptr + cur + d + cs[None, :], b_kv, mask=mask)
            tl.store(ssc_ptr + cur + d + cs[None, :], b_sc, mask=mask)
    else:
        cur = base + rows[:, None] * W2
        c_kv = tl.load(skv_ptr + cur + cs[None, :], mask=mask, other=0.0)
        c_sc = tl.load(ssc_ptr + cur + cs[None, :], mask=mask, other=float("-inf"))
        c_kv = tl.where(new, tl.load(kv_ptr + b * XS + cs, mask=cm, other=0.0)[None, :], c_kv)
        c_sc = tl.where(new, _new_score(sc_ptr, ape_ptr, b, XS, r0, W2, cs, cm, HAS_APE)[None, :], c_sc)
        c_sc = tl.where(rm[:, None], c_sc, float("-inf"))
        mx = tl.max(c_sc, 0)
        w = tl.exp(c_sc - mx[None, :])
        pooled = tl.sum(w * c_kv, 0) / tl.sum(w, 0)
        if done:
            zero = tl.zeros([MP, BLOCK_C], tl.float32)
            tl.store(skv_ptr + cur + cs[None, :], zero, mask=mask)
            tl.store(ssc_ptr + cur + cs[None, :], zero - float("inf"), mask=mask)
        else:
            tl.store(skv_ptr + cur + cs[None, :], c_kv, mask=mask)
            tl.store(ssc_ptr + cur + cs[None, :], c_sc, mask=mask)
    tl.store(pooled_ptr + b * PS + cs, pooled, mask=cm)


@triton.jit
def _norm_rope_kernel(pooled_ptr, w_ptr, pos_ptr, freqs_ptr, out_ptr, S, d, m, eps, half,
                      D: tl.constexpr):
    """Entry pid = b * S + t (token t of row b, at position pos[b] + t): RMSNorm, then RoPE at its group's start."""
    pid = tl.program_id(0)
    b = pid // S
    c = tl.arange(0, D)
    cm = c < d
    dt = out_ptr.dtype.element_ty
    e = tl.load(pooled_ptr + pid * d + c, mask=cm, other=0.0).to(dt).to(tl.float32)
    rs = 1.0 / tl.sqrt(tl.sum(e * e, 0) / d + eps)
    e = (tl.load(w_ptr + c, mask=cm, other=0.0) * (e * rs)).to(dt).to(tl.float32)
    a, bb = tl.split(tl.reshape(e, (D // 2, 2)))                   # channel pairs (2j, 2j+1)
    j = tl.arange(0, D // 2)
    i = j - (d // 2 - half)                                          # rope pair index (>= 0 on the rope dims)
    rope = (i >= 0) & (2 * j < d)
    start = (((tl.load(pos_ptr + b) + pid % S) // m) * m).to(tl.float32)
    ang = start * tl.load(freqs_ptr + tl.where(rope, i, 0), mask=rope, other=0.0)
    cos, sin = tl.cos(ang), tl.sin(ang)
    a2 = tl.where(rope, a * cos - bb * sin, a)
    b2 = tl.where(rope, a * sin + bb * cos, bb)
    out = tl.reshape(tl.join(a2, b2), (D,))
    tl.store(out_ptr + pid * d + c, out.to(dt), mask=cm)


def compress_step(kv: torch.Tensor, score: torch.Tensor, state_kv: torch.Tensor, state_score: torch.Tensor,
                  pos0: torch.Tensor, ratio: int, overlap: bool, norm_weight: torch.Tensor, eps: float,
                  freqs: torch.Tensor, out_dtype: torch.dtype, ape: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as ops.reference.compressor.compress_step (the position bias added in the kernel)."""
    return compress_steps(kv.unsqueeze(1), score.unsqueeze(1), state_kv, state_score, pos0, ratio, overlap,
                          norm_weight, eps, freqs, out_dtype, ape)[:, 0]


def compress_steps(kv: torch.Tensor, score: torch.Tensor, state_kv: torch.Tensor, state_score: torch.Tensor,
                   pos0: torch.Tensor, ratio: int, overlap: bool, norm_weight: torch.Tensor, eps: float,
                   freqs: torch.Tensor, out_dtype: torch.dtype, ape: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as ops.reference.compressor.compress_steps: one state kernel per token (each token's state
    update must land before the next reads it), then one norm + RoPE kernel for all S tokens' entries; the kernels
    of compress_step, so the entries and state are bit for bit those of S compress_step calls."""
    B, S, W2 = kv.shape
    d = W2 // 2 if overlap else W2
    kv, score = kv.float().contiguous(), score.float().contiguous()
    pos = pos0.contiguous()
    pooled = torch.empty(B, S, d, dtype=torch.float32, device=kv.device)
    mp = triton.next_power_of_2(ratio)
    block = max(16, min(128, 4096 // mp))                             # [MP, BLOCK_C] tiles stay in registers
    ape_f = ape.float().contiguous() if ape is not None else score
    for t in range(S):
        _state_pool_kernel[(B, triton.cdiv(d, block))](kv[:, t], score[:, t], ape_f, state_kv, state_score, pos,
                                                       pooled[:, t], t, S * W2, S * d, d, ratio, state_kv.shape[1],
                                                       W2, OVERLAP=overlap, HAS_APE=ape is not None, MP=mp,
                                                       BLOCK_C=block, num_warps=4)
    out = torch.empty(B, S, d, dtype=out_dtype, device=kv.device)
    _norm_rope_kernel[(B * S,)](pooled, norm_weight.float().contiguous(), pos, freqs.float().contiguous(), out, S,
                                d, ratio, eps, freqs.shape[0], D=triton.next_power_of_2(d), num_warps=4)
    return out


def supports(kv: torch.Tensor, score: torch.Tensor, state_kv: torch.Tensor, *args) -> bool:
    return kv.is_cuda and state_kv.is_contiguous() and state_kv.dtype == torch.float32


@triton.jit
def _group_tile(kv_ptr, sc_ptr, ape_ptr, first, stride, rows, cs, mask, W2, HAS_APE: tl.constexpr):
    """kv and score [MP, BLOCK_C] of the rows first + rows * stride at channels cs; the bias of each row's phase."""
    off = first + rows[:, None] * stride + cs[None, :]
    kv = tl.load(kv_ptr + off, mask=mask, other=0.0)
    sc = tl.load(sc_ptr + off, mask=mask, other=float("-inf"))
    if HAS_APE:
        sc += tl.load(ape_ptr + rows[:, None] * W2 + cs[None, :], mask=mask, other=0.0)
    return kv, sc


@triton.jit
def _groups_pool_kernel(kv_ptr, sc_ptr, ape_ptr, pkv_ptr, psc_ptr, out_ptr, lse_ptr, n, L, d, m, W2,
                        OVERLAP: tl.constexpr, HAS_PREV: tl.constexpr, HAS_APE: tl.constexpr, SAVE_LSE: tl.constexpr,
                        MP: tl.constexpr, BLOCK_C: tl.constexpr):
    """One entry (b, i) x a block of channels: the per-channel softmax over its candidates of kv (and, for the
    backward, the log of each channel's softmax denominator)."""
    pid = tl.program_id(0)                      # b * n + i
    b = pid // n
    i = pid % n
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cs < d
    rows = tl.arange(0, MP)
    mask = (rows < m)[:, None] & cm[None, :]
    own = (b * L + i * m).to(tl.int64) * W2     # the group's first row
    if OVERLAP:  # channels d.. of the group's rows, channels ..d of the previous group's
        b_kv, b_sc = _group_tile(kv_ptr + d, sc_ptr + d, ape_ptr + d, own, W2, rows, cs, mask, W2, HAS_APE)
        if i > 0:
            a_kv, a_sc = _group_tile(kv_ptr, sc_ptr, ape_ptr, own - m * W2, W2, rows, cs, mask, W2, HAS_APE)
        elif HAS_PREV:  # entry 0: the previous group kept by the state, its bias already added
            a_kv, a_sc = _group_tile(pkv_ptr, psc_ptr, ape_ptr, (b * m).to(tl.int64) * d, d, rows, cs, mask, W2,
                                     False)
        else:
            a_kv = tl.zeros([MP, BLOCK_C], tl.float32)
            a_sc = tl.full([MP, BLOCK_C], float("-inf"), tl.float32)
        mx = tl.maximum(tl.max(a_sc, 0), tl.max(b_sc, 0))
        mx = tl.where(mx == float("-inf"), 0.0, mx)  # no candidate at all: 0 / 0, NaN as in the reference
        wa = tl.exp(a_sc - mx[None, :])
        wb = tl.exp(b_sc - mx[None, :])
        den = tl.sum(wa, 0) + tl.sum(wb, 0)
        pooled = (tl.sum(wa * a_kv, 0) + tl.sum(wb * b_kv, 0)) / den
    else:
        c_kv, c_sc = _group_tile(kv_ptr, sc_ptr, ape_ptr, own, W2, rows, cs, mask, W2, HAS_APE)
        mx = tl.max(c_sc, 0)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        w = tl.exp(c_sc - mx[None, :])
        den = tl.sum(w, 0)
        pooled = tl.sum(w * c_kv, 0) / den
    tl.store(out_ptr + pid.to(tl.int64) * d + cs, pooled, mask=cm)
    if SAVE_LSE:
        tl.store(lse_ptr + pid.to(tl.int64) * d + cs, mx + tl.log(den), mask=cm)


@triton.jit
def _half_grads(kv_ptr, sc_ptr, ape_ptr, dkv_ptr, dsc_ptr, c_ptr, lse_ptr, dc_ptr, first, rows, cs, mask, W2, d,
                b, e, n, HAS_APE: tl.constexpr):
    """Gradients of one group's rows at channels cs, candidates of entry e of row b (if e < n): with
    w = exp(score - lse), d kv = w dc and d score = w (kv - c) dc; rows of no entry get zeros."""
    kv, sc = _group_tile(kv_ptr, sc_ptr, ape_ptr, first, W2, rows, cs, mask, W2, HAS_APE)
    at = (b * n + e).to(tl.int64) * d + cs
    em = cs < tl.where(e < n, d, 0)                               # no channel of an entry beyond the last
    c = tl.load(c_ptr + at, mask=em, other=0.0)
    lse = tl.load(lse_ptr + at, mask=em, other=0.0)
    dc = tl.load(dc_ptr + at, mask=em, other=0.0)
    w = tl.where(mask & em[None, :], tl.exp(sc - lse[None, :]), 0.0)
    off = first + rows[:, None] * W2 + cs[None, :]
    tl.store(dkv_ptr + off, w * dc[None, :], mask=mask)
    tl.store(dsc_ptr + off, w * (kv - c[None, :]) * dc[None, :], mask=mask)


@triton.jit
def _groups_pool_bwd_kernel(kv_ptr, sc_ptr, ape_ptr, c_ptr, lse_ptr, dc_ptr, dkv_ptr, dsc_ptr, n, L, d, m, W2,
                            OVERLAP: tl.constexpr, HAS_APE: tl.constexpr, MP: tl.constexpr, BLOCK_C: tl.constexpr):
    """The rows of one group j (of all L rows) x a block of channels. Every (row, channel) is a candidate of at most
    one entry: channels d.. of entry j, channels ..d of entry j + 1 (overlap), or all of entry j."""
    groups = tl.cdiv(L, m)
    b = tl.program_id(0) // groups
    j = tl.program_id(0) % groups
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = tl.arange(0, MP)
    mask = ((rows < m) & (j * m + rows < L))[:, None] & (cs < d)[None, :]
    first = (b * L + j * m).to(tl.int64) * W2
    if OVERLAP:
        _half_grads(kv_ptr + d, sc_ptr + d, ape_ptr + d, dkv_ptr + d, dsc_ptr + d, c_ptr, lse_ptr, dc_ptr, first,
                    rows, cs, mask, W2, d, b, j, n, HAS_APE)
        _half_grads(kv_ptr, sc_ptr, ape_ptr, dkv_ptr, dsc_ptr, c_ptr, lse_ptr, dc_ptr, first, rows, cs, mask, W2, d,
                    b, j + 1, n, HAS_APE)
    else:
        _half_grads(kv_ptr, sc_ptr, ape_ptr, dkv_ptr, dsc_ptr, c_ptr, lse_ptr, dc_ptr, first, rows, cs, mask, W2, d,
                    b, j, n, HAS_APE)


def _tile_sizes(ratio: int) -> tuple[int, int]:
    mp = triton.next_power_of_2(ratio)
    return mp, max(16, min(128, 4096 // mp))                        # [MP, BLOCK_C] tiles stay in registers


def _groups_forward(kv: torch.Tensor, score: torch.Tensor, ratio: int, overlap: bool, n: int,
                    prev: tuple[torch.Tensor, torch.Tensor] | None, ape: torch.Tensor | None, save_lse: bool):
    B, L, W2 = kv.shape
    d = W2 // 2 if overlap else W2
    out = torch.empty(B, n, d, dtype=torch.float32, device=kv.device)
    lse = torch.empty_like(out) if save_lse else out
    if n == 0:
        return out, lse
    pkv, psc = (t.float().contiguous() for t in prev) if prev is not None else (kv, kv)
    mp, block = _tile_sizes(ratio)
    _groups_pool_kernel[(B * n, triton.cdiv(d, block))](kv, score, kv if ape is None else ape, pkv, psc, out, lse, n,
                                                        L, d, ratio, W2, OVERLAP=overlap, HAS_PREV=prev is not None,
                                                        HAS_APE=ape is not None, SAVE_LSE=save_lse, MP=mp,
                                                        BLOCK_C=block, num_warps=4)
    return out, lse


def _reference_groups_backward(kv, score, ape, c, lse, dc, ratio, overlap, n):
    return reference_grads(lambda k, s, a: reference_compress_groups(k, s, ratio, overlap, n, None, a),
                           (kv, score, ape), dc)


@falls_back_to(_reference_groups_backward)
def _groups_backward(kv, score, ape, c, lse, dc, ratio, overlap, n):
    B, L, W2 = kv.shape
    d = c.shape[-1]
    dkv, dsc = torch.empty_like(kv), torch.empty_like(score)
    mp, block = _tile_sizes(ratio)
    _groups_pool_bwd_kernel[(B * triton.cdiv(L, ratio), triton.cdiv(d, block))](
        kv, score, kv if ape is None else ape, c, lse, dc.contiguous(), dkv, dsc, n, L, d, ratio, W2,
        OVERLAP=overlap, HAS_APE=ape is not None, MP=mp, BLOCK_C=block, num_warps=4)
    dape = None if ape is None else dsc[:, :n * ratio].reshape(B * n, ratio, W2).sum(0)
    return dkv, dsc, dape


class _CompressGroups(torch.autograd.Function):
    """Training (rows from position 0, no state): the pooling kernel keeps each channel's log-denominator, and the
    backward is one elementwise pass over the rows (the reference differentiates through its candidate copies)."""

    @staticmethod
    def forward(ctx, kv, score, ape, ratio, overlap, n):
        out, lse = _groups_forward(kv, score, ratio, overlap, n, None, ape, save_lse=True)
        ctx.save_for_backward(kv, score, ape, out, lse)
        ctx.args = ratio, overlap, n
        return out

    @staticmethod
    def backward(ctx, dc):
        return (*_groups_backward(*ctx.saved_tensors, dc, *ctx.args), None, None, None)


@falls_back_to(reference_compress_groups)
def compress_groups(kv: torch.Tensor, score: torch.Tensor, ratio: int, overlap: bool, n: int,
                    prev: tuple[torch.Tensor, torch.Tensor] | None = None, ape: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """Same contract as ops.reference.compressor.compress_groups; differentiable in kv, score and ape (without prev)."""
    kv, score = kv.float().contiguous(), score.float().contiguous()
    ape = None if ape is None else ape.float().contiguous()
    if autograd_tracks(kv, score, *(prev or ()), ape):
        if prev is not None:
            raise ValueError("compress_groups: no gradient through a state's previous group (training has no state)")
        return _CompressGroups.apply(kv, score, ape, ratio, overlap, n)
    return _groups_forward(kv, score, ratio, overlap, n, prev, ape, save_lse=False)[0]


def supports_groups(kv: torch.Tensor, score: torch.Tensor, ratio: int, overlap: bool, n: int,
                    prev: tuple[torch.Tensor, torch.Tensor] | None = None, ape: torch.Tensor | None = None) -> bool:
    """CUDA inference; training too (rows from position 0, a backward of its own) unless the Triton training
    kernels are turned off."""
    training = autograd_tracks(kv, score, *(prev or ()), ape)
    return kv.is_cuda and (not training or (prev is None and training_kernels_enabled()))

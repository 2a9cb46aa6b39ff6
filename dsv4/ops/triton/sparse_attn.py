"""Sparse attention over index lists with a per-head sink (forward; decode and prefill).

One program = one query token x a block of heads x a slice of the index list. It walks its slice in chunks of
BLOCK_K, gathers those K=V rows once for all heads of the block, and keeps an online softmax in fp32; the
sink joins the denominator at the end. Masked slots (index -1) contribute nothing. Rows are bf16 or fp32,
from one tensor or from two read in place (decode: the window ring and the cache's compressed entries, floats or
FP8 serving records decoded in the kernel).
With one slice per query (prefill: many queries fill the GPU) the program normalises and writes the output;
with several (decode: few queries, long lists) each writes its partial max / sum / accumulator and a
combine step merges them (split-K, "flash decoding").
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...quant.records import record_layout
from .launch import multiprocessors


@triton.jit
def _gather(kv_ptr, e8_ptr, e16_ptr, b, rows, valid, N, skv_b, skv_n, se_b, se_n, se16_b, se16_n,
            D: tl.constexpr, SECOND: tl.constexpr, FP8: tl.constexpr, NOPE: tl.constexpr, VALUES_AT: tl.constexpr,
            ROPE_AT: tl.constexpr, SCALE_AT: tl.constexpr, SCALE_BLOCK: tl.constexpr):
    """The listed rows [BLOCK_K, D]; rows >= N come from the second source: float rows, or FP8 serving records
    (NOPE e4m3 values at byte VALUES_AT, the bf16 rope values at bf16 element ROPE_AT, one UE8M0 scale per
    SCALE_BLOCK e4m3 values at byte SCALE_AT: dsv4.quant.records' layout), decoded per scale block: one scale
    load per block, and bf16 products (a power-of-two scale times an e4m3 value is exact in bf16)."""
    d = tl.arange(0, D)
    if SECOND:
        near = valid & (rows < N)
        far = valid & (rows >= N)
        near_at = kv_ptr + b * skv_b + tl.where(near, rows, 0)[:, None] * skv_n + d[None, :]
        r2 = tl.where(far, rows - N, 0)[:, None]
        if FP8:  # (one gather of the window rows with the rope values, as below, measured 1.2x slower here)
            kv = tl.load(near_at, mask=near[:, None], other=0.0)
            NB: tl.constexpr = D // SCALE_BLOCK
            blk = d.reshape(NB, SCALE_BLOCK)
            q8 = tl.load(e8_ptr + b * se_b + r2[:, :, None] * se_n + VALUES_AT + blk[None, :, :],
                         mask=far[:, None, None] & (blk[None, :, :] < NOPE), other=0)
            bi = tl.arange(0, NB)
            e = tl.load(e8_ptr + b * se_b + r2 * se_n + SCALE_AT + bi[None, :],
                        mask=far[:, None] & (bi[None, :] * SCALE_BLOCK < NOPE), other=127)
            sc = tl.exp2(e.to(tl.float32) - 127.0).to(kv.dtype)
            nope = (q8.to(tl.float8e4nv, bitcast=True).to(kv.dtype) * sc[:, :, None]).reshape(kv.shape[0], D)
            is_nope = d[None, :] < NOPE
            rope = tl.load(e16_ptr + b * se16_b + r2 * se16_n + ROPE_AT + (d[None, :] - NOPE),
                           mask=far[:, None] & ~is_nope, other=0.0)
            return tl.where(far[:, None], tl.where(is_nope, nope, rope).to(kv.dtype), kv)
        else:  # float entries: one gather, each row's pointer picked from the window rows or the entries
            return tl.load(tl.where(near[:, None], near_at, e16_ptr + b * se16_b + r2 * se16_n + d[None, :]),
                           mask=valid[:, None], other=0.0)
    return tl.load(kv_ptr + b * skv_b + tl.where(valid, rows, 0)[:, None] * skv_n + d[None, :],
                   mask=valid[:, None], other=0.0)


@triton.jit
def _sparse_attn_kernel(q_ptr, kv_ptr, sink_ptr, idx_ptr, o_ptr, m_ptr, l_ptr, scale,
                        S, H, K, N, k_per_split,
                        sq_b, sq_s, sq_h, skv_b, skv_n, si_b, si_s, so_b, so_s, so_h,
                        e8_ptr, e16_ptr, se_b, se_n, se16_b, se16_n,
                        D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
                        SECOND: tl.constexpr, FP8: tl.constexpr, NOPE: tl.constexpr, VALUES_AT: tl.constexpr,
                        ROPE_AT: tl.constexpr, SCALE_AT: tl.constexpr, SCALE_BLOCK: tl.constexpr):
    pid_t = tl.program_id(0)            # token: b * S + s
    pid_h = tl.program_id(1)
    pid_k = tl.program_id(2)
    b = (pid_t // S).to(tl.int64)       # int64 offsets: s * sq_s passes 2^31 at 128K tokens of 64 x 512 heads
    s = (pid_t % S).to(tl.int64)
    heads = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < H
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * sq_b + s * sq_s + heads[:, None] * sq_h + d[None, :], mask=hmask[:, None], other=0.0)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D], tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        rows = tl.load(idx_ptr + b * si_b + s * si_s + ks, mask=ks < k_hi, other=-1).to(tl.int64)
        valid = rows >= 0
        kv = _gather(kv_ptr, e8_ptr, e16_ptr, b, rows, valid, N, skv_b, skv_n, se_b, se_n, se16_b, se16_n,
                     D, SECOND, FP8, NOPE, VALUES_AT, ROPE_AT, SCALE_AT, SCALE_BLOCK)  # [BLOCK_K, D]
        sc = tl.dot(q, tl.trans(kv)).to(tl.float32) * scale                          # [BLOCK_H, BLOCK_K]
        sc = tl.where(valid[None, :], sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(sc - m_safe[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv).to(tl.float32)
        m = m_new
    if SPLIT:  # partial results: [tokens, splits, H] max and sum, [tokens, splits, H, D] unnormalised output
        part = (pid_t.to(tl.int64) * tl.num_programs(2) + pid_k) * H + heads
        tl.store(m_ptr + part, m, mask=hmask)
        tl.store(l_ptr + part, l, mask=hmask)
        tl.store(o_ptr + part[:, None] * D + d[None, :], acc, mask=hmask[:, None])
    else:
        sink = tl.load(sink_ptr + heads, mask=hmask, other=0.0).to(tl.float32)
        m_fin = tl.maximum(m, sink)
        corr = tl.exp(m - m_fin)
        den = l * corr + tl.exp(sink - m_fin)
        out = acc * (corr / den)[:, None]
        tl.store(o_ptr + b * so_b + s * so_s + heads[:, None] * so_h + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=hmask[:, None])


@triton.jit
def _merge_kernel(o_ptr, m_ptr, l_ptr, sink_ptr, out_ptr, H, SPLITS: tl.constexpr, D: tl.constexpr,
                  BLOCK_H: tl.constexpr):
    """Merge a query's slices: each slice's sum and output rescaled to the common max, the sink in the denominator."""
    t = tl.program_id(0).to(tl.int64)  # (int64 offsets: t * SPLITS * H * D)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = heads < H
    d = tl.arange(0, D)
    sink = tl.load(sink_ptr + heads, mask=hm, other=0.0)
    m_all = sink
    for s in range(SPLITS):
        m_all = tl.maximum(m_all, tl.load(m_ptr + (t * SPLITS + s) * H + heads, mask=hm, other=float("-inf")))
    den = tl.exp(sink - m_all)
    acc = tl.zeros([BLOCK_H, D], tl.float32)
    for s in range(SPLITS):
        part = (t * SPLITS + s) * H + heads
        w = tl.exp(tl.load(m_ptr + part, mask=hm, other=float("-inf")) - m_all)     # 0 for empty slices
        den += tl.load(l_ptr + part, mask=hm, other=0.0) * w
        acc += tl.load(o_ptr + part[:, None] * D + d[None, :], mask=hm[:, None], other=0.0) * w[:, None]
    tl.store(out_ptr + (t * H + heads[:, None]) * D + d[None, :], (acc / den[:, None]).to(out_ptr.dtype.element_ty),
             mask=hm[:, None])


def sparse_attn(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, idx: torch.Tensor, scale: float,
                entries: torch.Tensor | None = None, rope_dim: int = 0,
                splits: int | None = None, block_h: int | None = None, num_warps: int | None = None,
                block_k: int | None = None, num_stages: int | None = None, invariant: bool = False) -> torch.Tensor:
    """Same contract as ops.reference.sparse_attn.sparse_attn: q [B,S,H,D], kv [B,N,D], sink [H], idx [B,S,K];
    entries ([B, n, D] floats or [B, n, record] uint8 FP8 serving records) are rows N.., read where they are.

    splits: index-list slices per query (default: enough programs to fill the GPU); block_h / num_warps:
    heads per program and warps, block_k / num_stages: index-list rows per step and pipeline depth (defaults
    tuned on H100 and H200 for D = 512). invariant: one configuration and unsplit lists whatever the number of
    queries in the launch, so a query's arithmetic does not depend on its batch (batch-invariant mode)."""
    B, S, H, D = q.shape
    if D & (D - 1) or D < 16:
        raise ValueError(f"triton sparse_attn needs a power-of-two head dim >= 16, got {D}")
    # an FP8 record's parts (dsv4.quant.records): the kernel decodes the e4m3 values one scale block at a time
    lay = record_layout("fp8", "kv", D, rope_dim) if entries is not None and entries.dtype == torch.uint8 else None
    if lay is not None and D % lay.scale_block:
        raise ValueError(f"triton sparse_attn reads FP8 records in {lay.scale_block}-value blocks: head dim {D} "
                         f"is not a multiple of {lay.scale_block}")
    if lay is not None and entries.shape[-1] != lay.nbytes:
        raise ValueError(f"FP8 KV records for head dim {D}, rope {rope_dim} are {lay.nbytes} bytes, "
                         f"entries have {entries.shape[-1]}")
    if kv.dtype != q.dtype:
        kv = kv.to(q.dtype)
    q = q.contiguous()
    if kv.stride(-1) != 1:
        kv = kv.contiguous()
    idx = idx.contiguous()  # int32 or int64 lists are read as they are (a cast is one more kernel per layer)
    K = idx.shape[-1]
    T = B * S
    # measured on H100 at D = 512 (bench/kernels.py sweep): batch-1 decode runs fastest as many small programs
    # (16 heads x 4 warps, 32 rows per step, split-K); batched decode (16-256 queries) and prefill with all 64
    # heads of a query per program (each gathered row read once, 8 warps), batched decode in 64-row steps (one
    # source) or 32-row steps three deep (window rows + cached entries: on an H200, 1.5x the default two-deep)
    few = T < 16
    batched = 16 <= T <= 256 and D >= 256
    if invariant:  # one configuration whatever the number of queries in the launch
        few, batched = False, False
    block_h = block_h or max(16, min(triton.next_power_of_2(H), 16 if few else 64))
    num_warps = num_warps or (4 if few or D < 256 else 8)
    # (32-row steps where cached entries are read: 64 exceeded the shared memory with their separate gathers)
    block_k = block_k or (64 if (batched and entries is None) or D < 256 else 32)
    num_stages = num_stages or (3 if batched and entries is not None else 2)
    n_h = triton.cdiv(H, block_h)
    if splits is None and invariant:
        splits = 1  # how the lists split must not depend on how many queries share the launch
    if splits is None:  # split the lists only when the programs cannot fill half the GPU (decode): batch-1 in
        sms = multiprocessors(q.device)  # two waves of programs, batched decode in one (more slices measured slower)
        if 2 * T * n_h > sms:
            splits = 1
        elif batched:
            splits = max(1, min(sms // (T * n_h), K // (2 * block_k)))
        else:
            splits = max(1, min(triton.cdiv(2 * sms, T * n_h), K // (4 * block_k)))
    per = triton.cdiv(triton.cdiv(K, splits), block_k) * block_k
    splits = triton.cdiv(K, per) if K else 1
    if splits > 1:
        o_part = torch.empty(T, splits, H, D, dtype=torch.float32, device=q.device)
        m_part = torch.empty(T, splits, H, dtype=torch.float32, device=q.device)
        l_part = torch.empty_like(m_part)
        o, m_ptr, l_ptr = o_part, m_part, l_part
    else:
        o = torch.empty_like(q)
        m_ptr = l_ptr = o
    if entries is not None and entries.dtype != torch.uint8 and T > 256:
        # many queries: a second masked gather per chunk costs more than one copy of the entries next to the rows
        kv, entries = torch.cat((kv, entries.to(kv.dtype)), 1), None
    fp8 = lay is not None
    # where the record's parts sit, in bytes (the rope values in bf16 elements: the kernel reads them through a
    # bf16 view); unused without FP8 records
    at = dict(NOPE=0, VALUES_AT=0, ROPE_AT=0, SCALE_AT=0, SCALE_BLOCK=64) if lay is None else \
        dict(NOPE=lay.quant_dims, VALUES_AT=lay.values[0], ROPE_AT=lay.rope[0] // 2, SCALE_AT=lay.scales[0],
             SCALE_BLOCK=lay.scale_block)
    if entries is None:
        ent = (kv, kv, 0, 0, 0, 0)
    else:
        e8 = entries if entries.stride(-1) == 1 else entries.contiguous()
        if not fp8 and e8.dtype != q.dtype:
            e8 = e8.to(q.dtype)
        # FP8 records: the same bytes viewed as bf16 for the rope values (a prefix view: no copy)
        e16 = e8.view(torch.bfloat16) if fp8 else e8
        ent = (e8, e16, e8.stride(0), e8.stride(1), e16.stride(0), e16.stride(1))
    _sparse_attn_kernel[(T, n_h, splits)](
        q, kv, sink.float().contiguous(), idx, o, m_ptr, l_ptr, scale, S, H, K, kv.shape[1], per,
        q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), idx.stride(0), idx.stride(1),
        o.stride(0), o.stride(1), o.stride(2), *ent, D=D, BLOCK_H=block_h, BLOCK_K=block_k, SPLIT=splits > 1,
        SECOND=entries is not None, FP8=fp8, **at, num_warps=num_warps, num_stages=num_stages)
    if splits == 1:
        return o
    out = torch.empty(B, S, H, D, dtype=q.dtype, device=q.device)
    _merge_kernel[(T, triton.cdiv(H, 16))](o_part, m_part, l_part, sink.float().contiguous(), out, H, SPLITS=splits,
                                           D=D, BLOCK_H=16, num_warps=4)
    return out


def supports(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, idx: torch.Tensor, scale: float,
             entries: torch.Tensor | None = None, rope_dim: int = 0) -> bool:
    D = q.shape[-1]
    fp8_records = entries is not None and entries.dtype == torch.uint8
    return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and D >= 16 and not D & (D - 1) and D <= 512 \
        and (not fp8_records or D >= 64 and torch.cuda.get_device_capability(q.device) >= (8, 9))  # e4m3: sm_89+

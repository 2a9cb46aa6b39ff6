"""Whole-sequence V4 attention for training: fused forward and backward kernels (FlashAttention-style).

Same contract as ops.reference.sequence_attn: each query sees the K=V rows of its last `window` positions and
the compressed entries its mask row allows, in one softmax with a per-head sink. The reference builds fp32
scores [queries, heads, window + all entries] and differentiates through them; here nothing of that size
exists. Forward: one program = one query token x a block of heads (MQA: all heads share the rows, so each row
is read once per token for the whole block), an online softmax over the window rows then the entries up to
the token's last visible one; it keeps the log-sum-exp for the backward. Backward (the usual recomputation):
  dQ   one program per token x head block, the same walk as the forward;
  dKV  one program per block of rows (window rows, then entries) walking the tokens that can see them, summing
       P^T dO + scale * dS^T Q over tokens and heads (K = V: both terms land on the same row); long token
       ranges are split over several programs whose fp32 partial sums are added afterwards (no atomics: the
       result does not depend on scheduling). With entry lists (long sequences) the entries' share is added
       atomically by the dQ programs instead;
  sink the sink is one more logit in each softmax: d sink_h = -sum_tokens p_sink * delta.
Products take bf16 operands with fp32 accumulation; P and dS are rounded to bf16 for the second products, as in
FlashAttention. The entry probabilities summed over heads (the indexer's KL target) come from a second pass
over the entries once the log-sum-exp is known. Up to ~8K tokens the entries are walked densely with the mask;
longer sequences walk each token's list of visible entries instead (see DENSE_WALK_PAIRS).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .launch import multiprocessors, training_kernels_enabled


@triton.jit
def _scores(q, rows, ok, scale):
    """[BLOCK_H, BLOCK_K] fp32 scores of a head block against a chunk of rows; -inf where a row is not visible."""
    sc = tl.dot(q, tl.trans(rows)).to(tl.float32) * scale
    return tl.where(ok[None, :], sc, float("-inf"))


@triton.jit
def _online(q, rows, ok, scale, m, l, acc):
    """One chunk of rows into a running softmax: max m, sum l, unnormalised output acc."""
    sc = _scores(q, rows, ok, scale)
    m_new = tl.maximum(m, tl.max(sc, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    p = tl.exp(sc - m_safe[:, None])
    return m_new, l * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(rows.dtype), rows).to(tl.float32)


@triton.jit
def _window_chunk(kv_ptr, b, s, S, j0, D: tl.constexpr, BLOCK_K: tl.constexpr):
    """Window rows j0 .. j0+BLOCK_K-1 of sequence b for the query at s: (visible, rows)."""
    js = j0 + tl.arange(0, BLOCK_K)
    ok = js <= s
    d = tl.arange(0, D)
    return ok, tl.load(kv_ptr + (b * S + js)[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)


@triton.jit
def _entry_chunk(e_ptr, sel_ptr, t, b, n0, n_hi, N, K, D: tl.constexpr, BLOCK_K: tl.constexpr, LISTS: tl.constexpr):
    """The token's entries at walk positions n0 .. n0+BLOCK_K-1: (entry ids, visible, rows). The walk runs over
    all entries up to the last visible one with the mask row (sel = mask [B, S, N]), or over the token's list
    of visible entries (sel = lists [B, S, K], -1 padded)."""
    slots = n0 + tl.arange(0, BLOCK_K)
    live = slots < n_hi
    if LISTS:
        ids = tl.load(sel_ptr + t.to(tl.int64) * K + slots, mask=live, other=-1)
        ok = ids >= 0
    else:
        ids = slots
        ok = tl.load(sel_ptr + t.to(tl.int64) * N + slots, mask=live, other=0) != 0
    d = tl.arange(0, D)
    rows = tl.load(e_ptr + (b * N + tl.where(ok, ids, 0))[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
    return ids, ok, rows


@triton.jit
def _fwd_kernel(q_ptr, kv_ptr, e_ptr, sel_ptr, nhi_ptr, sink_ptr, o_ptr, lse_ptr, mass_ptr, scale, S, H, N, K, W,
                D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, HAS_E: tl.constexpr,
                LISTS: tl.constexpr, WANT_MASS: tl.constexpr):
    t = tl.program_id(0)                # token: b * S + s
    pid_h = tl.program_id(1)
    b = t // S
    s = t % S
    heads = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = heads < H
    d = tl.arange(0, D)
    at = (t.to(tl.int64) * H + heads[:, None]) * D + d[None, :]     # int64: B*S*H*D passes 2^31 at 64K tokens
    q = tl.load(q_ptr + at, mask=hm[:, None], other=0.0)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D], tl.float32)
    for j0 in range(tl.maximum(s - W + 1, 0), s + 1, BLOCK_K):      # the window: positions s-W+1 .. s
        ok, rows = _window_chunk(kv_ptr, b, s, S, j0, D, BLOCK_K)
        m, l, acc = _online(q, rows, ok, scale, m, l, acc)
    n_hi = 0
    if HAS_E:
        n_hi = tl.load(nhi_ptr + t)                                  # the walk's length for this token
        for n0 in range(0, n_hi, BLOCK_K):
            _, ok, rows = _entry_chunk(e_ptr, sel_ptr, t, b, n0, n_hi, N, K, D, BLOCK_K, LISTS)
            m, l, acc = _online(q, rows, ok, scale, m, l, acc)
    sink = tl.load(sink_ptr + heads, mask=hm, other=0.0)
    m_fin = tl.maximum(m, sink)
    corr = tl.exp(m - m_fin)
    den = l * corr + tl.exp(sink - m_fin)
    tl.store(o_ptr + at, (acc * (corr / den)[:, None]).to(o_ptr.dtype.element_ty), mask=hm[:, None])
    lse = m_fin + tl.log(den)
    tl.store(lse_ptr + t * H + heads, lse, mask=hm)
    if WANT_MASS:  # each entry's probability summed over this block's heads: [head blocks, B*S, N]
        for n0 in range(0, n_hi, BLOCK_K):
            ids, ok, rows = _entry_chunk(e_ptr, sel_ptr, t, b, n0, n_hi, N, K, D, BLOCK_K, LISTS)
            p = tl.where(hm[:, None], tl.exp(_scores(q, rows, ok, scale) - lse[:, None]), 0.0)
            tl.store(mass_ptr + (pid_h * tl.num_programs(0) + t).to(tl.int64) * N + ids, tl.sum(p, 0), mask=ok)


@triton.jit
def _dq_kernel(q_ptr, kv_ptr, e_ptr, sel_ptr, nhi_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, de_ptr, scale,
               S, H, N, K, W, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, HAS_E: tl.constexpr,
               LISTS: tl.constexpr):
    """dQ of a token's head block; with lists, also its share of the entries' gradient (atomic fp32 adds)."""
    t = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    b = t // S
    s = t % S
    hm = heads < H
    d = tl.arange(0, D)
    at = (t.to(tl.int64) * H + heads[:, None]) * D + d[None, :]
    q = tl.load(q_ptr + at, mask=hm[:, None], other=0.0)
    do = tl.load(do_ptr + at, mask=hm[:, None], other=0.0)
    lse = tl.load(lse_ptr + t * H + heads, mask=hm, other=0.0)
    delta = tl.load(delta_ptr + t * H + heads, mask=hm, other=0.0)
    dq = tl.zeros([BLOCK_H, D], tl.float32)
    for j0 in range(tl.maximum(s - W + 1, 0), s + 1, BLOCK_K):
        ok, rows = _window_chunk(kv_ptr, b, s, S, j0, D, BLOCK_K)
        p = tl.exp(_scores(q, rows, ok, scale) - lse[:, None])
        ds = p * (tl.dot(do, tl.trans(rows)).to(tl.float32) - delta[:, None])
        dq += tl.dot(ds.to(rows.dtype), rows).to(tl.float32)
    if HAS_E:
        n_hi = tl.load(nhi_ptr + t)
        for n0 in range(0, n_hi, BLOCK_K):
            ids, ok, rows = _entry_chunk(e_ptr, sel_ptr, t, b, n0, n_hi, N, K, D, BLOCK_K, LISTS)
            p = tl.exp(_scores(q, rows, ok, scale) - lse[:, None])
            ds = p * (tl.dot(do, tl.trans(rows)).to(tl.float32) - delta[:, None])
            dq += tl.dot(ds.to(rows.dtype), rows).to(tl.float32)
            if LISTS:  # K = V: (P^T dO + scale * dS^T Q) onto the listed rows, computed transposed [D, BLOCK_K]
                de = tl.dot(tl.trans(do), p.to(rows.dtype)).to(tl.float32) \
                    + tl.dot(tl.trans(q), (ds * scale).to(rows.dtype)).to(tl.float32)
                tl.atomic_add(de_ptr + (b * N + tl.where(ok, ids, 0))[None, :] * D + d[:, None], de, mask=ok[None, :],
                              sem="relaxed")
    tl.store(dq_ptr + at, (dq * scale).to(dq_ptr.dtype.element_ty), mask=hm[:, None])


@triton.jit
def _drows_kernel(q_ptr, rows_ptr, mask_ptr, first_ptr, do_ptr, lse_ptr, delta_ptr, out_ptr, scale, S, H, R, W,
                  D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, ENTRIES: tl.constexpr):
    """d(rows) of one block of rows (window rows, or entries) summed over the tokens of this program's split."""
    n_blocks = tl.cdiv(R, BLOCK_K)
    b = tl.program_id(0) // n_blocks
    r0 = (tl.program_id(0) % n_blocks) * BLOCK_K
    rs = r0 + tl.arange(0, BLOCK_K)
    rm = rs < R
    d = tl.arange(0, D)
    rows = tl.load(rows_ptr + (b * R + rs)[:, None] * D + d[None, :], mask=rm[:, None], other=0.0)
    if ENTRIES:  # tokens from the first that sees any entry of the block
        s_lo = tl.min(tl.load(first_ptr + b * R + rs, mask=rm, other=S))
        s_hi = S
    else:        # the window: row j is seen by tokens j .. j+W-1
        s_lo = r0
        s_hi = tl.minimum(S, r0 + BLOCK_K - 1 + W)
    per = tl.cdiv(tl.maximum(s_hi - s_lo, 0), tl.num_programs(1))
    s_a = s_lo + tl.program_id(1) * per
    s_b = tl.minimum(s_hi, s_a + per)
    # the gradient accumulates transposed, [D, BLOCK_K]: every product then has the heads (BLOCK_H) or the
    # head dim (D) as its M side, sizes the Hopper tensor-core instructions take
    acc = tl.zeros([D, BLOCK_K], tl.float32)
    for s in range(s_a, s_b):
        t = b * S + s
        if ENTRIES:
            vis = tl.load(mask_ptr + t.to(tl.int64) * R + rs, mask=rm, other=0) != 0
        else:
            vis = rm & (rs <= s) & (rs > s - W)
        for h0 in range(0, H, BLOCK_H):
            heads = h0 + tl.arange(0, BLOCK_H)
            hm = heads < H
            at = (t.to(tl.int64) * H + heads[:, None]) * D + d[None, :]
            q = tl.load(q_ptr + at, mask=hm[:, None], other=0.0)
            do = tl.load(do_ptr + at, mask=hm[:, None], other=0.0)
            lse = tl.load(lse_ptr + t * H + heads, mask=hm, other=0.0)
            delta = tl.load(delta_ptr + t * H + heads, mask=hm, other=0.0)
            sc = tl.dot(q, tl.trans(rows)).to(tl.float32) * scale                          # [BLOCK_H, BLOCK_K]
            p = tl.where(hm[:, None] & vis[None, :], tl.exp(sc - lse[:, None]), 0.0)
            ds = p * (tl.dot(do, tl.trans(rows)).to(tl.float32) - delta[:, None]) * scale
            acc += tl.dot(tl.trans(do), p.to(rows.dtype)).to(tl.float32) \
                + tl.dot(tl.trans(q), ds.to(rows.dtype)).to(tl.float32)
    # int64: [splits, B, R, D] partial sums can pass 2^31 elements (many splits of long rows, or B > 1)
    at = ((tl.program_id(1).to(tl.int64) * (R * (tl.num_programs(0) // n_blocks))) + b * R + rs)[None, :] * D \
        + d[:, None]
    tl.store(out_ptr + at, acc, mask=rm[None, :])


# (heads per program, rows per step, warps, pipeline stages), largest first: all heads of a token up to 64 (rows
# read once per token). A launch that exceeds the GPU's shared memory or registers falls back to the next one.
_CONFIGS = ((64, 32, 8, 2), (64, 16, 8, 1), (32, 16, 4, 1), (16, 16, 4, 1))
# the row gradients: chosen by bench/train_attn_sweep.py on the H100 (4K, 64 heads x 512; CSA / HCA fwd+bwd ms):
# (32, 64, 8, 1) 17.9 / 7.5, (32, 16, 4, 2) 19.3 / 6.5, the shared list's fallback (64, 16, 8, 1) ~30 / ~7;
# (64, 32, 8, 2) and (64, 16, 8, 2) exceed shared memory there, and (64, 32, 8, 1) faulted (illegal address)
_DROWS_CONFIGS = ((32, 64, 8, 1), (32, 16, 4, 2), (16, 16, 4, 1))
CONFIGS = {"_fwd_kernel": _CONFIGS, "_dq_kernel": _CONFIGS, "_drows_kernel": _DROWS_CONFIGS}  # sweeps set these
_chosen: dict[tuple, int] = {}


def _launch(kernel, launch, H: int, D: int, **flags):
    """Run `kernel` with the first configuration (from the remembered one on) that fits this GPU.
    launch(heads per program, rows per step) -> (grid, arguments, result); returns that result."""
    key = (kernel.fn.__name__, H, D, tuple(sorted(flags.items())))
    configs = CONFIGS.get(kernel.fn.__name__, _CONFIGS)
    first = max(16, min(64, triton.next_power_of_2(H)))
    start = _chosen.get(key, next((i for i, c in enumerate(configs) if c[0] <= first), 0))
    for i in range(start, len(configs)):
        block_h, block_k, warps, stages = configs[i]
        grid, args, result = launch(block_h, block_k)
        try:
            kernel[grid](*args, D=D, BLOCK_H=block_h, BLOCK_K=block_k, num_warps=warps, num_stages=stages, **flags)
        except OutOfResources:
            continue
        _chosen[key] = i
        return result
    raise RuntimeError(f"triton sequence_attn: no configuration of {key[0]} fits this GPU (H={H}, D={D})")


def _splits(programs: int, tokens: int, device: torch.device, splits: int | None) -> int:
    """Token-range splits of the row-gradient programs: enough programs for two waves on the GPU."""
    if splits is not None:
        return splits
    sms = multiprocessors(device)
    return max(1, min(-(-2 * sms // max(programs, 1)), tokens // 64, 32))


def _row_grads(q, rows, mask_u8, first, do, lse, delta, scale, S, H, W, entries: bool, splits: int | None):
    B, R, D = rows.shape
    n_split = _splits(B * triton.cdiv(R, 32), S, q.device, splits)
    part = torch.empty(n_split, B, R, D, dtype=torch.float32, device=q.device)
    _launch(_drows_kernel, lambda bh, bk: ((B * triton.cdiv(R, bk), n_split),
            (q, rows, mask_u8, first, do, lse, delta, part, scale, S, H, R, W), None), H, D, ENTRIES=entries)
    return part.sum(0) if n_split > 1 else part[0]


def _visibility_bounds(mask_u8: torch.Tensor, rows_per_step: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """From the entry mask [B, S, N]: each token's last visible entry + 1 [B, S] (the forward's and dQ's walk
    stops there) and each entry's first token that sees it, S if none [B, N] (where its gradient walk starts).
    In steps of query rows, so no [B, S, N] temporary wider than the mask exists at long contexts."""
    B, S, N = mask_u8.shape
    ar = torch.arange(1, N + 1, device=mask_u8.device, dtype=torch.int32)
    n_hi = torch.cat([(mask_u8[:, a:a + rows_per_step] * ar).amax(-1) for a in range(0, S, rows_per_step)], 1)
    first = torch.where(mask_u8.amax(1) > 0, mask_u8.argmax(1), S)
    return n_hi.to(torch.int32).contiguous(), first.to(torch.int32).contiguous()


def _entry_lists(mask: torch.Tensor, rows_per_step: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's visible entries as a list [B, S, K] int32 (ascending, -1 padded; K = the most any token
    sees) and the list lengths [B, S]. In steps of query rows, so nonzero's index triples stay small."""
    B, S, N = mask.shape
    counts = mask.sum(-1, dtype=torch.int32)
    K = max(int(counts.max()), 1)
    lists = torch.full((B, S, K), -1, dtype=torch.int32, device=mask.device)
    for a in range(0, S, rows_per_step):
        part = mask[:, a:a + rows_per_step]
        b, s, n = part.nonzero(as_tuple=True)                       # row-major: each row's entries in order
        c = counts[:, a:a + rows_per_step].flatten()
        row = b * part.shape[1] + s
        slot = torch.arange(n.numel(), device=mask.device) - (torch.cumsum(c, 0) - c)[row]
        lists[b, a + s, slot] = n.to(torch.int32)
    return lists, counts


@triton.jit
def _row_dots_kernel(a_ptr, b_ptr, out_ptr, n_rows, D: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = rows < n_rows
    at = rows.to(tl.int64)[:, None] * D + tl.arange(0, D)[None, :]
    a = tl.load(a_ptr + at, mask=rm[:, None], other=0.0).to(tl.float32)
    b = tl.load(b_ptr + at, mask=rm[:, None], other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, tl.sum(a * b, 1), mask=rm)


def _row_dots(do: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """delta = sum_d dO * O per token and head [B, S, H], fp32 sums of the bf16 operands read where they are (the
    eager product made fp32 copies of both: 4 ms of a 4K-token V4-Flash step, 8 GB each at 64K tokens)."""
    B, S, H, D = o.shape
    delta = torch.empty(B, S, H, dtype=torch.float32, device=o.device)
    n_rows = B * S * H
    _row_dots_kernel[(triton.cdiv(n_rows, 16),)](do.contiguous(), o.contiguous(), delta, n_rows, D=D, BLOCK_R=16,
                                                num_warps=4)
    return delta


class _SequenceAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, entries, entry_mask, sink, scale, window, want_mass, splits, lists):
        B, S, H, D = q.shape
        has_e = entries is not None and entries.shape[1] > 0
        ctx.dtypes = kv.dtype, None if entries is None else entries.dtype, sink.dtype  # of the gradients
        q, kv = q.contiguous(), kv.to(q.dtype).contiguous()
        N = entries.shape[1] if has_e else 0
        if lists is None:
            lists = S * N > DENSE_WALK_PAIRS
        lists = lists and has_e
        K, first = 0, None
        if has_e:
            entries = entries.to(q.dtype).contiguous()
            if lists:
                sel, n_hi = _entry_lists(entry_mask)
                K = sel.shape[-1]
            else:
                sel = entry_mask.contiguous().view(torch.uint8)
                n_hi, first = _visibility_bounds(sel)
        else:
            entries = sel = n_hi = kv  # unused (HAS_E = False)
        o = torch.empty_like(q)
        lse = torch.empty(B, S, H, dtype=torch.float32, device=q.device)
        want_mass = want_mass and has_e
        sink32 = sink.float().contiguous()

        def launch(bh: int, bk: int):  # entry probabilities: one partial sum per head block
            n_h = triton.cdiv(H, bh)
            mass = torch.zeros(n_h, B * S, N, dtype=torch.float32, device=q.device) if want_mass else lse
            return (B * S, n_h), (q, kv, entries, sel, n_hi, sink32, o, lse, mass, scale, S, H, N, K, window), mass
        mass = _launch(_fwd_kernel, launch, H, D, HAS_E=has_e, LISTS=lists, WANT_MASS=want_mass)
        ctx.save_for_backward(q, kv, entries if has_e else None, sel if has_e else None,
                              n_hi if has_e else None, first, sink32, o, lse)
        ctx.scale, ctx.window, ctx.splits, ctx.lists = scale, window, splits, lists
        if not want_mass:
            return o, None
        mass = (mass.sum(0) if mass.shape[0] > 1 else mass[0]).view(B, S, N)
        ctx.mark_non_differentiable(mass)
        return o, mass

    @staticmethod
    def backward(ctx, do, _dmass):
        q, kv, entries, sel, n_hi, first, sink, o, lse = ctx.saved_tensors
        B, S, H, D = q.shape
        has_e, lists = entries is not None, ctx.lists
        N = entries.shape[1] if has_e else 0
        K = sel.shape[-1] if lists else 0
        do = do.to(q.dtype).contiguous()
        delta = _row_dots(do, o)                                                         # [B, S, H]
        dq = torch.empty_like(q)
        de = torch.zeros(B, N, D, dtype=torch.float32, device=q.device) if lists else None
        e_args = (entries, sel, n_hi) if has_e else (kv, kv, kv)
        _launch(_dq_kernel, lambda bh, bk: ((B * S, triton.cdiv(H, bh)), (
                q, kv, *e_args, do, lse, delta, dq, dq if de is None else de, ctx.scale, S, H, N, K, ctx.window),
                None), H, D, HAS_E=has_e, LISTS=lists)
        dkv = _row_grads(q, kv, kv, kv, do, lse, delta, ctx.scale, S, H, ctx.window, False, ctx.splits)
        if has_e and not lists:
            de = _row_grads(q, entries, sel, first, do, lse, delta, ctx.scale, S, H, ctx.window, True, ctx.splits)
        dsink = -(torch.exp(sink - lse) * delta).sum((0, 1))
        kv_dtype, e_dtype, sink_dtype = ctx.dtypes
        return (dq, dkv.to(kv_dtype), None if de is None else de.to(e_dtype), None, dsink.to(sink_dtype),
                None, None, None, None, None)


def sequence_attn(q: torch.Tensor, kv: torch.Tensor, entries: torch.Tensor | None, entry_mask: torch.Tensor | None,
                  sink: torch.Tensor, scale: float, window: int, return_entry_probs: bool = False,
                  splits: int | None = None, lists: bool | None = None):
    """Same contract as ops.reference.sequence_attn (o [B,S,H,D], entry probabilities [B,S,N] or None), with
    gradients for q, kv, entries and sink. splits: token-range splits of the row-gradient programs (default:
    enough programs to fill the GPU). lists: walk each token's list of visible entries, their gradients added
    atomically (default: beyond DENSE_WALK_PAIRS (query, entry) pairs), instead of the masked dense walk."""
    B, S, H, D = q.shape
    if D & (D - 1) or D < 16 or D > 512:
        raise ValueError(f"triton sequence_attn needs a power-of-two head dim in [16, 512], got {D}")
    if entries is not None and (entry_mask is None or entry_mask.shape != (B, S, entries.shape[1])):
        raise ValueError(f"sequence_attn: entries {tuple(entries.shape)} need an entry_mask [B, S, N], got "
                         f"{None if entry_mask is None else tuple(entry_mask.shape)}")
    window = min(window, S)
    return _SequenceAttn.apply(q, kv, entries, entry_mask, sink, scale, window, return_entry_probs, splits, lists)


# (query, entry) pairs up to which the entries are walked densely with the mask (deterministic gradients): each
# token's program streams every entry up to its last visible one, and each block of entries re-reads every later
# token's q and dO (64 heads x 512 dims: 128 KB per token), traffic that stays in L2 at 4K-8K tokens. Beyond,
# each token walks its list of visible entries (CSA: its top-k) and adds its share of their gradients atomically:
# work linear in the sequence, gradient sums in a run-dependent order (fp32 rounding differences only).
DENSE_WALK_PAIRS = 1 << 25


def supports(q: torch.Tensor, kv: torch.Tensor, entries, entry_mask, sink, scale, window,
             return_entry_probs=False) -> bool:
    """CUDA bf16/fp16, power-of-two head dim <= 512, when the Triton training kernels are opted into."""
    D = q.shape[-1]
    return (training_kernels_enabled() and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
            and 16 <= D <= 512 and not D & (D - 1))

"""Routed SwiGLU experts over FP4 weights (the official checkpoints' e2m1 experts with 1x32 UE8M0 scales), read as
bytes and dequantised in registers (ops/triton/packed_linear.py says how).

Up to DIRECT_MAX_PAIRS (token, slot) pairs (decode), each pair gets its own programs and nothing is sorted, and
K is split across programs (direct_split) as the FP8 decode GEMMs split it: fp32 partial sums per K slice, and the
program that finishes an output tile last adds the slices in slice order and applies the epilogue (deterministic,
one launch, no host reads); beyond, the pairs are sorted by expert on the device; one program per (used expert, block of output rows)
walks that expert's rows in 16- or 64-row tiles, so every expert's weights are read once per tile of its tokens, experts
without tokens get no program, and nothing waits on the host (CUDA-graph capturable). Two kernels:
gate/up (w1 and w3 in one pass, clamped SwiGLU and routing weight fused) and down (w2); the k slot outputs of a
token are then summed in fp32 in slot order (experts.slot_sum), as the reference sums them.

With EXPERT_SWAP, from SWAP_MIN_PAIRS pairs per expert, the sorted pairs run on the swapped-operand kernels
instead (_swap_gate_up_kernel, _swap_down_kernel): each program computes out^T = W[rows] @ X^T for 64 (SWAP_BLOCK_W) weight rows and a tile of
16-64 of its expert's pairs, the decoded weights the tl.dot's left operand, which Hopper's wgmma reads from
registers, and the pairs' activations the right one, the only operand in shared memory (fp4_swap_tile says how
the weight tile reaches the wgmma register layout without a shared-memory round trip; the activations are read
in the matching K order, swap_order). They can split K as the direct kernels do (SWAP_SPLIT, swap_splits): each
(used expert, weight-row block) program becomes SPLIT programs over K slices, and the last one of each tile sums
the slices' fp32 partials in slice order before the epilogue (for gate/up: before the SwiGLU).

From EXPERT_DEQUANT_MIN_PAIRS (token, slot) pairs per expert on average (prefill), the experts are instead
dequantised into a bf16 scratch stack (packed_dequant.py) and run by the bf16 experts op (ops.moe_experts: grouped
CUTLASS GEMMs on Hopper), at most EXPERT_SCRATCH_BYTES of experts at a time.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ...quant.packed import Fp4GroupWeight
from ..api import moe_experts as moe_experts_dense
from ..pair_order import pair_order
from ..reference import packed as ref
from .experts import slot_sum
from .launch import falls_back_to, interpreted, multiprocessors
from . import packed_linear
from .packed_bits import e2m1_as_fp16, ue8m0_values
from .packed_dequant import dequant_fp4
from .packed_linear import (FP4_STEP, MAX_SPLIT, fp4_dot_step, fp4_gemv_dot, split_pair_sums, store_split,
                            swiglu_tile, tile_tickets)

# Pairs per expert (on average over all E) from which the experts are dequantised to bf16 and run by the dense
# experts op. Dequantising one expert's three matrices moves 2.5 bytes per weight (FP4 read, bf16 written) and the
# bf16 GEMMs then read 2: ~47 us per V4-Flash expert (25M weights) at 2.4 TB/s, flat up to the ~250 tokens where
# a bf16 expert turns compute-bound. The swapped register kernels (EXPERT_SWAP) cost per tile of 64 of an expert's
# pairs: on an H100 (bench/native_gemm.py --experts-swap, 16 V4-Flash experts, k = 6) a layer took 327 us at 24
# pairs per expert and 566 us at 65 (two tiles), where the dequantised path took 1,225 us; at ~4 tiles the two
# meet. 128 keeps every decode batch and the small prefill chunks on the register kernels.
EXPERT_DEQUANT_MIN_PAIRS = 128
# (token, slot) pairs up to which each pair gets its own programs, in place (decode: batch 1-2 at k = 6), instead
# of sorting the pairs by expert on the device: the sort is ~20 small launches (argsort, counts, cumsums, scatters:
# tens of us per layer even inside a CUDA graph, more than the few us of one V4-Flash FP4 expert's 12.6 MB it
# saves rereading when two pairs share an expert; 16 pairs over 16 experts share ~6).
DIRECT_MAX_PAIRS = 16
EXPERT_SCRATCH_BYTES = 2 << 30  # bf16 experts dequantised at once at most (V4-Flash: 40 of its 256 experts)
# Programs per SM that the direct (decode) kernels' K split aims for (direct_split); 0 turns the split off. At
# batch 1 of V4-Flash (6 pairs) gate/up has 6 x 64 output tiles and down 6 x 128, 2.9 and 5.8 per H100 SM, each
# streaming its rows over all of K in 32 / 16 sequential steps; bench/native_gemm.py --experts-split times the
# split against none. Off (0): on an H200 every split was slower than none (grouped MoE at 1 token: 126 us unsplit,
# 130 / 144 / 178 us at 2 / 5 / 8 slices; BENCHMARKS.md, Native FP8 / FP4 weights). With 0 the direct kernels
# compile exactly as without a split.
EXPERT_SPLIT_PER_SM = 0
# K slices of the direct kernels when set (tests and bench/native_gemm.py --experts-split): instead of the rule
DIRECT_SPLIT: int | None = None
# The direct (decode) kernels multiply their one pair's row on the CUDA cores (packed_linear.fp4_gemv_dot, K steps
# of packed_linear.GEMV_WORDS words) instead of a 16-row tl.dot tile of which one row is used. On an H100
# (bench/native_gemm.py --experts-gemv, 32 experts): 55.6 us against 124.0 us at 1 token, 95.9 against 218.4 us at
# 2 (~60% of copy; bf16 grouped: 118.5 / 244.7 us). Off, the kernels compile exactly as without it.
FP4_GEMV = True
# The sorted-pairs kernels with the operands swapped (weights the dot's left, register operand; the pairs the right
# one). Static sm_90 counts (bench/fp4_sass.py --experts, Triton 3.6): no shared-memory traffic for the weights beyond
# their raw bytes, and 8.2-9.4 K-loop instructions per weight against the `words` kernels' 10.7-19.1, with more
# registers (gate/up 170 against 118 at 32 pairs). Served (bench/gpu_session.sh serve64n, H100, the bench/e2e.py
# geometry in the official formats at 64 rows, 24 pairs per expert): decode step p50 3.63 ms swapped against 3.95 ms.
# On unless DSV4_EXPERT_SWAP=0 (bench/native_gemm.py --experts-swap times both in one process).
EXPERT_SWAP = os.environ.get("DSV4_EXPERT_SWAP", "1") == "1"
# Pairs per expert (on average) from which the swapped kernels run: below, their 16-pair tiles were ~8% slower
# than the unswapped kernels' (H100, 16 experts: 305 against 281 us at 2 per expert, 309 against 287 at 8); from
# 16 on, where both take larger tiles, faster (327 against 452 us at 24, 566 against 591 at 65).
SWAP_MIN_PAIRS = 16
# Weight rows per program of the swapped kernels (the dot's M: a multiple of the 64 rows of one wgmma over 4 warps).
# 128 spills gate/up's registers at 64-pair tiles (Triton 3.6, sm_90).
SWAP_BLOCK_W = 64
# Pipeline stages of the swapped kernels: 2 keeps gate/up (two accumulators, two decoded tiles) at 130 / 170 / 225
# registers for 16 / 32 / 64-pair tiles against 162 / 226 / 234 at 3, with 1-3% more instructions per K step
# (bench/fp4_sass.py counts, not timed); down takes 93 / 123 / 155 at 2.
SWAP_STAGES = 2
# K slices of the swapped kernels (swap_splits): 1 = none (the kernels compile exactly as without a split), n forces
# n (at most MAX_SPLIT and the K steps), None = swap_wave_split's rule per kernel. Each slice's fp32 partial sums go
# to a scratch buffer and the tile's last program adds them in slice order before the epilogue (gate/up: the SwiGLU
# of the summed projections), as the direct kernels' split does. The partials cost 8 bytes per (pair, output) per
# slice, written and read back (mostly from L2: a tile's slices are launched side by side): 12.6 MB per slice for
# each kernel at 16 experts x 24 pairs, against 142 MB of gate/up weights and 71 MB of down. Fewer registers, too:
# 155 against 170 for gate/up at 32-pair tiles, 3 programs per SM instead of 2 (SWAP_CTAS_PER_SM). Not timed yet
# (bench/native_gemm.py --experts-swap 64:2:2 names a split); 1 until it is.
SWAP_SPLIT: int | None = 1
# Weight rows the last program of a split tile reads back, sums and stores at a time (the kernels' SUB).
SWAP_SUM_ROWS = 16
# Programs of 4 warps resident per SM that swap_wave_split assumes, per kernel and pair tile (swap_tokens), without
# and with a K split: sm_90 allocates registers per warp in units of 256 of an SM's 65536, so a kernel of R registers
# fits floor(65536 / (256 ceil(32 R / 256)) / 4) programs (shared memory allows more). Triton 3.6 (bench/fp4_sass.py
# --experts): gate/up 130 / 170 / 225 registers at 16 / 32 / 64 pairs unsplit, 126 / 155 / 255 split; down 93 / 123 /
# 155 unsplit, 89 / 96 / 131 split, the same K loop (so at 16-32 pairs the unsplit epilogue, SwiGLU and stores in
# the dot's accumulator layout, rather than the loop sets the count).
SWAP_CTAS_PER_SM = {"gate_up": {16: (3, 4), 32: (2, 3), 64: (2, 2)}, "down": {16: (5, 5), 32: (4, 5), 64: (3, 3)}}
# Share of its waves that a swapped kernel's grid must fill before swap_wave_split stops adding slices (the last
# wave's idle SMs are the tail). A model, not a measurement: programs of one kernel are assumed equally long.
SWAP_WAVE_FILL = 0.8
# Registers per thread the swapped gate/up kernel is compiled for at most (Triton's maxnreg; None: the compiler's
# choice). At 32-pair tiles it takes 170 unsplit (Triton 3.6), 2 above the 168 at which 3 of its programs fit an SM
# instead of 2; capped at 168 it compiles without spills (bench/fp4_sass.py --swap-maxnreg 168); at 64-pair tiles
# the cap spills 24 bytes (225 -> 168: 3 programs instead of 2), at 16 it lets ptxas use more (130 -> 163: 3 either
# way), and down would rise too (123 -> 148 at 32 pairs: 3 programs instead of 4), so only gate/up takes it.
# bench/native_gemm.py --experts-swap 64:2:1:168 times it.
SWAP_GATE_UP_MAXNREG: int | None = None

def _rows(pairs: int, experts: int) -> int:
    """Token rows per tile: 16 (the tensor-core minimum) while experts get few tokens on average (decode), 64 from
    16 per expert on, so that an expert's weights are decoded once per 64 of its tokens rather than per 16."""
    return 64 if pairs >= 16 * experts else 16


@triton.jit
def _rows_dot(a_ptr, rows, rmask, rs_a, w_ptr, s_ptr, rn, nmask, K, kh_lo, kh_hi, rs_w, rs_s, acc,
              DT: tl.constexpr, IEEE: tl.constexpr, DECODE: tl.constexpr):
    """acc + a[rows] @ dequant(w[rn])^T over the K bytes [kh_lo, kh_hi) (K values 2 kh_lo .. 2 kh_hi; a rows at
    a_ptr + rows * rs_a; FP4 w; DECODE: fp4_dot_step's)."""
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * rs_a
    for kh0 in range(kh_lo, kh_hi, 64):
        acc = fp4_dot_step(acc, a_rows, rmask, kh0, K, w_ptr, s_ptr, rn, nmask, rs_w, rs_s, DT, IEEE,
                           DECODE)
    return acc


@triton.jit
def _row_gemv(a_row, w_ptr, s_ptr, rn, nmask, kh_lo, kh_hi, rs_w, rs_s, ROWS: tl.constexpr,
              WORDS: tl.constexpr):
    """[ROWS, BLOCK_N] fp32 with row 0 = one activation row (a_row) times dequant(w[rn])^T over the K bytes
    [kh_lo, kh_hi) (packed_linear.fp4_gemv_dot), the other rows 0: the direct kernels' tile of one pair."""
    w_rows = w_ptr.to(tl.pointer_type(tl.int32)) + rn.to(tl.int64)[:, None] * (rs_w // 4)
    y = fp4_gemv_dot(a_row, w_rows, s_ptr + rn.to(tl.int64)[:, None] * rs_s, nmask, kh_lo // 4, kh_hi // 4, WORDS)
    return tl.where(tl.arange(0, ROWS)[:, None] == 0, y[None, :], 0.0)


@triton.jit
def _k_slice(K, STEPS_PER):
    """The K bytes [lo, hi) of this program's slice program_id(2): STEPS_PER FP4 steps of 64 bytes, the last
    slice cut at K / 2."""
    lo = tl.program_id(2) * STEPS_PER * 64
    return lo, tl.minimum(lo + STEPS_PER * 64, K // 2)


@triton.jit
def _expert_rows(active_ptr, offs_ptr, DIRECT: tl.constexpr):
    """(expert, first sorted row, end row) of this program's slot in the list of used experts; a slot past the
    used ones (-1) gets expert 0 and no rows. DIRECT: one (token, slot) pair per program, in the caller's order
    (active holds each pair's expert id; no sort)."""
    if DIRECT:
        start = tl.program_id(0)
        e = tl.load(active_ptr + start).to(tl.int64)
        end = start + 1
    else:
        e = tl.load(active_ptr + tl.program_id(0)).to(tl.int64)
        used = e >= 0
        e = tl.maximum(e, 0)
        start = tl.load(offs_ptr + e)
        end = tl.where(used, tl.load(offs_ptr + e + 1), start)
    return e, start, end


@triton.jit
def _slot_rows(active_ptr, offs_ptr, slot):
    """_expert_rows' sorted-pairs answer for the list slot `slot` (the swapped kernels take it from another grid
    axis when split)."""
    e = tl.load(active_ptr + slot).to(tl.int64)
    used = e >= 0
    e = tl.maximum(e, 0)
    start = tl.load(offs_ptr + e)
    end = tl.where(used, tl.load(offs_ptr + e + 1), start)
    return e, start, end


@triton.jit
def _gate_up_kernel(x_ptr, tok_ptr, rw_ptr, active_ptr, offs_ptr, w1_ptr, s1_ptr, w3_ptr, s3_ptr, h_ptr, part_ptr,
                    cnt_ptr, F, C, limit, we_stride, se_stride, rs_w, rs_s, k, STEPS_PER, BLOCK_N: tl.constexpr,
                    ROWS: tl.constexpr, CLAMP: tl.constexpr, IEEE: tl.constexpr, DIRECT: tl.constexpr,
                    SPLIT: tl.constexpr, REDUCE: tl.constexpr, DECODE: tl.constexpr, GEMV: tl.constexpr = False,
                    WORDS: tl.constexpr = 64):
    """h = swiglu(x @ w1^T, x @ w3^T) * routing weight per pair. SPLIT > 1 (DIRECT only: one pair per program,
    pairs = programs along axis 0): K slice program_id(2) of SPLIT; the gate and up partial sums go to
    part [SPLIT, pairs, 2F] (gate, then up), and the tile's last program sums both in slice order. GEMV (DIRECT
    only): the pair's row through _row_gemv (WORDS per K step) instead of fp4_dot_step's tiles."""
    tl.static_assert(SPLIT == 1 or DIRECT, "split-K needs one pair per program (DIRECT)")
    tl.static_assert(DIRECT or not GEMV, "the GEMV takes one pair per program (DIRECT)")
    e, start, end = _expert_rows(active_ptr, offs_ptr, DIRECT)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < F
    DT = tl.float32 if IEEE else x_ptr.dtype.element_ty
    w1 = w1_ptr + e.to(tl.int64) * we_stride
    w3 = w3_ptr + e.to(tl.int64) * we_stride
    s1 = s1_ptr + e.to(tl.int64) * se_stride
    s3 = s3_ptr + e.to(tl.int64) * se_stride
    for r0 in range(start, end, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        rmask = rows < end
        if DIRECT:   # pair p = token * k + slot
            tok = rows // k
        else:
            tok = tl.load(tok_ptr + rows, mask=rmask, other=0)
        if SPLIT == 1:
            kh_lo, kh_hi = 0, C // 2
        else:
            kh_lo, kh_hi = _k_slice(C, STEPS_PER)
        if GEMV:   # row 0 is the program's pair
            x_row = x_ptr + (start // k).to(tl.int64) * C
            g = _row_gemv(x_row, w1, s1, rn, nmask, kh_lo, kh_hi, rs_w, rs_s, ROWS, WORDS)
            u = _row_gemv(x_row, w3, s3, rn, nmask, kh_lo, kh_hi, rs_w, rs_s, ROWS, WORDS)
        else:
            g = _rows_dot(x_ptr, tok, rmask, C, w1, s1, rn, nmask, C, kh_lo, kh_hi, rs_w, rs_s,
                          tl.zeros([ROWS, BLOCK_N], tl.float32), DT, IEEE, DECODE)
            u = _rows_dot(x_ptr, tok, rmask, C, w3, s3, rn, nmask, C, kh_lo, kh_hi, rs_w, rs_s,
                          tl.zeros([ROWS, BLOCK_N], tl.float32), DT, IEEE, DECODE)
        mask = rmask[:, None] & nmask[None, :]
        if SPLIT == 1:
            # as the reference: projections rounded to the activation dtype, then the SwiGLU in fp32
            h = swiglu_tile(g, u, limit, h_ptr.dtype.element_ty, CLAMP) * tl.load(rw_ptr + rows, mask=rmask,
                                                                                   other=0.0)[:, None]
            tl.store(h_ptr + rows.to(tl.int64)[:, None] * F + rn[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)
        else:
            P = tl.num_programs(0)
            tile = tl.program_id(1) * P + tl.program_id(0)
            last, g, u = split_pair_sums(g, u, part_ptr, cnt_ptr, rows, rn, P, F, mask, tile, SPLIT, REDUCE)
            if last:
                h = swiglu_tile(g, u, limit, h_ptr.dtype.element_ty, CLAMP) * tl.load(rw_ptr + rows, mask=rmask,
                                                                                       other=0.0)[:, None]
                tl.store(h_ptr + rows.to(tl.int64)[:, None] * F + rn[None, :], h.to(h_ptr.dtype.element_ty),
                         mask=mask)


@triton.jit
def _down_kernel(h_ptr, active_ptr, offs_ptr, w2_ptr, s2_ptr, y_ptr, part_ptr, cnt_ptr, C, F, we_stride, se_stride,
                 rs_w, rs_s, STEPS_PER, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, IEEE: tl.constexpr,
                 DIRECT: tl.constexpr, SPLIT: tl.constexpr, REDUCE: tl.constexpr, DECODE: tl.constexpr,
                 GEMV: tl.constexpr = False, WORDS: tl.constexpr = 64):
    """y = h @ w2^T per pair; SPLIT > 1 (DIRECT only) and GEMV as _gate_up_kernel's, through store_split (part
    [SPLIT, pairs, C])."""
    tl.static_assert(SPLIT == 1 or DIRECT, "split-K needs one pair per program (DIRECT)")
    tl.static_assert(DIRECT or not GEMV, "the GEMV takes one pair per program (DIRECT)")
    e, start, end = _expert_rows(active_ptr, offs_ptr, DIRECT)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < C
    DT = tl.float32 if IEEE else h_ptr.dtype.element_ty
    w2 = w2_ptr + e.to(tl.int64) * we_stride
    s2 = s2_ptr + e.to(tl.int64) * se_stride
    for r0 in range(start, end, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        rmask = rows < end
        if SPLIT == 1:
            if GEMV:   # row 0 is the program's pair
                y = _row_gemv(h_ptr + start.to(tl.int64) * F, w2, s2, rn, nmask, 0, F // 2, rs_w, rs_s, ROWS, WORDS)
            else:
                y = _rows_dot(h_ptr, rows, rmask, F, w2, s2, rn, nmask, F, 0, F // 2, rs_w, rs_s,
                              tl.zeros([ROWS, BLOCK_N], tl.float32), DT, IEEE, DECODE)
            tl.store(y_ptr + rows.to(tl.int64)[:, None] * C + rn[None, :], y.to(y_ptr.dtype.element_ty),
                     mask=rmask[:, None] & nmask[None, :])
        else:
            kh_lo, kh_hi = _k_slice(F, STEPS_PER)
            if GEMV:
                y = _row_gemv(h_ptr + start.to(tl.int64) * F, w2, s2, rn, nmask, kh_lo, kh_hi, rs_w, rs_s, ROWS,
                              WORDS)
            else:
                y = _rows_dot(h_ptr, rows, rmask, F, w2, s2, rn, nmask, F, kh_lo, kh_hi, rs_w, rs_s,
                              tl.zeros([ROWS, BLOCK_N], tl.float32), DT, IEEE, DECODE)
            P = tl.num_programs(0)
            # rows past this program's pair point past the last pair, so that store_split masks them
            store_split(y, part_ptr, cnt_ptr, y_ptr, tl.where(rmask, rows, P), rn, P, C, SPLIT, REDUCE)


@triton.jit
def fp4_swap_tile(w_ptr, s_ptr, n0, N, kh0, GROUPS, rs_w, rs_s, BLOCK_W: tl.constexpr, DT: tl.constexpr):
    """The FP4 weights of rows n0 .. n0 + BLOCK_W - 1 (masked at N), bytes kh0 .. kh0 + 63, decoded and scaled as
    fp4_word_step's (in DT), as the left operand [BLOCK_W, 128] of a tl.dot in swap order: dot column
    j = 8 m + 2 t + p holds k = 2 kh0 + 32 t + 2 m + p (t: the scale group, m: the byte in it, p: the nibble).

    Why that order: the wgmma register operand of 4 warps (sm_90) gives the thread of lane l in warp w the rows
    16 w + l // 4 (+ 8, + 64 per repeat) and the columns 2 (l % 4) + {0, 1} + 8 i, which in swap order are all of
    one scale group's 16 bytes of each of its rows. So each thread loads its own 16 bytes (4 int32 words) and one
    scale per row and decodes them where the dot wants them. The tile is loaded as [4 t, 8 rlo, 4 rw, BLOCK_W // 64
    rhi, 2 rmid, 4 words] (row rlo + 8 rmid + 16 rw + 64 rhi) because Triton's coalesced layout for that shape gives
    the lanes to (t, rlo), the warps to rw and the registers to (rhi, rmid, words): the same threads as the
    operand's, so the permute and reshape into [BLOCK_W, 128] move no data between threads (the scale offsets are
    marked non-contiguous so that their load takes that layout too, not one vectorised along t)."""
    tl.static_assert(BLOCK_W % 64 == 0, "the swapped tile is whole 64-row wgmma tiles")
    RH: tl.constexpr = BLOCK_W // 64
    t = tl.arange(0, 4)[:, None, None, None, None, None]
    rlo = tl.arange(0, 8)[None, :, None, None, None, None]
    rw = tl.arange(0, 4)[None, None, :, None, None, None]
    rhi = tl.arange(0, RH)[None, None, None, :, None, None]
    rmid = tl.arange(0, 2)[None, None, None, None, :, None]
    word = tl.arange(0, 4)[None, None, None, None, None, :]
    row = n0 + rlo + 8 * rmid + 16 * rw + 64 * rhi                         # [1, 8, 4, RH, 2, 1]
    q = kh0 // 16 + t                                                       # [4, 1, ...]: the scale group
    m = (row < N) & (q < GROUPS)
    wd = tl.load(w_ptr.to(tl.pointer_type(tl.int32)) + row.to(tl.int64) * (rs_w // 4) + q * 4 + word, mask=m,
                 other=0)                                                   # [4, 8, 4, RH, 2, 4]
    s_at = tl.max_contiguous(row.to(tl.int64) * rs_s + q, [1, 1, 1, 1, 1, 1])
    s = ue8m0_values(tl.load(s_ptr + s_at, mask=m, other=0).to(tl.int32) + 14)   # as fp4_step's
    # nibble 4 a + 2 b + c of a word lands at [..., a, b, c] (tl.join appends its pair as the last dim)
    c = tl.join(tl.join(tl.join(wd & 0xF, (wd >> 16) & 0xF), tl.join((wd >> 8) & 0xF, (wd >> 24) & 0xF)),
                tl.join(tl.join((wd >> 4) & 0xF, (wd >> 20) & 0xF), tl.join((wd >> 12) & 0xF, (wd >> 28) & 0xF)))
    c = tl.reshape(c, (4, 8, 4, RH, 2, 4, 8))     # nibble n of word w: byte m = 4 w + n // 2, p = n % 2
    v = (e2m1_as_fp16(c).to(tl.float32) * s[:, :, :, :, :, :, None]).to(DT)
    v = tl.permute(tl.reshape(v, (4, 8, 4, RH, 2, 16, 2)), (3, 2, 4, 1, 5, 0, 6))   # [rhi, rw, rmid, rlo, m, t, p]
    return tl.reshape(v, (BLOCK_W, 128))


@triton.jit
def _swap_col(f):
    """Where column f of a row sits in swap order (swap_order): f = 128 b + 32 t + 2 m + p at 128 b + 8 m + 2 t + p."""
    return (f // 128) * 128 + 8 * ((f % 32) // 2) + 2 * ((f % 128) // 32) + f % 2


@triton.jit
def _swap_dot(w, xt, acc, IEEE: tl.constexpr):
    if IEEE:  # the interpreter: the same exact products as fp32 FMAs
        return tl.dot(w, xt, acc, input_precision="ieee")
    return tl.dot(w, xt, acc)


@triton.jit
def _swap_program(active_ptr, offs_ptr, SPLIT: tl.constexpr):
    """(expert, first sorted row, end row, weight-row block, K slice, K slices) of a swapped program: grid (expert
    slots, blocks) unsplit; (slices, slots, blocks) split, the slices along the axis that is launched first, so that
    a tile's slices run side by side and its partial sums are read back soon after they are written (from L2)."""
    if SPLIT == 1:
        e, start, end = _slot_rows(active_ptr, offs_ptr, tl.program_id(0))
        return e, start, end, tl.program_id(1), 0, 1
    e, start, end = _slot_rows(active_ptr, offs_ptr, tl.program_id(1))
    return e, start, end, tl.program_id(2), tl.program_id(0), tl.num_programs(0)


@triton.jit
def _swap_k_range(K, STEPS_PER, sl, SPLIT: tl.constexpr):
    """The K bytes [lo, hi) a swapped program walks: all of them, or with SPLIT > 1 those of its slice sl
    (STEPS_PER FP4 steps of 64 bytes, the last slice cut at K / 2)."""
    if SPLIT == 1:
        return 0, K // 2
    lo = sl * STEPS_PER * 64
    return lo, tl.minimum(lo + STEPS_PER * 64, K // 2)


@triton.jit
def _split_part(acc, part_ptr, at, mask, SLICE, sl):
    """A program's fp32 K-slice sum acc into slice sl of part (SLICE values per slice, at: int32 offsets within a
    slice)."""
    tl.store(part_ptr + sl.to(tl.int64) * SLICE + at, acc, mask=mask)


@triton.jit
def _split_last(cnt_ptr, tile, slices):
    """Whether this program takes output tile `tile`'s last ticket of its `slices` K slices (all slices are then
    stored); every thread's slice is stored before the ticket (acq_rel) is taken."""
    tl.debug_barrier()
    return tl.atomic_add(cnt_ptr + tile, 1) == slices - 1


@triton.jit
def _split_total(part_ptr, at, mask, SLICE, slices):
    """The `slices` K slices of part at `at` added in slice order: the same sum whichever program reads them
    (deterministic). A loop with a run-time trip count, so the compiler does not unroll it and hoist every
    slice's loads at once (that took gate/up at 32-pair tiles from 170 to 205-246 registers, Triton 3.6)."""
    total = tl.zeros(at.shape, tl.float32)
    for s in range(0, slices):
        total += tl.load(part_ptr + SLICE.to(tl.int64) * s + at, mask=mask, other=0.0, cache_modifier=".cg")
    return total


@triton.jit
def _swap_h_store(g, u, rows, rmask, rn, rw_ptr, h_ptr, F, rs_h, limit, CLAMP: tl.constexpr):
    """h^T = swiglu(g^T, u^T) * routing weight for rows rn x pairs `rows`, stored in swap order (_swap_col)."""
    h = swiglu_tile(g, u, limit, h_ptr.dtype.element_ty, CLAMP) * tl.load(rw_ptr + rows, mask=rmask,
                                                                           other=0.0)[None, :]
    tl.store(h_ptr + rows.to(tl.int64)[None, :] * rs_h + _swap_col(rn)[:, None], h.to(h_ptr.dtype.element_ty),
             mask=(rn < F)[:, None] & rmask[None, :])


@triton.jit
def _swap_gate_up_kernel(xs_ptr, tok_ptr, rw_ptr, active_ptr, offs_ptr, w1_ptr, s1_ptr, w3_ptr, s3_ptr, h_ptr, F, C,
                         rs_x, rs_h, limit, we_stride, se_stride, rs_w, rs_s, part_ptr, cnt_ptr, P, STEPS_PER,
                         BLOCK_W: tl.constexpr, TOK: tl.constexpr, CLAMP: tl.constexpr, IEEE: tl.constexpr,
                         SPLIT: tl.constexpr = 1, SUB: tl.constexpr = 16):
    """_gate_up_kernel's h for the sorted pairs, transposed: program (slot, j) takes rows j BLOCK_W .. of w1 and w3
    and its expert's pairs TOK at a time, g^T and u^T [BLOCK_W, TOK] = dequant(w)[rows] @ x[pairs' tokens]^T over
    one K loop (each activation tile read once for both), then the SwiGLU and routing weight as _gate_up_kernel's.
    xs: the activations in swap order (swap_order: rows of rs_x >= C values, zero past C); h is stored in swap
    order too (row stride rs_h), the order _swap_down_kernel reads it in.

    SPLIT > 1: program (s, slot, j) walks K slice s (STEPS_PER FP4 steps) of each of its token tiles; g and u go to
    part [SPLIT, P pairs, 2F] (gate, then up; fp32), and the program that takes the tile's last ticket (one counter
    per weight-row block j and tile's first pair r0: j P + r0, in cnt) adds the slices in slice order, applies the
    SwiGLU to the sums and stores h, SUB weight rows at a time (a few registers per slice, where the whole
    [BLOCK_W, TOK] tile read back at once raised the kernel's registers), then resets the counter. SPLIT = 1 leaves
    part, cnt, P and STEPS_PER unused."""
    e, start, end, blk, sl, slices = _swap_program(active_ptr, offs_ptr, SPLIT)
    n0 = blk * BLOCK_W
    rn = n0 + tl.arange(0, BLOCK_W)
    DT = tl.float32 if IEEE else xs_ptr.dtype.element_ty
    w1 = w1_ptr + e * we_stride
    w3 = w3_ptr + e * we_stride
    s1 = s1_ptr + e * se_stride
    s3 = s3_ptr + e * se_stride
    kk = tl.arange(0, 128)
    kh_lo, kh_hi = _swap_k_range(C, STEPS_PER, sl, SPLIT)
    for r0 in range(start, end, TOK):
        rows = r0 + tl.arange(0, TOK)
        rmask = rows < end
        tok = tl.load(tok_ptr + rows, mask=rmask, other=0)
        x_cols = xs_ptr + tok.to(tl.int64)[None, :] * rs_x                   # [1, TOK]
        g = tl.zeros([BLOCK_W, TOK], tl.float32)
        u = tl.zeros([BLOCK_W, TOK], tl.float32)
        for kh0 in range(kh_lo, kh_hi, 64):
            xt = tl.load(x_cols + (2 * kh0 + kk)[:, None], mask=rmask[None, :], other=0.0).to(DT)   # [128, TOK]
            g = _swap_dot(fp4_swap_tile(w1, s1, n0, F, kh0, C // 32, rs_w, rs_s, BLOCK_W, DT), xt, g, IEEE)
            u = _swap_dot(fp4_swap_tile(w3, s3, n0, F, kh0, C // 32, rs_w, rs_s, BLOCK_W, DT), xt, u, IEEE)
        if SPLIT == 1:
            _swap_h_store(g, u, rows, rmask, rn, rw_ptr, h_ptr, F, rs_h, limit, CLAMP)
        else:
            at = rows[None, :] * (2 * F) + rn[:, None]     # within a slice: P 2F < 2^31 (swap_splits)
            mask = (rn < F)[:, None] & rmask[None, :]
            _split_part(g, part_ptr, at, mask, P * 2 * F, sl)
            _split_part(u, part_ptr, at + F, mask, P * 2 * F, sl)
            tile = blk * P + r0
            if _split_last(cnt_ptr, tile, slices):
                for j0 in range(0, tl.minimum(BLOCK_W, F - n0), SUB):
                    rj = n0 + j0 + tl.arange(0, SUB)
                    at_j = rows[None, :] * (2 * F) + rj[:, None]
                    m = (rj < F)[:, None] & rmask[None, :]
                    _swap_h_store(_split_total(part_ptr, at_j, m, P * 2 * F, slices),
                                  _split_total(part_ptr, at_j + F, m, P * 2 * F, slices), rows, rmask, rj, rw_ptr,
                                  h_ptr, F, rs_h, limit, CLAMP)
                tl.atomic_xchg(cnt_ptr + tile, 0)


@triton.jit
def _swap_down_kernel(hs_ptr, active_ptr, offs_ptr, w2_ptr, s2_ptr, y_ptr, C, F, rs_h, we_stride, se_stride, rs_w,
                      rs_s, part_ptr, cnt_ptr, P, STEPS_PER, BLOCK_W: tl.constexpr, TOK: tl.constexpr,
                      IEEE: tl.constexpr, SPLIT: tl.constexpr = 1, SUB: tl.constexpr = 16):
    """_down_kernel's y for the sorted pairs, transposed as _swap_gate_up_kernel's: y^T [BLOCK_W, TOK] =
    dequant(w2)[rows] @ h[pairs]^T, h in swap order (zero past F), y [pairs, C] in natural order. SPLIT > 1 as
    _swap_gate_up_kernel's (part [SPLIT, P, C]; the last program stores the sum)."""
    e, start, end, blk, sl, slices = _swap_program(active_ptr, offs_ptr, SPLIT)
    n0 = blk * BLOCK_W
    rn = n0 + tl.arange(0, BLOCK_W)
    DT = tl.float32 if IEEE else hs_ptr.dtype.element_ty
    w2 = w2_ptr + e * we_stride
    s2 = s2_ptr + e * se_stride
    kk = tl.arange(0, 128)
    kh_lo, kh_hi = _swap_k_range(F, STEPS_PER, sl, SPLIT)
    for r0 in range(start, end, TOK):
        rows = r0 + tl.arange(0, TOK)
        rmask = rows < end
        h_cols = hs_ptr + rows.to(tl.int64)[None, :] * rs_h
        acc = tl.zeros([BLOCK_W, TOK], tl.float32)
        for kh0 in range(kh_lo, kh_hi, 64):
            ht = tl.load(h_cols + (2 * kh0 + kk)[:, None], mask=rmask[None, :], other=0.0).to(DT)
            acc = _swap_dot(fp4_swap_tile(w2, s2, n0, C, kh0, F // 32, rs_w, rs_s, BLOCK_W, DT), ht, acc, IEEE)
        if SPLIT == 1:
            tl.store(y_ptr + rows.to(tl.int64)[None, :] * C + rn[:, None], acc.to(y_ptr.dtype.element_ty),
                     mask=(rn < C)[:, None] & rmask[None, :])
        else:
            _split_part(acc, part_ptr, rows[None, :] * C + rn[:, None], (rn < C)[:, None] & rmask[None, :], P * C,
                        sl)
            tile = blk * P + r0
            if _split_last(cnt_ptr, tile, slices):
                for j0 in range(0, tl.minimum(BLOCK_W, C - n0), SUB):
                    rj = n0 + j0 + tl.arange(0, SUB)
                    m = (rj < C)[:, None] & rmask[None, :]
                    y = _split_total(part_ptr, rows[None, :] * C + rj[:, None], m, P * C, slices)
                    tl.store(y_ptr + rows.to(tl.int64)[None, :] * C + rj[:, None], y.to(y_ptr.dtype.element_ty),
                             mask=m)
                tl.atomic_xchg(cnt_ptr + tile, 0)


def swap_order(x: torch.Tensor) -> torch.Tensor:
    """x [R, K] with each 128-column block in swap order (fp4_swap_tile: position 8 m + 2 t + p holds column
    32 t + 2 m + p), zero-padded to a whole number of blocks: the swapped kernels' activation layout."""
    R, K = x.shape
    KP = triton.cdiv(K, 128) * 128
    if KP != K:
        x = torch.nn.functional.pad(x, (0, KP - K))
    return x.reshape(R, KP // 128, 4, 16, 2).transpose(2, 3).reshape(R, KP)


def swap_tokens(pairs: int, experts: int) -> int:
    """Pairs per tile of the swapped kernels (the dot's N): 16, 32 or 64, the smallest that holds the average
    expert's pairs (an expert with more takes several tiles, each rereading its weights)."""
    per = triton.cdiv(pairs, experts)
    return 16 if per <= 16 else 32 if per <= 32 else 64


def _swapped(x: torch.Tensor, tok: torch.Tensor, rw: torch.Tensor, active: torch.Tensor, offs: torch.Tensor,
             w1: Fp4GroupWeight, w2: Fp4GroupWeight, w3: Fp4GroupWeight, swiglu_limit: float) -> torch.Tensor:
    """y [pairs, C] of the sorted pairs on the swapped kernels (x [N, C]; tok, rw, active, offs: _sorted_pairs')."""
    P, (E, F, C) = tok.numel(), w1.shape
    d1, s1, d3, s3, d2, s2 = (t.contiguous() for t in (w1.data, w1.scale, w3.data, w3.scale, w2.data, w2.scale))
    xs = swap_order(x)
    FP = triton.cdiv(F, 128) * 128
    # h past F (in swap order: scattered over the last block) is read by down's last K step: zero, not garbage
    h = (torch.empty if FP == F else torch.zeros)(P, FP, dtype=x.dtype, device=x.device)
    y = torch.empty(P, C, dtype=x.dtype, device=x.device)
    bw, tk, slots = SWAP_BLOCK_W, swap_tokens(P, E), active.numel()
    split1, split2 = swap_splits(P, E, F, C, x.device)
    per1, per2 = triton.cdiv(triton.cdiv(C, FP4_STEP), split1), triton.cdiv(triton.cdiv(F, FP4_STEP), split2)
    # fp32 K-slice partial sums (none at one slice); one ticket buffer: the launches run one after the other
    part1 = torch.empty(split1 * P * 2 * F if split1 > 1 else 0, dtype=torch.float32, device=x.device)
    part2 = torch.empty(split2 * P * C if split2 > 1 else 0, dtype=torch.float32, device=x.device)
    grid1, grid2 = (slots, triton.cdiv(F, bw)), (slots, triton.cdiv(C, bw))
    # one ticket per (weight-row block, token tile) where a kernel splits; unsplit, the kernels never touch it
    tickets = tile_tickets(x.device, P * max(grid1[1], grid2[1])) if max(split1, split2) > 1 else offs
    regs = {} if SWAP_GATE_UP_MAXNREG is None else {"maxnreg": SWAP_GATE_UP_MAXNREG}
    _swap_gate_up_kernel[(split1, *grid1) if split1 > 1 else grid1](
        xs, tok, rw, active, offs, d1, s1, d3, s3, h, F, C, xs.stride(0), h.stride(0), float(swiglu_limit),
        d1.stride(0), s1.stride(0), d1.stride(1), s1.stride(1), part1, tickets, P, per1, BLOCK_W=bw, TOK=tk,
        CLAMP=swiglu_limit > 0, IEEE=interpreted(), SPLIT=split1, SUB=SWAP_SUM_ROWS, num_warps=4,
        num_stages=SWAP_STAGES, **regs)
    _swap_down_kernel[(split2, *grid2) if split2 > 1 else grid2](
        h, active, offs, d2, s2, y, C, F, h.stride(0), d2.stride(0), s2.stride(0), d2.stride(1), s2.stride(1),
        part2, tickets, P, per2, BLOCK_W=bw, TOK=tk, IEEE=interpreted(), SPLIT=split2, SUB=SWAP_SUM_ROWS,
        num_warps=4, num_stages=SWAP_STAGES)
    return y


def swap_splits(pairs: int, E: int, F: int, C: int, device: torch.device) -> tuple[int, int]:
    """K slices of the swapped gate/up (K = C) and down (K = F) kernels for `pairs` sorted pairs over E experts:
    SWAP_SPLIT when set, else swap_wave_split's for each kernel's grid (every expert slot assumed used: from
    SWAP_MIN_PAIRS pairs per expert on, nearly all are), at most MAX_SPLIT and the K steps, and each slice a
    whole number of FP4 steps (no empty slice); none where a slice of partial sums would not fit int32 offsets. A
    static-shape decision (CUDA graphs)."""
    tok, slots = swap_tokens(pairs, E), min(E, pairs)
    out = []
    for name, rows, K in (("gate_up", F, C), ("down", C, F)):
        steps = triton.cdiv(K, FP4_STEP)
        if SWAP_SPLIT is not None:
            split = SWAP_SPLIT
        else:
            sms = multiprocessors(device)
            split = swap_wave_split(slots * triton.cdiv(rows, SWAP_BLOCK_W),
                                    tuple(sms * n for n in SWAP_CTAS_PER_SM[name][tok]), min(MAX_SPLIT, steps))
        if pairs * max(2 * F, C) >= 2 ** 31:
            split = 1
        split = max(1, min(steps, MAX_SPLIT, split))
        out.append(triton.cdiv(steps, triton.cdiv(steps, split)))
    return out[0], out[1]


def swap_wave_split(programs: int, resident: tuple[int, int], most: int) -> int:
    """The fewest K slices (up to `most`) at which `programs` output tiles, each cut into that many slices, fill at
    least SWAP_WAVE_FILL of the waves they take (the last wave's idle share is the tail), `resident` programs per
    wave (the GPU's, unsplit and split); where none does, the slice count that fills most."""
    best, fill_best = 1, 0.0
    for split in range(1, max(1, most) + 1):
        n, wave = programs * split, resident[split > 1]
        fill = n / (triton.cdiv(n, wave) * wave)
        if fill >= SWAP_WAVE_FILL:
            return split
        if fill > fill_best:
            best, fill_best = split, fill
    return best


def _sorted_pairs(idx: torch.Tensor, E: int):
    """(token of each expert-sorted pair, its position in the sorted order per pair, expert row offsets [E+1],
    the sort order, the used experts in order padded with -1 to min(E, pairs)), all on the device: the kernels'
    grids have one slot per possible used expert, a static size (CUDA graphs), and slots past the used experts
    exit at once, so decode's few experts do not cost a program per expert of the layer."""
    N, k = idx.shape
    flat = idx.reshape(-1).long()
    order, at, counts = pair_order(flat, E)
    offs = torch.zeros(E + 1, dtype=torch.int32, device=idx.device)
    offs[1:] = counts.cumsum(0)
    experts = flat[order]
    first = torch.ones_like(experts, dtype=torch.bool)
    first[1:] = experts[1:] != experts[:-1]
    active = torch.full((min(E, experts.numel()),), -1, dtype=torch.int32, device=idx.device)
    active.scatter_(0, first.cumsum(0) - 1, experts.to(torch.int32))  # each used expert's slot, once per pair
    return (order // k).to(torch.int32), at, offs, order, active


_IDENTITY: dict = {}


def _identity(n: int, device: torch.device) -> torch.Tensor:
    """arange(n) (int64) from a per-device buffer, so that decode's in-place pairs cost no launch for it."""
    buf = _IDENTITY.get(str(device))
    if buf is None or buf.numel() < n:
        buf = _IDENTITY[str(device)] = torch.arange(max(n, 64), device=device)
    return buf[:n]


def _block_n(rows: int) -> int:
    """Output rows per program: 32 (decode: more programs streaming the few active experts), 64 for larger
    batches."""
    return 32 if rows <= 1024 else 64


@falls_back_to(ref.moe_experts_fp4)
def moe_experts_fp4(x: torch.Tensor, w1: Fp4GroupWeight, w2: Fp4GroupWeight, w3: Fp4GroupWeight, idx: torch.Tensor,
                    weights: torch.Tensor, swiglu_limit: float) -> torch.Tensor:
    """Same contract as ops.reference.packed.moe_experts_fp4: x [N, C], w1/w3 FP4 [E, F, C], w2 FP4 [E, C, F],
    idx / weights [N, k] -> fp32 [N, C]."""
    N, k = idx.shape
    E, F, C = w1.shape
    if x.shape != (N, C) or tuple(w3.shape) != (E, F, C) or tuple(w2.shape) != (E, C, F):
        raise ValueError(f"moe_experts_fp4: x {tuple(x.shape)}, w1 {w1.shape}, w3 {w3.shape}, w2 {w2.shape} do "
                         f"not fit [N, C], [E, F, C], [E, F, C], [E, C, F] with N={N} tokens")
    x = x.contiguous()
    if dequantises(idx, E, x.device):
        return _dequantised(x, w1, w2, w3, idx, weights, swiglu_limit)
    P = N * k
    direct = P <= DIRECT_MAX_PAIRS
    if direct:   # one program row per pair, in place: no sort (tok / offs unused)
        active = idx.reshape(-1).contiguous()
        rw = weights.reshape(-1).float().contiguous()
        at = _identity(P, x.device)
        tok = offs = active
    else:
        tok, at, offs, order, active = _sorted_pairs(idx, E)
        rw = weights.reshape(-1)[order].float().contiguous()
        if EXPERT_SWAP and P >= SWAP_MIN_PAIRS * E:
            return slot_sum(_swapped(x, tok, rw, active, offs, w1, w2, w3, swiglu_limit), at, k)
    h = torch.empty(P, F, dtype=x.dtype, device=x.device)
    y = torch.empty(P, C, dtype=x.dtype, device=x.device)
    if P == 0:
        return torch.zeros(N, C, dtype=torch.float32, device=x.device)
    d1, s1, d3, s3, d2, s2 = (t.contiguous() for t in (w1.data, w1.scale, w3.data, w3.scale, w2.data, w2.scale))
    bn = _block_n(P)
    slots, rows = active.numel(), (16 if direct else _rows(P, E))
    steps1, steps2 = triton.cdiv(C, FP4_STEP), triton.cdiv(F, FP4_STEP)
    split1, split2 = direct_splits(P, F, C, x.device) if direct else (1, 1)
    per1, per2 = triton.cdiv(steps1, split1), triton.cdiv(steps2, split2)
    # fp32 K-slice partial sums (unused at one slice); one ticket buffer: the launches run one after the other
    part1 = torch.empty(split1, P, 2 * F, dtype=torch.float32, device=x.device)
    part2 = torch.empty(split2, P, C, dtype=torch.float32, device=x.device)
    grid1, grid2 = (slots, triton.cdiv(F, bn), split1), (slots, triton.cdiv(C, bn), split2)
    tickets = tile_tickets(x.device, max(grid1[0] * grid1[1], grid2[0] * grid2[1]))
    # the GEMV's loads stay in registers: one stage (no cp.async copies into shared memory)
    gemv = dict(GEMV=True, WORDS=packed_linear.GEMV_WORDS) if direct and FP4_GEMV else {}
    stages = 1 if gemv else 3
    _gate_up_kernel[grid1](x, tok, rw, active, offs, d1, s1, d3, s3, h, part1, tickets, F, C, float(swiglu_limit),
                           d1.stride(0), s1.stride(0), d1.stride(1), s1.stride(1), k, per1, BLOCK_N=bn, ROWS=rows,
                           CLAMP=swiglu_limit > 0, IEEE=interpreted(), DIRECT=direct, SPLIT=split1,
                           REDUCE=_reduce(split1, 4), DECODE=packed_linear.FP4_DECODE, num_warps=4,
                           num_stages=stages, **gemv)
    _down_kernel[grid2](h, active, offs, d2, s2, y, part2, tickets, C, F, d2.stride(0), s2.stride(0), d2.stride(1),
                        s2.stride(1), per2, BLOCK_N=bn, ROWS=rows, IEEE=interpreted(), DIRECT=direct, SPLIT=split2,
                        REDUCE=_reduce(split2, 8), DECODE=packed_linear.FP4_DECODE, num_warps=4,
                        num_stages=stages, **gemv)
    return slot_sum(y, at, k)


def direct_split(programs: int, steps: int, device: torch.device) -> int:
    """K slices of a direct (decode) expert kernel with `programs` output tiles over `steps` FP4 K steps: enough
    that about EXPERT_SPLIT_PER_SM programs per SM stream the weights, at most MAX_SPLIT and `steps`
    (DIRECT_SPLIT, when set, instead of the rule). A static-shape decision (CUDA graphs)."""
    want = DIRECT_SPLIT if DIRECT_SPLIT is not None else (
        EXPERT_SPLIT_PER_SM * multiprocessors(device)) // max(programs, 1)
    return max(1, min(steps, MAX_SPLIT, want))


def direct_splits(pairs: int, F: int, C: int, device: torch.device) -> tuple[int, int]:
    """K slices of the direct gate/up and down kernels for `pairs` (token, slot) pairs, each a whole number of FP4
    steps (no empty slice)."""
    bn = _block_n(pairs)
    out = []
    for tiles, K in ((triton.cdiv(F, bn), C), (triton.cdiv(C, bn), F)):
        steps = triton.cdiv(K, FP4_STEP)
        out.append(triton.cdiv(steps, triton.cdiv(steps, direct_split(pairs * tiles, steps, device))))
    return out[0], out[1]


def _reduce(split: int, most: int) -> int:
    """K slices the last program reads back per load: a power of two, at most `most` and no more than needed."""
    return min(most, triton.next_power_of_2(split))


def dequantises(idx: torch.Tensor, E: int, device: torch.device) -> bool:
    """The call runs on dequantised bf16 experts: EXPERT_DEQUANT_MIN_PAIRS pairs per expert or more (a static-shape
    decision), and not while a CUDA graph is captured when the experts do not fit one scratch stack (the chunks'
    bounds are read on the host)."""
    if idx.numel() < EXPERT_DEQUANT_MIN_PAIRS * E:
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing() and _chunk(E, 1) < E)


def _chunk(E: int, expert_bytes: int) -> int:
    """Experts dequantised together: all of them if they fit EXPERT_SCRATCH_BYTES, else as many as do (>= 1)."""
    return max(1, min(E, EXPERT_SCRATCH_BYTES // max(expert_bytes, 1)))


def _experts(w: Fp4GroupWeight, e0: int, e1: int, dtype: torch.dtype) -> torch.Tensor:
    return dequant_fp4(Fp4GroupWeight(w.data[e0:e1], w.scale[e0:e1]), dtype)


def _dequantised(x: torch.Tensor, w1: Fp4GroupWeight, w2: Fp4GroupWeight, w3: Fp4GroupWeight, idx: torch.Tensor,
                 weights: torch.Tensor, swiglu_limit: float) -> torch.Tensor:
    """moe_experts_fp4 on bf16 copies of the experts through the dense experts op. Experts that do not fit
    EXPERT_SCRATCH_BYTES together run in chunks: each chunk's pairs (bounds from one host read) go through the op
    with one slot each and are added into their tokens' rows (fp32, in chunk order)."""
    N, k = idx.shape
    E, F, C = w1.shape
    chunk = _chunk(E, 3 * F * C * x.element_size())
    if chunk >= E:
        return moe_experts_dense(x, *(_experts(w, 0, E, x.dtype) for w in (w1, w2, w3)), idx, weights, swiglu_limit)
    flat = idx.reshape(-1).long()
    order = flat.argsort(stable=True)
    starts = torch.arange(0, E + chunk, chunk, device=idx.device).clamp(max=E)
    bounds = torch.searchsorted(flat[order], starts).tolist()
    rw = weights.reshape(-1)
    y = torch.zeros(N, C, dtype=torch.float32, device=x.device)
    for i, e0 in enumerate(range(0, E, chunk)):
        sel = order[bounds[i]:bounds[i + 1]]
        if sel.numel() == 0:
            continue
        e1, tok = min(E, e0 + chunk), sel // k
        part = moe_experts_dense(x[tok], *(_experts(w, e0, e1, x.dtype) for w in (w1, w2, w3)),
                                 (flat[sel] - e0)[:, None], rw[sel][:, None], swiglu_limit)
        y.index_add_(0, tok, part)
    return y


def supports(x: torch.Tensor, w1, w2, w3, idx: torch.Tensor) -> bool:
    """bf16 activations on a GPU, no autograd (inference weights)."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and x.dim() == 2 and w1.device == x.device
            and not (torch.is_grad_enabled() and x.requires_grad))

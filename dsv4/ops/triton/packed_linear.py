"""Weight-only GEMMs over the checkpoint's own formats: x (bf16) @ w^T with w FP8 e4m3 (128x128 UE8M0 tiles) or
FP4 e2m1 (two per byte, 1x32 UE8M0 groups), read as bytes and dequantised in registers. Decode is bound by the
weight bytes read, so reading 1 (FP8) or 0.5 (FP4) byte per weight instead of bf16's 2 is the whole point.

The bytes are decoded by integer arithmetic, not by a float8 type (sm80 has none in Triton), so the same kernels
run on any GPU and in the interpreter: the sign, exponent and mantissa bits move into an fp16 (a few masks and
shifts), which holds the value times a power of two exactly, subnormals included; that power of two joins the
scale. Every weight value is exact in bf16 (e4m3 has 3 mantissa bits, e2m1
one), so the tensor-core products are exact and the sums run in fp32. FP8 tiles are scaled after their partial
product (one scale per 128 K values and 128 rows); FP4 groups of 32 are scaled in registers before it.

On sm_89+ the FP8 weight kernel uses the hardware's e4m3 conversion instead (`native_fp8`), and `linear_fp8_fp8`
multiplies e4m3 activations (quantised per 1x128 block in the kernel, as the official inference does) by the
e4m3 weights on the FP8 tensor cores.

Layouts: x [M, K] (rows contiguous); FP8 data [N, K] bytes, scale [ceil(N/128), ceil(K/128)]; FP4 data [N, K/2]
bytes (low nibble = even k), scale [N, K/32]. Few rows (decode) split K across programs so that enough of them
stream the weight (several programs per SM); the program that finishes an output tile last adds the tile's fp32
partial sums in slice order and stores the result (store_split): one kernel per call, deterministic, no atomics
on the data. From DEQUANT_MIN_ROWS rows on (prefill) the weight is instead dequantised once into a scratch copy
in x's dtype (packed_dequant.py) and multiplied by torch.matmul: small decode tiles that decode every weight byte
once per row tile lose to cuBLAS there.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...quant.packed import FP8_BLOCK, Fp4GroupWeight, Fp8BlockWeight
from ..reference import packed as ref
from .launch import falls_back_to, interpreted, multiprocessors
from .packed_bits import e2m1_as_fp16, e4m3_as_fp16, e4m3_values, ue8m0_values
from .packed_dequant import dequant_fp4, dequant_fp8

FP4_STEP = 128  # K values per FP4 loop step: 64 bytes per row, 4 scale groups
MAX_SPLIT = 16  # K slices per output tile at most: the tile's last program reads them all back
# Rows (tokens) from which a call dequantises the weight to a bf16 scratch copy (packed_dequant: 3 bytes of traffic
# per FP8 weight) and runs torch.matmul instead of the register-decoding kernel. The copy costs 3NK bytes / BW; the
# bf16 GEMM 2MNK / F; a register kernel that reaches a fraction r of the bf16 GEMM's rate costs 2MNK / (r F). The
# copy wins from M = 1.5 (F / BW) / (1/r - 1): with H100 F / BW ~ 700 TFLOP/s / 2.4 TB/s ~ 290 and the measured
# r ~ 1/3 (whole-model prefill, native at 0.33-0.37x bf16), M ~ 220; at M = 256 the copy is ~1.7x the GEMM's
# compute time, at 8K-token prefill chunks ~5%. Decode (M <= 64, CUDA graphs) keeps the register kernels.
DEQUANT_MIN_ROWS = 256
# The FP4 K step's decode (fp4_dot_step), read at each launch of the FP4 GEMM and the grouped FP4 experts; all three
# multiply the same exact bf16 values (only the fp32 summation order differs), bench/native_gemm.py --fp4-decode
# times them side by side (on an H200 `old`, `bf16mul` and `after` within 2% of each other in the grouped MoE; on an
# H100 `words` 8-20% faster than `old` for one matrix at M = 2..16 and 21% in the grouped MoE at 24 tokens per
# expert, so it is the default; BENCHMARKS.md, Native FP8 / FP4 weights):
#   "old":     fp4_step: nibble -> fp16 bits (2^-14 times the value) -> fp32, times the scale (fp32) -> bf16, one dot
#              per K half;
#   "bf16mul": fp4_step with the scale multiplied in bf16 after the conversion (a packed bf16x2 multiply, half the
#              multiplies of fp32's);
#   "after":   fp4_group_dot_step: nibble -> fp16 bits -> bf16 unscaled, one dot per 32-value scale group, and the
#              group's fp32 partial product scaled, as the FP8 kernel scales its tiles';
#   "words":   fp4_word_step: the row bytes read as int32 words (8 nibbles each, in natural k order), decoded and
#              scaled as "old" does, one dot over all 128 K values with the activations as loaded (no even/odd split).
FP4_DECODES = ("old", "bf16mul", "after", "words")
FP4_DECODE = "words"
# Activation rows up to which linear_fp4_weight runs the CUDA-core GEMV (_fp4_gemv_kernel: no tensor cores, no
# shared memory for the weights) instead of the tl.dot kernel; 0: never. On an H100 (bench/native_gemm.py --fp4-gemv)
# it took a 4096 x 2048 FP4 matrix in 7.0 / 7.6 / 11.0 us at 1 / 2 / 4 rows against 15.5 / 15.4 / 15.4 us for the
# dot kernel (bf16 torch.matmul: ~11 us). At most GEMV_MAX_ROWS.
FP4_GEMV_MAX_M = 4
GEMV_MAX_ROWS = 4    # activation rows the GEMV kernel takes (one accumulator each, unrolled)
GEMV_BLOCK_N = (32, 16)  # weight rows per GEMV program: for one activation row, for more (fewer registers)
GEMV_WORDS = 64      # int32 words of each weight row per GEMV K step (512 K values, 256 bytes)


@triton.jit
def fp4_step(w_ptr, s_ptr, rn, nmask, kh0, HALF, GROUPS, rs_w, rs_s, DT: tl.constexpr, BF16_MUL: tl.constexpr):
    """One FP4 K step of rows rn: the even-k and odd-k weights [BLOCK_N, 64] (scaled, in DT) of the bytes
    kh0 .. kh0+63 (k = 2 * byte and 2 * byte + 1). The bytes are read as [BLOCK_N, 4, 16] so that each group of
    16 bytes (32 values) meets its one scale by broadcasting. BF16_MUL: the scale multiplies the values after their
    conversion to DT (both powers of two times at most 2 significant bits: exact) instead of in fp32."""
    g = kh0 // 16 + tl.arange(0, 4)
    j = tl.arange(0, 16)
    byte = (kh0 + tl.arange(0, 4) * 16)[None, :, None] + j[None, None, :]           # [1, 4, 16]
    m3 = nmask[:, None, None] & (byte < HALF)
    b = tl.load(w_ptr + rn.to(tl.int64)[:, None, None] * rs_w + byte, mask=m3, other=0).to(tl.int32)
    sc = tl.load(s_ptr + rn.to(tl.int64)[:, None] * rs_s + g[None, :], mask=nmask[:, None] & (g[None, :] < GROUPS),
                 other=0).to(tl.int32)
    s = ue8m0_values(sc + 14)[:, :, None]       # 2^(scale - 127) * 2^14 (scale bytes stay far below 241)
    if BF16_MUL:
        sd = s.to(DT)
        lo = tl.reshape(e2m1_as_fp16(b & 0xF).to(tl.float32).to(DT) * sd, (b.shape[0], 64))
        hi = tl.reshape(e2m1_as_fp16(b >> 4).to(tl.float32).to(DT) * sd, (b.shape[0], 64))
    else:
        lo = tl.reshape(e2m1_as_fp16(b & 0xF).to(tl.float32) * s, (b.shape[0], 64)).to(DT)
        hi = tl.reshape(e2m1_as_fp16(b >> 4).to(tl.float32) * s, (b.shape[0], 64)).to(DT)
    return lo, hi


@triton.jit
def fp4_word_step(w_ptr, s_ptr, rn, nmask, kh0, GROUPS, rs_w, rs_s, DT: tl.constexpr):
    """The weights of the bytes kh0 .. kh0+63 of rows rn as the dot's K-major operand [128, BLOCK_N] (scaled, in DT,
    natural k order), read as 16 int32 words per row ([BLOCK_N, 4 scale groups, 4 words]): nibble j of
    little-endian word w is k = 8 w + j. Row strides and kh0 are multiples of 16 bytes (K is a multiple of 32) and
    the mask is per scale group, so Triton may copy a group's 4 words as one 16-byte load (a mask on the byte
    index would be constant over only 8 bytes as far as it can tell). The 8 nibbles of each word are paired by
    tl.join (not a shift by a broadcast vector), which keeps the decode in the registers of the dot's operand
    layout instead of a round trip of the decoded values through shared memory."""
    q = kh0 // 16 + tl.arange(0, 4)
    word = (kh0 // 4 + tl.arange(0, 4) * 4)[None, :, None] + tl.arange(0, 4)[None, None, :]      # [1, 4, 4]
    rows = w_ptr.to(tl.pointer_type(tl.int32)) + rn.to(tl.int64)[:, None, None] * (rs_w // 4)
    wd = tl.load(rows + word, mask=nmask[:, None, None] & (q < GROUPS)[None, :, None], other=0)
    sc = tl.load(s_ptr + rn.to(tl.int64)[:, None] * rs_s + q[None, :], mask=nmask[:, None] & (q[None, :] < GROUPS),
                 other=0).to(tl.int32)
    s = ue8m0_values(sc + 14)[:, :, None, None]      # 2^(scale - 127) * 2^14, as fp4_step's
    # tl.join appends its pair as the last dim: nibble 4 a + 2 b + c of a word lands at [..., a, b, c]
    c = tl.join(tl.join(tl.join(wd & 0xF, (wd >> 16) & 0xF), tl.join((wd >> 8) & 0xF, (wd >> 24) & 0xF)),
                tl.join(tl.join((wd >> 4) & 0xF, (wd >> 20) & 0xF), tl.join((wd >> 12) & 0xF, (wd >> 28) & 0xF)))
    v = (e2m1_as_fp16(tl.reshape(c, (wd.shape[0], 4, 4, 8))).to(tl.float32) * s).to(DT)
    return tl.trans(tl.reshape(v, (wd.shape[0], 128)))


@triton.jit
def store_split(acc, part_ptr, cnt_ptr, out_ptr, rm, rn, M, N, SPLIT, REDUCE: tl.constexpr):
    """The epilogue of a split-K program (K slice program_id(2) of SPLIT): with one slice, acc goes to out (its
    dtype); otherwise acc goes to its fp32 slice of part [SPLIT, M, N], and the program that finishes a tile last
    (a ticket counter per tile, atomic) adds the SPLIT slices (REDUCE per load, in a fixed order), stores the sum
    and resets the counter to 0 for the next launch. One kernel, no host work, and the sum does not depend on
    which program finishes last (deterministic)."""
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    at = rm.to(tl.int64)[:, None] * N + rn[None, :]
    if SPLIT == 1:
        tl.store(out_ptr + at, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(part_ptr + tl.program_id(2).to(tl.int64) * M * N + at, acc, mask=mask)
        tl.debug_barrier()  # every thread's slice is stored before the ticket (acq_rel) is taken
        tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        ticket = tl.atomic_add(cnt_ptr + tile, 1)
        if ticket == SPLIT - 1:
            # REDUCE slices per load (one wave of loads, not SPLIT dependent ones), in a fixed order
            total = tl.zeros(acc.shape, tl.float32)
            sl = tl.arange(0, REDUCE)
            for s0 in range(0, SPLIT, REDUCE):
                ptrs = part_ptr + (s0 + sl).to(tl.int64)[:, None, None] * M * N + at[None, :, :]
                total += tl.sum(tl.load(ptrs, mask=((s0 + sl) < SPLIT)[:, None, None] & mask[None, :, :], other=0.0,
                                        cache_modifier=".cg"), 0)
            tl.store(out_ptr + at, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(cnt_ptr + tile, 0)


@triton.jit
def split_pair_sums(g, u, part_ptr, cnt_ptr, rows, rn, M, N, mask, tile, SPLIT: tl.constexpr,
                    REDUCE: tl.constexpr):
    """store_split for a pair of fp32 partial sums of one output tile (a gate and an up projection, whose SwiGLU
    needs both whole): this K slice's g and u go to part [SPLIT, M, 2N] (g, then u), and the program that takes
    the tile's last ticket gets (True, the SPLIT slices of each added in slice order) and resets the counter;
    the others get (False, zeros)."""
    pat = rows.to(tl.int64)[:, None] * (2 * N) + rn[None, :]
    base = part_ptr + tl.program_id(2).to(tl.int64) * M * 2 * N
    tl.store(base + pat, g, mask=mask)
    tl.store(base + pat + N, u, mask=mask)
    tl.debug_barrier()  # every thread's slices are stored before the ticket (acq_rel) is taken
    ticket = tl.atomic_add(cnt_ptr + tile, 1)
    last = ticket == SPLIT - 1
    g_sum = tl.zeros(g.shape, tl.float32)
    u_sum = tl.zeros(u.shape, tl.float32)
    if last:
        sl = tl.arange(0, REDUCE)
        for s0 in range(0, SPLIT, REDUCE):   # REDUCE slices per load, in slice order
            ptrs = part_ptr + (s0 + sl).to(tl.int64)[:, None, None] * M * 2 * N + pat[None, :, :]
            m3 = ((s0 + sl) < SPLIT)[:, None, None] & mask[None, :, :]
            g_sum += tl.sum(tl.load(ptrs, mask=m3, other=0.0, cache_modifier=".cg"), 0)
            u_sum += tl.sum(tl.load(ptrs + N, mask=m3, other=0.0, cache_modifier=".cg"), 0)
        tl.atomic_xchg(cnt_ptr + tile, 0)
    return last, g_sum, u_sum


@triton.jit
def fp4_dot_step(acc, a_rows, amask, kh0, K, w_ptr, s_ptr, rn, nmask, rs_w, rs_s, DT: tl.constexpr,
                 IEEE: tl.constexpr, DECODE: tl.constexpr):
    """acc + a[:, 2 kh0 : 2 kh0 + 128] @ dequant(w[rn, same k])^T: one FP4 K step (bytes kh0 .. kh0 + 63) of
    the rows whose pointers are a_rows ([rows, 1], masked by amask), as even-k and odd-k halves (the low and high
    nibbles). The one K loop body of the FP4 GEMM and of the grouped FP4 experts. DECODE: one of FP4_DECODES (the
    comment there says how they differ)."""
    if DECODE == "after":
        acc = fp4_group_dot_step(acc, a_rows, amask, kh0, K, w_ptr, s_ptr, rn, nmask, rs_w, rs_s, DT, IEEE)
    elif DECODE == "words":
        kk = 2 * kh0 + tl.arange(0, 128)
        a = tl.load(a_rows + kk[None, :], mask=amask[:, None] & (kk[None, :] < K), other=0.0).to(DT)
        w = fp4_word_step(w_ptr, s_ptr, rn, nmask, kh0, K // 32, rs_w, rs_s, DT)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    else:
        kk = 2 * kh0 + tl.arange(0, 128)  # one contiguous load of the 128 activations, split into even and odd k
        a = tl.load(a_rows + kk[None, :], mask=amask[:, None] & (kk[None, :] < K), other=0.0).to(DT)
        a_even, a_odd = tl.split(tl.reshape(a, (a.shape[0], 64, 2)))
        lo, hi = fp4_step(w_ptr, s_ptr, rn, nmask, kh0, K // 2, K // 32, rs_w, rs_s, DT, DECODE == "bf16mul")
        if IEEE:  # the interpreter: the same exact products as fp32 FMAs
            acc = tl.dot(a_even, tl.trans(lo), acc, input_precision="ieee")
            acc = tl.dot(a_odd, tl.trans(hi), acc, input_precision="ieee")
        else:
            acc = tl.dot(a_even, tl.trans(lo), acc)
            acc = tl.dot(a_odd, tl.trans(hi), acc)
    return acc


@triton.jit
def fp4_group_dot_step(acc, a_rows, amask, kh0, K, w_ptr, s_ptr, rn, nmask, rs_w, rs_s, DT: tl.constexpr,
                       IEEE: tl.constexpr):
    """fp4_dot_step's contract with the scale applied after the products, as the FP8 kernel applies its tiles':
    per 32-value scale group (16 bytes of each row), the bytes [BLOCK_N, 16] decode to 2^-14 times their values
    (e2m1_as_fp16, then one conversion to DT: no multiply per weight, and a pure function of each loaded byte, no
    reshape of the weight tile), the group's 32 activations are one contiguous load split into even and odd k, two
    K=16 dots give the group's fp32 partial product, and that partial is multiplied by the rows' scale
    2^(s - 127) * 2^14 (a power of two: exact) before joining acc. Per weight one multiply less than fp4_step;
    per output and group one fp32 multiply-add more."""
    j = tl.arange(0, 16)
    half = K // 2
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * rs_w
    s_rows = s_ptr + rn.to(tl.int64) * rs_s
    for g in tl.static_range(4):
        byte = kh0 + g * 16 + j
        bmask = byte < half
        b = tl.load(w_rows + byte[None, :], mask=nmask[:, None] & bmask[None, :], other=0).to(tl.int32)
        lo = e2m1_as_fp16(b & 0xF).to(tl.float32).to(DT)  # 2^-14 times the values (through fp32: not F2F)
        hi = e2m1_as_fp16(b >> 4).to(tl.float32).to(DT)
        kk = 2 * (kh0 + g * 16) + tl.arange(0, 32)  # the group's 32 activations, one contiguous load
        a = tl.load(a_rows + kk[None, :], mask=amask[:, None] & (kk[None, :] < K), other=0.0).to(DT)
        a_even, a_odd = tl.split(tl.reshape(a, (a.shape[0], 16, 2)))
        if IEEE:  # the interpreter: the same exact products as fp32 FMAs
            part = tl.dot(a_even, tl.trans(lo), input_precision="ieee")
            part = tl.dot(a_odd, tl.trans(hi), part, input_precision="ieee")
        else:
            part = tl.dot(a_even, tl.trans(lo))
            part = tl.dot(a_odd, tl.trans(hi), part)
        grp = kh0 // 16 + g + tl.zeros_like(rn)  # the group, per row (a vector mask)
        sc = tl.load(s_rows + grp, mask=nmask & (grp < K // 32), other=0).to(tl.int32)
        acc += part * ue8m0_values(sc + 14)[None, :]   # 2^(scale - 127) * 2^14, as fp4_step's
    return acc


@triton.jit
def _fp8_block_dot(a, w_ptr, s_ptr, rn, rk, kb, nmask, kmask, rs_w, rs_s, DT: tl.constexpr, IEEE: tl.constexpr,
                   NATIVE_FP8: tl.constexpr):
    """a [BLOCK_M, 128] times the FP8 rows rn, K block kb, of w (one 128-column block: one UE8M0 scale per 128
    rows), scaled: the fp32 [BLOCK_M, BLOCK_N] contribution of that block."""
    b = tl.load(w_ptr + rn.to(tl.int64)[:, None] * rs_w + rk[None, :], mask=nmask[:, None] & kmask[None, :], other=0)
    if NATIVE_FP8:  # sm_89+: the hardware's e4m3 conversion
        w = b.to(tl.float8e4nv, bitcast=True).to(DT)
    else:           # 2^-8 times the values: the 2^8 joins the tile scale below
        w = e4m3_as_fp16(b.to(tl.int32)).to(DT)
    if IEEE:  # the interpreter: the same exact products as fp32 FMAs (its bf16 dot is unreliable)
        part = tl.dot(a, tl.trans(w), input_precision="ieee")
    else:
        part = tl.dot(a, tl.trans(w))
    s = ue8m0_values(tl.load(s_ptr + (rn // 128) * rs_s + kb, mask=nmask, other=0).to(tl.int32))
    if not NATIVE_FP8:
        s = s * 256.0
    return part * s[None, :]


@triton.jit
def _fp8_weight_kernel(x_ptr, w_ptr, s_ptr, out_ptr, part_ptr, cnt_ptr, M, N, K, KB, KB_PER, SPLIT, rs_x, rs_w,
                       rs_s, GROUP_N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, REDUCE: tl.constexpr,
                       IEEE: tl.constexpr, NATIVE_FP8: tl.constexpr):
    """GROUP_N: output rows per input group (N for one plain GEMM): the rows [g GROUP_N, (g+1) GROUP_N) of w read
    x's g-th run of K columns (x [M, N / GROUP_N groups, K]); an output tile lies in one group."""
    pid_n, pid_m, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    nmask, mmask = rn < N, rm < M
    x_ptr += ((pid_n * BLOCK_N) // GROUP_N) * K
    DT = tl.float32 if IEEE else x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    kb0 = pid_s * KB_PER
    for kb in range(kb0, tl.minimum(kb0 + KB_PER, KB)):
        rk = kb * 128 + tl.arange(0, 128)
        kmask = rk < K
        a = tl.load(x_ptr + rm.to(tl.int64)[:, None] * rs_x + rk[None, :], mask=mmask[:, None] & kmask[None, :],
                    other=0.0).to(DT)
        acc += _fp8_block_dot(a, w_ptr, s_ptr, rn, rk, kb, nmask, kmask, rs_w, rs_s, DT, IEEE, NATIVE_FP8)
    store_split(acc, part_ptr, cnt_ptr, out_ptr, rm, rn, M, N, SPLIT, REDUCE)


@triton.jit
def _fp4_weight_kernel(x_ptr, w_ptr, s_ptr, out_ptr, part_ptr, cnt_ptr, M, N, K, STEPS, STEPS_PER, SPLIT, rs_x,
                       rs_w, rs_s, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, REDUCE: tl.constexpr,
                       IEEE: tl.constexpr, DECODE: tl.constexpr):
    pid_n, pid_m, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    nmask, mmask = rn < N, rm < M
    DT = tl.float32 if IEEE else x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    st0 = pid_s * STEPS_PER
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * rs_x
    for st in range(st0, tl.minimum(st0 + STEPS_PER, STEPS)):
        acc = fp4_dot_step(acc, x_rows, mmask, st * 64, K, w_ptr, s_ptr, rn, nmask, rs_w, rs_s, DT, IEEE,
                           DECODE)
    store_split(acc, part_ptr, cnt_ptr, out_ptr, rm, rn, M, N, SPLIT, REDUCE)


@triton.jit
def e2m1_pair_as_f32(t):
    """e2m1_as_fp16 on the two 16-bit halves of int32 t at once (codes in bits 0-3 and 16-19, other bits ignored):
    the same fp16 bits (2^-14 times the values, exactly) for both, built by one mask-shift-or on the pair, then
    each half converted to fp32 -> (low code's value, high code's value)."""
    bits = ((t & 0x00080008) << 12) | ((t & 0x00070007) << 9)
    lo = bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (bits >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def fp4_word_nibbles(wd):
    """int32 words [R, W] (8 e2m1 codes each, little-endian: nibble j of word w is k = 8 w + j) -> fp32 [R, W, 8]
    holding 2^-14 times the values (as e2m1_as_fp16, exactly), in natural k order. Nibbles j and j + 4 sit 16
    bits apart, so wd >> 4 j decodes both at once (e2m1_pair_as_f32); the values are put in k order by tl.join,
    which adds its pair as an in-register last dim: nibble 4 a + 2 b + c lands at [..., a, b, c]."""
    v0, v4 = e2m1_pair_as_f32(wd)
    v1, v5 = e2m1_pair_as_f32(wd >> 4)
    v2, v6 = e2m1_pair_as_f32(wd >> 8)
    v3, v7 = e2m1_pair_as_f32(wd >> 12)
    v = tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)), tl.join(tl.join(v1, v5), tl.join(v3, v7)))
    return tl.reshape(v, (wd.shape[0], wd.shape[1], 8))


@triton.jit
def fp4_gemv_words(w_rows, s_rows, nmask, w0, glim, WORDS: tl.constexpr):
    """The words w0 .. w0 + WORDS - 1 (w0 a multiple of 4) of the FP4 rows at w_rows ([BLOCK_N, 1] int32
    pointers; s_rows their scale rows), masked by nmask and by scale group (< glim) so that each group's 4 words
    can be one 16-byte load: (values [BLOCK_N, WORDS, 8], 2^-14 times the weights in natural k order
    (fp4_word_nibbles); each word's scale [BLOCK_N, WORDS], 2^(scale - 127) * 2^14)."""
    P: tl.constexpr = WORDS // 4
    w = w0 + tl.arange(0, WORDS)
    wd = tl.load(w_rows + w[None, :], mask=nmask[:, None] & (w // 4 < glim)[None, :], other=0)
    g = w0 // 4 + tl.arange(0, P)
    s = ue8m0_values(tl.load(s_rows + g[None, :], mask=nmask[:, None] & (g < glim)[None, :],
                             other=0).to(tl.int32) + 14)           # 2^(scale - 127) * 2^14, as fp4_step's
    # one scale per word, broadcast from the group's (a scale load per word would take the loads' layout instead)
    s = tl.reshape(tl.broadcast_to(s[:, :, None], (s.shape[0], P, 4)), (s.shape[0], WORDS))
    return fp4_word_nibbles(wd), s


@triton.jit
def fp4_gemv_row(acc, v, s, x_row, w0, lim):
    """acc [BLOCK_N, W] + one activation row's products with the decoded words v [BLOCK_N, W, 8] from word w0 on
    (2^-14 times the values): the row's 8 W activations from k = 8 w0 on (those of scale groups from lim on read
    as 0) broadcast over the weight rows, each word's 8 fp32 products summed in its thread and scaled by its
    group's s [BLOCK_N, W] (2^(scale - 127) * 2^14: a power of two, exact)."""
    kk = 8 * w0 + (tl.arange(0, v.shape[1]) * 8)[:, None] + tl.arange(0, 8)[None, :]        # [W, 8]
    a = tl.load(x_row + kk, mask=kk // 32 < lim, other=0.0).to(tl.float32)
    return acc + tl.sum(v * a[None, :, :], 2) * s


@triton.jit
def fp4_gemv_dot(x_row, w_rows, s_rows, nmask, w_lo, w_hi, WORDS: tl.constexpr):
    """fp32 [BLOCK_N]: one activation row (x_row) times the FP4 rows at w_rows ([BLOCK_N, 1] int32 pointers)
    over the words [w_lo, w_hi) (8 K values each; w_lo a multiple of 4, w_hi of 4 or the row's end), WORDS per
    step, on the CUDA cores (fp4_gemv_words, fp4_gemv_row)."""
    acc = tl.zeros([w_rows.shape[0], WORDS], tl.float32)
    for w0 in range(w_lo, w_hi, WORDS):
        v, s = fp4_gemv_words(w_rows, s_rows, nmask, w0, w_hi // 4, WORDS)
        acc = fp4_gemv_row(acc, v, s, x_row, w0, w_hi // 4)
    return tl.sum(acc, 1)


@triton.jit
def _fp4_gemv_kernel(x_ptr, w_ptr, s_ptr, out_ptr, part_ptr, cnt_ptr, M, N, K, STEPS, STEPS_PER, SPLIT, rs_x, rs_w,
                     rs_s, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr,
                     REDUCE: tl.constexpr):
    """out = x @ dequant(w)^T for M <= BLOCK_M <= 4 activation rows on the CUDA cores, no tl.dot. A K step is
    WORDS int32 words of each of BLOCK_N weight rows ([BLOCK_N, WORDS]: 8 WORDS values of k; 16-byte vector
    loads of 4 words = one 32-value scale group); the words' nibbles decode in registers (fp4_gemv_words:
    [BLOCK_N, WORDS, 8] in natural k order) and meet each activation row in turn (fp4_gemv_row, one fp32
    accumulator [BLOCK_N, WORDS] per row: the rows are unrolled, not a tensor dim, so that the decoded weights
    keep the load's register layout, which a broadcast over a row dim made Triton convert through shared
    memory). The words are summed (tl.sum) once, before store_split. program_id(2) takes STEPS_PER steps (split
    K)."""
    pid_n, pid_s = tl.program_id(0), tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    nmask = rn < N
    groups = K // 32
    w_rows = w_ptr.to(tl.pointer_type(tl.int32)) + rn.to(tl.int64)[:, None] * (rs_w // 4)
    s_rows = s_ptr + rn.to(tl.int64)[:, None] * rs_s
    acc0 = tl.zeros([BLOCK_N, WORDS], tl.float32)
    acc1 = tl.zeros([BLOCK_N, WORDS], tl.float32)
    acc2 = tl.zeros([BLOCK_N, WORDS], tl.float32)
    acc3 = tl.zeros([BLOCK_N, WORDS], tl.float32)
    st0 = pid_s * STEPS_PER
    for st in range(st0, tl.minimum(st0 + STEPS_PER, STEPS)):
        v, s = fp4_gemv_words(w_rows, s_rows, nmask, st * WORDS, groups, WORDS)
        acc0 = fp4_gemv_row(acc0, v, s, x_ptr, st * WORDS, groups)
        if BLOCK_M > 1:    # rows from M on read no activations (their groups limit is 0)
            acc1 = fp4_gemv_row(acc1, v, s, x_ptr + rs_x, st * WORDS, tl.where(M > 1, groups, 0))
        if BLOCK_M > 2:
            acc2 = fp4_gemv_row(acc2, v, s, x_ptr + 2 * rs_x, st * WORDS, tl.where(M > 2, groups, 0))
            acc3 = fp4_gemv_row(acc3, v, s, x_ptr + 3 * rs_x, st * WORDS, tl.where(M > 3, groups, 0))
    out = tl.where(rm[:, None] == 0, tl.sum(acc0, 1)[None, :], 0.0)
    if BLOCK_M > 1:
        out = tl.where(rm[:, None] == 1, tl.sum(acc1, 1)[None, :], out)
    if BLOCK_M > 2:
        out = tl.where(rm[:, None] == 2, tl.sum(acc2, 1)[None, :], out)
        out = tl.where(rm[:, None] == 3, tl.sum(acc3, 1)[None, :], out)
    store_split(out, part_ptr, cnt_ptr, out_ptr, rm, rn, M, N, SPLIT, REDUCE)


@triton.jit
def swiglu_tile(g, u, limit, DT: tl.constexpr, CLAMP: tl.constexpr):
    """The clamped SwiGLU of fp32 gate / up sums as reference/packed.swiglu computes it after two linears: both
    rounded to the activation dtype DT first, then fp32 math."""
    g = g.to(DT).to(tl.float32)
    u = u.to(DT).to(tl.float32)
    if CLAMP:
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
    return g / (1.0 + tl.exp(-g)) * u


@triton.jit
def _fp8_swiglu_kernel(x_ptr, w1_ptr, s1_ptr, w3_ptr, s3_ptr, out_ptr, part_ptr, cnt_ptr, M, N, K, KB, KB_PER, SPLIT,
                       rs_x, rs_w1, rs_s1, rs_w3, rs_s3, limit, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       REDUCE: tl.constexpr, IEEE: tl.constexpr, NATIVE_FP8: tl.constexpr, CLAMP: tl.constexpr):
    """swiglu(x @ w1^T, x @ w3^T) for one output tile: both FP8 weights' rows rn read by the same program (the
    shared expert's gate and up), split K as _fp8_weight_kernel; the tile's last program sums the slices of both
    (part [SPLIT, M, 2N]: gate then up) and stores the SwiGLU."""
    pid_n, pid_m, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    nmask, mmask = rn < N, rm < M
    DT = tl.float32 if IEEE else x_ptr.dtype.element_ty
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    kb0 = pid_s * KB_PER
    for kb in range(kb0, tl.minimum(kb0 + KB_PER, KB)):
        rk = kb * 128 + tl.arange(0, 128)
        kmask = rk < K
        a = tl.load(x_ptr + rm.to(tl.int64)[:, None] * rs_x + rk[None, :], mask=mmask[:, None] & kmask[None, :],
                    other=0.0).to(DT)
        acc_g += _fp8_block_dot(a, w1_ptr, s1_ptr, rn, rk, kb, nmask, kmask, rs_w1, rs_s1, DT, IEEE, NATIVE_FP8)
        acc_u += _fp8_block_dot(a, w3_ptr, s3_ptr, rn, rk, kb, nmask, kmask, rs_w3, rs_s3, DT, IEEE, NATIVE_FP8)
    mask = mmask[:, None] & nmask[None, :]
    at = rm.to(tl.int64)[:, None] * N + rn[None, :]
    if SPLIT == 1:
        h = swiglu_tile(acc_g, acc_u, limit, out_ptr.dtype.element_ty, CLAMP)
        tl.store(out_ptr + at, h.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tile = pid_m * tl.num_programs(0) + pid_n
        last, g, u = split_pair_sums(acc_g, acc_u, part_ptr, cnt_ptr, rm, rn, M, N, mask, tile, SPLIT, REDUCE)
        if last:
            h = swiglu_tile(g, u, limit, out_ptr.dtype.element_ty, CLAMP)
            tl.store(out_ptr + at, h.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def pow2_scale(amax):
    """(s, 1/s) with s = 2^ceil(log2(amax)) for positive fp32 amax, from the exponent and mantissa bits (exact,
    where a log2 approximation could miss an exact power of two)."""
    bits = amax.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    return (e << 23).to(tl.float32, bitcast=True), ((254 - e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def e4m3_round(v):
    """fp32 v (|v| <= 448) rounded to the nearest e4m3 value, ties to even, in fp32: v's binade quantum is
    2^(exponent - 3) (2^-9 below the normal range), and v / quantum is rounded by the 1.5 * 2^23 trick. Done
    arithmetically because the interpreter's fp32 -> e4m3 conversion misrounds at binade edges."""
    e = tl.maximum((v.to(tl.int32, bitcast=True) >> 23) & 0xFF, 121) - 3
    quantum = (e << 23).to(tl.float32, bitcast=True)
    inv = ((254 - e) << 23).to(tl.float32, bitcast=True)
    return ((v * inv + 12582912.0) - 12582912.0) * quantum


@triton.jit
def _fp8_fp8_kernel(x_ptr, w_ptr, s_ptr, out_ptr, part_ptr, cnt_ptr, M, N, K, KB, KB_PER, SPLIT, rs_x, rs_w, rs_s,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, REDUCE: tl.constexpr, IEEE: tl.constexpr):
    pid_n, pid_m, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    nmask, mmask = rn < N, rm < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    kb0 = pid_s * KB_PER
    for kb in range(kb0, tl.minimum(kb0 + KB_PER, KB)):
        rk = kb * 128 + tl.arange(0, 128)
        kmask = rk < K
        a = tl.load(x_ptr + rm.to(tl.int64)[:, None] * rs_x + rk[None, :], mask=mmask[:, None] & kmask[None, :],
                    other=0.0).to(tl.float32)
        # 1x128 activation quantisation: power-of-two scale of the row's block amax (at least 1e-4) / 448
        sa, inv = pow2_scale(tl.maximum(tl.max(tl.abs(a), 1), 1e-4) / 448.0)
        q = e4m3_round(tl.minimum(tl.maximum(a * inv[:, None], -448.0), 448.0))
        b = tl.load(w_ptr + rn.to(tl.int64)[:, None] * rs_w + rk[None, :], mask=nmask[:, None] & kmask[None, :],
                    other=0)
        if IEEE:
            part = tl.dot(q, tl.trans(e4m3_values(b.to(tl.int32))), input_precision="ieee")
        else:  # e4m3 x e4m3 tensor-core products (exact: q holds e4m3 values), fp32 sums
            part = tl.dot(q.to(tl.float8e4nv), tl.trans(b.to(tl.float8e4nv, bitcast=True)))
        sw = ue8m0_values(tl.load(s_ptr + (rn // 128) * rs_s + kb, mask=nmask, other=0).to(tl.int32))
        acc += part * sa[:, None] * sw[None, :]
    store_split(acc, part_ptr, cnt_ptr, out_ptr, rm, rn, M, N, SPLIT, REDUCE)


def gemm_config(M: int, N: int, steps: int, device: torch.device, narrow: bool = False
                ) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, K steps per program, num_warps). Few rows (decode): one row tile of 16-64 rows (each
    weight byte is decoded once) and K split (at most MAX_SPLIT ways) until about four programs per SM stream the
    weight (bench/native_gemm.py --configs times the alternatives); many rows
    (prefill): 64/128-row tiles, whole K per program.

    `narrow` (the FP8 weight-only kernel at M <= 16): 32-row output tiles and about two programs per SM, the
    fastest of the --configs sweep on the H100 (bench/results/2026-12-05_h100_629ca84_native_gemm.txt, M = 1-16)
    for every V4-Flash FP8 shape or within 3% of it: wq_a 10.7 -> 7.2 us, wkv 9.6 -> 6.8, wo_a group 10.6 -> 7.2,
    wq_b 17.4 -> 17.0, wo_b 21.4 -> 20.2 (M = 1; the 16/64-row output tiles of this rule's other branch were
    still the better ones at M = 32 and 64)."""
    if M <= 64:
        bm = min(64, max(16, triton.next_power_of_2(M)))
        bn, per_sm = (32, 2) if narrow and M <= 16 else (64, 4)
        tiles = triton.cdiv(N, bn) * triton.cdiv(M, bm)
        split = max(1, min(steps, MAX_SPLIT, (per_sm * multiprocessors(device)) // max(tiles, 1)))
        return bm, bn, triton.cdiv(steps, split), 4
    bm = 64 if M <= 256 else 128
    return bm, 128, steps, 8 if bm == 128 else 4


def _launch(kernel, x: torch.Tensor, w, N: int, K: int, steps: int, config=None, groups: int = 0,
            **flags) -> torch.Tensor:
    """`groups` > 0 (the FP8 weight kernel only): x [..., groups, K] and w [groups * R, K], group g's rows on x's
    g-th K columns -> [..., groups * R]."""
    x2 = x.reshape(-1, K * max(groups, 1))
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if M == 0:
        return x.new_zeros(*x.shape[:-1], N)
    bm, bn, per, warps = config or gemm_config(M, N, steps, x.device, narrow=kernel is _fp8_weight_kernel)
    if groups:
        flags["GROUP_N"] = N // groups
        if (N // groups) % bn:
            raise ValueError(f"grouped FP8 GEMM: {N // groups} rows per group is not a multiple of BLOCK_N={bn}")
    elif kernel is _fp8_weight_kernel:
        flags["GROUP_N"] = N
    split = triton.cdiv(steps, per)
    grid = (triton.cdiv(N, bn), triton.cdiv(M, bm), split)
    data, scale = _rows_contiguous(w.data), _rows_contiguous(w.scale)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    part = torch.empty(split, M, N, dtype=torch.float32, device=x.device)  # unused when split == 1
    kernel[grid](x2, data, scale, out, part, tile_tickets(x.device, grid[0] * grid[1]), M, N, K, steps, per,
                 split, x2.stride(0), data.stride(0), scale.stride(0), BLOCK_M=bm, BLOCK_N=bn,
                 REDUCE=max(1, min(8, 4096 // (bm * bn))), IEEE=interpreted(),
                 num_warps=warps, num_stages=4 if M <= 64 else 3, **flags)
    return out.view(*x.shape[:-2], N) if groups else out.view(*x.shape[:-1], N)


_TICKETS: dict = {}


def tile_tickets(device: torch.device, tiles: int) -> torch.Tensor:
    """int32 zeros, at least `tiles` of them, for store_split's per-tile counters: one buffer per device and
    stream (launches on one stream run one after another, and each leaves its counters at 0 again), grown by
    replacing it."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = _TICKETS.get(key)
    if buf is None or buf.numel() < tiles:
        buf = _TICKETS[key] = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
    return buf


@falls_back_to(ref.linear_fp8_weight)
def linear_fp8_weight(x: torch.Tensor, w: Fp8BlockWeight, config=None, native_fp8: bool | None = None
                      ) -> torch.Tensor:
    """Same contract as ops.reference.packed.linear_fp8_weight. `config` (BLOCK_M, BLOCK_N, K blocks per
    program, warps) overrides gemm_config (benchmark sweeps); `native_fp8` decodes the bytes with the GPU's e4m3
    conversion instead of bit arithmetic (default: where the GPU has one, sm_89+)."""
    N, K = w.shape
    _check(x, K)
    if config is None and dequantises(x, K):
        return _dense_matmul(x, dequant_fp8(w, x.dtype))
    if native_fp8 is None:
        native_fp8 = has_e4m3(x.device)
    return _launch(_fp8_weight_kernel, x, w, N, K, triton.cdiv(K, FP8_BLOCK), config, NATIVE_FP8=native_fp8)


@falls_back_to(ref.linear_fp8_fp8)
def linear_fp8_fp8(x: torch.Tensor, w: Fp8BlockWeight, config=None) -> torch.Tensor:
    """Same contract as ops.reference.packed.linear_fp8_fp8: x quantised per 1x128 block in the kernel, e4m3 x
    e4m3 tensor-core products (sm_89+; the interpreter runs the same arithmetic in fp32)."""
    N, K = w.shape
    _check(x, K)
    return _launch(_fp8_fp8_kernel, x, w, N, K, triton.cdiv(K, FP8_BLOCK), config)


@falls_back_to(ref.linear_fp8_grouped)
def linear_fp8_grouped(x: torch.Tensor, w: Fp8BlockWeight, groups: int, config=None) -> torch.Tensor:
    """Same contract as ops.reference.packed.linear_fp8_grouped (x [..., G, K], w [G * R, K] -> [..., G, R]): one
    launch for all groups (attention's wo_a: 8 head groups), R a multiple of 128; from DEQUANT_MIN_ROWS rows a
    batched matmul on the dequantised weight."""
    N, K = w.shape
    _check(x, K)
    R = N // groups
    if x.shape[-2] != groups or R * groups != N or R % FP8_BLOCK:
        raise ValueError(f"linear_fp8_grouped: x {tuple(x.shape)} and w {w.shape} do not fit [..., {groups}, K] "
                         f"and [{groups} * R, K] with R a multiple of {FP8_BLOCK}")
    if config is None and dequantises(x, groups * K):
        return torch.einsum("...gk,grk->...gr", x, dequant_fp8(w, x.dtype).view(groups, R, K))
    out = _launch(_fp8_weight_kernel, x, w, N, K, triton.cdiv(K, FP8_BLOCK), config, groups=groups,
                  NATIVE_FP8=has_e4m3(x.device))
    return out.view(*x.shape[:-2], groups, R)


@falls_back_to(ref.swiglu_fp8)
def swiglu_fp8(x: torch.Tensor, w1: Fp8BlockWeight, w3: Fp8BlockWeight, limit: float, config=None,
               native_fp8: bool | None = None) -> torch.Tensor:
    """Same contract as ops.reference.packed.swiglu_fp8 (the shared expert's gate, up and SwiGLU): one launch
    reading both weights (decode); from DEQUANT_MIN_ROWS rows, two matmuls on dequantised copies. `config` and
    `native_fp8` as linear_fp8_weight's."""
    N, K = w1.shape
    _check(x, K)
    if tuple(w3.shape) != (N, K):
        raise ValueError(f"swiglu_fp8: w1 {w1.shape} and w3 {w3.shape} differ")
    if config is None and dequantises(x, K):
        return ref.swiglu(_dense_matmul(x, dequant_fp8(w1, x.dtype)), _dense_matmul(x, dequant_fp8(w3, x.dtype)),
                          limit)
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if M == 0:
        return x.new_zeros(*x.shape[:-1], N)
    steps = triton.cdiv(K, FP8_BLOCK)
    bm, bn, per, warps = config or gemm_config(M, N, steps, x.device, narrow=True)
    if config is None:
        bn = min(bn, 64)   # two fp32 accumulators: 64-row output tiles at most (gemm_config gives 128 from M = 65)
    split = triton.cdiv(steps, per)
    grid = (triton.cdiv(N, bn), triton.cdiv(M, bm), split)
    d1, sc1, d3, sc3 = (_rows_contiguous(t) for t in (w1.data, w1.scale, w3.data, w3.scale))
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    part = torch.empty(split, M, 2 * N, dtype=torch.float32, device=x.device)  # unused when split == 1
    _fp8_swiglu_kernel[grid](x2, d1, sc1, d3, sc3, out, part, tile_tickets(x.device, grid[0] * grid[1]), M, N, K,
                             steps, per, split, x2.stride(0), d1.stride(0), sc1.stride(0), d3.stride(0),
                             sc3.stride(0), float(limit), BLOCK_M=bm, BLOCK_N=bn,
                             REDUCE=max(1, min(8, 2048 // (bm * bn))), IEEE=interpreted(),
                             NATIVE_FP8=has_e4m3(x.device) if native_fp8 is None else native_fp8,
                             CLAMP=limit > 0, num_warps=warps,
                             num_stages=4 if M <= 64 else 3)
    return out.view(*x.shape[:-1], N)


def has_e4m3(device: torch.device) -> bool:
    """The GPU converts e4m3 in hardware (sm_89+); False on the CPU (interpreter)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


@falls_back_to(ref.linear_fp4_weight)
def linear_fp4_weight(x: torch.Tensor, w: Fp4GroupWeight, config=None) -> torch.Tensor:
    """Same contract as ops.reference.packed.linear_fp4_weight (w 2-D: one FP4 matrix). Up to FP4_GEMV_MAX_M rows
    run the CUDA-core GEMV (linear_fp4_gemv; `config` is then its own)."""
    if len(w.shape) != 2:
        raise ValueError(f"linear_fp4_weight takes one FP4 matrix [N, K], got {w.shape}")
    N, K = w.shape
    _check(x, K)
    if config is None and dequantises(x, K):
        return _dense_matmul(x, dequant_fp4(w, x.dtype))
    if 0 < x.numel() // max(K, 1) <= min(FP4_GEMV_MAX_M, GEMV_MAX_ROWS):
        return linear_fp4_gemv(x, w, config)
    return _launch(_fp4_weight_kernel, x, w, N, K, triton.cdiv(K, FP4_STEP), config,
                   DECODE=FP4_DECODE)


def gemv_config(M: int, N: int, K: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, K steps per program, num_warps) of the FP4 GEMV: all M rows in one program, GEMV_BLOCK_N
    weight rows, K split (at most MAX_SPLIT ways) until about four programs per SM stream the weight. Registers
    (Triton 3.6, sm_90, 64-word steps): 126 at M = 1 with 32 weight rows (4 programs of 128 threads fit an SM),
    121 / 158 at M = 2 / 4 with 16 (32 rows: 168 / 255)."""
    bn = GEMV_BLOCK_N[0] if M == 1 else GEMV_BLOCK_N[1]
    steps = triton.cdiv(K, 8 * GEMV_WORDS)
    tiles = triton.cdiv(N, bn)
    split = max(1, min(steps, MAX_SPLIT, (4 * multiprocessors(device)) // tiles))
    return triton.next_power_of_2(M), bn, triton.cdiv(steps, split), 4


def linear_fp4_gemv(x: torch.Tensor, w: Fp4GroupWeight, config=None) -> torch.Tensor:
    """linear_fp4_weight's contract for x of at most GEMV_MAX_ROWS rows (after flattening the leading dims) on
    _fp4_gemv_kernel; `config` overrides gemv_config (its K steps are GEMV_WORDS words each)."""
    N, K = w.shape
    _check(x, K)
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if M > GEMV_MAX_ROWS:
        raise ValueError(f"the FP4 GEMV takes at most {GEMV_MAX_ROWS} rows, got {M}")
    if M == 0:
        return x.new_zeros(*x.shape[:-1], N)
    bm, bn, per, warps = config or gemv_config(M, N, K, x.device)
    if bm < M or bm > GEMV_MAX_ROWS:
        raise ValueError(f"FP4 GEMV: BLOCK_M {bm} must hold the {M} rows and be at most {GEMV_MAX_ROWS}")
    steps = triton.cdiv(K, 8 * GEMV_WORDS)
    split = triton.cdiv(steps, per)
    grid = (triton.cdiv(N, bn), 1, split)
    data, scale = _rows_contiguous(w.data), _rows_contiguous(w.scale)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    part = torch.empty(split, M, N, dtype=torch.float32, device=x.device)  # unused when split == 1
    _fp4_gemv_kernel[grid](x2, data, scale, out, part, tile_tickets(x.device, grid[0]), M, N, K, steps, per, split,
                           x2.stride(0), data.stride(0), scale.stride(0), BLOCK_M=bm, BLOCK_N=bn, WORDS=GEMV_WORDS,
                           REDUCE=max(1, min(8, 4096 // (bm * bn))), num_warps=warps, num_stages=1)
    return out.view(*x.shape[:-1], N)


def dequantises(x: torch.Tensor, K: int) -> bool:
    """The call runs on a dequantised bf16 copy of the weight (DEQUANT_MIN_ROWS rows or more); a static-shape
    decision, so a captured CUDA graph always takes the same path."""
    return x.numel() // max(K, 1) >= DEQUANT_MIN_ROWS


def _dense_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w^T for a scratch weight w [N, K] in x's dtype (fp32 accumulation inside the GEMM)."""
    return torch.matmul(x, w.t())


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """t with unit stride along its last dim (the kernels take a row stride, so a row slice stays a view)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _check(x: torch.Tensor, K: int) -> None:
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features, the weight takes K={K}")


def supports(x: torch.Tensor, w) -> bool:
    """bf16 activations on a GPU, no autograd (the packed weights are inference-only)."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and w.device == x.device and x.numel() > 0
            and not (torch.is_grad_enabled() and x.requires_grad))


def supports_fp8_fp8(x: torch.Tensor, w) -> bool:
    return supports(x, w) and has_e4m3(x.device)


def supports_grouped(x: torch.Tensor, w, groups: int) -> bool:
    return supports(x, w) and w.shape[0] % (groups * FP8_BLOCK) == 0


def supports_swiglu(x: torch.Tensor, w1, w3, limit: float) -> bool:
    return supports(x, w1)


def supports_fp4(x: torch.Tensor, w) -> bool:
    return supports(x, w) and len(w.shape) == 2

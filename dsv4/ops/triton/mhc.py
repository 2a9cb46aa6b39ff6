"""mHC lane arithmetic in one pass over the lanes: the collapse sum_i w_i lane_i (inference) and the post mix
post_k f + sum_j comb[j, k] lane_j (inference, and training with a backward of its own). The reference
materialises fp32 copies of all R lanes several times per call (on a prefill chunk, gigabytes per sublayer); here
each lane element is read once, mixed in fp32 registers and written once in the activation dtype. `hc_mixes`
computes the mixing logits fn . x / rms(x) from the bf16 lanes directly, with exact fp32 products on the tensor
cores (fn split into three bf16 parts), and has a backward for training: two passes over the lanes instead of the
skinny fp32 GEMMs ([tokens, 16384] x [16384, 24]) that cuBLAS runs on CUDA cores with little parallelism."""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from .launch import autograd_tracks, interpreted, training_kernels_enabled
from .linear import bf16_parts


@triton.jit
def _collapse_kernel(x_ptr, w_ptr, y_ptr, C, R: tl.constexpr, RP: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)  # token: t * R * C passes 2^31 at 128K tokens of 4 x 4096 lanes
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    r = tl.arange(0, RP)
    m = (r[:, None] < R) & (cs[None, :] < C)
    x = tl.load(x_ptr + t * R * C + r[:, None] * C + cs[None, :], mask=m, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + t * R + r, mask=r < R, other=0.0)
    tl.store(y_ptr + t * C + cs, tl.sum(w[:, None] * x, 0).to(y_ptr.dtype.element_ty), mask=cs < C)


@triton.jit
def _post_kernel(f_ptr, x_ptr, post_ptr, comb_ptr, out_ptr, C, R: tl.constexpr, RP: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)  # (int64 offsets, as in _collapse_kernel)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cs < C
    r = tl.arange(0, RP)
    x = tl.load(x_ptr + t * R * C + r[:, None] * C + cs[None, :], mask=(r[:, None] < R) & cm[None, :],
                other=0.0).to(tl.float32)
    f = tl.load(f_ptr + t * C + cs, mask=cm, other=0.0).to(tl.float32)
    for k in tl.static_range(R):
        col = tl.load(comb_ptr + t * R * R + r * R + k, mask=r < R, other=0.0)      # comb[:, k]
        y = tl.load(post_ptr + t * R + k) * f + tl.sum(col[:, None] * x, 0)
        tl.store(out_ptr + t * R * C + k * C + cs, y.to(out_ptr.dtype.element_ty), mask=cm)


@triton.jit
def _post_bwd_kernel(g_ptr, f_ptr, x_ptr, post_ptr, comb_ptr, df_ptr, dx_ptr, dpost_ptr, dcomb_ptr, C,
                     R: tl.constexpr, RP: tl.constexpr, BLOCK_C: tl.constexpr):
    """One token of the post mix's backward, g = d lane': df = sum_k post_k g_k, d lane_j = sum_k comb[j, k] g_k,
    d post_k = g_k . f, d comb[j, k] = lane_j . g_k (fp32 sums over the channels, in blocks)."""
    t = tl.program_id(0).to(tl.int64)  # (int64 offsets, as in _collapse_kernel)
    r = tl.arange(0, RP)
    rm = r < R
    dpost = tl.zeros([RP], tl.float32)
    dcomb = tl.zeros([RP, RP], tl.float32)                                   # [j, k]
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        cm = cs < C
        x = tl.load(x_ptr + t * R * C + r[:, None] * C + cs[None, :], mask=rm[:, None] & cm[None, :],
                    other=0.0).to(tl.float32)                                 # [j, c]
        f = tl.load(f_ptr + t * C + cs, mask=cm, other=0.0).to(tl.float32)
        df = tl.zeros([BLOCK_C], tl.float32)
        dx = tl.zeros([RP, BLOCK_C], tl.float32)
        for k in tl.static_range(R):
            g = tl.load(g_ptr + t * R * C + k * C + cs, mask=cm, other=0.0).to(tl.float32)
            col = tl.load(comb_ptr + t * R * R + r * R + k, mask=rm, other=0.0)      # comb[:, k]
            df += tl.load(post_ptr + t * R + k) * g
            dx += col[:, None] * g[None, :]
            dpost += tl.where(r == k, tl.sum(g * f, 0), 0.0)
            dcomb += tl.where(r[None, :] == k, tl.sum(x * g[None, :], 1)[:, None], 0.0)
        tl.store(df_ptr + t * C + cs, df.to(df_ptr.dtype.element_ty), mask=cm)
        tl.store(dx_ptr + t * R * C + r[:, None] * C + cs[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=rm[:, None] & cm[None, :])
    tl.store(dpost_ptr + t * R + r, dpost, mask=rm)
    tl.store(dcomb_ptr + t * R * R + r[:, None] * R + r[None, :], dcomb, mask=rm[:, None] & rm[None, :])


@triton.jit
def _mixes_kernel(x_ptr, w_ptr, part_ptr, ss_ptr, out_ptr, r_ptr, N, K, k_split, eps, M: tl.constexpr, MP: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FINAL: tl.constexpr, IEEE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    rm = rows < N
    ms = tl.arange(0, MP)
    acc = tl.zeros([BLOCK_N, MP], tl.float32)
    ss = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(split * k_split, (split + 1) * k_split, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * K + ks[None, :], mask=rm[:, None], other=0.0)
        xf = x.to(tl.float32)
        ss += tl.sum(xf * xf, 1)
        for p in tl.static_range(3):  # bf16 x times each bf16 part of fn: exact products, fp32 sums
            w = tl.load(w_ptr + p * MP * K + ms[None, :] * K + ks[:, None])
            if IEEE:  # the same exact products in fp32 FMAs (the CPU interpreter has no reliable bf16 dot)
                acc = tl.dot(xf, w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w, acc)
    if FINAL:
        r = 1.0 / tl.sqrt(ss / K + eps)
        tl.store(out_ptr + rows[:, None] * M + ms[None, :], acc * r[:, None], mask=rm[:, None] & (ms[None, :] < M))
        tl.store(r_ptr + rows, r, mask=rm)
    else:
        tl.store(part_ptr + (split * N + rows[:, None]) * MP + ms[None, :], acc, mask=rm[:, None])
        tl.store(ss_ptr + split * N + rows, ss, mask=rm)


@triton.jit
def _mixes_reduce_kernel(part_ptr, ss_ptr, out_ptr, r_ptr, N, K, eps, SPLIT: tl.constexpr, M: tl.constexpr,
                         MP: tl.constexpr):
    row = tl.program_id(0)
    sp = tl.arange(0, SPLIT)
    ms = tl.arange(0, MP)
    # all parts in one load, summed in a fixed order: the result does not depend on the batch
    acc = tl.sum(tl.load(part_ptr + (sp[:, None] * N + row) * MP + ms[None, :]), 0)
    ss = tl.sum(tl.load(ss_ptr + sp * N + row), 0)
    r = 1.0 / tl.sqrt(ss / K + eps)
    tl.store(out_ptr + row * M + ms, acc * r, mask=ms < M)
    tl.store(r_ptr + row, r)


def _mixes_forward(x2: torch.Tensor, fn: torch.Tensor, eps: float,
                   cached: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 [N, K] bf16, fn [M, K] fp32 -> (mixes [N, M] fp32, 1/rms per row [N] fp32). cached: the split of fn into
    bf16 parts kept on fn (inference); training splits the weight it reads now (see bf16_parts)."""
    N, K = x2.shape
    M = fn.shape[0]
    MP = max(16, triton.next_power_of_2(M))
    parts = bf16_parts(fn, MP, cache=cached)
    out = torch.empty(N, M, dtype=torch.float32, device=x2.device)
    r = torch.empty(N, dtype=torch.float32, device=x2.device)
    block_n, block_k = (16, 128) if N <= 64 else (64, 64)
    n_blocks = triton.cdiv(N, block_n)
    split = 1
    while split < 64 and n_blocks * split < 128 and (K // block_k) % (2 * split) == 0:
        split *= 2  # few rows (decode): spread K over the GPU, then sum the parts in a fixed order
    common = dict(M=M, MP=MP, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=interpreted(), num_warps=4)
    if split == 1:
        _mixes_kernel[(n_blocks, 1)](x2, parts, out, out, out, r, N, K, K, eps, FINAL=True, **common)
    else:
        part = torch.empty(split, N, MP, dtype=torch.float32, device=x2.device)
        ss = torch.empty(split, N, dtype=torch.float32, device=x2.device)
        _mixes_kernel[(n_blocks, split)](x2, parts, part, ss, out, r, N, K, K // split, eps, FINAL=False, **common)
        _mixes_reduce_kernel[(N,)](part, ss, out, r, N, K, eps, SPLIT=split, M=M, MP=MP, num_warps=4)
    return out, r


@triton.jit
def _mixes_dfn_kernel(dy_ptr, x_ptr, part_ptr, N, K, n_per_split, M: tl.constexpr, MP: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Partial d fn = dy^T x over one split of the rows, for one block of columns: [MP, BLOCK_K] fp32."""
    ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(1)
    ms = tl.arange(0, MP)
    acc = tl.zeros([MP, BLOCK_K], tl.float32)
    n_hi = tl.minimum(N, (split + 1) * n_per_split)
    for n0 in range(split * n_per_split, n_hi, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        rm = rows < n_hi
        dy = tl.load(dy_ptr + rows[None, :] * M + ms[:, None], mask=rm[None, :] & (ms[:, None] < M), other=0.0)
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * K + ks[None, :], mask=rm[:, None], other=0.0)
        acc = tl.dot(dy, x.to(tl.float32), acc, input_precision="ieee")     # fp32 FMAs: tiny FLOPs, exact
    tl.store(part_ptr + (split * MP + ms[:, None]) * K + ks[None, :], acc)


@triton.jit
def _mixes_dx_kernel(dy_ptr, fn_ptr, x_ptr, c_ptr, dx_ptr, N, K, M: tl.constexpr, MP: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dx = dy fn - c * x for a tile of rows x columns (c: the 1/rms term per row), in x's dtype."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    rm = rows < N
    ms = tl.arange(0, MP)
    dy = tl.load(dy_ptr + rows[:, None] * M + ms[None, :], mask=rm[:, None] & (ms[None, :] < M), other=0.0)
    fn = tl.load(fn_ptr + ms[:, None] * K + ks[None, :], mask=ms[:, None] < M, other=0.0)
    at = rows.to(tl.int64)[:, None] * K + ks[None, :]
    x = tl.load(x_ptr + at, mask=rm[:, None], other=0.0).to(tl.float32)
    c = tl.load(c_ptr + rows, mask=rm, other=0.0)
    dx = tl.dot(dy, fn, input_precision="ieee") - c[:, None] * x
    tl.store(dx_ptr + at, dx.to(dx_ptr.dtype.element_ty), mask=rm[:, None])


class _Mixes(torch.autograd.Function):
    """Training: the forward kernel above, and a backward in two passes over the lanes. With mixes = (x fn^T) r,
    r = 1/rms(x) and dy = dmixes * r: d fn = dy^T x, dx = dy fn - (sum_m dmixes * mixes) r^2 / K * x."""

    @staticmethod
    def forward(ctx, x2, fn, eps):
        out, r = _mixes_forward(x2, fn, eps, cached=False)  # fn moves every step: its split is part of the step
        ctx.save_for_backward(x2, fn, out, r)
        return out

    @staticmethod
    def backward(ctx, dout):
        x2, fn, out, r = ctx.saved_tensors
        N, K = x2.shape
        M = fn.shape[0]
        MP = max(16, triton.next_power_of_2(M))
        dout = dout.float().contiguous()
        dy = (dout * r[:, None]).contiguous()
        c = ((dout * out).sum(-1) * r * r / K).contiguous()
        fn32 = fn.float().contiguous()
        block_k = 64
        splits = max(1, min(32, N // 256))
        per = triton.cdiv(N, splits)
        part = torch.empty(splits, MP, K, dtype=torch.float32, device=x2.device)
        _mixes_dfn_kernel[(triton.cdiv(K, block_k), splits)](dy, x2, part, N, K, per, M=M, MP=MP, BLOCK_N=32,
                                                              BLOCK_K=block_k, num_warps=4)
        dfn = part.sum(0)[:M]
        dx = torch.empty_like(x2)
        _mixes_dx_kernel[(triton.cdiv(N, 32), triton.cdiv(K, 128))](dy, fn32, x2, c, dx, N, K, M=M, MP=MP,
                                                                    BLOCK_N=32, BLOCK_K=128, num_warps=4)
        return dx, dfn.to(fn.dtype), None


def hc_mixes(x: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """Same contract as ops.reference.mhc.hc_mixes (x bf16 lanes [..., R, C], fn fp32 [M, R*C]); differentiable."""
    *lead, R, C = x.shape
    x2 = x.reshape(-1, R * C)
    if torch.is_grad_enabled() and (x.requires_grad or fn.requires_grad):
        return _Mixes.apply(x2, fn, eps).view(*lead, fn.shape[0])
    return _mixes_forward(x2, fn, eps)[0].view(*lead, fn.shape[0])


def supports_mixes(x: torch.Tensor, fn: torch.Tensor, *args) -> bool:
    """Inference; training too (a backward of its own) when the Triton training kernels are opted into."""
    training = autograd_tracks(x, fn)
    return (x.is_cuda and x.dtype == torch.bfloat16 and x.is_contiguous() and (not training or training_kernels_enabled())
            and (x.shape[-1] * x.shape[-2]) % 128 == 0 and fn.shape[0] <= 64 and x.numel() > 0)


def _grid(T: int, C: int, block: int) -> tuple[int, int]:
    return T, triton.cdiv(C, block)


def hc_collapse(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Same contract as ops.reference.mhc.hc_collapse."""
    *lead, R, C = x.shape
    x = x.contiguous()
    w = weights.float().contiguous()
    y = torch.empty(*lead, C, dtype=x.dtype, device=x.device)
    T = y.numel() // C
    _collapse_kernel[_grid(T, C, 1024)](x, w, y, C, R=R, RP=triton.next_power_of_2(R), BLOCK_C=1024, num_warps=4)
    return y


def _post_forward(f: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    R, C = residual.shape[-2:]
    out = torch.empty(residual.shape, dtype=f.dtype, device=f.device)
    _post_kernel[_grid(f.numel() // C, C, 1024)](f, residual, post, comb, out, C, R=R, RP=triton.next_power_of_2(R),
                                                 BLOCK_C=1024, num_warps=4)
    return out


class _Post(torch.autograd.Function):
    """Training: the post mix and its backward, each one pass over the lanes. (Compiled, the reference's 4x4 lane
    mixing became batched fp32 GEMMs with K = 4 on CUDA cores: ~4 ms per sublayer of a 4K-token V4-Flash step.)"""

    @staticmethod
    def forward(ctx, f, residual, post, comb):
        ctx.save_for_backward(f, residual, post, comb)
        return _post_forward(f, residual, post, comb)

    @staticmethod
    def backward(ctx, g):
        f, residual, post, comb = ctx.saved_tensors
        R, C = residual.shape[-2:]
        g = g.contiguous()
        df, dx = torch.empty_like(f), torch.empty_like(residual)
        dpost, dcomb = torch.empty_like(post), torch.empty_like(comb)
        _post_bwd_kernel[(f.numel() // C,)](g, f, residual, post, comb, df, dx, dpost, dcomb, C, R=R,
                                            RP=triton.next_power_of_2(R), BLOCK_C=512, num_warps=4)
        return df, dx, dpost, dcomb


def hc_post(f: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """Same contract as ops.reference.mhc.hc_post; differentiable (gradients for all four inputs)."""
    f, residual = f.contiguous(), residual.contiguous()
    post, comb = post.float().contiguous(), comb.float().contiguous()
    if autograd_tracks(f, residual, post, comb):
        return _Post.apply(f, residual, post, comb)
    return _post_forward(f, residual, post, comb)


def supports(x: torch.Tensor, *args) -> bool:
    """CUDA tensors without autograd (training keeps the differentiable reference)."""
    return x.is_cuda and not autograd_tracks(x, *args)


def supports_post(f: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> bool:
    """Inference; training too (a backward of its own) unless the Triton training kernels are turned off."""
    return f.is_cuda and (not autograd_tracks(f, residual, post, comb) or training_kernels_enabled())

"""x @ w^T with fp32 products and fp32 output for bf16 activations and fp32 weights (forward only), on the bf16
tensor cores: w is split once into bf16 parts hi + mid + lo whose sum is w exactly (8 + 8 + 8 significand bits),
every product of a bf16 x with a part is exact in fp32, and the sums run in fp32, as in an fp32 GEMM. V4 keeps
its compressor, router and LM head in fp32; on H100 an fp32 GEMM runs on CUDA cores at ~50 TFLOP/s, three bf16
GEMMs on tensor cores several times faster. Weights that hold bf16 values (the LM head of a bf16 checkpoint) need
one part: half the bytes of the fp32 weight, which is what a decode step's matrix-vector product is bound by."""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from .launch import interpreted


def bf16_parts(w: torch.Tensor, rows: int | None = None, trim: bool = False, cache: bool = True) -> torch.Tensor:
    """w (fp32 [N, K]) as bf16 parts [P, rows, K] summing to w exactly (zero rows beyond N). trim: drop trailing
    parts that are all zero (one host check, once). Kept on the tensor until w changes in place; then rewritten
    where it lies (same shape), so a CUDA graph that captured a read of it never reads freed memory.

    cache=False: split w now, nothing kept (training, where w changes every step: a captured step must split the
    weight it reads at each replay, not read the split of its capture)."""
    rows = rows or w.shape[0]
    key = (_version(w), w.data_ptr(), rows, trim)
    cached = getattr(w, "_dsv4_bf16_parts", None) if cache else None
    if cached is not None and cached[0] == key:
        return cached[1]
    rest = w.detach().float()
    parts = []
    for _ in range(3):
        parts.append(rest.to(torch.bfloat16))
        rest = rest - parts[-1].float()
        if trim and not bool(rest.any()):
            break
    out = torch.zeros(len(parts), rows, w.shape[1], dtype=torch.bfloat16, device=w.device)
    out[:, :w.shape[0]] = torch.stack(parts)
    if not cache:
        return out
    if cached is not None and cached[1].shape == out.shape:
        out = cached[1].copy_(out)
    w._dsv4_bf16_parts = (key, out)
    return out


def _version(w: torch.Tensor) -> int:
    """w's in-place version; tensors made under torch.inference_mode keep none (-1: assumed unchanged)."""
    try:
        return w._version
    except RuntimeError:
        return -1


@triton.jit
def _split_mm_kernel(x_ptr, w_ptr, out_ptr, M, N, K, P: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0)
    n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    first = pid // (GROUP_M * n_n) * GROUP_M      # row blocks in groups: neighbours share weight tiles in L2
    size = tl.minimum(n_m - first, GROUP_M)
    pid_m = first + (pid % (GROUP_M * n_n)) % size
    pid_n = (pid % (GROUP_M * n_n)) // size
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        km = rk[None, :] < K
        a = tl.load(x_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & km, other=0.0)
        for p in tl.static_range(P):
            w = tl.load(w_ptr + p * N * K + rn.to(tl.int64)[:, None] * K + rk[None, :], mask=(rn[:, None] < N) & km,
                        other=0.0)
            if IEEE:  # the same exact products in fp32 FMAs (the CPU interpreter has no reliable bf16 dot)
                acc = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(w), acc)
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def linear_fp32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Same contract as ops.reference.linear.linear_fp32 (x bf16 [..., K], w fp32 or bf16 [N, K] -> fp32 [..., N]).

    A weight of one part (bf16 values: a bf16 checkpoint's head, compressors and routers) runs as cuBLAS's bf16
    GEMM with fp32 output, the same exact products summed in fp32: at decode sizes it reads the weight at the
    copy rate where this kernel's few programs do not (bench/fp32_linear.py, H100: a [1024, 4096] compressor
    8.4 against 17.5 us, the [32768, 4096] head at 64 rows 106 against 151 us)."""
    K, N = x.shape[-1], w.shape[0]
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    parts = bf16_parts(w, trim=True)
    if parts.shape[0] == 1 and x.is_cuda and not interpreted():
        return torch.mm(x2, parts[0].t(), out_dtype=torch.float32).view(*x.shape[:-1], N)
    out = torch.empty(M, N, dtype=torch.float32, device=x.device)
    bm = 128 if M >= 128 else 16
    bn = min(128, max(16, triton.next_power_of_2(N))) if M >= 128 else 64
    bk = 64 if M >= 128 else 128
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _split_mm_kernel[grid](x2, parts, out, M, N, K, P=parts.shape[0], BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                           IEEE=interpreted(), num_warps=8 if M >= 128 else 4,
                           num_stages=3)
    return out.view(*x.shape[:-1], N)


def supports(x: torch.Tensor, w: torch.Tensor) -> bool:
    """bf16 activations on a GPU, no autograd, fp32 weights or bf16 ones (the router's: one part, no fp32 copies of
    x and w per call); few rows (decode) only where w needs one part (else the fp32 matrix-vector product reads
    fewer bytes than three bf16 parts)."""
    if not (x.is_cuda and x.dtype == torch.bfloat16 and w.dtype in (torch.float32, torch.bfloat16) and w.dim() == 2
            and x.numel() and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
        return False
    return x.numel() // x.shape[-1] >= 64 or bf16_parts(w, trim=True).shape[0] == 1

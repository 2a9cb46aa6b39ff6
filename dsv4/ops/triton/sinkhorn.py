"""mHC weights in one kernel: sigmoid pre/post and the Sinkhorn-Knopp projection of the 4x4 residual mixing,
with every token's matrix in registers (the reference launches ~90 small kernels per call). Forward only:
used where no gradient is needed (inference); training keeps the differentiable reference."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _hc_kernel(mix_ptr, scale_ptr, base_ptr, pre_ptr, post_ptr, comb_ptr, N, iters, eps,
               HC: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < N
    width = (2 + HC) * HC
    j = tl.arange(0, HC)
    s0 = tl.load(scale_ptr)
    s1 = tl.load(scale_ptr + 1)
    s2 = tl.load(scale_ptr + 2)
    pre = tl.load(mix_ptr + rows[:, None] * width + j[None, :], mask=ok[:, None], other=0.0) * s0 \
        + tl.load(base_ptr + j)[None, :]
    tl.store(pre_ptr + rows[:, None] * HC + j[None, :], tl.sigmoid(pre) + eps, mask=ok[:, None])
    post = tl.load(mix_ptr + rows[:, None] * width + HC + j[None, :], mask=ok[:, None], other=0.0) * s1 \
        + tl.load(base_ptr + HC + j)[None, :]
    tl.store(post_ptr + rows[:, None] * HC + j[None, :], 2 * tl.sigmoid(post), mask=ok[:, None])
    k = tl.arange(0, HC * HC)
    c = tl.load(mix_ptr + rows[:, None] * width + 2 * HC + k[None, :], mask=ok[:, None], other=0.0) * s2 \
        + tl.load(base_ptr + 2 * HC + k)[None, :]
    c = tl.reshape(c, (BLOCK, HC, HC))
    c = tl.exp(c - tl.max(c, 2)[:, :, None])
    c = c / tl.sum(c, 2)[:, :, None] + eps                  # row softmax, + eps
    c = c / (tl.sum(c, 1)[:, None, :] + eps)                # one column normalisation
    for _ in range(iters - 1):
        c = c / (tl.sum(c, 2)[:, :, None] + eps)
        c = c / (tl.sum(c, 1)[:, None, :] + eps)
    tl.store(comb_ptr + rows[:, None] * (HC * HC) + k[None, :], tl.reshape(c, (BLOCK, HC * HC)), mask=ok[:, None])


def hc_split_sinkhorn(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc: int, iters: int,
                      eps: float):
    """Same contract as ops.reference.sinkhorn.hc_split_sinkhorn (fp32 outputs)."""
    shape = mixes.shape[:-1]
    m = mixes.reshape(-1, mixes.shape[-1]).float().contiguous()
    N = m.shape[0]
    pre = torch.empty(N, hc, device=m.device)
    post = torch.empty(N, hc, device=m.device)
    comb = torch.empty(N, hc * hc, device=m.device)
    block = 64
    _hc_kernel[(triton.cdiv(N, block),)](m, scale.float().contiguous(), base.float().contiguous(), pre, post,
                                         comb, N, iters, eps, HC=hc, BLOCK=block, num_warps=4)
    return pre.view(*shape, hc), post.view(*shape, hc), comb.view(*shape, hc, hc)


def supports(mixes: torch.Tensor, *args) -> bool:
    hc = int(round((mixes.shape[-1] + 1) ** 0.5 - 1))        # (2 + hc) * hc logits
    return (mixes.is_cuda and (2 + hc) * hc == mixes.shape[-1] and hc & (hc - 1) == 0
            and not (torch.is_grad_enabled() and mixes.requires_grad))

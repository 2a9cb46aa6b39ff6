"""RMSNorm as V4 computes it (fp32 math with an fp32 weight, result cast back to the input dtype), and the
linear layers; both run through dsv4.ops, so they follow its modes (batch-invariant mode included)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..quant.packed import FP8_BLOCK, Fp8BlockWeight


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class Linear(nn.Linear):
    """nn.Linear without bias (the checkpoint's `.weight` name) whose matmul is the op `linear`; or, after
    `pack_fp8`, an inference layer holding the checkpoint's FP8 bytes and tile scales (buffers `qweight`,
    `qscale`) in place of the weight, multiplied by `linear_fp8_weight`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)

    def pack_fp8(self) -> None:
        """Replace the weight parameter by empty FP8 buffers (e4m3 bytes [N, K], UE8M0 scales per 128x128 tile) on
        its device, for the loader to fill (build on the meta device: nothing is allocated until then)."""
        if self.bias is not None:
            raise ValueError("pack_fp8: layers with a bias are not packed (no V4 layer has one)")
        (N, K), dev = self.weight.shape, self.weight.device   # (a tensor-parallel rank's shape)
        del self.weight
        self.register_buffer("qweight", torch.empty(N, K, dtype=torch.uint8, device=dev))
        self.register_buffer("qscale", torch.empty(-(-N // FP8_BLOCK), -(-K // FP8_BLOCK), dtype=torch.uint8,
                                                   device=dev))

    @property
    def packed(self) -> Fp8BlockWeight | None:
        """The FP8 weight after pack_fp8, else None."""
        if "qweight" not in self._buffers:
            return None
        return Fp8BlockWeight(self.qweight, self.qscale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "qweight" in self._buffers:
            return ops.linear_fp8_weight(x, self.packed)
        if self.bias is not None:  # (no V4 layer has one)
            return F.linear(x, self.weight, self.bias)
        return ops.linear(x, self.weight)

"""Weights kept in the official checkpoint's own formats (docs/architecture.md#number-formats): the packed bytes and
their UE8M0 scales, never a bf16 copy. The GEMMs in dsv4.ops read these and dequantise in registers.

* `Fp8BlockWeight`: e4m3 bytes [N, K] with one scale per 128x128 tile, [ceil(N/128), ceil(K/128)] (attention,
  shared expert, indexer and MTP projections).
* `Fp4GroupWeight`: e2m1 codes packed two per byte [..., N, K/2] (low nibble = even k) with one scale per 1x32
  block along K, [..., N, K/32]; a leading expert dimension stacks the routed experts.

Both hold uint8 tensors (no float8 dtype needed, so they live on any device) and decode them here with integer
arithmetic, bit for bit as the kernels do; `dequantize` is the reference those kernels are tested against and
equals the checkpoint loader's float8-typed dequantisation (dequant_fp8_blocks / dequant_fp4_blocks).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import quantize_fp4_blocks, quantize_fp8_blocks

FP8_BLOCK = 128  # weight tile of one FP8 scale (both dims)
FP4_GROUP = 32   # values along K per FP4 scale

__all__ = ["Fp8BlockWeight", "Fp4GroupWeight", "PackedWeight", "decode_e4m3", "decode_e2m1", "ue8m0_exponent",
           "FP8_BLOCK", "FP4_GROUP"]


def _u8(t: torch.Tensor) -> torch.Tensor:
    if t.element_size() != 1:
        raise TypeError(f"packed weights hold 1-byte tensors, got {t.dtype}")
    return t if t.dtype == torch.uint8 else t.view(torch.uint8)


def ue8m0_exponent(scale: torch.Tensor) -> torch.Tensor:
    """UE8M0 bytes -> 2**(b - 127) in fp32, built from the exponent bits (byte 0 gives 0 rather than 2**-127 and
    255 gives inf rather than NaN: neither occurs in a checkpoint, and the kernels decode the same way)."""
    return (scale.to(torch.int32) << 23).view(torch.float32)


def decode_e4m3(b: torch.Tensor) -> torch.Tensor:
    """e4m3fn bytes (uint8) -> fp32 values by integer arithmetic (sm80 has no e4m3 type in Triton; the kernels
    decode exactly so): a normal value's exponent and mantissa bits move into an fp32 with the bias changed from 7
    to 127 (+120); a subnormal (exponent 0) is m * 2**-9. 0x7F/0xFF (NaN) do not occur in weights."""
    i = b.to(torch.int32)
    normal = (((i & 0x7F) << 20) + (120 << 23)).view(torch.float32)
    mag = torch.where((i & 0x78) == 0, (i & 7).float() * 2.0 ** -9, normal)
    return torch.where(i >= 0x80, -mag, mag)


def decode_e2m1(code: torch.Tensor) -> torch.Tensor:
    """4-bit e2m1 codes (any int dtype, 0..15) -> fp32: bit 3 sign, bits 0-2 the magnitude index of
    (0, .5, 1, 1.5, 2, 3, 4, 6)."""
    i = code.to(torch.int32)
    m = (i & 7).float()
    mag = torch.where(m <= 4, m * 0.5, torch.where(m == 7, 6.0, m - 2))
    return torch.where(i >= 8, -mag, mag)


class _PackedBytes:
    """What both packed formats share: uint8 `data` and UE8M0 `scale` tensors on one device."""
    data: torch.Tensor
    scale: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel() + self.scale.numel()


@dataclass
class Fp8BlockWeight(_PackedBytes):
    """An FP8 e4m3 weight [N, K] (x @ w^T) with one UE8M0 scale per 128x128 tile."""
    data: torch.Tensor   # uint8 [N, K]: e4m3 bit patterns
    scale: torch.Tensor  # uint8 [ceil(N/128), ceil(K/128)]: UE8M0 exponents

    def __post_init__(self):
        self.data, self.scale = _u8(self.data), _u8(self.scale)
        if self.data.dim() != 2:
            raise ValueError(f"Fp8BlockWeight data must be [N, K], got {tuple(self.data.shape)}")
        N, K = self.data.shape
        want = (-(-N // FP8_BLOCK), -(-K // FP8_BLOCK))
        if tuple(self.scale.shape) != want:
            raise ValueError(f"Fp8BlockWeight {N}x{K} needs a scale of shape {want}, got {tuple(self.scale.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.data.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[N, K] values: e4m3(data) * 2**(scale - 127) per tile (exact in fp32 and in bf16)."""
        N, K = self.shape
        s = ue8m0_exponent(self.scale).repeat_interleave(FP8_BLOCK, 0)[:N].repeat_interleave(FP8_BLOCK, 1)[:, :K]
        return (decode_e4m3(self.data) * s).to(dtype)

    def rows(self, start: int, stop: int) -> "Fp8BlockWeight":
        """Output rows [start, stop) as a weight of its own (views, no copy); both ends on 128-row tiles (or
        stop = N), so that the tiles' scales split with them."""
        N = self.shape[0]
        if start % FP8_BLOCK or (stop % FP8_BLOCK and stop != N) or not 0 <= start < stop <= N:
            raise ValueError(f"rows [{start}, {stop}) of an FP8 weight with {N} rows do not fall on its "
                             f"{FP8_BLOCK}-row scale tiles")
        return Fp8BlockWeight(self.data[start:stop], self.scale[start // FP8_BLOCK: -(-stop // FP8_BLOCK)])

    @classmethod
    def quantize(cls, w: torch.Tensor) -> "Fp8BlockWeight":
        """fp [N, K] -> e4m3 with power-of-two tile scales 2**ceil(log2(amax / 448)), as the official weights."""
        q, s = quantize_fp8_blocks(w)
        return cls(q.view(torch.uint8).contiguous(), s)


@dataclass
class Fp4GroupWeight(_PackedBytes):
    """FP4 e2m1 weights [..., N, K] (x @ w^T per leading index) with one UE8M0 scale per 32 values along K."""
    data: torch.Tensor   # uint8 [..., N, K/2]: two codes per byte, the low nibble holds the even k
    scale: torch.Tensor  # uint8 [..., N, K/32]

    def __post_init__(self):
        self.data, self.scale = _u8(self.data), _u8(self.scale)
        if self.data.dim() < 2:
            raise ValueError(f"Fp4GroupWeight data must be [..., N, K/2], got {tuple(self.data.shape)}")
        *lead, N, half = self.data.shape
        if (2 * half) % FP4_GROUP:
            raise ValueError(f"Fp4GroupWeight K={2 * half} is not a multiple of the {FP4_GROUP}-value scale group")
        want = (*lead, N, 2 * half // FP4_GROUP)
        if tuple(self.scale.shape) != want:
            raise ValueError(f"Fp4GroupWeight {(*lead, N, 2 * half)} needs a scale of shape {want}, got "
                             f"{tuple(self.scale.shape)}")

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, N, half = self.data.shape
        return (*lead, N, 2 * half)

    def __getitem__(self, e: int) -> "Fp4GroupWeight":
        """One entry of the leading (expert) dimension."""
        return Fp4GroupWeight(self.data[e], self.scale[e])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[..., N, K] values: e2m1(code) * 2**(scale - 127) per 1x32 group (exact in fp32 and in bf16)."""
        codes = torch.stack((self.data & 0xF, self.data >> 4), dim=-1).flatten(-2)
        s = ue8m0_exponent(self.scale).repeat_interleave(FP4_GROUP, -1)
        return (decode_e2m1(codes) * s).to(dtype)

    @classmethod
    def quantize(cls, w: torch.Tensor) -> "Fp4GroupWeight":
        """fp [..., N, K] -> e2m1 with power-of-two 1x32 scales (the rule of the model's FP4 QAT)."""
        *lead, N, K = w.shape
        q, s = quantize_fp4_blocks(w.reshape(-1, K))
        return cls(q.view(torch.uint8).view(*lead, N, K // 2), s.view(*lead, N, K // FP4_GROUP))


PackedWeight = (Fp8BlockWeight, Fp4GroupWeight)  # for isinstance checks

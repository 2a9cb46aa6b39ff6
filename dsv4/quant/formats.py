"""FP8 e4m3 / FP4 e2m1 / UE8M0 storage formats and exact dequantisation (docs/architecture.md#number-formats).

* UE8M0 scale byte b encodes 2**(b - 127) (255 is NaN); stored as torch.float8_e8m0fnu or uint8.
* FP4 e2m1 codes: bit 3 sign, bits 0-2 index into (0, .5, 1, 1.5, 2, 3, 4, 6); two codes per byte,
  the low nibble holds the even (first) element.
* FP8 weights carry one scale per 128x128 block; FP4 experts one scale per 1x32 block along K.
The largest finite magnitudes FP8_MAX / FP4_MAX and the e2m1 rounding live here; the fake quantisation
(fake_quant.py) and the cache records (records.py) build on them.
"""
from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite e4m3 magnitude
FP4_MAX = 6.0    # largest e2m1 magnitude

E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                            -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes of a 1-byte tensor (fp8, fp4x2, int8, uint8) as uint8, without changing values."""
    if t.element_size() != 1:
        raise TypeError(f"expected a 1-byte dtype, got {t.dtype}")
    return t.view(torch.uint8) if t.dtype != torch.uint8 else t


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """UE8M0 -> fp32, exactly (2**(b-127); byte 255 -> NaN)."""
    b = _bytes(scale).to(torch.int32)
    out = torch.ldexp(torch.ones_like(b, dtype=torch.float32), b - 127)
    return torch.where(b == 255, torch.full_like(out, float("nan")), out)


def float_to_e8m0(x: torch.Tensor, check: bool = True) -> torch.Tensor:
    """Power-of-two fp32 -> UE8M0 bytes (uint8). Raises if a value is not an exact power of two in range
    (`check=False` skips that test, a host sync, for callers whose scales are powers of two by construction)."""
    mant, exp = torch.frexp(x.float())
    if check and not bool(((mant == 0.5) & (exp - 1 >= -127) & (exp - 1 <= 127)).all()):
        raise ValueError("float_to_e8m0 needs positive powers of two in [2**-127, 2**127]")
    return (exp - 1 + 127).to(torch.uint8)


def _e2m1_magnitude(idx: torch.Tensor) -> torch.Tensor:
    """Magnitude index 0-7 -> (0, .5, 1, 1.5, 2, 3, 4, 6) in fp32, by arithmetic rather than a table lookup: a
    table is a host tensor that torch.compile would copy to the device on every call (the cache codecs are
    compiled and graph-captured in decode steps)."""
    i = idx.float()
    return torch.where(i <= 4, i * 0.5, torch.where(i == 7, 6.0, i - 2))


def _e2m1_index(a: torch.Tensor) -> torch.Tensor:
    """|x| (fp32, <= 6) -> the magnitude index of its nearest e2m1 value (ties to the even mantissa: 0.25->0,
    0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4; `>=` moves a tie up, `>` keeps it down)."""
    return ((a > 0.25).int() + (a >= 0.75).int() + (a > 1.25).int() + (a >= 1.75).int()
            + (a > 2.5).int() + (a >= 3.5).int() + (a > 5.0).int())


def e2m1_round(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest e2m1 value (ties to the even mantissa), saturating at +-6. Same dtype as x."""
    mag = _e2m1_magnitude(_e2m1_index(x.abs().float().clamp(max=6.0)))
    # a negative that rounds to zero gives +0, not -0: one canonical code whether or not this runs compiled
    # (eager negation keeps -0, inductor's generated code did not: the packed bytes differed)
    return torch.where((x < 0) & (mag > 0), -mag, mag).to(x.dtype)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """[..., K/2] bytes (int8 / uint8 / float4_e2m1fn_x2) -> [..., K] fp32 e2m1 values."""
    b = _bytes(packed)
    codes = torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2)
    mag = _e2m1_magnitude(codes & 7)
    return torch.where(codes >= 8, -mag, mag)


def pack_fp4(values: torch.Tensor, check: bool = True) -> torch.Tensor:
    """[..., K] exact e2m1 values -> [..., K/2] int8 (low nibble = even element). Inverse of unpack_fp4.
    `check=False` skips verifying that the values are e2m1 (a host sync) for callers that just rounded them."""
    if values.shape[-1] % 2:
        raise ValueError(f"pack_fp4 needs an even last dim, got {values.shape[-1]}")
    v = values.float()
    idx = _e2m1_index(v.abs())
    if check and not bool((_e2m1_magnitude(idx) == v.abs()).all()):
        raise ValueError("pack_fp4 got values that are not e2m1")
    codes = (idx | (torch.signbit(v).int() << 3)).to(torch.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).view(torch.int8)


def dequant_fp8_blocks(weight: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """FP8 e4m3 [O, I] with one scale per block x block tile -> fp32 [O, I]: W[o,i] = q[o,i] * S[o//128, i//128]."""
    o, i = weight.shape
    want = ((o + block - 1) // block, (i + block - 1) // block)
    if tuple(scale.shape) != want:
        raise ValueError(f"fp8 weight {tuple(weight.shape)} needs a scale of shape {want}, got {tuple(scale.shape)}")
    s = _scale_float(scale)
    s = s.repeat_interleave(block, 0)[:o].repeat_interleave(block, 1)[:, :i]
    return weight.view(torch.float8_e4m3fn).float() * s


def dequant_fp4_blocks(packed: torch.Tensor, scale: torch.Tensor, block: int = 32) -> torch.Tensor:
    """FP4 e2m1 packed [O, I/2] with one scale per 1 x block along I -> fp32 [O, I]."""
    o, half = packed.shape
    want = (o, 2 * half // block)
    if tuple(scale.shape) != want:
        raise ValueError(f"fp4 weight {(o, 2 * half)} needs a scale of shape {want}, got {tuple(scale.shape)}")
    return unpack_fp4(packed) * _scale_float(scale).repeat_interleave(block, 1)


def _scale_float(scale: torch.Tensor) -> torch.Tensor:
    if scale.element_size() == 1:  # ue8m0
        return e8m0_to_float(scale)
    return scale.float()


def quantize_fp4_blocks(w: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """fp [O, I] -> (packed e2m1 int8 [O, I/2], UE8M0 scales uint8 [O, I/block]) with the power-of-two scale
    rule of the model's FP4 fake quantisation, so a QAT-trained weight is stored exactly."""
    O, I = w.shape
    blocks = w.float().view(O, I // block, block)
    s = torch.exp2(torch.ceil(torch.log2(blocks.abs().amax(-1, keepdim=True).clamp(min=FP4_MAX * 2.0 ** -126)
                                          / FP4_MAX)))
    return pack_fp4(e2m1_round((blocks / s).clamp(-FP4_MAX, FP4_MAX)).view(O, I)), float_to_e8m0(s.squeeze(-1))


def quantize_fp8_blocks(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """fp [O, I] -> (e4m3 [O, I], UE8M0 scales uint8 [ceil(O/128), ceil(I/128)]): power-of-two block scales
    2^ceil(log2(amax/448)), as the official FP8 weights."""
    O, I = w.shape
    po, pi = -O % block, -I % block
    t = torch.nn.functional.pad(w.float(), (0, pi, 0, po)).view((O + po) // block, block, (I + pi) // block, block)
    amax = t.abs().amax(dim=(1, 3), keepdim=True).clamp(min=1e-30)
    s = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))
    q = (t / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(O + po, I + pi)[:O, :I]
    return q, float_to_e8m0(s.view(s.shape[0], s.shape[2]))


def fp4_to_fp8(packed: torch.Tensor, scale: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The lossless FP4 -> FP8 conversion of the V4 report: FP4 [O, I/2] with 1x32 UE8M0 scales -> e4m3 [O, I]
    with one power-of-two scale per block x block tile, equal value for value.

    Tile scale 2^k with k = (largest sub-block exponent in the tile) - 6: each e2m1 value times 2^(e_i - k)
    is then at most 6 * 64 = 384 < 448 and exact in e4m3 as long as e_i - k >= -8, i.e. the tile's non-zero
    sub-block scales span at most 2^14. A tile beyond that raises ValueError naming it."""
    O, half = packed.shape
    I = 2 * half
    vals = unpack_fp4(packed)                                            # [O, I]
    exps = (_bytes(scale).to(torch.int32) - 127).repeat_interleave(32, 1)  # per element
    nonzero = vals != 0
    to, ti = -(-O // block), -(-I // block)
    ex = torch.where(nonzero, exps, torch.iinfo(torch.int32).min)
    pad = torch.nn.functional.pad(ex, (0, ti * block - I, 0, to * block - O), value=torch.iinfo(torch.int32).min)
    tmax = pad.view(to, block, ti, block).amax(dim=(1, 3))                # [to, ti]
    tmax = torch.where(tmax == torch.iinfo(torch.int32).min, 0, tmax)
    k = tmax - 6
    shift = exps - k.repeat_interleave(block, 0)[:O].repeat_interleave(block, 1)[:, :I]
    bad = nonzero & (shift < -8)
    if bool(bad.any()):
        o, i = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"FP4 -> FP8 is not lossless for tile ({o // block}, {i // block}): its sub-block "
                         f"scales span more than 2**14")
    q = (vals * torch.exp2(shift.float())).to(torch.float8_e4m3fn)
    return q, (k + 127).to(torch.uint8)


"""The byte records a cache stores per row: their layout, size, encoding and decoding (docs/architecture.md#kv-cache).

One record per window token, compressed entry or indexer key; `role` is "kv" (attention rows) or "index"
(indexer keys). Sizes for V4's D = 512, rope 64, indexer Di = 128:
  * "fp32"/"bf16"/"fp16": D values of that dtype (no byte record: the store keeps typed rows), 2048 / 1024 B;
  * "fp8" KV (the official serving layout, vLLM/SGLang `fp8_ds_mla`): D - rope e4m3 nope values, rope bf16
    values, one UE8M0 scale per 64 nope values, zero-padded to a multiple of 8: 448 + 128 + 7 + 1 = 584 B;
  * "fp8" index keys: Di e4m3 values, then one fp32 scale (amax / 448): 132 B;
  * "fp4" index keys: Di/2 bytes of packed e2m1 (low nibble first), then one UE8M0 scale per 32 values: 68 B.
FP8 KV uses the same power-of-two 1x64 scales as the model's QAT simulation and FP4 keys the same 1x32 scales,
so with `set_quant_sim(True)` storing them is lossless; without it they are approximations.

`record_layout` is the one description of where each part sits: the codecs below and the Triton kernels that
read records in place (ops/triton sparse_attn and indexer) take their offsets from it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import FP4_MAX, FP8_MAX, e2m1_round, e8m0_to_float, float_to_e8m0, pack_fp4, unpack_fp4

FLOAT_FORMATS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANTISED_FORMATS = {"kv": ("fp8",), "index": ("fp8", "fp4")}
RECORD_ALIGN = 8  # FP8 KV records are padded to a multiple of this many bytes, as the serving layout


@dataclass(frozen=True)
class RecordLayout:
    """Where each part of one `fmt` record sits: (offset, bytes) from the record's start.

    values: the quantised values (e4m3, one byte each; or e2m1, two per byte); rope: the rope dims kept as
    bf16 (FP8 KV only, else empty); scales: one UE8M0 byte per `scale_block` values, or one fp32 scale for
    the whole row (FP8 index keys: `scale_block == quant_dims`). Padding follows the last part."""
    fmt: str
    role: str
    dim: int
    rope_dim: int        # dims stored as bf16 after the quantised ones (0 for index keys)
    quant_dims: int      # dims stored quantised
    values: tuple[int, int]
    rope: tuple[int, int]
    scales: tuple[int, int]
    scale_block: int     # values per scale
    nbytes: int

    def parts(self) -> list[tuple[str, int, int]]:
        """(name, offset, bytes) of the non-empty parts, in byte order."""
        named = (("values", *self.values), ("rope", *self.rope), ("scales", *self.scales))
        return sorted((p for p in named if p[2]), key=lambda p: p[1])


def record_layout(fmt: str, role: str, dim: int, rope_dim: int) -> RecordLayout:
    """The layout of one quantised record (fmt "fp8" for role "kv"; "fp8" or "fp4" for role "index")."""
    if fmt not in QUANTISED_FORMATS.get(role, ()):
        raise ValueError(f"no {fmt!r} byte record for {role!r} rows; byte records exist for "
                         f"{ {r: list(f) for r, f in QUANTISED_FORMATS.items()} }")
    if fmt == "fp8" and role == "kv":
        nope = dim - rope_dim
        if not 0 < nope <= dim:
            raise ValueError(f"fp8 KV records need 0 <= rope_dim < dim, got dim={dim}, rope_dim={rope_dim}")
        if nope % 2:  # the bf16 rope values must start on a 2-byte boundary (kernels read them as bf16)
            raise ValueError(f"fp8 KV records need an even number of nope dims, got {nope}")
        n_scales = -(-nope // 64)
        used = nope + 2 * rope_dim + n_scales
        return RecordLayout(fmt, role, dim, rope_dim, nope, values=(0, nope), rope=(nope, 2 * rope_dim),
                            scales=(nope + 2 * rope_dim, n_scales), scale_block=64,
                            nbytes=-(-used // RECORD_ALIGN) * RECORD_ALIGN)
    if fmt == "fp8":
        return RecordLayout(fmt, role, dim, 0, dim, values=(0, dim), rope=(dim, 0), scales=(dim, 4),
                            scale_block=dim, nbytes=dim + 4)
    if dim % 32:
        raise ValueError(f"fp4 index keys need a multiple of 32 dims, got {dim}")
    return RecordLayout(fmt, role, dim, 0, dim, values=(0, dim // 2), rope=(dim // 2, 0),
                        scales=(dim // 2, dim // 32), scale_block=32, nbytes=dim // 2 + dim // 32)


def record_bytes(fmt: str, dim: int, rope_dim: int, role: str) -> int:
    """Bytes one stored row takes. role: 'kv' (attention window/entries) or 'index' (indexer keys)."""
    if fmt in FLOAT_FORMATS:
        return dim * FLOAT_FORMATS[fmt].itemsize
    if fmt not in QUANTISED_FORMATS.get(role, ()):
        raise ValueError(f"storage format {fmt!r} is not available for {role} rows; choose from "
                         f"{list(FLOAT_FORMATS) + list(QUANTISED_FORMATS.get(role, ()))}")
    return record_layout(fmt, role, dim, rope_dim).nbytes


def _le_bytes(bits: torch.Tensor) -> torch.Tensor:
    """Integer bit patterns [..., n] (int16/int32) -> their little-endian bytes [..., n * size] uint8. A view of
    the values as bytes does the same, but torch.compile cannot lower a view to a smaller element size when the
    shapes are symbolic."""
    size = bits.element_size()
    b = bits.to(torch.int32).unsqueeze(-1) >> (8 * torch.arange(size, device=bits.device, dtype=torch.int32))
    return (b & 0xFF).to(torch.uint8).flatten(-2)


def _at(rec: torch.Tensor, part: tuple[int, int]) -> torch.Tensor:
    """The bytes of one part of every record: rec[..., offset:offset + bytes]."""
    return rec[..., part[0]:part[0] + part[1]]


def _put(out: torch.Tensor, part: tuple[int, int], data: torch.Tensor) -> None:
    """Write one part of every record in place."""
    out[..., part[0]:part[0] + part[1]] = data


def encode_records(x: torch.Tensor, fmt: str, role: str, dim: int, rope_dim: int, rec: int) -> torch.Tensor:
    """Rows [..., dim] as `fmt` records [..., rec] uint8 (rec = record_bytes; the padding stays zero)."""
    lay = record_layout(fmt, role, dim, rope_dim)
    out = x.new_zeros(*x.shape[:-1], rec, dtype=torch.uint8)
    xf = x.float()
    n, blk = lay.quant_dims, lay.scale_block
    if fmt == "fp8" and role == "kv":  # 1x64 power-of-two scales on the nope dims, rope dims as bf16
        blocks = torch.nn.functional.pad(xf[..., :n], (0, -n % blk)).unflatten(-1, (-1, blk))
        s = torch.exp2(torch.ceil(torch.log2(blocks.abs().amax(-1, keepdim=True).clamp(min=1e-4) / FP8_MAX)))
        q = (blocks / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).flatten(-2)[..., :n]
        _put(out, lay.values, q.view(torch.uint8))
        _put(out, lay.rope, _le_bytes(xf[..., n:].to(torch.bfloat16).view(torch.int16)))
        _put(out, lay.scales, float_to_e8m0(s.squeeze(-1), check=False))
    elif fmt == "fp8":  # one fp32 scale per row
        s = (xf.abs().amax(-1, keepdim=True).clamp(min=1e-12) / FP8_MAX)
        _put(out, lay.values, (xf / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8))
        _put(out, lay.scales, _le_bytes(s.view(torch.int32)))
    else:  # fp4 index keys, 1x32 power-of-two scales
        blocks = xf.unflatten(-1, (-1, blk))
        s = torch.exp2(torch.ceil(torch.log2(blocks.abs().amax(-1, keepdim=True).clamp(min=FP4_MAX * 2.0 ** -126)
                                             / FP4_MAX)))
        _put(out, lay.values, pack_fp4(e2m1_round(blocks / s).flatten(-2), check=False).view(torch.uint8))
        _put(out, lay.scales, float_to_e8m0(s.squeeze(-1), check=False))
    return out


def decode_fp8_kv(rec: torch.Tensor, dim: int, rope_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """FP8 KV serving records uint8 [..., bytes] -> [..., dim] in dtype."""
    lay = record_layout("fp8", "kv", dim, rope_dim)
    n = lay.quant_dims
    s = e8m0_to_float(_at(rec, lay.scales)).repeat_interleave(lay.scale_block, -1)[..., :n]
    q = _at(rec, lay.values).contiguous().view(torch.float8_e4m3fn).float() * s
    rope = _at(rec, lay.rope).contiguous().view(torch.bfloat16).float()
    return torch.cat((q, rope), -1).to(dtype)


def decode_fp4_keys(rec: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """FP4 indexer-key records uint8 [..., dim/2 + dim/32] -> [..., dim] in dtype."""
    lay = record_layout("fp4", "index", dim, 0)
    s = e8m0_to_float(_at(rec, lay.scales)).repeat_interleave(lay.scale_block, -1)
    return (unpack_fp4(_at(rec, lay.values)) * s).to(dtype)


def decode_records(rec: torch.Tensor, fmt: str, role: str, dim: int, rope_dim: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """`fmt` records [..., rec] uint8 -> rows [..., dim] in dtype."""
    if fmt == "fp8" and role == "kv":
        return decode_fp8_kv(rec, dim, rope_dim, dtype)
    if fmt == "fp8":
        lay = record_layout(fmt, role, dim, rope_dim)
        s = _at(rec, lay.scales).contiguous().view(torch.float32)
        return (_at(rec, lay.values).contiguous().view(torch.float8_e4m3fn).float() * s).to(dtype)
    return decode_fp4_keys(rec, dim, dtype)

"""How cached rows are stored: one fixed-size record per window token, compressed entry or indexer key.

Formats (bytes per record for V4's D = 512, rope 64, indexer Di = 128):
  * "fp32"/"bf16" (or the model dtype): D values, 2048 / 1024 B;
  * "fp8" (attention KV, the official serving layout, vLLM/SGLang `fp8_ds_mla`): 448 e4m3 nope values,
    64 bf16 rope values, one UE8M0 scale per 64 nope values, padded to a multiple of 8: 584 B;
  * "fp8" (indexer keys): Di e4m3 values + one fp32 scale (amax / 448): 132 B;
  * "fp4" (indexer keys): Di/2 bytes of packed e2m1 + one UE8M0 scale per 32 values: 68 B.
FP8 KV uses the same power-of-two 1x64 scales as the model's QAT simulation and FP4 keys the same 1x32
scales, so with `set_quant_sim(True)` storing them is lossless; without it they are approximations.
"""
from __future__ import annotations

import torch

from ..ops import compiled_or_eager
from ..quant import decode_fp4_keys, decode_fp8_kv, e2m1_round, float_to_e8m0, pack_fp4

_FLOAT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def record_bytes(fmt: str, dim: int, rope_dim: int, role: str) -> int:
    """Bytes one stored row takes. role: 'kv' (attention window/entries) or 'index' (indexer keys)."""
    if fmt in _FLOAT:
        return dim * _FLOAT[fmt].itemsize
    if fmt == "fp8" and role == "kv":
        nope = dim - rope_dim
        raw = nope + 2 * rope_dim + -(-nope // 64)
        return -(-raw // 8) * 8
    if fmt == "fp8":
        return dim + 4
    if fmt == "fp4" and role == "index":
        return dim // 2 + dim // 32
    raise ValueError(f"storage format {fmt!r} is not available for {role} rows; choose from "
                     f"{list(_FLOAT) + ['fp8'] + (['fp4'] if role == 'index' else [])}")


def _le_bytes(bits: torch.Tensor) -> torch.Tensor:
    """Integer bit patterns [..., n] (int16/int32) -> their little-endian bytes [..., n * size] uint8. A view of
    the values as bytes does the same, but torch.compile cannot lower a view to a smaller element size when the
    shapes are symbolic."""
    size = bits.element_size()
    b = bits.to(torch.int32).unsqueeze(-1) >> (8 * torch.arange(size, device=bits.device, dtype=torch.int32))
    return (b & 0xFF).to(torch.uint8).flatten(-2)


def encode_records(x: torch.Tensor, fmt: str, role: str, dim: int, rope_dim: int, rec: int) -> torch.Tensor:
    """Rows [..., dim] as `fmt` records [..., rec] uint8 (see the module docstring for the layouts)."""
    out = x.new_zeros(*x.shape[:-1], rec, dtype=torch.uint8)
    xf = x.float()
    if fmt == "fp8" and role == "kv":
        nope = dim - rope_dim
        pad = -nope % 64
        blocks = torch.nn.functional.pad(xf[..., :nope], (0, pad)).unflatten(-1, (-1, 64))
        s = torch.exp2(torch.ceil(torch.log2(blocks.abs().amax(-1, keepdim=True).clamp(min=1e-4) / 448)))
        q = (blocks / s).clamp(-448, 448).to(torch.float8_e4m3fn).flatten(-2)[..., :nope]
        out[..., :nope] = q.view(torch.uint8)
        out[..., nope:nope + 2 * rope_dim] = _le_bytes(xf[..., nope:].to(torch.bfloat16).view(torch.int16))
        out[..., nope + 2 * rope_dim:nope + 2 * rope_dim + s.shape[-2]] = float_to_e8m0(s.squeeze(-1), check=False)
    elif fmt == "fp8":
        s = (xf.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 448)
        out[..., :dim] = (xf / s).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
        out[..., dim:] = _le_bytes(s.view(torch.int32))
    else:  # fp4 index keys, 1x32 power-of-two scales
        blocks = xf.unflatten(-1, (-1, 32))
        s = torch.exp2(torch.ceil(torch.log2(blocks.abs().amax(-1, keepdim=True).clamp(min=6 * 2.0 ** -126) / 6)))
        out[..., :dim // 2] = pack_fp4(e2m1_round(blocks / s).flatten(-2), check=False).view(torch.uint8)
        out[..., dim // 2:] = float_to_e8m0(s.squeeze(-1), check=False)
    return out


def decode_records(rec: torch.Tensor, fmt: str, role: str, dim: int, rope_dim: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """`fmt` records [..., rec] uint8 -> rows [..., dim] in dtype."""
    if fmt == "fp8" and role == "kv":
        return decode_fp8_kv(rec, dim, rope_dim, dtype)
    if fmt == "fp8":
        s = rec[..., dim:].contiguous().view(torch.float32)
        return (rec[..., :dim].contiguous().view(torch.float8_e4m3fn).float() * s).to(dtype)
    return decode_fp4_keys(rec, dim, dtype)


# (the codecs are an optimisation, never a reason a decode cannot run: a compiler failure falls back to eager)
_COMPILED = {encode_records: compiled_or_eager(encode_records), decode_records: compiled_or_eager(decode_records)}


def _codec(fn, t: torch.Tensor):
    """fn, or its torch.compile'd form at inference on a GPU: eager, one FP8 record write is ~25 small kernels
    and an FP4 key write ~57, several per layer and decode step; compiled, a few (DSV4_COMPILE=0: eager)."""
    if t.is_cuda and not torch.is_grad_enabled():
        return _COMPILED[fn]
    return fn


class RowStore:
    """[B, R, dim] rows kept as records of `fmt`; reads dequantise to `dtype`.

    With `scratch`, one extra record per batch row takes masked-out writes, so a masked write is a plain
    scatter: no host synchronisation, the same kernels every step (CUDA-graph capturable)."""

    def __init__(self, fmt: str, batch: int, rows: int, dim: int, rope_dim: int, role: str, dtype: torch.dtype,
                 device=None, scratch: bool = False, _buf: torch.Tensor | None = None):
        self.fmt, self.dim, self.rope_dim, self.role, self.dtype = fmt, dim, rope_dim, role, dtype
        self.rec = record_bytes(fmt, dim, rope_dim, role)
        if fmt == "fp8" and role == "kv" and (dim - rope_dim) % 2:
            raise ValueError(f"fp8 KV records need an even number of nope dims, got {dim - rope_dim}")
        if fmt == "fp4" and dim % 32:
            raise ValueError(f"fp4 index keys need a multiple of 32 dims, got {dim}")
        self.scratch = scratch
        if _buf is None:
            rows += scratch
            if fmt in _FLOAT:
                _buf = torch.zeros(batch, rows, dim, dtype=_FLOAT[fmt], device=device)
            else:
                _buf = torch.zeros(batch, rows, self.rec, dtype=torch.uint8, device=device)
        self.buf = _buf

    @property
    def rows(self) -> int:
        """Rows that hold data (the scratch record excluded)."""
        return self.buf.shape[1] - self.scratch

    @property
    def nbytes(self) -> int:
        return self.buf.numel() * self.buf.element_size()

    def select(self, rows: slice) -> "RowStore":
        return RowStore(self.fmt, 0, 0, self.dim, self.rope_dim, self.role, self.dtype, scratch=self.scratch,
                        _buf=self.buf[rows])

    # ------------------------------------------------------------------ encode / decode
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt in _FLOAT:
            return x.to(self.buf.dtype)
        return _codec(encode_records, x)(x, self.fmt, self.role, self.dim, self.rope_dim, self.rec)

    def _decode(self, rec: torch.Tensor) -> torch.Tensor:
        if self.fmt in _FLOAT:
            return rec.to(self.dtype)
        return _codec(decode_records, rec)(rec, self.fmt, self.role, self.dim, self.rope_dim, self.dtype)

    # ------------------------------------------------------------------ access
    def write(self, index: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """rows[b, index[b, i]] = values[b, i] where mask[b, i] (index: [B, n] int, distinct per row where
        mask; a mask needs the scratch record)."""
        enc = self._encode(values)
        if mask is not None:
            if not self.scratch:
                raise ValueError("masked writes need a RowStore built with scratch=True")
            index = torch.where(mask, index, self.rows)
        self.buf.scatter_(1, index.unsqueeze(-1).expand(-1, -1, self.buf.shape[2]), enc)

    def read(self, n: int) -> torch.Tensor:
        """The first n rows, dequantised: [B, n, dim]."""
        return self._decode(self.buf[:, :n])

    def records(self, n: int) -> torch.Tensor:
        """The first n rows as stored (uint8 records, or floats): [B, n, record]; kernels that read the format
        themselves take these instead of a dequantised copy."""
        return self.buf[:, :n]

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """rows[b, index[b, i]] dequantised: [B, n, dim]."""
        return self._decode(self.buf.gather(1, index.unsqueeze(-1).expand(-1, -1, self.buf.shape[2])))

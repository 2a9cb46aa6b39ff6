"""How cached rows are stored: a RowStore keeps one record per window token, compressed entry or indexer key,
typed float rows or the byte records of dsv4.quant.records (which owns their layout and codecs), and writes
and reads them by row index.
"""
from __future__ import annotations

import torch

from ..ops import compiled_or_eager
from ..quant.records import FLOAT_FORMATS, decode_records, encode_records, record_bytes


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
        self.rec = record_bytes(fmt, dim, rope_dim, role)  # raises for a format or dims with no record
        self.scratch = scratch
        if _buf is None:
            rows += scratch
            if fmt in FLOAT_FORMATS:
                _buf = torch.zeros(batch, rows, dim, dtype=FLOAT_FORMATS[fmt], device=device)
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
        if self.fmt in FLOAT_FORMATS:
            return x.to(self.buf.dtype)
        return _codec(encode_records, x)(x, self.fmt, self.role, self.dim, self.rope_dim, self.rec)

    def _decode(self, rec: torch.Tensor) -> torch.Tensor:
        if self.fmt in FLOAT_FORMATS:
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

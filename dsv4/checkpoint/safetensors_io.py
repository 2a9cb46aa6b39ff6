"""Reading safetensors files defensively: the header is parsed and checked against the file size before
any tensor is touched, so a truncated or corrupt file is reported by name instead of half-loading."""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import torch
from safetensors import safe_open

from ..errors import DsV4Error


class CheckpointError(DsV4Error, RuntimeError):
    """A checkpoint is missing, corrupt, truncated, or does not match the model (the message says which)."""


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
           "F8_E8M0": getattr(torch, "float8_e8m0fnu", torch.uint8), "F4": getattr(torch, "float4_e2m1fn_x2", torch.uint8)}


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: str          # safetensors dtype string ("BF16", "F8_E4M3", "I8", ...)
    shape: tuple[int, ...]


def read_header(path: str) -> dict[str, TensorInfo]:
    """Tensor name -> TensorInfo, after checking that the header parses and the data fits in the file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header "
                                      f"(declares {n} header bytes, file has {size})")
            meta = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None
    meta.pop("__metadata__", None)
    end, out = 0, {}
    for name, t in meta.items():
        try:
            begin, stop = t["data_offsets"]
            info = TensorInfo(path, t["dtype"], tuple(t["shape"]))
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor '{name}'") from None
        end = max(end, stop)
        out[name] = info
    if 8 + n + end != size:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file: header needs {8 + n + end} bytes, "
                              f"file has {size}")
    return out


class ShardReader:
    """One open shard; tensors are read one at a time (memory-mapped), never the whole file."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._f = safe_open(path, framework="pt")
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: cannot open safetensors file ({e})") from None

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._f.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot read tensor '{name}' ({e})") from None

    def get_slice(self, name: str, index: tuple[slice, ...] = ()) -> torch.Tensor:
        """Only `index` of a tensor (one slice per leading dimension, e.g. `(slice(0, 8), slice(None))`): the
        rest of it is never read from the file. `()` reads the whole tensor."""
        if not index:
            return self.get(name)
        try:
            return self._f.get_slice(name)[index]
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot read {index} of tensor '{name}' ({e})") from None

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        del self._f

"""Reading safetensors files defensively: the header is parsed and checked against the file size before
any tensor is touched, so a truncated or corrupt file is reported by name instead of half-loading."""
from __future__ import annotations

import json
import math
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


# bytes per element of the dtypes stored a whole number of bytes per element (sub-byte ones are not checked here)
_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
          "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}


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
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a JSON {type(meta).__name__}, not an object)")
    meta.pop("__metadata__", None)
    end, out = 0, {}
    for name, t in meta.items():
        _, stop, info = _entry(path, name, t)
        end = max(end, stop)
        out[name] = info
    if 8 + n + end != size:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file: header needs {8 + n + end} bytes, "
                              f"file has {size}")
    return out


def _entry(path: str, name: str, t: object) -> tuple[int, int, TensorInfo]:
    """(begin, end, info) of one header entry, checking every field's type and that the byte range holds
    exactly the tensor (the header is read before safetensors sees the file)."""
    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"{path}: corrupt header entry for tensor '{name}': {problem}")

    if not isinstance(t, dict):
        raise bad(f"a JSON {type(t).__name__}, not an object")
    dtype, shape, offsets = t.get("dtype"), t.get("shape"), t.get("data_offsets")
    if not isinstance(dtype, str):
        raise bad(f"dtype={dtype!r} is not a dtype name")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad(f"shape={shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise bad(f"data_offsets={offsets!r} is not [begin, end] with 0 <= begin <= end")
    begin, stop = offsets
    width = _BYTES.get(dtype)
    if width is not None and math.prod(shape) * width != stop - begin:
        raise bad(f"{dtype} {shape} needs {math.prod(shape) * width} bytes, data_offsets={offsets} hold "
                  f"{stop - begin}")
    return begin, stop, TensorInfo(path, dtype, tuple(shape))


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


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

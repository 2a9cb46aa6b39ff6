"""load_model: a checkpoint directory (official or transformers naming, bf16/fp32/FP8/FP4) -> Transformer.

Everything that can be checked from the safetensors headers (missing, unexpected and mis-shaped tensors,
truncated files) is checked before any weight is read, so a bad checkpoint never half-loads. The model is
built on the meta device and materialised once on the target device; shards are then streamed one
tensor at a time (memory-mapped), dequantised exactly and copied into place.
"""
from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..config import ModelConfig
from ..model import Transformer
from ..quant import dequant_fp4_blocks, dequant_fp8_blocks
from .names import Target, official_to_native, to_official
from .safetensors_io import CheckpointError, ShardReader, TensorInfo, read_header

log = logging.getLogger(__name__)
_ONE_BYTE_INT = ("I8", "U8", "F4")


@dataclass
class _Item:
    name: str                 # name in the file
    info: TensorInfo
    targets: list[Target]
    scale: tuple[str, TensorInfo] | None  # (name in file, info) of its block scale, if quantised
    fmt: str                  # "plain" | "fp8" | "fp4"


def list_shards(path: str) -> list[str]:
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a checkpoint directory")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: corrupt index ({e})") from None
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {missing}")
        return [os.path.join(path, f) for f in files]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    return [os.path.join(path, f) for f in files]


def _plan(cfg: ModelConfig, headers: dict[str, tuple[str, TensorInfo]], model: Transformer) -> list[_Item]:
    """Match every checkpoint tensor to native parameters and check shapes; raise listing all problems."""
    expected = dict(model.named_parameters())
    expected.update((n, b) for n, b in model.named_buffers() if n.endswith("tid2eid"))
    problems: list[str] = []
    covered: dict[str, set] = defaultdict(set)
    items: list[_Item] = []
    used_scales: set[str] = set()
    for off, (name, info) in headers.items():
        if off.endswith(".scale"):
            continue
        scale = headers.get(off[: -len(".weight")] + ".scale") if off.endswith(".weight") else None
        shape, fmt = info.shape, "plain"
        if scale is not None:
            used_scales.add(off[: -len(".weight")] + ".scale")
            if info.dtype == "F8_E4M3":
                fmt = "fp8"
                want = tuple((d + 127) // 128 for d in shape)
            elif info.dtype in _ONE_BYTE_INT:
                fmt, shape = "fp4", (shape[0], shape[1] * 2)
                want = (shape[0], shape[1] // 32)
            else:
                problems.append(f"'{name}' has a block scale but dtype {info.dtype} (expected F8_E4M3 or packed FP4)")
                continue
            if scale[1].shape != want:
                problems.append(f"'{scale[0]}' has shape {scale[1].shape}, expected {want} for weight {shape}")
                continue
        elif info.dtype == "F8_E4M3":
            problems.append(f"'{name}' is FP8 but has no '.scale' tensor")
            continue
        targets = official_to_native(off, cfg.moe_inter_dim)
        for t in targets:
            p = expected.get(t.param)
            if p is None:
                problems.append(f"unexpected tensor '{name}' {shape}")
                continue
            want = tuple(p.shape[1:]) if t.expert is not None else tuple(p.shape)
            got = shape if t.rows is None else (shape[0], t.rows.stop - t.rows.start, *shape[2:])
            if t.expert is not None and t.expert >= p.shape[0]:
                problems.append(f"unexpected tensor '{name}': expert {t.expert} >= n_routed_experts={p.shape[0]}")
            elif got != want:
                problems.append(f"tensor '{name}' has shape {shape}, expected {want}")
            elif t.expert in covered[t.param] or "all" in covered[t.param]:
                problems.append(f"tensor '{name}' appears twice (as {t.param})")
            else:
                covered[t.param].add("all" if t.expert is None else t.expert)
        items.append(_Item(name, info, targets, scale, fmt))
    for off, (name, info) in headers.items():
        if off.endswith(".scale") and off not in used_scales:
            problems.append(f"unexpected tensor '{name}' {info.shape} (a scale without its weight)")
    for pname, p in expected.items():
        got = covered.get(pname, set())
        is_stacked = pname.endswith(("experts.w1", "experts.w2", "experts.w3"))
        if "all" in got or (is_stacked and len(got) == p.shape[0]):
            continue
        if is_stacked and got:
            miss = sorted(set(range(p.shape[0])) - got)
            problems.append(f"missing tensor(s) for '{pname}': experts {miss[:8]}{'...' if len(miss) > 8 else ''}"
                            f" (each {tuple(p.shape[1:])})")
        else:
            problems.append(f"missing tensor '{pname}' (expected shape {tuple(p.shape)})")
    if problems:
        shown = "\n  ".join(problems[:25])
        more = f"\n  ... and {len(problems) - 25} more" if len(problems) > 25 else ""
        raise CheckpointError(f"checkpoint does not match the model ({len(problems)} problem(s)):\n  {shown}{more}")
    return items


def _decode(item: _Item, reader: ShardReader, scale_reader: ShardReader) -> torch.Tensor:
    t = reader.get(item.name)
    if item.fmt == "fp8":
        return dequant_fp8_blocks(t, scale_reader.get(item.scale[0]))
    if item.fmt == "fp4":
        return dequant_fp4_blocks(t, scale_reader.get(item.scale[0]))
    return t


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
               progress: bool | None = None) -> Transformer:
    """Load a checkpoint directory (`config.json` + safetensors) into a Transformer on `device`.

    `dtype` is the compute dtype; norms, mHC, sinks, ape and the head stay fp32 as in the reference.
    A checkpoint without `mtp.*` tensors (as transformers writes) loads with n_mtp_layers = 0.
    """
    path = os.fspath(path)
    cfg = ModelConfig.from_pretrained(path)
    files = list_shards(path)
    headers: dict[str, tuple[str, TensorInfo]] = {}
    for f in files:
        for name, info in read_header(f).items():
            off = to_official(name)
            if off in headers:
                raise CheckpointError(f"tensor '{name}' appears twice (also in {headers[off][1].file})")
            headers[off] = (name, info)
    if cfg.n_mtp_layers and not any(k.startswith("mtp.") for k in headers):
        log.warning("%s has no mtp.* tensors: loading without the MTP module", path)
        cfg = cfg.replace(n_mtp_layers=0, compress_ratios=cfg.compress_ratios[: cfg.n_layers])
    with torch.device("meta"):
        model = Transformer(cfg).to_dtype(dtype)
    items = _plan(cfg, headers, model)
    model.to_empty(device=device)
    model.reset_buffers()
    params = dict(model.named_parameters())
    params.update(model.named_buffers())
    by_file: dict[str, list[_Item]] = defaultdict(list)
    for it in items:
        by_file[it.info.file].append(it)
    total = sum(map(len, by_file.values()))
    bar = tqdm(total=total, desc="loading", unit="tensor",
               disable=not progress if progress is not None else total < 2000)
    with torch.no_grad():
        for f in files:
            readers = {f: ShardReader(f)}
            for it in by_file.get(f, []):
                if it.scale is not None and it.scale[1].file not in readers:
                    readers[it.scale[1].file] = ShardReader(it.scale[1].file)
                value = _decode(it, readers[f], readers[it.scale[1].file] if it.scale else readers[f])
                for t in it.targets:
                    dst = params[t.param].data
                    if t.expert is not None:
                        dst = dst[t.expert]
                    src = value if t.rows is None else value[:, t.rows]
                    dst.copy_(src)
                bar.update(1)
            readers.clear()
    bar.close()
    return model.eval()

"""Which safetensors files make up a checkpoint directory, refusing any that lie outside it."""
from __future__ import annotations

import json
import os
from pathlib import PurePath

from .safetensors_io import CheckpointError

__all__ = ["list_shards"]

_INDEX = "model.safetensors.index.json"


def list_shards(path: str) -> list[str]:
    """The checkpoint's safetensors files: those the index names, else every `*.safetensors` in `path`.
    Each must lie inside `path` (see `_inside`)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a checkpoint directory")
    index = os.path.join(path, _INDEX)
    if os.path.isfile(index):
        files = sorted(set(_weight_map(index).values()))
        missing = [f for f in files if not os.path.isfile(_inside(path, f, index))]
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {missing}")
        return [os.path.join(path, f) for f in files]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    return [_inside(path, f, path) for f in files]


def _weight_map(index: str) -> dict[str, str]:
    """The index's tensor name -> shard file map, checked to be exactly that."""
    try:
        with open(index) as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index}: corrupt index, not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{index}: cannot read ({e})") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict):
        got = f"a JSON {type(doc).__name__}" if not isinstance(doc, dict) else f"weight_map={weight_map!r}"[:80]
        raise CheckpointError(f"{index}: corrupt index: expected an object whose 'weight_map' maps tensor names to "
                              f"shard files, got {got}")
    if not weight_map:
        raise CheckpointError(f"{index}: corrupt index: 'weight_map' names no tensors")
    bad = [f for f in weight_map.values() if not isinstance(f, str) or not f]
    if bad:
        raise CheckpointError(f"{index}: shard file names must be non-empty strings, got {bad[:3]}")
    return weight_map


def _inside(root: str, rel: str, source: str) -> str:
    """`root/rel`, refusing a shard path that leaves the checkpoint directory: absolute, through `..`, or a
    symlink resolving outside it. One layout is allowed to point outside: the Hugging Face hub cache, where
    `<repo>/snapshots/<rev>/<file>` links into `<repo>/blobs/`. (Linking the whole directory also works.)"""
    if os.path.isabs(rel) or ".." in PurePath(rel).parts:
        raise CheckpointError(f"{source}: shard path {rel!r} leaves the checkpoint directory; shard paths must "
                              "be relative paths inside it")
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, rel))
    if os.path.commonpath([real_root, real]) != real_root:
        repo, snapshots = os.path.dirname(os.path.dirname(real_root)), os.path.basename(os.path.dirname(real_root))
        blobs = os.path.join(repo, "blobs")
        if not (snapshots == "snapshots" and os.path.commonpath([blobs, real]) == blobs):
            raise CheckpointError(f"{source}: shard {rel!r} resolves to {real}, outside the checkpoint directory "
                                  f"{real_root}; copy the file in (or link the whole directory)")
    return os.path.join(root, rel)

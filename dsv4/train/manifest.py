"""Checksums of a checkpoint directory: `manifest.json` lists every file with its size and sha256. It is written
last (to a temporary name, then renamed), so its presence marks a complete checkpoint, and its sums catch a
flipped bit or a truncated file before a resume trusts the checkpoint."""
from __future__ import annotations

import hashlib
import json
import os

from ..checkpoint import CheckpointError

__all__ = ["MANIFEST", "write_manifest", "verify_manifest", "has_manifest"]

MANIFEST = "manifest.json"
_FORMAT = "dsv4-checkpoint-manifest/1"
_CHUNK = 16 << 20


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: str) -> None:
    """Sum every file under `directory` (relative POSIX names) into `directory/manifest.json`."""
    files = {}
    for folder, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, directory).replace(os.sep, "/")
            if rel != MANIFEST and not rel.startswith(MANIFEST + "."):
                files[rel] = {"bytes": os.path.getsize(path), "sha256": file_sha256(path)}
    tmp = os.path.join(directory, f"{MANIFEST}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump({"format": _FORMAT, "files": dict(sorted(files.items()))}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, MANIFEST))


def has_manifest(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, MANIFEST))


def verify_manifest(directory: str) -> None:
    """Raise CheckpointError naming the first file that is missing, has another size or another sha256 than
    `directory/manifest.json` records (or the manifest itself, when it is unreadable)."""
    manifest = os.path.join(directory, MANIFEST)
    try:
        with open(manifest) as f:
            recorded = json.load(f)
        files = recorded["files"]
        if recorded.get("format") != _FORMAT or not isinstance(files, dict) or not files:
            raise ValueError("not a checkpoint manifest")
        entries = [(str(name), int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()]
        if any(os.path.isabs(n) or ".." in n.split("/") for n, _, _ in entries):
            raise ValueError("a file name points outside the checkpoint")
    except FileNotFoundError:
        raise CheckpointError(f"{manifest}: missing (the save did not complete)") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{manifest}: unreadable ({e})") from None
    for name, size, digest in entries:
        path = os.path.join(directory, *name.split("/"))
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: listed in {MANIFEST} but missing")
        if os.path.getsize(path) != size:
            raise CheckpointError(f"{path}: {os.path.getsize(path)} bytes, {MANIFEST} records {size}")
        if file_sha256(path) != digest:
            raise CheckpointError(f"{path}: sha256 differs from the one {MANIFEST} records (the file is corrupt)")

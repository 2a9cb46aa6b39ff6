"""Type fuzzing of a checkpoint's JSON: every field of config.json, of the safetensors header and of
model.safetensors.index.json replaced by values of the wrong type or range. Each load either succeeds (with the
original weights) or raises dsv4's own error naming the file: never a raw KeyError / TypeError / ValueError from
deep inside."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

import dsv4
from dsv4.checkpoint.load import load_weights, plan_checkpoint
from dsv4.checkpoint.shards import list_shards
from dsv4.errors import DsV4Error

BAD_VALUES: list[Any] = [None, True, 3.7, -1, 0, 2 ** 70, 1e308, float("nan"), "7", "", [], [1], {}, {"a": 1}]
HEADER_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A small checkpoint with every layer kind (CSA, HCA, window), hash routing, MTP, and a shard index."""
    cfg = dsv4.ModelConfig.preset("tiny").replace(
        n_layers=2, compress_ratios=(4, 16, 0), dim=32, vocab_size=64, n_routed_experts=4, moe_inter_dim=32,
        q_lora_rank=16, o_lora_rank=16, head_dim=32, index_n_heads=4, index_head_dim=16, hc_mult=2)
    path = tmp_path_factory.mktemp("fuzz") / "base"
    model = dsv4.Transformer(cfg).init_weights(seed=1)
    dsv4.save_model(model, path, dtype=torch.float32)
    header = _header(path / HEADER_FILE)
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": 1},
                                               "weight_map": {n: HEADER_FILE for n in header}}))
    return path, model.state_dict()


def _header(file: Path) -> dict:
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])


def _write_header(file: Path, header: Any) -> None:
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def _edits(obj: Any, at: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """(path, bad value) for the whole of `obj`, each of its keys and nested keys, and each list's first entry."""
    for bad in BAD_VALUES:
        yield at, bad
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _edits(v, at + (k,))
    elif isinstance(obj, list) and obj:
        yield from _edits(obj[0], at + (0,))


def _set(obj: Any, at: tuple, value: Any) -> Any:
    if not at:
        return value
    obj[at[0]] = _set(obj[at[0]], at[1:], value)
    return obj


def _mutations(path: Path) -> Iterator[tuple[str, str, Callable[[Path], None]]]:
    """(file, what, edit of that file in a copy of the checkpoint)."""
    config = json.loads((path / "config.json").read_text())
    for at, bad in _edits(config):
        def edit(d: Path, at=at, bad=bad) -> None:
            (d / "config.json").write_text(json.dumps(_set(json.loads(json.dumps(config)), at, bad)))
        yield "config.json", f"{list(at)}={bad!r}", edit
    header = _header(path / HEADER_FILE)
    first = next(k for k in header if k != "__metadata__")
    small = {k: v for k, v in header.items() if k in ("__metadata__", first)}   # one tensor entry, every field
    for at, bad in _edits(small):
        def edit(d: Path, at=at, bad=bad) -> None:
            _write_header(d / HEADER_FILE, _set(json.loads(json.dumps(header)), at, bad))
        yield HEADER_FILE, f"{list(at)}={bad!r}", edit
    index = json.loads((path / INDEX_FILE).read_text())
    small = {"metadata": index["metadata"], "weight_map": {first: HEADER_FILE}}
    for at, bad in _edits(small):
        def edit(d: Path, at=at, bad=bad) -> None:
            (d / INDEX_FILE).write_text(json.dumps(_set(json.loads(json.dumps(index)), at, bad)))
        yield INDEX_FILE, f"{list(at)}={bad!r}", edit


def _load_problem(d: Path, file: str, base_config: dsv4.ModelConfig, state: dict) -> str | None:
    """None: it loads (as the base does, where the edit leaves nothing to change); "": a dsv4 error naming the
    checkpoint; else what went wrong."""
    try:
        if file == "config.json" and dsv4.ModelConfig.from_pretrained(d) == base_config:
            return None
        if file == INDEX_FILE and [Path(f).name for f in list_shards(str(d))] == [HEADER_FILE]:
            return None   # the index decides only which shard files are read
        plan = plan_checkpoint(d)
        with torch.device("meta"):
            model = dsv4.Transformer(plan.config)
        got = load_weights(plan, model).state_dict()
    except DsV4Error as e:
        return "" if str(d) in str(e) else f"the message names no file: {e}"
    except Exception as e:  # noqa: BLE001 (the point of the test)
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if file != "config.json" and (got.keys() != state.keys() or any(not torch.equal(got[k], state[k]) for k in state)):
        return "loaded, but other weights"
    return None


def test_every_type_mutation_loads_or_raises_a_dsv4_error(base, tmp_path):
    """Shortcuts keep it fast, each exact: a config.json that parses to the base's ModelConfig loads as the base
    does (same config, same files); an index edit that lists the base's shard files loads the base's tensors."""
    path, state = base
    base_config = dsv4.ModelConfig.from_pretrained(path)
    raw = []
    loaded = 0
    d = tmp_path / "ckpt"
    shutil.copytree(path, d)
    for file, what, edit in _mutations(path):
        edit(d)
        try:
            problem = _load_problem(d, file, base_config, state)
        finally:
            shutil.copyfile(path / file, d / file)
        if problem is None:
            loaded += 1
        elif problem:
            raw.append(f"{file} {what}: {problem}")
    assert not raw, f"{len(raw)} mutation(s) escaped:\n" + "\n".join(raw[:60])
    assert loaded > 0   # some edits are harmless (metadata, unused keys): the loader is not refusing everything

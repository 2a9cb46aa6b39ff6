"""Training checkpoints: the model in the official format (fp32, so a resume is exact) plus tokenizer,
optimizer and data-loader state. Written to a temporary directory and renamed, so a kill -9 mid-save
leaves the previous checkpoint intact."""
from __future__ import annotations

import os
import re
import shutil

import torch

from ..checkpoint import load_model, save_model
from ..model import Transformer

_STEP_DIR = re.compile(r"^step_(\d{7})$")


def save_checkpoint(directory: str, model: Transformer, tokenizer_dir: str, state: dict, keep: int = 2) -> str:
    """Write `directory/checkpoints/step_NNNNNNN/` and prune all but the newest `keep`."""
    root = os.path.join(directory, "checkpoints")
    final = os.path.join(root, f"step_{state['step']:07d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    export(model, tmp, tokenizer_dir, dtype=torch.float32)
    torch.save(state, os.path.join(tmp, "train_state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    steps = sorted(d for d in os.listdir(root) if _STEP_DIR.match(d))
    for old in steps[:-keep]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def export(model: Transformer, path: str, tokenizer_dir: str, dtype: torch.dtype = torch.float32, **kw) -> None:
    """The official layout + the tokenizer files: loadable by dsv4.load_model and transformers."""
    save_model(model, path, dtype=dtype, **kw)
    copy_tokenizer(tokenizer_dir, path)


def copy_tokenizer(tokenizer_dir: str, path: str) -> None:
    """The tokenizer files of a run into a model directory."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        src = os.path.join(tokenizer_dir, name)
        if os.path.isfile(src):
            shutil.copy(src, os.path.join(path, name))


def latest_checkpoint(directory: str) -> str | None:
    root = os.path.join(directory, "checkpoints")
    if not os.path.isdir(root):
        return None
    steps = sorted(d for d in os.listdir(root) if _STEP_DIR.match(d))
    return os.path.join(root, steps[-1]) if steps else None


def load_checkpoint(path: str, model: Transformer) -> dict:
    """Copy a checkpoint's weights into `model` (same config) and return its training state."""
    saved = load_model(path, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        mine = dict(model.named_parameters())
        mine.update(model.named_buffers())
        theirs = dict(saved.named_parameters())
        theirs.update(saved.named_buffers())
        for name, p in theirs.items():
            if name in mine:
                mine[name].copy_(p)
    return torch.load(os.path.join(path, "train_state.pt"), map_location="cpu", weights_only=False)

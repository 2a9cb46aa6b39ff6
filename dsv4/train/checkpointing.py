"""Training checkpoints: the model in the official format (fp32, so a resume is exact) plus tokenizer,
optimizer and data-loader state, and last a manifest of checksums (dsv4.train.manifest). Written to a temporary
directory and renamed, so a kill -9 mid-save leaves the previous checkpoint intact; the manifest catches what
the rename cannot (a bit flipped or a file truncated on disk later), and a resume then falls back to the newest
intact checkpoint."""
from __future__ import annotations

import logging
import os
import re
import shutil

import torch

from ..checkpoint import CheckpointError, load_model, save_model
from ..model import Transformer
from .manifest import has_manifest, verify_manifest, write_manifest

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{7})$")
TRAIN_STATE = "train_state.pt"


def save_checkpoint(directory: str, model: Transformer, tokenizer_dir: str, state: dict, keep: int = 2) -> str:
    """Write `directory/checkpoints/step_NNNNNNN/` and prune all but the newest `keep`."""
    root = os.path.join(directory, "checkpoints")
    final = os.path.join(root, f"step_{state['step']:07d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    export(model, tmp, tokenizer_dir, dtype=torch.float32)
    torch.save(state, os.path.join(tmp, TRAIN_STATE))
    write_manifest(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _prune(root, state["step"], keep)
    return final


def _prune(root: str, step: int, keep: int) -> None:
    """Keep the newest `keep` checkpoints up to `step`. Later ones go too: a run saving `step` resumed from
    before them, so they were incomplete or corrupt, and left in place they would look newer than this run's."""
    found = _step_dirs(root)
    later = [path for s, path in found if s > step]
    earlier = [path for s, path in found if s <= step]
    for path in later + earlier[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


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


def checkpoint_step(path: str) -> int | None:
    """The step a `step_NNNNNNN` directory is named for (None for another name)."""
    m = _STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def _step_dirs(root: str) -> list[tuple[int, str]]:
    """(step, path) of the `step_NNNNNNN` directories in `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    found = [(checkpoint_step(d), os.path.join(root, d)) for d in os.listdir(root) if _STEP_DIR.match(d)]
    return sorted((s, p) for s, p in found if os.path.isdir(p))


def checkpoint_problem(path: str) -> str | None:
    """Why the checkpoint in `path` cannot be resumed (naming the file), or None when it is intact."""
    if has_manifest(path):
        try:
            verify_manifest(path)
        except CheckpointError as e:
            return str(e)
        return None
    if os.path.isfile(os.path.join(path, TRAIN_STATE)) and os.path.isfile(os.path.join(path, "config.json")):
        log.warning("%s has no manifest.json (saved before checkpoints had checksums): resuming it unverified", path)
        return None
    return f"{path}: {'incomplete, no manifest.json' if os.listdir(path) else 'empty'}"


def latest_checkpoint(directory: str) -> str | None:
    """The newest intact checkpoint of the run in `directory`, None if it has no checkpoint at all. Newer
    ones that are incomplete or corrupt are skipped with a warning; if every one is, CheckpointError lists why."""
    root = os.path.join(directory, "checkpoints")
    problems = []
    for _, path in reversed(_step_dirs(root)):
        problem = checkpoint_problem(path)
        if problem is None:
            for p in problems:
                log.warning("skipping a checkpoint that cannot be resumed: %s; using %s instead", p, path)
            return path
        problems.append(problem)
    if problems:
        raise CheckpointError(f"{root}: no intact checkpoint to resume ({'; '.join(problems)})")
    return None


def read_train_state(path: str) -> dict:
    """The training state saved with the checkpoint in `path` (tensors and plain values only)."""
    file = os.path.join(path, TRAIN_STATE)
    if not os.path.isfile(file):
        raise CheckpointError(f"{file}: missing")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # whatever the unpickler meets in a damaged file: reading it is all this block does
        raise CheckpointError(f"{file}: not a readable training state ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{file}: not a training state (no integer 'step')")
    return state


def load_checkpoint(path: str, model: Transformer) -> dict:
    """Copy a checkpoint's weights into `model` (same config) and return its training state. Every tensor
    the model has must come from the checkpoint: a missing one (MTP blocks, say) is an error, not a tensor
    left at its initial value."""
    state = read_train_state(path)  # first: a damaged state is reported before any weight moves
    saved = load_model(path, device="cpu", dtype=torch.float32)
    n_mtp = model.config.n_mtp_layers
    if n_mtp and not saved.config.n_mtp_layers:
        raise CheckpointError(f"{path}: has no mtp.* tensors, but the model being trained has {n_mtp} MTP "
                              "block(s); resume with the settings the run was saved with (--mtp)")
    mine, theirs = model.state_dict(), saved.state_dict()
    missing = [n for n in mine if n not in theirs]
    reshaped = [f"{n} {tuple(theirs[n].shape)} vs {tuple(t.shape)}" for n, t in mine.items()
                if n in theirs and theirs[n].shape != t.shape]
    if missing or reshaped:
        raise CheckpointError(f"{path}: does not match the model being trained (missing: {missing[:5]}; "
                              f"shapes saved vs now: {reshaped[:5]})")
    with torch.no_grad():
        for name, t in mine.items():
            t.copy_(theirs[name])
    return state

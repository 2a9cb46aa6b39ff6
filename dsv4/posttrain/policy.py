"""A checkpoint directory as a trainable policy (model + tokenizer), and a trained policy back to one.

The saved directory is the official format (config.json + safetensors) with the tokenizer files, so
`dsv4.load_model`, `dsv4 chat`/`serve` and transformers all read it.
"""
from __future__ import annotations

import json
import os
import shutil

import torch

from ..checkpoint import CheckpointError, load_model, resolve_device, save_model
from ..generate.tokenizer import Tokenizer
from ..model import Transformer

__all__ = ["load_policy", "save_policy"]


def load_policy(path: str | os.PathLike, device: str | torch.device = "auto",
                dtype: torch.dtype = torch.float32) -> tuple[Transformer, Tokenizer]:
    """The model in train mode (parameters in `dtype`, fp32 islands kept) and its tokenizer. The tokenizer must
    have an EOS token (it ends every assistant turn) and fit the model's vocabulary."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    try:
        tokenizer = Tokenizer.from_dir(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no tokenizer.json; a policy needs its tokenizer next to the weights") from None
    model = load_model(path, device=resolve_device(device), dtype=dtype, weights="bf16").train()
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                              f"vocab_size {model.config.vocab_size}")
    if tokenizer.eos_id is None:
        raise CheckpointError(f"{path}: the tokenizer names no EOS token (tokenizer_config.json eos_token or "
                              "config.json eos_token_id); chat turns end with it")
    return model, tokenizer


def save_policy(model: Transformer, tokenizer: Tokenizer, out_dir: str | os.PathLike, *,
                tokenizer_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32) -> str:
    """Write the model (official format, `dtype`) and the tokenizer into `out_dir`; returns it. The tokenizer's
    config is copied from `tokenizer_dir` where it has one (it may carry more than BOS/EOS), else written."""
    out_dir = os.fspath(out_dir)
    save_model(model, out_dir, dtype=dtype)
    tokenizer.tok.save(os.path.join(out_dir, "tokenizer.json"))
    src = None if tokenizer_dir is None else os.path.join(os.fspath(tokenizer_dir), "tokenizer_config.json")
    if src is not None and os.path.isfile(src):
        shutil.copy(src, os.path.join(out_dir, "tokenizer_config.json"))
    else:
        name = tokenizer.tok.id_to_token
        config = {"bos_token": None if tokenizer.bos_id is None else name(tokenizer.bos_id),
                  "eos_token": None if tokenizer.eos_id is None else name(tokenizer.eos_id),
                  "add_bos_token": False, "tokenizer_class": "PreTrainedTokenizerFast"}
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, indent=2)
    return out_dir

"""save_model: a Transformer -> the official hub layout (config.json + safetensors in official naming),
which `transformers.DeepseekV4ForCausalLM.from_pretrained` and `dsv4.load_model` both read."""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from ..model import Transformer
from .names import native_to_official

# Stored in fp32 in the official checkpoints whatever the weight dtype (v4-architecture §7).
_STORED_FP32 = ("attn_sink", "ape", "gate.bias", "hc_attn_fn", "hc_attn_base", "hc_attn_scale", "hc_ffn_fn",
                "hc_ffn_base", "hc_ffn_scale", "hc_head_fn", "hc_head_base", "hc_head_scale")


def _official_tensors(model: Transformer, dtype: torch.dtype):
    n_experts = model.config.n_routed_experts
    named = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if n.endswith("tid2eid")]
    for pname, p in named:
        for name, expert in native_to_official(pname, n_experts):
            t = p.detach() if expert is None else p.detach()[expert]
            if t.is_floating_point():
                t = t.to(torch.float32 if name.endswith(_STORED_FP32) else dtype)
            else:
                t = t.to(torch.int64)
            yield name, t


def save_model(model: Transformer, path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
               max_shard_bytes: int = 4 << 30) -> None:
    """Write `config.json` and `model.safetensors` (or `model-0000i-of-0000n.safetensors` + index)."""
    if dtype not in (torch.bfloat16, torch.float32, torch.float16):
        raise ValueError(f"save_model writes bf16, fp16 or fp32 weights, got {dtype}")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    model.config.save(path)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in _official_tensors(model, dtype):
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.to("cpu").contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)

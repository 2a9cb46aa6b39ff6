"""save_model: a Transformer -> the official hub layout (config.json + safetensors in official naming),
which `transformers.DeepseekV4ForCausalLM.from_pretrained` and `dsv4.load_model` both read."""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from ..model import Transformer
from ..quant.formats import fp4_to_fp8, quantize_fp4_blocks, quantize_fp8_blocks
from .names import FP8_WEIGHTS, native_to_official

# Stored in fp32 in the official checkpoints whatever the weight dtype (docs/architecture.md#fp32-parameters).
_STORED_FP32 = ("attn_sink", "ape", "gate.bias", "hc_attn_fn", "hc_attn_base", "hc_attn_scale", "hc_ffn_fn",
                "hc_ffn_base", "hc_ffn_scale", "hc_head_fn", "hc_head_base", "hc_head_scale")



def _e8m0(s: torch.Tensor) -> torch.Tensor:
    return s.view(torch.float8_e8m0fnu) if hasattr(torch, "float8_e8m0fnu") else s


def _official_tensors(model: Transformer, dtype: torch.dtype, expert_format: str | None, fp8_weights: bool):
    n_experts = model.config.n_routed_experts
    named = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if n.endswith("tid2eid")]
    for pname, p in named:
        for name, expert in native_to_official(pname, n_experts):
            t = p.detach() if expert is None else p.detach()[expert]
            if expert is not None and expert_format in ("fp4", "fp8"):
                packed, scale = quantize_fp4_blocks(t)
                if expert_format == "fp8":
                    q, tile = fp4_to_fp8(packed, scale)
                    yield name, q
                    yield name[: -len("weight")] + "scale", _e8m0(tile)
                else:
                    yield name, packed
                    yield name[: -len("weight")] + "scale", _e8m0(scale)
            elif fp8_weights and name.endswith(FP8_WEIGHTS):
                q, scale = quantize_fp8_blocks(t)
                yield name, q
                yield name[: -len("weight")] + "scale", _e8m0(scale)
            elif t.is_floating_point():
                yield name, t.to(torch.float32 if name.endswith(_STORED_FP32) else dtype)
            else:
                yield name, t.to(torch.int64)


def save_model(model: Transformer, path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
               max_shard_bytes: int = 4 << 30, expert_format: str | None = None, fp8_weights: bool = False) -> None:
    """Write `config.json` and `model.safetensors` (or `model-0000i-of-0000n.safetensors` + index).

    expert_format "fp4": routed experts as packed e2m1 + 1x32 UE8M0 scales (exact for an FP4-QAT model);
    "fp8": the same values losslessly converted to e4m3 with 128x128 scales. fp8_weights: the weights the
    official checkpoint keeps in FP8 (attention, shared expert, indexer wq_b, MTP projections) as e4m3 with
    128x128 power-of-two scales; lossy unless the model was trained for it."""
    if dtype not in (torch.bfloat16, torch.float32, torch.float16):
        raise ValueError(f"save_model writes bf16, fp16 or fp32 weights, got {dtype}")
    if expert_format not in (None, "fp4", "fp8"):
        raise ValueError(f"expert_format must be None, 'fp4' or 'fp8', got {expert_format!r}")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    cfg = model.config
    if expert_format:
        cfg = cfg.replace(expert_dtype=expert_format)
    cfg.save(path)
    if fp8_weights:
        with open(os.path.join(path, "config.json")) as f:
            d = json.load(f)
        d["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                    "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(d, f, indent=2)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in _official_tensors(model, dtype, expert_format, fp8_weights):
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

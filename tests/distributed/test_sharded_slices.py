"""The sharded loader's slicing, in one process (no collectives run while loading): every rank's part of an
FP8 checkpoint in official naming and of one in transformers naming (fused expert stacks) equals the slice of
the one-process load that the reference's sharding gives that rank; bad checkpoints are refused as by
`load_model`."""
import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv4
from dsv4 import CheckpointError
from dsv4.distributed.tensor_parallel import load_part


def _fuse_experts(tensors: dict) -> dict:
    """Every MoE layer's routed experts as transformers stores them: gate_up_proj [E, 2I, D], down_proj [E, D, I]."""
    out = {k: v for k, v in tensors.items() if ".ffn.experts." not in k}
    layers = sorted({k.split(".ffn.experts.")[0] for k in tensors if ".ffn.experts." in k})
    for layer in layers:
        n = len([k for k in tensors if k.startswith(f"{layer}.ffn.experts.") and k.endswith(".w1.weight")])
        w = {k: torch.stack([tensors[f"{layer}.ffn.experts.{e}.{k}.weight"] for e in range(n)]) for k in ("w1", "w2", "w3")}
        out[f"model.{layer}.mlp.experts.gate_up_proj"] = torch.cat([w["w1"], w["w3"]], 1)
        out[f"model.{layer}.mlp.experts.down_proj"] = w["w2"]
    return out


def _rank_slice(name: str, full: torch.Tensor, cfg, world: int, rank: int) -> torch.Tensor:
    """What rank `rank` of `world` holds of parameter `name` under the reference's sharding."""
    def part(n):
        return slice(rank * n, (rank + 1) * n)
    heads, groups = cfg.n_heads // world, cfg.o_groups // world
    if name.endswith(".attn.wq_b.weight"):
        return full[part(heads * cfg.head_dim)]
    if name.endswith(".attn.attn_sink"):
        return full[part(heads)]
    if name.endswith(".attn.wo_a.weight"):
        return full[part(groups * cfg.o_lora_rank)]
    if name.endswith(".attn.wo_b.weight"):
        return full[:, part(groups * cfg.o_lora_rank)]
    if name.endswith((".experts.w1", ".experts.w2", ".experts.w3")):
        return full[part(cfg.n_routed_experts // world)]
    return full


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    cfg = dsv4.ModelConfig.preset("tiny").replace(n_heads=8, o_groups=4)
    model = dsv4.Transformer(cfg).init_weights(seed=4)
    dsv4.save_model(model, root / "fp8", dtype=torch.float32, fp8_weights=True)  # sliced after dequantisation
    dsv4.save_model(model, root / "fused", dtype=torch.float32)
    fused = _fuse_experts(load_file(root / "fused" / "model.safetensors"))
    save_file(fused, root / "fused" / "model.safetensors")
    return cfg, root


@pytest.mark.parametrize("kind, world", [("fp8", 4), ("fused", 2)])
def test_rank_parts_are_the_reference_slices(checkpoints, kind, world):
    cfg, root = checkpoints
    full = dict(dsv4.load_model(root / kind, dtype=torch.float32).named_parameters())
    for rank in range(world):
        part = load_part(root / kind, world, rank, group=None, dtype=torch.float32)
        params = dict(part.named_parameters())
        assert params.keys() == full.keys()
        for name, p in params.items():
            assert torch.equal(p, _rank_slice(name, full[name], cfg, world, rank)), (name, rank)
        assert part.layers[1].attn.n_heads == cfg.n_heads // world


def test_sharded_load_refuses_what_load_model_refuses(checkpoints, tmp_path):
    _, root = checkpoints
    tensors = load_file(root / "fused" / "model.safetensors")
    tensors["model.layers.1.mlp.experts.gate_up_proj"] = torch.cat(
        [tensors["model.layers.1.mlp.experts.gate_up_proj"], torch.zeros(8, 1, 128)], 1)
    (tmp_path / "config.json").write_text((root / "fused" / "config.json").read_text())
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"gate_up_proj' has shape \(8, 257, 128\), expected \(8, 256, 128\)"):
        load_part(tmp_path, 2, 0, group=None, dtype=torch.float32)


def test_native_rank_parts_hold_their_fp4_experts(tmp_path):
    """weights="native": each rank keeps its own experts' FP4 bytes and its rows / columns of the FP8 layers as
    bytes and scale tiles where they fall on 128 x 128 tiles (tiny at 2 ranks: wq_b's 128 rows; wo_a's 64 rows
    and wo_b's 64 columns cut tiles: dequantised), the replicated FP8 layers whole; its routed experts compute
    what the rank's dequantised part computes."""
    cfg = dsv4.ModelConfig.preset("tiny")
    dsv4.save_model(dsv4.Transformer(cfg).init_weights(seed=6), tmp_path, dtype=torch.float32, expert_format="fp4",
                    fp8_weights=True)
    files = load_file(tmp_path / "model.safetensors")
    world, per = 2, cfg.n_routed_experts // 2
    x = torch.randn(5, cfg.dim, generator=torch.Generator().manual_seed(0))
    idx = torch.randint(0, per, (5, 2), generator=torch.Generator().manual_seed(1))
    rw = torch.rand(5, 2, generator=torch.Generator().manual_seed(2))
    for rank in range(world):
        native = load_part(tmp_path, world, rank, group=None, dtype=torch.float32, weights="native")
        plain = load_part(tmp_path, world, rank, group=None, dtype=torch.float32)
        moe = native.layers[1].ffn
        w1, w2, w3 = moe.experts.packed
        attn = native.layers[1].attn
        assert w1.shape[0] == per and attn.wo_a.packed is None and attn.wo_b.packed is None
        assert torch.equal(attn.wq_a.qweight, files["layers.1.attn.wq_a.weight"].view(torch.uint8))
        rows = slice(rank * 128, (rank + 1) * 128)    # this rank's 2 heads of 64
        assert torch.equal(attn.wq_b.qweight, files["layers.1.attn.wq_b.weight"].view(torch.uint8)[rows])
        assert torch.equal(attn.wq_b.qscale, files["layers.1.attn.wq_b.scale"].view(torch.uint8)[rank:rank + 1])
        assert torch.equal(w2.data[1], files[f"layers.1.ffn.experts.{rank * per + 1}.w2.weight"].view(torch.uint8))
        want = plain.layers[1].ffn.routed(x, idx + rank * per, rw, expert_offset=rank * per)
        got = moe.routed(x, idx + rank * per, rw, expert_offset=rank * per)
        assert ((got - want).norm() / want.norm()).item() < 1e-5

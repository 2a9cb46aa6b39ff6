"""load_model(weights="native"): a tiny checkpoint in the official formats (FP8 attention / shared-expert /
indexer / MTP projections, FP4 routed experts) keeps its bytes, and its logits match the dequantised path."""
import os

import pytest
import torch

import dsv4
from dsv4.checkpoint.names import FP8_WEIGHTS
from dsv4.model.moe import RoutedExperts
from dsv4.model.norm import Linear
from dsv4.quant import dequant_fp4_blocks, dequant_fp8_blocks
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    path = tmp_path_factory.mktemp("official")
    # o_lora_rank 128: wo_a's head groups fall on its 128-row scale tiles (one FP8 GEMM per group, as in V4)
    model = dsv4.Transformer(dsv4.ModelConfig.preset("tiny").replace(o_lora_rank=128)).init_weights(seed=3)
    dsv4.save_model(model, path, dtype=torch.bfloat16, expert_format="fp4", fp8_weights=True)
    return path


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 21), generator=torch.Generator().manual_seed(0))


def test_native_weights_hold_the_checkpoint_bytes(official):
    model = dsv4.load_model(official, weights="native")
    names = dict(model.named_parameters())
    packed_fp8 = [n for n, m in model.named_modules() if isinstance(m, Linear) and m.packed is not None]
    experts = [m for m in model.modules() if isinstance(m, RoutedExperts)]
    assert packed_fp8 and all(f"{n}.weight".endswith(FP8_WEIGHTS) for n in packed_fp8)
    assert not any(n.endswith(FP8_WEIGHTS) or n.endswith(("experts.w1", "experts.w2", "experts.w3")) for n in names)
    assert experts and all(m.packed is not None for m in experts)
    # the bytes are the file's: one FP8 layer and one expert compared with the loader's exact dequantisation
    files = load_file(os.path.join(official, "model.safetensors"))
    wq = model.layers[0].attn.wq_a.packed
    assert torch.equal(wq.dequantize(), dequant_fp8_blocks(files["layers.0.attn.wq_a.weight"],
                                                           files["layers.0.attn.wq_a.scale"]))
    w2 = model.layers[1].ffn.experts.packed[1][3]
    assert torch.equal(w2.dequantize(), dequant_fp4_blocks(files["layers.1.ffn.experts.3.w2.weight"],
                                                           files["layers.1.ffn.experts.3.w2.scale"]))
    # the packed buffers hold exactly the checkpoint's FP8 / FP4 bytes and scales, and nothing is dequantised
    quantised = sum(t.numel() * t.element_size() for t in files.values() if t.element_size() == 1)
    held = {t.dtype: 0 for t in model.state_dict().values()}
    for t in model.state_dict().values():
        held[t.dtype] += t.numel() * t.element_size()
    assert held[torch.uint8] == quantised
    bf16 = dsv4.load_model(official, weights="bf16")
    assert sum(held.values()) < 0.7 * sum(t.numel() * t.element_size() for t in bf16.state_dict().values())


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
def test_native_logits_match_the_dequantised_model(official, dtype, tol):
    """fp32: the same products up to summation order. bf16: the dequantised path multiplies in bf16, the native
    ops in fp32 (both exact weights), so they differ by bf16 rounding of activations (~1e-2 per position)."""
    native = dsv4.load_model(official, dtype=dtype, weights="native")
    plain = dsv4.load_model(official, dtype=dtype, weights="bf16")
    tokens = _tokens(native.config.vocab_size)
    with torch.no_grad():
        a, b = native(tokens).float(), plain(tokens).float()
    rel = ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()           # worst position
    print(f"{dtype}: worst per-position relative error {rel:.2e}")
    assert rel < tol, f"per-position relative error {rel:.2e} > {tol}"
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= (1.0 if dtype == torch.float32 else 0.95)


def test_default_and_bad_choice(official):
    model = dsv4.load_model(official)                     # CPU: the dequantised model, as before
    assert model.layers[0].attn.wq_a.packed is None
    with pytest.raises(ValueError, match="weights='fp8'"):
        dsv4.load_model(official, weights="fp8")


def test_default_is_native_only_for_16_bit_inference_of_a_quantised_checkpoint_on_a_gpu(official, tmp_path):
    from dsv4.checkpoint.load import default_weights, plan_checkpoint
    plan, cuda = plan_checkpoint(official), torch.device("cuda")
    assert default_weights(plan, cuda, torch.bfloat16) == "native"
    assert default_weights(plan, cuda, torch.float16) == "native"
    assert default_weights(plan, cuda, torch.float32) == "bf16"
    assert default_weights(plan, torch.device("cpu"), torch.bfloat16) == "bf16"
    dsv4.save_model(dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=3), tmp_path,
                    dtype=torch.bfloat16)                 # no FP8 / FP4 tensor in it
    assert default_weights(plan_checkpoint(tmp_path), cuda, torch.bfloat16) == "bf16"


def test_native_decode_with_a_cache_matches_the_full_forward(official):
    """Prefill then one-token decode steps through the packed layers give the whole-sequence logits."""
    model = dsv4.load_model(official, dtype=torch.float32, weights="native")
    tokens = _tokens(model.config.vocab_size)[:1]
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(1, 64)
        steps = [model(tokens[:, :15], cache=cache)] + [model(tokens[:, i:i + 1], cache=cache)
                                                         for i in range(15, tokens.shape[1])]
    inc = torch.cat(steps, 1)
    assert ((inc - full).norm() / full.norm()).item() < 1e-4

"""The indexer-score and compressor-pooling kernels as the model calls them (its layouts, strides and dtypes),
picked for CPU tensors under the interpreter: whole-prompt and chunked prefill give the references' logits, a
speculative verify and rollback (the compressors' multi-token decode op) the references' logits and states, and a
training loss the references' loss and gradients. (On a GPU, tests/gpu runs the Triton paths inside the model.)"""
import pytest
import torch

import dsv4
from dsv4.model.attention import Attention
from dsv4.ops import dispatch
from dsv4.train.losses import LossWeights, compute_loss

from .device import ON_GPU

pytestmark = pytest.mark.skipif(ON_GPU, reason="tests/gpu runs the Triton kernels inside the model there")
TOKENS = torch.randint(0, 2048, (2, 70), generator=torch.Generator().manual_seed(0))


def _triton_everywhere(monkeypatch, ops: list[str]) -> None:
    """The Triton implementation of `ops` picked for every call, CPU tensors too."""
    for op in ops:
        fn, _ = dispatch._REGISTRY[op]["triton"]
        monkeypatch.setitem(dispatch._REGISTRY[op], "triton", (fn, lambda *a, **k: True))


@torch.no_grad()
def _prefill_logits() -> tuple[torch.Tensor, torch.Tensor]:
    """Whole prompts (groups from position 0), and the same prompts in chunks through the cache (the state's
    groups)."""
    model = dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=3).eval()
    cache = model.new_cache(2, 128)
    chunks = [model(TOKENS[:, a:b], cache=cache) for a, b in ((0, 23), (23, 50), (50, 70))]
    return model(TOKENS), torch.cat(chunks, 1)


def _loss_and_grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A training loss with dense attention (no top-k choice to flip) and the indexer's KL loss on."""
    model = dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=3).train()
    for m in model.modules():
        if isinstance(m, Attention):
            m.sparse, m.indexer_loss = False, True
    loss, parts = compute_loss(model, TOKENS, LossWeights())
    loss.backward()
    assert parts["indexer_kl"] > 0
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_prefill_pooling(monkeypatch):
    want = _prefill_logits()
    _triton_everywhere(monkeypatch, ["compress_groups"])
    for ref, got in zip(want, _prefill_logits()):
        assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_training_scores_and_pooling(monkeypatch):
    ref_loss, ref_grads = _loss_and_grads()
    _triton_everywhere(monkeypatch, ["index_scores", "compress_groups"])
    loss, grads = _loss_and_grads()
    assert grads.keys() == ref_grads.keys()
    assert ((loss - ref_loss).abs() / ref_loss.abs()).item() < 1e-5, (loss, ref_loss)
    for n, g in ref_grads.items():  # (the heads' mHC weights are sums that cancel: fp32 rounding shows ~1e-3 there)
        err = ((grads[n] - g).norm() / g.norm().clamp(min=1e-30)).item()
        assert err < (5e-3 if "hc_head" in n else 1e-4), (n, err)


@torch.no_grad()
def _verify_and_rollback() -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A speculative verify on ragged rows (3 tokens inside a cache checkpoint: the compressors' multi-token decode
    op), rows keeping 0 .. 3 of them, then the next token's logits and the compressor states."""
    model = dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=3).eval()
    cache = model.new_cache(4, 96)
    for r, n in enumerate((29, 30, 31, 45)):
        model(TOKENS[r % 2:r % 2 + 1, :n], cache=cache.select(r))
    ckpt = cache.checkpoint(3)
    model(TOKENS[:, 50:53].repeat(2, 1), cache=cache)
    cache.rollback(ckpt, [0, 1, 2, 3])
    logits = model(TOKENS[:, 60:61].repeat(2, 1), cache=cache)
    return logits, [t for layer in cache.layers for st in layer.states() for t in (st.kv, st.score)]


def test_verify_steps_and_rollback(monkeypatch):
    want_logits, want_states = _verify_and_rollback()
    _triton_everywhere(monkeypatch, ["compress_step", "compress_steps"])
    got_logits, got_states = _verify_and_rollback()
    assert ((got_logits - want_logits).abs().max() / want_logits.abs().max()).item() < 1e-5
    for got, want in zip(got_states, want_states):
        assert torch.equal(got.isinf(), want.isinf())
        assert (got.nan_to_num(0, 0, 0) - want.nan_to_num(0, 0, 0)).abs().max() < 1e-4


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A tiny checkpoint in the official formats (FP8 projections, FP4 experts); wo_a's 2 head groups on 128-row
    scale tiles, as V4's."""
    path = tmp_path_factory.mktemp("official")
    cfg = dsv4.ModelConfig.preset("tiny").replace(o_lora_rank=128, n_layers=2, compress_ratios=(0, 4, 0))
    model = dsv4.Transformer(cfg).init_weights(seed=3)   # a hash-routed layer, a learned-routing CSA one, MTP
    dsv4.save_model(model, path, dtype=torch.bfloat16, expert_format="fp4", fp8_weights=True)
    return path


@torch.no_grad()
def _native_logits(path) -> list[torch.Tensor]:
    """Native weights: a 6-token prefill of 2 rows (12 pairs x 2 slots: the sorted experts), one decode step (2
    tokens: the experts' in-place pairs), and with the prefill thresholds at 1 a step on the dequantised copies."""
    from dsv4.ops.triton import packed_experts, packed_linear
    model = dsv4.load_model(path, dtype=torch.float32, weights="native")   # fp32: equal up to summation order
    cache = model.new_cache(2, 16)
    out = [model(TOKENS[:, :6], cache=cache), model(TOKENS[:, 6:7], cache=cache)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(packed_linear, "DEQUANT_MIN_ROWS", 1)
        mp.setattr(packed_experts, "EXPERT_DEQUANT_MIN_PAIRS", 0)
        out.append(model(TOKENS[:, 7:8], cache=cache))
    return out


def test_native_weights(monkeypatch, official):
    """The packed-weight kernels as the native model calls them (grouped wo_a, the shared expert's fused gate/up
    SwiGLU, the FP4 experts sorted and in place, the dequantised prefill paths) give the references' logits."""
    want = _native_logits(official)
    _triton_everywhere(monkeypatch, ["linear_fp8_weight", "linear_fp8_grouped", "swiglu_fp8", "moe_experts_fp4"])
    for i, (ref, got) in enumerate(zip(want, _native_logits(official))):
        assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-4, i


def test_launches_build_for_gpus(native_build):
    native_build()

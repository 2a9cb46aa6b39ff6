"""GRPO's update on a GPU waits for the device a fixed number of times per batch: the same for 2 and for 8
minibatches (CUDA's sync debug mode counts the waits).

Two checks. The loop itself: with autocast off (the fp32 update) the routed-experts op is swapped for a dense
stand-in (every expert on every token, weighted by the routing weights, zero where not routed: the same sum),
because the op fp32 activations reach on a GPU is the reference loop over experts, which reads the per-expert
counts (bincount) to the host once per MoE layer and forward. The real path: under the default bf16 autocast the
experts run on the grouped bf16 kernels, as SFT's and OPD's do, which do not read the counts, so the real model
needs no stand-in."""
from __future__ import annotations

import warnings

import pytest
import torch

import dsv4
from dsv4.posttrain.envs.base import Problem, Reward
from dsv4.posttrain.grpo import GRPOConfig, train_on_batch
from dsv4.posttrain.trajectory import Trajectory
from dsv4.ops import dispatch
from dsv4.ops.reference.experts import swiglu
from dsv4.train.optim import build_optimizers

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _dense_experts(x, w1, w2, w3, idx, weights, swiglu_limit):
    """The routed experts' sum with every expert run on every token (no host read of the routing)."""
    E = w1.shape[0]
    gate = torch.einsum("nc,efc->nef", x, w1.to(x.dtype))
    up = torch.einsum("nc,efc->nef", x, w3.to(x.dtype))
    h = swiglu(gate, up, swiglu_limit)                                                        # [N, E, F]
    route = torch.zeros(x.shape[0], E, dtype=torch.float32, device=x.device).scatter_add(1, idx.long(), weights.float())
    h = h * route.unsqueeze(-1)
    return torch.einsum("nef,ecf->nc", h.to(x.dtype), w2.to(x.dtype)).float()


def _syncs(minibatches: int, autocast: bool = True) -> int:
    model = dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=0).cuda().train()
    g = torch.Generator().manual_seed(0)
    problem, trajs = Problem("toy", "p", [], None), []
    for i in range(8):
        tokens = torch.randint(3, 2000, (20 + i,), generator=g).tolist()
        trajs.append(Trajectory(problem, tokens, 8, [0] * 8 + [1] * (len(tokens) - 8), [0.0] * len(tokens),
                                reward=Reward(float(i % 2), i % 2 == 1)))
    cfg = GRPOConfig(num_generations=4, batch_prompts=2, lr=1e-4, max_new_tokens=32, mu=1, minibatches=minibatches,
                     autocast=autocast)
    opts = build_optimizers(model, cfg.lr, optimizer=cfg.optimizer, weight_decay=cfg.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    train_on_batch(model, opts, params, trajs, cfg)   # compilation, allocation
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_on_batch(model, opts, params, trajs, cfg, seed=1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_the_dense_stand_in_equals_the_reference_experts():
    g = torch.Generator().manual_seed(0)
    x, w1, w3 = torch.randn(5, 16, generator=g), torch.randn(4, 8, 16, generator=g), torch.randn(4, 8, 16, generator=g)
    w2, idx = torch.randn(4, 16, 8, generator=g), torch.tensor([[0, 2], [1, 3], [2, 0], [3, 3], [1, 1]])
    weights = torch.rand(5, 2, generator=g)
    want = dispatch._REGISTRY["moe_experts"]["reference"][0](x.cuda(), w1.cuda(), w2.cuda(), w3.cuda(), idx.cuda(),
                                                             weights.cuda(), 7.0)
    got = _dense_experts(x.cuda(), w1.cuda(), w2.cuda(), w3.cuda(), idx.cuda(), weights.cuda(), 7.0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_the_minibatch_loop_does_not_wait_for_the_gpu(monkeypatch):
    monkeypatch.setitem(dispatch._REGISTRY, "moe_experts", {"reference": (_dense_experts, lambda *a, **k: True)})
    _syncs(2, autocast=False)   # process-wide first-use work (lazy CUDA/library initialisation) may wait once
    two, eight = _syncs(2, autocast=False), _syncs(8, autocast=False)
    assert two == eight, (two, eight)
    assert two >= 1   # the one read of the batch's values (the counter works)


def test_the_autocast_update_with_the_real_experts_does_not_wait_per_minibatch():
    """GRPO's default update on a GPU (bf16 autocast forwards) with the model's own experts op."""
    _syncs(2)   # process-wide first-use work (lazy CUDA/library initialisation, kernel compilation) may wait
    two, eight = _syncs(2), _syncs(8)
    assert two == eight, (two, eight)
    assert two >= 1   # the one read of the batch's values (the counter works)

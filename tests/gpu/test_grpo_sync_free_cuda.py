"""GRPO's update on a GPU waits for the device a fixed number of times per batch, however many minibatches it
runs: the minibatch loop launches without synchronising (CUDA's sync debug mode counts the waits)."""
from __future__ import annotations

import warnings

import pytest
import torch

import dsv4
from dsv4.posttrain.envs.base import Problem, Reward
from dsv4.posttrain.grpo import GRPOConfig, train_on_batch
from dsv4.posttrain.trajectory import Trajectory
from dsv4.train.optim import build_optimizers

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _syncs(minibatches: int) -> int:
    model = dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=0).cuda().train()
    g = torch.Generator().manual_seed(0)
    problem, trajs = Problem("toy", "p", [], None), []
    for i in range(8):
        tokens = torch.randint(3, 2000, (20 + i,), generator=g).tolist()
        trajs.append(Trajectory(problem, tokens, 8, [0] * 8 + [1] * (len(tokens) - 8), [0.0] * len(tokens),
                                reward=Reward(float(i % 2), i % 2 == 1)))
    cfg = GRPOConfig(num_generations=4, batch_prompts=2, lr=1e-4, max_new_tokens=32, mu=1, minibatches=minibatches)
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


def test_the_minibatch_loop_does_not_wait_for_the_gpu():
    two, eight = _syncs(2), _syncs(8)
    assert two == eight, (two, eight)
    assert two >= 1   # the one read of the batch's values (the counter works)

"""GRPO's update (train_on_batch) reads the device once per batch: its results are what the same arithmetic gives
read per minibatch (an independent recomputation for one minibatch, the earlier per-minibatch loop for several),
a non-finite gradient still stops it, and the minibatch loop makes no host reads of tensor values."""
import copy
import math
import os

import pytest
import torch

from dsv4.posttrain import grpo as grpo_mod
from dsv4.posttrain.envs.base import Problem, Reward
from dsv4.posttrain.grpo import GRPOConfig, minibatch_indices, train_on_batch
from dsv4.posttrain.grpo_loss import group_advantages, grpo_loss
from dsv4.posttrain.logprobs import pad_batch, token_logprobs
from dsv4.posttrain.trajectory import Trajectory
from dsv4.train.optim import build_optimizers
from grpo_toys import toy_model
from read_counter import count_reads

REPLIES = [[40, 41], [50, 51, 52], [60], [70, 71], [80, 81, 82], [90]]


def _trajs(model, rewards):
    """Trajectories of REPLIES after one prompt, with the model's own log-probabilities as the rollout's, shifted
    a little so the drift is not zero."""
    problem, prompt, out = Problem("toy", "p", [], None), [0, 5, 6, 7], []
    for reply, r in zip(REPLIES, rewards):
        tokens = prompt + reply
        with torch.no_grad():
            lp, _ = token_logprobs(model, torch.tensor([tokens]))
        n = len(prompt)
        out.append(Trajectory(problem, tokens, n, [0] * n + [1] * len(reply),
                              [0.0] * n + (lp[0, n:] + 0.01).tolist(), reward=Reward(r, r > 0.5)))
    return out


def _setup(**kw):
    model = toy_model(n_layers=2, compress_ratios=(0, 4, 0))
    ref = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():   # a reference unlike the policy, so the KL term is not zero
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    cfg = GRPOConfig(num_generations=3, batch_prompts=2, lr=1e-2, optimizer="adamw", max_new_tokens=3, beta=0.1,
                     **kw)
    return model, ref, cfg, _trajs(model, [1.0, 0.0, 0.5, 0.0, 1.0, 0.25])


def _opts(model, cfg):
    return build_optimizers(model, cfg.lr, optimizer=cfg.optimizer, weight_decay=cfg.weight_decay)


def test_one_minibatch_matches_an_independent_recomputation():
    model, ref, cfg, trajs = _setup()
    twin = copy.deepcopy(model)
    stats = train_on_batch(model, _opts(model, cfg), list(model.parameters()), trajs, cfg, ref)
    # the same objective on the same inputs, read on the spot
    loss_cfg = cfg.loss_config()
    batch = pad_batch(trajs)
    adv = group_advantages(torch.tensor([t.reward.score for t in trajs]), cfg.num_generations)
    with torch.no_grad():
        ref_logp, _ = token_logprobs(ref, batch.tokens)
    logp, ent = token_logprobs(twin.train(), batch.tokens)
    loss, parts = grpo_loss(logp, logp.detach(), adv, batch.mask, loss_cfg, ref_logp)
    loss.backward()
    opts = _opts(twin, cfg)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(list(twin.parameters()), cfg.grad_clip))
    for o in opts:
        o.step()
    m = batch.mask.float()
    want = {"kl": parts["kl"], "clip_frac": parts["clip_frac"], "loss": float(loss.detach()), "grad_norm": grad_norm,
            "entropy": float((ent * m).sum() / m.sum()),
            "drift": float(((logp.detach() - batch.old_logp).abs() * m).sum() / m.sum())}
    assert stats == want
    assert stats["kl"] > 0 and stats["drift"] > 5e-3 and stats["grad_norm"] > 0
    for a, b in zip(model.parameters(), twin.parameters()):   # the same update
        assert torch.equal(a, b)


def _per_minibatch_reads(model, optimizers, params, trajs, cfg, ref_model, seed):
    """The earlier loop: every value read on the host as soon as it is computed, the norm checked before the
    update (the oracle for several minibatches and epochs)."""
    loss_cfg = cfg.loss_config()
    model.train()
    adv = group_advantages(torch.tensor([t.reward.score for t in trajs]), cfg.num_generations)
    batch = pad_batch(trajs)
    with torch.no_grad():
        ref_logp, _ = token_logprobs(ref_model, batch.tokens)
        old_logp, _ = token_logprobs(model, batch.tokens)
    acc = {"kl": [], "clip_frac": [], "loss": [], "grad_norm": [], "entropy": []}
    for epoch in range(cfg.mu):
        order = torch.randperm(len(trajs), generator=torch.Generator().manual_seed(seed + epoch))
        for part in order.chunk(cfg.minibatches):
            idx = part.sort().values
            logp, ent = token_logprobs(model, batch.tokens[idx])
            mask = batch.mask[idx]
            loss, stats = grpo_loss(logp, old_logp[idx], adv[idx], mask, loss_cfg, ref_logp[idx])
            for o in optimizers:
                o.zero_grad(set_to_none=True)
            loss.backward()
            g = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            assert math.isfinite(g)
            for o in optimizers:
                o.step()
            m = mask.float()
            acc["loss"].append(float(loss.detach()))
            acc["grad_norm"].append(g)
            acc["clip_frac"].append(stats["clip_frac"])
            acc["entropy"].append(float((ent * m).sum() / m.sum().clamp(min=1)))
            acc["kl"].append(stats["kl"])
    out = {k: sum(v) / len(v) for k, v in acc.items()}
    m = batch.mask.float()
    out["drift"] = float(((old_logp - batch.old_logp).abs() * m).sum() / m.sum().clamp(min=1))
    return out


def test_epochs_and_minibatches_match_the_per_minibatch_reads():
    model, ref, cfg, trajs = _setup(mu=2, minibatches=4)   # 6 trajectories in parts of 2: 3 per epoch
    twin = copy.deepcopy(model)
    stats = train_on_batch(model, _opts(model, cfg), list(model.parameters()), trajs, cfg, ref, seed=5)
    want = _per_minibatch_reads(twin, _opts(twin, cfg), list(twin.parameters()), trajs, cfg, ref, seed=5)
    assert stats == want
    assert stats["clip_frac"] > 0   # the second epoch moves the ratio past the clip bound somewhere
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_minibatch_indices_split_as_tensor_chunk():
    for n, k, seed in [(6, 4, 0), (7, 3, 1), (8, 8, 2), (5, 1, 3), (9, 2, 4)]:
        got = minibatch_indices(n, 2, k, seed)
        want = [p.sort().values.tolist() for e in range(2)
                for p in torch.randperm(n, generator=torch.Generator().manual_seed(seed + e)).chunk(k)]
        assert got == want


def test_a_non_finite_gradient_still_stops_the_batch():
    model, ref, cfg, trajs = _setup(minibatches=2)
    model.layers[0].ffn.gate.weight.register_hook(lambda g: g * float("nan"))
    with pytest.raises(RuntimeError, match="non-finite gradient norm in minibatch 1 of 2"):
        train_on_batch(model, _opts(model, cfg), list(model.parameters()), trajs, cfg, ref)




@pytest.mark.parametrize("minibatches", [2, 6])
def test_the_minibatch_loop_reads_nothing(monkeypatch, minibatches):
    """The reads of one batch, whatever the number of minibatches: the host's shuffles (one per epoch), the model's
    range check of the token ids (train_on_batch gives it host ids, so on a GPU it reads no device value), AdamW's
    step counters (host tensors in torch.optim) and the one read of the batch's values; besides those only the CPU
    reference kernels (dsv4/ops/reference, not the GPU's) read values."""
    model, ref, cfg, trajs = _setup(mu=2, minibatches=minibatches)
    opts, params = _opts(model, cfg), list(model.parameters())
    calls = count_reads(monkeypatch)
    train_on_batch(model, opts, params, trajs, cfg, ref)
    monkeypatch.undo()
    reference = os.path.join("dsv4", "ops", "reference") + os.sep
    host = {"_check_tokens", "_get_value"}   # the ids' range; torch.optim's step counters (kept on the host)
    rest = [(name, fn) for name, fn, path in calls if reference not in path and fn not in host]
    assert rest == [("tolist", "minibatch_indices")] * 2 + [("tolist", "read_once")], rest
    forwards = 2 + 2 * -(-len(trajs) // -(-len(trajs) // minibatches))   # reference, old policy, each minibatch
    assert [fn for _, fn, _ in calls].count("_check_tokens") == 2 * forwards   # min and max of host ids

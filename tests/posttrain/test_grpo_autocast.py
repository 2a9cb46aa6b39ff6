"""GRPO's training forwards under autocast: on a GPU the update runs them under bf16 autocast (cfg.autocast); here a
CPU bf16 autocast stands in for it through train_on_batch's `autocast` argument. One step under it still moves
probability towards the rewarded sample, the loss is computed in fp32 outside the autocast region, and on the CPU
the default configuration runs exactly the fp32 update (autocast has no effect there)."""
import copy
from contextlib import nullcontext

import torch

from dsv4.posttrain import grpo as grpo_mod
from dsv4.posttrain.envs.base import Problem, Reward
from dsv4.posttrain.grpo import GRPOConfig, train_on_batch, training_autocast
from dsv4.posttrain.logprobs import token_logprobs
from dsv4.posttrain.trajectory import Trajectory
from dsv4.train.optim import build_optimizers
from grpo_toys import toy_model

PROMPT, GOOD, BAD = [0, 5, 6, 7], [40, 41, 42], [50, 51, 52]


def _cpu_bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _reply_logprob(model, reply) -> float:
    """log p(reply | PROMPT) under the model, in fp32 without autocast."""
    with torch.no_grad():
        lp, _ = token_logprobs(model, torch.tensor([PROMPT + reply]))
    return float(lp[0, len(PROMPT):].sum())


def _trajs(model) -> list[Trajectory]:
    """The rewarded reply and the unrewarded one, with the model's fp32 log-probabilities as the rollout's."""
    problem, out = Problem("toy", "p", [], None), []
    for reply, r in ((GOOD, 1.0), (BAD, 0.0)):
        tokens = PROMPT + reply
        with torch.no_grad():
            lp, _ = token_logprobs(model, torch.tensor([tokens]))
        n = len(PROMPT)
        out.append(Trajectory(problem, tokens, n, [0] * n + [1] * len(reply), [0.0] * n + lp[0, n:].tolist(),
                              reward=Reward(r, r > 0.5)))
    return out


def _step(model, trajs, cfg, ref=None, **kw) -> dict:
    opts = build_optimizers(model, cfg.lr, optimizer="adamw", weight_decay=0.0)
    return train_on_batch(model, opts, list(model.parameters()), trajs, cfg, ref, **kw)


def _watch_forwards(model) -> list[bool]:
    """Whether CPU autocast is on at each forward of the first block (filled as the model runs)."""
    seen: list[bool] = []
    model.layers[0].register_forward_pre_hook(lambda m, a: seen.append(torch.is_autocast_enabled("cpu")))
    return seen


def _cfg(**kw) -> GRPOConfig:
    return GRPOConfig(**{"num_generations": 2, "batch_prompts": 1, "lr": 1e-3, "optimizer": "adamw",
                         "max_new_tokens": 3, **kw})


def test_one_bf16_autocast_step_raises_the_rewarded_sample_and_lowers_the_other():
    model = toy_model(n_layers=2, compress_ratios=(0, 4, 0))
    trajs = _trajs(model)
    before = [_reply_logprob(model, GOOD), _reply_logprob(model, BAD)]
    seen = _watch_forwards(model)
    stats = _step(model, trajs, _cfg(), autocast=_cpu_bf16)
    assert seen and all(seen)   # every training forward ran under the autocast
    after = [_reply_logprob(model, GOOD), _reply_logprob(model, BAD)]
    assert after[0] > before[0] + 1e-3 and after[1] < before[1] - 1e-3, (before, after)
    # the bf16 forward differs from the fp32 rollout log-probs a little, not by a broken computation
    assert 0 < stats["drift"] < 0.1 and stats["grad_norm"] > 0, stats


def test_the_loss_is_fp32_and_outside_the_autocast(monkeypatch):
    """Under a bf16 autocast forward (with a reference model and several minibatches, so every forward is
    exercised), the log-probs that reach the loss are fp32, the loss runs with autocast off, and its value is fp32."""
    model = toy_model(n_layers=2, compress_ratios=(0, 4, 0))
    ref = copy.deepcopy(model).requires_grad_(False)
    trajs = _trajs(model) * 2
    seen, real = [], grpo_mod.grpo_loss

    def spy(logp, old, adv, mask, cfg, ref_logp=None, **kw):
        loss, stats = real(logp, old, adv, mask, cfg, ref_logp, **kw)
        seen.append({"inputs": {logp.dtype, old.dtype, ref_logp.dtype}, "autocast": torch.is_autocast_enabled("cpu"),
                     "outputs": {loss.dtype, *(v.dtype for k, v in stats.items() if v.is_floating_point())}})
        return loss, stats
    monkeypatch.setattr(grpo_mod, "grpo_loss", spy)
    forwards = _watch_forwards(model)
    _step(model, trajs, _cfg(batch_prompts=2, beta=0.1, mu=2, minibatches=2), ref, autocast=_cpu_bf16)
    assert len(seen) == 4 and forwards and all(forwards)
    for s in seen:
        assert s == {"inputs": {torch.float32}, "autocast": False, "outputs": {torch.float32}}, s
    with _cpu_bf16():   # token_logprobs itself returns fp32 under the autocast
        logp, ent = token_logprobs(model, torch.tensor([PROMPT + GOOD]))
    assert logp.dtype == ent.dtype == torch.float32


def test_the_default_on_the_cpu_is_the_fp32_update():
    """cfg.autocast (the default) leaves the CPU update bit-identical to the update with it off and to one with no
    autocast context at all: same weights, same logged values, no forward under autocast."""
    assert GRPOConfig().autocast and training_autocast(GRPOConfig(), torch.device("cpu")) is nullcontext
    base = toy_model(n_layers=2, compress_ratios=(0, 4, 0))
    trajs = _trajs(base)
    runs = []
    for kw in ({}, {"cfg": _cfg(autocast=False)}, {"autocast": nullcontext}):
        model = copy.deepcopy(base)
        seen = _watch_forwards(model)
        cfg = kw.pop("cfg", _cfg())
        stats = _step(model, trajs, cfg, **kw)
        assert seen and not any(seen)
        runs.append((stats, model))
    (stats, model), rest = runs[0], runs[1:]
    for other_stats, other in rest:
        assert other_stats == stats
        for a, b in zip(model.parameters(), other.parameters()):
            assert torch.equal(a, b)

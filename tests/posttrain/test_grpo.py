"""The GRPO loop on the tiny model: one step moves probability towards the rewarded sample; a short seeded run
on a toy environment raises the reward clearly and writes its outputs."""
import json
import os

import torch

from dsv4.posttrain.envs.base import Problem, Reward
from dsv4.posttrain.grpo import GRPOConfig, grpo_train, train_on_batch
from dsv4.posttrain.logprobs import token_logprobs
from dsv4.posttrain.trajectory import Trajectory
from dsv4.train.optim import build_optimizers
from grpo_toys import LetterEnv, toy_model, toy_tokenizer


def _traj(problem, prompt, reply, model, reward):
    tokens = prompt + reply
    with torch.no_grad():
        lp, _ = token_logprobs(model, torch.tensor([tokens]))
    n = len(prompt)
    return Trajectory(problem, tokens, n, [0] * n + [1] * len(reply), [0.0] * n + lp[0, n:].tolist(),
                      reward=Reward(reward, reward > 0.5))


def test_one_step_raises_the_rewarded_sample_and_lowers_the_other():
    model = toy_model(n_layers=2, compress_ratios=(0, 4, 0))
    problem = Problem("toy", "p", [], None)
    prompt, good, bad = [0, 5, 6, 7], [40, 41, 42], [50, 51, 52]
    trajs = [_traj(problem, prompt, good, model, 1.0), _traj(problem, prompt, bad, model, 0.0)]
    before = [sum(t.logprobs) for t in trajs]
    cfg = GRPOConfig(num_generations=2, batch_prompts=1, lr=1e-3, optimizer="adamw", max_new_tokens=3)
    opts = build_optimizers(model, cfg.lr, optimizer="adamw", weight_decay=0.0)
    stats = train_on_batch(model, opts, list(model.parameters()), trajs, cfg)
    after = [sum(_traj(problem, prompt, t.tokens[4:], model, 0).logprobs) for t in trajs]
    assert after[0] > before[0] + 1e-3 and after[1] < before[1] - 1e-3, (before, after)
    assert stats["drift"] < 1e-5 and stats["clip_frac"] == 0.0 and stats["grad_norm"] > 0


def test_grpo_raises_reward_on_a_toy_environment(tmp_path):
    tok, model = toy_tokenizer(), toy_model(n_layers=2, n_mtp_layers=0, compress_ratios=(0, 4))
    cfg = GRPOConfig(steps=14, num_generations=8, batch_prompts=1, lr=1e-2, max_new_tokens=4, eval_problems=2,
                     seed=0)
    res = grpo_train(model, tok, {"toy": LetterEnv(any_=True)}, cfg, out=str(tmp_path), progress=False)
    rewards = [r["reward"] for r in res.rows]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert first < 0.4 and last > first + 0.4, rewards   # (seeds 0-3 all rise from <= 0.3 to >= 0.7)
    for key in ("reward", "accuracy", "entropy", "response_len", "clip_frac", "drift", "grad_norm", "loss"):
        assert key in res.rows[-1], key
    assert max(r["drift"] for r in res.rows) < 1e-4     # fp32 sampler and trainer agree
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows if "reward" in r] == list(range(1, 15))
    assert [r["step"] for r in rows if "eval_acc" in r] == [0, 14]
    assert os.path.isfile(tmp_path / "reward.png") and os.path.isfile(tmp_path / "final" / "config.json")


def test_epochs_minibatches_and_reference_kl():
    """mu = 2 epochs of 2 minibatches against a frozen reference: the ratio's denominator is the policy before the
    batch (so drift is measured by a separate pass), and the KL to the reference grows from 0 as the policy moves."""
    import copy
    model = toy_model(n_layers=2, compress_ratios=(0, 4, 0))
    ref = copy.deepcopy(model).requires_grad_(False)
    problem = Problem("toy", "p", [], None)
    prompt = [0, 5, 6, 7]
    replies = [[40, 41], [50, 51, 52], [60], [70, 71]]
    trajs = [_traj(problem, prompt, r, model, float(i % 2)) for i, r in enumerate(replies)]
    for loss_type in ("grpo", "dr_grpo"):
        cfg = GRPOConfig(num_generations=2, batch_prompts=2, lr=1e-2, optimizer="adamw", max_new_tokens=3, mu=2,
                         minibatches=2, beta=0.1, loss_type=loss_type)
        opts = build_optimizers(model, cfg.lr, optimizer="adamw", weight_decay=0.0)
        stats = train_on_batch(model, opts, list(model.parameters()), trajs, cfg, ref)
        assert stats["kl"] > 0 and stats["entropy"] > 0 and stats["grad_norm"] > 0, stats
        if loss_type == "grpo":
            assert stats["drift"] < 1e-5      # measured before the first update


def test_bad_settings_are_refused_up_front():
    import pytest
    from dsv4.errors import InvalidArgument
    for kw, match in [(dict(num_generations=0), "num_generations"), (dict(epsilon=-0.1), "epsilon"),
                      (dict(beta=-1.0), "beta"), (dict(loss_type="ppo"), "loss_type"),
                      (dict(top_p=1.5), "top_p"), (dict(minibatches=99, batch_prompts=2, num_generations=2),
                                                   "minibatches")]:
        with pytest.raises(InvalidArgument, match=match):
            GRPOConfig(**kw)


def test_a_time_cap_stops_grpo_after_the_step_that_passes_it():
    tok = toy_tokenizer()
    cfg = GRPOConfig(steps=5, num_generations=2, batch_prompts=2, max_new_tokens=4, eval_problems=2,
                     sampler="direct", optimizer="adamw", max_seconds=1e-9)
    res = grpo_train(toy_model(), tok, {"toy": LetterEnv()}, cfg, progress=False)
    # the cap counts from the end of the first step (the warm-up), so the second is the one that passes it
    assert [r["step"] for r in res.rows] == [1, 2]
    assert [e["step"] for e in res.evals] == [0, 2]          # the final evaluation is at the step it stopped


def test_grpo_gradient_does_not_depend_on_the_length_bucket():
    """Padding the batch to a bucket (as GRPO does on a GPU, 64) leaves the loss's gradient unchanged: the pad
    positions are masked and causal attention keeps them out of the real tokens' log-probabilities."""
    from dsv4.generate.sampling import SamplingConfig
    from dsv4.posttrain.rollout import rollout
    from grpo_toys import grpo_gradients
    tok, env = toy_tokenizer(), LetterEnv()
    model = toy_model(n_layers=2, compress_ratios=(0, 4))
    trajs = rollout(model, tok, env.heldout(2), {"toy": env}, group_size=4, sampling=SamplingConfig(temperature=1.0),
                    max_new_tokens=8, seed=3, sampler="direct")
    assert len({t.reward.score for t in trajs}) > 1
    tight, padded = grpo_gradients(model, trajs, 4), grpo_gradients(model, trajs, 4, bucket=64)
    assert tight.keys() == padded.keys() and len(tight) > 10
    for name, g in tight.items():
        assert torch.allclose(padded[name], g, rtol=1e-4, atol=1e-7), name

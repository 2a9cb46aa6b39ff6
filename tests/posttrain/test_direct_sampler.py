"""The direct rollout sampler: ragged contexts batched (prefilled by length) give each context what it gets alone,
in the caller's order; its log-probabilities are those of the distribution sampled from; and `rollout` on it
lays out and seeds trajectories as on the engine."""
from __future__ import annotations

import math

import pytest
import torch

from dsv4.errors import InvalidArgument
from dsv4.generate.sampling import SamplingConfig, probabilities
from dsv4.posttrain.direct_sampler import sample_direct
from dsv4.posttrain.rollout import rollout
from grpo_toys import LetterEnv, toy_model, toy_tokenizer

GREEDY = SamplingConfig(temperature=0.0)


def test_batched_greedy_equals_each_context_alone_in_order():
    model = toy_model()
    contexts = [[5, 6, 7, 8, 9], [1, 2, 3], [10, 11, 12], [4], [13, 14, 15, 16, 17]]
    together = sample_direct(model, contexts, GREEDY, 5, seed=0, stop_ids=[])
    for c, got in zip(contexts, together):
        alone = sample_direct(model, [c], GREEDY, 5, seed=0, stop_ids=[])[0]
        assert got.tokens == alone.tokens and got.finish == "length"
        assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(got.logprobs, alone.logprobs))


def test_logprobs_are_of_the_distribution_sampled_from_and_a_stop_ends_a_row():
    model = toy_model()
    context = [1, 2, 3, 4]
    cfg = SamplingConfig(temperature=0.7, top_k=40)
    [s] = sample_direct(model, [context], cfg, 4, seed=3, stop_ids=[])
    with torch.no_grad():
        logits = model(torch.tensor([context + s.tokens[:-1]]))[0, len(context) - 1:]
    want = probabilities(logits, cfg).gather(-1, torch.tensor(s.tokens)[:, None]).squeeze(-1).log()
    torch.testing.assert_close(torch.tensor(s.logprobs), want, rtol=1e-4, atol=1e-4)
    [greedy] = sample_direct(model, [context], GREEDY, 4, seed=0, stop_ids=[])
    [stopped] = sample_direct(model, [context], GREEDY, 4, seed=0, stop_ids=[greedy.tokens[1]])
    assert stopped.tokens == greedy.tokens[:greedy.tokens.index(greedy.tokens[1]) + 1]
    assert stopped.finish == "stop"


def test_rollout_on_the_direct_sampler_is_laid_out_and_seeded():
    tok, model, env = toy_tokenizer(), toy_model(), LetterEnv()
    problems = env.heldout(2)
    cfg = SamplingConfig(temperature=1.0)
    kw = dict(group_size=3, sampling=cfg, max_new_tokens=6, sampler="direct")
    trajs = rollout(model, tok, problems, {"toy": env}, seed=1, **kw)
    assert [t.problem for t in trajs] == [problems[0]] * 3 + [problems[1]] * 3
    for t in trajs:
        assert t.policy_mask == [0] * t.prompt_len + [1] * (len(t.tokens) - t.prompt_len)
        assert 0 < len(t.tokens) - t.prompt_len <= 6
    assert [t.tokens for t in rollout(model, tok, problems, {"toy": env}, seed=1, **kw)] == [t.tokens for t in trajs]
    assert [t.tokens for t in rollout(model, tok, problems, {"toy": env}, seed=2, **kw)] != [t.tokens for t in trajs]
    with pytest.raises(InvalidArgument, match="records no routing"):
        rollout(model, tok, problems, {"toy": env}, record_routing=True, **kw)


def test_grpo_refuses_routing_replay_on_the_direct_sampler():
    from dsv4.posttrain.grpo import GRPOConfig
    with pytest.raises(InvalidArgument, match="routing replay"):
        GRPOConfig(sampler="direct", routing_replay=True)
    with pytest.raises(InvalidArgument, match="sampler"):
        GRPOConfig(sampler="vllm")

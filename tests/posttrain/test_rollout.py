"""Rollouts on the serving engine: layout of the trajectories, the sampler's log-probabilities, multi-turn tool
use, unparseable completions."""
import torch

from dsv4.generate.chat import EOS, encode_chat
from dsv4.generate.sampling import SamplingConfig, probabilities
from dsv4.posttrain import rollout as rollout_mod
from dsv4.posttrain.envs.base import Problem
from dsv4.posttrain.envs.pool import ProblemPool
from dsv4.posttrain.rollout import Sampled, rollout
from grpo_toys import AddToolEnv, LetterEnv, toy_model, toy_tokenizer


def test_rollout_groups_masks_and_sampled_logprobs():
    tok, model, env = toy_tokenizer(), toy_model(), LetterEnv()
    problems = env.heldout(2)
    cfg = SamplingConfig(temperature=0.7, top_k=40)
    trajs = rollout(model, tok, problems, {"toy": env}, group_size=3, sampling=cfg, max_new_tokens=6, seed=1)
    assert len(trajs) == 6 and [t.problem for t in trajs] == [problems[0]] * 3 + [problems[1]] * 3
    prompt = tok.encode(encode_chat(problems[0].messages, False))
    for t in trajs:
        assert t.tokens[:t.prompt_len] == prompt
        assert t.policy_mask == [0] * t.prompt_len + [1] * (len(t.tokens) - t.prompt_len)
        assert 0 < len(t.tokens) - t.prompt_len <= 6 and 0.0 <= t.reward.score <= 1.0
    # seeded: the same again; another seed samples differently
    again = rollout(model, tok, problems, {"toy": env}, group_size=3, sampling=cfg, max_new_tokens=6, seed=1)
    assert [t.tokens for t in again] == [t.tokens for t in trajs]
    other = rollout(model, tok, problems, {"toy": env}, group_size=3, sampling=cfg, max_new_tokens=6, seed=2)
    assert [t.tokens for t in other] != [t.tokens for t in trajs]
    # each logprob is log q(token) of the distribution sampled from (temperature + top-k), not the raw one
    t = trajs[0]
    with torch.no_grad():
        logits = model(torch.tensor([t.tokens]))[0, :-1]
    q = probabilities(logits, cfg)
    idx = torch.arange(t.prompt_len - 1, len(t.tokens) - 1)
    want = q[idx, torch.tensor(t.tokens[t.prompt_len:])].log()
    got = torch.tensor(t.logprobs[t.prompt_len:])
    assert torch.allclose(got, want, atol=1e-4), (got, want)
    raw = torch.log_softmax(logits, -1)[idx, torch.tensor(t.tokens[t.prompt_len:])]
    assert not torch.allclose(got, raw, atol=1e-2)


def _script(tok, texts_by_turn):
    """A stand-in for the engine: turn k of every context samples texts_by_turn[k]."""
    calls = []

    def fake(model, tokenizer, contexts, params, eos, **kw):
        text = texts_by_turn[len(calls)]
        calls.append([list(c) for c in contexts])
        ids = tok.encode(text)
        return [Sampled(list(ids), [-0.5] * len(ids), "stop") for _ in contexts]
    return fake, calls


def test_multi_turn_tool_results_are_not_policy_tokens(monkeypatch):
    tok = toy_tokenizer()
    problem = Problem("agent", "a1", [{"role": "user", "content": "1+2?"}], 3)
    call = {"type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    turn1 = encode_chat([{"role": "assistant", "content": "", "tool_calls": [call]}], False,
                        context=problem.messages)
    fake, calls = _script(tok, [turn1, "3" + EOS])
    monkeypatch.setattr(rollout_mod, "sample_turn", fake)
    [t] = rollout(None, tok, [problem], {"agent": AddToolEnv()}, group_size=1, sampling=SamplingConfig(),
                  max_new_tokens=64)
    assert t.reward.score == 1.0 and [m["role"] for m in t.turns] == ["assistant", "tool", "assistant"]
    prompt = tok.encode(encode_chat(problem.messages, False))
    t1, t2 = tok.encode(turn1), tok.encode("3" + EOS)
    tool = tok.encode(encode_chat([{"role": "tool", "content": "3"}], False,
                                  context=problem.messages + [{"role": "assistant", "content": "",
                                                               "tool_calls": [call]}]))
    assert t.tokens == prompt + t1 + tool + t2
    assert t.policy_mask == [0] * len(prompt) + [1] * len(t1) + [0] * len(tool) + [1] * len(t2)
    assert t.logprobs == [0.0] * len(prompt) + [-0.5] * len(t1) + [0.0] * len(tool) + [-0.5] * len(t2)
    assert calls[1][0] == prompt + t1 + tool          # the second turn continues the whole context


def test_unparseable_completion_gets_zero_reward(monkeypatch):
    tok = toy_tokenizer()
    fake, _ = _script(tok, ["no closing think tag" + EOS])
    monkeypatch.setattr(rollout_mod, "sample_turn", fake)
    env = LetterEnv()
    [t] = rollout(None, tok, env.heldout(1), {"toy": env}, group_size=1, sampling=SamplingConfig(),
                  max_new_tokens=8, thinking=True)
    assert t.reward.score == 0.0 and not t.reward.correct and "unparseable" in t.reward.info["error"]


def test_cut_off_completion_is_scored_as_it_stands(monkeypatch):
    """A completion the token budget ended (no EOS) is parsed as if it ended there and earns what its text earns."""
    tok = toy_tokenizer()
    ids = tok.encode("aaaa")

    def fake(model, tokenizer, contexts, params, eos, **kw):
        return [Sampled(list(ids), [-0.5] * len(ids), "length") for _ in contexts]
    monkeypatch.setattr(rollout_mod, "sample_turn", fake)
    env = LetterEnv()
    [t] = rollout(None, tok, env.heldout(1), {"toy": env}, group_size=1, sampling=SamplingConfig(),
                  max_new_tokens=len(ids))
    assert t.turns[-1]["content"] == "aaaa" and t.reward.score == 1.0


class _CountingEnv(LetterEnv):
    """LetterEnv with a `reward_batch` whose calls and items are recorded."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def reward_batch(self, items):
        self.calls.append([(problem.id, turns[-1]["content"]) for problem, turns in items])
        return [super(_CountingEnv, self).reward(problem, turns) for problem, turns in items]

    def reward(self, problem, turns):
        raise AssertionError("rollout scores an environment with reward_batch through it")


def test_batched_rewards_score_each_distinct_completion_once_and_in_order(monkeypatch):
    """An environment with reward_batch is scored in one call, each distinct final turn of a problem once, in
    the order of first appearance; every trajectory gets the reward LetterEnv gives its own text."""
    tok = toy_tokenizer()
    texts = ["aaaa", "abab", "aaaa", "bbbb", "aaaa", "abab"]      # 2 problems x group of 3

    def fake(model, tokenizer, contexts, params, eos, **kw):
        return [Sampled(tok.encode(t) + [tok.eos_id], [-0.5] * (len(tok.encode(t)) + 1), "stop") for t in texts]
    monkeypatch.setattr(rollout_mod, "sample_turn", fake)
    env = _CountingEnv()
    problems = env.heldout(2)
    trajs = rollout(None, tok, problems, {"toy": env}, group_size=3, sampling=SamplingConfig(), max_new_tokens=8)
    plain = LetterEnv()
    assert [t.reward.score for t in trajs] == [plain.reward(t.problem, t.turns).score for t in trajs]
    assert [t.reward.score for t in trajs] == [1.0, 0.5, 1.0, 0.0, 1.0, 0.5]
    # problem h0: "aaaa" twice, "abab" once; problem h1: "bbbb", "aaaa", "abab": 5 distinct, not 6
    assert env.calls == [[("h0", "aaaa"), ("h0", "abab"), ("h1", "bbbb"), ("h1", "aaaa"), ("h1", "abab")]]
    pooled = ProblemPool(env, 2)                    # a wrapper that keeps `reward` passes reward_batch on
    env.calls.clear()
    trajs = rollout(None, tok, problems, {"toy": pooled}, group_size=3, sampling=SamplingConfig(), max_new_tokens=8)
    assert len(env.calls) == 1 and [t.reward.score for t in trajs] == [1.0, 0.5, 1.0, 0.0, 1.0, 0.5]


def test_per_domain_turn_limits_on_both_samplers():
    """max_new_tokens given per domain: each trajectory's turn stops at its own domain's limit, in one batch."""
    tok, model, env = toy_tokenizer(), toy_model(), LetterEnv()
    short, long_ = (Problem(d, f"{d}{i}", [{"role": "user", "content": "say a"}], "a") for d, i in
                    (("short", 0), ("long", 1)))
    for sampler in ("direct", "engine"):
        trajs = rollout(model, tok, [short, long_], {"short": env, "long": env}, group_size=8,
                        sampling=SamplingConfig(temperature=1.0), max_new_tokens={"short": 2, "long": 9},
                        seed=3, sampler=sampler)
        n = {d: [sum(t.policy_mask) for t in trajs if t.problem.domain == d] for d in ("short", "long")}
        assert max(n["short"]) <= 2 and max(n["long"]) <= 9 and max(n["long"]) > 2, (sampler, n)

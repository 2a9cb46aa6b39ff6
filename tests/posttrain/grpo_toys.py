"""Shared pieces of the GRPO tests: a tiny tokenizer and model with the same vocabulary, and scripted toy
environments whose reward is easy to compute and to raise."""
from __future__ import annotations

import dataclasses
import functools
import json
import random

import torch

from dsv4.config import tiny
from dsv4.model import Transformer
from dsv4.posttrain.envs.base import Problem, Reward

CORPUS = ["say a a a a", "aaaa bbbb cccc", "the answer is 42", "hello world", "abc abc abc", "x = 1 + 2"] * 20


@functools.lru_cache(maxsize=1)
def toy_tokenizer():
    from dsv4.train.tokenizer import train_bpe
    return train_bpe(CORPUS, vocab_size=300)


def toy_model(seed: int = 0, **overrides) -> Transformer:
    cfg = dataclasses.replace(tiny(), vocab_size=toy_tokenizer().vocab_size, **overrides)
    torch.manual_seed(seed)
    return Transformer(cfg).init_weights(seed)


class LetterEnv:
    """Reward = the fraction of the reply's characters that are the letter `target` (single turn); with
    `any_=True`, 1 when the reply holds the letter at all (a binary reward: only right answers are reinforced, so
    GRPO cannot settle on a partly right one)."""
    name = "toy"
    max_turns = 1

    def __init__(self, target: str = "a", any_: bool = False):
        self.target, self.any = target, any_

    def sample(self, rng: random.Random) -> Problem:
        n = rng.randrange(1000)
        return Problem("toy", f"p{n}", [{"role": "user", "content": f"say {self.target} {n % 10}"}], self.target)

    def heldout(self, n: int) -> list[Problem]:
        return [Problem("toy", f"h{i}", [{"role": "user", "content": f"say {self.target}"}], self.target)
                for i in range(n)]

    def demonstrate(self, problem: Problem) -> list[dict]:
        return [{"role": "assistant", "content": self.target * 4}]

    def tool_results(self, problem: Problem, tool_calls: list[dict]) -> list[dict]:
        return []

    def reward(self, problem: Problem, turns: list[dict]) -> Reward:
        text = turns[-1].get("content", "") if turns else ""
        if self.any:
            score = float(problem.answer in text)
        else:
            score = sum(c == problem.answer for c in text) / max(len(text), 1)
        return Reward(score, score >= 0.5, {})


class AddToolEnv:
    """Two turns: the model calls `add(a, b)`, the environment answers, the reward checks the final answer."""
    name = "agent"
    max_turns = 3

    def tool_results(self, problem: Problem, tool_calls: list[dict]) -> list[dict]:
        out = []
        for call in tool_calls:
            args = json.loads(call["function"]["arguments"])
            out.append({"role": "tool", "content": str(args["a"] + args["b"])})
        return out

    def reward(self, problem: Problem, turns: list[dict]) -> Reward:
        final = turns[-1].get("content", "") if turns and turns[-1]["role"] == "assistant" else ""
        ok = final.strip() == str(problem.answer)
        return Reward(float(ok), ok, {})


def grpo_gradients(model, trajectories, group_size: int, bucket: int = 1) -> dict[str, torch.Tensor]:
    """Each parameter's gradient (on the host) of the GRPO loss of one scored batch at ratio 1, as train_on_batch
    forms it: group advantages, the batch right-padded to `bucket`, the training forward's token log-probs."""
    from dsv4.posttrain.grpo_loss import GRPOLossConfig, group_advantages, grpo_loss
    from dsv4.posttrain.logprobs import pad_batch, token_logprobs
    device = model.embed.weight.device
    model.train()
    model.zero_grad(set_to_none=True)
    adv = group_advantages(torch.tensor([t.reward.score for t in trajectories]), group_size).to(device)
    batch = pad_batch(trajectories, bucket=bucket)
    logp, _ = token_logprobs(model, batch.tokens)
    loss, _ = grpo_loss(logp, logp.detach(), adv, batch.mask.to(device), GRPOLossConfig())
    loss.backward()
    return {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}

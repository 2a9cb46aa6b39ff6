"""Single-turn chat rollouts for distillation: encode each problem's prompt in the V4 chat format, sample one
completion per prompt from a model (batched, with the compressed KV cache), score it with the problem's
environment, and return `Trajectory`s.

A small sampler of its own (the serving engine's batched rollouts live in `posttrain.rollout`): one assistant
turn per problem, which is what OPD's domains need; multi-turn tool use is refused here, not truncated.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..errors import InvalidArgument
from ..generate.chat import EOS, encode_chat, parse_completion
from ..generate.sampling import SamplingConfig, probabilities, sample
from ..generate.tokenizer import Tokenizer
from ..model import Transformer
from .envs.base import Environment, Problem, Reward
from .trajectory import Trajectory

__all__ = ["prompt_ids", "sample_completions", "rollout", "score"]


def prompt_ids(tokenizer: Tokenizer, problem: Problem, thinking: bool = False) -> list[int]:
    """The problem's messages in the V4 chat format (BOS first, ending with the assistant opener), as ids."""
    return tokenizer.encode(encode_chat(problem.messages, thinking, add_bos=True))


@torch.no_grad()
def sample_completions(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                       temperature: float, seed: int, stop_ids: Sequence[int]) -> list[tuple[list[int], list[float]]]:
    """For each prompt, the sampled tokens (through the first stop token, or `max_new_tokens` of them) and the
    log-probability of each under the distribution it was drawn from (greedy: the model's own)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InvalidArgument("rollout needs at least one prompt and no empty prompt")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))   # equal lengths prefill together
    if order != list(range(len(prompts))):
        outs = sample_completions(model, [prompts[i] for i in order], max_new_tokens, temperature=temperature,
                                  seed=seed, stop_ids=stop_ids)
        result: list = [None] * len(prompts)
        for i, o in zip(order, outs):
            result[i] = o
        return result
    cfg = SamplingConfig(temperature=temperature)
    device = model.embed.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        B = len(prompts)
        cache = model.new_cache(B, max(len(p) for p in prompts) + max_new_tokens)
        last = _prefill(model, cache, prompts)
        stops = set(int(t) for t in stop_ids)
        outs: list[tuple[list[int], list[float]]] = [([], []) for _ in range(B)]
        done = [False] * B
        for i in range(max_new_tokens):
            nxt = sample(last, cfg, gen)
            dist = probabilities(last, cfg) if temperature > 0 else last.float().softmax(-1)
            lp = dist.gather(-1, nxt[:, None]).squeeze(-1).log()
            for r, (t, l) in enumerate(zip(nxt.tolist(), lp.tolist())):
                if not done[r]:
                    outs[r][0].append(t)
                    outs[r][1].append(l)
                    done[r] = t in stops
            if all(done) or i == max_new_tokens - 1:
                break
            last = model(nxt.view(B, 1), cache=cache)[:, -1]
        return outs
    finally:
        model.train(was_training)


def _prefill(model: Transformer, cache, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
    """Run each prompt through its row of `cache`; the logits [B, vocab] after each prompt's last token. Rows
    whose prompts have the same length run as one batch (one forward pass per distinct length)."""
    device = model.embed.weight.device
    last = torch.empty(len(prompts), model.config.vocab_size, device=device)
    r = 0
    while r < len(prompts):
        end = r + 1
        while end < len(prompts) and len(prompts[end]) == len(prompts[r]):
            end += 1
        ids = torch.tensor([list(p) for p in prompts[r:end]], device=device)
        last[r:end] = model(ids, cache=cache.select(slice(r, end)), last_only=True)[:, -1]
        r = end
    return last


def score(env: Environment, problem: Problem, text: str, thinking: bool = False) -> tuple[list[dict], Reward]:
    """The parsed assistant turn and its reward. A completion cut off by the token budget (no EOS) is scored as
    it stands; one that breaks the chat format (stray special tokens, malformed tool calls) scores 0 without
    reaching the environment."""
    if not text.endswith(EOS):
        text += EOS
    try:
        message = parse_completion(text, thinking)
    except ValueError as e:
        return [], Reward(0.0, False, {"format_error": str(e)})
    turns = [message]
    return turns, env.reward(problem, turns)


def rollout(model: Transformer, tokenizer: Tokenizer, problems: Sequence[Problem],
            envs: Mapping[str, Environment], *, max_new_tokens: int, temperature: float, seed: int,
            thinking: bool = False) -> list[Trajectory]:
    """One single-turn trajectory per problem, sampled from `model` and scored by `envs[problem.domain]`."""
    for p in problems:
        env = envs.get(p.domain)
        if env is None:
            raise InvalidArgument(f"problem {p.id!r} is from domain {p.domain!r}, which has no environment here "
                                  f"(have: {sorted(envs)})")
        if env.max_turns > 1:
            raise InvalidArgument(f"environment {p.domain!r} is multi-turn (max_turns={env.max_turns}); this "
                                  "distillation sampler runs single-turn domains only")
    if tokenizer.eos_id is None:
        raise InvalidArgument("the tokenizer has no EOS token; rollouts need one to end a turn")
    prompts = [prompt_ids(tokenizer, p, thinking) for p in problems]
    samples = sample_completions(model, prompts, max_new_tokens, temperature=temperature, seed=seed,
                                 stop_ids=[tokenizer.eos_id])
    trajs = []
    for problem, prompt, (new, logprobs) in zip(problems, prompts, samples):
        turns, reward = score(envs[problem.domain], problem, tokenizer.decode(new), thinking)
        trajs.append(Trajectory(problem=problem, tokens=prompt + new, prompt_len=len(prompt),
                                policy_mask=[0] * len(prompt) + [1] * len(new),
                                logprobs=[0.0] * len(prompt) + logprobs, turns=turns, reward=reward))
    return trajs

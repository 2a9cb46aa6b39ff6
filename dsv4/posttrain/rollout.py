"""Rollouts: G sampled answers per problem, multi-turn where the environment calls tools, each scored.

Samples come from one of two samplers (`sampler`): "engine", the batched serving engine
(`rollout_engine.RolloutEngine`: the serve `Engine` reporting the log-probability of the distribution each token
was drawn from; built without batch invariance, so on a CPU the rows decode in one batch: a sample may then
depend on its neighbours in the last bits, which sampling does not need to exclude), or "direct"
(direct_sampler.py: the model and its KV cache in one batch, prefilling contexts of one length together: 256
tiny-model rollouts in 0.8 s on a CPU where the engine takes 7.6 s). Both report the same log-probabilities;
GRPO, distillation and the pipeline's evaluation all sample through `rollout`, so they share its prompt encoding,
parsing and scoring. A trajectory's tokens are the prompt in the official V4 chat encoding, then per turn the
sampled completion (policy_mask 1, with the sampler's log-probability) and, when the turn calls tools and turns
remain, the environment's tool results rendered in the same encoding with the next assistant opener
(policy_mask 0).

Completions are parsed with `parse_completion`; one cut off by `max_new_tokens` (no EOS) is parsed as if it
ended there (its reward is what its text earns, as TRL scores truncated completions) and ends the trajectory.
A completion that does not parse gets reward 0 with the parse error in `Reward.info` and ends the trajectory.

With `record_routing`, sampling runs on `routing_replay.sample_recorded` (an engine that records the routing of
every request) and each trajectory carries the experts and indexer top-k chosen at every position
(`Trajectory.routing`); the direct sampler does not record routing.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..errors import InvalidArgument
from ..generate.chat import EOS, parse_completion
from ..generate.sampling import SamplingConfig
from ..serve.engine import Engine
from ..serve.types import SamplingParams
from .chat_data import encode_continuation, encode_prompt
from .direct_sampler import sample_direct
from .envs.base import Environment, Problem, Reward
from .rollout_engine import RolloutEngine, sample_engine
from .samples import Sampled
from .trajectory import Trajectory
from .turn_limits import limit_for

__all__ = ["rollout", "RolloutEngine", "Sampled", "sample_turn", "sample_engine", "SAMPLERS"]

SAMPLERS = ("engine", "direct")


def _seed(base: int, index: int, turn: int) -> int:
    return random.Random(f"{base}/{index}/{turn}").getrandbits(62)


def sample_turn(model, tokenizer, contexts: Sequence[list[int]], params: Sequence[SamplingParams],
                eos: Sequence[int], *, engine: Engine | None = None, record_routing: bool = False,
                max_batch: int = 64, sampler: str = "engine", seed: int = 0) -> list[Sampled]:
    """One completion per context: on `engine` (None: a RolloutEngine sized for these contexts), with routing
    recorded (routing_replay.sample_recorded: a recording engine of its own), or with sampler="direct" on the
    direct sampler (one batch; `seed` seeds it, `params` give its settings, the same for every context but
    max_tokens)."""
    if sampler == "direct":
        p = params[0]
        cfg = SamplingConfig(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k)
        return sample_direct(model, contexts, cfg, [q.max_tokens for q in params], seed=seed, stop_ids=eos)
    if record_routing:
        from .routing_replay import sample_recorded
        return sample_recorded(model, contexts, params, eos, max_batch=max_batch)
    if engine is None:
        engine = RolloutEngine(model, tokenizer, max_batch=min(max_batch, len(contexts)),
                               max_seq_len=max(len(c) for c in contexts) + max(p.max_tokens for p in params),
                               eos_token_ids=eos, batch_invariant=False)
    return sample_engine(engine, contexts, params)


@dataclass
class _State:
    problem: Problem
    env: Environment
    messages: list[dict]                # prompt messages + parsed assistant turns + tool messages
    tokens: list[int]
    prompt_len: int
    mask: list[int]
    logprobs: list[float]
    turns: list[dict]
    routing: Any = None
    reward: Reward | None = None
    n_turns: int = 0


def _context_message(m: dict) -> dict:
    """A parsed assistant turn as encode_chat takes it as context (no empty extras)."""
    out = {"role": m["role"], "content": m.get("content") or ""}
    if m.get("tool_calls"):
        out["tool_calls"] = m["tool_calls"]
    if m.get("reasoning_content"):
        out["reasoning_content"] = m["reasoning_content"]
    return out


def _parse(tokenizer, sampled: Sampled, thinking: bool) -> tuple[dict | None, str | None]:
    text = tokenizer.decode(sampled.tokens)
    if sampled.finish == "length" and not text.endswith(EOS):
        text = text + EOS                # cut off by max_new_tokens: scored as it stands
    try:
        return parse_completion(text, thinking), None
    except ValueError as e:
        return None, f"unparseable completion: {e}"


def rollout(model, tokenizer, problems: Sequence[Problem], envs_by_domain: Mapping[str, Environment], *,
            group_size: int, sampling: SamplingConfig, max_new_tokens: int | Mapping[str, int],
            thinking: bool = False,
            record_routing: bool = False, engine: Engine | None = None, seed: int = 0,
            max_batch: int = 64, sampler: str = "engine") -> list[Trajectory]:
    """`group_size` trajectories per problem (problem i's are trajectories [i*G, (i+1)*G)), each scored by its
    domain's environment. `max_new_tokens`: the tokens an assistant turn may take, one limit or one per domain
    (turn_limits.py). `engine`: a RolloutEngine to reuse (its max_seq_len must hold the longest
    trajectory); None builds one per turn sized for it. `sampler`: "engine" or "direct" (module doc)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise InvalidArgument(f"rollout group_size={group_size!r}: must be a positive integer")
    if sampler not in SAMPLERS:
        raise InvalidArgument(f"rollout sampler={sampler!r}: must be one of {SAMPLERS}")
    if sampler == "direct" and (record_routing or engine is not None):
        raise InvalidArgument("the direct sampler records no routing and runs no engine: use sampler='engine' "
                              "for routing replay or a given engine")
    if sampler == "direct" and getattr(tokenizer, "eos_id", None) is None:
        raise InvalidArgument("the tokenizer has no EOS token; the direct sampler needs one to end a turn")
    missing = sorted({p.domain for p in problems} - set(envs_by_domain))
    if missing:
        raise InvalidArgument(f"rollout: no environment for domain(s) {missing}; have {sorted(envs_by_domain)}")
    limits = {d: limit_for(max_new_tokens, d) for d in dict.fromkeys(p.domain for p in problems)}
    states = []
    for p in problems:
        prompt = encode_prompt(tokenizer, p.messages, thinking)
        for _ in range(group_size):
            states.append(_State(p, envs_by_domain[p.domain], [dict(m) for m in p.messages], list(prompt),
                                 len(prompt), [0] * len(prompt), [0.0] * len(prompt), []))
    eos = [tokenizer.eos_id] if getattr(tokenizer, "eos_id", None) is not None else []
    turn = 0
    active = list(range(len(states)))
    while active:
        params = [SamplingParams(max_tokens=limits[states[i].problem.domain], temperature=sampling.temperature, top_p=sampling.top_p,
                                 top_k=sampling.top_k, seed=_seed(seed, i, turn), logprobs=0, stop_token_ids=eos)
                  for i in active]
        contexts = [states[i].tokens for i in active]
        results = sample_turn(model, tokenizer, contexts, params, eos, engine=engine,
                              record_routing=record_routing, max_batch=max_batch, sampler=sampler,
                              seed=_seed(seed, -1, turn))
        still = []
        for i, res in zip(active, results):
            if _advance(states[i], res, tokenizer, thinking):
                still.append(i)
        active = still
        turn += 1
    rewards = _score(states)
    return [Trajectory(s.problem, s.tokens, s.prompt_len, s.mask, s.logprobs, s.turns, r, s.routing)
            for s, r in zip(states, rewards)]


def _score(states: Sequence[_State]) -> list[Reward]:
    """Each finished trajectory's reward, in order. An environment with `reward_batch` (the code environment's
    sandbox, which runs many samples in one process; a GRM's batched judging) scores all its trajectories in one
    call, each distinct (problem, final turns) once: identical completions are frequent within a group, and
    such rewards are deterministic. Every other reward is called in order, once per trajectory."""
    out: list[Reward | None] = [s.reward for s in states]
    batched: dict[int, list[int]] = {}
    for i, s in enumerate(states):
        if out[i] is not None:
            continue
        if getattr(s.env, "reward_batch", None) is not None:
            batched.setdefault(id(s.env), []).append(i)
        else:
            out[i] = s.env.reward(s.problem, s.turns)
    for idx in batched.values():
        key = {i: (id(states[i].problem), repr(states[i].turns)) for i in idx}
        firsts = list({key[i]: i for i in reversed(idx)}.values())   # the first trajectory of each key ...
        firsts.sort()                                                  # ... in the order of the trajectories
        scored = states[idx[0]].env.reward_batch([(states[i].problem, states[i].turns) for i in firsts])
        by_key = {key[i]: r for i, r in zip(firsts, scored)}
        for i in idx:
            out[i] = by_key[key[i]]
    return out  # type: ignore[return-value]


def _advance(s: _State, res: Sampled, tokenizer, thinking: bool) -> bool:
    """Append one sampled turn (and tool results, when the turn calls tools and turns remain); True when the
    trajectory goes on to another turn."""
    s.tokens += res.tokens
    s.mask += [1] * len(res.tokens)
    s.logprobs += res.logprobs
    s.n_turns += 1
    if res.routing is not None:
        s.routing = res.routing if s.routing is None else s.routing.merged(res.routing)
    message, error = _parse(tokenizer, res, thinking)
    if message is None:
        s.reward = Reward(0.0, False, {"error": error})
        return False
    s.turns.append(message)
    s.messages.append(_context_message(message))
    if not message["tool_calls"] or s.n_turns >= s.env.max_turns or res.finish == "length":
        return False
    results = s.env.tool_results(s.problem, message["tool_calls"])
    s.turns += results
    tail = encode_continuation(tokenizer, s.messages, results, thinking)
    s.messages += results
    s.tokens += tail
    s.mask += [0] * len(tail)
    s.logprobs += [0.0] * len(tail)
    return True

"""The serving engine as the rollout sampler: log-probabilities of the distribution sampled from, and a batch of
contexts run to completion.

The serve engine reports OpenAI's convention, the log-probability under the model's raw (untempered)
distribution. An importance ratio needs the distribution the token was actually drawn from, so `RolloutEngine`
reports log q(token) where q = `dsv4.generate.sampling.probabilities(logits, params)`: after temperature, top-k
and top-p (tests/posttrain/test_rollout.py checks it against that distribution).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..generate.sampling import probabilities
from ..serve.engine import Engine
from ..serve.types import SamplingParams, TokenEvent
from .samples import Sampled

__all__ = ["RolloutEngine", "sample_engine", "collect"]


class RolloutEngine(Engine):
    """The serving engine, reporting each sampled token's log-probability under the distribution it was drawn
    from (after temperature / top-k / top-p); greedy requests keep the raw distribution's."""

    def _chosen_logprobs(self, reqs, logits: torch.Tensor, logp: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        out = super()._chosen_logprobs(reqs, logits, logp, tokens)
        for i, req in enumerate(reqs):
            if req.params.temperature > 0:
                out[i] = torch.log(probabilities(logits[i:i + 1], req.sampling)[0, tokens[i]])
        return out

    def _event(self, req, token: int, logits: torch.Tensor) -> TokenEvent:
        event = super()._event(req, token, logits)
        if req.params.logprobs is not None and req.params.temperature > 0:
            q = probabilities(logits.unsqueeze(0), req.sampling)[0, token]
            event.logprob = float(torch.log(q))
        return event


def sample_engine(engine: Engine, contexts: Sequence[list[int]], params: Sequence[SamplingParams]) -> list[Sampled]:
    """Submit every context, run the engine until they finish, collect the tokens and log-probabilities
    (each Sampled's `request` is its request id)."""
    handles = [engine.submit(ctx, p) for ctx, p in zip(contexts, params)]
    engine.run_until_idle()
    return collect(handles)


def collect(handles) -> list[Sampled]:
    """The finished requests' tokens and log-probabilities; a request that failed in the engine is an error."""
    out = []
    for h in handles:
        toks, lps, finish, error = [], [], "stop", None
        for ev in h:
            if ev.token is not None:
                toks.append(ev.token)
                lps.append(ev.logprob if ev.logprob is not None else 0.0)
            if ev.finish_reason is not None:
                finish, error = ev.finish_reason, ev.error
        if finish in ("error", "abort"):
            raise RuntimeError(f"rollout request {h.id} ended with {finish} in the engine: {error}")
        out.append(Sampled(toks, lps, finish, request=h.id))
    return out

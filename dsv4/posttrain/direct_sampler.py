"""The direct rollout sampler: the model and its compressed KV cache in one batch, without the serving engine.

Why beside the engine: the engine prefills each request on its own (one forward per request, so G samples of one
prompt prefill it G times), which on a CPU is most of a tiny model's rollout time; here contexts of one length
prefill together and every row decodes in the same forward. It has none of the engine's scheduling (every
context stays in the batch until all stop) nor routing recording; rollout.py picks it with sampler="direct".

Each token's log-probability is the engine's convention for rollouts (rollout_engine.py): log q(token) under the
distribution it was drawn from (after temperature, top-k, top-p), the raw distribution's when greedy.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import InvalidArgument
from ..generate.sampling import SamplingConfig, probabilities, sample
from .samples import Sampled

__all__ = ["sample_direct"]


@torch.no_grad()
def sample_direct(model, contexts: Sequence[Sequence[int]], sampling: SamplingConfig,
                  max_new_tokens: int | Sequence[int], *, seed: int, stop_ids: Sequence[int]) -> list[Sampled]:
    """One completion per context, in the callers' order: the sampled tokens (through the first stop token, or
    `max_new_tokens` of them: one limit for all, or one per context) with their log-probabilities; finish "stop"
    or "length"."""
    if not contexts or any(len(c) == 0 for c in contexts):
        raise InvalidArgument("the direct sampler needs at least one context and no empty context")
    limits = [max_new_tokens] * len(contexts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != len(contexts) or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in limits):
        raise InvalidArgument(f"max_new_tokens={max_new_tokens}: must be an integer >= 1 or one per context")
    order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]))   # equal lengths prefill together
    rows = [contexts[i] for i in order]
    row_limits = [limits[i] for i in order]
    max_new_tokens = max(limits)
    device = model.embed.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        B = len(rows)
        cache = model.new_cache(B, max(len(c) for c in rows) + max_new_tokens)
        last = _prefill(model, cache, rows)
        stops = set(int(t) for t in stop_ids)
        tokens: list[list[int]] = [[] for _ in range(B)]
        logprobs: list[list[float]] = [[] for _ in range(B)]
        done = [False] * B
        for i in range(max_new_tokens):
            nxt = sample(last, sampling, gen)
            dist = probabilities(last, sampling) if sampling.temperature > 0 else last.float().softmax(-1)
            lp = dist.gather(-1, nxt[:, None]).squeeze(-1).log()
            for r, (t, l) in enumerate(zip(nxt.tolist(), lp.tolist())):
                if not done[r]:
                    tokens[r].append(t)
                    logprobs[r].append(l)
                    done[r] = t in stops or len(tokens[r]) >= row_limits[r]
            if all(done) or i == max_new_tokens - 1:
                break
            last = model(nxt.view(B, 1), cache=cache)[:, -1]
    finally:
        model.train(was_training)
    out: list[Sampled | None] = [None] * B
    for r, i in enumerate(order):
        stopped = bool(tokens[r]) and tokens[r][-1] in stops
        out[i] = Sampled(tokens[r], logprobs[r], "stop" if stopped else "length")
    return out  # type: ignore[return-value]


def _prefill(model, cache, rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """Run each context through its row of `cache` (rows sorted by length); the logits [B, vocab] after each
    context's last token. Rows whose contexts have one length run as one batch."""
    device = model.embed.weight.device
    last = torch.empty(len(rows), model.config.vocab_size, device=device)
    r = 0
    while r < len(rows):
        end = r + 1
        while end < len(rows) and len(rows[end]) == len(rows[r]):
            end += 1
        ids = torch.tensor([list(c) for c in rows[r:end]], device=device)
        last[r:end] = model(ids, cache=cache.select(slice(r, end)), last_only=True)[:, -1]
        r = end
    return last

"""Generation with the compressed cache: ragged prompts, streaming, greedy or sampled.

Each prompt is prefilled on its own row of one batch cache (chunked, so long prompts never materialise
T x vocab logits), then all rows decode together one token per step at their own positions. A prompt's
greedy output therefore does not depend on the other prompts in the batch.
"""
from __future__ import annotations

import warnings
from typing import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .graphs import GraphDecoder
from .nonfinite import NonFiniteWarning, find_nonfinite
from .sampling import SamplingConfig, check_generation_args, sample

PREFILL_CHUNK = 4096


def _prefill(model, cache, tokens: list[int], chunk: int, progress: bool, store=None) -> torch.Tensor:
    """Run a prompt through a one-row cache; return the logits [1, vocab] after its last token.

    With a prefix store, the longest stored prefix is loaded first and the state is saved at the store's
    boundaries on the way (every `store.block` tokens and at the end of the prompt)."""
    device = model.embed.weight.device
    ids = torch.tensor([tokens], dtype=torch.long, device=device)
    start = store.load(cache, tokens) if store is not None else 0
    saves = set(store.boundaries(len(tokens))) if store is not None else set()
    fingerprint = None
    stops = sorted(set(range(start + chunk, len(tokens), chunk)) | {b for b in saves if b > start} | {len(tokens)})
    bar = tqdm(total=len(tokens) - start, desc="prefill", unit="tok",
               disable=not progress or len(tokens) - start <= chunk)
    for stop in stops:
        logits = model(ids[:, start:stop], cache=cache, last_only=True)
        if stop in saves:  # the weights do not change during a prefill: one fingerprint for all its saves
            fingerprint = fingerprint or store.fingerprint(cache)
            store.save(cache, tokens[:stop], fingerprint)
        bar.update(stop - start)
        start = stop
    bar.close()
    return logits[:, -1]


@torch.no_grad()
def generate_stream(model, prompts: Sequence[Sequence[int]], max_new_tokens: int = 128, *,
                    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                    stop_tokens: Sequence[int] = (), kv_dtype: str = "auto", index_dtype: str = "auto",
                    prefill_chunk: int = PREFILL_CHUNK, progress: bool = False,
                    prefix_store=None, cuda_graphs: bool = True) -> Iterator[list[int | None]]:
    """Yield, per decoding step, one new token per prompt (None once that prompt has stopped).

    A prompt stops after emitting a stop token (which is yielded) or max_new_tokens tokens, or without a token
    when its logits are not finite (with a NonFiniteWarning naming the first non-finite layer). With a
    `dsv4.generate.PrefixStore`, stored prefixes of the prompts are reused and new ones saved. On a GPU the
    decode steps replay a captured CUDA graph (`cuda_graphs=False`: eager steps; same tokens).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and no empty prompt")
    max_new_tokens, seed = check_generation_args(max_new_tokens, seed)
    cfg = SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k)
    if max_new_tokens == 0:
        return
    device = model.embed.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    stops = set(int(t) for t in stop_tokens)
    B = len(prompts)
    cache = model.new_cache(B, max(len(p) for p in prompts) + max_new_tokens, kv_dtype, index_dtype)
    last = torch.cat([_prefill(model, cache.select(r), list(p), prefill_chunk, progress, prefix_store)
                      for r, p in enumerate(prompts)])                     # [B, vocab]
    step = GraphDecoder(model, cache) if cuda_graphs and cache.positions.is_cuda else None
    yield from decode_loop(model, cache, last, max_new_tokens, cfg, gen, stops, step, contexts=prompts)


def decode_loop(model, cache, last: torch.Tensor, max_new_tokens: int, cfg: SamplingConfig,
                gen: torch.Generator, stops: set[int],
                step: Callable[[torch.Tensor], torch.Tensor] | None = None,
                contexts: Sequence[Sequence[int]] | None = None) -> Iterator[list[int | None]]:
    """Sample from `last` [B, vocab], feed the tokens back through `cache`, repeat. The final token of each
    row is yielded but not fed (the caller feeds it if the sequence continues). `step(tokens [B]) -> logits
    [B, vocab]` runs one decode step: the eager model on `cache` by default, or e.g. a GraphDecoder.

    A row whose logits hold inf or NaN stops there, without a token (None from that step on; every token it
    yielded was fed): nothing meaningful can be sampled from them. The first time, a NonFiniteWarning names the
    rows and the first layer whose output is non-finite, found by re-running the tokens row r held before
    `last` (`contexts[r]`) and the ones it generated. Checking costs one reduction per step."""
    B = last.shape[0]
    if step is None:
        def step(tokens: torch.Tensor) -> torch.Tensor:
            return model(tokens.view(B, 1), cache=cache)[:, -1]
    done = [False] * B
    generated: list[list[int]] = [[] for _ in range(B)]
    warned = False
    for i in range(max_new_tokens):
        finite = torch.isfinite(last).all(-1)                                  # [B]
        if cfg.temperature > 0:  # sampling would fail on inf / NaN; those rows' draws are discarded
            last = torch.where(finite.unsqueeze(-1), last, 0.0)
        nxt = sample(last, cfg, gen)
        tokens, ok = torch.stack((nxt, finite.to(nxt.dtype))).tolist()       # one transfer to the host
        out: list[int | None] = []
        bad = []
        for r in range(B):
            if done[r] or not ok[r]:
                if not done[r]:
                    bad.append(r)
                done[r] = True
                out.append(None)
                continue
            out.append(tokens[r])
            generated[r].append(tokens[r])
            done[r] = tokens[r] in stops or i == max_new_tokens - 1
        if bad and not warned:
            warned = True
            _warn_nonfinite(model, cache, bad, i, contexts, generated)
        yield out
        if all(done):
            return
        last = step(nxt)


def _warn_nonfinite(model, cache, rows: list[int], step: int, contexts, generated: list[list[int]]) -> None:
    where = "after the prompt" if step == 0 else f"at generated token {step}"
    msg = f"non-finite logits in row(s) {rows} {where}; those rows stop generating. "
    if contexts is None:
        msg += "(Pass the rows' tokens as `contexts` to locate the layer.)"
    else:
        r = rows[0]
        site = find_nonfinite(model, list(contexts[r]) + generated[r], cache.kv_dtype, cache.index_dtype)
        msg += (f"The first non-finite output is in {site.describe()}: check its weights." if site is not None else
                "Re-running the tokens gave finite outputs everywhere (not reproducible outside this batch).")
    warnings.warn(msg, NonFiniteWarning, stacklevel=3)


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int = 128, *, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int = 0, stop_tokens: Sequence[int] = (),
             on_token: Callable[[int, int], None] | None = None, **kwargs) -> list[list[int]]:
    """Generate continuations of token-id prompts (ragged batch). Returns the new tokens of each prompt;
    `on_token(row, token)` streams them as they are produced. See generate_stream for the options."""
    outs: list[list[int]] = [[] for _ in prompts]
    for step in generate_stream(model, prompts, max_new_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, seed=seed, stop_tokens=stop_tokens, **kwargs):
        for r, t in enumerate(step):
            if t is not None:
                outs[r].append(t)
                if on_token is not None:
                    on_token(r, t)
    return outs

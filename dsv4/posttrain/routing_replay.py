"""Routing replay: the training forward reuses the routing chosen at rollout time.

An MoE policy's sampler and trainer compute the same function in different ways (a cached decode one token at a
time against a whole-sequence forward, other kernels, other batch shapes). A tiny numerical difference can flip a
top-k choice, and a flipped expert (or indexer entry) changes that token's output by far more than rounding: the
train-vs-rollout log-probability drift that off-policy corrections then have to absorb. Replay records, at
rollout time, the routed experts each token chose in every learned-routing MoE layer and the indexer's top-k
entries in every CSA layer, and makes the training forward use them (hash-routed layers route by a fixed table
and need nothing). The routing weights are still this forward's affinities of the recorded experts, so the gate
keeps its gradient.

Where the recording happens: a sampler of its own (`sample_recorded`) on the model's incremental decode (one
cache row per context, each prompt prefilled in one chunk, then batched one-token decode steps), not the serving
engine. The engine hides which request a forward row serves (its row pool is private state) and on a GPU replays
decode steps as CUDA graphs, which would skip the Python hooks. The recorder uses only the model hooks (`Gate.record`
/ `Gate.replay` in dsv4/model/moe.py, `Indexer.record` / `Indexer.replay` read by `Attention._sequence`).
Sampling matches the engine's: the same seeded generator per request, the same `sample` / `probabilities`, and
the reported log-probability is that of the tempered, truncated distribution sampled from.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..generate.sampling import SamplingConfig, probabilities, sample
from ..model.attention import Attention
from ..serve.types import SamplingParams
from .samples import Sampled

__all__ = ["RoutingRecord", "sample_recorded", "replaying", "routed_gates", "csa_indexers"]


def routed_gates(model) -> dict[int, torch.nn.Module]:
    """Main-layer index -> gate, for the MoE layers with learned routing (hash layers route by a table)."""
    return {i: layer.ffn.gate for i, layer in enumerate(model.layers) if not layer.ffn.gate.hashed}


def csa_indexers(model) -> dict[int, torch.nn.Module]:
    return {i: layer.attn.indexer for i, layer in enumerate(model.layers)
            if isinstance(layer.attn, Attention) and layer.attn.kind == "csa"}


@dataclass
class RoutingRecord:
    """The routing of positions 0..length-1 of one trajectory (the tokens fed to the model; the last sampled token
    is never fed). experts[layer]: [length, k] expert ids; topk[layer]: [length, index_topk] entry ids, -1 pads;
    known: [length] bool, the positions recorded (a later turn's record fills only what an earlier one lacks)."""
    experts: dict[int, torch.Tensor]
    topk: dict[int, torch.Tensor]
    known: torch.Tensor

    @property
    def length(self) -> int:
        return self.known.shape[0]

    def merged(self, later: "RoutingRecord") -> "RoutingRecord":
        """This record, extended by `later`'s positions that this one has not recorded (the routing that produced
        a sampled token is the one kept)."""
        n = max(self.length, later.length)

        def join(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            out = torch.full((n, a.shape[1]), -1, dtype=a.dtype)
            out[:b.shape[0]] = b
            keep = self.known.nonzero().squeeze(-1)
            out[keep] = a[keep]
            return out
        known = torch.zeros(n, dtype=torch.bool)
        known[:later.length] = later.known
        known[:self.length] |= self.known
        return RoutingRecord({i: join(a, later.experts[i]) for i, a in self.experts.items()},
                             {i: join(a, later.topk[i]) for i, a in self.topk.items()}, known)


class _Recorder:
    """Fills per-row tensors [rows, max_len, k] from the hooks; `at(rows, starts)` says which cache rows (and
    from which positions) the next forward covers."""

    def __init__(self, model, n_rows: int, max_len: int):
        self.gates, self.indexers = routed_gates(model), csa_indexers(model)
        cfg = model.config
        self.experts = {i: torch.full((n_rows, max_len, cfg.n_activated_experts), -1, dtype=torch.int32)
                        for i in self.gates}
        self.topk = {i: torch.full((n_rows, max_len, cfg.index_topk), -1, dtype=torch.int32) for i in self.indexers}
        self.rows: list[int] = []
        self.starts: list[int] = []

    def at(self, rows: Sequence[int], starts: Sequence[int]) -> None:
        self.rows, self.starts = list(rows), list(starts)

    def _store(self, table: torch.Tensor, ids: torch.Tensor) -> None:
        ids = ids.view(len(self.rows), -1, ids.shape[-1]).to("cpu", torch.int32)
        S, k = ids.shape[1], ids.shape[2]
        for b, (r, p) in enumerate(zip(self.rows, self.starts)):
            table[r, p:p + S, :k] = ids[b]

    @contextmanager
    def installed(self) -> Iterator["_Recorder"]:
        try:
            for i, g in self.gates.items():
                g.record = lambda ids, t=self.experts[i]: self._store(t, ids)
            for i, ix in self.indexers.items():
                ix.record = lambda ids, t=self.topk[i]: self._store(t, ids)
            yield self
        finally:
            for m in (*self.gates.values(), *self.indexers.values()):
                m.record = None

    def record_of(self, row: int, length: int) -> RoutingRecord:
        return RoutingRecord({i: t[row, :length].clone() for i, t in self.experts.items()},
                             {i: t[row, :length].clone() for i, t in self.topk.items()},
                             torch.ones(length, dtype=torch.bool))


@torch.no_grad()
def sample_recorded(model, contexts: Sequence[list[int]], params: Sequence[SamplingParams], eos: Sequence[int]
                    ) -> list[Sampled]:
    """One completion per context, as the engine samples it, with the routing of every fed position recorded
    (each Sampled's `routing` is a RoutingRecord)."""
    device = model.embed.weight.device
    B = len(contexts)
    max_len = max(len(c) for c in contexts) + max(p.max_tokens for p in params)
    cache = model.new_cache(B, max_len)
    rec = _Recorder(model, B, max_len)
    cfgs = [SamplingConfig(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k) for p in params]
    gens = [torch.Generator(device=device).manual_seed(p.seed) if p.temperature > 0 else None for p in params]
    stops = [set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos)) for p in params]
    out = [Sampled([], [], "length") for _ in contexts]
    done = [False] * B
    with rec.installed():
        rows = []
        for r, ctx in enumerate(contexts):
            rec.at([r], [0])
            ids = torch.tensor([ctx], dtype=torch.long, device=device)
            rows.append(model(ids, cache=cache.select(r), last_only=True)[:, -1])
        logits = torch.cat(rows)
        while True:
            fed = []
            for r in range(B):
                if done[r]:
                    fed.append(0)
                    continue
                row = logits[r:r + 1].float()
                token = int(sample(row, cfgs[r], gens[r])[0])
                q = probabilities(row, cfgs[r])[0] if cfgs[r].temperature > 0 else torch.softmax(row, -1)[0]
                out[r].tokens.append(token)
                out[r].logprobs.append(float(torch.log(q[token])))
                if token in stops[r]:
                    done[r], out[r].finish = True, "stop"
                elif len(out[r].tokens) >= params[r].max_tokens:
                    done[r] = True
                fed.append(token)
            if all(done):
                break
            rec.at(range(B), cache.lengths())
            logits = model(torch.tensor(fed, device=device).view(B, 1), cache=cache)[:, -1]
    for r, s in enumerate(out):
        s.routing = rec.record_of(r, len(contexts[r]) + len(s.tokens) - 1)
    return out


@contextmanager
def replaying(model, records: Sequence[RoutingRecord | None], length: int) -> Iterator[None]:
    """Inside the block, whole-sequence forwards of `len(records)` rows of `length` tokens use the recorded
    routing (rows or positions without a record route as usual)."""
    gates, indexers = routed_gates(model), csa_indexers(model)
    device = model.embed.weight.device
    B = len(records)
    k, k_index = model.config.n_activated_experts, model.config.index_topk
    known = torch.zeros(B, length, dtype=torch.bool)
    experts = {i: torch.full((B, length, k), -1, dtype=torch.long) for i in gates}
    topk = {i: torch.full((B, length, k_index), -1, dtype=torch.long) for i in indexers}
    for b, rec in enumerate(records):
        if rec is None:
            continue
        n = min(length, rec.length)
        known[b, :n] = rec.known[:n]
        for i in gates:
            experts[i][b, :n] = rec.experts[i][:n].long()
        for i in indexers:
            topk[i][b, :n] = rec.topk[i][:n].long()
    try:
        for i, g in gates.items():
            g.replay = torch.where(known.unsqueeze(-1), experts[i], -1).view(B * length, k).to(device)
        for i, ix in indexers.items():
            ix.replay = (topk[i].to(device), known.to(device))
        yield
    finally:
        for m in (*gates.values(), *indexers.values()):
            m.replay = None

"""Routing replay: the training forward reuses the routing chosen at rollout time.

An MoE policy's sampler and trainer compute the same function in different ways (a cached decode one token at a
time against a whole-sequence forward, other kernels, other batch shapes). A tiny numerical difference can flip a
top-k choice, and a flipped expert (or indexer entry) changes that token's output by far more than rounding: the
train-vs-rollout log-probability drift that off-policy corrections then have to absorb. Replay records, at
rollout time, the routed experts each token chose in every learned-routing MoE layer and the indexer's top-k
entries in every CSA layer, and makes the training forward use them (hash-routed layers route by a fixed table
and need nothing). The routing weights are still this forward's affinities of the recorded experts, so the gate
keeps its gradient.

Where the recording happens: on the serving engine (`RecordingEngine`, a RolloutEngine), through the model hooks
(`Gate.record` / `Gate.replay` in dsv4/model/moe.py, `Indexer.record` / `Indexer.replay` read by
`Attention._sequence`). Before each forward the engine names the requests its cache rows serve and their
positions, so every prefill chunk and decode step lands in its request's table, whatever else shares the batch.
The recording engine runs eager steps (a replayed CUDA graph would skip the Python hooks) without speculative
decoding, and copies each layer's choices to the host once per forward.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..model.attention import Attention
from ..serve.types import SamplingParams
from .rollout_engine import RolloutEngine, collect
from .samples import Sampled

__all__ = ["RoutingRecord", "RecordingEngine", "sample_recorded", "replaying", "routed_gates", "csa_indexers"]


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
    """Fills per-request tables [requests, max_len, k] from the hooks. Before each forward the engine says which
    requests its rows serve and from which position (`at`); the hooks then write that forward's choices there."""

    def __init__(self, model, n_requests: int, max_len: int):
        self.gates, self.indexers = routed_gates(model), csa_indexers(model)
        cfg = model.config
        self.experts = {i: torch.full((n_requests, max_len, cfg.n_activated_experts), -1, dtype=torch.int32)
                        for i in self.gates}
        self.topk = {i: torch.full((n_requests, max_len, cfg.index_topk), -1, dtype=torch.int32)
                     for i in self.indexers}
        self.known = torch.zeros(n_requests, max_len, dtype=torch.bool)
        self.slots: dict[str, int] = {}           # request id -> table row
        self._live: list[int] = []                # rows of the forward's batch that serve a request
        self._slots = self._starts = torch.zeros(0, dtype=torch.long)
        self._span = 0

    def at(self, requests: Sequence[str | None], starts: Sequence[int], n_tokens: int) -> None:
        """The next forward runs `n_tokens` per row; row b serves request `requests[b]` (None: a free row) from
        position `starts[b]`."""
        self._live = [b for b, r in enumerate(requests) if r is not None and r in self.slots]
        self._slots = torch.tensor([self.slots[requests[b]] for b in self._live], dtype=torch.long)
        self._starts = torch.tensor([starts[b] for b in self._live], dtype=torch.long)
        self._span = n_tokens
        for slot, start in zip(self._slots.tolist(), self._starts.tolist()):
            self.known[slot, start:start + n_tokens] = True

    def _store(self, table: torch.Tensor, ids: torch.Tensor) -> None:
        if not self._live:
            return
        ids = ids.reshape(-1, self._span, ids.shape[-1])[self._live].to("cpu", torch.int32)
        k = min(ids.shape[-1], table.shape[-1])
        if self._span == 1:   # a decode step: every row in one indexed write
            table[self._slots, self._starts, :k] = ids[:, 0, :k]
            return
        for b, (slot, start) in enumerate(zip(self._slots.tolist(), self._starts.tolist())):
            table[slot, start:start + self._span, :k] = ids[b, :, :k]

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

    def record_of(self, request: str, length: int) -> RoutingRecord:
        slot = self.slots[request]
        return RoutingRecord({i: t[slot, :length].clone() for i, t in self.experts.items()},
                             {i: t[slot, :length].clone() for i, t in self.topk.items()},
                             self.known[slot, :length].clone())


class RecordingEngine(RolloutEngine):
    """A RolloutEngine whose every forward is recorded for the requests it serves: a prefill forward covers its
    requests' chunks (one length, each from its chunk's start), a decode step one token of each request in its
    rows. Eager steps only (a replayed CUDA graph would skip the hooks) and no speculative decoding (drafts are
    not the policy's)."""

    def __init__(self, model, tokenizer=None, *, recorder: _Recorder, **kw):
        super().__init__(model, tokenizer, cuda_graphs=False, speculative=None, **kw)
        self.recorder = recorder

    def _prefill_rows(self, reqs) -> None:
        self.recorder.at([req.handle.id for req in reqs], [req.done for req in reqs], reqs[0].stops[0] - reqs[0].done)
        super()._prefill_rows(reqs)

    def _decode_view(self, rows: range, graph: bool = False) -> None:
        lengths = self.cache.lengths()
        self.recorder.at([None if self._rows[r] is None else self._rows[r].handle.id for r in rows],
                         [lengths[r] for r in rows], 1)
        super()._decode_view(rows, graph=False)


def sample_recorded(model, contexts: Sequence[list[int]], params: Sequence[SamplingParams], eos: Sequence[int],
                    *, max_batch: int = 64, **engine_kw) -> list[Sampled]:
    """One completion per context on a RecordingEngine (`engine_kw`: more Engine settings, e.g. prefill_chunk),
    with the routing of every fed position recorded (each Sampled's `routing` is a RoutingRecord of
    len(context) + len(completion) - 1 positions)."""
    max_len = max(len(c) for c in contexts) + max(p.max_tokens for p in params)
    rec = _Recorder(model, len(contexts), max_len)
    engine = RecordingEngine(model, recorder=rec, max_batch=min(max_batch, len(contexts)), max_seq_len=max_len,
                             eos_token_ids=eos, **{"batch_invariant": False, **engine_kw})
    with rec.installed():
        handles = []
        for i, (ctx, p) in enumerate(zip(contexts, params)):
            handles.append(engine.submit(ctx, p))
            rec.slots[handles[-1].id] = i
        engine.run_until_idle()
    out = []
    for ctx, h in zip(contexts, handles):
        [s] = collect([h])
        s.routing = rec.record_of(h.id, len(ctx) + len(s.tokens) - 1)
        out.append(s)
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

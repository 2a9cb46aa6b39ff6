"""Two-stage context parallelism for V4's compressed attention: one sequence split across the ranks of a group.

The sequence is cut into chunks as equal as whole positions allow (lengths differ by at most one). Plain: rank r
holds chunk r of N. Balanced (the default): 2N chunks, rank r holds chunks r and 2N-1-r, so every rank has the
same causal attention work (an early chunk with little to see paired with a late one that sees much).

Per attention layer (dsv4.model.context is the model's side):
  stage one, the rows before each chunk: every rank contributes the last rows of its chunks' attention inputs
    and each chunk takes the rows just before it (from one or several earlier chunks: a chunk shorter than the
    window needs more than one), enough for its window (W-1 rows) and for its compressors (the unfinished group
    across its start and the overlapping CSA compressor's previous group, up to 2m-1 rows);
  stage two, entries: each chunk compresses the groups whose last position it holds; the compressed entries and
    indexer keys of all chunks are all-gathered, so every query sees every earlier entry (masked by position);
    top-k selection and attention then run locally.
mHC, the MoE and everything per token need nothing. Both exchanges are differentiable: their backward passes
return the gradients to the ranks whose rows they came from.

    model.set_sequence_context(ContextParallel(group))   # every rank feeds its own tokens: ctx.shard(tokens)
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..model.context import Piece

__all__ = ["ContextParallel"]


class _AllGather(torch.autograd.Function):
    """Every rank's tensor (all of one shape); backward: each rank gets its tensor's gradient summed over ranks.
    `after`/the second output order the backward passes (see `_Ordered`)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, after: torch.Tensor, group):
        ctx.group, ctx.shape, ctx.like = group, t.shape, dict(dtype=t.dtype, device=t.device)
        ctx.set_materialize_grads(False)
        world = dist.get_world_size(group)
        out = t.new_empty((world * t.shape[0], *t.shape[1:]))     # ranks stacked along dim 0, as gloo wants it
        dist.all_gather_into_tensor(out, t.contiguous(), group=group)
        return out.view(world, *t.shape), t.new_zeros(())

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None, _token):
        world = dist.get_world_size(ctx.group)
        local = grad is None
        grad = torch.zeros((world, *ctx.shape), **ctx.like) if local else grad.contiguous()
        if dist.get_backend(ctx.group) == "nccl":
            mine = grad.new_empty(grad.shape[1:])
            dist.reduce_scatter_tensor(mine, grad, group=ctx.group)
        else:  # gloo has no reduce-scatter
            dist.all_reduce(grad, group=ctx.group)
            mine = grad[dist.get_rank(ctx.group)]
        return _unless_none(mine, local), grad.new_zeros(()), None


class _AllReduceSum(torch.autograd.Function):
    """The sum over ranks on every rank; backward: the gradients' sum over ranks (each rank's output feeds its own
    loss, and every input reaches every output)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, after: torch.Tensor, group):
        ctx.group, ctx.shape, ctx.like = group, t.shape, dict(dtype=t.dtype, device=t.device)
        ctx.set_materialize_grads(False)
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out, t.new_zeros(())

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None, _token):
        local = grad is None
        grad = torch.zeros(ctx.shape, **ctx.like) if local else grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return _unless_none(grad, local), grad.new_zeros(()), None


def _unless_none(grad: torch.Tensor, local_none: bool) -> torch.Tensor | None:
    """A gradient that no rank has (a backward pass reached the collective through the order tokens alone, e.g.
    the indexer's KL loss, which trains the indexer only) stays None: the model behind it gets no zero gradients."""
    return None if local_none and not grad.any() else grad


class _Ordered:
    """Collectives whose backward passes run in the reverse order of their forward passes on every rank.

    The autograd engine runs a node once its outputs' gradients are in, choosing among ready nodes by creation
    order; ranks whose graphs differ in shape (a chunk at the sequence start has no rows before it) would reach
    their collectives' backward passes in different orders, and a collective mismatch hangs or aborts. So each
    collective also takes the previous one's empty token and returns its own: the previous backward pass
    waits for this one's. `begin` starts a new chain (a new forward pass)."""

    def __init__(self, group):
        self.group = group
        self.last: torch.Tensor | None = None

    def begin(self) -> None:
        self.last = None

    def __call__(self, fn, t: torch.Tensor) -> torch.Tensor:
        after = self.last if self.last is not None else t.new_zeros(())
        out, token = fn.apply(t, after, self.group)
        if token.requires_grad:            # (a collective outside autograd orders nothing)
            self.last = token
        return out


class ContextParallel:
    """dsv4.model.context.SequenceContext over a process group (None: the default group). Every rank of the group
    holds the same rows (batch entries) and its chunks of their positions."""

    def __init__(self, group=None, *, balanced: bool = True):
        # a group of its own by default: its collectives keep their order apart from FSDP's and the experts'
        self.group = dist.new_group() if group is None else group
        self.balanced = balanced
        self.rank, self.world = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.n_chunks = 2 * self.world if balanced else self.world
        self.total: int | None = None       # the sequences' length, set by shard_positions (None: equal chunks)
        self._ordered = _Ordered(self.group)
        self.begin()

    def begin(self) -> None:
        self._ordered.begin()
        self._kept: dict[int, list[tuple[torch.Tensor, bool]]] = {}     # per repeatable layer: its exchanges' results
        self._keeping: list[tuple[torch.Tensor, bool]] | None = None
        self._replaying = None

    def begin_layer(self, key: int, repeatable: bool) -> None:
        """A repeatable layer keeps its exchanges' results; its second run within one forward pass (the backward
        pass's recompute) replays them: a recompute starts when a rank's backward pass first needs one of the
        layer's dropped activations, which need not fall between the same collectives on every rank."""
        self._keeping = self._replaying = None
        if repeatable and key in self._kept:
            self._replaying = iter(self._kept[key])
        elif repeatable:
            self._keeping = self._kept[key] = []

    def _exchange(self, fn, t: torch.Tensor) -> torch.Tensor:
        if self._replaying is not None:
            value, requires_grad = next(self._replaying)
            return value.detach().requires_grad_(requires_grad)
        out = self._ordered(fn, t)
        if self._keeping is not None:
            self._keeping.append((out.detach().clone(), out.requires_grad))
        return out

    # ------------------------------------------------------------------ layout
    def chunks_of(self, rank: int) -> list[int]:
        """The chunk numbers `rank` holds, in its local order."""
        return [rank, self.n_chunks - 1 - rank] if self.balanced else [rank]

    def owner(self, chunk: int) -> tuple[int, int]:
        """(rank, slot in its local order) of a chunk."""
        if chunk < self.world:
            return chunk, 0
        return self.n_chunks - 1 - chunk, 1

    def bounds(self, total: int) -> list[int]:
        """Chunk k of a sequence of `total` positions is positions bounds[k] .. bounds[k+1]-1: as equal as whole
        positions allow (lengths differ by at most one)."""
        if total < self.n_chunks:
            raise ValueError(f"a sequence of {total} positions is shorter than the {self.n_chunks} chunks of "
                             f"{self.world} ranks{', balanced' if self.balanced else ''}")
        return [k * total // self.n_chunks for k in range(self.n_chunks + 1)]

    def local_len(self, total: int, rank: int | None = None) -> int:
        """How many positions of a sequence of `total` positions `rank` (default: this one) holds."""
        b = self.bounds(total)
        return sum(b[k + 1] - b[k] for k in self.chunks_of(self.rank if rank is None else rank))

    def _total(self, n_local: int) -> int:
        """The length of the sequences whose pieces are `n_local` rows here: the last `shard_positions` call's
        (which fixes the layout of the forward passes that follow), else equal chunks of n_local * world."""
        if self.total is not None:
            if self.local_len(self.total) != n_local:
                raise ValueError(f"this rank holds {n_local} positions, but it holds {self.local_len(self.total)} "
                                 f"of sequences of {self.total} (the last shard_positions/shard call's length)")
            return self.total
        per = len(self.chunks_of(0))
        if n_local % per:
            raise ValueError(f"{n_local} local positions do not split into the {per} equal chunks each rank holds "
                             f"(for unequal chunks call shard_positions(total) or shard(tokens) first)")
        return n_local * self.world

    def pieces(self, n_local: int) -> list[Piece]:
        b, out, offset = self.bounds(self._total(n_local)), [], 0
        for k in self.chunks_of(self.rank):
            out.append(Piece(offset, b[k], b[k + 1] - b[k]))
            offset += b[k + 1] - b[k]
        return out

    def positions(self, n_local: int, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.cat([torch.arange(p.start, p.start + p.length, device=device) for p in self.pieces(n_local)])

    def shard_positions(self, total: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The global positions this rank holds of a sequence of `total` positions. Fixes the layout of the
        forward passes that follow: the model's rows are then these positions."""
        self.bounds(total)                            # (checks the length)
        self.total = total
        return self.positions(self.local_len(total), device)

    def shard(self, t: torch.Tensor, total: int | None = None, shift: int = 0) -> torch.Tensor:
        """This rank's positions (shifted by `shift`) of the sequences t [B, >= total + shift, ...] (total: t's length)."""
        total = t.shape[1] - shift if total is None else total
        return t[:, self.shard_positions(total, t.device) + shift]

    # ------------------------------------------------------------------ the exchanges
    def rows_before(self, x: torch.Tensor, rows: int) -> list[torch.Tensor]:
        n_local = x.shape[1]
        b = self.bounds(self._total(n_local))
        given = [min(rows, b[k + 1] - b[k]) for k in range(self.n_chunks)]   # the last rows each chunk gives,
        h = max(given)                                # in slots of h rows (a shorter chunk's padded with zeros)
        mine = self.pieces(n_local)
        tails = []
        for p in mine:
            g = min(rows, p.length)
            tails.append(x[:, p.offset + p.length - g:p.offset + p.length])
            if g < h:
                tails.append(x.new_zeros(x.shape[0], h - g, *x.shape[2:]))
        every = self._exchange(_AllGather, torch.cat(tails, 1))                             # [world, B, chunks*h, ...]

        def tail(chunk: int) -> torch.Tensor:
            rank, slot = self.owner(chunk)
            return every[rank][:, slot * h:slot * h + given[chunk]]
        out = []
        for p in mine:
            need = min(rows, p.start)
            parts, k = [], b.index(p.start)           # chunks k-1, k-2, ... until `need` rows
            while need > sum(t.shape[1] for t in parts):
                k -= 1
                got = sum(t.shape[1] for t in parts)
                parts.insert(0, tail(k)[:, max(0, given[k] - (need - got)):])
            # (a chunk at the sequence start gets an empty slice of the gathered rows: every rank's graph then runs
            # the same collectives in its backward pass, in the same order)
            out.append(torch.cat(parts, 1) if parts else every[0][:, :0])
        return out

    def gather_groups(self, entries: list[torch.Tensor], ratio: int, n_local: int) -> torch.Tensor:
        b = self.bounds(self._total(n_local))

        def count(chunk: int) -> int:                 # groups whose last position chunk holds
            return b[chunk + 1] // ratio - b[chunk] // ratio
        widest = max(sum(count(k) for k in self.chunks_of(r)) for r in range(self.world))
        local = torch.cat(entries, 1)
        if local.shape[1] < widest:
            local = torch.cat((local, local.new_zeros(local.shape[0], widest - local.shape[1], *local.shape[2:])), 1)
        every = self._exchange(_AllGather, local)                                           # [world, B, widest, D]
        parts = []
        for k in range(self.n_chunks):
            rank, slot = self.owner(k)
            first = sum(count(j) for j in self.chunks_of(rank)[:slot])
            parts.append(every[rank][:, first:first + count(k)])
        return torch.cat(parts, 1)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return self._exchange(_AllReduceSum, t)

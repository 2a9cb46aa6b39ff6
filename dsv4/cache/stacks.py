"""All layers' window rings, and all compressor states of one shape, kept in one tensor each, so that a
speculative step's checkpoint and rollback (dsv4.cache.rollback) are one op per kind of tensor, not one per layer.

Each layer's RowStore.buf (window ring) and CompressorState.kv / .score (and .pair, the two as one tensor) alias a
slice of a stack: rings [L, B, W, record], states [L, 2, B, R, width] (kv, score). A layer's tensor is contiguous
and used as before; writes through either name land in the same memory. Entry and indexer-key stores are not
stacked (their sizes differ by ratio and a rollback leaves them alone).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

WINDOW = "window"                         # a member's attribute: the layer's window ring
STATES = ("compressor_state", "indexer_state")


@dataclass
class Stack:
    """One stacked tensor and where its members sit: `members[i]` = (layer index, attribute) owns t[i]."""
    t: torch.Tensor
    bdim: int                             # the batch dimension of t
    members: list[tuple[int, str]]
    ratio: int = 0                        # states: the compression ratio and layout they share
    overlap: bool = False

    def select(self, rows: slice) -> "Stack":
        """A view of some batch rows (shares storage)."""
        index = [slice(None)] * self.bdim + [rows]
        return Stack(self.t[tuple(index)], self.bdim, self.members, self.ratio, self.overlap)

    def gathered(self, index: torch.Tensor, layers: list) -> "Stack":
        """A copy of batch rows `index`, with `layers` (their own copies of those rows) rebound to views of it."""
        out = Stack(self.t.index_select(self.bdim, index), self.bdim, self.members, self.ratio, self.overlap)
        out.bind(layers)
        return out

    def bind(self, layers: list) -> None:
        """Make each member's tensors the views of this stack."""
        for i, (li, attr) in enumerate(self.members):
            layer = layers[li]
            if attr == WINDOW:
                layer.window_rows.buf = _alias(self.t, (i,))
            else:
                st = getattr(layer, attr)
                st.kv, st.score, st.pair = _alias(self.t, (i, 0)), _alias(self.t, (i, 1)), _alias(self.t, (i,))

    def states(self, layers: list) -> list:
        """The members' CompressorState objects (state stacks), in stack order."""
        return [getattr(layers[li], attr) for li, attr in self.members]


def _alias(t: torch.Tensor, index: tuple) -> torch.Tensor:
    """t[index] as a tensor of its own over t's memory, not an autograd view of t: a forward run with gradients
    on writes the layers' states in place, and as views of one base those writes would chain every layer's
    autograd history through it (and fail); as separate tensors they behave as separately allocated ones."""
    v = t[index]
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), v.storage_offset(), v.shape,
                                                               v.stride())


def stack_layers(layers: list) -> tuple[list[Stack], list[Stack]]:
    """Move the layers' rings and compressor states into stacks (a copy; the layers then hold views).
    Returns (ring stacks, state stacks); tensors of one shape, dtype and device share a stack."""
    rings: dict[tuple, list[tuple[int, str]]] = {}
    states: dict[tuple, list[tuple[int, str]]] = {}
    for li, layer in enumerate(layers):
        buf = layer.window_rows.buf
        rings.setdefault((tuple(buf.shape), buf.dtype, buf.device), []).append((li, WINDOW))
        for attr in STATES:
            st = getattr(layer, attr)
            if st is not None:
                overlap = attr == "indexer_state" or layer.kind == "csa"
                key = (tuple(st.kv.shape), st.kv.dtype, st.kv.device, layer.ratio, overlap)
                states.setdefault(key, []).append((li, attr))
    ring_stacks = []
    for members in rings.values():
        s = Stack(torch.stack([layers[li].window_rows.buf for li, _ in members]), 1, members)
        s.bind(layers)
        ring_stacks.append(s)
    state_stacks = []
    for key, members in states.items():
        sts = [getattr(layers[li], attr) for li, attr in members]
        s = Stack(torch.stack([torch.stack((st.kv, st.score)) for st in sts]), 2, members, key[3], key[4])
        s.bind(layers)
        state_stacks.append(s)
    return ring_stacks, state_stacks

"""pair_order against torch's stable argsort, by both methods, on routings of every kind of shape."""
from __future__ import annotations

import pytest
import torch

from dsv4.ops.pair_order import pair_order


def routings():
    g = torch.Generator().manual_seed(0)
    yield torch.randint(0, 16, (64 * 6,), generator=g), 16        # a 64-row decode step of flash4
    yield torch.randint(0, 256, (6,), generator=g), 256            # one token, most experts unused
    yield torch.full((40,), 3), 8                                   # every pair on one expert
    yield torch.tensor([7, 0, 7, 0, 1, 7]), 8                      # ties kept in pair order
    yield torch.randint(0, 5, (1,), generator=g), 5
    yield torch.empty(0, dtype=torch.long), 4                       # no pairs


@pytest.mark.parametrize("counting", [True, False])
def test_pair_order_is_the_stable_argsort_and_its_inverse(counting):
    for flat, E in routings():
        order, at, counts = pair_order(flat, E, counting=counting)
        assert torch.equal(order, flat.argsort(stable=True))
        assert torch.equal(at[order], torch.arange(flat.numel()))
        assert counts.dtype == torch.int32 and torch.equal(counts.long(), torch.bincount(flat, minlength=E))


def test_the_default_counts_small_routings_and_sorts_large_ones(monkeypatch):
    import dsv4.ops.pair_order as po
    calls = []
    real = torch.Tensor.argsort
    monkeypatch.setattr(torch.Tensor, "argsort", lambda self, *a, **k: calls.append(self.numel()) or real(self, *a, **k))
    flat = torch.randint(0, 16, (384,))
    po.pair_order(flat, 16)
    assert calls == []
    monkeypatch.setattr(po, "COUNTING_MAX_CELLS", 100)
    order, _, _ = po.pair_order(flat, 16)
    assert calls == [384] and torch.equal(order, real(flat, stable=True))

"""A cached chunk of several tokens reads its window from the ring in place ([ring before the write | chunk rows],
`ring_chunk_indices`) when the ring holds rows of the model dtype: the same rows in the same order as the gathered
window ([the W-1 earlier rows | chunk rows], `window_indices`), so the logits are bitwise those of the gathered
path, for rows near position 0, inside and past the first window, and chunks of 2 to more than a window."""
import pytest
import torch

import dsv4
from dsv4.cache.kv_cache import LayerCache
from dsv4.model.attention import ring_chunk_indices

TINY = dsv4.ModelConfig.preset("tiny")   # window 32


@pytest.fixture(scope="module")
def model():
    return dsv4.Transformer(TINY).init_weights(seed=5).eval()


@pytest.mark.parametrize("S", [2, 5, 40])
@torch.no_grad()
def test_ring_chunk_equals_gathered_window(model, S, monkeypatch):
    g = torch.Generator().manual_seed(S)
    lengths = [1, 20, 31, 32, 45]
    prompts = [torch.randint(0, TINY.vocab_size, (1, n), generator=g) for n in lengths]
    chunk = torch.randint(0, TINY.vocab_size, (len(lengths), S), generator=g)
    outs = []
    for gathered in (False, True):
        if gathered:   # the FP8 rows' path: the window gathered in front of the chunk
            monkeypatch.setattr(LayerCache, "window_ring", lambda self, dtype: None)
        cache = model.new_cache(len(lengths), 128)
        for r, p in enumerate(prompts):
            model(p, cache=cache.select(r))
        outs.append(model(chunk, cache=cache))
    assert torch.equal(outs[0], outs[1])


def test_ring_chunk_indices_name_the_window_positions():
    """Each listed row holds the position the query sees (ring slot p % W before pos0, chunk row after)."""
    W, S = 8, 3
    pos0 = torch.tensor([0, 2, 8, 13])
    idx = ring_chunk_indices(pos0, S, W)
    for b, p0 in enumerate(pos0.tolist()):
        ring = {(p % W): p for p in range(max(p0 - W, 0), p0)}                 # what the ring holds
        for i in range(S):
            for j in range(W):
                p = p0 + i - j
                row = int(idx[b, i, j])
                if p < 0:
                    assert row == -1
                elif p < p0:
                    assert ring[row] == p
                else:
                    assert row == W + p - p0

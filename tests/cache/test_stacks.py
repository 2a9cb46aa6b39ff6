"""The stacked storage of the window rings and compressor states (dsv4.cache.stacks): every layer's tensor is a
slice of its stack's memory through every kind of view (whole cache, row slices, gathered copies), so the
checkpoint / rollback that work on the stacks see exactly what the layers hold."""
import torch

import dsv4
from dsv4.cache.stacks import WINDOW

TINY = dsv4.ModelConfig.preset("tiny")   # ratios (0, 4, 16, 4): CSA states (main + indexer) and an HCA state


def _members(cache):
    """(stack tensor slice, the layer's own tensor) for every member of every stack."""
    out = []
    for s in cache._rings + cache._state_stacks:
        for i, (li, attr) in enumerate(s.members):
            layer = cache.layers[li]
            if attr == WINDOW:
                out.append((s.t[i], layer.window_rows.buf))
            else:
                st = getattr(layer, attr)
                out += [(s.t[i, 0], st.kv), (s.t[i, 1], st.score)]
    return out


def test_layers_alias_their_stacks():
    cache = dsv4.Transformer(TINY).init_weights(seed=0).new_cache(3, 64)
    assert len(cache._rings) == 1 and len(cache._state_stacks) == 3     # CSA main, CSA indexer, HCA
    n_states = sum(len(layer.states()) for layer in cache.layers)
    assert sum(len(s.members) for s in cache._state_stacks) == n_states
    for view in (cache, cache.select(slice(1, 3))):
        for k, (stacked, own) in enumerate(_members(view)):
            assert own.is_contiguous() or view is not cache
            own.fill_(k + 1)                   # a write through the layer is a write to the stack, and back
            assert torch.equal(stacked, torch.full_like(stacked, k + 1))
            stacked.zero_()
            assert not own.any()
    gathered = cache.gather_rows([2, 0])       # a copy: its own stacks, which its layers alias
    for k, (stacked, own) in enumerate(_members(gathered)):
        own.fill_(k + 7)
        assert torch.equal(stacked, torch.full_like(stacked, k + 7))
    assert not any(own.any() for _, own in _members(cache))   # (the copy does not write through)


@torch.no_grad()
def test_rollback_on_gathered_rows_equals_rollback_in_place():
    """Rows not adjacent run a speculative step on a gathered copy (its own stacks), then are scattered back: the
    same cache as the step and rollback on the whole cache (to the rounding of a 3-row against a 2-row batch)."""
    model = dsv4.Transformer(TINY).init_weights(seed=1).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, TINY.vocab_size, (1, n), generator=g) for n in (29, 35, 46)]
    step = torch.randint(0, TINY.vocab_size, (2, 3), generator=g)
    caches = []
    for gathered in (False, True):
        cache = model.new_cache(3, 64)
        for r, p in enumerate(prompts):
            model(p, cache=cache.select(r))
        part = cache.gather_rows([2, 0]) if gathered else None
        if part is None:   # the same two rows in place: rows 0 and 2 of a 3-row step, row 1 kept whole
            full = torch.stack((step[1], torch.zeros(3, dtype=torch.long), step[0]))
            ckpt = cache.checkpoint(3)
            model(full, cache=cache)
            cache.rollback(ckpt, [1, 0, 2])
        else:
            ckpt = part.checkpoint(3)
            model(step, cache=part)
            part.rollback(ckpt, [2, 1])
            cache.scatter_rows([2, 0], part)
        caches.append(cache)
    a, b = caches
    assert a.lengths() == b.lengths() == [30, 35, 48]
    for (_, x), (_, y) in zip(_members(a), _members(b)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)

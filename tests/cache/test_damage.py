"""A forward step that fails midway (some layers wrote the cache, the positions did not advance) leaves its rows
marked damaged: any later use raises CacheDamaged naming the rows, until they are reset; other rows stay usable
and bitwise equal to a clean run."""
import pytest
import torch

import dsv4
from conftest import InjectedFailure, fail_on_call
from dsv4.cache import CacheDamaged


@pytest.fixture(scope="module")
def model():
    return dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=1).eval()


def _tokens(n, b=2, seed=0):
    return torch.randint(0, 2048, (b, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_failed_step_damages_rows_and_next_use_raises(model, monkeypatch):
    """Layer 3 fails after layers 0-2 wrote their part of the cache. The next chunk then raises CacheDamaged;
    used anyway (the marks cleared by hand, i.e. the behaviour without them), its logits differ from a clean
    cache's: the marks guard a real, otherwise silent, error."""
    tokens = _tokens(40)
    clean = model.new_cache(2, 64)
    model(tokens[:, :20], cache=clean)
    want = model(tokens[:, 20:30], cache=clean)

    cache = model.new_cache(2, 64)
    model(tokens[:, :20], cache=cache)
    with monkeypatch.context() as m:
        fail_on_call(m, model.layers[3])
        with pytest.raises(InjectedFailure):
            model(tokens[:, 20:30], cache=cache)
    assert cache.lengths() == [20, 20] and cache.damaged_rows == [0, 1]
    with pytest.raises(CacheDamaged, match=r"row\(s\) \[0, 1\] are damaged.*reset"):
        model(tokens[:, 20:30], cache=cache)
    with pytest.raises(CacheDamaged):
        cache.check_intact([1])
    with pytest.raises(CacheDamaged):
        cache.broadcast_row(0)

    cache._damaged[:] = [False, False]  # what an unmarked cache would do: run on the damaged state
    assert (model(tokens[:, 20:30], cache=cache) - want).abs().max() > 1e-2


@torch.no_grad()
def test_other_rows_stay_usable_and_reset_row_equals_fresh(model, monkeypatch):
    """A step that fails on one row (a view) damages only that row: the other row decodes on, bitwise as in a
    clean run; after a reset the damaged row is again bitwise what a fresh cache gives."""
    tokens = _tokens(48)

    def run(fail: bool):
        cache = model.new_cache(2, 64)
        model(tokens[:1, :20], cache=cache.select(0))
        model(tokens[1:, :24], cache=cache.select(1))
        if fail:
            with monkeypatch.context() as m:
                fail_on_call(m, model.layers[2].ffn)  # after layer 2's attention wrote its cache
                with pytest.raises(InjectedFailure):
                    model(tokens[1:, 24:30], cache=cache.select(1))
            assert cache.damaged_rows == [1] and cache.select(1).damaged_rows == [0]
            with pytest.raises(CacheDamaged, match=r"row\(s\) \[1\]"):
                model(tokens[:, 30:31], cache=cache)  # the whole batch touches row 1
            with pytest.raises(CacheDamaged, match=r"row\(s\) \[1\]"):
                model(tokens[1:, 24:30], cache=cache.select(1))
        row0 = [model(tokens[:1, 20 + i:21 + i], cache=cache.select(0)) for i in range(6)]
        cache.select(1).reset()
        assert cache.damaged_rows == [] and cache.lengths() == [26, 0]
        row1 = model(tokens[1:, :30], cache=cache.select(1))
        both = model(tokens[:, 30:34], cache=cache)
        return torch.cat(row0, 1), row1, both

    for got, want in zip(run(fail=True), run(fail=False)):
        assert torch.equal(got, want)


@torch.no_grad()
def test_rejected_step_does_not_damage(model):
    """Checks that fail before any layer runs (a full cache, bad token ids, a wrong batch) leave the rows intact."""
    cache = model.new_cache(2, 16)
    model(_tokens(10), cache=cache)
    with pytest.raises(ValueError, match="cache full"):
        model(_tokens(7), cache=cache)
    with pytest.raises(ValueError, match="token ids"):
        model(torch.full((2, 1), 5000), cache=cache)
    with pytest.raises(ValueError, match="batch"):
        model(_tokens(1, b=1), cache=cache)
    assert cache.damaged_rows == [] and cache.lengths() == [10, 10]
    model(_tokens(6), cache=cache)
    assert cache.lengths() == [16, 16]


@torch.no_grad()
def test_views_of_views_name_root_rows(model, monkeypatch):
    cache = model.new_cache(4, 32)
    inner = cache.select(slice(1, 4)).select(slice(1, 3))  # rows 2 and 3 of the root
    with monkeypatch.context() as m:
        fail_on_call(m, model.layers[1])
        with pytest.raises(InjectedFailure):
            model(_tokens(5), cache=inner)
    assert cache.damaged_rows == [2, 3] and inner.damaged_rows == [0, 1]
    with pytest.raises(CacheDamaged, match=r"row\(s\) \[2, 3\]"):
        inner.check_intact()
    cache.select(slice(2, 4)).reset()
    assert cache.damaged_rows == []


@torch.no_grad()
def test_prefix_store_refuses_a_damaged_row(model, monkeypatch, tmp_path):
    from dsv4.generate import PrefixStore
    tokens = _tokens(12, b=1)
    cache = model.new_cache(1, 32)
    model(tokens[:, :8], cache=cache)
    with monkeypatch.context() as m:
        fail_on_call(m, model.layers[2])
        with pytest.raises(InjectedFailure):
            model(tokens[:, 8:], cache=cache)
    with pytest.raises(CacheDamaged):
        PrefixStore(tmp_path, model).save(cache, tokens[0, :8].tolist())

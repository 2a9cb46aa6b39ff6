"""RowStateCopy (the prefix cache's snapshot of a row, taken in a few grouped copies) holds exactly what row_state
names, in its order, and owns its memory: later steps on the row, or copies of other rows, never change it."""
import pytest
import torch

from dsv4 import ModelConfig
from dsv4.cache.row_state import RowStateCopy, row_state
from dsv4.model import Transformer


@pytest.fixture(scope="module")
def model():
    # flash4's layer kinds (CSA, HCA) at tiny dims, plus tiny's window-only layers
    cfg = ModelConfig.preset("tiny").replace(compress_ratios=(0, 4, 16, 4, 0))
    return Transformer(cfg).init_weights(seed=0).eval()


def _bytes(t: torch.Tensor) -> list[int]:
    return t.contiguous().view(torch.uint8).flatten().tolist()


@pytest.mark.parametrize("kv, idx", [("auto", "auto"), ("fp8", "fp4"), ("bf16", "fp8")])
def test_the_copy_is_row_state_byte_for_byte_and_its_own(model, kv, idx):
    g = torch.Generator().manual_seed(1)
    cache = model.new_cache(3, 96, kv, idx)
    lengths = [37, 5, 70]
    with torch.no_grad():
        for r, n in enumerate(lengths):   # rows at different lengths (partial groups, a row with no HCA entry)
            model(torch.randint(0, model.config.vocab_size, (1, n), generator=g), cache=cache.select(r))
    copies = [RowStateCopy(cache.select(r), n) for r, n in enumerate(lengths)]
    copies.append(RowStateCopy(cache.select(slice(1, 3)).select(1), lengths[2]))   # a view of a view: row 2
    lengths.append(lengths[2])
    wants = [{k: _bytes(v) for k, v in row_state(cache.select(r), n).items()} for r, n in enumerate(lengths[:3])]
    wants.append(wants[2])
    with torch.no_grad():   # the rows move on: every stored tensor of every row changes
        model(torch.randint(0, model.config.vocab_size, (3, 20), generator=g), cache=cache)
    storages = {s.t.untyped_storage().data_ptr() for s in (*cache._rings, *cache._state_stacks)}
    storages |= {s.buf.untyped_storage().data_ptr() for layer in cache.layers for s in layer.stores()}
    for copy, want, n in zip(copies, wants, lengths):
        got = copy.tensors()
        assert list(got) == list(want)                               # row_state's names, in its order
        assert {k: _bytes(v) for k, v in got.items()} == want        # its bytes, as they were
        assert copy.ratios == [layer.ratio for layer in cache.layers] and copy.n == n
        assert got is copy.tensors()                                 # named once
        for v in got.values():
            assert v.untyped_storage().data_ptr() not in storages    # none of it is the cache's memory
    mine = [{v.untyped_storage().data_ptr() for v in c.tensors().values()} for c in copies]
    assert all(not (a & b) for i, a in enumerate(mine) for b in mine[i + 1:])


def test_a_damaged_or_mismatched_row_is_refused(model):
    cache = model.new_cache(2, 32)
    with torch.no_grad():
        model(torch.zeros(2, 6, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="holds 6 tokens"):
        RowStateCopy(cache.select(0), 5)
    with pytest.raises(ValueError, match="one-row"):
        RowStateCopy(cache, 6)
    cache.begin_step(1)   # a step that never commits leaves its rows damaged
    with pytest.raises(RuntimeError, match="damaged"):
        RowStateCopy(cache.select(1), 6)

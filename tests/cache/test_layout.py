"""Storage records: sizes of the official serving layout, and exact round trips of representable rows."""
import pytest
import torch

import dsv4
from dsv4.cache import RowStore, record_bytes
from dsv4.model.compressor import quantize_entries


def test_record_sizes_match_the_serving_layouts():
    assert record_bytes("fp8", 512, 64, "kv") == 584       # 448 e4m3 + 64 bf16 + 7 ue8m0 + 1 pad
    assert record_bytes("bf16", 512, 64, "kv") == 1024
    assert record_bytes("fp8", 128, 64, "index") == 132     # 128 e4m3 + fp32 scale
    assert record_bytes("fp4", 128, 64, "index") == 68      # 64 packed + 4 ue8m0


@pytest.mark.parametrize("fmt, role, rotate", [("fp8", "kv", False), ("fp4", "index", True)])
def test_quantised_rows_round_trip_exactly(fmt, role, rotate):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 512 if role == "kv" else 128, generator=g) * 3
    x = quantize_entries(x, 64, rotate)               # what the model produces under set_quant_sim(True)
    if role == "kv":                                    # rope dims are stored in bf16
        x[..., -64:] = x[..., -64:].to(torch.bfloat16).float()
    store = RowStore(fmt, 2, 16, x.shape[-1], 64, role, torch.float32)
    idx = torch.tensor([[3, 0, 1, 2, 4, 5, 6, 7, 8]] * 2)
    store.write(idx, x)
    assert torch.equal(store.gather(idx), x)
    assert store.buf.dtype == torch.uint8 and store.buf.shape[-1] == record_bytes(fmt, x.shape[-1], 64, role)


def test_fp8_index_keys_are_close():
    x = torch.randn(1, 4, 128)
    store = RowStore("fp8", 1, 4, 128, 64, "index", torch.float32)
    store.write(torch.arange(4).view(1, 4), x)
    assert ((store.read(4) - x).abs() / x.abs().amax(-1, keepdim=True)).max() < 2 ** -4


def test_masked_writes_leave_other_rows():
    store = RowStore("fp32", 2, 4, 3, 2, "kv", torch.float32, scratch=True)
    # masked-out slots may point anywhere, even past the last row (a group the cache can never complete)
    store.write(torch.tensor([[0, 1], [9, 3]]), torch.ones(2, 2, 3), torch.tensor([[True, False], [False, True]]))
    assert store.rows == 4 and store.read(4).sum(-1).tolist() == [[3, 0, 0, 0], [0, 0, 0, 3]]
    with pytest.raises(ValueError, match="scratch"):
        RowStore("fp32", 2, 4, 3, 2, "kv", torch.float32).write(torch.zeros(2, 1, dtype=torch.long),
                                                                torch.ones(2, 1, 3), torch.ones(2, 1, dtype=torch.bool))


def test_cache_keeps_no_per_token_raw_kv():
    cfg = dsv4.ModelConfig.preset("tiny")
    cache = dsv4.Transformer(cfg).new_cache(1, 4096)
    for i, layer in enumerate(cache.layers):
        assert layer.window_rows.buf.shape[1] == cfg.window_size
        if cfg.compress_ratios[i]:
            assert layer.entry_rows.rows == 4096 // cfg.compress_ratios[i]

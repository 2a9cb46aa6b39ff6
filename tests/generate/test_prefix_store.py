"""On-disk prefix reuse: same logits as a cold run; corrupt, truncated or mismatched files are ignored."""
import logging

import pytest
import torch

import dsv4
from dsv4.generate import PrefixStore
from dsv4.generate.prefix_store import _tokens_hash
from conftest import assert_rel_close


@pytest.fixture(scope="module")
def model():
    return dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=1).eval()


PREFIX = torch.randint(0, 2048, (200,), generator=torch.Generator().manual_seed(0)).tolist()


def _cold(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens]), cache=model.new_cache(1, 512))


def _warm(model, store, tokens):
    with torch.no_grad():
        cache = model.new_cache(1, 512)
        n = store.load(cache, tokens)
        return n, model(torch.tensor([tokens[n:]]), cache=cache)


@pytest.mark.parametrize("kv, idx", [("auto", "auto"), ("fp8", "fp4")])
def test_warm_equals_cold(model, tmp_path, kv, idx):
    store = PrefixStore(tmp_path, model, block=64)
    with torch.no_grad():
        cache = model.new_cache(1, 512, kv, idx)
        model(torch.tensor([PREFIX]), cache=cache)
        store.save(cache, PREFIX)
        cont = PREFIX + [7, 8, 9, 10, 11]
        cold = model(torch.tensor([cont[200:]]), cache=cache)
        warm_cache = model.new_cache(1, 512, kv, idx)
        assert store.load(warm_cache, cont) == 200
        warm = model(torch.tensor([cont[200:]]), cache=warm_cache)
    assert torch.equal(warm, cold)
    other = ("bf16", "bf16") if kv == "auto" else ("auto", "auto")
    assert store.load(model.new_cache(1, 512, *other), cont) == 0  # another storage format: another key


def test_generate_reuses_and_matches(model, tmp_path):
    store = PrefixStore(tmp_path, model, block=64)
    a, b = PREFIX + [1, 2, 3], PREFIX + [4, 5]
    cold = dsv4.generate(model, [b], 12)
    dsv4.generate(model, [a], 3, prefix_store=store)  # saves at 64, 128, 192 and 203 tokens
    assert sorted(store._lengths()) == [64, 128, 192, 203]
    assert dsv4.generate(model, [b], 12, prefix_store=store) == cold
    n, warm = _warm(model, store, b)
    assert n == 192
    assert_rel_close("logits after a stored prefix", warm[:, -1], _cold(model, b)[:, -1], 1e-5)


@pytest.mark.parametrize("damage", ["flip", "truncate", "swap"])
def test_damaged_files_are_reported_and_ignored(model, tmp_path, caplog, damage):
    store = PrefixStore(tmp_path, model, block=1000)
    dsv4.generate(model, [PREFIX], 1, prefix_store=store)
    dsv4.generate(model, [PREFIX[:100]], 1, prefix_store=store)
    path200 = store._path(_tokens_hash(
        store.fingerprint(model.new_cache(1, 8)), PREFIX))
    data = open(path200, "rb").read()
    if damage == "flip":     # a bit flip in the tensor data: the checksum catches it
        data = data[:-50] + bytes([data[-50] ^ 0x10]) + data[-49:]
    elif damage == "truncate":
        data = data[:-1000]
    else:                    # a valid file stored under another prefix's name
        data = open(store._path(_tokens_hash(
            store.fingerprint(model.new_cache(1, 8)), PREFIX[:100])), "rb").read()
    open(path200, "wb").write(data)
    cont = PREFIX + [3, 3]
    with caplog.at_level(logging.WARNING):
        n, warm = _warm(model, store, cont)
    assert "ignoring stored prefix" in caplog.text
    assert n == 100  # fell back to the next shorter valid prefix
    assert_rel_close("fallback logits", warm[:, -1], _cold(model, cont)[:, -1], 1e-5)


def test_other_model_never_matches(model, tmp_path):
    store = PrefixStore(tmp_path, model)
    dsv4.generate(model, [PREFIX], 1, prefix_store=store)
    other = dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=2).eval()
    assert PrefixStore(tmp_path, other).load(other.new_cache(1, 512), PREFIX + [1]) == 0


# ---------------------------------------------------------------------------------------------- model changes
def _fresh():
    return dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=1).eval()


def _bump_unsampled_weight(m):  # an element away from the ends and off any regular stride
    w = m.layers[0].attn.wkv.weight
    with torch.no_grad():
        w.view(-1)[w.numel() // 2 + 1] += 1.0


def _bump_through_data(m):  # a write autograd's version counter does not see
    w = m.layers[1].attn.wkv.weight
    w.data.view(-1)[w.numel() // 2 + 3] += 1.0


def _reroute(m):  # the hash-routing table (a buffer)
    t = m.layers[0].ffn.gate.tid2eid
    t.copy_((t + 1) % m.config.n_routed_experts)


def _other_weights(m):
    m.load_state_dict(dsv4.Transformer(m.config).init_weights(seed=2).state_dict())


def _quant_sim(m):
    m.set_quant_sim(True)


@pytest.mark.parametrize("change", [_bump_unsampled_weight, _bump_through_data, _reroute, _other_weights, _quant_sim])
def test_model_change_after_first_use_is_never_served_stale(tmp_path, change):
    m = _fresh()
    store = PrefixStore(tmp_path, m, block=64)
    cont = PREFIX + [5, 6, 7]
    dsv4.generate(m, [PREFIX], 1, prefix_store=store)      # stores 64, 128, 192, 200 for the model as it was
    change(m)
    n, warm = _warm(m, store, cont)
    warm, cold = warm[:, -1], _cold(m, cont)[:, -1]
    assert torch.equal(warm, cold), f"warm differs from cold by {(warm - cold).abs().max():.3g} (stale {n}-token prefix)"
    assert n == 0
    assert PrefixStore(tmp_path, m).load(m.new_cache(1, 512), cont) == 0   # a new store object agrees
    dsv4.generate(m, [PREFIX], 1, prefix_store=store)      # the changed model stores its own prefixes ...
    n, warm = _warm(m, store, cont)
    assert n == 200                                         # ... and reuses them
    assert_rel_close("warm after the change", warm[:, -1], _cold(m, cont)[:, -1], 1e-5)

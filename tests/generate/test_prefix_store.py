"""On-disk prefix reuse: same logits as a cold run; corrupt, truncated or mismatched files are ignored."""
import importlib
import json
import logging
import multiprocessing
import os

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


# ---------------------------------------------------------------------------------------------- damaged or shared stores
def _stored(store, model, tokens):
    return store._path(_tokens_hash(store.fingerprint(model.new_cache(1, 8)), tokens))


@pytest.mark.parametrize("target", [b'"dtype":"F32"', b'"shape":[', b'"data_offsets":[', b'"n_tokens":"', b'{'])
def test_damaged_header_is_reported_removed_and_ignored(model, tmp_path, caplog, target):
    store = PrefixStore(tmp_path, model, block=1000)
    dsv4.generate(model, [PREFIX[:100]], 1, prefix_store=store)
    dsv4.generate(model, [PREFIX], 1, prefix_store=store)
    path = _stored(store, model, PREFIX)
    data = bytearray(open(path, "rb").read())
    at = data.index(target, 8) + len(target)   # the byte right after the target, in the JSON header
    data[at if target != b'{' else 8] ^= 0x01
    open(path, "wb").write(bytes(data))
    cont = PREFIX + [3, 3]
    with caplog.at_level(logging.WARNING):
        out = dsv4.generate(model, [cont], 4, prefix_store=store)
    assert out == dsv4.generate(model, [cont], 4)
    assert f"ignoring stored prefix {path}" in caplog.text
    assert store.activity.loaded[-1] == 100      # fell back to the shorter prefix
    assert not os.path.exists(path)                # removed
    dsv4.generate(model, [PREFIX], 1, prefix_store=store)   # saved afresh
    assert _warm(model, store, cont)[0] == 200


def _unwritable(monkeypatch, how):
    """A full or read-only disk: the write or the rename into place fails (root ignores chmod, so simulated)."""
    import errno

    ps = importlib.import_module("dsv4.generate.prefix_store")
    err = OSError(errno.ENOSPC if how == "full" else errno.EROFS, "simulated")

    def fail(*args, **kwargs):
        raise err
    monkeypatch.setattr(*((ps.tempfile, "mkstemp") if how == "full" else (ps.os, "replace")), fail)


@pytest.mark.parametrize("how", ["full", "read-only"])
def test_unwritable_store_warns_once_and_generation_goes_on(model, tmp_path, caplog, monkeypatch, how):
    store = PrefixStore(tmp_path, model, block=64)
    dsv4.generate(model, [PREFIX[:70]], 1, prefix_store=store)    # stored: 64 and 70 tokens
    _unwritable(monkeypatch, how)
    with caplog.at_level(logging.WARNING):
        out = dsv4.generate(model, [PREFIX], 5, prefix_store=store)         # tries 128, 192, 200
        out2 = dsv4.generate(model, [PREFIX + [1]], 5, prefix_store=store)
    assert out == dsv4.generate(model, [PREFIX], 5) and out2 == dsv4.generate(model, [PREFIX + [1]], 5)
    assert caplog.text.count("cannot be written") == 1
    assert store.activity.loaded[-2:] == [70, 70] and store.activity.failed_saves == 6
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    assert sorted(store._lengths()) == [64, 70]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes through chmod")
def test_read_only_directory(model, tmp_path, caplog):
    store = PrefixStore(tmp_path, model, block=64)
    dsv4.generate(model, [PREFIX[:70]], 1, prefix_store=store)
    tmp_path.chmod(0o555)
    try:
        with caplog.at_level(logging.WARNING):
            assert dsv4.generate(model, [PREFIX], 3, prefix_store=store) == dsv4.generate(model, [PREFIX], 3)
        assert store.activity.loaded[-1] == 70 and "cannot be written" in caplog.text
    finally:
        tmp_path.chmod(0o755)


@pytest.mark.parametrize("index", [b"not json", b"5", b'{"64": 1}', b'[64, "x"]', b"[true]", b"[64.5]", b"\xff\xfe",
                                   b"", None])
def test_malformed_or_missing_index_is_rebuilt(model, tmp_path, caplog, index):
    store = PrefixStore(tmp_path, model, block=64)
    dsv4.generate(model, [PREFIX[:150]], 1, prefix_store=store)  # 64, 128, 150
    if index is None:
        (tmp_path / "lengths.json").unlink()
    else:
        (tmp_path / "lengths.json").write_bytes(index)
    with caplog.at_level(logging.WARNING):
        n, warm = _warm(model, store, PREFIX)
    assert n == 150
    assert ("lengths.json is malformed" in caplog.text) == (index is not None)
    assert json.loads((tmp_path / "lengths.json").read_text()) == [64, 128, 150]


def _save_repeatedly(store, caches, barrier, rounds):
    barrier.wait()
    for _ in range(rounds):
        for cache, tokens in caches:
            assert store.save(cache, tokens) is not None


def test_concurrent_writers_share_a_store(model, tmp_path):
    """Processes saving the same prefix and their own ones at once: no save fails, no index entry is lost. (Two
    writers, one per core of a 2-core machine, so their saves overlap; each process's start-up is most of the
    time.)"""
    store = PrefixStore(tmp_path, model, block=10**6)
    shared = PREFIX[:40]
    states = {}
    with torch.no_grad():
        for tokens in [shared] + [PREFIX[:41 + k] for k in range(2)]:
            cache = model.new_cache(1, 64)
            model(torch.tensor([tokens]), cache=cache)
            states[len(tokens)] = (cache, tokens)
    ctx = multiprocessing.get_context("spawn")  # a forked child of a process whose OpenMP pool ran can hang
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_save_repeatedly, args=(store, [states[40], states[41 + k]], barrier, 12))
             for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    for p in procs:
        if p.exitcode is None:
            p.kill()
    assert [p.exitcode for p in procs] == [0] * 2
    assert sorted(store._lengths()) == [40, 41, 42]
    for n, (_, tokens) in states.items():
        assert store.load(model.new_cache(1, 64), tokens + [9]) == n
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------- the CLI's report
def test_cli_says_what_it_reused(model, tmp_path, capsys):
    from dsv4.cli import main
    from dsv4.train.tokenizer import train_bpe
    ckpt, store = tmp_path / "ckpt", tmp_path / "store"
    tok = train_bpe(["def add(a, b):\n    return a + b\n", "print(add(1, 2))\n"] * 20, 300, ckpt)
    dsv4.save_model(model, ckpt, dtype=torch.float32)
    first, second = "print(add(1, 2))", "print(add(1, 2))\nprint(add(3, 4))"
    assert tok.encode(second)[:len(tok.encode(first))] == tok.encode(first)
    args = ["generate", "--checkpoint", str(ckpt), "--max-new-tokens", "2", "--device", "cpu",
            "--prefix-store", str(store)]
    assert main(args + ["--prompt", first]) == 0
    n1 = len(tok.encode(first))
    assert f"prefix store {store}: no stored prefix matched; saved 1 prefix (up to {n1} tokens)" \
        in capsys.readouterr().err
    assert main(args + ["--prompt", second]) == 0
    n2 = len(tok.encode(second))
    assert f"prefix store {store}: reused {n1} of {n2} prompt tokens; saved 1 prefix (up to {n2} tokens)" \
        in capsys.readouterr().err

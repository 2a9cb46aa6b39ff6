"""Parity with transformers' DeepseekV4ForCausalLM (the independent oracle) on tiny random checkpoints.

fp32 everywhere; the bar is a relative max logit error <= 1e-4. Each config makes the interesting paths
run: indexer top-k smaller than the visible entries, the window wrapping, many completed CSA/HCA groups,
batch > 1, YaRN. >= 16 indexer heads so ReLU scores do not tie at zero (ties make top-k arbitrary).
"""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv4
from dsv4.model.attention import Attention
from conftest import assert_rel_close, hf_config, randomize_hf

pytest.importorskip("transformers")
from transformers import DeepseekV4ForCausalLM  # noqa: E402

W, C, H = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
MIXES = {
    "window-csa-hca": dict(layer_types=[W, C, H, C]),
    "pro-like-hca-first": dict(layer_types=[H, H, C, H], hca_rate=16),
    "csa-ratio-2": dict(layer_types=[C, H, C], csa_rate=2, hca_rate=4),
    "no-yarn-window-heavy": dict(layer_types=[W, W, C], yarn=False, sliding_window=4),
}


def _official_names(key: str) -> str:
    """What the official hub file calls a tensor that transformers saved (written independently of dsv4)."""
    key = key.removeprefix("model.")
    key = {"embed_tokens.weight": "embed.weight", "hc_head.hc_fn": "hc_head_fn", "hc_head.hc_base": "hc_head_base",
           "hc_head.hc_scale": "hc_head_scale"}.get(key, key)
    return key.replace(".attn.norm.weight", ".attn.kv_norm.weight")


@pytest.fixture(scope="module", params=sorted(MIXES))
def hf_checkpoint(request, tmp_path_factory):
    kw = dict(MIXES[request.param])
    cfg = hf_config(kw.pop("layer_types"), **kw)
    model = DeepseekV4ForCausalLM(cfg).eval()
    randomize_hf(model, seed=len(request.param))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path / "hf")
    return request.param, model, path


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens, use_cache=False).logits


def test_transformers_naming(hf_checkpoint):
    name, hf, path = hf_checkpoint
    keys = load_file(path / "hf" / "model.safetensors").keys()
    assert "model.embed_tokens.weight" in keys and "model.hc_head.hc_fn" in keys
    ours = dsv4.load_model(path / "hf", dtype=torch.float32)
    tokens = torch.randint(0, hf.config.vocab_size, (2, 61), generator=torch.Generator().manual_seed(0))
    err = assert_rel_close(f"logits[{name}]", ours(tokens), _logits(hf, tokens), 1e-4)
    print(f"{name}: transformers naming, rel err {err:.2e}")


def test_official_naming(hf_checkpoint):
    name, hf, path = hf_checkpoint
    off = path / "official"
    off.mkdir(exist_ok=True)
    shutil.copy(path / "hf" / "config.json", off / "config.json")
    tensors = {_official_names(k): v for k, v in load_file(path / "hf" / "model.safetensors").items()}
    assert "layers.0.attn.kv_norm.weight" in tensors and "embed.weight" in tensors
    save_file(tensors, off / "model.safetensors")
    ours = dsv4.load_model(off, dtype=torch.float32)
    tokens = torch.randint(0, hf.config.vocab_size, (3, 50), generator=torch.Generator().manual_seed(1))
    err = assert_rel_close(f"logits[{name}]", ours(tokens), _logits(hf, tokens), 1e-4)
    print(f"{name}: official naming, rel err {err:.2e}")


def test_transformers_module_naming(hf_checkpoint):
    """The raw state_dict of the transformers module (fused experts.gate_up_proj, self_attn.q_a_proj ...)."""
    name, hf, path = hf_checkpoint
    raw = path / "raw"
    raw.mkdir(exist_ok=True)
    shutil.copy(path / "hf" / "config.json", raw / "config.json")
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    save_file(sd, raw / "model.safetensors")
    ours = dsv4.load_model(raw, dtype=torch.float32)
    tokens = torch.randint(0, hf.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    assert_rel_close(f"logits[{name}]", ours(tokens), _logits(hf, tokens), 1e-4)


def _csa_entry_choices(model, monkeypatch) -> list[tuple[str, torch.Tensor]]:
    """Records, for each call of a CSA layer's attention, the compressed entries each query attends to, as a
    bool [B, S, N] mask: from the whole-sequence op's entry mask ("sequence") or from the index lists of the cached
    op (entries are the list values past the window rows, "cached")."""
    layer, calls = [None], []
    for m in model.modules():
        if isinstance(m, Attention):
            m.register_forward_pre_hook(lambda mod, args: layer.__setitem__(0, mod))
    sequence_attn, sparse_attn = dsv4.ops.sequence_attn, dsv4.ops.sparse_attn

    def on_sequence(q, kv, entries, mask, *args, **kwargs):
        if layer[0].kind == "csa":
            calls.append(("sequence", mask.clone()))
        return sequence_attn(q, kv, entries, mask, *args, **kwargs)

    def on_cached(q, rows, sink, idx, scale, entries=None, *args, **kwargs):
        if layer[0].kind == "csa":
            n_rows, n = rows.shape[1], entries.shape[1]
            chosen = torch.zeros(*idx.shape[:2], n + 1, dtype=torch.bool)
            chosen.scatter_(-1, torch.where(idx >= n_rows, idx - n_rows, n), True)  # slot n: window rows, -1
            calls.append(("cached", chosen[..., :n]))
        return sparse_attn(q, rows, sink, idx, scale, entries, *args, **kwargs)
    monkeypatch.setattr(dsv4.ops, "sequence_attn", on_sequence)
    monkeypatch.setattr(dsv4.ops, "sparse_attn", on_cached)
    return calls


def test_topk_really_selects(hf_checkpoint, monkeypatch):
    """On the 40-token inputs of these tests, CSA queries attend to exactly the indexer's top min(index_topk,
    visible) entries, fewer than they see once more than index_topk are complete, in a whole-sequence forward and
    through the cache (a chunk, then decode steps); and a larger index_topk changes the logits. (A model whose
    indexer stopped selecting, attending to every visible entry, fails here.)"""
    name, hf, path = hf_checkpoint
    cfg = hf.config
    assert C in cfg.layer_types and 40 > cfg.sliding_window  # a selecting indexer, and the window wraps
    m, k = cfg.compress_rates[C], cfg.index_topk
    ours = dsv4.load_model(path / "hf", dtype=torch.float32)
    tokens = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    calls = _csa_entry_choices(ours, monkeypatch)
    with torch.no_grad():
        logits = ours(tokens)
        cache = ours.new_cache(2, 64)
        ours(tokens[:, :32], cache=cache)
        for p in range(32, 40):
            ours(tokens[:, p:p + 1], cache=cache)
    n_csa = cfg.layer_types.count(C)
    expected = [("sequence", 0)] * n_csa + [("cached", 0)] * n_csa + [("cached", p) for p in range(32, 40)
                                                                       for _ in range(n_csa)]
    assert [kind for kind, _ in calls] == [kind for kind, _ in expected]
    strict = 0
    for (kind, chosen), (_, start) in zip(calls, expected):
        pos = start + torch.arange(chosen.shape[1])
        visible = torch.arange(chosen.shape[2]) < ((pos + 1) // m).view(-1, 1)        # [S, N]
        assert not (chosen & ~visible).any(), (name, kind, start)
        want = ((pos + 1) // m).clamp(max=k)
        assert torch.equal(chosen.sum(-1), want.expand_as(chosen.sum(-1))), (name, kind, start)
        strict += int((visible.sum(-1) > k).sum())
    assert strict > 0, "no query saw more entries than index_topk"
    for mod in ours.modules():
        if isinstance(mod, Attention) and mod.kind == "csa":
            mod.indexer.topk = 10 ** 6
    with torch.no_grad():
        assert not torch.allclose(ours(tokens), logits, rtol=1e-4, atol=0)


def test_save_then_transformers_loads(tmp_path):
    cfg = dsv4.ModelConfig.preset("tiny").replace(index_n_heads=16)
    model = dsv4.Transformer(cfg).init_weights(seed=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move the mHC/sink/ape/bias parameters off their init values
        for n, p in model.named_parameters():
            if any(s in n for s in ("hc_", "attn_sink", "ape", "gate.bias")):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    dsv4.save_model(model, tmp_path, dtype=torch.float32)
    saved = json.load(open(tmp_path / "config.json"))
    assert saved["compress_ratios"] == list(cfg.compress_ratios)
    hf = DeepseekV4ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 70), generator=g)
    with torch.no_grad():
        err = assert_rel_close("logits", model(tokens), _logits(hf, tokens), 1e-4)
        print(f"save -> transformers load: rel err {err:.2e}")
        again = dsv4.load_model(tmp_path, dtype=torch.float32)
        assert torch.equal(again(tokens), model(tokens))

"""Checkpoint loading: official FP8/FP4 storage dequantised exactly, sharding, and every error path."""
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv4
from dsv4 import CheckpointError
from dsv4.quant import e2m1_round, float_to_e8m0, pack_fp4

FP8_SUFFIXES = ("attn.wq_a.weight", "attn.wq_b.weight", "attn.wkv.weight", "attn.wo_a.weight", "attn.wo_b.weight",
                "shared_experts.w1.weight", "shared_experts.w2.weight", "shared_experts.w3.weight",
                "indexer.wq_b.weight", "e_proj.weight", "h_proj.weight")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    model = dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=5)
    dsv4.save_model(model, path, dtype=torch.float32)
    return path, model


def _copy(src, dst, edit):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def _fp8(w: torch.Tensor, g):
    """Quantise to e4m3 with random power-of-two 128x128 block scales; returns (q, scale bytes, dequantised)."""
    O, I = w.shape
    exps = torch.randint(-12, -4, ((O + 127) // 128, (I + 127) // 128), generator=g).float()
    s = torch.exp2(exps).repeat_interleave(128, 0)[:O].repeat_interleave(128, 1)[:, :I]
    q = (w / s).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, float_to_e8m0(torch.exp2(exps)).view(torch.float8_e8m0fnu), q.float() * s


def _fp4(w: torch.Tensor, g):
    O, I = w.shape
    exps = torch.randint(-9, -5, (O, I // 32), generator=g).float()
    s = torch.exp2(exps).repeat_interleave(32, 1)
    v = e2m1_round((w / s).clamp(-6, 6))
    return pack_fp4(v), float_to_e8m0(torch.exp2(exps)).view(torch.float8_e8m0fnu), v * s


def test_fp8_fp4_official_checkpoint_dequantised_exactly(saved, tmp_path):
    path, _ = saved
    g = torch.Generator().manual_seed(0)
    expected = {}

    def quantise(t):
        for name in list(t):
            if name.endswith(FP8_SUFFIXES):
                t[name], t[name[:-6] + "scale"], expected[name] = _fp8(t[name], g)
            elif ".ffn.experts." in name:
                t[name], t[name[:-6] + "scale"], expected[name] = _fp4(t[name], g)
    _copy(path, tmp_path / "q", quantise)
    stored = load_file(tmp_path / "q" / "model.safetensors")
    assert stored["layers.1.attn.wq_b.weight"].dtype == torch.float8_e4m3fn
    assert stored["layers.1.ffn.experts.3.w2.weight"].dtype == torch.int8
    model = dsv4.load_model(tmp_path / "q", dtype=torch.float32)
    params = dict(model.named_parameters())
    for name, want in expected.items():
        if ".ffn.experts." in name:
            layer, rest = name.split(".ffn.experts.")
            e, w = rest.split(".")[:2]
            got = params[f"{layer}.ffn.experts.{w}"][int(e)]
        else:
            got = params[name]
        assert torch.equal(got, want), name
    assert len(expected) > 50


def test_sharded_round_trip_and_dtypes(tmp_path):
    model = dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=2)
    with torch.no_grad():  # bf16-representable values, so that saving in bf16 is lossless
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16))
    dsv4.save_model(model, tmp_path, dtype=torch.bfloat16, max_shard_bytes=1 << 20)
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 2
    assert "layers.0.ffn.experts.7.w3.weight" in index["weight_map"] and "mtp.0.e_proj.weight" in index["weight_map"]
    loaded = dsv4.load_model(tmp_path, dtype=torch.bfloat16)
    p = dict(loaded.named_parameters())
    assert p["layers.1.attn.wq_a.weight"].dtype == torch.bfloat16
    assert p["layers.1.hc_attn_fn"].dtype == torch.float32 and p["head.weight"].dtype == torch.float32
    ref = model.to_dtype(torch.bfloat16)
    tokens = torch.randint(0, 2048, (1, 20))
    assert torch.equal(loaded(tokens), ref(tokens))


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("layers.2.attn.compressor.ape"), r"missing tensor 'layers.2.attn.compressor.ape' \(expected shape \(16, 64\)\)"),
    (lambda t: t.pop("layers.1.ffn.experts.5.w2.weight"), r"experts \[5\]"),
    (lambda t: t.__setitem__("layers.0.attn.bogus.weight", torch.zeros(3)), "unexpected tensor 'layers.0.attn.bogus.weight'"),
    (lambda t: t.__setitem__("layers.1.ffn.experts.8.w1.weight", torch.zeros(128, 128)), "expert 8 >= n_routed_experts=8"),
])
def test_mismatch_errors_name_the_tensor(saved, tmp_path, edit, message):
    path, _ = saved
    bad = _copy(path, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=message):
        dsv4.load_model(bad, dtype=torch.float32)


def test_truncated_and_corrupt_files(saved, tmp_path):
    path, _ = saved
    data = (path / "model.safetensors").read_bytes()
    for name, blob, message in [("truncated", data[: len(data) - 1000], "truncated"),
                                ("empty", b"", "truncated"),
                                ("header", b"\xff" * 8 + data[8:], "corrupt or truncated safetensors header"),
                                ("garbage", data[:8] + b"{nonsense" + data[17:], "corrupt safetensors header")]:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text((path / "config.json").read_text())
        (d / "model.safetensors").write_bytes(blob)
        with pytest.raises(CheckpointError, match=message):
            dsv4.load_model(d)


def test_missing_shard_and_no_weights(saved, tmp_path):
    path, _ = saved
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        dsv4.load_model(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"embed.weight": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="gone.safetensors"):
        dsv4.load_model(tmp_path)


def test_checkpoint_without_mtp_loads_without_it(saved, tmp_path):
    path, model = saved
    d = _copy(path, tmp_path / "nomtp", lambda t: [t.pop(k) for k in list(t) if k.startswith("mtp.")])
    loaded = dsv4.load_model(d, dtype=torch.float32)
    assert len(loaded.mtp) == 0
    tokens = torch.randint(0, 2048, (1, 33))
    assert torch.equal(loaded(tokens), model(tokens))


def _one_problem(excinfo) -> str:
    """The error message, after checking it reports exactly one problem (no echo as 'missing' etc.)."""
    msg = str(excinfo.value)
    assert "(1 problem(s))" in msg, msg
    return msg


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.__setitem__("embed.weight", (t["embed.weight"] * 100).to(torch.int32)),
     r"'embed.weight' \(2048, 128\) is stored as I32, but it is a floating-point weight"),
    (lambda t: t.__setitem__("layers.1.attn.wkv.weight", torch.zeros(64, 128, dtype=torch.uint8)),
     r"'layers.1.attn.wkv.weight' \(64, 128\) is stored as U8 without a '.scale' tensor"),
    (lambda t: t.__setitem__("layers.2.attn.wo_b.weight", t["layers.2.attn.wo_b.weight"] > 0),
     r"'layers.2.attn.wo_b.weight' \(128, 128\) is stored as BOOL"),
    (lambda t: t.__setitem__("layers.0.ffn.gate.tid2eid", t["layers.0.ffn.gate.tid2eid"].float()),
     r"'layers.0.ffn.gate.tid2eid' \(2048, 2\) is stored as F32, but 'layers.0.ffn.gate.tid2eid' holds integer ids"),
    (lambda t: t.__setitem__("layers.1.attn.wkv.weight", torch.zeros(64, 100)),
     r"'layers.1.attn.wkv.weight' has shape \(64, 100\), expected \(64, 128\)"),
    (lambda t: t.__setitem__("layers.1.attn.wkv.weight", torch.zeros(64, 128, dtype=torch.float8_e4m3fn)),
     "FP8 but has no '.scale'"),
    (lambda t: t.__setitem__("layers.1.attn.wkv.scale", torch.ones(1, 2)),
     r"'layers.1.attn.wkv.weight' \(64, 128\) has a block scale but dtype F32"),
], ids=["int32-embedding", "uint8-without-scale", "bool-weight", "float-hash-table", "mis-shaped", "fp8-without-scale",
        "scale-on-float-weight"])
def test_mangling_storage_is_refused_once(saved, tmp_path, edit, message):
    """Weights stored as integers or bools, one-byte weights without their FP4 scale, and integer tables stored as
    floats would load as other numbers: each is refused with exactly one message naming the tensor and shape."""
    path, _ = saved
    bad = _copy(path, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=message) as excinfo:
        dsv4.load_model(bad, dtype=torch.float32)
    assert "missing" not in _one_problem(excinfo)


def test_hash_table_in_any_integer_dtype_loads(saved, tmp_path):
    path, model = saved
    d = _copy(path, tmp_path / "i32", lambda t: t.__setitem__("layers.0.ffn.gate.tid2eid",
                                                                 t["layers.0.ffn.gate.tid2eid"].to(torch.int32)))
    loaded = dsv4.load_model(d, dtype=torch.float32)
    assert torch.equal(loaded.layers[0].ffn.gate.tid2eid, model.layers[0].ffn.gate.tid2eid)


@pytest.mark.parametrize("value, at", [(8, (5, 1)), (-1, (2047, 0))])
def test_hash_table_with_bad_expert_ids_is_refused(saved, tmp_path, value, at):
    """Out-of-range ids would fail later as a raw index error inside the forward (or index another expert)."""
    path, _ = saved

    def edit(t):
        t["layers.0.ffn.gate.tid2eid"] = t["layers.0.ffn.gate.tid2eid"].clone()
        t["layers.0.ffn.gate.tid2eid"][at] = value
    bad = _copy(path, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=rf"'layers.0.ffn.gate.tid2eid' \(2048, 2\) holds expert id {value} at "
                                              rf"\[{at[0]}, {at[1]}\].*ids must lie in \[0, 7\]"):
        dsv4.load_model(bad, dtype=torch.float32)


def _fused_experts(t, layer: int, extra_rows: int = 0):
    """Layer `layer`'s routed experts in transformers' fused naming (gate_up_proj [E, 2I(+extra), D], down_proj)."""
    n = len([k for k in t if k.startswith(f"layers.{layer}.ffn.experts.") and k.endswith(".w1.weight")])
    w = {k: torch.stack([t.pop(f"layers.{layer}.ffn.experts.{e}.{k}.weight") for e in range(n)]) for k in
         ("w1", "w2", "w3")}
    gate_up = torch.cat([w["w1"], w["w3"], torch.ones(n, extra_rows, w["w1"].shape[2])], 1)
    t[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = gate_up
    t[f"model.layers.{layer}.mlp.experts.down_proj"] = w["w2"]


def test_fused_gate_up_loads_and_extra_rows_are_refused(saved, tmp_path):
    path, model = saved
    good = _copy(path, tmp_path / "fused", lambda t: _fused_experts(t, 1))
    loaded = dsv4.load_model(good, dtype=torch.float32)
    for name in ("w1", "w2", "w3"):
        assert torch.equal(getattr(loaded.layers[1].ffn.experts, name), getattr(model.layers[1].ffn.experts, name))
    bad = _copy(path, tmp_path / "extra", lambda t: _fused_experts(t, 1, extra_rows=3))
    with pytest.raises(CheckpointError, match=r"'model.layers.1.mlp.experts.gate_up_proj' has shape \(8, 259, 128\), "
                                              r"expected \(8, 256, 128\)") as excinfo:
        dsv4.load_model(bad, dtype=torch.float32)
    assert "missing" not in _one_problem(excinfo)


def test_non_finite_weights_warn_naming_them(saved, tmp_path):
    path, model = saved

    def edit(t):
        t["embed.weight"][3, 4] = float("nan")
        t["layers.2.attn.wq_a.weight"][0, 0] = float("inf")
    d = _copy(path, tmp_path / "nan", edit)
    with pytest.warns(RuntimeWarning, match=r"2 checkpoint tensor\(s\) load with NaN or inf values.*"
                                            r"'embed.weight', 'layers.2.attn.wq_a.weight'"):
        loaded = dsv4.load_model(d, dtype=torch.float32)
    assert torch.isnan(loaded.embed.weight[3, 4])
    big = _copy(path, tmp_path / "big", lambda t: t["layers.1.attn.wkv.weight"].__setitem__((1, 1), 1e5))
    with pytest.warns(RuntimeWarning, match=r"\['layers.1.attn.wkv.weight'\]"):   # finite in fp32, inf in fp16
        dsv4.load_model(big, dtype=torch.float16)


def _index(d, shard: str, names):
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: shard for n in names}}))


def test_shard_paths_must_stay_inside_the_checkpoint(saved, tmp_path):
    path, model = saved
    names = list(load_file(path / "model.safetensors"))
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(path / "model.safetensors", other / "model.safetensors")
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(path / "config.json", d / "config.json")
    for shard in (str(other / "model.safetensors"), "../other/model.safetensors"):
        _index(d, shard, names)
        with pytest.raises(CheckpointError, match=f"shard path '{re.escape(shard)}' leaves the checkpoint directory"):
            dsv4.load_model(d, dtype=torch.float32)
    (d / "model.safetensors").symlink_to(other / "model.safetensors")
    _index(d, "model.safetensors", names)
    for listed_by_index in (True, False):
        with pytest.raises(CheckpointError, match="resolves to .*other/model.safetensors, outside the checkpoint"):
            dsv4.load_model(d, dtype=torch.float32)
        if listed_by_index:
            (d / "model.safetensors.index.json").unlink()


def test_hub_cache_layout_loads(saved, tmp_path):
    """The Hugging Face hub cache links a snapshot's files into the repository's blobs/: that is allowed, and so
    is a link to the whole checkpoint directory."""
    path, model = saved
    repo = tmp_path / "models--x--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / "abc").mkdir(parents=True)
    for f in ("model.safetensors", "config.json"):
        shutil.copy(path / f, repo / "blobs" / f"{f}.blob")
        (repo / "snapshots" / "abc" / f).symlink_to(f"../../blobs/{f}.blob")
    (tmp_path / "link").symlink_to(path)
    tokens = torch.randint(0, 2048, (1, 9))
    for d in (repo / "snapshots" / "abc", tmp_path / "link"):
        assert torch.equal(dsv4.load_model(d, dtype=torch.float32)(tokens), model(tokens))


def _with_header(src, dst, edit):
    """A copy of checkpoint `src` whose safetensors header is replaced by `edit(header)`."""
    shutil.copytree(src, dst)
    raw = (dst / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    text = json.dumps(edit(json.loads(raw[8:8 + n]))).encode()
    text += b" " * (-len(text) % 8)
    (dst / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
    return dst


def _first_entry(header, **fields):
    """`header` with fields of its first tensor's entry replaced (a callable is given the old value)."""
    entry = header[next(k for k in header if k != "__metadata__")]
    entry.update({k: v(entry[k]) if callable(v) else v for k, v in fields.items()})
    return header


@pytest.mark.parametrize("edit, message", [
    (lambda h: list(h), r"corrupt safetensors header \(a JSON list, not an object\)"),
    (lambda h: _first_entry(h, data_offsets=lambda offsets: [str(o) for o in offsets]),
     r"corrupt header entry for tensor '.*': data_offsets=\['0', '\d+'\] is not \[begin, end\]"),
    (lambda h: _first_entry(h, shape=[2.5, 3]), r"shape=\[2.5, 3\] is not a list of non-negative integers"),
    (lambda h: _first_entry(h, dtype=None), "dtype=None is not a dtype name"),
    (lambda h: _first_entry(h, shape=[1]), r"I64 \[1\] needs 8 bytes, data_offsets=\[0, \d+\] hold \d+"),
], ids=["header-list", "offsets-strings", "float-shape", "null-dtype", "shape-vs-bytes"])
def test_malformed_safetensors_header_is_a_checkpoint_error(saved, tmp_path, edit, message):
    path, _ = saved
    d = _with_header(path, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=message) as excinfo:
        dsv4.load_model(d, dtype=torch.float32)
    assert str(d / "model.safetensors") in str(excinfo.value)


@pytest.mark.parametrize("index, message", [
    ({"weight_map": ["model.safetensors"]}, r"expected an object whose 'weight_map' maps tensor names to shard "
                                            r"files, got weight_map=\['model.safetensors'\]"),
    (["model.safetensors"], "got a JSON list"),
    ({"weight_map": {}}, "'weight_map' names no tensors"),
    ({"weight_map": {"embed.weight": 3}}, r"shard file names must be non-empty strings, got \[3\]"),
])
def test_malformed_index_is_a_checkpoint_error(saved, tmp_path, index, message):
    path, _ = saved
    d = tmp_path / "bad"
    shutil.copytree(path, d)
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=message) as excinfo:
        dsv4.load_model(d, dtype=torch.float32)
    assert str(d / "model.safetensors.index.json") in str(excinfo.value)


def test_unavailable_device_is_named_before_loading(saved):
    from dsv4.errors import InvalidArgument
    path, _ = saved
    with pytest.raises(InvalidArgument, match="device='cuda:99': "):
        dsv4.load_model(path, device="cuda:99")
    with pytest.raises(InvalidArgument, match="device='gpu': not a device here"):
        dsv4.load_model(path, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidArgument, match=r"device='cuda': CUDA is not available .*; use 'cpu'"):
            dsv4.load_model(path, device="cuda")
    assert dsv4.load_model(path, device="auto").embed.weight.device.type == ("cuda" if torch.cuda.is_available()
                                                                              else "cpu")

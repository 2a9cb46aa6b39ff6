import json
import os

import pytest

from dsv4 import ConfigError, ModelConfig
from dsv4.config import PRESETS

from conftest import FIXTURES


@pytest.mark.parametrize("name", ["flash", "pro"])
def test_preset_matches_official_configs(name):
    preset = ModelConfig.preset(name)
    hub = ModelConfig.from_pretrained(os.path.join(FIXTURES, f"deepseek-v4-{name}", "config.json"))
    inference = ModelConfig.from_pretrained(os.path.join(FIXTURES, f"deepseek-v4-{name}", "inference", "config.json"))
    for cfg in (hub, inference):
        assert cfg.to_dict() == preset.to_dict(), {k: (v, preset.to_dict()[k]) for k, v in cfg.to_dict().items()
                                                   if preset.to_dict()[k] != v}


def test_official_values_flash():
    cfg = ModelConfig.preset("flash")
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.index_topk, cfg.route_scale) == (4096, 43, 64, 512, 1.5)
    kinds = [cfg.layer_kind(i) for i in range(cfg.n_layers)]
    assert kinds[:2] == ["window", "window"] and kinds.count("csa") == 21 and kinds.count("hca") == 20
    assert cfg.compress_ratios[-1] == 0  # the MTP block is window-only


def test_official_values_pro():
    cfg = ModelConfig.preset("pro")
    kinds = [cfg.layer_kind(i) for i in range(cfg.n_layers)]
    assert kinds.count("csa") == 30 and kinds.count("hca") == 31 and "window" not in kinds
    assert (cfg.dim, cfg.n_heads, cfg.index_topk, cfg.route_scale, cfg.o_groups) == (7168, 128, 1024, 2.5, 16)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hub_dialect_round_trip(name, tmp_path):
    cfg = ModelConfig.preset(name)
    cfg.save(tmp_path)
    assert ModelConfig.from_pretrained(tmp_path).to_dict() == cfg.to_dict()


def test_reads_transformers_dialect(hf_available, tmp_path):
    from conftest import hf_config
    hf = hf_config(["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
                   csa_rate=2, hca_rate=16)
    hf.save_pretrained(tmp_path)
    d = json.load(open(tmp_path / "config.json"))
    assert "layer_types" in d and "rope_parameters" in d and "compress_ratios" not in d
    cfg = ModelConfig.from_pretrained(tmp_path)
    assert cfg.compress_ratios == (0, 2, 16, 0) and cfg.csa_ratio == 2
    assert [cfg.layer_kind(i) for i in range(3)] == ["window", "csa", "hca"]
    assert (cfg.rope_factor, cfg.original_seq_len, cfg.compress_rope_theta) == (4, 64, 160000.0)
    assert cfg.rope_head_dim == 8 and cfg.n_hash_layers == 1


@pytest.mark.parametrize("change, field", [
    (dict(n_heads=6, o_groups=4), "o_groups"),
    (dict(rope_head_dim=7), "rope_head_dim"),
    (dict(n_activated_experts=9, n_routed_experts=8), "n_activated_experts"),
    (dict(compress_ratios=(0, 4)), "compress_ratios"),
    (dict(dim=0), "dim"),
    (dict(score_func="softmax"), "score_func"),
    (dict(index_head_dim=48), "index_head_dim"),
])
def test_bad_config_names_field(change, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.preset("tiny").replace(**change)


def test_unknown_key_and_bad_json(tmp_path):
    d = ModelConfig.preset("tiny").to_dict()
    d["n_layerz"] = 3
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="n_layerz"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_pretrained(tmp_path / "missing")
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.preset("huge")


def test_train_config_gpu_kernels(monkeypatch):
    """--gpu-kernels: a bad choice names the field; a run's choice holds while it trains and the process's comes
    back after it (the environment is read, never written)."""
    from dsv4 import ops
    from dsv4.ops import dispatch
    from dsv4.train.config import TrainConfig
    with pytest.raises(ConfigError, match="gpu_kernels"):
        TrainConfig(gpu_kernels="cuda")
    monkeypatch.delenv("DSV4_TRITON_TRAIN", raising=False)
    monkeypatch.setattr(dispatch, "_training_kernels", None)  # (the process's choice restored after the test)
    assert dispatch.training_kernel_choice() == "triton"
    with ops.training_kernels(TrainConfig(gpu_kernels="compiled").gpu_kernels):
        assert dispatch.training_kernel_choice() == "compiled" and "DSV4_TRITON_TRAIN" not in os.environ
    assert dispatch.training_kernel_choice() == "triton" and "DSV4_TRITON_TRAIN" not in os.environ


def test_train_config_cuda_graph():
    """--cuda-graph: auto (the default: graphs on a GPU without block recompute), on (not with block recompute)
    or off."""
    from dsv4.train.config import TrainConfig
    assert TrainConfig().cuda_graph == "auto"
    assert TrainConfig().graphs_on("cuda") and not TrainConfig().graphs_on("cpu")
    assert not TrainConfig(activation_checkpointing="block").graphs_on("cuda")
    assert TrainConfig(cuda_graph="on").graphs_on("cuda") and not TrainConfig(cuda_graph="off").graphs_on("cuda")
    with pytest.raises(ConfigError, match="cuda_graph"):
        TrainConfig(cuda_graph="yes")
    with pytest.raises(ConfigError, match="not supported with activation_checkpointing"):
        TrainConfig(cuda_graph="on", activation_checkpointing="block")


def test_distributed_training_refuses_cuda_graph_on():
    """Distributed steps run eager: asking for graphs there is an error, not silently ignored."""
    from dsv4.distributed import DistributedPlacement
    from dsv4.train.config import TrainConfig
    with pytest.raises(ConfigError, match="distributed training runs eager"):
        DistributedPlacement.start(TrainConfig(cuda_graph="on"))      # refused before joining a process group


def _flash_hub() -> dict:
    with open(os.path.join(FIXTURES, "deepseek-v4-flash", "config.json")) as f:
        return json.load(f)


def _load(d: dict, tmp_path) -> ModelConfig:
    (tmp_path / "config.json").write_text(json.dumps(d))
    return ModelConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("key", ["index_topk", "sliding_window", "rope_scaling", "head_dim", "qk_rope_head_dim",
                                 "routed_scaling_factor", "swiglu_limit", "hc_sinkhorn_iters", "num_hash_layers",
                                 "rope_theta", "compress_rope_theta", "index_n_heads"])
def test_hub_config_missing_a_model_key_is_refused(key, tmp_path):
    """The defaults of transformers' config class are V4-Flash's sizes: taking them for a missing key would
    silently build another model."""
    d = _flash_hub()
    del d[key]
    with pytest.raises(ConfigError, match=f"lacks required key '{key}'"):
        _load(d, tmp_path)


@pytest.mark.parametrize("key", ["index_topk", "window_size", "original_seq_len", "route_scale", "compress_ratios"])
def test_inference_config_missing_a_model_key_is_refused(key, tmp_path):
    with open(os.path.join(FIXTURES, "deepseek-v4-flash", "inference", "config.json")) as f:
        d = json.load(f)
    del d[key]
    with pytest.raises(ConfigError, match=key):
        _load(d, tmp_path)


def test_keys_the_official_format_defines_may_be_missing(tmp_path):
    d = _flash_hub()
    for key in ("rms_norm_eps", "hc_eps", "num_nextn_predict_layers", "max_position_embeddings", "bos_token_id",
                "eos_token_id", "num_key_value_heads", "n_shared_experts", "scoring_func"):
        del d[key]
    for key in ("beta_fast", "beta_slow"):
        del d["rope_scaling"][key]
    assert _load(d, tmp_path).to_dict() == ModelConfig.preset("flash").to_dict()


def test_rope_scaling_null_means_no_yarn_and_window_only_models_need_none(tmp_path):
    d = _flash_hub()
    d["rope_scaling"] = None
    cfg = _load(d, tmp_path)
    assert (cfg.original_seq_len, cfg.rope_factor) == (0, 1.0)
    for key in ("rope_scaling", "compress_rope_theta", "index_topk", "index_n_heads", "index_head_dim"):
        del d[key]           # used by compressed / CSA layers only
    d["compress_ratios"] = [0] * 44
    cfg = _load(d, tmp_path)
    assert set(cfg.compress_ratios) == {0} and cfg.original_seq_len == 0
    d = _flash_hub()
    del d["rope_scaling"]["original_max_position_embeddings"]
    with pytest.raises(ConfigError, match="YaRN needs \\['original_max_position_embeddings'\\]"):
        _load(d, tmp_path)


@pytest.mark.parametrize("key, value, message", [
    ("eos_token_id", 3.7, "eos_token_id=3.7: must be an integer"),
    ("bos_token_id", [True], "bos_token_id=True: must be an integer"),
    ("num_hash_layers", True, "n_hash_layers=True: must be an integer"),
    ("index_topk", "512", "index_topk='512': must be an integer"),
    ("compress_ratios", [0, 0, 3.7] + [4, 128] * 20 + [4, 0], r"compress_ratios\[2\]=3.7: must be an integer"),
    ("routed_scaling_factor", True, "route_scale=True: must be a number"),
])
def test_types_are_checked_not_coerced(key, value, message, tmp_path):
    d = _flash_hub()
    d[key] = value
    with pytest.raises(ConfigError, match=message):
        _load(d, tmp_path)


@pytest.mark.parametrize("path, value, message", [
    (("eos_token_id",), [], r"eos_token_id=\[\]: needs at least one token id"),
    (("eos_token_id",), -1, r"eos_token_id=-1: must be a token id in \[0, 129280\)"),
    (("bos_token_id",), 129280, r"bos_token_id=129280: must be a token id"),
    (("rope_scaling",), "yarn", "rope_scaling='yarn': must be an object"),
    (("rope_scaling",), 0, "rope_scaling=0: must be an object"),           # not read as "no YaRN"
    (("rope_scaling",), [], r"rope_scaling=\[\]: must be an object"),
    (("rope_scaling", "type"), None, "names no 'type'"),                   # a YaRN object without its type
    (("rope_scaling", "beta_fast"), "32", "beta_fast='32': must be an integer.*'rope_scaling.beta_fast'"),
    (("rope_scaling", "beta_fast"), 0, "beta_fast=0: must be > 0"),
    (("rope_scaling", "beta_slow"), -1, "beta_slow=-1: must be > 0"),
    (("rope_scaling", "original_max_position_embeddings"), 0, "YaRN needs original_max_position_embeddings > 0"),
    (("rope_theta",), 1, "rope_theta=1.0: must be > 1"),
    (("rms_norm_eps",), float("nan"), "norm_eps=nan: must be a finite number"),
    (("routed_scaling_factor",), float("inf"), "route_scale=inf: must be a finite number"),
    (("routed_scaling_factor",), 0, "route_scale=0.0: must be > 0"),
    (("max_position_embeddings",), 0, "max_seq_len=0: must be > 0"),
    (("vocab_size",), 2 ** 40, r"vocab_size=1099511627776: must be below 2\*\*31"),
    (("vocab_size",), 1e308, r"must be below 2\*\*31"),
    (("compress_ratios",), [0, 0, 4.0, 1e30] + [4, 128] * 19 + [4, 0], r"compress_ratios\[3\]=.*below 2\*\*31"),
    (("mlp_layer_types",), 3, "mlp_layer_types=3: must be a list of 'hash_moe' / 'moe'"),
    (("mlp_layer_types",), ["hash_moe"] * 3 + ["dense"] * 40, "mlp_layer_types=.*must be a list of 'hash_moe'"),
    (("mlp_layer_types",), ["hash_moe"] * 3 + ["moe"] * 39, "mlp_layer_types has 42 entries, num_hidden_layers=43"),
])
def test_wrong_json_types_and_ranges_are_config_errors(path, value, message, tmp_path):
    """Each of these was accepted (silently changing the model) or raised a raw exception from deep inside."""
    d = _flash_hub()
    d["mlp_layer_types"] = ["hash_moe"] * 3 + ["moe"] * 40
    at = d
    for key in path[:-1]:
        at = at[key]
    if value is None:
        del at[path[-1]]
    else:
        at[path[-1]] = value
    with pytest.raises(ConfigError, match=message) as excinfo:
        _load(d, tmp_path)
    assert str(tmp_path / "config.json") in str(excinfo.value)


def test_layer_types_must_be_a_list(tmp_path):
    d = ModelConfig.preset("tiny").to_hub_dict()
    d["layer_types"] = "sliding_attention"
    with pytest.raises(ConfigError, match="layer_types='sliding_attention': must be a list"):
        _load(d, tmp_path)
    d = ModelConfig.preset("tiny").to_hub_dict()
    d["compress_rates"]["heavily_compressed_attention"] = 0
    with pytest.raises(ConfigError, match="heavily_compressed_attention=0: must be > 0"):
        _load(d, tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must be a JSON object, got list"):
        ModelConfig.from_pretrained(tmp_path)


def test_missing_config_hints_at_the_checkpoints_inside(tmp_path):
    """A training run directory is not a checkpoint: the error points at its final/ export and its steps."""
    run = tmp_path / "run"
    for sub in ("final", "checkpoints/step_0000100", "checkpoints/step_0000200"):
        ModelConfig.preset("tiny").save(run / sub)
    (run / "checkpoints" / "step_0000300").mkdir()    # an unfinished one (no config.json) is not offered
    with pytest.raises(ConfigError, match=rf"no config.json found at {run} \(did you mean {run}/final\? It also "
                                          rf"holds {run}/checkpoints/step_0000100, {run}/checkpoints/step_0000200\)"):
        ModelConfig.from_pretrained(run)
    with pytest.raises(ConfigError, match=rf"did you mean {run}/checkpoints/step_0000200\?"):
        ModelConfig.from_pretrained(run / "checkpoints")
    with pytest.raises(ConfigError, match=r"\(no such directory\)"):
        ModelConfig.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=rf"no config.json found at {tmp_path / 'empty'}$"):
        ModelConfig.from_pretrained(tmp_path / "empty")


def test_integral_floats_are_the_integers_they_equal(tmp_path):
    d = _flash_hub()
    d["sliding_window"], d["compress_ratios"] = 128.0, [float(r) for r in d["compress_ratios"]]
    assert _load(d, tmp_path).to_dict() == ModelConfig.preset("flash").to_dict()


def test_train_config_resolution_layers(tmp_path):
    """defaults < the resumed run's train_config.json (and its directory as out) < --config < flags; a config
    file's unknown key is an error that names it."""
    from dsv4.train.config import TrainConfig, resolve_config
    run = tmp_path / "run"
    TrainConfig(steps=50, seq_len=96, lr=1e-3, out="elsewhere").save(str(run))
    (tmp_path / "cfg.json").write_text(json.dumps({"seq_len": 128, "batch_size": 4}))
    assert resolve_config() == TrainConfig()
    cfg = resolve_config(config_file=str(tmp_path / "cfg.json"), overrides={"batch_size": 2})
    assert (cfg.seq_len, cfg.batch_size, cfg.steps) == (128, 2, TrainConfig().steps)
    cfg = resolve_config(resume=str(run), config_file=str(tmp_path / "cfg.json"), overrides={"steps": 60})
    assert (cfg.out, cfg.steps, cfg.seq_len, cfg.lr, cfg.batch_size) == (str(run), 60, 128, 1e-3, 4)
    assert resolve_config(resume=str(run), overrides={"out": "b"}).out == "b"
    (tmp_path / "bad.json").write_text(json.dumps({"seq_length": 1}))
    with pytest.raises(ConfigError, match=r"unknown training config keys \['seq_length'\]"):
        resolve_config(config_file=str(tmp_path / "bad.json"))
    with pytest.raises(FileNotFoundError, match="no train_config.json"):
        resolve_config(resume=str(tmp_path / "missing"))


def test_compress_ratios_and_layer_types_must_agree(tmp_path):
    """dsv4 writes both; an edit of one is not silently overridden by the other, and the MTP blocks' ratios
    (only in compress_ratios) survive the round trip."""
    cfg = ModelConfig.preset("tiny").replace(compress_ratios=(0, 4, 16, 4, 16))
    cfg.save(tmp_path)
    assert ModelConfig.from_pretrained(tmp_path).compress_ratios == (0, 4, 16, 4, 16)
    d = cfg.to_hub_dict()
    d["compress_ratios"][1] = 16
    with pytest.raises(ConfigError, match=r"compress_ratios=\[0, 16, 16, 4, 16\] disagrees with layer_types"):
        _load(d, tmp_path)
    del d["compress_ratios"]
    assert _load(d, tmp_path).compress_ratios == (0, 4, 16, 4, 0)   # transformers' form: MTP blocks window-only

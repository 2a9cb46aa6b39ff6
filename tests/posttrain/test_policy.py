"""policy: a checkpoint directory <-> a trainable model and its tokenizer."""
import json

import pytest
import sft_fixtures as fx
import torch

import dsv4
from dsv4.checkpoint import CheckpointError
from dsv4.posttrain.policy import load_policy, save_policy


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return fx.make_base(tmp_path_factory.mktemp("base"))


def test_round_trip_is_loadable_by_dsv4_and_transformers(base, tmp_path):
    model, tok = load_policy(base, "cpu")
    assert model.training and all(p.requires_grad for n, p in model.named_parameters() if not n.endswith("gate.bias"))
    with torch.no_grad():
        model.head.weight.add_(0.5)   # something that must survive the trip
    out = save_policy(model, tok, tmp_path / "final")
    again = dsv4.load_model(out, dtype=torch.float32)
    for name, p in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], p), name
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(out)
    text = "<｜begin▁of▁sentence｜><｜User｜>What is 2 plus 3?<｜Assistant｜></think>5<｜end▁of▁sentence｜>"
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf.eos_token_id == tok.eos_id and hf.bos_token_id == tok.bos_id
    assert json.load(open(tmp_path / "final" / "config.json"))["vocab_size"] == model.config.vocab_size


def test_tokenizer_config_is_copied_when_given(base, tmp_path):
    model, tok = load_policy(base, "cpu")
    cfg = json.load(open(f"{base}/tokenizer_config.json"))
    save_policy(model, tok, tmp_path / "a", tokenizer_dir=base)
    assert json.load(open(tmp_path / "a" / "tokenizer_config.json")) == cfg


def test_load_errors_name_the_directory(base, tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_policy(tmp_path / "none", "cpu")
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).write_bytes(open(f"{base}/{f}", "rb").read())
    with pytest.raises(CheckpointError, match=f"{bare}: no tokenizer.json"):
        load_policy(bare, "cpu")

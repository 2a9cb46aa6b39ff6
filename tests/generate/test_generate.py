"""Generation: ragged batches equal single prompts (greedy), sampling options, tokenizer, CLI."""
import pytest
import torch

import dsv4
from dsv4.cli import main
from dsv4.generate import SamplingConfig, sample
from dsv4.train.tokenizer import train_bpe

TEXT = ["def add(a, b):\n    return a + b\n", "class Point:\n    def __init__(self, x, y):\n        self.x = x\n",
        "for i in range(10):\n    print(i * i)\n", "import os\nprint(os.getcwd())\n"] * 20


@pytest.fixture(scope="module")
def model():
    return dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=1).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("ckpt")
    tok = train_bpe(TEXT, 400, path)
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    dsv4.save_model(model, path, dtype=torch.float32)
    return path


def test_ragged_batch_greedy_equals_alone(model):
    prompts = [[1, 2, 3], list(range(10, 90)), [5] * 40, list(range(200, 333))]
    together = dsv4.generate(model, prompts, 25)
    assert together == [dsv4.generate(model, [p], 25)[0] for p in prompts]
    assert all(len(o) == 25 for o in together)


def test_stop_tokens_and_streaming(model):
    first = dsv4.generate(model, [[3, 4, 5]], 10)[0]
    stop = first[4]
    seen = []
    out = dsv4.generate(model, [[3, 4, 5], [6, 7]], 10, stop_tokens=[stop], on_token=lambda r, t: seen.append((r, t)))
    assert out[0] == first[: first.index(stop) + 1]
    assert [t for r, t in seen if r == 0] == out[0] and [t for r, t in seen if r == 1] == out[1]


def test_sampling_is_seeded_and_respects_top_k(model):
    kw = dict(temperature=1.0, top_k=5, seed=7)
    a, b = dsv4.generate(model, [[1, 2]], 15, **kw), dsv4.generate(model, [[1, 2]], 15, **kw)
    assert a == b and a != dsv4.generate(model, [[1, 2]], 15, temperature=1.0, top_k=5, seed=8)
    logits = torch.randn(4, 50)
    g = torch.Generator().manual_seed(0)
    top = logits.topk(3).indices
    for _ in range(20):
        t = sample(logits, SamplingConfig(temperature=2.0, top_k=3), g)
        assert all(int(t[i]) in top[i].tolist() for i in range(4))
    peaked = torch.full((1, 10), -10.0)
    peaked[0, 4] = 10.0
    assert int(sample(peaked, SamplingConfig(temperature=1.0, top_p=0.5), g)) == 4
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)


def test_generate_errors(model):
    with pytest.raises(ValueError, match="empty prompt"):
        dsv4.generate(model, [[1], []], 3)


def test_tokenizer_round_trip(checkpoint):
    tok = dsv4.Tokenizer.from_dir(checkpoint)
    text = "def add(a, b):\n    return a + b  # ünïcode ✓\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("x", bos=True)[0] == 0
    assert tok.token_id("<｜User｜>") is not None


def test_generate_cli(checkpoint, capsys):
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "def add(a, b):",
                 "--max-new-tokens", "12", "--device", "cpu"]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("def add(a, b):") and "tok/s" in cap.err
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "hi", "--device", "cpu", "--top-p", "2"]) == 2

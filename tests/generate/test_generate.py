"""Generation: ragged batches equal single prompts (greedy), sampling options, tokenizer, CLI."""
import pytest
import torch

import dsv4
from dsv4.cli import main
from dsv4.errors import DsV4Error, InvalidArgument
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


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=float("nan")), "temperature=nan: must be a finite number >= 0"),
    (dict(temperature=float("inf")), "temperature=inf: must be a finite number >= 0"),
    (dict(temperature=-0.5), "temperature=-0.5: must be a finite number >= 0"),
    (dict(temperature="1"), "temperature='1': must be a number, got str"),
    (dict(top_p=float("nan")), r"top_p=nan: must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p=1.5: must be in \(0, 1\]"),
    (dict(top_p=0), r"top_p=0.0: must be in \(0, 1\]"),
    (dict(top_k=2.5), "top_k=2.5: must be an integer, got float"),
    (dict(top_k=5.0), "top_k=5.0: must be an integer, got float"),
    (dict(top_k=True), "top_k=True: must be an integer, got bool"),
    (dict(top_k=-1), "top_k=-1: must be >= 0"),
    (dict(max_new_tokens=2.5), "max_new_tokens=2.5: must be an integer, got float"),
    (dict(max_new_tokens=-1), "max_new_tokens=-1: must be >= 0"),
    (dict(seed=1.5), "seed=1.5: must be an integer, got float"),
    (dict(seed=2 ** 70), "seed=1180591620717411303424: must fit in 64 bits"),
])
def test_bad_sampling_arguments_are_named(model, kwargs, message):
    """Refused up front, naming the parameter and its value (NaN used to fail inside torch.multinomial, a float
    top_k inside topk, a float count inside range)."""
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(InvalidArgument, match=message):
        dsv4.generate(model, [[1, 2]], kwargs.pop("max_new_tokens"), temperature=kwargs.pop("temperature", 1.0),
                      **kwargs)
    assert issubclass(InvalidArgument, ValueError) and issubclass(InvalidArgument, DsV4Error)


def test_tiny_temperature_is_greedy_not_nan(model):
    """Logits over a tiny temperature overflow to inf; shifted first they give -inf, so sampling is argmax."""
    logits = torch.randn(3, 50) * 5
    got = sample(logits, SamplingConfig(temperature=1e-40, top_p=0.9, top_k=4), torch.Generator().manual_seed(0))
    assert got.tolist() == logits.argmax(-1).tolist()
    assert dsv4.generate(model, [[1, 2]], 6, temperature=1e-40) == dsv4.generate(model, [[1, 2]], 6)


def test_chat_session_checks_its_arguments(model, checkpoint):
    from dsv4.generate.session import ChatSession
    tok = dsv4.Tokenizer.from_dir(checkpoint)
    with pytest.raises(InvalidArgument, match="seed=0.5"):
        ChatSession(model, tok, seed=0.5)
    session = ChatSession(model, tok, max_seq_len=256)
    with pytest.raises(InvalidArgument, match="max_new_tokens=3.0: must be an integer"):
        session.send("hi", 3.0)
    assert session.messages == []   # refused before the message was taken


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

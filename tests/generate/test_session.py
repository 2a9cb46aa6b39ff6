"""Chat sessions reuse the cache across turns and answer exactly as a cold run on the whole conversation."""
import io
import sys

import pytest
import torch

import dsv4
from conftest import InjectedFailure, fail_on_call
from dsv4.cli import main
from dsv4.generate import SamplingConfig
from dsv4.generate.chat import encode_chat
from dsv4.generate.session import ChatSession
from dsv4.train.tokenizer import train_bpe

TEXT = ["Hello there, how are you?\n", "I am fine, thank you. What is the capital of France?\n",
        "Paris is the capital of France.\n", "def f(x):\n    return x * 2\n"] * 30


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat")
    tok = train_bpe(TEXT, 400, path)
    cfg = dsv4.ModelConfig.preset("tiny").replace(vocab_size=tok.vocab_size)
    model = dsv4.Transformer(cfg).init_weights(seed=4).eval()
    dsv4.save_model(model, path, dtype=torch.float32)
    return model, tok, path


@pytest.mark.parametrize("thinking", [False, True])
def test_second_turn_reuses_cache_and_matches_cold(setup, thinking):
    model, tok, _ = setup
    session = ChatSession(model, tok, thinking=thinking, system="Be brief.", max_seq_len=1024)
    session.send("Hello there, how are you?", max_new_tokens=12)
    history = list(session.messages)
    streamed = []
    reply = session.send("What is the capital of France?", max_new_tokens=12, on_text=streamed.append)
    if not thinking:  # chat mode is append-only: the whole first turn stays cached, as generated
        assert session.reused > 0
        turn = encode_chat(history + [{"role": "user", "content": "What is the capital of France?"}], thinking=False)
        assert tok.decode(session.last_prompt) == turn  # the official text, with the model's own reply tokens
    cold = dsv4.generate(model, [session.last_prompt], 12, stop_tokens=[tok.eos_id])[0]
    assert tok.decode([t for t in cold if t != tok.eos_id]) == "".join(streamed)
    assert reply["role"] == "assistant"


def test_chat_cli(setup, monkeypatch, capsys):
    _, _, path = setup
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\nWhat is the capital?\n\n"))
    assert main(["chat", "--checkpoint", str(path), "--device", "cpu", "--max-new-tokens", "8"]) == 0
    cap = capsys.readouterr()
    assert cap.out.count("dsv4> ") == 2 and "reused" in cap.err


def _replies(session, texts, n=10):
    return [session.send(t, max_new_tokens=n)["content"] for t in texts]


@pytest.mark.parametrize("thinking", [False, True])
def test_rejected_send_is_forgotten(setup, thinking):
    """A send rejected as too long keeps no trace: the next turn reuses the cache and answers exactly as a session
    that never saw it."""
    model, tok, _ = setup
    session = ChatSession(model, tok, thinking=thinking, system="Be brief.", max_seq_len=256)
    _replies(session, ["Hello there, how are you?"])
    before = list(session.messages)
    with pytest.raises(ValueError, match="exceeds the cache"):
        session.send("What is the capital of France? " * 40, max_new_tokens=10)
    assert session.messages == before
    reply = _replies(session, ["What is the capital of France?"])
    fresh = ChatSession(model, tok, thinking=thinking, system="Be brief.", max_seq_len=256)
    assert reply == _replies(fresh, ["Hello there, how are you?", "What is the capital of France?"])[1:]
    assert session.last_prompt == fresh.last_prompt and session.messages == fresh.messages
    if not thinking:
        assert session.reused == fresh.reused > 0


@pytest.mark.parametrize("where", ["prefill", "decode", "callback"])
def test_send_failing_midway_is_forgotten(setup, monkeypatch, where):
    """A send that fails in the prefill, in a decode step (both after earlier layers wrote the cache) or in the
    caller's streaming callback keeps neither the user turn nor a partial reply; the next send (sampled, so the
    generator must be rewound too) answers exactly as a session that never saw the failed one."""
    model, tok, _ = setup
    sampling = SamplingConfig(temperature=0.8, top_k=20)
    session = ChatSession(model, tok, system="Be brief.", max_seq_len=512, sampling=sampling, seed=3)
    _replies(session, ["Hello there, how are you?"])
    before, history = list(session.messages), list(session.history)
    on_text = None
    with monkeypatch.context() as m:
        if where == "callback":
            def on_text(piece):
                raise KeyboardInterrupt
        else:  # layer 3 runs once for the prefill, then once per decode step
            fail_on_call(m, model.layers[3], call=1 if where == "prefill" else 4)
        with pytest.raises((InjectedFailure, KeyboardInterrupt)):
            session.send("def f(x):", max_new_tokens=10, on_text=on_text)
    assert session.messages == before and session.history == history
    assert session.cache.damaged_rows == [] and session.fed == [] and session.cache.lengths() == [0]
    reply = _replies(session, ["What is the capital of France?"])
    fresh = ChatSession(model, tok, system="Be brief.", max_seq_len=512, sampling=sampling, seed=3)
    assert reply == _replies(fresh, ["Hello there, how are you?", "What is the capital of France?"])[1:]
    assert session.last_prompt == fresh.last_prompt and session.messages == fresh.messages


def test_reply_cut_by_nonfinite_logits_keeps_cache_bookkeeping(setup):
    """A reply stopped by non-finite logits fed every token it yielded (none is held back): the session's record
    of the cache still matches the cache, and the next turn continues from it."""
    model, tok, _ = setup
    broken = dsv4.Transformer(model.config).eval()
    broken.load_state_dict(model.state_dict())
    session = ChatSession(broken, tok, max_seq_len=512)
    probe = ChatSession(model, tok, max_seq_len=512)
    probe.send("Hello there", max_new_tokens=6)
    out = probe.history[len(probe.last_prompt):]
    assert out[2] not in probe.last_prompt + out[:2]
    with torch.no_grad():
        broken.embed.weight[out[2]] = float("nan")
    with pytest.warns(dsv4.NonFiniteWarning, match="at generated token 3"):
        session.send("Hello there", max_new_tokens=6)
    assert session.fed == session.history[:-1] and session.cache.lengths() == [len(session.fed)]
    assert session.history[:-1] == probe.last_prompt + out[:3]

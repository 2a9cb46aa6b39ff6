"""Chat sessions reuse the cache across turns and answer exactly as a cold run on the whole conversation."""
import io
import sys

import pytest
import torch

import dsv4
from dsv4.cli import main
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

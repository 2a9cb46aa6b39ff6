"""Small chat data, a BPE tokenizer trained on it and a tiny base checkpoint, for the SFT tests."""
from __future__ import annotations

import json
import os

CALC = {"type": "function", "function": {"name": "calc", "description": "evaluate arithmetic",
                                         "parameters": {"type": "object", "properties": {"expr": {"type": "string"}}}}}

PLAIN = {"messages": [{"role": "system", "content": "You are terse."},
                      {"role": "user", "content": "What is 2 plus 3?"},
                      {"role": "assistant", "content": "5"},
                      {"role": "user", "content": "And 4 plus 4?"},
                      {"role": "assistant", "content": "It is 8."}]}
THINKING = {"thinking": True,
            "messages": [{"role": "user", "content": "What is 7 times 6?"},
                         {"role": "assistant", "reasoning_content": "7 times 6 is 42.", "content": "42"}]}
TOOLS = {"tools": [CALC],
         "messages": [{"role": "user", "content": "Compute 12 times 12."},
                      {"role": "assistant", "content": "Let me compute.",
                       "tool_calls": [{"id": "c1", "type": "function",
                                       "function": {"name": "calc", "arguments": "{\"expr\": \"12*12\"}"}}]},
                      {"role": "tool", "tool_call_id": "c1", "content": "144"},
                      {"role": "assistant", "content": "12 times 12 is 144."}]}
CONVERSATIONS = [PLAIN, THINKING, TOOLS]


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def tokenizer(directory):
    """A byte-level BPE with V4's special tokens, trained on the sample conversations' rendered text."""
    from dsv4.generate.chat import encode_chat
    from dsv4.posttrain.chat_data import with_tools
    from dsv4.train.tokenizer import train_bpe
    texts = [encode_chat(with_tools(c["messages"], c.get("tools")), c.get("thinking", False))
             for c in CONVERSATIONS] * 10
    return train_bpe(texts + ["The quick brown fox jumps over the lazy dog. 0123456789 +-*/=()"] * 10, 1024,
                     directory)


def make_base(directory) -> str:
    """A random tiny base checkpoint with that tokenizer (fp32), as `dsv4 sft --model` reads it."""
    import torch

    import dsv4
    os.makedirs(directory, exist_ok=True)
    tok = tokenizer(directory)
    cfg = dsv4.ModelConfig.preset("tiny").replace(vocab_size=tok.vocab_size)
    dsv4.save_model(dsv4.Transformer(cfg).init_weights(seed=1), directory, dtype=torch.float32)
    return str(directory)

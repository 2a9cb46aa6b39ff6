"""Streaming detokenisation: the pieces concatenate to decoding all tokens at once, whatever the chunking, and
text that encodes to whole characters is never streamed with a character cut in two."""
import random

import pytest

from dsv4.generate.detokenize import StreamDecoder
from dsv4.train.tokenizer import train_bpe

TEXT = ["héllo wörld, naïve café", "你好，世界。日本語のテキスト", "emoji 🙂🚀 and ümlauts",
        "def f(x):\n    return x * 2\n", "Ελληνικά и русский"] * 20


@pytest.fixture(scope="module")
def tok():
    return train_bpe(TEXT, 320)  # byte-level BPE, few merges: most multi-byte characters span several tokens


def _stream(tok, ids, chunks, skip_special=False):
    stream, pieces, p = StreamDecoder(tok, skip_special), [], 0
    for c in chunks:
        pieces.append(stream.push(ids[p:p + c] if c > 1 else ids[p]))
        p += c
    return pieces + [stream.flush()]


def _chunks(g: random.Random, n: int) -> list[int]:
    out = []
    while sum(out) < n:
        out.append(min(g.randint(1, 4), n - sum(out)))
    return out


@pytest.mark.parametrize("seed", range(10))
def test_ids_past_the_tokenizer_decode_to_nothing_and_are_not_held(tok, seed):
    """A random model's ids over a vocabulary 100x the tokenizer's: the pieces still concatenate to the whole
    decode, and the decoder holds only the ids that have tokens (its window does not grow with the others)."""
    g = random.Random(seed)
    assert tok.id_limit == tok.vocab_size and tok.decode([tok.id_limit + 5]) == ""
    ids = [g.randrange(100 * tok.vocab_size) for _ in range(300)]
    for skip in (False, True):
        stream = StreamDecoder(tok, skip)
        pieces = [stream.push(ids[i:i + c]) for i, c in zip(range(0, 300, 3), [3] * 100)] + [stream.flush()]
        assert "".join(pieces) == tok.decode(ids, skip_special=skip)
        assert len(stream.ids) == sum(1 for t in ids if t < tok.vocab_size)


@pytest.mark.parametrize("seed", range(30))
def test_random_tokens_stream_to_the_whole_decode(tok, seed):
    """Random ids: split and invalid UTF-8 sequences, special tokens, pushed one or several at a time."""
    g = random.Random(seed)
    ids = [g.randrange(tok.vocab_size) for _ in range(g.randint(1, 80))]
    for skip in (False, True):
        assert "".join(_stream(tok, ids, _chunks(g, len(ids)), skip)) == tok.decode(ids, skip_special=skip)


@pytest.mark.parametrize("text", ["naïve ğüzel 🙂 ख़ 你好", "🚀🚀 ümlaut\nΑθήνα"])
def test_text_streams_whole_characters(tok, text):
    ids = tok.encode(text)
    assert any(tok.decode(ids[:i]).endswith("\ufffd") for i in range(1, len(ids))), "no character split across tokens"
    pieces = _stream(tok, ids, [1] * len(ids))
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert pieces[-1] == ""          # each character is released as soon as its last token arrives

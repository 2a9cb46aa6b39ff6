"""The data pipeline: corpora (stdlib, files, folders, JSONL, Parquet), the held-out split, tokenization and
the resumable loader."""
from __future__ import annotations

import logging
import os
import sys
import threading

import pytest
import torch

from dsv4.train.data import (Document, TokenLoader, cached_tokens, eval_batches, read_documents, split_documents,
                             stdlib_sources, tokenize_documents)
from dsv4.train.tokenizer import train_bpe


@pytest.fixture(scope="module")
def stdlib():
    return stdlib_sources()


@pytest.fixture(scope="module")
def tok(stdlib):
    return train_bpe([d.text for d in stdlib_sources(200_000)], 512)


def test_stdlib_corpus(stdlib):
    names = [d.name for d in stdlib]
    assert len(stdlib) > 100 and names == sorted(names) and "json/decoder.py" in names
    assert not any("site-packages" in n or "__pycache__" in n or not n.endswith(".py") for n in names)
    assert all(d.text.strip() for d in stdlib)
    assert [(d.name, d.text) for d in stdlib_sources()] == [(d.name, d.text) for d in stdlib]


@pytest.mark.parametrize("max_bytes", [50_000, 1_000_000])
def test_stdlib_max_bytes(stdlib, max_bytes):
    sample = stdlib_sources(max_bytes)
    total = sum(len(d.text.encode()) for d in sample)
    assert 0.9 * max_bytes <= total <= max_bytes
    names = [d.name for d in sample]
    assert names == sorted(names) and set(names) <= {d.name for d in stdlib}
    # spread over the whole library, not just its alphabetically first packages
    assert names[0] < stdlib[len(stdlib) // 4].name and names[-1] > stdlib[2 * len(stdlib) // 3].name


def test_read_text_and_folder(tmp_path, caplog):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.py").write_text("x = 1\n")
    (tmp_path / "sub" / "c.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n')
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: main")
    (tmp_path / "z.md").write_text("last")
    with caplog.at_level(logging.WARNING):
        docs = read_documents(tmp_path)
    assert [(d.name, d.text) for d in docs] == [("a.txt", "hello"), ("sub/b.py", "x = 1\n"), ("sub/c.jsonl:1", "one"),
                                                ("sub/c.jsonl:3", "two"), ("z.md", "last")]
    assert "skipped 2 binary or non-UTF-8 files" in caplog.text
    assert read_documents(tmp_path / "a.txt") == [Document("a.txt", "hello")]
    with pytest.raises(ValueError, match="not UTF-8"):
        read_documents(tmp_path / "latin1.txt")
    with pytest.raises(ValueError, match="no non-empty documents in .*empty.txt"):
        read_documents(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError):
        read_documents(tmp_path / "missing")


@pytest.mark.parametrize("line, error", [("{not json", "bad.jsonl line 2: not valid JSON"),
                                         ('{"content": "x"}', "bad.jsonl line 2: .*string 'text' field"),
                                         ('{"text": 5}', "bad.jsonl line 2: .*string 'text' field"),
                                         ('["text"]', "bad.jsonl line 2: .*string 'text' field")])
def test_jsonl_errors(tmp_path, line, error):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(ValueError, match=error):
        read_documents(tmp_path / "bad.jsonl")


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["first", None, "second"], "n": [1, 2, 3]}), tmp_path / "d.parquet")
    assert read_documents(tmp_path / "d.parquet") == [Document("d.parquet:0", "first"), Document("d.parquet:2", "second")]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "e.parquet")
    with pytest.raises(ValueError, match="no 'text' column .*body"):
        read_documents(tmp_path / "e.parquet")


def test_parquet_without_pyarrow(tmp_path, monkeypatch, capsys):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"d.parquet needs pyarrow.*pip install 'dsv4\[parquet\]'"):
        read_documents(tmp_path / "d.parquet")
    from dsv4.cli import main
    assert main(["train", "--data", str(tmp_path / "d.parquet"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'dsv4[parquet]'" in err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_non_regular_files_are_skipped_not_read(tmp_path, caplog):
    """A FIFO in a data folder would block its reader forever, a broken link end the read; a link to a regular
    file is read."""
    (tmp_path / "a.txt").write_text("hello")
    os.mkfifo(tmp_path / "pipe.txt")
    os.symlink(tmp_path / "a.txt", tmp_path / "link.txt")
    os.symlink(tmp_path / "gone.txt", tmp_path / "z_broken.txt")
    result = {}

    def read():
        try:
            result["docs"] = read_documents(tmp_path)
        except Exception as e:
            result["error"] = e
    with caplog.at_level(logging.WARNING):
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout=20)
    if reader.is_alive():  # blocked opening the FIFO: a writer's open releases it, then the test fails
        os.close(os.open(tmp_path / "pipe.txt", os.O_WRONLY | os.O_NONBLOCK))
        reader.join(timeout=20)
        pytest.fail("read_documents blocked on a FIFO")
    assert "error" not in result, result
    assert [(d.name, d.text) for d in result["docs"]] == [("a.txt", "hello"), ("link.txt", "hello")]
    assert "skipped 2 entries that are not regular files" in caplog.text and "pipe.txt" in caplog.text
    with pytest.raises(ValueError, match="pipe.txt is neither a regular file nor a folder"):
        read_documents(tmp_path / "pipe.txt")


def test_split():
    docs = [Document(f"doc{i}", f"text {i}") for i in range(400)]
    train, val = split_documents(docs, 0.1, seed=0)
    assert 20 <= len(val) <= 60 and len(train) + len(val) == 400
    assert {d.name for d in train}.isdisjoint(d.name for d in val)
    assert split_documents(docs, 0.1, seed=0) == (train, val)
    assert split_documents(docs, 0.1, seed=1)[1] != val
    # adding documents leaves every old one on its side
    train2, val2 = split_documents(docs + [Document(f"new{i}", "x") for i in range(50)], 0.1)
    assert [d for d in train2 if d.name.startswith("doc")] == train
    assert [d for d in val2 if d.name.startswith("doc")] == val
    # two documents: one each side
    train, val = split_documents(docs[:2], 0.05)
    assert len(train) == len(val) == 1
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(docs, 1.0)


def test_split_single_document():
    train, val = split_documents([Document("big", "abcdefghij" * 10)], 0.1)
    assert train == [Document("big[train]", "abcdefghij" * 9)] and val == [Document("big[val]", "abcdefghij")]
    with pytest.raises(ValueError, match="too short"):
        split_documents([Document("tiny", "a")])


def test_tokenize_round_trip(stdlib, tok, tmp_path):
    docs = stdlib[:5] + [Document("unicode", "héllo wörld ✓ 你好")]
    stream = tokenize_documents(docs, tok)
    assert stream.dtype == torch.int32 and stream.dim() == 1 and stream[-1] == tok.eos_id
    ends = (stream == tok.eos_id).nonzero().flatten().tolist()
    assert len(ends) == len(docs)
    starts = [0] + [e + 1 for e in ends[:-1]]
    assert [tok.decode(stream[s:e].tolist()) for s, e in zip(starts, ends)] == [d.text for d in docs]

    cached = cached_tokens(docs, tok, tmp_path / "cache")
    assert torch.equal(cached, stream) and len(list((tmp_path / "cache").iterdir())) == 1
    assert torch.equal(cached_tokens(docs, tok, tmp_path / "cache"), stream)        # loaded, not re-tokenized
    cached_tokens(docs[:-1] + [Document("unicode", "changed")], tok, tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 2                           # new key for new data
    assert torch.equal(cached_tokens(docs, tok, None), stream)


def test_loader_batches():
    stream = torch.arange(1000, dtype=torch.int32)
    loader = TokenLoader(stream, batch_size=4, seq_len=16, extra=2, seed=3)
    b = loader.batch(7)
    assert b.shape == (4, 18) and b.dtype == torch.int64
    assert torch.equal(b, TokenLoader(stream, 4, 16, 2, seed=3).batch(7))           # pure function of the step
    assert not torch.equal(b, loader.batch(8)) and not torch.equal(b, TokenLoader(stream, 4, 16, 2, seed=4).batch(7))
    for step in range(20):
        for row in loader.batch(step):                                             # contiguous slices
            assert torch.equal(row, stream[row[0]:row[0] + 18].long())
    assert TokenLoader(stream[:18], 2, 16, 2).batch(0).tolist() == [list(range(18))] * 2
    with pytest.raises(ValueError, match="17 tokens, fewer than one window of seq_len \\+ extra = 18"):
        TokenLoader(stream[:17], 2, 16, 2)
    with pytest.raises(ValueError, match="1-D integer"):
        TokenLoader(stream.float(), 2, 16)


def test_loader_state():
    stream = torch.arange(1000, dtype=torch.int32)
    state = TokenLoader(stream, 4, 16, seed=5).state_dict()
    assert state == {"seed": 5, "batch_size": 4, "seq_len": 16, "extra": 1, "n_tokens": 1000}
    resumed = TokenLoader(stream, 4, 16, seed=0)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.batch(11), TokenLoader(stream, 4, 16, seed=5).batch(11))
    with pytest.raises(ValueError, match="n_tokens: saved 1000, now 999"):
        TokenLoader(stream[:999], 4, 16).load_state_dict(state)
    with pytest.raises(ValueError, match="seq_len: saved 16, now 32"):
        TokenLoader(stream, 4, 32).load_state_dict(state)


def test_eval_batches():
    stream = torch.arange(100, dtype=torch.int32)
    batches = eval_batches(stream, batch_size=2, seq_len=10, extra=1)
    assert len(batches) == 4 and all(b.shape == (2, 11) and b.dtype == torch.int64 for b in batches)
    rows = torch.cat(batches)
    assert all(torch.equal(r, torch.arange(10 * i, 10 * i + 11)) for i, r in enumerate(rows))
    assert all(torch.equal(a, b) for a, b in zip(batches, eval_batches(stream, 2, 10, 1)))
    assert len(eval_batches(stream, 2, 10, 1, max_batches=3)) == 3
    assert [b.shape for b in eval_batches(stream[:25], 4, 10, 1)] == [(2, 11)]     # fewer windows than a batch
    with pytest.raises(ValueError, match="fewer than one window"):
        eval_batches(stream[:10], 2, 10, 1)

"""`dsv4 serve` on the command line: a missing serving package and bad values end in one line."""
import sys

import pytest

from dsv4.cli import main


def test_missing_serving_packages_say_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastapi", None)   # import fastapi now raises ImportError
    assert main(["serve", "--checkpoint", "nowhere"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'dsv4[serve]'" in err and "fastapi" in err


@pytest.mark.parametrize("flag", [["--port", "0"], ["--max-batch", "0"], ["--max-seq-len", "-1"],
                                  ["--num-draft", "0"]])
def test_bad_values_are_one_line(flag, capsys):
    pytest.importorskip("fastapi")
    assert main(["serve", "--checkpoint", "nowhere", *flag]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag[0] in err


@pytest.fixture
def checkpoint(tmp_path):
    import torch

    import dsv4
    from dsv4.train.tokenizer import train_bpe

    tok = train_bpe(["Hello there, how are you?\n", "Paris is the capital of France.\n"] * 20, 300, tmp_path)
    cfg = dsv4.ModelConfig.preset("tiny").replace(vocab_size=tok.vocab_size)
    dsv4.save_model(dsv4.Transformer(cfg).init_weights(seed=1), tmp_path, dtype=torch.float32)
    return tmp_path


def test_serve_builds_engine_and_app_from_flags(checkpoint, monkeypatch):
    """The flags reach the engine and the app (uvicorn.run replaced by a request through the app)."""
    pytest.importorskip("fastapi")
    uvicorn = pytest.importorskip("uvicorn")
    from fastapi.testclient import TestClient

    seen = {}

    def fake_run(app, host, port, **_):
        seen.update(host=host, port=port)
        engine = app.state.server.engine
        seen.update(max_batch=engine.max_batch, max_seq_len=engine.max_seq_len)
        with TestClient(app) as http:
            seen["models"] = http.get("/v1/models").json()["data"][0]["id"]
            seen["completion"] = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3}).json()

    monkeypatch.setattr(uvicorn, "run", fake_run)
    assert main(["serve", "--checkpoint", str(checkpoint), "--device", "cpu", "--port", "8123", "--max-batch", "3",
                 "--max-seq-len", "96"]) == 0
    assert (seen["host"], seen["port"], seen["max_batch"], seen["max_seq_len"]) == ("127.0.0.1", 8123, 3, 96)
    assert seen["models"] == checkpoint.name and seen["completion"]["usage"]["completion_tokens"] >= 1


def test_serve_trace_flag_writes_a_step_per_line(checkpoint, monkeypatch, tmp_path):
    """--trace FILE: the engine's steps of a completion are on disk once the server stops; --overlap off reaches the
    engine (the trace's header says so)."""
    pytest.importorskip("fastapi")
    uvicorn = pytest.importorskip("uvicorn")
    import json

    from fastapi.testclient import TestClient

    seen = {}

    def fake_run(app, host, port, **_):
        with TestClient(app) as http:
            seen["usage"] = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3}).json()["usage"]
        seen["steps"] = app.state.server.engine.stats()["steps"]

    monkeypatch.setattr(uvicorn, "run", fake_run)
    trace = tmp_path / "steps.jsonl"
    assert main(["serve", "--checkpoint", str(checkpoint), "--device", "cpu", "--max-batch", "2", "--max-seq-len",
                 "96", "--overlap", "off", "--trace", str(trace)]) == 0
    lines = [json.loads(x) for x in trace.read_text().splitlines()]
    assert lines[0]["header"]["overlap"] is False and len(lines) == 1 + seen["steps"]
    assert sum(x["emitted"] for x in lines[1:]) == seen["usage"]["completion_tokens"]
    assert sum(x["prefill_tokens"] for x in lines[1:]) == seen["usage"]["prompt_tokens"]


def test_serve_speculative_flags_reach_the_engine(checkpoint, monkeypatch):
    """--speculative mtp --num-draft K: the engine drafts K tokens per step with the checkpoint's MTP block, and its
    greedy completion is the plain server's."""
    pytest.importorskip("fastapi")
    uvicorn = pytest.importorskip("uvicorn")
    from fastapi.testclient import TestClient

    seen = []

    def fake_run(app, host, port, **_):
        engine = app.state.server.engine
        with TestClient(app) as http:
            r = http.post("/v1/completions", json={"prompt": "Paris is", "max_tokens": 6, "temperature": 0}).json()
        spec = engine.spec
        seen.append((engine.speculative, spec.n_draft if spec else None, engine.stats()["spec_drafted"],
                     r["choices"][0]["text"]))

    monkeypatch.setattr(uvicorn, "run", fake_run)
    base = ["serve", "--checkpoint", str(checkpoint), "--device", "cpu", "--max-seq-len", "96", "--no-prefix-cache"]
    assert main(base + ["--speculative", "mtp", "--num-draft", "2"]) == 0
    assert main(base) == 0
    (mode, k, drafted, text), plain = seen
    assert (mode, k, plain[:3]) == ("mtp", 2, (None, None, 0)) and drafted > 0 and text == plain[3]


def test_serve_prefix_cache_flags_reuse_a_repeated_prompt(checkpoint, monkeypatch):
    """With the host tier on, a repeated prompt reuses its cached prefix (usage.prompt_tokens_details) and answers
    as the cold request did; --no-prefix-cache turns reuse off."""
    pytest.importorskip("fastapi")
    uvicorn = pytest.importorskip("uvicorn")
    from fastapi.testclient import TestClient

    answers = []

    def fake_run(app, host, port, **_):
        with TestClient(app) as http:
            for _ in range(2):
                r = http.post("/v1/completions", json={"prompt": "Paris is the capital of", "max_tokens": 4,
                                                       "temperature": 0}).json()
                answers.append((r["choices"][0]["text"], r["usage"]["prompt_tokens_details"]["cached_tokens"]))

    monkeypatch.setattr(uvicorn, "run", fake_run)
    base = ["serve", "--checkpoint", str(checkpoint), "--device", "cpu", "--max-seq-len", "96"]
    assert main(base + ["--prefix-host-gb", "0.1", "--prefix-block", "4"]) == 0
    (cold, cold_cached), (warm, warm_cached) = answers
    assert cold_cached == 0 and warm_cached > 0 and warm == cold
    answers.clear()
    assert main(base + ["--no-prefix-cache"]) == 0
    assert [c for _, c in answers] == [0, 0] and answers[1][0] == cold


def test_serve_refuses_negative_cache_size(checkpoint, capsys):
    pytest.importorskip("fastapi")
    assert main(["serve", "--checkpoint", str(checkpoint), "--device", "cpu", "--prefix-host-gb", "-1"]) == 2
    assert "--prefix-host-gb" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_command_answers_then_stops(checkpoint):
    """`dsv4 serve` in its own process: a checkpoint on disk, /health, one completion, then SIGINT ends it."""
    import signal
    import socket
    import subprocess
    import time

    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    tmp_path = checkpoint
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dsv4", "serve", "--checkpoint", str(tmp_path), "--device", "cpu",
                             "--port", str(port), "--max-batch", "2", "--max-seq-len", "128", "--model-name", "t"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
            time.sleep(0.2)
        r = httpx.post(url + "/v1/completions", json={"model": "t", "prompt": "Hello", "max_tokens": 4}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, 130, -signal.SIGINT)

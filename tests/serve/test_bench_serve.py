"""bench/serve.py: its statistics on synthetic timings, its launch commands, a peer that lacks endpoints, and
one measured level against the real engine (the `--tiny-cpu` smoke as a subprocess run is marked slow)."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_serve", os.path.join(BENCH, "serve.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_serve"] = mod        # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_percentile_interpolates_between_order_statistics(bench):
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert bench.percentile(xs, 50) == 3.0
    assert bench.percentile(xs, 0) == 1.0 and bench.percentile(xs, 100) == 5.0
    assert bench.percentile(xs, 99) == pytest.approx(4.96)
    assert bench.percentile(xs, 25) == 2.0 and bench.percentile([7.0], 99) == 7.0
    assert bench.percentile([], 50) is None
    with pytest.raises(ValueError, match="p=101"):
        bench.percentile(xs, 101)


def test_summary_of_synthetic_requests(bench):
    R = bench.RequestResult
    # TTFT 0.1 s, 5 tokens over 0.4 s after the first: TPOT 0.1 s; TTFT 0.3 s, 3 tokens in 0.1 s: TPOT 0.05 s
    a = R(start=0.0, chunk_times=[0.1, 0.2, 0.3, 0.4, 0.5], completion_tokens=5, got_usage=True)
    b = R(start=1.0, chunk_times=[1.3, 1.35, 1.4], completion_tokens=3, got_usage=True)
    bad = R(start=0.0, error="APIStatusError: 404")
    s = bench.summarize([a, b, bad], wall_s=2.0, max_tokens=5)
    assert (s["requests"], s["ok"], s["errors"]) == (3, 2, 1)
    assert s["error_messages"] == {"APIStatusError: 404": 1}
    assert s["ttft_p50_ms"] == pytest.approx(200.0) and s["ttft_p99_ms"] == pytest.approx(298.0)
    assert s["tpot_p50_ms"] == pytest.approx(75.0)
    assert s["itl_p50_ms"] == pytest.approx(100.0)          # gaps 0.1 x4 and 0.05 x2
    assert s["output_tokens"] == 8 and s["output_tok_per_s"] == pytest.approx(4.0)
    assert s["short_outputs"] == 1 and s["no_usage"] == 0   # b stopped at 3 of 5 tokens
    one_token = R(start=0.0, chunk_times=[0.1], completion_tokens=1)
    assert one_token.tpot is None and one_token.ttft == pytest.approx(0.1)
    # sent 0.04 s after the call (the client's encoding): TTFT counts from the send, the rest is client_prep
    sent = R(start=0.0, sent=0.04, chunk_times=[0.1], completion_tokens=1)
    assert sent.ttft == pytest.approx(0.06) and sent.client_prep == pytest.approx(0.04)
    assert one_token.client_prep is None
    assert bench.summarize([sent, a], wall_s=1.0)["client_prep_p50_ms"] == pytest.approx(40.0)


def test_metrics_text_and_acceptance_delta(bench):
    text = ("# HELP dsv4_spec_drafted_tokens_total x\n# TYPE dsv4_spec_drafted_tokens_total counter\n"
            "dsv4_spec_drafted_tokens_total 120.0\ndsv4_spec_accepted_tokens_total 90.0\n"
            'dsv4_requests_finished_total{finish_reason="length"} 3.0\n')
    m = bench.parse_metrics(text)
    assert m["dsv4_spec_drafted_tokens_total"] == 120.0
    assert m['dsv4_requests_finished_total{finish_reason="length"}'] == 3.0
    before = {"dsv4_spec_drafted_tokens_total": 20.0, "dsv4_spec_accepted_tokens_total": 10.0}
    assert bench.spec_acceptance(before, m) == 0.8
    assert bench.spec_acceptance(None, {}) is None and bench.spec_acceptance(None, None) is None


def test_launch_command_gets_local_host_and_port(bench):
    s = bench.Server("x", launch="dsv4 serve --checkpoint 'my ckpt'")
    argv = s.command(8123)
    assert argv[1:4] == ["-m", "dsv4", "serve"] and "my ckpt" in argv
    assert argv[-4:] == ["--port", "8123", "--host", "127.0.0.1"]
    peer = bench.Server("p", launch="transformers serve --port={port} --host 127.0.0.1")
    assert peer.command(9000) == ["transformers", "serve", "--port=9000", "--host", "127.0.0.1"]


def test_vocab_from_the_launched_checkpoint(bench, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 1234}))
    assert bench.vocab_from_launch(f"dsv4 serve --checkpoint {tmp_path}") == 1234
    assert bench.vocab_from_launch("dsv4 serve --checkpoint /nowhere") is None and bench.vocab_from_launch(None) is None


def _args(bench, **kw):
    a = bench.parse_args(["--url", "http://x", "--concurrency", "1", "2", "--prompt-len", "8", "--max-tokens", "3",
                          "--requests-per-level", "2", "--prefix-len", "16", "--suffix-len", "4",
                          "--prefix-trials", "1", "--request-timeout", "30"])
    vars(a).update(kw)
    return a


def test_a_peer_without_the_endpoints_is_reported_not_fatal(bench):
    """A server with only /health: the probe names what it could not do, every request is an error, no crash."""
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    from fastapi import FastAPI
    from http_server import ServerThread

    app = FastAPI()
    app.get("/health")(lambda: {"status": "ok"})
    thread = ServerThread(app).start()
    try:
        server = bench.Server("peer", url=thread.url)
        server.start()
        out = asyncio.run(bench.measure_server(server, _args(bench), vocab=100))
    finally:
        thread.stop()
    assert out["capabilities"]["GET /health"] == "ok"
    assert out["capabilities"]["POST /v1/completions (token ids)"].startswith("HTTP 404")
    assert [lvl["errors"] for lvl in out["levels"]] == [2, 2] and out["prefix"]["errors"] == 4
    assert "could not: POST /v1/completions" in bench.table({"servers": [out]})


def test_one_level_against_the_real_engine(bench, tmp_path):
    """Exact output lengths (ignore_eos), usage counted, prefix test answered, on the tiny model in-process."""
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    from dsv4.checkpoint import load_model
    from dsv4.generate import Tokenizer
    from dsv4.serve.api import build_app
    from dsv4.serve.engine import Engine
    from http_server import ServerThread

    vocab = bench.make_tiny_checkpoint(str(tmp_path))
    model = load_model(str(tmp_path), device="cpu")
    tok = Tokenizer.from_dir(str(tmp_path))
    engine = Engine(model, tok, max_batch=2, max_seq_len=64, cuda_graphs=False).start()
    thread = ServerThread(build_app(engine, tok, "tiny")).start()
    try:
        server = bench.Server("dsv4", url=thread.url)
        server.start()
        out = asyncio.run(bench.measure_server(server, _args(bench), vocab=vocab))
    finally:
        thread.stop()
        engine.stop()
    assert server.model == "tiny"
    assert all(v == "ok" for v in out["capabilities"].values()), out["capabilities"]
    for lvl in out["levels"]:
        assert (lvl["ok"], lvl["errors"], lvl["short_outputs"], lvl["no_usage"]) == (2, 0, 0, 0)
        assert lvl["output_tokens"] == 6 and lvl["ttft_p50_ms"] > 0 and lvl["tpot_p50_ms"] > 0
        assert lvl["client_prep_p50_ms"] > 0   # make_client's hook saw every send
    assert out["prefix"]["errors"] == 0 and out["prefix"]["miss_over_hit"] is not None
    assert out["prefix"]["miss_cached_tokens"] == [0]        # usage.prompt_tokens_details read
    assert out["prefix"]["repeat_ttft_p50_ms"] > 0 and out["prefix"]["repeat_cached_tokens"] == [0]   # (no cache)
    assert out["prefix"]["client_prep_p50_ms"] > 0


@pytest.mark.slow
def test_tiny_cpu_smoke_end_to_end(bench, tmp_path):
    """`bench/serve.py --tiny-cpu`: launches `dsv4 serve` as a subprocess, measures, writes the JSON, stops it."""
    out = tmp_path / "r.json"
    rc = bench.main(["--tiny-cpu", "--concurrency", "1", "--prompt-len", "16", "--requests-per-level", "2",
                     "--prefix-len", "32", "--json", str(out)])
    res = json.loads(out.read_text())
    assert rc == 0 and res["servers"][0]["levels"][0]["ok"] == 2 and res["device"] == "cpu"


def test_cli_needs_a_server(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args([])
    assert "--url, --launch or --tiny-cpu" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--url", "http://x", "--mtp-compare"])
    tiny = bench.parse_args(["--tiny-cpu", "--max-tokens", "5"])
    assert tiny.max_tokens == 5 and tiny.prompt_len == bench.TINY_DEFAULTS["prompt_len"]


def test_a_peer_taking_only_text_prompts_gets_text_and_no_ignore_eos(bench):
    """Like `transformers serve`: string prompts only, unknown fields refused (422), usage on the last chunk."""
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    from fastapi import Body, FastAPI, HTTPException
    from fastapi.responses import StreamingResponse
    from http_server import ServerThread

    app = FastAPI()
    app.get("/health")(lambda: {"status": "ok"})
    app.get("/v1/models")(lambda: {"object": "list", "data": [{"id": "peer-model", "object": "model"}]})
    seen = []

    @app.post("/v1/completions")
    async def completions(body: dict = Body(...)):   # noqa: B008 - FastAPI's way to take the raw JSON body
        if "ignore_eos" in body:
            raise HTTPException(422, "Unexpected fields in the request: {'ignore_eos'}")
        if not isinstance(body["prompt"], str):
            raise HTTPException(400, "prompt must be a string.")
        seen.append(body["prompt"])
        n = len(body["prompt"].split())
        head = {"id": "c", "object": "text_completion", "created": 0, "model": body["model"]}
        usage = {"prompt_tokens": n, "completion_tokens": 2, "total_tokens": n + 2}
        if not body.get("stream"):
            return {**head, "choices": [{"index": 0, "text": "a b", "finish_reason": "length"}], "usage": usage}

        def events():
            for t in ("a", " b"):
                yield f"data: {json.dumps({**head, 'choices': [{'index': 0, 'text': t, 'finish_reason': None}]})}\n\n"
            last = {**head, "choices": [{"index": 0, "text": "", "finish_reason": "length"}], "usage": usage}
            yield f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    thread = ServerThread(app).start()
    try:
        server = bench.Server("peer", url=thread.url)
        server.start()
        out = asyncio.run(bench.measure_server(server, _args(bench, max_tokens=2), vocab=100))
    finally:
        thread.stop()
    assert server.model == "peer-model"
    assert out["prompt_format"] == "text" and out["ignore_eos_sent"] is False
    assert out["capabilities"][bench.PROBE_IDS].startswith("HTTP 400")
    assert [(lvl["ok"], lvl["errors"], lvl["mean_prompt_tokens"]) for lvl in out["levels"]] == [(2, 0, 8.0)] * 2
    assert out["prefix"]["errors"] == 0 and len(seen[-1].split()) == 20   # prefix 16 + suffix 4 words
    assert "text prompts" in bench.table({"servers": [out]})


def test_prompt_text_windows_are_slices_of_the_tokenized_text(bench, tmp_path):
    """--prompt-text: each prompt is a window of the text's tokens (ids or decoded text), too short a text is named."""
    pytest.importorskip("tokenizers")
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ")}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    (tmp_path / "tokenizer.json").write_text(tok.to_str())
    text = "the quick brown fox jumps over the lazy dog " * 3
    (tmp_path / "text.txt").write_text(text)
    args = bench.parse_args(["--url", "http://127.0.0.1:1", "--prompt-text", str(tmp_path / "text.txt"),
                             "--tokenizer", str(tmp_path)])
    ids = tok.encode(text).ids
    for as_text in (False, True):
        source = bench.prompt_source(args, len(vocab), as_text)
        for seed in range(5):
            p = source.make(random.Random(seed), 20)
            if as_text:
                assert len(p) == 20 and p in text
            else:
                assert len(p) == 20 and any(ids[i:i + 20] == p for i in range(len(ids) - 19))
    with pytest.raises(ValueError, match="fewer than"):
        bench.prompt_source(args, len(vocab), False).make(random.Random(0), len(ids) + 1)


def test_mtp_outputs_compared_request_by_request(bench):
    same = bench.compare_texts(["abc", "xyz"], ["abc", "xyz"])
    assert same == {"requests": 2, "equal": 2, "first_difference_char": {}}
    diff = bench.compare_texts(["abcdef", "xyz", "ab"], ["abcXef", "xyz", "abc"])
    assert diff["equal"] == 1 and diff["first_difference_char"] == {0: 3, 2: 2}
    assert bench.compare_texts(None, ["a"]) is None

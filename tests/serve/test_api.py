"""`dsv4 serve`'s app on the real engine and a tiny model, driven by the official `openai` client over HTTP:
completions, chat, streaming, n>1, logprobs, stop strings, tools, bad input and hang-ups."""
from __future__ import annotations

import asyncio
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
torch = pytest.importorskip("torch")

from http_server import ServerThread  # noqa: E402

import dsv4  # noqa: E402
from dsv4.serve.api import build_app  # noqa: E402
from dsv4.serve.engine import Engine  # noqa: E402
from dsv4.train.tokenizer import train_bpe  # noqa: E402

TEXT = ["Hello there, how are you?\n", "I am fine, thank you. What is the capital of France?\n",
        "Paris is the capital of France.\n", "def f(x):\n    return x * 2\n"] * 30
USER = [{"role": "user", "content": "What is the capital of France?"}]
MODEL = "tiny"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tok = train_bpe(TEXT, 400, tmp_path_factory.mktemp("tok"))
    cfg = dsv4.ModelConfig.preset("tiny").replace(vocab_size=tok.vocab_size)
    model = dsv4.Transformer(cfg).init_weights(seed=4).eval()
    engine = Engine(model, tok, max_batch=8, max_seq_len=1536, max_queue=64, cuda_graphs=False).start()
    server = ServerThread(build_app(engine, tok, MODEL)).start()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    yield {"tok": tok, "model": model, "engine": engine, "server": server, "client": client}
    server.stop()
    engine.stop()


def idle(engine, timeout=10.0) -> dict:
    """engine.stats() once nothing runs or waits (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        s = engine.stats()
        if (s["running"] == 0 and s["queue_len"] == 0) or time.monotonic() > deadline:
            return s
        time.sleep(0.02)


def greedy_ids(env, prompt_ids: list[int], n: int) -> list[int]:
    """The model's greedy continuation, without the server or the engine."""
    out = dsv4.generate(env["model"], [prompt_ids], n, stop_tokens=[env["tok"].eos_id])[0]
    return [t for t in out if t != env["tok"].eos_id]


def test_completion_matches_generate_and_stream(env):
    c, tok = env["client"], env["tok"]
    prompt = "Hello there, how"
    r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == tok.decode(greedy_ids(env, tok.encode(prompt), 12), skip_special=True)
    assert r.usage.prompt_tokens == len(tok.encode(prompt)) and r.usage.total_tokens == r.usage.prompt_tokens + \
        r.usage.completion_tokens
    by_ids = c.completions.create(model=MODEL, prompt=tok.encode(prompt), max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text
    chunks = list(c.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_concurrent_greedy_streams_equal_alone(env):
    c = env["client"]
    prompts = ["Hello there", "Paris is", "def f(x):", "I am fine"]
    alone = {p: c.completions.create(model=MODEL, prompt=p, max_tokens=10, temperature=0).choices[0].text
             for p in prompts}

    async def main():
        ac = openai.AsyncOpenAI(base_url=env["server"].url + "/v1", api_key="x", max_retries=0, timeout=60)

        async def one(p):
            stream = await ac.completions.create(model=MODEL, prompt=p, max_tokens=10, temperature=0, stream=True)
            return p, "".join([ch.choices[0].text async for ch in stream])
        out = await asyncio.gather(*(one(p) for p in prompts * 2))
        await ac.close()
        return out

    for p, text in asyncio.run(main()):
        assert text == alone[p], p


def test_chat_stream_equals_plain_and_thinking(env):
    c = env["client"]
    for extra in ({}, {"chat_template_kwargs": {"thinking": True}}):
        r = c.chat.completions.create(model=MODEL, messages=USER, max_tokens=16, temperature=0, extra_body=extra)
        msg = r.choices[0].message
        chunks = list(c.chat.completions.create(model=MODEL, messages=USER, max_tokens=16, temperature=0,
                                                stream=True, stream_options={"include_usage": True},
                                                extra_body=extra))
        deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
        assert deltas[0].role == "assistant"
        assert "".join(d.content or "" for d in deltas) == (msg.content or "")
        reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
        assert reasoning == (msg.model_extra or {}).get("reasoning_content", "")
        assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
        assert r.usage.prompt_tokens_details.cached_tokens >= 0


def test_chat_with_tools_is_served(env):
    tools = [{"type": "function", "function": {"name": "lookup", "description": "find a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"q": {"type": "string"}}}}}]
    r = env["client"].chat.completions.create(model=MODEL, messages=USER, tools=tools, max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert r.usage.prompt_tokens > 500   # the tool schemas went into the system prompt


def test_n_seeds_logprobs(env):
    c = env["client"]
    a = c.completions.create(model=MODEL, prompt="Hello", max_tokens=8, n=3, seed=11, temperature=1.0, logprobs=2)
    b = c.completions.create(model=MODEL, prompt="Hello", max_tokens=8, n=3, seed=11, temperature=1.0)
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]   # seed + i per choice: reproducible
    solo = c.completions.create(model=MODEL, prompt="Hello", max_tokens=8, seed=12, temperature=1.0)
    assert solo.choices[0].text == a.choices[1].text
    lp = a.choices[0].logprobs
    assert sum(len(ch.logprobs.token_logprobs) for ch in a.choices) == a.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) <= 8 and all(v <= 0 for v in lp.token_logprobs)
    # keyed by token text: two tokens that decode alike (a split UTF-8 character) share one key
    assert all(1 <= len(t) <= 2 for t in lp.top_logprobs)
    r = c.chat.completions.create(model=MODEL, messages=USER, max_tokens=6, temperature=0, logprobs=True,
                                  top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens and all(len(e.top_logprobs) == 3 for e in entries)
    assert all(e.top_logprobs[0].logprob >= e.logprob - 1e-5 for e in entries)   # greedy: the chosen is the top


def test_stop_string_cuts_text(env):
    c = env["client"]
    full = c.completions.create(model=MODEL, prompt="Hello there", max_tokens=24, temperature=0).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    if len(stop) < 2:
        pytest.skip("the greedy text is too short to cut")
    for stream in (False, True):
        if stream:
            chunks = list(c.completions.create(model=MODEL, prompt="Hello there", max_tokens=24, temperature=0,
                                               stop=[stop], stream=True))
            text, finish = "".join(ch.choices[0].text for ch in chunks), chunks[-1].choices[0].finish_reason
        else:
            r = c.completions.create(model=MODEL, prompt="Hello there", max_tokens=24, temperature=0, stop=[stop])
            text, finish = r.choices[0].text, r.choices[0].finish_reason
        assert text == full[:full.index(stop)] and finish == "stop"
    assert idle(env["engine"])["running"] == 0


def test_bad_input(env):
    c = env["client"]
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="Hi")
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt="Hi", max_tokens=1536)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=MODEL, prompt=[10**9], max_tokens=2)   # not a token id of this model
    for ids, message in (([5, 2**70], "prompt[1]=1180591620717411303424"), ([5, -1], "token ids must be >= 0")):
        with pytest.raises(openai.BadRequestError) as e:   # (beyond int64: the engine names it)
            c.completions.create(model=MODEL, prompt="", max_tokens=2, extra_body={"prompt": ids})
        assert message in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=MODEL, messages=USER, extra_body={"top_k": -1})
    r = httpx.post(env["server"].url + "/v1/chat/completions", content=b'{"messages": [',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert c.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices   # still serving


def test_hangups_leave_no_running_request(env):
    engine = env["engine"]

    async def hang_up(i):
        async with httpx.AsyncClient(base_url=env["server"].url, timeout=30) as http:
            body = {"prompt": "Hello there", "max_tokens": 400, "stream": True, "temperature": 1.0,
                    "ignore_eos": True}
            async with http.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        break

    async def main():
        await asyncio.gather(*(hang_up(i) for i in range(12)))

    asyncio.run(main())
    s = idle(engine, timeout=10)
    assert s["running"] == 0 and s["queue_len"] == 0
    assert s["requests_cancelled"] >= 12


def test_metrics(env):
    text = httpx.get(env["server"].url + "/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["dsv4_decode_tokens_total"] > 0 and values["dsv4_prefill_tokens_total"] > 0
    assert values["dsv4_running_requests"] == 0
    assert values['dsv4_requests_finished_total{finish_reason="stop"}'] >= 1

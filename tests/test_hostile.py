"""Hostile input against a live `dsv4 serve` (issue 9): no request crashes the server.

One real server process per module (uvicorn on 127.0.0.1, an ephemeral port, an API key) on the
selftest's tiny converted model (vocab 273: ids 0-16 special, 17-272 bytes). A bounded list of
malformed requests (token ids, types, sizes, encodings, roles, tools, sampling values, JSON syntax,
content types, methods, paths, nulls, credentials) must each get a 4xx in OpenAI's error shape; a
list of odd but valid ones must be served. Afterwards the process is alive, serves a normal
request, and its log holds no traceback.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

KEY, MODEL_ID, CONTEXT, VOCAB = "hostile-key", "dsv4-hostile", 1024, 273
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
HI = [{"role": "user", "content": "hi"}]
OFF = {"type": "disabled"}
SPECIALS = {str(i): -100 for i in range(17)}  # only byte tokens: no EOS, stop or marker token


class Live:
    def __init__(self, proc: subprocess.Popen, log: Path, url: str):
        self.proc, self.log, self.url = proc, log, url
        self.client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"},
                                   timeout=60, trust_env=False)
        self.bare = httpx.Client(base_url=url, timeout=60, trust_env=False)

    def alive(self) -> bool:
        return self.proc.poll() is None


def start_server(model: Path, log: Path, *options: str) -> tuple[subprocess.Popen, str | None]:
    """`dsv4 serve` in a subprocess; (process, base URL once uvicorn says it runs, else None).
    `options` are added to the command line (a repeated option overrides the one here)."""
    cmd = [sys.executable, "-m", "mlx_dsv4.cli", "serve", str(model), "--port", "0",
           "--max-context", str(CONTEXT), "--model-id", MODEL_ID, "--api-key", KEY, *options]
    with log.open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if m := re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", log.read_text(errors="replace")):
            return proc, m[1]
        time.sleep(0.05)
    return proc, None


def stop_server(proc: subprocess.Popen):
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def live(selftest_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("hostile") / "server.log"
    proc, url = start_server(selftest_model, log)
    assert url, f"the server did not start:\n{log.read_text(errors='replace')}"
    server = Live(proc, log, url)
    yield server
    server.client.close()
    server.bare.close()
    stop_server(proc)


def assert_error(r: httpx.Response, status: int | None = None) -> dict:
    """A 4xx (or `status`) whose body is exactly OpenAI's error shape; returns the error."""
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert status is None or r.status_code == status, (r.status_code, r.text[:300])
    body = r.json()
    assert list(body) == ["error"], body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"].strip(), error
    assert error["type"] in ("invalid_request_error", "rate_limit_error"), error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
    return error


def assert_served(r: httpx.Response):
    assert r.status_code == 200, (r.status_code, r.text[:300])
    body = r.json()
    assert body["model"] == MODEL_ID and body["choices"] and body["usage"]["completion_tokens"] >= 0


# ----- the requests -----------------------------------------------------------------------------

def chat(**fields) -> dict:
    body = {"messages": HI, "max_tokens": 2, "thinking": OFF, **fields}
    return {"method": "POST", "url": CHAT, "json": {k: v for k, v in body.items() if v is not DROP}}


def completion(**fields) -> dict:
    body = {"prompt": "hi", "max_tokens": 2, **fields}
    return {"method": "POST", "url": COMPLETIONS, "json": {k: v for k, v in body.items() if v is not DROP}}


def raw(body: bytes | str, url: str = CHAT, method: str = "POST", **headers) -> dict:
    content = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    return {"method": method, "url": url, "content": content, "headers": headers}


def user(content) -> dict:
    return chat(messages=[{"role": "user", "content": content}])


DROP = object()
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
BASE = b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":2,"thinking":{"type":"disabled"}'

# (id, request, expected param or ... for any); each must be a 4xx in the error shape.
MALFORMED = [
    # token ids
    ("ids-huge", completion(prompt=[999999, 5]), "prompt"),
    ("ids-vocab", completion(prompt=[VOCAB]), "prompt"),
    ("ids-negative", completion(prompt=[-1]), "prompt"),
    ("ids-2**40", completion(prompt=[2**40]), "prompt"),
    ("ids-2**63", completion(prompt=[5, 2**63]), "prompt"),
    ("ids-nested", completion(prompt=[[5, VOCAB]]), "prompt"),
    ("ids-float", completion(prompt=[1.5]), "prompt[0]"),
    ("ids-bool", completion(prompt=[True]), "prompt[0]"),
    ("ids-mixed", completion(prompt=[5, "a"]), "prompt[1]"),
    ("ids-two-prompts", completion(prompt=[[5], [6]]), "prompt"),
    ("prompt-strings", completion(prompt=["a", "b"]), "prompt"),
    ("prompt-int", completion(prompt=5), "prompt"),
    ("prompt-object", completion(prompt={}), "prompt"),
    ("prompt-missing", completion(prompt=DROP), "prompt"),
    ("suffix-int", completion(suffix=5), "suffix"),
    ("echo-string", completion(echo="sometimes"), "echo"),
    ("completion-logprobs-21", completion(logprobs=21), "logprobs"),
    ("completion-logprobs-neg", completion(logprobs=-1), "logprobs"),
    ("bias-id-vocab", chat(logit_bias={str(VOCAB): 1}), "logit_bias"),
    ("bias-id-negative", chat(logit_bias={"-1": 1}), "logit_bias"),
    ("bias-id-text", chat(logit_bias={"abc": 1}), ...),
    ("bias-value-big", chat(logit_bias={"20": 101}), ...),
    ("bias-value-text", chat(logit_bias={"20": "x"}), ...),
    ("bias-value-null", chat(logit_bias={"20": None}), ...),
    ("bias-list", chat(logit_bias=[1]), "logit_bias"),
    # messages, roles, content
    ("messages-string", chat(messages="hi"), "messages"),
    ("messages-empty", chat(messages=[]), "messages"),
    ("messages-null", chat(messages=None), "messages"),
    ("messages-missing", chat(messages=DROP), "messages"),
    ("message-int", chat(messages=[5]), "messages[0]"),
    ("message-null", chat(messages=[None]), "messages[0]"),
    ("message-list", chat(messages=[[]]), "messages[0]"),
    ("role-unknown", chat(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role"),
    ("role-empty", chat(messages=[{"role": "", "content": "hi"}]), "messages[0].role"),
    ("role-upper", chat(messages=[{"role": "USER", "content": "hi"}]), "messages[0].role"),
    ("role-int", chat(messages=[{"role": 5, "content": "hi"}]), "messages[0].role"),
    ("role-null", chat(messages=[{"role": None, "content": "hi"}]), "messages[0].role"),
    ("role-missing", chat(messages=[{"content": "hi"}]), "messages[0].role"),
    ("content-int", user(5), "messages[0].content"),
    ("content-object", user({"text": "hi"}), "messages[0].content"),
    ("part-int", user([5]), "messages[0].content[0]"),
    ("part-null", user([None]), "messages[0].content[0]"),
    ("part-text-int", user([{"type": "text", "text": 5}]), "messages[0].content[0].text"),
    ("part-text-list", user([{"type": "text", "text": ["a"]}]), "messages[0].content[0].text"),
    ("part-text-object", user([{"type": "text", "text": {"a": 1}}]), "messages[0].content[0].text"),
    ("part-type-int", user([{"type": 5, "text": "hi"}]), "messages[0].content[0].type"),
    ("part-image", user([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]),
     "messages[0].content[0].type"),
    ("part-audio", user([{"type": "text", "text": "a"}, {"type": "input_audio", "input_audio": {}}]),
     "messages[0].content[1].type"),
    ("tool-call-id-int", chat(messages=[*HI, {"role": "tool", "tool_call_id": 5, "content": "x"}]),
     "messages[1].tool_call_id"),
    ("prefix-string", chat(messages=[*HI, {"role": "assistant", "content": "a", "prefix": "x"}]),
     "messages[1].prefix"),
    ("reasoning-int", chat(messages=[*HI, {"role": "assistant", "content": "a", "reasoning_content": 5}]),
     "messages[1].reasoning_content"),
    ("tool-calls-string", chat(messages=[*HI, {"role": "assistant", "tool_calls": "x"}]),
     "messages[1].tool_calls"),
    ("tool-call-function-string", chat(messages=[*HI, {"role": "assistant", "tool_calls": [
        {"function": "x"}]}]), "messages[1].tool_calls[0].function"),
    ("tool-call-name-int", chat(messages=[*HI, {"role": "assistant", "tool_calls": [
        {"function": {"name": 5}}]}]), "messages[1].tool_calls[0].function.name"),
    ("tool-call-no-name", chat(messages=[*HI, {"role": "assistant", "tool_calls": [{"function": {}}]}]),
     "messages[1].tool_calls[0].function.name"),
    ("tool-call-id-field-int", chat(messages=[*HI, {"role": "assistant", "tool_calls": [
        {"id": 5, "function": {"name": "f"}}]}]), "messages[1].tool_calls[0].id"),
    # tools and tool choice
    ("tools-string", chat(tools="x"), "tools"),
    ("tools-int-item", chat(tools=[5]), "tools[0]"),
    ("tools-null-item", chat(tools=[None]), "tools[0]"),
    ("tool-function-string", chat(tools=[{"type": "function", "function": "get"}],
                                  tool_choice={"type": "function", "function": {"name": "get"}}),
     "tools[0].function"),
    ("tool-name-int", chat(tools=[{"type": "function", "function": {"name": 5}}]), "tools[0].function.name"),
    ("tool-no-name", chat(tools=[{"type": "function", "function": {}}]), "tools[0].function.name"),
    ("tool-parameters-list", chat(tools=[{"type": "function", "function": {"name": "f", "parameters": []}}]),
     "tools[0].function.parameters"),
    ("tool-description-int", chat(tools=[{"type": "function", "function": {"name": "f", "description": 5}}]),
     "tools[0].function.description"),
    ("choice-required-no-tools", chat(tool_choice="required"), "tool_choice"),
    ("choice-named-no-tools", chat(tool_choice={"type": "function", "function": {"name": "f"}}),
     "tool_choice"),
    ("choice-named-absent", chat(tools=[WEATHER], tool_choice={
        "type": "function", "function": {"name": "x"}}), "tool_choice"),
    ("choice-unknown-word", chat(tools=[WEATHER], tool_choice="sometimes"), "tool_choice"),
    ("choice-int", chat(tool_choice=5), "tool_choice"),
    ("choice-function-string", chat(tools=[WEATHER], tool_choice={"type": "function", "function": "f"}),
     "tool_choice.function"),
    ("choice-name-int", chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": 5}}),
     "tool_choice.function.name"),
    ("choice-allowed-int", chat(tools=[WEATHER], tool_choice={"type": "allowed_tools", "allowed_tools": 5}),
     "tool_choice.allowed_tools"),
    ("choice-allowed-mode", chat(tools=[WEATHER], tool_choice={
        "type": "allowed_tools", "allowed_tools": {"mode": "x", "tools": []}}),
     "tool_choice.allowed_tools.mode"),
    ("choice-allowed-none-left", chat(tools=[WEATHER], tool_choice={
        "type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [{"name": "x"}]}}),
     "tool_choice"),
    ("functions-int-item", chat(functions=[5]), "functions[0]"),
    ("functions-name-int", chat(functions=[{"name": 5}]), "functions[0].name"),
    ("function-call-word", chat(function_call="required"), "function_call"),
    ("function-call-name-int", chat(function_call={"name": 5}), "function_call.name"),
    # sampling values (NaN and infinities are JSON extensions Python reads; sent raw)
    ("temperature-nan", raw(BASE + b',"temperature":NaN}'), "temperature"),
    ("temperature-inf", raw(BASE + b',"temperature":Infinity}'), "temperature"),
    ("temperature-neg-inf", raw(BASE + b',"temperature":-Infinity}'), "temperature"),
    ("temperature-1e999", raw(BASE + b',"temperature":1e999}'), "temperature"),
    ("temperature-negative", chat(temperature=-1), "temperature"),
    ("temperature-huge", chat(temperature=1e308), "temperature"),
    ("temperature-string", chat(temperature="hot"), "temperature"),
    ("temperature-list", chat(temperature=[1]), "temperature"),
    ("top-p-nan", raw(BASE + b',"top_p":NaN}'), "top_p"),
    ("top-p-negative", chat(top_p=-0.1), "top_p"),
    ("top-p-big", chat(top_p=1.5), "top_p"),
    ("top-k-below", chat(top_k=-2), "top_k"),
    ("top-k-float", chat(top_k=1.5), "top_k"),
    ("min-p-big", chat(min_p=2), "min_p"),
    ("presence-big", chat(presence_penalty=3), "presence_penalty"),
    ("frequency-inf", raw(BASE + b',"frequency_penalty":-Infinity}'), "frequency_penalty"),
    ("repetition-zero", chat(repetition_penalty=0), "repetition_penalty"),
    ("repetition-huge", chat(repetition_penalty=1e9), "repetition_penalty"),
    ("max-tokens-zero", chat(max_tokens=0), "max_tokens"),
    ("max-tokens-negative", chat(max_tokens=-1), "max_tokens"),
    ("max-tokens-fraction", chat(max_tokens=1.5), "max_tokens"),
    ("max-tokens-string", chat(max_tokens="many"), "max_tokens"),
    ("max-tokens-nan", raw(BASE + b',"max_tokens":NaN}'), "max_tokens"),
    ("max-completion-zero", chat(max_completion_tokens=0), "max_completion_tokens"),
    ("n-zero", chat(n=0), "n"),
    ("n-two", chat(n=2), "n"),
    ("n-huge", chat(n=10**9), "n"),
    ("n-string", chat(n="one"), "n"),
    ("logprobs-string", chat(logprobs="yes please"), "logprobs"),
    ("logprobs-five", chat(logprobs=5), "logprobs"),
    ("top-logprobs-21", chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    ("top-logprobs-negative", chat(logprobs=True, top_logprobs=-1), "top_logprobs"),
    ("seed-fraction", chat(seed=1.5), "seed"),
    ("seed-string", chat(seed="lucky"), "seed"),
    ("seed-list", chat(seed=[1]), "seed"),
    ("stop-int", chat(stop=5), "stop"),
    ("stop-int-item", chat(stop=[5]), "stop[0]"),
    ("stop-null-item", chat(stop=[None]), "stop[0]"),
    ("stop-object", chat(stop={"a": 1}), "stop"),
    ("stop-too-many", chat(stop=["x"] * 33), "stop"),
    ("stream-string", chat(stream="maybe"), "stream"),
    ("stream-options-int", chat(stream=True, stream_options=5), "stream_options"),
    ("include-usage-string", chat(stream=True, stream_options={"include_usage": "x"}),
     "stream_options.include_usage"),
    ("effort-unknown", chat(reasoning_effort="huge"), "reasoning_effort"),
    ("effort-int", chat(reasoning_effort=5), "reasoning_effort"),
    ("thinking-string", chat(thinking="on"), "thinking"),
    ("template-kwargs-int", chat(chat_template_kwargs=5), "chat_template_kwargs"),
    ("response-format-int", chat(response_format=5), "response_format"),
    ("response-format-type", chat(response_format={"type": "xml"}), "response_format.type"),
    ("response-format-empty", chat(response_format={}), "response_format.type"),
    ("response-schema-int", chat(response_format={"type": "json_schema", "json_schema": 5}),
     "response_format.json_schema"),
    ("parallel-string", chat(parallel_tool_calls="x"), "parallel_tool_calls"),
    ("model-int", chat(model=5), "model"),
    ("model-object", chat(model={}), "model"),
    # encodings
    ("surrogate-high", raw(BASE + b',"messages":[{"role":"user","content":"a\\ud800b"}]}'),
     "messages[0].content"),
    ("surrogate-low", raw(BASE + b',"messages":[{"role":"user","content":"\\udc00"}]}'),
     "messages[0].content"),
    ("surrogate-reversed", raw(BASE + b',"messages":[{"role":"user","content":"\\udc00\\ud800"}]}'),
     "messages[0].content"),
    ("surrogate-in-part", raw(BASE + b',"messages":[{"role":"user","content":[{"type":"text","text":'
                              b'"\\ud83d"}]}]}'), "messages[0].content[0].text"),
    ("surrogate-in-stop", raw(BASE + b',"stop":["\\ud800"]}'), "stop[0]"),
    ("surrogate-in-model", raw(BASE + b',"model":"\\udfff"}'), "model"),
    ("surrogate-in-key", raw(BASE + b',"\\ud800":1}'), ...),
    ("surrogate-in-tool", raw(BASE + b',"tools":[{"type":"function","function":{"name":"\\ud800"}}]}'),
     "tools[0].function.name"),
    ("surrogate-in-prompt", raw(b'{"prompt":"\\ud800","max_tokens":2}', COMPLETIONS), "prompt"),
    ("utf8-invalid-byte", raw(b'{"messages":[{"role":"user","content":"\xff"}]}'), None),
    ("utf8-overlong", raw(b'{"messages":[{"role":"user","content":"\xc0\xaf"}]}'), None),
    ("utf8-truncated", raw(b'{"messages":[{"role":"user","content":"\xe6\x97"}]}'), None),
    # Python's JSON reader lets UTF-8-encoded surrogates through (surrogatepass); refused after it.
    ("utf8-encoded-surrogate", raw(b'{"messages":[{"role":"user","content":"\xed\xa0\x80"}]}'),
     "messages[0].content"),
    ("latin1-body", raw('{"messages":[{"role":"user","content":"café"}]}'.encode("latin-1")), None),
    # JSON syntax and shape
    ("body-empty", raw(b""), ...),
    ("body-null", raw(b"null"), ...),
    ("body-array", raw(b'[{"role":"user","content":"hi"}]'), ...),
    ("body-number", raw(b"5"), ...),
    ("body-string", raw(b'"hi"'), ...),
    ("body-object-empty", raw(b"{}"), "messages"),
    ("json-truncated", raw(BASE), None),
    ("json-bad-token", raw(b'{"messages": [}'), None),
    ("json-single-quotes", raw(b"{'messages': []}"), None),
    ("json-comment", raw(BASE + b" /* hi */}"), None),
    ("json-trailing", raw(BASE + b"} trailing"), None),
    ("json-nul", raw(b"\x00"), None),
    ("json-5000-digits", raw(BASE + b',"seed":' + b"9" * 5000 + b"}"), None),
    ("json-deep-arrays", raw(b"[" * 100_000 + b"]" * 100_000), None),
    ("json-deep-objects", raw(b'{"a":' * 100_000 + b"1" + b"}" * 100_000), None),
    ("json-deep-in-field", raw(BASE + b',"metadata":' + b"[" * 50_000 + b"]" * 50_000 + b"}"), None),
    # sizes (the server's body limit is 4 MiB for a 1,024-token context)
    ("body-over-limit", raw(BASE + b',"pad":"' + b"a" * (5 << 20) + b'"}'), None),
    ("prompt-ids-over-context", completion(prompt=[20] * 200_000), "prompt"),
    ("prompt-text-over-context", completion(prompt="a" * 300_000), "prompt"),
    ("content-over-context", user("word " * 100_000), "messages"),
    ("messages-over-context", chat(messages=HI * 20_000), "messages"),
    ("max-tokens-over-context", completion(prompt=[20] * CONTEXT), "prompt"),
    # content types, methods, paths
    ("form-encoded", raw(b"messages=hi", **{"Content-Type": "application/x-www-form-urlencoded"}), None),
    ("multipart", raw(b'--b\r\nContent-Disposition: form-data; name="messages"\r\n\r\nhi\r\n--b--\r\n',
                      **{"Content-Type": "multipart/form-data; boundary=b"}), None),
    ("xml", raw(b"<messages><m>hi</m></messages>", **{"Content-Type": "application/xml"}), None),
    ("get-chat", {"method": "GET", "url": CHAT}, None),
    ("put-chat", raw(BASE + b"}", method="PUT"), None),
    ("delete-models", {"method": "DELETE", "url": "/v1/models"}, None),
    ("patch-completions", raw(b"{}", COMPLETIONS, method="PATCH"), None),
    ("post-models", raw(b"{}", "/v1/models"), None),
    ("post-health", raw(b"{}", "/health"), None),
    ("invented-method", {"method": "BREW", "url": CHAT}, None),
    ("options-without-preflight", {"method": "OPTIONS", "url": CHAT}, None),
    ("unknown-route", raw(BASE + b"}", "/v1/chat/completion"), None),
    ("route-extra", raw(BASE + b"}", "/v1/chat/completions/more"), None),
    ("route-v2", raw(BASE + b"}", "/v2/chat/completions"), None),
    ("dot-dot", {"method": "GET", "url": "/v1/../../etc/passwd"}, None),
    ("unknown-model", {"method": "GET", "url": "/v1/models/gpt-4"}, "model"),
    ("long-path", {"method": "GET", "url": "/v1/" + "a" * 8000}, None),
]

# Credentials: without `auth`, the request goes out with only these headers.
UNAUTHORIZED = [
    ("auth-none", {}),
    ("auth-wrong", {"Authorization": "Bearer nope"}),
    ("auth-basic", {"Authorization": f"Basic {KEY}"}),
    ("auth-scheme-only", {"Authorization": "Bearer"}),
    ("auth-key-prefix", {"Authorization": f"Bearer {KEY[:-1]}"}),
    ("auth-key-longer", {"Authorization": f"Bearer {KEY}x"}),
    ("auth-huge", {"Authorization": "Bearer " + "k" * 8000}),
    ("auth-latin1", {"Authorization": b"Bearer caf\xe9"}),
    ("auth-x-api-key-wrong", {"x-api-key": "nope"}),
    ("auth-api-key-wrong", {"api-key": "nope"}),
]

# Odd but valid: each must be served (200, the served model's id).
SERVED = [
    ("top-k-past-vocab", chat(top_k=2**70)),
    ("temperature-tiny", chat(temperature=1e-300)),
    ("seed-min-int64", chat(seed=-(2**63))),
    ("seed-past-int64", chat(seed=2**70)),
    ("max-tokens-huge", chat(max_tokens=2**62)),
    ("max-tokens-float-integral", chat(max_tokens=2.0)),
    ("stop-empty-string", chat(stop=[""])),
    ("stop-32", chat(stop=[f"s{i}" for i in range(32)])),
    ("logprobs-20", chat(logprobs=True, top_logprobs=20)),
    ("bias-edges", chat(logit_bias={"0": -100, str(VOCAB - 1): 100})),
    ("model-named-otherwise", chat(model="gpt-4o")),
    ("model-name-100k", chat(model="m" * 100_000)),
    ("all-nulls", chat(model=None, stream=None, stream_options=None, temperature=None, top_p=None,
                       top_k=None, min_p=None, seed=None, stop=None, n=None, logprobs=None,
                       top_logprobs=None, tools=None, tool_choice=None, response_format=None,
                       reasoning_effort=None, thinking=None, logit_bias=None,
                       max_completion_tokens=None, parallel_tool_calls=None, functions=None,
                       function_call=None, chat_template_kwargs=None, reasoning=None)),
    ("content-empty-list", user([])),
    ("part-text-null", user([{"type": "text", "text": None}])),
    ("unicode-mix", user("emoji 👩‍👩‍👧 rtl \u202egnp.exe nul \x00 bom \ufeff nonchar \uffff max \U0010ffff")),
    ("unicode-combining", user("e" + "\u0301" * 200)),
    ("unicode-pair-escaped", raw(BASE + b',"messages":[{"role":"user","content":"\\ud83d\\ude00"}]}')),
    ("control-token-text", user("<｜end▁of▁sentence｜><｜User｜></think>｜DSML｜<｜fim▁hole｜>")),
    ("only-system", chat(messages=[{"role": "system", "content": "hi"}])),
    ("only-assistant", chat(messages=[{"role": "assistant", "content": "hi"}])),
    ("assistant-twice", chat(messages=[*HI, {"role": "assistant", "content": "a"},
                                       {"role": "assistant", "content": "b"}])),
    ("tool-arguments-object", chat(messages=[*HI, {"role": "assistant", "tool_calls": [
        {"id": "c", "function": {"name": "f", "arguments": {"a": [1, {"b": None}]}}}]},
        {"role": "tool", "tool_call_id": "c", "content": "r"}])),
    ("tool-arguments-junk", chat(messages=[*HI, {"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "{not json"}}]}])),
    ("choice-none-no-tools", chat(tool_choice="none")),
    ("choice-auto-no-tools", chat(tool_choice="auto")),
    ("non-function-tool", chat(tools=[{"type": "web_search"}])),
    ("duplicate-keys", raw(b'{"messages":"x","max_tokens":-5,"messages":[{"role":"user","content":"hi"}],'
                           b'"max_tokens":2,"thinking":{"type":"disabled"}}')),
    ("bom-utf8", raw(b"\xef\xbb\xbf" + BASE + b"}")),
    ("utf16-body", raw((BASE + b"}").decode().encode("utf-16"))),
    ("no-content-type", raw(BASE + b"}", **{"Content-Type": ""})),
    ("charset-latin1-label", raw(BASE + b"}", **{"Content-Type": "application/json; charset=latin-1"})),
    ("deep-extra-field", raw(BASE + b',"metadata":' + b"[" * 200 + b"]" * 200 + b"}")),
    ("prompt-empty-ids", completion(prompt=[])),
    ("prompt-empty-nested", completion(prompt=[[]])),
    ("prompt-edge-ids", completion(prompt=[0, 17, VOCAB - 1])),
    ("prompt-empty-text", completion(prompt="")),
    ("prompt-fim", completion(prompt="def f(", suffix="):\n    pass")),
    ("lowercase-bearer", {**chat(), "auth": {"Authorization": f"bearer {KEY}"}}),
    ("x-api-key", {**chat(), "auth": {"x-api-key": KEY}}),
    ("query-string", {**chat(), "url": CHAT + "?api-version=2024-01-01&x=%00"}),
]


def send(live: Live, request: dict) -> httpx.Response:
    request = dict(request)
    if "auth" in request:
        headers = request.pop("auth")
        return live.bare.request(**request, headers=headers)
    return live.client.request(**request)


@pytest.mark.parametrize("request_, param", [pytest.param(r, p, id=i) for i, r, p in MALFORMED])
def test_malformed_requests_get_a_4xx_in_the_error_shape(live, request_, param):
    error = assert_error(send(live, request_))
    if param is not ...:
        assert error["param"] == param, error
    assert live.alive()


@pytest.mark.parametrize("headers", [pytest.param(h, id=i) for i, h in UNAUTHORIZED])
def test_wrong_credentials_get_a_401(live, headers):
    for request in (chat(), {"method": "GET", "url": "/v1/models"}, raw(b"{not json")):
        request = dict(request, headers={**request.get("headers", {}), **headers})
        error = assert_error(live.bare.request(**request), 401)
        assert error["code"] == "invalid_api_key"
    assert live.bare.get("/health").status_code == 200  # open without a key


@pytest.mark.parametrize("request_", [pytest.param(r, id=i) for i, r in SERVED])
def test_odd_but_valid_requests_are_served(live, request_):
    assert_served(send(live, request_))


# ----- defects, one by one (issue 9) ------------------------------------------------------------

def test_errors_name_the_bad_value(live):
    cases = [
        (completion(prompt=[999999, 5]), "prompt[0] is 999999, which is not a token id of this model"),
        (completion(prompt=[5, VOCAB]), f"prompt[1] is {VOCAB}, which is not a token id"),
        (completion(prompt=[[5, -1]]), "prompt[0][1] is -1"),
        (chat(logit_bias={"5": 1, "99999": 1}), "logit_bias.99999 is 99999"),
        (raw(BASE + b',"messages":[{"role":"user","content":"a\\ud800b"}]}'),
         "lone UTF-16 surrogate (\\ud800)"),
        (user([{"type": "text", "text": 5}]),
         "messages[0].content[0].text: expected a string, got an integer"),
        (chat(tool_choice="required"), "tool_choice asks for a tool call ('required'), but the request "
                                       "offers no tools"),
        (raw(b'{"messages": [}'), "The request body is not valid JSON: Expecting value at character 14"),
        (raw(b"[" * 100_000), "The request body is not valid JSON: it is nested too deeply"),
        (chat(temperature=5), "temperature: Input should be less than or equal to 2"),
    ]
    for request, message in cases:
        error = assert_error(send(live, request), 400)
        assert message in error["message"], error


def test_context_errors_say_what_was_too_long_and_what_fits(live):
    fits = r"The largest context that fits this machine is [\d,]+ tokens"
    error = assert_error(send(live, completion(prompt="a" * 2000)), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert error["message"].startswith(
        "This model's maximum context length is 1024 tokens. However, your prompt resulted in 2001 "
        "tokens. Please reduce the length of the prompt.")
    assert re.search(fits, error["message"])
    error = assert_error(send(live, user("a" * 2000)), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert "your messages resulted in" in error["message"] and re.search(fits, error["message"])


def test_a_body_over_the_limit_is_refused_before_it_is_read(live):
    """4 MiB here (the floor; 64 bytes a token of context above it): a 413 at once when
    Content-Length says so; a chunked body is dropped once past it, and cut off within a second."""
    sent = []

    def body(megabytes):
        for i in range(megabytes):
            sent.append(i)
            yield b" " * (1 << 20)

    r = live.client.post(CHAT, content=body(64), headers={"Content-Length": str(64 << 20)})
    assert "larger than the 4,194,304 bytes" in assert_error(r, 413)["message"]
    assert len(sent) < 64  # the client could not send it all: the server stopped reading
    sent.clear()
    r = live.client.post(CHAT, content=body(100_000))  # chunked, no Content-Length: 100 GB, never sent
    assert_error(r, 413)
    assert len(sent) < 100_000
    assert_served(send(live, chat()))


def test_logprobs_have_an_entry_for_every_token(live, selftest_model):
    """Even for a token that is part of a UTF-8 character (and so adds no text yet)."""
    from mlx_dsv4.serve.protocol import token_bytes
    from mlx_dsv4.text.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(selftest_model)
    ids = {token_bytes(tok, i, tok.decode([i])): i for i in range(17, VOCAB)}
    lead, cont = ids[b"\xe6"], ids[b"\x97"]  # 0xe6 0x97 0x97 is one character
    bias = {str(lead): 100, str(cont): 100}
    r = send(live, completion(max_tokens=24, logprobs=2, logit_bias=bias, seed=1, temperature=1))
    assert_served(r)
    lp, usage = r.json()["choices"][0]["logprobs"], r.json()["usage"]
    assert usage["completion_tokens"] == 24
    assert [len(lp[k]) for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")] == [24] * 4
    assert set(lp["tokens"]) <= {"bytes:\\xe6", "bytes:\\x97"}
    r = send(live, chat(max_tokens=24, logprobs=True, top_logprobs=2, logit_bias=bias, seed=1, temperature=1))
    assert_served(r)
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == r.json()["usage"]["completion_tokens"] == 24
    assert all(e["bytes"] in ([0xE6], [0x97]) and len(e["top_logprobs"]) == 2 for e in content)
    assert all(e["token"] == "bytes:" + "".join(f"\\x{b:02x}" for b in e["bytes"]) for e in content)


def test_replies_name_the_served_model(live):
    r = send(live, chat(model="gpt-4o"))
    assert r.json()["model"] == MODEL_ID
    r = send(live, {**chat(model="anything", stream=True)})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert events and {e["model"] for e in events} == {MODEL_ID}


def test_the_server_survives_and_still_serves(live):
    host, port = live.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"\x16\x03\x01 not HTTP at all\r\n\r\n")  # a TLS hello, say
        s.recv(1024)
    assert live.alive()
    assert_served(send(live, chat(messages=[{"role": "user", "content": "Say hi"}], max_tokens=4)))
    assert_served(send(live, completion(prompt="def f(", max_tokens=4)))
    assert live.client.get("/health").json() == {"status": "ok"}
    log = live.log.read_text(errors="replace")
    assert "Traceback" not in log and "Exception in ASGI" not in log, log[-3000:]


# ----- lifecycle --------------------------------------------------------------------------------

def test_a_model_that_fails_to_load_exits_before_serving(selftest_model, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(selftest_model, broken)
    shard = next(broken.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # an interrupted download
    proc, url = start_server(broken, tmp_path / "server.log")
    try:
        assert url is None and proc.wait(60) != 0
    finally:
        stop_server(proc)
    log = (tmp_path / "server.log").read_text(errors="replace")
    assert f"error: could not load {broken}" in log and "serving" not in log and "Uvicorn" not in log


def test_shutdown_mid_stream_ends_the_stream_with_an_error(selftest_model, tmp_path):
    proc, url = start_server(selftest_model, tmp_path / "server.log")
    assert url
    try:
        events = []
        body = {"prompt": "hi", "max_tokens": CONTEXT - 8, "stream": True, "logit_bias": SPECIALS}
        with httpx.stream("POST", url + COMPLETIONS, json=body, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=60, trust_env=False) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 1:
                        proc.send_signal(signal.SIGINT)  # as Ctrl-C does
        assert proc.wait(30) == 0, (tmp_path / "server.log").read_text(errors="replace")[-2000:]
    finally:
        stop_server(proc)
    assert len(events) < CONTEXT - 8
    error = json.loads(events[-1])["error"]
    assert error["type"] == "server_error" and "shutting down" in error["message"]


# ----- the Messages API (issue 12): the same hostility, answered in Anthropic's shape ------------

MESSAGES = "/v1/messages"
PICK = {"name": "pick", "input_schema": {"type": "object", "properties": {"n": {"type": "integer"}}}}


def message(**fields) -> dict:
    body = {"model": MODEL_ID, "messages": HI, "max_tokens": 2, "thinking": OFF, **fields}
    return {"method": "POST", "url": MESSAGES, "json": {k: v for k, v in body.items() if v is not DROP}}


def assert_anthropic_error(r: httpx.Response, status: int | None = None) -> dict:
    """A 4xx (or `status`) whose body is exactly Anthropic's error shape; returns the error."""
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert status is None or r.status_code == status, (r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == {"type", "error"} and body["type"] == "error", body
    assert set(body["error"]) == {"type", "message"} and body["error"]["message"].strip(), body
    return body["error"]


MESSAGES_MALFORMED = [  # (id, request, words the message holds)
    ("not-json", raw(b'{"messages": [', MESSAGES), "not valid JSON"),
    ("nested", raw(b"[" * 100_000, MESSAGES), "nested too deeply"),
    ("no-max-tokens", message(max_tokens=DROP), "max_tokens"),
    ("zero-max-tokens", message(max_tokens=0), "max_tokens"),
    ("no-messages", message(messages=[]), "messages"),
    # role "system" is Claude Code's mid-conversation system message (accepted); "tool" is not a role here
    ("tool-role", message(messages=[{"role": "tool", "content": "x"}]), "messages[0].role"),
    ("document", message(messages=[{"role": "user", "content": [{"type": "document", "source": {}}]}]),
     "document"),
    ("image-in-assistant", message(messages=[{"role": "user", "content": "x"}, {
        "role": "assistant", "content": [{"type": "image", "source": {}}]}]), "image"),
    ("tool-no-name", message(tools=[{"input_schema": {}}]), "tools[0].name"),
    ("tool-choice-no-name", message(tools=[PICK], tool_choice={"type": "tool"}), "tool_choice.name"),
    ("tool-choice-unknown", message(tools=[PICK], tool_choice={"type": "tool", "name": "x"}), "'x'"),
    ("any-without-tools", message(tool_choice={"type": "any"}), "offers no tools"),
    ("budget-zero", message(thinking={"type": "enabled", "budget_tokens": 0}), "budget_tokens"),
    ("thinking-kind", message(thinking={"type": "sometimes"}), "thinking.type"),
    ("surrogate", raw(b'{"max_tokens":2,"messages":[{"role":"user","content":"a\\ud800b"}]}', MESSAGES),
     "lone UTF-16 surrogate"),
    ("temperature", message(temperature=5), "temperature"),
    ("top-k", message(top_k=-1), "top_k"),
    ("stops", message(stop_sequences=["x"] * 33), "stop_sequences"),
    ("format-kind", message(output_config={"format": {"type": "regex"}}), "output_config.format"),
    ("token-overflow", message(messages=[{"role": "user", "content": "a" * 2000}]), "maximum context length"),
]


@pytest.mark.parametrize("request_, words", [pytest.param(r, w, id=i) for i, r, w in MESSAGES_MALFORMED])
def test_malformed_messages_get_a_4xx_in_anthropic_shape(live, request_, words):
    error = assert_anthropic_error(send(live, request_))
    assert error["type"] == "invalid_request_error" and words in error["message"], error
    assert live.alive()


def test_messages_credentials_and_sizes(live):
    for headers in ({}, {"x-api-key": "wrong"}, {"Authorization": "Bearer wrong"}):
        error = assert_anthropic_error(live.bare.request(**message(), headers=headers), 401)
        assert error["type"] == "authentication_error"
    r = live.bare.request(**message(max_tokens=4, messages=[{"role": "user", "content": "Say hi"}]),
                          headers={"x-api-key": KEY})
    assert r.status_code == 200 and r.json()["type"] == "message"
    r = live.client.post(MESSAGES, content=b" " * (5 << 20))
    assert assert_anthropic_error(r, 413)["type"] == "request_too_large"
    r = live.client.post(MESSAGES + "/nope", json={})
    assert assert_anthropic_error(r, 404)["type"] == "not_found_error"


# ----- safe by default (issue 21): pages, hosts, keys, numbers, refusals ------------------------

EVIL = "https://evil.example"


def no_cors(r: httpx.Response) -> bool:
    return not any(h.lower().startswith("access-control-") for h in r.headers)


def test_a_web_page_cannot_use_the_server(live):
    """No CORS headers (none named with --cors-origin), a page's requests refused, never
    Allow-Private-Network; the reply is not readable by the page."""
    page = {"Origin": EVIL, "Authorization": f"Bearer {KEY}"}
    preflight = live.bare.options(CHAT, headers={**page, "Access-Control-Request-Method": "POST",
                                                 "Access-Control-Request-Headers": "authorization",
                                                 "Access-Control-Request-Private-Network": "true"})
    assert preflight.status_code == 403 and no_cors(preflight)
    for request in (chat(), {"method": "GET", "url": "/v1/models"}, message()):
        r = live.bare.request(**request, headers=page)
        assert r.status_code == 403 and no_cors(r), r.text
        assert f"--cors-origin {EVIL}" in r.text
    assert no_cors(live.client.get("/v1/models"))  # nor for clients that are not pages
    assert "--cors-origin https://evil.example" in live.log.read_text(errors="replace")  # said to the user


@pytest.mark.parametrize("kind", ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                                  "multipart/form-data; boundary=b"])
def test_a_body_not_declared_json_is_415(live, kind):
    """Such a body needs no CORS preflight, so a page could send it blind."""
    error = assert_error(send(live, raw(BASE + b"}", **{"Content-Type": kind})), 415)
    assert "application/json" in error["message"]
    error = assert_anthropic_error(live.client.post(MESSAGES, content=b"{}", headers={"Content-Type": kind}), 415)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.nip.io", "localhost.evil.example"])
def test_a_host_that_is_not_this_server_is_refused(live, host):
    """DNS rebinding: a page's own name pointed at 127.0.0.1 reaches a loopback server."""
    for request in (chat(), {"method": "GET", "url": "/v1/models"}):
        r = live.client.request(**request, headers={"Host": host})
        error = assert_error(r, 403)
        assert "Host" in error["message"] and f"--allow-host {host.split(':')[0]}" in error["message"]
    r = live.client.get("/v1/models", headers={"Host": "localhost:1234"})
    assert r.status_code == 200


def _raw_http(live: Live, head: bytes, body: bytes = b"") -> bytes:
    """Send `head` (and `body`), then read what comes back before the rest of a body is sent."""
    host, port = live.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as s:
        s.sendall(head + body)
        reply = b""
        while b"\r\n\r\n" not in reply:
            data = s.recv(65536)
            if not data:
                break
            reply += data
        return reply


def test_a_keyless_upload_is_refused_before_its_body_is_sent(live):
    """The 401 comes on the headers alone: a 60 MB body that never arrives is not waited for."""
    for head in (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 60000000\r\n\r\n",
                 b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\nx-api-key: wrong\r\n\r\n"):
        reply = _raw_http(live, head, b"100000\r\n" + b"{" * 0x100000 + b"\r\n" if b"chunked" in head else b"")
        assert reply.startswith(b"HTTP/1.1 401 "), reply[:200]
    assert live.alive()
    assert_served(send(live, chat()))


@pytest.mark.parametrize("headers, status", [
    ([("x-api-key", KEY), ("x-api-key", KEY)], 400),
    ([("x-api-key", "nope"), ("x-api-key", KEY)], 400),
    ([("Authorization", f"Bearer {KEY}"), ("Authorization", "Bearer nope")], 400),
    ([("Authorization", f"Bearer {KEY}"), ("x-api-key", "nope")], 401),
    ([("api-key", "nope"), ("x-api-key", KEY)], 401),
], ids=["x-api-key-twice", "x-api-key-last-right", "authorization-twice", "bearer-and-x-api-key", "api-key-and-x-api-key"])
def test_duplicate_credentials_are_refused(live, headers, status):
    error = assert_error(live.bare.request(**chat(), headers=headers), status)
    assert error["code"] == "invalid_api_key"


@pytest.mark.parametrize("field, value", [("repetition_penalty", 5e-324), ("repetition_penalty", 0.001),
                                          ("repetition_penalty", 101), ("temperature", 2.5),
                                          ("top_p", 1.5), ("min_p", -0.1), ("presence_penalty", 2.5),
                                          ("frequency_penalty", -2.5), ("top_k", -2)])
def test_sampling_values_outside_their_bounds_are_400s(live, field, value):
    for request in (chat(**{field: value}), completion(**{field: value, "logprobs": 1})):
        assert assert_error(send(live, request), 400)["param"] == field


def _strict_json(text: str):
    def refuse(constant):
        raise AssertionError(f"{constant} in a reply: {text[:300]}")

    return json.loads(text, parse_constant=refuse)


def test_logprobs_stay_finite_at_the_sampling_bounds(live):
    """The smallest repetition penalty and a temperature that would overflow the logits: served,
    with finite logprobs (the grammar's impossible tokens are tested in test_server.py)."""
    no_eos = {"logit_bias": SPECIALS, "seed": 7}  # an EOS first would leave no logprob to check
    for body in (completion(logprobs=5, max_tokens=4, repetition_penalty=0.01, temperature=1e-300, **no_eos),
                 completion(logprobs=5, max_tokens=4, repetition_penalty=100, stream=True, **no_eos)):
        r = send(live, body)
        assert r.status_code == 200, r.text
        seen = 0
        for line in r.text.splitlines() if body["json"].get("stream") else ["data: " + r.text]:
            if line.startswith("data: {"):
                lp = _strict_json(line[6:])["choices"][0]["logprobs"]
                if lp is None:  # the chunk of an end-of-sequence token carries no text, so no logprobs
                    continue
                values = lp["token_logprobs"] + [v for top in lp["top_logprobs"] for v in top.values()]
                assert all(-9999.0 <= v <= 0 for v in values)
                seen += len(values)
        assert seen > 0, r.text


def test_messages_openai_refuses_are_400s(live):
    """A message without content (null reads as missing) but an assistant's, and a tool message
    that does not say which call it answers (issue 21, row 10)."""
    cases = [
        (user(None), "messages[0].content"),
        (chat(messages=[{"role": "user"}]), "messages[0].content"),
        (chat(messages=[{"role": "system", "content": None}, *HI]), "messages[0].content"),
        (chat(messages=[*HI, {"role": "assistant", "tool_calls": [
            {"id": "c", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "content": "r"}]), "messages[2].tool_call_id"),
        (chat(messages=[{"role": "tool", "content": "hi"}]), "messages[0].tool_call_id"),
    ]
    for request, param in cases:
        assert assert_error(send(live, request), 400)["param"] == param
    assistant_only_calls = chat(messages=[*HI, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "r"}])
    assert_served(send(live, assistant_only_calls))


# ----- the prompt cache's folder and files (issue 21 rows 1, 5, 7) -------------------------------

def serve_with_cache(model: Path, log: Path, folder: Path) -> tuple[subprocess.Popen, str | None]:
    return start_server(model, log, "--max-context", str(CONTEXT * 4), "--prompt-cache-dir", str(folder))


def test_a_state_file_swapped_for_a_fifo_or_a_link_to_dev_zero_is_skipped(selftest_model, tmp_path):
    import os
    import stat

    folder, log = tmp_path / "cache", tmp_path / "first.log"
    asks = [chat(messages=[{"role": "user", "content": word * 700}], max_tokens=1) for word in ("ab", "cd")]
    proc, url = serve_with_cache(selftest_model, log, folder)
    assert url, log.read_text(errors="replace")
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                          trust_env=False) as client:
            for ask in asks:
                assert_served(client.request(**ask))
    finally:
        stop_server(proc)
    states = sorted(folder.glob("*.dsv4state"))
    # prompts of 1,024 tokens or more go to disk: the prompt's end and the state after the reply
    assert len(states) == 4
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o600}
    # names sort by token count, so each kind replaces one prompt-end state (the ones a resend reads)
    fifos, links = states[0::2], states[1::2]
    for state in states:
        state.unlink()
    for state in fifos:
        os.mkfifo(state)
    for state in links:
        state.symlink_to("/dev/zero")

    log = tmp_path / "restarted.log"
    proc, url = serve_with_cache(selftest_model, log, folder)
    assert url, log.read_text(errors="replace")
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                          trust_env=False) as client:
            for ask in asks:  # each answered (the old reader blocked on the FIFO, or read forever)
                r = client.request(**ask)
                assert_served(r)
                assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    finally:
        stop_server(proc)
    text = log.read_text(errors="replace")
    assert text.count("skipping") >= 2 and "Traceback" not in text, text[-3000:]
    assert all(stat.S_ISFIFO(os.lstat(p).st_mode) for p in fifos)  # not removed
    assert all(os.path.islink(p) for p in links)

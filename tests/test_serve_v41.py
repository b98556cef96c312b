"""A DeepSeek-V4.1 model's chat encoding through the server and the chat: efforts
(`reasoning_effort`, OpenRouter's `reasoning.effort`, template kwargs, Anthropic's effort and
thinking budget, the chat's `/effort`) onto V4.1's 1-100 scale, its tool-call spelling, and its
system turns.

The server is test_server's scripted one (the real V4 tokenizer, a fake model that answers from
the prompt) with the V4.1 encoding read from tests/fixtures/encoding/v41; what reaches the model
is the prompt the backend saw.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import httpx
import pytest

from mlx_dsv4.chat import Chat, apply_command, parse_command
from mlx_dsv4.serve import protocol
from mlx_dsv4.serve.schema import APIError, ChatRequest
from mlx_dsv4.text import chat_format
from test_chat_format import encoder_source
from test_server import (EOS, M, Running, ScriptedBackend, ScriptModel, ServerConfig, create_app,  # noqa: F401
                         stream_generate, tokenizer)
from mlx_dsv4.serve.engine import Engine

EFFORT = "Reasoning Effort: {} (range 1-100, the higher the value, the more thorough the reasoning)\n\n"
SYSTEM, EOS_TEXT = "<｜System｜>", "<｜end▁of▁sentence｜>"
CALL41 = ('\n\n<｜DSML｜ calls>\n<｜DSML｜ invoke name="get_weather">\n'
          '<｜DSML｜ parameter name="city" string="true">Paris</｜DSML｜ parameter>\n'
          '<｜DSML｜ parameter name="days" string="false">2</｜DSML｜ parameter>\n</｜DSML｜ invoke>\n</｜DSML｜ calls>')
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}


@pytest.fixture(scope="module")
def v41():
    return chat_format.encoding_from_source(encoder_source("v41"), chat_format.ENCODER_FILE_V41)


class Backend41(ScriptedBackend):
    """test_server's scripted model, answering a weather question with a V4.1-spelled call."""

    def generate(self, ids, **kw):
        prompt = self.tok.decode(ids).removeprefix("<｜begin▁of▁sentence｜>")
        if "Weather in Paris" in prompt.rsplit("<｜User｜>", 1)[-1]:
            self.calls.append(SimpleNamespace(prompt=prompt, ids=list(ids), kw=kw))
            reply = ("Calling.</think>" if prompt.endswith("<think>") else "") + CALL41
            if prompt.endswith('<｜DSML｜ invoke name="'):  # tool_choice forced the opener
                reply = CALL41.split('invoke name="', 1)[1]
            tokens = self.tok.encode(reply, allow_control=True) + [EOS]
            cache = [SimpleNamespace(offset=0, state=[])]
            return stream_generate(ScriptModel(tokens, len(ids)), self.tok, ids, cache=cache,
                                   max_context=self.max_context, **kw)
        return super().generate(ids, **kw)


@pytest.fixture(scope="module")
def server(tokenizer, v41):
    backend = Backend41(tokenizer, max_context=4096)
    engine = Engine(lambda: backend).start()
    assert engine.loaded.wait(60) and engine.error is None
    config = ServerConfig(model_id=M, tokenizer=tokenizer, max_context=4096, encoding=v41)
    running = Running(create_app(engine, config))
    running.backend = backend
    yield running
    running.close()
    engine.stop()


def post(server, path="/v1/chat/completions", content="Say hi", **body):
    body.setdefault("model", M)
    if path.endswith("/messages"):
        body.setdefault("max_tokens", 50)
    return httpx.post(server.url + path, json={"messages": [{"role": "user", "content": content}], **body},
                      timeout=60)


def prompt(server) -> str:
    return server.backend.calls[-1].prompt


@pytest.mark.parametrize("body,budget", [
    ({}, 75),  # thinking on by default, at the encoder's default, high
    ({"reasoning_effort": "minimal"}, 25), ({"reasoning_effort": "low"}, 50),
    ({"reasoning_effort": "medium"}, 63), ({"reasoning_effort": "high"}, 75),
    ({"reasoning_effort": "xhigh"}, 88), ({"reasoning_effort": "max"}, 100),
    ({"reasoning_effort": "ultra"}, 100),  # not lowered on a short context, unlike V4's Think Max
    ({"reasoning": {"effort": "low"}}, 50),
    ({"chat_template_kwargs": {"reasoning_effort": 37}}, 37),
    ({"chat_template_kwargs": {"reasoning_effort": "max"}}, 100),
    ({"reasoning_effort": "low", "chat_template_kwargs": {"reasoning_effort": 37}}, 50),
    ({"thinking": {"type": "enabled"}, "chat_template_kwargs": {"reasoning_effort": 1}}, 1),
])
def test_openai_efforts_onto_the_scale(server, body, budget):
    r = post(server, **body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["reasoning_content"]
    assert r.headers["x-reasoning-effort"] == str(budget)
    assert prompt(server) == f"{SYSTEM}{EFFORT.format(budget)}<｜User｜>Say hi<｜Assistant｜><think>"


def test_thinking_off_has_no_effort_line(server):
    for body in ({"reasoning_effort": "none"}, {"thinking": {"type": "disabled"}, "reasoning_effort": "max"},
                 {"chat_template_kwargs": {"thinking": False, "reasoning_effort": 90}}):
        r = post(server, **body)
        assert r.status_code == 200 and "x-reasoning-effort" not in r.headers
        assert prompt(server) == "<｜User｜>Say hi<｜Assistant｜></think>"
    post(server, reasoning_effort="none", messages=[{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": "Say hi"}])
    assert prompt(server).startswith(f"{SYSTEM}Be brief.<｜User｜>")


@pytest.mark.parametrize("effort", [0, 101, True, 2.5, "75", "huge", [50]])
def test_bad_template_effort_is_a_400(server, effort):
    r = post(server, chat_template_kwargs={"reasoning_effort": effort})
    assert r.status_code == 400, effort
    error = r.json()["error"]
    assert error["param"] == "chat_template_kwargs.reasoning_effort" and "1 to 100" in error["message"]


def test_a_number_needs_a_v41_model(tokenizer, v41):
    """On a V4 model the template's number is refused with a sentence, names still work."""
    v4 = chat_format.encoding_from_source(encoder_source("v0731"))
    cfg = ServerConfig(model_id=M, tokenizer=tokenizer, max_context=4096, encoding=v4)
    with pytest.raises(APIError, match="V4.1's effort scale") as e:
        protocol.effort_level(37, cfg)
    assert e.value.status == 400
    assert protocol.effort_level("medium", cfg) == "high"
    req = ChatRequest.model_validate({"model": M, "messages": [{"role": "user", "content": "x"}],
                                      "chat_template_kwargs": {"reasoning_effort": 37}})
    assert protocol.resolve_thinking(req, True) == (True, 37)


def test_v41_tool_call_comes_back_as_a_call(server):
    r = post(server, content="Weather in Paris?", tools=[WEATHER])
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert r.json()["choices"][0]["finish_reason"] == "tool_calls" and not message["content"]
    call = message["tool_calls"][0]["function"]
    assert call["name"] == "get_weather" and call["arguments"] == '{"city": "Paris", "days": 2}'
    assert '<｜DSML｜ invoke name="$TOOL_NAME">' in prompt(server)  # the V4.1 tools block
    # tool_choice required: the forced opener and the grammar are V4.1's spelling too.
    r = post(server, content="Weather in Paris?", tools=[WEATHER], tool_choice="required",
             reasoning_effort="none")
    assert r.status_code == 200, r.text
    assert prompt(server).endswith('</think>\n\n<｜DSML｜ calls>\n<｜DSML｜ invoke name="')
    call = r.json()["choices"][0]["message"]["tool_calls"][0]["function"]
    assert call["name"] == "get_weather" and call["arguments"] == '{"city": "Paris", "days": 2}'


def test_system_messages_keep_their_turns(server):
    """V4.1 answers a mid-conversation system message; the server keeps it rather than folding it
    into the user turn (which V4 needs), and keeps consecutive ones apart."""
    messages = [{"role": "system", "content": "S1"}, {"role": "developer", "content": "S2"},
                {"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
                {"role": "user", "content": "Say hi"}, {"role": "system", "content": "Be brief."}]
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": M, "messages": messages, "reasoning_effort": "none"})
    assert r.status_code == 200, r.text
    assert prompt(server) == (f"{SYSTEM}S1{SYSTEM}S2<｜User｜>U1<｜Assistant｜></think>A1{EOS_TEXT}"
                              f"<｜User｜>Say hi{SYSTEM}Be brief.<｜Assistant｜></think>")
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": M, "reasoning_effort": "none", "messages": [{"role": "system", "content": "Only this."}]})
    assert r.status_code == 200 and prompt(server) == "<｜User｜>Only this.<｜Assistant｜></think>"


@pytest.mark.parametrize("body,budget", [
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, 50),
    ({"thinking": {"type": "enabled", "budget_tokens": 8000}}, 75),
    ({"thinking": {"type": "enabled", "budget_tokens": 64000}}, 100),
    ({"thinking": {"type": "adaptive"}, "output_config": {"effort": "medium"}}, 63),
    ({"thinking": {"type": "adaptive"}, "output_config": {"effort": "xhigh"}}, 88),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}, "output_config": {"effort": "max"}}, 100),
])
def test_anthropic_efforts_onto_the_scale(server, body, budget):
    r = post(server, "/v1/messages", **body)
    assert r.status_code == 200, r.text
    assert r.json()["content"][0]["type"] == "thinking"
    assert EFFORT.format(budget) in prompt(server)


# ----- the chat's /effort -------------------------------------------------------------------------

@pytest.fixture
def chat(tokenizer, v41):
    return Chat(session=None, tokenizer=tokenizer, encoding=v41, thinking=True)


def effort_line(chat) -> str:
    chat.messages = [{"role": "user", "content": "hi"}]
    text = chat.tokenizer.decode(chat.prompt_ids())
    return text.split(SYSTEM, 1)[1].split("<｜User｜>")[0]


def test_chat_effort_names_and_numbers(chat):
    assert effort_line(chat) == EFFORT.format(75)
    for line, reply, stored, budget in (("/effort 37", "Reasoning effort: 37 of 100.", 37, 37),
                                        ("/effort LOW", "Reasoning effort: low (50 of 100).", "low", 50),
                                        ("/effort medium", "Reasoning effort: medium (63 of 100).", 63, 63),
                                        ("/effort 100", "Reasoning effort: 100 of 100.", 100, 100)):
        assert apply_command(chat, parse_command(line), {}) == reply
        assert chat.effort == stored and effort_line(chat) == EFFORT.format(budget)
    for bad in ("0", "101", "huge", "2.5", "²"):
        msg = apply_command(chat, parse_command(f"/effort {bad}"), {})
        assert msg.startswith(f"Unknown effort {bad!r}; this checkpoint accepts 1 to 100, low, high, max")
        assert chat.effort == 100
    assert apply_command(chat, parse_command("/effort default"), {}).endswith("default.")
    assert chat.effort is None and effort_line(chat) == EFFORT.format(75)


def test_chat_saves_and_loads_a_numeric_effort(chat, tmp_path, v41):
    apply_command(chat, parse_command("/effort 42"), {})
    chat.save(tmp_path / "c.json")
    other = Chat(session=None, tokenizer=chat.tokenizer, encoding=v41)
    other.load(tmp_path / "c.json")
    assert other.effort == 42 and effort_line(other) == EFFORT.format(42)
    (tmp_path / "bad.json").write_text('{"messages": [], "effort": 500}')
    with pytest.raises(ValueError, match="cannot render it"):
        other.load(tmp_path / "bad.json")
    # A V4 checkpoint's encoder takes no number: the saved conversation is refused as a whole.
    v4 = Chat(session=None, tokenizer=chat.tokenizer,
              encoding=dataclasses.replace(chat_format.BUILTIN, version="0731", efforts={None: "", "high": "x"}))
    with pytest.raises(ValueError, match="cannot render it"):
        v4.load(tmp_path / "c.json")

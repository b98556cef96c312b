"""The Messages API through the official `anthropic` client against a live server (issue 12).

The servers are test_server's: a scripted backend (the reply depends on the prompt) for what the
model says, and a tiny random V4 model through the real `Session` for constrained tool calls.
"""

from __future__ import annotations

import json

import httpx
import pytest

from test_chat_format import FIXTURES
from test_server import (M, NOTE, PARIS, REASONING, Running, ServerConfig, create_app,  # noqa: F401
                         dsml, encoding, last_call, scripted, tiny, tokenizer)

anthropic = pytest.importorskip("anthropic", reason="the anthropic SDK is a dev dependency")

OFF = {"type": "disabled"}
ON = {"type": "enabled", "budget_tokens": 8000}
WEATHER = {"name": "get_weather", "description": "The get_weather tool.", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"]}}
PICK = {"name": "pick", "description": "Pick a colour and a digit.", "input_schema": {
    "type": "object", "required": ["color", "n"], "properties": {
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 9}, "ok": {"type": "boolean"}}}}


def client(server, key="sk-local") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0, timeout=60)


def ask(server, content="Say hi", **kw):
    kw.setdefault("thinking", OFF)
    kw.setdefault("max_tokens", 200)
    return client(server).messages.create(model=M, messages=[{"role": "user", "content": content}], **kw)


def stream_events(server, content="Say hi", **kw):
    kw.setdefault("thinking", OFF)
    kw.setdefault("max_tokens", 200)
    with client(server).messages.stream(model=M, messages=[{"role": "user", "content": content}], **kw) as s:
        events = [e for e in s if e.type in ("message_start", "content_block_start", "content_block_delta",
                                             "content_block_stop", "message_delta", "message_stop")]
        return events, s.get_final_message()


def valid_pick(args: dict) -> bool:
    """PICK's schema, checked by hand: required keys, enum, integer range, boolean, no others."""
    return (set(args) <= {"color", "n", "ok"} and args.get("color") in ("red", "green", "blue")
            and type(args.get("n")) is int and 0 <= args["n"] <= 9
            and ("ok" not in args or isinstance(args["ok"], bool)))


def test_replies_name_the_served_model_whatever_was_asked(scripted):
    r = client(scripted).messages.create(model="claude-sonnet-4-5", max_tokens=20, thinking=OFF,
                                         messages=[{"role": "user", "content": "Say hi"}])
    assert r.model == M


def test_text_reply_and_usage(scripted):
    r = ask(scripted, system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
            metadata={"user_id": "u1"}, extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 20})
    assert r.type == "message" and r.role == "assistant" and r.id.startswith("msg_") and r.model == M
    assert [(b.type, b.text) for b in r.content] == [("text", "Hi!")]
    assert r.stop_reason == "end_turn" and r.stop_sequence is None
    prompt = last_call(scripted)
    assert prompt.prompt.startswith("Be brief.<｜User｜>Say hi<｜Assistant｜></think>")
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == len(prompt.ids)
    assert r.usage.output_tokens == 3  # "Hi", "!", EOS
    assert prompt.kw["top_k"] == 20 and prompt.kw["temperature"] == 0.5


def test_streamed_event_sequence(scripted):
    events, final = stream_events(scripted)
    kinds = [e.type for e in events]
    assert kinds[:2] == ["message_start", "content_block_start"] and kinds[-3:] == [
        "content_block_stop", "message_delta", "message_stop"]
    assert events[0].message.usage.input_tokens > 0
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == "Hi!"
    assert events[-2].delta.stop_reason == "end_turn" and events[-2].usage.output_tokens == 3
    assert [(b.type, b.text) for b in final.content] == [("text", "Hi!")]
    # Raw: named SSE events, a ping after message_start, no OpenAI "[DONE]".
    body = {"model": M, "max_tokens": 50, "stream": True, "thinking": OFF,
            "messages": [{"role": "user", "content": "Say hi"}]}
    raw = httpx.post(scripted.url + "/v1/messages", json=body, timeout=30).text
    names = [line[len("event: "):] for line in raw.splitlines() if line.startswith("event: ")]
    assert names[:2] == ["message_start", "ping"] and names[-1] == "message_stop"
    assert "[DONE]" not in raw


def test_thinking_blocks(scripted):
    r = ask(scripted, thinking=ON)
    assert [b.type for b in r.content] == ["thinking", "text"]
    assert r.content[0].thinking == REASONING and r.content[0].signature and r.content[1].text == "Hi!"
    assert last_call(scripted).prompt.endswith("<｜Assistant｜><think>")
    events, final = stream_events(scripted, thinking=ON)
    deltas = [e.delta for e in events if e.type == "content_block_delta"]
    assert "".join(d.thinking for d in deltas if d.type == "thinking_delta") == REASONING
    assert [d.type for d in deltas].count("signature_delta") == 1
    assert final.content[0].signature == r.content[0].signature
    # A small budget thinks with low effort, a large one at the most this context allows.
    ask(scripted, thinking={"type": "enabled", "budget_tokens": 1024})
    low = last_call(scripted).prompt
    ask(scripted, thinking={"type": "enabled", "budget_tokens": 64000})
    assert low != last_call(scripted).prompt


def test_tool_use_round_trip(scripted):
    r = ask(scripted, "Weather in Paris for 2 days?", tools=[WEATHER])
    assert r.stop_reason == "tool_use"
    (use,) = [b for b in r.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.input == PARIS and use.id.startswith("toolu_")
    events, final = stream_events(scripted, "Weather in Paris for 2 days?", tools=[WEATHER])
    partial = "".join(e.delta.partial_json for e in events
                      if e.type == "content_block_delta" and e.delta.type == "input_json_delta")
    assert json.loads(partial) == PARIS and final.stop_reason == "tool_use"
    assert [b.input for b in final.content if b.type == "tool_use"] == [PARIS]
    # The next turn: tool_use -> tool_result, with thinking blocks whose signature we never issued.
    history = [{"role": "user", "content": "Weather in Paris for 2 days?"},
               {"role": "assistant", "content": [
                   {"type": "thinking", "thinking": "I should look.", "signature": "not-ours"},
                   {"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}]},
               {"role": "user", "content": [
                   {"type": "tool_result", "tool_use_id": use.id,
                    "content": [{"type": "text", "text": "rain"}]},
                   {"type": "text", "text": "Say hi"}]}]
    r = client(scripted).messages.create(model=M, max_tokens=100, messages=history, tools=[WEATHER],
                                         thinking=ON)
    assert r.content[-1].text == "Hi!"
    prompt = last_call(scripted).prompt
    assert "<think>I should look.</think>" in prompt and "<tool_result>rain</tool_result>" in prompt


def test_tool_choice_any_tool_none(scripted):
    for thinking in (ON, OFF):
        for choice in ({"type": "any"}, {"type": "tool", "name": "get_weather"}):
            note = {"name": "write_note", "input_schema": NOTE["function"]["parameters"]}
            r = ask(scripted, tools=[WEATHER, note], tool_choice=choice, thinking=thinking)
            assert r.stop_reason == "tool_use"
            calls = [(b.name, b.input) for b in r.content if b.type == "tool_use"]
            assert calls == [("get_weather", PARIS)]
        r = ask(scripted, "Weather in Paris for 2 days?", tools=[WEATHER], tool_choice={"type": "none"},
                thinking=thinking)
        assert r.stop_reason == "end_turn" and all(b.type != "tool_use" for b in r.content)


def test_stop_sequences_and_max_tokens(scripted):
    r = ask(scripted, "count from 1 to 5", stop_sequences=["3"])
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == "3" and r.content[0].text == "1, 2, "
    r = ask(scripted, "count from 1 to 5", max_tokens=2)
    assert r.stop_reason == "max_tokens" and r.usage.output_tokens == 2


def test_count_tokens(scripted):
    kw = dict(model=M, system="Be brief.", messages=[{"role": "user", "content": "Weather in Paris?"}],
              tools=[WEATHER], thinking=OFF)
    counted = client(scripted).messages.count_tokens(**kw).input_tokens
    r = client(scripted).messages.create(max_tokens=50, **kw)
    assert counted == r.usage.input_tokens + r.usage.cache_read_input_tokens == len(last_call(scripted).ids)


def test_tool_conversation_renders_the_golden_prompt(scripted):
    # Test 1 of DeepSeek's encoder (v0731), sent as Anthropic messages: the prompt up to the last
    # assistant turn is the golden one, byte for byte.
    data = json.loads((FIXTURES / "v0731" / "test_input_1.json").read_text(encoding="utf-8"))
    system, user, call, result, _ = data["messages"]
    fn = call["tool_calls"][0]
    tools = [{"name": t["function"]["name"], "description": t["function"]["description"],
              "input_schema": t["function"]["parameters"]} for t in data["tools"]]
    messages = [{"role": "user", "content": user["content"]},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": call["reasoning_content"], "signature": "x"},
                    {"type": "tool_use", "id": fn["id"], "name": fn["function"]["name"],
                     "input": json.loads(fn["function"]["arguments"])}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": result["tool_call_id"],
                                              "content": result["content"]}]}]
    # The fixture has no effort paragraph: the 0731 encoder's default effort, low (a small budget).
    client(scripted).messages.create(model=M, max_tokens=50, system=system["content"], tools=tools,
                                     messages=messages, thinking={"type": "enabled", "budget_tokens": 1024})
    golden = (FIXTURES / "v0731" / "test_output_1.txt").read_text(encoding="utf-8")
    expected = golden[: golden.rindex("<think>") + len("<think>")]
    assert "<｜begin▁of▁sentence｜>" + last_call(scripted).prompt == expected


def test_errors_in_anthropic_shape(scripted, tokenizer, encoding):
    c = client(scripted)
    with pytest.raises(anthropic.BadRequestError) as e:
        c.messages.create(model=M, max_tokens=0, messages=[{"role": "user", "content": "hi"}])
    body = e.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as e:
        c.messages.create(model=M, max_tokens=10, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}])
    assert "image" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as e:
        c.messages.create(model=M, max_tokens=10, messages=[{"role": "user", "content": "hi"}],
                          tools=[WEATHER], tool_choice={"type": "tool", "name": "nope"})
    assert "nope" in e.value.body["error"]["message"]
    bad = {"name": "odd", "input_schema": {"type": "object",
                                           "properties": {"a": {"not": {"type": "string"}}}}}
    with pytest.raises(anthropic.BadRequestError) as e:
        c.messages.create(model=M, max_tokens=10, messages=[{"role": "user", "content": "hi"}],
                          tools=[bad], tool_choice={"type": "any"})
    message = e.value.body["error"]["message"]
    assert '"not"' in message and message.startswith("tools[0].input_schema.properties.a: ")
    with pytest.raises(anthropic.BadRequestError) as e:  # indices count the server tools too
        c.messages.create(model=M, max_tokens=10, messages=[{"role": "user", "content": "hi"}],
                          tools=[{"type": "web_search_20250305", "name": "web_search"}, bad],
                          tool_choice={"type": "any"})
    assert e.value.body["error"]["message"].startswith("tools[1].input_schema.properties.a: ")
    config = ServerConfig(model_id=M, tokenizer=tokenizer, max_context=4096, encoding=encoding,
                          api_key="secret")
    keyed = Running(create_app(scripted.engine, config))
    try:
        with pytest.raises(anthropic.AuthenticationError) as e:
            client(keyed, key="wrong").messages.create(model=M, max_tokens=10,
                                                       messages=[{"role": "user", "content": "hi"}])
        assert e.value.body["error"]["type"] == "authentication_error"
        r = client(keyed, key="secret").messages.create(model=M, max_tokens=20, thinking=OFF,
                                                        messages=[{"role": "user", "content": "Say hi"}])
        assert r.content[0].text == "Hi!"
    finally:
        keyed.close()


def test_tool_choice_any_is_schema_valid_on_random_weights(tiny):
    # A random model left alone writes no parseable call; constrained, every seed gives valid ones:
    # exactly one without parallel calls, one or more with them.
    c = client(tiny)
    for seed in range(20):
        single = seed < 10
        r = c.messages.create(model=M, max_tokens=100 if single else 600, thinking=OFF, tools=[PICK],
                              tool_choice={"type": "any", "disable_parallel_tool_use": single},
                              messages=[{"role": "user", "content": f"pick {seed}"}],
                              extra_body={"seed": seed, "temperature": 1.0})
        uses = [b for b in r.content if b.type == "tool_use"]
        assert r.stop_reason == "tool_use" and len(uses) >= 1 and (len(uses) == 1 or not single), (seed, r)
        assert all(u.name == "pick" and valid_pick(u.input) for u in uses), (seed, uses)


def test_malformed_bodies_get_anthropic_errors(scripted):
    url = scripted.url + "/v1/messages"
    user = [{"role": "user", "content": "x"}]
    for body, status, words in [
            (b'{"model": "m", "messages": [', 400, ["not valid JSON"]),
            (json.dumps({"model": M, "max_tokens": 5, "messages": "hi"}).encode(), 400, ["messages"]),
            (json.dumps({"model": M, "max_tokens": 5, "messages": [{"role": "x", "content": ""}]}).encode(),
             400, ["messages[0].role"]),
            (json.dumps({"model": M, "messages": user}).encode(), 400, ["max_tokens"]),
            (json.dumps({"model": M, "max_tokens": 5, "thinking": {"type": "enabled", "budget_tokens": 0},
                         "messages": user}).encode(), 400, ["budget_tokens"]),
            (json.dumps({"model": M, "max_tokens": 5, "output_config": {"format": {"type": "regex"}},
                         "messages": user}).encode(), 400, ["output_config.format"])]:
        r = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == status, r.text
        error = r.json()
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
        assert all(w in error["error"]["message"] for w in words), error
    r = httpx.post(scripted.url + "/v1/messages/nope", json={}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    # The OpenAI routes keep OpenAI's shape.
    r = httpx.post(scripted.url + "/v1/chat/completions", json={"messages": []}, timeout=30)
    assert r.status_code == 400 and "param" in r.json()["error"]


PNG = {"type": "base64", "media_type": "image/png", "data": "AA=="}


def test_tool_result_images_become_a_note(scripted):
    history = [{"role": "user", "content": "Take a screenshot"},
               {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                  "input": {"city": "Paris"}}]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [
                   {"type": "text", "text": "here"},
                   {"type": "image", "source": PNG}]}]}]
    r = client(scripted).messages.create(model=M, max_tokens=20, messages=history, tools=[WEATHER],
                                         thinking=OFF)
    assert r.stop_reason == "end_turn"
    note = "<tool_result>here\n\n[image omitted: this model reads text only]</tool_result>"
    assert note in last_call(scripted).prompt


def test_structured_output_config(scripted):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    r = client(scripted).messages.create(model=M, max_tokens=50, thinking=OFF,
                                         output_config={"format": {"type": "json_schema", "schema": schema}},
                                         messages=[{"role": "user", "content": "Reply in JSON"}])
    assert json.loads(r.content[0].text) == {"a": 1}
    assert "## Response Format" in last_call(scripted).prompt


def test_server_tools_and_their_history_are_left_out(scripted):
    # Claude Code offers Anthropic's server-side web search next to its own tools; a history may
    # hold another server's opaque blocks. Neither is ours to render.
    search = {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}
    history = [{"role": "user", "content": "Look it up"},
               {"role": "assistant", "content": [
                   {"type": "redacted_thinking", "data": "opaque"},
                   {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search",
                    "input": {"query": "x"}},
                   {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []},
                   {"type": "text", "text": "Found it."}]},
               {"role": "user", "content": "Say hi"}]
    r = client(scripted).messages.create(model=M, max_tokens=20, messages=history,
                                         tools=[WEATHER, search], thinking=OFF)
    assert r.content[0].text == "Hi!"
    prompt = last_call(scripted).prompt
    assert "web_search" not in prompt and "get_weather" in prompt
    assert "Found it.<｜end▁of▁sentence｜>" in prompt


def test_a_failure_mid_stream_is_an_error_event(scripted):
    body = {"model": M, "max_tokens": 50, "stream": True, "thinking": OFF,
            "messages": [{"role": "user", "content": "explode"}]}
    raw = httpx.post(scripted.url + "/v1/messages", json=body, timeout=30).text
    assert "event: error" in raw and "message_stop" not in raw
    error = json.loads(raw.split("event: error", 1)[1].split("data: ", 1)[1].splitlines()[0])
    assert error["type"] == "error" and error["error"]["type"] == "api_error"
    assert "the scripted model broke" in error["error"]["message"]
    with pytest.raises(anthropic.APIStatusError):
        stream_events(scripted, "explode")


def test_a_claude_code_shaped_request(scripted):
    # What Claude Code sends (its shape, not its text): beta query and headers, system blocks with
    # cache control, draft-07 tool schemas, a server tool, thinking with a budget, a stream.
    draft7 = "http://json-schema.org/draft-07/schema#"
    schema = {"$schema": draft7, "type": "object", "additionalProperties": False,
              "properties": {"command": {"type": "string", "description": "The command"},
                             "timeout": {"type": "number", "description": "ms"},
                             "run_in_background": {"type": "boolean"}}, "required": ["command"]}
    todo = {"type": "object", "properties": {"todos": {"type": "array", "items": {
        "type": "object", "additionalProperties": False, "required": ["content", "status"], "properties": {
            "content": {"type": "string", "minLength": 1},
            "status": {"type": "string", "enum": ["pending", "in_progress", "completed"]}}}}},
        "required": ["todos"], "additionalProperties": False, "$schema": draft7}
    body = {"model": "claude-sonnet-4-5", "max_tokens": 32000, "stream": True, "temperature": 1,
            "metadata": {"user_id": "user_abc_session_1"},
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "system": [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
            "tools": [{"name": "Bash", "description": "Run a command.", "input_schema": schema},
                      {"name": "TodoWrite", "description": "Track tasks.", "input_schema": todo},
                      {"type": "web_search_20250305", "name": "web_search", "max_uses": 8}],
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "<system-reminder>context</system-reminder>"},
                {"type": "text", "text": "Say hi", "cache_control": {"type": "ephemeral"}}]}]}
    headers = {"x-api-key": "sk-ant-local", "anthropic-version": "2023-06-01",
               "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14"}
    with httpx.stream("POST", scripted.url + "/v1/messages?beta=true", json=body, headers=headers,
                      timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    names = [line[7:] for line in text.splitlines() if line.startswith("event: ")]
    assert names[:2] == ["message_start", "ping"] and names[-2:] == ["message_delta", "message_stop"]
    assert names.count("content_block_start") == names.count("content_block_stop") == 2  # thinking, text
    prompt = last_call(scripted).prompt
    assert prompt.startswith("You are Claude Code.") and '"name": "TodoWrite"' in prompt
    assert "web_search" not in prompt and prompt.endswith("Say hi<｜Assistant｜><think>")


# ----- what Claude Code sends today (issue 24) ---------------------------------------------------

def test_thinking_absent_means_off_as_at_anthropic(scripted):
    r = client(scripted).messages.create(model=M, max_tokens=50, messages=[{"role": "user", "content": "Say hi"}])
    assert [b.type for b in r.content] == ["text"]
    assert last_call(scripted).prompt.endswith("<｜Assistant｜></think>")
    for kind in ({"type": "adaptive"}, ON):
        assert [b.type for b in ask(scripted, thinking=kind).content] == ["thinking", "text"]


def test_effort_from_output_config(scripted):
    ask(scripted, thinking={"type": "adaptive"}, output_config={"effort": "low"})
    low = last_call(scripted).prompt
    ask(scripted, thinking={"type": "adaptive"}, output_config={"effort": "high"})
    high = last_call(scripted).prompt
    assert low != high and high.endswith("<think>")
    ask(scripted, thinking=OFF, output_config={"effort": "max"})  # an effort without thinking: ignored
    assert last_call(scripted).prompt.endswith("</think>")


def test_forced_tool_choice_does_not_think_and_ends_with_the_call(scripted):
    for choice in ({"type": "any"}, {"type": "tool", "name": "get_weather"}):
        r = ask(scripted, tools=[WEATHER], tool_choice=choice, thinking={"type": "adaptive"})
        assert [b.type for b in r.content] == ["tool_use"] and r.stop_reason == "tool_use"
        assert "<｜Assistant｜></think>" in last_call(scripted).prompt


def test_system_messages_inside_messages(scripted):
    # After a user turn the text joins that turn (the encoder would run it into it with no
    # assistant prefix); after an assistant turn it stands bare after EOS, as the encoder puts it.
    messages = [{"role": "user", "content": "First"},
                {"role": "system", "content": [{"type": "text", "text": "Agents: A, B.",
                                                "cache_control": {"type": "ephemeral"}}]},
                {"role": "assistant", "content": "Ok."},
                {"role": "system", "content": "Be terse."},
                {"role": "user", "content": "Say hi"},
                {"role": "system", "content": "Skills: none."}]
    r = client(scripted).messages.create(model=M, max_tokens=50, system="S.", messages=messages)
    assert r.content[0].text == "Hi!"
    assert last_call(scripted).prompt == ("S.<｜User｜>First\n\nAgents: A, B.<｜Assistant｜></think>Ok."
                                          "<｜end▁of▁sentence｜>Be terse.<｜User｜>Say hi\n\nSkills: none."
                                          "<｜Assistant｜></think>")


def test_context_management_clears_old_thinking(scripted):
    def turn(n):
        return [{"role": "user", "content": f"q{n}"}, {"role": "assistant", "content": [
            {"type": "thinking", "thinking": f"thought {n}", "signature": "sig"},
            {"type": "tool_use", "id": f"toolu_{n}", "name": "get_weather", "input": {"city": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"toolu_{n}", "content": "rain"}]}]

    history = turn(1) + turn(2) + turn(3)
    history[-1]["content"].append({"type": "text", "text": "Say hi"})
    for keep, kept in [("all", [1, 2, 3]), ({"type": "thinking_turns", "value": 2}, [2, 3]),
                       (None, [3]), ({"type": "thinking_turns", "value": 0}, [])]:
        edit = {"type": "clear_thinking_20251015", **({"keep": keep} if keep is not None else {})}
        client(scripted).messages.create(
            model=M, max_tokens=50, messages=history, tools=[WEATHER], thinking={"type": "adaptive"},
            extra_body={"context_management": {"edits": [edit, {"type": "clear_tool_uses_20250919"}]}})
        prompt = last_call(scripted).prompt
        assert [n for n in (1, 2, 3) if f"thought {n}" in prompt] == kept, keep
    # Without the edit every thought stays (with tools, V4 keeps all reasoning).
    client(scripted).messages.create(model=M, max_tokens=50, messages=history, tools=[WEATHER],
                                     thinking={"type": "adaptive"})
    assert all(f"thought {n}" in last_call(scripted).prompt for n in (1, 2, 3))


def test_refusals_of_bodies_anthropic_refuses(scripted):
    url = scripted.url + "/v1/messages?beta=true"
    user = [{"role": "user", "content": "x"}]
    call = {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                              "input": {"city": "Paris"}}]}

    def result(**kw):
        return {"role": "user", "content": [{"type": "tool_result", "content": "rain", **kw}]}

    for body, words in [
            ({"max_tokens": "4", "messages": user}, ["max_tokens", "integer"]),
            ({"max_tokens": True, "messages": user}, ["max_tokens", "integer"]),
            ({"max_tokens": 4, "stream": "yes", "messages": user}, ["stream", "boolean"]),
            ({"max_tokens": 4, "messages": user + [call, result()]}, ["messages[2].content[0].tool_use_id"]),
            ({"max_tokens": 4, "messages": user + [call, result(tool_use_id="toolu_9")]},
             ["toolu_9", "no corresponding tool_use"]),
            ({"max_tokens": 4, "messages": [result(tool_use_id="toolu_1")]}, ["toolu_1"]),
            ({"max_tokens": 4, "messages": user + [{"role": "assistant", "content": [
                {"type": "tool_use", "name": "get_weather", "input": {}}]}]}, ["messages[1].content[0].id"]),
            ({"max_tokens": 4, "messages": user + [{"role": "assistant", "content": [
                {"type": "tool_use", "id": "t", "name": "get_weather", "input": "Paris"}]}]},
             ["messages[1].content[0].input", "object"])]:
        r = httpx.post(url, json={"model": M, "tools": [WEATHER], **body}, timeout=30)
        assert r.status_code == 400, (body, r.text)
        error = r.json()
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
        assert all(w in error["error"]["message"] for w in words), error


def raw_events(url: str, body: dict) -> list[tuple[str, dict]]:
    from test_clients import sse_events

    with httpx.stream("POST", url + "/v1/messages", json=dict(body, stream=True), timeout=60) as r:
        assert r.status_code == 200
        return sse_events("".join(r.iter_text()))


def test_a_long_prefill_sends_events_claude_code_counts(scripted, tokenizer, encoding):
    # Claude Code resets its 300 s stream watchdog on content events only (not on `ping`, not on
    # SSE comments): while the prompt is read, the first block opens and gets empty deltas.
    config = ServerConfig(model_id=M, tokenizer=tokenizer, max_context=4096, encoding=encoding, activity=0.0)
    server = Running(create_app(scripted.engine, config))
    try:
        long = "Say hi. " + "filler words " * 300  # ~1,200 tokens: three 512-token prefill chunks
        for thinking, block, field in [(None, "text", "text"), ({"type": "adaptive"}, "thinking", "thinking")]:
            body = {"model": M, "max_tokens": 50, "messages": [{"role": "user", "content": long}],
                    **({"thinking": thinking} if thinking else {})}
            events = raw_events(server.url, body)
            names = [n for n, _ in events]
            assert names[:3] == ["message_start", "ping", "content_block_start"]
            assert events[2][1]["content_block"]["type"] == block
            deltas = [d["delta"] for n, d in events if n == "content_block_delta"]
            empty = [d for d in deltas if d.get(field) == ""]
            assert len(empty) >= 3 and deltas[: len(empty)] == empty  # one per chunk, before the reply
            final = [d.get(field) for d in deltas if d.get(field)]
            assert "".join(final) == ("Hi!" if block == "text" else REASONING)
            assert names.count("content_block_start") == names.count("content_block_stop") == (
                1 if block == "text" else 2)
        # Without activity (the default, within 15 s) the short reply's events are unchanged.
        body = {"model": M, "max_tokens": 50, "messages": [{"role": "user", "content": "Say hi"}]}
        events = raw_events(scripted.url, body)
        assert [d["delta"]["text"] for n, d in events if n == "content_block_delta"] == ["Hi", "!"]
    finally:
        server.close()


def test_streamed_usage_is_the_same_at_start_and_end(tiny):
    # Anthropic's message_delta usage is cumulative: the input counts repeat message_start's.
    body = {"model": M, "max_tokens": 3, "messages": [{"role": "user", "content": "cache me " * 40}]}
    for turn in range(2):
        events = raw_events(tiny.url, dict(body, temperature=0))
        start, end = events[0][1]["message"]["usage"], events[-2][1]["usage"]
        assert {k: v for k, v in start.items() if k != "output_tokens"} == {
            k: v for k, v in end.items() if k != "output_tokens"}
        assert (start["cache_read_input_tokens"] > 0) == (turn == 1), start
        r = client(tiny).messages.create(**body)
        assert r.usage.input_tokens + r.usage.cache_read_input_tokens == start["input_tokens"] + start[
            "cache_read_input_tokens"]


def test_tool_input_streams_and_a_cut_call_is_kept(scripted):
    note = {"name": "write_note", "input_schema": NOTE["function"]["parameters"]}
    events, final = stream_events(scripted, "Write a note", tools=[note])
    partial = [e.delta.partial_json for e in events if e.type == "content_block_delta"
               and e.delta.type == "input_json_delta"]
    assert len(partial) > 10 and final.content[0].input["text"].startswith("line one")
    tok = scripted.backend.tok
    tokens = tok.encode(dsml(("write_note", {"text": "line one\nline two"})), allow_control=True)
    cut = next(n for n in range(len(tokens)) if "line one" in tok.decode(tokens[:n]))
    r = ask(scripted, "Write a note", tools=[note], max_tokens=cut)
    assert r.stop_reason == "max_tokens"
    (use,) = r.content
    assert use.type == "tool_use" and use.name == "write_note" and use.input["text"].startswith("line")

"""The Responses API through the official `openai` client against a live server (issue 24).

The servers are test_server's: a scripted backend (the reply depends on the prompt) for what the
model says, and a tiny random V4 model through the real `Session` for cached tokens and constrained
output. Codex's recorded request bodies (tests/fixtures/clients/codex_*.json) are replayed as sent.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from mlx_dsv4.serve import responses, responses_events
from mlx_dsv4.serve.protocol import Delta, ServerConfig
from mlx_dsv4.serve.responses import seal, unseal
from mlx_dsv4.serve.schema import APIError
import test_server
from test_server import (EOS, M, NOTE_TEXT, PARIS, REASONING, ScriptedBackend, dsml,  # noqa: F401
                         encoding, last_call, script, scripted, start, tiny, tokenizer)

CLIENTS = Path(__file__).parent / "fixtures" / "clients"
CODEX = sorted(CLIENTS.glob("codex_*.json"))
OFF = {"effort": "none"}
WEATHER = {"type": "function", "name": "get_weather", "description": "The get_weather tool.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"]}}
NOTE = {"type": "function", "name": "write_note", "description": "The write_note tool.",
        "parameters": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}
EVENT = TypeAdapter(ResponseStreamEvent)


def client(server) -> openai.OpenAI:
    return server.client()


def create(server, input="Say hi", **kw):
    kw.setdefault("reasoning", OFF)
    return client(server).responses.create(model=M, input=input, **kw)


def streamed(server, input="Say hi", **kw) -> list:
    kw.setdefault("reasoning", OFF)
    return list(client(server).responses.create(model=M, input=input, stream=True, **kw))


def check_lifecycle(events) -> None:
    """What every stream must be: numbered from 0 in order, created and in_progress first, one end
    event last, every item added before its deltas and done after them, at its output index."""
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete", "response.failed")
    assert sum(k in ("response.completed", "response.incomplete", "response.failed") for k in kinds) == 1
    added, done = {}, {}
    for e in events:
        if e.type == "response.output_item.added":
            assert e.output_index == len(added) and e.item.status == "in_progress"
            added[e.item.id] = e.output_index
        elif e.type == "response.output_item.done":
            assert added[e.item.id] == e.output_index and e.item.id not in done
            done[e.item.id] = e.item
        elif hasattr(e, "item_id"):
            assert e.item_id in added and e.item_id not in done, e.type
    assert set(done) == set(added)
    final = events[-1].response
    assert [o.id for o in final.output] == list(added) == list(done)
    for e in events:  # every field the SDK's types require, of the type they say
        if e.type != "response.failed":  # its error code names the cause, as Codex reads it
            EVENT.validate_python(e.to_dict())


# ----- basics ------------------------------------------------------------------------------------

def test_text_reply_and_usage(scripted):
    r = create(scripted, instructions="Be brief.", temperature=0.5, top_p=0.9, max_output_tokens=50)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == M and r.status == "completed"
    assert r.output_text == "Hi!" and [o.type for o in r.output] == ["message"]
    assert r.output[0].role == "assistant" and r.output[0].status == "completed"
    call = last_call(scripted)
    assert call.prompt.startswith("Be brief.<｜User｜>Say hi<｜Assistant｜></think>")
    assert call.kw["temperature"] == 0.5 and call.kw["top_p"] == 0.9 and call.kw["max_tokens"] == 50
    u = r.usage
    assert u.input_tokens == len(call.ids) and u.output_tokens == 3  # "Hi", "!", EOS
    assert u.total_tokens == u.input_tokens + 3 and u.input_tokens_details.cached_tokens == 0
    assert u.output_tokens_details.reasoning_tokens == 0
    assert r.instructions == "Be brief." and r.max_output_tokens == 50 and r.temperature == 0.5


def test_input_items_render_as_chat_messages(scripted):
    create(scripted, instructions="Sys.", input=[
        {"role": "developer", "content": "Dev."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "A"},
                                                        {"type": "input_text", "text": "B"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "X"}]},
        {"role": "user", "content": "Say hi"}])
    assert last_call(scripted).prompt == (
        "Sys.\n\nDev.<｜User｜>A\n\nB<｜Assistant｜></think>X<｜end▁of▁sentence｜>"
        "<｜User｜>Say hi<｜Assistant｜></think>")


def test_streamed_lifecycle(scripted):
    events = streamed(scripted)
    check_lifecycle(events)
    # (A slow machine may pause long enough for another in_progress: those are left out here.)
    kinds = [e.type for i, e in enumerate(events) if i < 2 or e.type != "response.in_progress"]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * kinds.count(
                         "response.output_text.delta"), "response.output_text.done",
                     "response.content_part.done", "response.output_item.done", "response.completed"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Hi!"
    final = events[-1].response
    assert final.status == "completed" and final.output_text == "Hi!" and final.usage.output_tokens == 3
    assert events[0].response.status == "in_progress" and events[0].response.id == final.id
    # The SDK's stream helper, which checks each event against the response it builds.
    with client(scripted).responses.stream(model=M, input="Say hi", reasoning=OFF) as s:
        assert s.get_final_response().output_text == "Hi!"
    # Raw: named events, no chat-completions "[DONE]".
    body = {"model": M, "input": "Say hi", "stream": True, "reasoning": OFF}
    raw = httpx.post(scripted.url + "/v1/responses", json=body, timeout=30).text
    names = [line[len("event: "):] for line in raw.splitlines() if line.startswith("event: ")]
    assert names[0] == "response.created" and names[-1] == "response.completed" and "[DONE]" not in raw


def test_reasoning_items_and_encrypted_content(scripted):
    r = create(scripted, reasoning={"effort": "high", "summary": "auto"},
               include=["reasoning.encrypted_content"])
    assert [o.type for o in r.output] == ["reasoning", "message"]
    rs = r.output[0]
    assert [c.text for c in rs.content] == [REASONING] and rs.summary == []
    assert unseal(rs.encrypted_content) == REASONING and r.output_text == "Hi!"
    assert r.usage.output_tokens_details.reasoning_tokens > 0
    assert r.reasoning.effort == "high" and r.reasoning.summary == "auto"
    assert last_call(scripted).prompt.endswith("<｜Assistant｜><think>")
    assert create(scripted, reasoning={"effort": "low"}).output[0].encrypted_content is None  # not asked
    events = streamed(scripted, reasoning={"effort": "high"})
    check_lifecycle(events)
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == REASONING
    (done,) = [e for e in events if e.type == "response.reasoning_text.done"]
    assert done.text == REASONING


def test_encrypted_reasoning_round_trips_on_tool_turns(scripted):
    # Codex's way (store: false): the reasoning comes back sealed, then the call and its output.
    items = [{"role": "user", "content": "Weather in Paris for 2 days?"},
             {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": seal("I should look.")},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather",
              "arguments": json.dumps(PARIS)},
             {"type": "function_call_output", "call_id": "call_1", "output": "rain"}]
    r = create(scripted, items, tools=[WEATHER], store=False, reasoning={"effort": "high"})
    assert r.output_text == "Hello! How can I help?"
    prompt = last_call(scripted).prompt
    assert "<think>I should look.</think>" in prompt and "<tool_result>rain</tool_result>" in prompt
    assert '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>' in prompt
    # Reasoning written elsewhere (OpenAI's own encrypted blob) is left out, not guessed at.
    items[1] = {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAAAB-opaque"}
    create(scripted, items, tools=[WEATHER], store=False, reasoning={"effort": "high"})
    assert "<think></think>" in last_call(scripted).prompt


# ----- tools -------------------------------------------------------------------------------------

def test_function_call(scripted):
    r = create(scripted, "Weather in Paris for 2 days?", tools=[WEATHER])
    (fc,) = r.output
    assert fc.type == "function_call" and fc.name == "get_weather" and json.loads(fc.arguments) == PARIS
    assert fc.call_id.startswith("call_") and fc.id.startswith("fc_") and fc.status == "completed"
    assert r.status == "completed"
    events = streamed(scripted, "Weather in Paris for 2 days?", tools=[WEATHER])
    check_lifecycle(events)
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert json.loads(args) == PARIS and done.arguments == args
    assert events[-1].response.output[0].arguments == args


def test_parallel_calls_and_tool_choice(scripted):
    r = create(scripted, "Weather in Paris and Rome?", tools=[WEATHER])
    assert [json.loads(o.arguments)["city"] for o in r.output] == ["Paris", "Rome"]
    assert len({o.call_id for o in r.output}) == 2
    r = create(scripted, "Weather in Paris and Rome?", tools=[WEATHER], parallel_tool_calls=False)
    assert [o.type for o in r.output] == ["function_call"] and r.parallel_tool_calls is False
    for choice in ("required", {"type": "function", "name": "get_weather"}):
        r = create(scripted, tools=[WEATHER, NOTE], tool_choice=choice)
        assert [(o.name, json.loads(o.arguments)) for o in r.output] == [("get_weather", PARIS)]
    r = create(scripted, "Weather in Paris for 2 days?", tools=[WEATHER], tool_choice="none")
    assert [o.type for o in r.output] == ["message"]
    allowed = {"type": "allowed_tools", "mode": "required",
               "tools": [{"type": "function", "name": "get_weather"}]}
    r = create(scripted, tools=[WEATHER, NOTE], tool_choice=allowed)
    assert [o.name for o in r.output] == ["get_weather"]


def test_custom_tool_is_one_raw_string_parameter(scripted):
    patch = {"type": "custom", "name": "write_note", "description": "Write a note.",
             "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"}}
    r = create(scripted, "Write a note", tools=[patch])
    (call,) = r.output
    assert call.type == "custom_tool_call" and call.name == "write_note" and call.input == NOTE_TEXT
    tools_block = last_call(scripted).prompt
    assert '"name": "write_note"' in tools_block and "lark grammar:\\nstart: /.+/" in tools_block
    events = streamed(scripted, "Write a note", tools=[patch])
    check_lifecycle(events)
    (done,) = [e for e in events if e.type == "response.custom_tool_call_input.done"]
    assert done.input == NOTE_TEXT == events[-1].response.output[0].input
    # The call and its output come back as the raw DSML string parameter and a tool result.
    create(scripted, [{"role": "user", "content": "Write a note"},
                      {"type": "custom_tool_call", "call_id": "c1", "name": "write_note", "input": "a\n<b>"},
                      {"type": "custom_tool_call_output", "call_id": "c1", "output": "saved"}], tools=[patch])
    prompt = last_call(scripted).prompt
    assert '<｜DSML｜parameter name="input" string="true">a\n<b></｜DSML｜parameter>' in prompt
    assert "<tool_result>saved</tool_result>" in prompt


def test_namespace_tools_and_hosted_tools(scripted, monkeypatch):
    ns = {"type": "namespace", "name": "weather", "description": "Weather tools.",
          "tools": [dict(WEATHER, name="get_weather")]}
    r = create(scripted, "Say hi", tools=[ns, {"type": "web_search"}, {"type": "tool_search"}])
    assert r.output_text == "Hi!" and [t.type for t in r.tools] == ["namespace", "web_search", "tool_search"]
    prompt = last_call(scripted).prompt
    assert '"name": "weather.get_weather"' in prompt and "web_search" not in prompt
    # Only hosted tools: a plain reply, no tools block.
    r = create(scripted, "Say hi", tools=[{"type": "web_search"}], tool_choice="auto")
    assert r.output_text == "Hi!" and "get_weather" not in last_call(scripted).prompt
    # A namespaced call comes back with its namespace.
    monkeypatch.setitem(test_server.REPLIES, "Namespaced", dsml(("weather.get_weather", PARIS)))
    r = create(scripted, "Namespaced call", tools=[ns])
    calls = [(o.namespace, o.name, json.loads(o.arguments)) for o in r.output]
    assert calls == [("weather", "get_weather", PARIS)]


def test_json_schema_text_format_on_the_real_model(tiny):
    schema = {"type": "object", "properties": {"color": {"type": "string", "enum": ["red", "green"]},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["color", "n"], "additionalProperties": False}
    fmt = {"format": {"type": "json_schema", "name": "pick", "schema": schema, "strict": True}}
    r = create(tiny, "Pick", text=fmt, max_output_tokens=60, temperature=1.0)
    value = json.loads(r.output_text)
    assert set(value) == {"color", "n"} and value["color"] in ("red", "green") and 0 <= value["n"] <= 9
    assert r.text.format.type == "json_schema" and r.text.format.name == "pick"
    events = streamed(tiny, "Pick", text=fmt, max_output_tokens=60)
    check_lifecycle(events)
    assert set(json.loads(events[-1].response.output_text)) == {"color", "n"}


# ----- limits and stored responses ---------------------------------------------------------------

def test_max_output_tokens_is_incomplete(scripted):
    r = create(scripted, "count from 1 to 5", max_output_tokens=2)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].status == "incomplete" and r.usage.output_tokens == 2
    events = streamed(scripted, "count from 1 to 5", max_output_tokens=2)
    check_lifecycle(events)
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"


def test_previous_response_id_continues_the_stored_conversation(scripted, tokenizer):
    r1 = create(scripted, "Weather in Paris for 2 days?", tools=[WEATHER], reasoning={"effort": "high"},
                instructions="Be brief.")
    first = last_call(scripted)
    (fc,) = [o for o in r1.output if o.type == "function_call"]
    r2 = create(scripted, [{"type": "function_call_output", "call_id": fc.call_id, "output": "rain"}],
                previous_response_id=r1.id, tools=[WEATHER], reasoning={"effort": "high"},
                instructions="Be brief.")
    second = last_call(scripted)
    assert r2.previous_response_id == r1.id and r2.output_text == "Hello! How can I help?"
    # The second prompt is the first one, then exactly the tokens the model wrote (its reasoning,
    # the call, EOS), then the tool result: a session holding the first reply's state reads only
    # the new tokens (V4 keeps reasoning on tool turns, A9).
    wrote = tokenizer.encode(script(first.prompt), allow_control=True) + [EOS]
    assert second.ids[: len(first.ids) + len(wrote)] == first.ids + wrote
    assert second.prompt.endswith("<tool_result>rain</tool_result><｜Assistant｜><think>")
    # Stored: GET returns it, DELETE forgets it, and an unknown id is a 404 / 400 in OpenAI's shape.
    c = client(scripted)
    got = c.responses.retrieve(r1.id)
    assert got.id == r1.id and got.output[0].type == "reasoning"
    assert got.usage.output_tokens == r1.usage.output_tokens
    c.responses.delete(r1.id)
    with pytest.raises(openai.NotFoundError) as e:
        c.responses.retrieve(r1.id)
    assert e.value.body["param"] == "response_id" and r1.id in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        c.responses.delete(r1.id)
    with pytest.raises(openai.BadRequestError) as e:
        create(scripted, "Say hi", previous_response_id=r1.id)
    assert e.value.body["param"] == "previous_response_id"
    # store: false keeps nothing.
    r = create(scripted, store=False)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(r.id)


def test_cached_tokens_from_the_sessions_state(tiny):
    # The real Session: the second turn's prompt extends the first prompt and its reply (one greedy
    # token), which the live cache holds: only the new turn is read.
    r1 = create(tiny, "Hello there", max_output_tokens=1, temperature=0)
    r2 = create(tiny, "And again", previous_response_id=r1.id, max_output_tokens=1, temperature=0)
    assert r2.usage.input_tokens_details.cached_tokens == r1.usage.input_tokens + r1.usage.output_tokens
    assert r2.usage.input_tokens > r1.usage.input_tokens


# ----- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,param,words", [
    ({"max_output_tokens": 0}, "max_output_tokens", "greater than or equal to 1"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]},
     "input[0].content[0].type", "input_image"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type", "item_reference"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id", "call_id"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format", "json_schema"),
    ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice", "hosted"),
    ({"tool_choice": "required"}, "tool_choice", "offers no tools"),
    ({"reasoning": {"effort": "extreme"}}, "reasoning.effort", "Input should be"),
    ({"background": True}, "background", "foreground"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "string", "pattern": "(?<=a)b"}}}}], "tool_choice": "required"},
     "tools[0].parameters.properties.x", "cannot be enforced"),
])
def test_errors_in_openai_shape(scripted, kw, param, words):
    kw.setdefault("input", "Say hi")
    with pytest.raises(openai.BadRequestError) as e:
        client(scripted).responses.create(model=M, **kw)
    body = e.value.body
    assert body["type"] == "invalid_request_error" and body["param"] == param, body
    assert words in body["message"]


def test_refused_in_stream_is_response_failed(scripted):
    with pytest.raises(openai.BadRequestError) as e:  # not streamed: a 400 before any output
        create(scripted, "refuse this")
    assert e.value.code == "context_length_exceeded"
    events = streamed(scripted, "refuse this")
    check_lifecycle(events)
    assert events[-1].type == "response.failed"
    assert events[-1].response.status == "failed"
    assert events[-1].response.error.code == "context_length_exceeded"


def test_quiet_prompt_reading_sends_in_progress_and_a_closed_stream_stops_the_job(tokenizer, encoding):
    # While the prompt is read no delta comes: the stream says response.in_progress again every
    # `every` seconds, so that a client's idle timer (Codex: 300 s) sees the server working.
    cfg = ServerConfig(model_id=M, tokenizer=tokenizer, max_context=4096, encoding=encoding)
    store, closed = responses.Store(), []

    async def run(stop_early: bool):
        turn = responses.prepare(responses.ResponsesRequest(input="Say hi", reasoning=OFF), cfg, store)
        gate, more = asyncio.Event(), asyncio.Event()

        async def deltas():
            try:
                await gate.wait()  # opens only when the test says so
                yield Delta(content="Hi")
                await more.wait()  # a pause inside the reply: the snapshot shows it so far
                yield Delta(content="!")
                yield Delta(finish_reason="stop")
                yield Delta(usage={"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7})
            finally:
                closed.append(True)

        events = responses_events.events(deltas(), turn, store, every=0.01)
        kinds = [(await anext(events))[0] for _ in range(4)]
        if stop_early:
            await events.aclose()  # the client left while the prompt was being read
            return kinds, turn
        gate.set()
        while (event := await anext(events))[0] != "response.in_progress":
            kinds.append(event[0])
        kinds.append(event[0])
        assert event[1]["response"]["output"][0]["content"][0]["text"] == "Hi"
        EVENT.validate_python(event[1])
        more.set()
        return kinds + [name async for name, _ in events], turn

    kinds, _ = asyncio.run(run(stop_early=True))
    assert kinds == ["response.created"] + ["response.in_progress"] * 3 and closed == [True]
    closed.clear()
    kinds, turn = asyncio.run(run(stop_early=False))
    assert kinds[:4] == ["response.created"] + ["response.in_progress"] * 3
    assert kinds[-1] == "response.completed" and "response.output_text.delta" in kinds and closed == [True]
    assert store.get(turn.response["id"])["output"][0]["content"][0]["text"] == "Hi!"


def test_incremental_tool_call_fragments(tokenizer, encoding):
    # Protocol's tool-call deltas as chat streams them: the head (id, name, maybe a first piece of
    # the arguments), then pieces; each piece is one function_call_arguments.delta. A custom
    # tool's input is whole only at the end: one delta, then done.
    cfg = ServerConfig(model_id=M, tokenizer=tokenizer, max_context=4096, encoding=encoding)
    patch = {"type": "custom", "name": "apply_patch", "description": "Patch."}
    req = responses.ResponsesRequest(input="Say hi", reasoning=OFF, tools=[WEATHER, patch])
    store = responses.Store()
    turn = responses.prepare(req, cfg, store)
    script = [Delta(content="Let me look."),
              Delta(tool_calls=[{"index": 0, "id": "call_a", "type": "function",
                                 "function": {"name": "get_weather", "arguments": '{"city": "Pa'}}]),
              Delta(tool_calls=[{"index": 0, "function": {"arguments": 'ris", "days"'}}]),
              Delta(tool_calls=[{"index": 0, "function": {"arguments": ": 2}"}}]),
              Delta(tool_calls=[{"index": 1, "id": "call_b", "type": "function",
                                 "function": {"name": "apply_patch", "arguments": ""}}]),
              Delta(tool_calls=[{"index": 1, "function": {"arguments": '{"input": "*** Begin'}}]),
              Delta(tool_calls=[{"index": 1, "function": {"arguments": ' Patch\\n"}'}}]),
              Delta(finish_reason="tool_calls"), Delta(usage={"prompt_tokens": 9, "completion_tokens": 20})]

    async def deltas():
        for d in script:
            yield d

    async def run():
        return [data async for _, data in responses_events.events(deltas(), turn, store)]

    events = [EVENT.validate_python(e) for e in asyncio.run(run())]
    check_lifecycle(events)
    pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert pieces == ['{"city": "Pa', 'ris", "days"', ": 2}"]
    message, call, custom = events[-1].response.output
    assert message.content[0].text == "Let me look." and json.loads(call.arguments) == PARIS
    assert (call.call_id, custom.call_id, custom.type, custom.input) == (
        "call_a", "call_b", "custom_tool_call", "*** Begin Patch\n")
    assert [e.delta for e in events if e.type == "response.custom_tool_call_input.delta"] == [custom.input]
    # Stored as the conversation's assistant turn, the custom call is its one string parameter.
    (turn_msg,) = store.conversation(turn.response["id"])[1:]
    assert [c["function"] for c in turn_msg["tool_calls"]] == [
        {"name": "get_weather", "arguments": call.arguments},
        {"name": "apply_patch", "arguments": json.dumps({"input": "*** Begin Patch\n"})}]


def test_bounded_store_forgets_the_least_recently_used():
    store = responses.Store(max_count=2)
    for i in range(3):
        store.put({"id": f"r{i}"}, [{"role": "user", "content": str(i)}])
        if i == 1:
            store.get("r0")  # r0 used: r1 is now the oldest
    assert [store.get(k)["id"] for k in ("r0", "r2")] == ["r0", "r2"]
    with pytest.raises(APIError) as e:
        store.get("r1")
    assert e.value.status == 404
    small = responses.Store(max_bytes=200)
    small.put({"id": "a"}, [{"role": "user", "content": "x" * 100}])
    small.put({"id": "b"}, [{"role": "user", "content": "y" * 100}])
    assert small.get("b") and small.nbytes <= 200
    with pytest.raises(APIError):
        small.conversation("a")


# ----- Codex, as recorded ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def roomy(tokenizer, encoding):
    """The scripted model with room for Codex's 10K-token prompt."""
    backend = ScriptedBackend(tokenizer, max_context=32768)
    engine, config, server = start(lambda: backend, tokenizer, encoding, 32768, ping=0.2)
    server.backend = backend
    yield server
    server.close()
    engine.stop()


@pytest.mark.parametrize("path", CODEX, ids=[p.stem for p in CODEX])
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_codex_requests_replay(roomy, path, stream):
    fixture = json.loads(path.read_text(encoding="utf-8"))
    body = dict(fixture["body"], stream=stream)
    r = httpx.post(roomy.url + fixture["path"], json=body, headers=fixture["headers"], timeout=120)
    assert r.status_code == 200, r.text
    if stream:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [EVENT.validate_python(json.loads(line[len("data: "):]))
                  for line in r.text.splitlines() if line.startswith("data: ")]
        check_lifecycle(events)
        response = events[-1].response
    else:
        response = openai.types.responses.Response.model_validate(r.json())
    assert response.status == "completed" and response.output_text
    prompt = last_call(roomy).prompt
    assert body["input"][0]["content"][0]["text"] in prompt and "exec_command" in prompt
    sealed = [o.encrypted_content for o in response.output if o.type == "reasoning"]
    assert sealed and all(unseal(s) for s in sealed)  # Codex asks for reasoning.encrypted_content
    for item in body["input"]:  # what Codex sent back is in the prompt
        if item.get("type") == "reasoning":
            assert f"<think>{unseal(item['encrypted_content'])}</think>" in prompt
        if item.get("type") in ("function_call_output", "custom_tool_call_output"):
            assert f"<tool_result>{item['output']}</tool_result>" in prompt

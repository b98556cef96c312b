"""Request bodies recorded from real clients, replayed through the app: each gets a well-formed 200.

tests/fixtures/clients holds what the clients sent (path, headers, body), recorded by pointing
them at a local server (docs/agents.md says how). A scripted model (test_server's) answers
with reasoning, then a Bash call when the prompt offers Bash and holds no tool result yet.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from mlx_dsv4.generation.generate import stream_generate
from test_server import EOS, ScriptModel, dsml, encoding, start, tokenizer  # noqa: F401

FIXTURES = Path(__file__).parent / "fixtures" / "clients"
RECORDED = sorted(FIXTURES.glob("claude-code-*.json"))  # codex_*.json: test_responses replays them


class AgentBackend:
    """Reasons, then calls Bash once; after a tool result, answers in text."""

    def __init__(self, tokenizer, max_context: int):
        self.tok, self.max_context, self.calls = tokenizer, max_context, []

    def generate(self, ids, **kw):
        prompt = self.tok.decode(ids).removeprefix("<｜begin▁of▁sentence｜>")
        self.calls.append(prompt)
        reply = "Hi!" if "<tool_result>" in prompt or '"name": "Bash"' not in prompt else dsml(
            ("Bash", {"command": "echo hi", "description": "Say hi"}))
        if prompt.endswith("<think>"):
            reply = "The user says hi.</think>" + reply
        tokens = self.tok.encode(reply, allow_control=True) + [EOS]
        return stream_generate(ScriptModel(tokens, len(ids)), self.tok, ids, cache=[_Offset()],
                               max_context=self.max_context, **kw)


class _Offset:
    offset, state = 0, []


@pytest.fixture(scope="module")
def roomy(tokenizer, encoding):  # noqa: F811
    """A scripted server with room for an agent's whole prompt."""
    backend = AgentBackend(tokenizer, max_context=262_144)
    engine, config, server = start(lambda: backend, tokenizer, encoding, 262_144)
    server.backend = backend
    yield server
    server.close()
    engine.stop()


def sse_events(text: str) -> list[tuple[str, dict]]:
    """(event, data) of an Anthropic stream; comments and blank lines skipped."""
    out, name = [], None
    for line in text.splitlines():
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            out.append((name, json.loads(line[len("data: "):])))
    return out


def check_message_stream(events: list[tuple[str, dict]]) -> None:
    names = [n for n, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"], events
    assert all(n == d["type"] for n, d in events)
    open_blocks = []
    for name, data in events:
        if name == "content_block_start":
            assert data["index"] == len(open_blocks) and not any(open_blocks)
            open_blocks.append(True)
        elif name == "content_block_delta":
            assert open_blocks[data["index"]]
        elif name == "content_block_stop":
            open_blocks[data["index"]] = False
    assert open_blocks and not any(open_blocks)
    start, delta = events[0][1]["message"]["usage"], events[-2][1]["usage"]
    assert start["input_tokens"] > 0 and delta["output_tokens"] > 0
    assert events[-2][1]["delta"]["stop_reason"] in ("end_turn", "tool_use", "max_tokens")


@pytest.mark.parametrize("path", RECORDED, ids=[p.stem for p in RECORDED])
@pytest.mark.parametrize("streamed", [True, False], ids=["stream", "json"])
def test_recorded_request_gets_a_well_formed_reply(roomy, path, streamed):
    recorded = json.loads(path.read_text(encoding="utf-8"))
    body = dict(recorded["body"], stream=streamed)
    r = httpx.post(roomy.url + recorded["path"], json=body, headers=recorded["headers"], timeout=120)
    assert r.status_code == 200, r.text[:2000]
    answered = any(b.get("type") == "tool_result" for m in body["messages"] if isinstance(m["content"], list)
                   for b in m["content"])
    if streamed:
        events = sse_events(r.text)
        check_message_stream(events)
        stop = events[-2][1]["delta"]["stop_reason"]
    else:
        msg = r.json()
        assert msg["type"] == "message" and msg["role"] == "assistant" and msg["content"]
        assert msg["usage"]["input_tokens"] + msg["usage"]["cache_read_input_tokens"] > 0
        stop = msg["stop_reason"]
    assert stop == ("end_turn" if answered else "tool_use")
    prompt = roomy.backend.calls[-1]
    assert prompt.endswith("<｜Assistant｜><think>") and "## Tools" in prompt
    # Its mid-conversation system message (the agent list) reads inside the first user turn.
    first_user = prompt.split("<｜User｜>", 1)[1].split("<｜Assistant｜>", 1)[0]
    assert "say hi" in first_user and "Available agent types" in first_user

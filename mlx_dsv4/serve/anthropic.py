"""Anthropic's Messages API on the same engine: `/v1/messages` and `/v1/messages/count_tokens`.

A Messages request is validated here, then translated into the OpenAI-shaped `ChatRequest` the
chat route uses (system, also mid-conversation -> system messages, `tool_use` -> tool calls,
`tool_result` -> tool messages, `thinking` blocks -> reasoning, `tool_choice` any -> required,
`thinking` absent -> off as Anthropic does, `thinking.budget_tokens` or `output_config.effort` ->
effort, `context_management` edits applied to the history), so prompts, constraints and jobs are
built once, by `protocol.chat_job`. Replies are
the same `Delta`s rendered as Anthropic content blocks and stream events; errors take
Anthropic's shape. The engine knows neither wire format.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from typing import Any, AsyncIterator, Literal

from pydantic import Field, StrictBool, StrictInt, ValidationError, model_validator

from ..text import chat_format
from . import protocol
from .protocol import Delta
from .schema import APIError, ChatRequest, Loose, check_text, invalid

# Thinking budget (tokens) -> V4 effort: small budgets think briefly, very large ones think most.
LOW_BUDGET, MAX_BUDGET = 4096, 32768
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
               503: "overloaded_error", 529: "overloaded_error"}
STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use", "stop": "end_turn"}
TEXT_BLOCKS = ("text",)
# Assistant blocks another server wrote that this model cannot read back: dropped from history.
OPAQUE = ("redacted_thinking", "server_tool_use", "web_search_tool_result")


class Block(Loose):
    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: Any = None
    tool_use_id: str | None = None
    content: str | list["Block"] | None = None
    is_error: bool = False
    thinking: str | None = None
    signature: str | None = None


Block.model_rebuild()


class Message(Loose):
    # "system": Claude Code's mid-conversation system messages (beta mid-conversation-system).
    role: Literal["user", "assistant", "system"]
    content: str | list[Block]


class Tool(Loose):
    type: str | None = None  # None or "custom"; others are Anthropic's server tools (web search, ...)
    name: str
    description: str | None = None
    input_schema: dict = Field(default_factory=lambda: {"type": "object"})


class ToolChoice(Loose):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class Thinking(Loose):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=1)


class OutputConfig(Loose):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: dict | None = None  # {"type": "json_schema", "schema": {...}}


class Edit(Loose):
    type: str  # clear_thinking_20251015 is applied; other edits are accepted and left to the client
    keep: Any = None  # "all", or {"type": "thinking_turns", "value": N}


class ContextManagement(Loose):
    edits: list[Edit] = []


class MessagesRequest(Loose):
    model: str = ""
    messages: list[Message] = Field(min_length=1)
    max_tokens: StrictInt = Field(ge=1)  # Anthropic refuses "4" and true; so do we
    system: str | list[Block] | None = None
    stop_sequences: list[str] | None = Field(None, max_length=32)
    stream: StrictBool = False
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    metadata: dict | None = None
    context_management: ContextManagement | None = None

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data):
        check_text(data)
        return data


class CountRequest(MessagesRequest):
    max_tokens: StrictInt = Field(1, ge=1)  # count_tokens takes no budget


def _text(blocks: str | list[Block] | None, where: str) -> str:
    if blocks is None or isinstance(blocks, str):
        return blocks or ""
    for j, b in enumerate(blocks):
        if b.type not in TEXT_BLOCKS:
            raise APIError(400, f"{where}[{j}]: content blocks of type {b.type!r} are not supported "
                           "here; this model reads text only.", param=f"{where}[{j}].type")
    return "\n\n".join(b.text or "" for b in blocks)


def _result(content: str | list[Block] | None) -> str:
    """A tool result's text. An agent's tool may return an image (a screenshot): it is named in
    the text rather than refused, so that one tool's output does not end the agent's session."""
    if content is None or isinstance(content, str):
        return content or ""
    return "\n\n".join(b.text or "" if b.type == "text" else f"[{b.type} omitted: this model reads "
                        "text only]" for b in content)


def _user(m: Message, i: int, calls: set[str]) -> list[dict]:
    """One Anthropic user turn -> tool messages (its tool results, in order), then its text.
    Each result must answer a `tool_use` of the assistant turn before it (`calls`), as Anthropic
    requires: a result that answers nothing would be rendered as the answer to the first call."""
    blocks = [Block(type="text", text=m.content)] if isinstance(m.content, str) else m.content
    out, text = [], []
    for j, b in enumerate(blocks):
        where = f"messages[{i}].content[{j}]"
        if b.type == "tool_result":
            if not b.tool_use_id:
                raise APIError(400, f"{where}.tool_use_id: a tool_result names the tool_use it answers.",
                               param=f"{where}.tool_use_id")
            if b.tool_use_id not in calls:
                raise APIError(400, f"{where}: tool_result block(s) with id {b.tool_use_id!r} has no "
                               "corresponding tool_use block in the previous assistant message.",
                               param=f"{where}.tool_use_id")
            out.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": _result(b.content)})
        elif b.type == "text":
            text.append(b.text or "")
        else:
            raise APIError(400, f"{where}: content blocks of type {b.type!r} are not supported in a "
                           "user turn; this model reads text and tool results only.", param=f"{where}.type")
    if text or not out:
        out.append({"role": "user", "content": "\n\n".join(text)})
    return out


def _assistant(m: Message, i: int, keep_thinking: bool) -> dict:
    blocks = [Block(type="text", text=m.content)] if isinstance(m.content, str) else m.content
    text, reasoning, calls = [], [], []
    for j, b in enumerate(blocks):
        where = f"messages[{i}].content[{j}]"
        if b.type == "text":
            text.append(b.text or "")
        elif b.type == "thinking":
            reasoning.append(b.thinking or "")
        elif b.type == "tool_use":
            if not b.id:
                raise APIError(400, f"{where}.id: a tool_use block needs its id.", param=f"{where}.id")
            if not isinstance(b.input, dict):
                raise APIError(400, f"{where}.input: expected an object, got {_kind(b.input)}.",
                               param=f"{where}.input")
            calls.append({"id": b.id, "type": "function", "function": {
                "name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)}})
        elif b.type not in OPAQUE:
            raise APIError(400, f"{where}: content blocks of type {b.type!r} are not supported in an "
                           "assistant turn.", param=f"{where}.type")
    out = {"role": "assistant", "content": "".join(text)}
    if reasoning and keep_thinking:
        out["reasoning_content"] = "".join(reasoning)
    if calls:
        out["tool_calls"] = calls
    return out


def _kind(value) -> str:
    return {str: "a string", list: "a list", int: "an integer", float: "a number", bool: "a boolean",
            type(None): "null"}.get(type(value), "something else")


def effort(budget: int | None) -> str | None:
    if budget is None:
        return None
    return "low" if budget < LOW_BUDGET else "max" if budget >= MAX_BUDGET else "high"


def _thinking_kept(req: MessagesRequest) -> int | None:
    """How many of the last assistant turns that hold thinking keep it (None: all), by the
    `clear_thinking_20251015` edit (its default keeps the last one)."""
    edits = [e for e in (req.context_management.edits if req.context_management else [])
             if e.type.startswith("clear_thinking")]
    if not edits:
        return None
    keep = edits[-1].keep
    if keep == "all":
        return None
    if keep is None:
        return 1
    value = keep.get("value") if isinstance(keep, dict) else None
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        raise APIError(400, "context_management.edits: keep is \"all\" or {\"type\": \"thinking_turns\", "
                       "\"value\": N}.", param="context_management.edits")
    return value


def chat_request(req: MessagesRequest) -> ChatRequest:
    """The OpenAI-shaped request that means the same.

    A system message inside `messages` (Claude Code sends its agent and skill lists so) stays a
    system message where it stands. DeepSeek's encoder renders system text bare, with no role
    token, where it occurs: after an assistant turn that is the text after its EOS; after a user
    turn it would run into that turn's text with no assistant prefix to follow, so
    `protocol.normalize` joins it to that user turn (as the encoder joins user and tool
    messages): the text lands where the encoder puts it, and the model still gets its turn."""
    messages: list[dict] = []
    if req.system:
        messages.append({"role": "system", "content": _text(req.system, "system")})
    kept = _thinking_kept(req)
    thoughtful = [i for i, m in enumerate(req.messages) if m.role == "assistant" and not isinstance(
        m.content, str) and any(b.type == "thinking" for b in m.content)]
    keep = set(thoughtful if kept is None else thoughtful[len(thoughtful) - kept:] if kept else [])
    calls: set[str] = set()
    for i, m in enumerate(req.messages):
        if m.role == "user":
            messages += _user(m, i, calls)
            calls = set()
        elif m.role == "assistant":
            messages.append(_assistant(m, i, i in keep))
            calls = {c["id"] for c in messages[-1].get("tool_calls", [])}
        else:
            messages.append({"role": "system", "content": _text(m.content, f"messages[{i}].content")})
    body: dict[str, Any] = {"model": req.model, "messages": messages, "max_tokens": req.max_tokens,
                            "stop": req.stop_sequences, "temperature": req.temperature,
                            "top_p": req.top_p, "top_k": req.top_k,
                            "seed": (req.model_extra or {}).get("seed")}  # ours, not Anthropic's
    if tools := [t for t in req.tools or [] if t.type in (None, "custom")]:
        body["tools"] = [{"type": "function", "function": {
            "name": t.name, **({"description": t.description} if t.description is not None else {}),
            "parameters": t.input_schema}} for t in tools]
    # Without `thinking` Anthropic does not think; with tool_choice any/tool it cannot (it refuses
    # the pair): a forced call then comes at once, so the reply ends with the tool_use.
    thinking = req.thinking.type if req.thinking else "disabled"
    if (c := req.tool_choice) is not None:
        if c.type == "tool" and not c.name:
            raise APIError(400, "tool_choice.name: a tool choice of type 'tool' names the tool.",
                           param="tool_choice.name")
        body["tool_choice"] = ({"type": "function", "function": {"name": c.name}} if c.type == "tool"
                               else {"any": "required"}.get(c.type, c.type))
        body["parallel_tool_calls"] = not c.disable_parallel_tool_use
        if c.type in ("any", "tool"):
            thinking = "disabled"
    body["thinking"] = {"type": thinking}
    if thinking != "disabled" and (e := effort(req.thinking.budget_tokens)):
        body["reasoning_effort"] = e
    if (o := req.output_config) is not None:
        if o.effort and thinking != "disabled":
            body["reasoning_effort"] = o.effort
        if o.format:
            if o.format.get("type") != "json_schema" or not isinstance(o.format.get("schema"), dict):
                raise APIError(400, "output_config.format: expected {\"type\": \"json_schema\", "
                               "\"schema\": {...}}.", param="output_config.format")
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "output", "strict": True, "schema": o.format["schema"]}}
    try:
        return ChatRequest.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as e:  # a value this API lets through and the chat route does not
        raise invalid(e.errors()) from None


def chat_job(req: MessagesRequest, cfg) -> protocol.ChatJob:
    """The engine job for `req`; errors name the Messages API's fields (`tools[i].input_schema`)."""
    try:
        return protocol.chat_job(chat_request(req), cfg)
    except APIError as e:
        custom = [i for i, t in enumerate(req.tools or []) if t.type in (None, "custom")]

        def rename(text: str | None) -> str | None:
            return text and re.sub(r"tools\[(\d+)\]\.function\.parameters",
                                   lambda m: f"tools[{custom[int(m[1])]}].input_schema", text)

        e.message, e.param = rename(e.message), rename(e.param)
        e.args = (e.message,)
        raise


def error_body(e: APIError) -> dict:
    kind = ERROR_TYPES.get(e.status, "api_error" if e.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": e.message}}


def signature(thinking: str) -> str:
    """A thinking block's signature: a digest of its text (history signatures are not checked)."""
    return "mlx-dsv4:" + hashlib.sha256(thinking.encode()).hexdigest()[:32]


def usage(prompt: int, cached: int, output: int = 0) -> dict:
    return {"input_tokens": prompt - cached, "output_tokens": output,
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


def message(model: str) -> dict:
    return {"id": "msg_" + secrets.token_hex(12), "type": "message", "role": "assistant",
            "model": model, "content": [], "stop_reason": None, "stop_sequence": None}


async def events(deltas: AsyncIterator[Delta], msg: dict, reply: protocol.ChatReply,
                 activity: float | None = None) -> AsyncIterator[tuple[str, dict]]:
    """(event name, data) of a streamed reply: message_start, ping, each content block's
    start / deltas / stop, message_delta (stop reason and usage), message_stop.

    message_start waits for the engine's first word on the job (prefill progress or a token),
    which says how much of the prompt a cache held: its usage is then the one message_delta
    repeats with the output count (Anthropic's usage there is cumulative). While a prompt is
    read, every `activity` seconds of progress (None: never) opens the reply's first block early
    (thinking when it thinks, else text) and sends an empty delta in it: Claude Code's stream
    watchdog counts only such events (not `ping`, not SSE comments) and retries after 300 s."""
    index, kind, thought, start = -1, None, [], None
    stop = {"stop_reason": "end_turn", "stop_sequence": None}
    last = time.monotonic()

    def close():
        out = []
        if kind == "thinking":
            out.append(("content_block_delta", {"type": "content_block_delta", "index": index, "delta": {
                "type": "signature_delta", "signature": signature("".join(thought))}}))
        if kind is not None:
            out.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
        return out

    def begin(new: str, block: dict):
        nonlocal index, kind
        out = close()
        index, kind = index + 1, new
        return out + [("content_block_start", {"type": "content_block_start", "index": index,
                                               "content_block": block})]

    def delta(body: dict):
        return "content_block_delta", {"type": "content_block_delta", "index": index, "delta": body}

    def thinking_block():
        return begin("thinking", {"type": "thinking", "thinking": "", "signature": ""})

    def text_block():
        return begin("text", {"type": "text", "text": ""})

    async for d in deltas:
        out = []
        if start is None:
            start = usage(*reply.prompt_usage())
            out += [("message_start", {"type": "message_start", "message": dict(msg, usage=start)}),
                    ("ping", {"type": "ping"})]
        if d.progress is not None:
            if activity is not None and time.monotonic() - last >= activity:
                if kind is None:
                    out += thinking_block() if reply.cj.thinking else text_block()
                out.append(delta({"type": "thinking_delta", "thinking": ""} if kind == "thinking"
                                 else {"type": "text_delta", "text": ""}))
        if d.reasoning:
            if kind != "thinking":
                out += thinking_block()
            thought.append(d.reasoning)
            out.append(delta({"type": "thinking_delta", "thinking": d.reasoning}))
        if d.content:
            if kind != "text":
                out += text_block()
            out.append(delta({"type": "text_delta", "text": d.content}))
        for tc in d.tool_calls:
            if "id" in tc:
                out += begin("tool_use", {"type": "tool_use", "id": tc["id"].replace("call_", "toolu_", 1),
                                          "name": tc["function"]["name"], "input": {}})
            if args := tc["function"].get("arguments"):
                out.append(delta({"type": "input_json_delta", "partial_json": args}))
        if d.finish_reason:
            stop = {"stop_reason": "stop_sequence" if d.stop else STOP_REASONS[d.finish_reason],
                    "stop_sequence": d.stop}
        if d.usage is not None:
            out += close()
            kind = None
            out.append(("message_delta", {"type": "message_delta", "delta": stop, "usage": dict(
                start, output_tokens=d.usage["completion_tokens"])}))
        if out:
            last = time.monotonic()
        for item in out:
            yield item
    yield "message_stop", {"type": "message_stop"}


async def fold(deltas: AsyncIterator[Delta], msg: dict, reply: protocol.ChatReply) -> dict:
    """The non-streaming reply: the fold of the same events."""
    blocks: list[dict] = []
    async for name, data in events(deltas, msg, reply):
        if name == "content_block_start":
            blocks.append(dict(data["content_block"], partial=""))
        elif name == "content_block_delta":
            block, d = blocks[data["index"]], data["delta"]
            if d["type"] == "input_json_delta":
                block["partial"] += d["partial_json"]
            elif d["type"] == "signature_delta":
                block["signature"] = d["signature"]
            else:
                field = "thinking" if d["type"] == "thinking_delta" else "text"
                block[field] += d[field]
        elif name == "message_delta":
            msg = dict(msg, **data["delta"], usage=data["usage"])
    for block in blocks:
        partial = block.pop("partial")
        if block["type"] == "tool_use":  # a call cut by max_tokens: what was generated, closed
            try:
                block["input"] = json.loads(partial or "{}")
            except ValueError:
                block["input"] = json.loads(partial + chat_format.close_arguments(partial))
    return dict(msg, content=blocks)

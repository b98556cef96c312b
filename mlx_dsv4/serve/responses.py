"""OpenAI's Responses API on the same engine: `POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}`.

A Responses request is validated here, then translated into the OpenAI-shaped `ChatRequest` the
chat route uses: `instructions` and system/developer messages -> system messages, `function_call`
and `custom_tool_call` items -> an assistant turn's tool calls, their outputs -> tool messages,
`reasoning` items -> that turn's reasoning, `text.format` -> `response_format`, `reasoning.effort`
-> effort. Prompts, constraints and jobs are built once, by `protocol.chat_job`; replies are the
same `Delta`s rendered as output items and stream events by `responses_events`. Replies kept for
`previous_response_id` live in a bounded in-memory `Store`.

Mappings this API needs and the chat route does not have:
- a custom (freeform) tool is offered to the model as a function with one string parameter,
  `input`, whose description carries the tool's grammar; DSML writes string parameters raw, so
  a patch reaches the model and comes back verbatim. Its calls become `custom_tool_call` items.
- a `namespace` tool's functions are offered as `namespace.name` and come back as calls with
  `namespace` set.
- hosted tools (`web_search`, `tool_search`, `file_search`, ...) are left out with a warning:
  Codex offers `web_search` on every request, and this server runs none of them.
- `encrypted_content` of a reasoning item is this server's own reversible encoding of the
  reasoning text (base64 of JSON), so a `store: false` client such as Codex gives the model back
  its reasoning, which V4 keeps in the prompt on tool turns (protocol.md A9). Another server's
  reasoning item is read from its reasoning text or summary; its encrypted content alone is left out.
"""

from __future__ import annotations

import base64
import collections
import json
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from . import protocol
from .schema import APIError, ChatRequest, Loose, check_text, invalid

log = logging.getLogger("mlx_dsv4.serve")

TEXT_PARTS = ("input_text", "output_text", "text", "summary_text", "reasoning_text")
CALLS = ("function_call", "custom_tool_call")
OUTPUTS = ("function_call_output", "custom_tool_call_output")
# Items another server's hosted tools wrote: this model cannot read them back, so they are dropped.
OPAQUE = ("web_search_call", "file_search_call", "image_generation_call", "code_interpreter_call",
          "computer_call", "computer_call_output", "local_shell_call", "local_shell_call_output",
          "shell_call", "shell_call_output", "apply_patch_call", "apply_patch_call_output",
          "mcp_call", "mcp_list_tools", "mcp_approval_request", "mcp_approval_response",
          "tool_search_call", "tool_search_output", "compaction")
CUSTOM_PARAM = "input"
SEALED = "mlx-dsv4:"  # marks encrypted_content this server wrote


class Item(Loose):
    """One `input` item; which fields apply depends on `type` (a bare `{role, content}` is a message)."""

    type: str = "message"
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[dict] | None = None
    call_id: str | None = None
    name: str | None = None
    namespace: str | None = None
    arguments: str | dict | None = None
    input: str | None = None
    output: str | list[dict] | None = None
    summary: list[dict] | None = None
    encrypted_content: str | None = None


class Reasoning(Loose):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    summary: Literal["auto", "concise", "detailed", "none"] | None = None


class TextConfig(Loose):
    format: dict | None = None
    verbosity: str | None = None


class ResponsesRequest(Loose):
    model: str = ""
    input: str | list[Item] = Field(default_factory=list)
    instructions: str | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool = True
    reasoning: Reasoning | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    include: list[str] | None = None
    metadata: dict | None = None
    background: bool = False

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data):
        check_text(data)
        return data


# ----- request -> chat request ------------------------------------------------------------------

def seal(reasoning: str) -> str:
    """Reasoning text as `encrypted_content`: reversible, and recognisable as ours."""
    return base64.b64encode((SEALED + json.dumps({"reasoning": reasoning})).encode()).decode()


def unseal(blob: str) -> str | None:
    """The reasoning text `seal` wrote, or None for content this server did not write."""
    try:
        text = base64.b64decode(blob, validate=True).decode()
        return json.loads(text.removeprefix(SEALED))["reasoning"] if text.startswith(SEALED) else None
    except (ValueError, KeyError, TypeError):
        return None


def _texts(parts: str | list[dict] | None, where: str) -> str:
    if parts is None or isinstance(parts, str):
        return parts or ""
    out = []
    for j, p in enumerate(parts):
        kind = p.get("type")
        if kind == "refusal":
            out.append(p.get("refusal") or "")
        elif kind in TEXT_PARTS:
            out.append(p.get("text") or "")
        else:
            raise APIError(400, f"{where}[{j}]: content parts of type {kind!r} are not supported; "
                           "this model reads text only.", code="unsupported_content",
                           param=f"{where}[{j}].type")
    return "\n\n".join(out)


def _output(output: str | list[dict] | None) -> str:
    """A tool's output. A tool may return an image (Codex's `view_image`): it is named in the
    text rather than refused, so that one tool's output does not end the agent's session."""
    if output is None or isinstance(output, str):
        return output or ""
    return "\n\n".join(p.get("text") or "" if p.get("type") in TEXT_PARTS else
                       f"[{p.get('type')} omitted: this model reads text only]" for p in output)


def _reasoning(item: Item) -> str | None:
    """A reasoning item's text: sealed by this server, else its reasoning text, else its summary;
    None when it holds only another server's encrypted content."""
    if item.encrypted_content and (text := unseal(item.encrypted_content)) is not None:
        return text
    if item.content:
        return _texts(item.content, "content")
    return "\n\n".join(s.get("text") or "" for s in item.summary or []) or None


def flat(name: str, namespace: str | None) -> str:
    return f"{namespace}.{name}" if namespace else name


def history(items: list[Item]) -> list[dict]:
    """Input items -> chat messages. Reasoning and the calls and text after it, up to the next
    user, system or tool-output item, are one assistant turn, as the model wrote them."""
    out: list[dict] = []
    turn: dict | None = None
    for i, item in enumerate(items):
        where, kind = f"input[{i}]", item.type
        if kind == "message":
            if item.role is None:
                raise APIError(400, f"{where}.role: a message needs a role.", param=f"{where}.role")
            text = _texts(item.content, f"{where}.content")
            if item.role == "assistant":
                turn = turn or _open(out)
                turn["content"] += text
            else:
                out.append({"role": item.role, "content": text})
                turn = None
        elif kind == "reasoning":
            text = _reasoning(item)
            if text is None:
                continue
            if turn is not None and (turn["content"] or turn.get("tool_calls")):
                turn = None  # reasoning opens the next turn
            turn = turn or _open(out)
            turn["reasoning_content"] = turn.get("reasoning_content", "") + text
        elif kind in CALLS:
            if not item.call_id or not item.name:
                field_ = "call_id" if not item.call_id else "name"
                raise APIError(400, f"{where}.{field_}: a {kind} item needs a {field_}.",
                               param=f"{where}.{field_}")
            args = item.arguments if kind == "function_call" else json.dumps(
                {CUSTOM_PARAM: item.input or ""}, ensure_ascii=False)
            if isinstance(args, dict):
                args = json.dumps(args, ensure_ascii=False)
            turn = turn or _open(out)
            turn.setdefault("tool_calls", []).append({"id": item.call_id, "type": "function", "function": {
                "name": flat(item.name, item.namespace), "arguments": args or ""}})
        elif kind in OUTPUTS:
            if not item.call_id:
                raise APIError(400, f"{where}.call_id: a {kind} item needs a call_id.",
                               param=f"{where}.call_id")
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": _output(item.output)})
            turn = None
        elif kind not in OPAQUE:
            raise APIError(400, f"{where}.type: input items of type {kind!r} are not supported here.",
                           param=f"{where}.type")
    return out


def _open(out: list[dict]) -> dict:
    out.append({"role": "assistant", "content": ""})
    return out[-1]


@dataclass
class Tools:
    """The request's tools as the chat route takes them, and how to name their calls back."""

    chat: list[dict] = field(default_factory=list)
    index: list[int] = field(default_factory=list)  # chat tool -> its `tools[i]`
    names: dict[str, tuple[str | None, str, str]] = field(default_factory=dict)  # flat -> (ns, name, type)
    left_out: list[str] = field(default_factory=list)


def tools(spec: list[dict] | None) -> Tools:
    out = Tools()

    def add(t: dict, i: int, where: str, namespace: str | None = None):
        kind, name = t.get("type"), t.get("name")
        if not isinstance(name, str) or not name:
            raise APIError(400, f"{where}.name: a {kind} tool needs a name.", param=f"{where}.name")
        fn: dict[str, Any] = {"name": flat(name, namespace)}
        if kind == "function":
            if t.get("description") is not None:
                fn["description"] = t["description"]
            fn["parameters"] = t.get("parameters") or {"type": "object", "properties": {}}
        else:
            fn["description"] = _custom_description(t, where)
            fn["parameters"] = {"type": "object", "properties": {CUSTOM_PARAM: {"type": "string"}},
                                "required": [CUSTOM_PARAM]}
        out.chat.append({"type": "function", "function": fn})
        out.index.append(i)
        out.names[fn["name"]] = (namespace, name, kind)

    for i, t in enumerate(spec or []):
        where, kind = f"tools[{i}]", t.get("type")
        if kind in ("function", "custom"):
            add(t, i, where)
        elif kind == "namespace":
            for j, inner in enumerate(t.get("tools") or []):
                if inner.get("type") not in ("function", "custom"):
                    raise APIError(400, f"{where}.tools[{j}].type: a namespace holds function and "
                                   "custom tools only.", param=f"{where}.tools[{j}].type")
                add(inner, i, f"{where}.tools[{j}]", t.get("name") or None)
        else:
            out.left_out.append(str(kind))
    if out.left_out:
        log.warning("left out hosted tools this server does not run: %s", ", ".join(out.left_out))
    return out


def _custom_description(t: dict, where: str) -> str:
    text = t.get("description") or ""
    fmt = t.get("format") or {"type": "text"}
    if fmt.get("type") == "grammar":
        text += (f"\n\nPass the raw input as `{CUSTOM_PARAM}`; it must follow this "
                 f"{fmt.get('syntax', 'lark')} grammar:\n{fmt.get('definition', '')}")
    elif fmt.get("type") != "text":
        raise APIError(400, f"{where}.format.type: expected 'text' or 'grammar'.",
                       param=f"{where}.format.type")
    return text.strip()


def _tool_choice(choice: str | dict | None) -> str | dict | None:
    if choice is None or isinstance(choice, str):
        return choice
    kind = choice.get("type")
    if kind in ("function", "custom"):
        return {"type": "function", "function": {"name": flat(choice.get("name") or "",
                                                              choice.get("namespace"))}}
    if kind == "allowed_tools":
        names = [{"function": {"name": flat(c.get("name") or "", c.get("namespace"))}}
                 for c in choice.get("tools") or [] if c.get("type") in ("function", "custom")]
        return {"type": "allowed_tools",
                "allowed_tools": {"mode": choice.get("mode", "auto"), "tools": names}}
    raise APIError(400, f"tool_choice: {kind!r} names a hosted tool, which this server does not run; "
                   "use 'auto', 'none', 'required', or a function or custom tool.", param="tool_choice")


def _format(fmt: dict | None) -> dict | None:
    if not fmt or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise APIError(400, "text.format: expected {\"type\": \"json_schema\", \"name\": ..., \"schema\": "
                       "{...}}, {\"type\": \"json_object\"} or {\"type\": \"text\"}.", param="text.format")
    spec = {"name": fmt.get("name") or "output", "schema": fmt["schema"], "strict": fmt.get("strict", True)}
    return {"type": "json_schema", "json_schema": spec}


@dataclass
class Turn:
    """One request, ready to run: its chat job, the conversation it continues, and how to render
    the reply."""

    req: ResponsesRequest
    cj: protocol.ChatJob
    history: list[dict]  # the conversation without `instructions`, as kept for previous_response_id
    tools: Tools
    response: dict  # the response object, filled in as the reply arrives


def chat_request(req: ResponsesRequest, t: Tools, past: list[dict]) -> tuple[ChatRequest, list[dict]]:
    """The OpenAI-shaped request that means the same, and the conversation it holds."""
    items = [Item(role="user", content=req.input)] if isinstance(req.input, str) else req.input
    conversation = past + history(items)
    if not conversation:
        raise APIError(400, "input: the request holds no input.", param="input")
    head = [{"role": "system", "content": req.instructions}] if req.instructions else []
    r = req.reasoning or Reasoning()
    body: dict[str, Any] = {
        "model": req.model, "messages": head + conversation, "max_tokens": req.max_output_tokens,
        "temperature": req.temperature, "top_p": req.top_p, "reasoning_effort": r.effort,
        "tool_choice": _tool_choice(req.tool_choice), "parallel_tool_calls": req.parallel_tool_calls,
        "response_format": _format(req.text.format if req.text else None),
        "seed": (req.model_extra or {}).get("seed"),  # ours, not OpenAI's
        "tools": t.chat or None}
    if not t.chat and body["tool_choice"] in ("auto", "none"):
        body.pop("tool_choice")  # only hosted tools were offered: nothing to choose from
    try:
        return ChatRequest.model_validate({k: v for k, v in body.items() if v is not None}), conversation
    except ValidationError as e:
        raise rename(invalid(e.errors()), t) from None


def rename(e: APIError, t: Tools) -> APIError:
    """An error of the chat route, naming this API's fields."""
    def fix(text: str | None) -> str | None:
        if not text:
            return text
        text = re.sub(r"tools\[(\d+)\]\.function\.parameters",
                      lambda m: f"tools[{t.index[int(m[1])]}].parameters", text)
        text = text.replace("response_format.json_schema.schema", "text.format.schema")
        text = text.replace("response_format", "text.format").replace("reasoning_effort", "reasoning.effort")
        return re.sub(r"^(messages|max_tokens)\b", lambda m: {"messages": "input", "max_tokens":
                                                               "max_output_tokens"}[m[1]], text)

    e.message, e.param = fix(e.message), fix(e.param)
    e.args = (e.message,)
    return e


def prepare(req: ResponsesRequest, cfg: protocol.ServerConfig, store: Store) -> Turn:
    """The engine job for `req`, and the response object its reply fills in."""
    if req.background:
        raise APIError(400, "background: this server answers in the foreground only.",
                       code="unsupported_parameter", param="background")
    past = store.conversation(req.previous_response_id) if req.previous_response_id else []
    t = tools(req.tools)
    chat, conversation = chat_request(req, t, past)
    try:
        cj = protocol.chat_job(chat, cfg)
    except APIError as e:
        raise rename(e, t) from None
    r = req.reasoning or Reasoning()
    response = {
        "id": "resp_" + secrets.token_hex(16), "object": "response", "created_at": int(time.time()),
        "status": "in_progress", "background": False, "error": None, "incomplete_details": None,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
        "model": cfg.model_id, "output": [], "parallel_tool_calls": req.parallel_tool_calls,
        "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": r.effort, "summary": r.summary},
        "store": req.store, "temperature": req.temperature, "top_p": req.top_p,
        "text": {"format": (req.text.format if req.text and req.text.format else {"type": "text"})},
        "tool_choice": req.tool_choice or "auto", "tools": req.tools or [], "truncation": "disabled",
        "usage": None, "metadata": req.metadata or {}}
    return Turn(req, cj, conversation, t, response)


# ----- stored responses -------------------------------------------------------------------------

class Store:
    """Responses kept for `previous_response_id` and `GET /v1/responses/{id}`: in memory, least
    recently used first out past `max_count` responses or `max_bytes` of JSON (each response is
    charged for its whole conversation, which later turns share, so the bound is conservative)."""

    def __init__(self, max_count: int = 1024, max_bytes: int = 256 << 20):
        self.max_count, self.max_bytes = max_count, max_bytes
        self.items: collections.OrderedDict[str, tuple[dict, list[dict], int]] = collections.OrderedDict()
        self.nbytes = 0
        self.lock = threading.Lock()  # requests are prepared on the threadpool

    def put(self, response: dict, conversation: list[dict]):
        size = len(json.dumps(response)) + len(json.dumps(conversation))
        with self.lock:
            self.items[response["id"]] = (response, conversation, size)
            self.nbytes += size
            while self.items and (len(self.items) > self.max_count or self.nbytes > self.max_bytes):
                _, (_, _, freed) = self.items.popitem(last=False)
                self.nbytes -= freed

    def _find(self, response_id: str, param: str | None) -> tuple[dict, list[dict], int]:
        with self.lock:
            if response_id not in self.items:
                raise APIError(404 if param is None else 400, f"Response with id {response_id!r} not found."
                               + (" It was not stored (store: false), has been deleted, or this server "
                                  "has restarted since." if param else ""), param=param or "response_id")
            self.items.move_to_end(response_id)
            return self.items[response_id]

    def get(self, response_id: str) -> dict:
        return self._find(response_id, None)[0]

    def conversation(self, response_id: str) -> list[dict]:
        return list(self._find(response_id, "previous_response_id")[1])

    def delete(self, response_id: str) -> dict:
        self._find(response_id, None)
        with self.lock:
            _, _, size = self.items.pop(response_id)
            self.nbytes -= size
        return {"id": response_id, "object": "response.deleted", "deleted": True}

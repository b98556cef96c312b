"""DeepSeek-V4 and V4.1 chat prompts (protocol A3-A10, A12): the encoder's texts, rendering, FIM.

`render` reproduces DeepSeek's reference `encode_messages` byte for byte, for each encoder
generation: V4 preview, V4-0731 and V4.1 (`<｜System｜>` turns, a numeric 1-100 effort line, spaced
DSML tags). `render_segments` gives the same prompt cut into message-body text and template text,
so that the tokenizer can keep control-token strings typed by a user as plain text (A13). The
fixed English texts (tools block, effort paragraphs or line, response-format block) belong to each
checkpoint's encoder file (`encoding/encoding_dsv4.py`, V4.1: `encoding/encoding.py`);
`load_encoding` reads them with `ast` and never runs that file. Without it a built-in encoding
holds only V4's token strings and message templates. Parsing generated text lives in
`chat_parser.py` and is re-exported here.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from typing import Any, Sequence

from .chat_parser import (ASSISTANT, DSML, EOS, THINK_CLOSE, THINK_OPEN, USER, ContentDelta,  # noqa: F401
                          Event, ReasoningDelta, ReplyParser, ToolCallArgs, ToolCallError, ToolCallEvent,
                          ToolCallStart, arguments_json, close_arguments, new_call_id, parse_reply)
from .encoder_file import (BOS, BUILTIN, ENCODER_FILE, ENCODER_FILE_V41, ENCODER_NAMES, V41, V41_NAMES,  # noqa: F401
                           ChatFormatError, Encoding, effort_budget, effort_on_scale, encoding_from_source,
                           load_encoding, reference_encoder_source)

FIM_BEGIN, FIM_HOLE, FIM_END = "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"
ROLES = ("system", "user", "assistant", "tool", "developer", "latest_reminder")

Segment = tuple[str, bool]  # (text, is message-body text that must be tokenized as plain text)


def _missing(what: str, name: str) -> ChatFormatError:
    return ChatFormatError(f"{what} needs {name} from the checkpoint's {ENCODER_FILE}, which this "
                           "model directory does not have; copy that file from the original checkpoint")


# ----- rendering ---------------------------------------------------------------------------------

def _fill(template: str, **fields: str | list[Segment]) -> list[Segment]:
    """`template.format(**fields)` as segments: template literals and `str` fields are template
    text, list fields are passed through (they carry their own kinds)."""
    out: list[Segment] = []
    for literal, name, spec, conversion in string.Formatter().parse(template):
        if literal:
            out.append((literal, False))
        if name is None:
            continue
        if spec or conversion or name not in fields:
            raise ChatFormatError(f"unsupported field {{{name}}} in encoder template {template[:40]!r}")
        value = fields[name]
        out.extend([(value, False)] if isinstance(value, str) else value)
    return out


def _plain(text: str) -> list[Segment]:
    return [(text, True)]


def _join(pieces: list[list[Segment]], sep: str) -> list[Segment]:
    out: list[Segment] = []
    for i, piece in enumerate(pieces):
        out += ([(sep, False)] if i else []) + piece
    return out


def _text(content: Any) -> str:
    """Message content: a string, None, or a list of parts whose texts are joined by a blank line."""
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if isinstance(part, str):
            parts.append(part)
        elif part.get("type", "text") in ("text", "input_text", "output_text"):
            parts.append(part.get("text") or "")
        else:
            parts.append(f"[Unsupported {part.get('type')}]")
    return "\n\n".join(parts)


def _arguments(arguments: Any, enc: Encoding) -> dict:
    """OpenAI `arguments` (a JSON string, or an object) as a dict. Text that is not a JSON object
    becomes the single string parameter `arguments`, as in the reference. V4.1's encoder also
    decodes a JSON string holding JSON, and keeps `""` and `null` as that parameter."""
    if isinstance(arguments, dict):
        return arguments
    if enc.version == V41:
        value = arguments
        for _ in range(2):  # double-encoded arguments, as some clients send them
            if not isinstance(value, str):
                break
            try:
                value = json.loads(value)
            except (ValueError, RecursionError):
                break
        return value if isinstance(value, dict) else {"arguments": arguments}
    if arguments is None or not str(arguments).strip():
        return {}
    try:
        value = json.loads(arguments)
    except ValueError:
        value = None
    return value if isinstance(value, dict) else {"arguments": arguments}


def _params(arguments: Any, enc: Encoding) -> list[Segment]:
    rows = []
    for key, value in _arguments(arguments, enc).items():
        is_str = isinstance(value, str)
        text = value if is_str else json.dumps(value, ensure_ascii=False)
        rows.append(_fill(enc.param_tpl, dsml_token=enc.dsml, tool_parameter_tag_name=enc.param_tag,
                          key=_plain(str(key)), is_str="true" if is_str else "false", value=_plain(text)))
    return _join(rows, "\n")


def _qualified(name: str, namespace: Any) -> str:
    """V4.1's tool name: `namespace::name` when the tool or call has a namespace (a string, or an
    object with a name) or the name is already qualified; `::` separates exactly one namespace."""
    if isinstance(namespace, dict):
        namespace = namespace.get("name")
    prefix, sep, bare = name.partition("::")
    if sep:
        if namespace not in (None, prefix):
            raise ChatFormatError(f"tool {name!r} names namespace {prefix!r} but is given {namespace!r}")
        namespace, name = prefix, bare
    if "::" in name or (namespace is not None and (not isinstance(namespace, str) or "::" in namespace)):
        raise ChatFormatError(f"tool {name!r} in namespace {namespace!r}: '::' separates one namespace "
                              "from the tool name and may appear once")
    return name if namespace is None else f"{namespace}::{name}"


def _tool_calls(calls: Sequence[dict], enc: Encoding) -> list[Segment]:
    invokes = []
    for call in calls:
        fn = call.get("function", call)
        if not isinstance(fn.get("name"), str):
            raise ChatFormatError(f"tool call {call.get('id')!r} has no function name")
        name = fn["name"]
        if enc.version == V41:
            name = _qualified(name, call.get("namespace") or fn.get("namespace"))
        invokes.append(_fill(enc.tool_call_tpl, dsml_token=enc.dsml, tool_call_tag_name=enc.invoke_tag,
                             name=_plain(name), arguments=_params(fn.get("arguments"), enc)))
    return _fill(enc.tool_calls_tpl, dsml_token=enc.dsml, tc_block_name=enc.block_name,
                 tool_calls=_join(invokes, "\n"))


def dsml_arguments(arguments: Any, encoding: Encoding | None = None) -> str:
    """The DSML parameter lines for one call's OpenAI `arguments`."""
    return "".join(t for t, _ in _params(arguments, encoding or BUILTIN))


def render_tool_calls(tool_calls: Sequence[dict], encoding: Encoding | None = None) -> str:
    """The DSML block for OpenAI-shaped `tool_calls`, as the assistant writes it after "\\n\\n"."""
    return "".join(t for t, _ in _tool_calls(tool_calls, encoding or BUILTIN))


def _schema(tool: dict, enc: Encoding) -> dict:
    """A tool's function as the tools block lists it. V4.1 qualifies its name with the tool's
    namespace and puts the namespace's description before its own."""
    fn = tool.get("function", tool)
    if enc.version != V41:
        return fn
    fn = dict(fn)
    namespace = tool["namespace"] if tool.get("namespace") is not None else fn.get("namespace")
    fn.pop("namespace", None)
    if not isinstance(fn.get("name"), str):
        raise ChatFormatError("a tool has no function name")
    fn["name"] = _qualified(fn["name"], namespace)
    if isinstance(namespace, dict) and namespace.get("description"):
        fn["description"] = namespace["description"] + "\n" + (fn.get("description") or "")
    return fn


def _system_body(m: dict, enc: Encoding) -> list[Segment]:
    """System/developer text, then the tools block, then the response-format block."""
    out = _plain(_text(m.get("content")))
    if m.get("tools"):
        if enc.tools_tpl is None:
            raise _missing("Tool calling", "the tools prompt (TOOLS_TEMPLATE)")
        schemas = "\n".join(json.dumps(_schema(t, enc), ensure_ascii=False) for t in m["tools"])
        out += [("\n\n", False)] + _fill(
            enc.tools_tpl, tool_schemas=_plain(schemas), dsml_token=enc.dsml,
            thinking_start_token=enc.think_open, thinking_end_token=enc.think_close,
            tc_block_name=enc.block_name, tool_call_tag_name=enc.invoke_tag,
            tool_parameter_tag_name=enc.param_tag)
    if m.get("response_format"):
        if enc.response_format_tpl is None:
            raise _missing("response_format", "the response-format prompt (response_format_template)")
        schema = json.dumps(m["response_format"], ensure_ascii=False)
        out += [("\n\n", False)] + _fill(enc.response_format_tpl, schema=_plain(schema))
    return out


@dataclass
class _Turn:
    role: str  # a run of user and tool messages is one "user" turn
    message: dict  # for a user run, its last message
    origin: int  # index of its first message in context + messages
    parts: list = field(default_factory=list)  # user run: (sort key or None for user text, segments)
    task: str | None = None  # for a user run, its first message's


def _check_v41(m: dict, i: int) -> None:
    """What V4.1's encoder refuses: the V4-internal developer role; images, which this runtime
    cannot read (the reference renders a placeholder for its vision tower)."""
    if m.get("role") == "developer":
        raise ChatFormatError(f"message {i} has role 'developer', which the V4.1 encoder does not accept; "
                              "send it as a system message")
    parts = m.get("content") if isinstance(m.get("content"), list) else []
    if any(isinstance(p, dict) and p.get("type") in ("image", "image_url", "input_image") for p in parts):
        raise ChatFormatError(f"message {i} holds an image; this runtime reads text only")


def _turns(messages: Sequence[dict], enc: Encoding, boundary: int) -> list[_Turn]:
    """Group messages into turns, as the reference merges them: a run of tool results and user
    messages is one user turn (a user message with a task ends the run; runs do not cross
    `boundary`, where context ends). Tool results are keyed by the position of their call in the
    last assistant message with tool calls (unknown ids count as the first call)."""
    turns: list[_Turn] = []
    order: dict = {}
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ROLES:
            raise ChatFormatError(f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if enc.version == V41:
            _check_v41(m, i)
        if role not in ("user", "tool"):
            if role == "assistant" and m.get("tool_calls"):
                order = {}
                for j, c in enumerate(m["tool_calls"]):
                    if cid := c.get("id") or (c.get("function") or {}).get("id"):
                        order[cid] = j
            turns.append(_Turn(role, m, i, task=m.get("task")))
            continue
        last = turns[-1] if turns else None
        if (last is None or last.role != "user" or i == boundary
                or (role == "user" and last.task is not None)):
            turns.append(_Turn("user", m, i, task=m.get("task") if role == "user" else None))
        turn = turns[-1]
        turn.message = m
        content = _plain(_text(m.get("content")))
        if role == "tool":
            cid = m.get("tool_call_id")
            key = order.get(cid, 0) if isinstance(cid, str) else 0
            turn.parts.append((key, _fill(enc.tool_output_tpl, content=content)))
        else:
            turn.parts.append((None, _fill(enc.user_tpl, content=content)))
    return turns


def _user_run(turn: _Turn) -> list[Segment]:
    """The run's parts joined by a blank line, tool results sorted into call order in place."""
    parts = list(turn.parts)
    slots = [i for i, (key, _) in enumerate(parts) if key is not None]
    for slot, part in zip(slots, sorted((parts[i] for i in slots), key=lambda p: p[0])):
        parts[slot] = part
    return _join([segs for _, segs in parts], "\n\n")


def _transition(turn: _Turn, enc: Encoding, reasoning: bool, thinking: bool) -> list[Segment]:
    """What ends a turn before the assistant: the assistant prefix, or a task token (`action`
    opens the assistant turn in the conversation's mode, whatever is dropped)."""
    if turn.task is None:
        return [(enc.assistant, False), (enc.think_open if reasoning else enc.think_close, False)]
    if turn.task not in enc.tasks:
        raise ChatFormatError(f"unknown task {turn.task!r}; expected one of {', '.join(enc.tasks)}")
    token = enc.tasks[turn.task]
    if turn.task == "action":
        return [(enc.assistant, False), (enc.think_open if thinking else enc.think_close, False), (token, False)]
    return [(token, False)]


def _assistant(m: dict, enc: Encoding, reasoning: bool) -> list[Segment]:
    think = []
    if reasoning:  # missing, null and "" reasoning all render as an empty block (A9)
        think = _fill(enc.thinking_tpl, reasoning_content=_plain(m.get("reasoning_content") or ""))
        think.append((enc.think_close, False))
    calls = m.get("tool_calls") or []
    block = [("\n\n", False)] + _tool_calls(calls, enc) if calls else []
    template = enc.assistant_wo_eos_tpl if m.get("wo_eos") else enc.assistant_tpl
    return _fill(template, reasoning=think, content=_plain(_text(m.get("content"))), tool_calls=block)


def _opens(turn: _Turn, i: int, enc: Encoding) -> bool:
    """Whether a turn is answered by the assistant: user runs, V4 developer turns, and V4.1's
    system messages after the first."""
    return turn.role in ("user", "developer") or (enc.version == V41 and turn.role == "system" and i > 0)


def _render_turn(turns: list[_Turn], i: int, enc: Encoding, reasoning: bool, thinking: bool) -> list[Segment]:
    turn, m = turns[i], turns[i].message
    prev, nxt = turns[i - 1] if i else None, turns[i + 1] if i + 1 < len(turns) else None
    if turn.role == "system":  # V4: no role token, also in mid-conversation; V4.1's first: after BOS
        token = [(enc.system, False)] if enc.version == V41 and i else []
        out = token + _fill(enc.system_tpl, content=_system_body(m, enc))
    elif turn.role == "latest_reminder":
        out = [(enc.latest_reminder, False)] + _fill(enc.reminder_tpl, content=_plain(_text(m.get("content"))))
    elif turn.role == "assistant":  # an answer to a task token carries no reasoning
        out = _assistant(m, enc, reasoning and not (prev is not None and prev.task))
    else:
        body = _fill(enc.user_tpl, content=_system_body(m, enc)) if turn.role == "developer" else _user_run(turn)
        out = [(enc.user, False)] + body
    if (nxt is None or nxt.role in ("assistant", "latest_reminder")) and (_opens(turn, i, enc) or turn.task):
        out += _transition(turn, enc, reasoning, thinking)
    return out


def _effort_text(enc: Encoding, effort: str | int | None) -> str:
    if enc.version == V41:
        return "".join(t for t, _ in _fill(enc.effort_tpl, budget=str(effort_budget(enc, effort))))
    if isinstance(effort, (str, type(None))) and effort in enc.efforts:
        return enc.efforts[effort]
    if enc.version == "builtin":
        raise _missing(f"reasoning_effort={effort!r}", "the effort paragraphs")
    accepted = ", ".join(repr(k) for k in enc.efforts if k is not None)
    raise ChatFormatError(f"reasoning_effort={effort!r} is not accepted by this checkpoint's "
                          f"{enc.version} encoder; use one of {accepted}")


def _last_user(turns: list[_Turn], enc: Encoding) -> int:
    return max((i for i, t in enumerate(turns) if _opens(t, i, enc)), default=-1)


def render_segments(messages: Sequence[dict], *, thinking: bool, reasoning_effort: str | int | None = None,
                    drop_thinking: bool = True, add_bos: bool = True, encoding: Encoding | None = None,
                    context: Sequence[dict] | None = None) -> list[Segment]:
    """The prompt as `(text, plain)` pieces; `plain` marks message-body text (A13).

    Same arguments as `render`. `context` holds messages already in the prompt: they steer how
    the new ones render, but only the new ones are returned, with no BOS and no effort text."""
    enc = encoding or BUILTIN
    effort = _effort_text(enc, reasoning_effort)
    if context is not None and not isinstance(context, (list, tuple)):
        raise TypeError(f"context must be a list of earlier messages, not {type(context).__name__}")
    context = list(context or [])
    turns = _turns(context + list(messages), enc, len(context))
    # With tools every turn keeps its reasoning; without, reasoning before the last user turn
    # is dropped and so are V4-developer turns (A9).
    drop = thinking and drop_thinking and not any(m.get("tools") for m in [*context, *messages])
    if drop:
        last = _last_user(turns, enc)
        turns = [t for i, t in enumerate(turns) if t.role != "developer" or i >= last]
    last = _last_user(turns, enc)
    out: list[Segment] = []
    if not context:
        out += [(enc.bos, False)] if add_bos else []
        # V4.1 opens the first turn with <｜System｜> when it hosts the effort line or a system text.
        if turns and enc.version == V41 and (thinking or turns[0].role == "system"):
            out.append((enc.system, False))
        out += [(effort, False)] if thinking and turns else []
    for i, turn in enumerate(turns):
        segments = _render_turn(turns, i, enc, thinking and not (drop and i < last), thinking)
        if turn.origin >= len(context):
            out += segments
    return [s for s in out if s[0]]


def render(messages: Sequence[dict], *, thinking: bool, reasoning_effort: str | int | None = None,
           drop_thinking: bool = True, add_bos: bool = True, encoding: Encoding | None = None,
           context: Sequence[dict] | None = None) -> str:
    """The prompt DeepSeek's `encode_messages(messages, "thinking" if thinking else "chat",
    context, drop_thinking, add_bos, reasoning_effort)` returns, byte for byte.

    Messages are OpenAI/reference-shaped dicts (roles in `ROLES`; `tools` and `response_format`
    on system/developer; `reasoning_content`, `tool_calls`, `wo_eos` on assistant; `tool_call_id`
    on tool; `task` on user). `reasoning_effort`: one the encoder names (V4.1 also takes an
    integer 1-100). `encoding` defaults to `BUILTIN`, which cannot render tools, a response
    format or a non-default effort (`ChatFormatError`)."""
    return "".join(text for text, _ in render_segments(
        messages, thinking=thinking, reasoning_effort=reasoning_effort, drop_thinking=drop_thinking,
        add_bos=add_bos, encoding=encoding, context=context))


def fim_segments(prefix: str, suffix: str, *, add_bos: bool = True) -> list[Segment]:
    """Fill-in-the-middle prompt (A12) as segments: the code is plain text."""
    out = [(BOS, False)] if add_bos else []
    out += [(FIM_BEGIN, False), (prefix, True), (FIM_HOLE, False), (suffix, True), (FIM_END, False)]
    return [s for s in out if s[0]]


def render_fim(prefix: str, suffix: str, *, add_bos: bool = True) -> str:
    """`BOS <｜fim▁begin｜>{prefix}<｜fim▁hole｜>{suffix}<｜fim▁end｜>`; the model writes the middle."""
    return "".join(text for text, _ in fim_segments(prefix, suffix, add_bos=add_bos))

"""DeepSeek-V4 chat prompts (protocol A3-A10, A12): the encoder's texts, rendering, FIM.

`render` reproduces DeepSeek's reference `encode_messages` byte for byte. `render_segments` gives
the same prompt cut into message-body text and template text, so that the tokenizer can keep
control-token strings typed by a user as plain text (A13). The fixed English texts (tools block,
effort paragraphs, response-format block) belong to each checkpoint's `encoding/encoding_dsv4.py`;
`load_encoding` reads them with `ast` and never runs that file. Without it a built-in encoding
holds only the protocol's token strings and message templates. Parsing generated text lives in
`chat_parser.py` and is re-exported here.
"""

from __future__ import annotations

import ast
import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .chat_parser import (ASSISTANT, DSML, EOS, THINK_CLOSE, THINK_OPEN, USER, ContentDelta,  # noqa: F401
                          Event, ReasoningDelta, ReplyParser, ToolCallArgs, ToolCallError, ToolCallEvent,
                          ToolCallStart, arguments_json, close_arguments, new_call_id, parse_reply)

BOS = "<｜begin▁of▁sentence｜>"
FIM_BEGIN, FIM_HOLE, FIM_END = "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"
ENCODER_FILE = "encoding/encoding_dsv4.py"
ROLES = ("system", "user", "assistant", "tool", "developer", "latest_reminder")

Segment = tuple[str, bool]  # (text, is message-body text that must be tokenized as plain text)


class ChatFormatError(ValueError):
    """Messages or options the encoder cannot render; the message says what to change."""


@dataclass(frozen=True)
class Encoding:
    """The fixed texts of one encoder generation. `efforts` maps each accepted
    `reasoning_effort` to the paragraph put after BOS in thinking mode."""

    version: str  # "preview", "0731" or "builtin"
    bos: str
    eos: str
    think_open: str
    think_close: str
    dsml: str
    user: str
    assistant: str
    latest_reminder: str
    tasks: Mapping[str, str]
    system_tpl: str
    user_tpl: str
    reminder_tpl: str
    assistant_tpl: str
    assistant_wo_eos_tpl: str
    thinking_tpl: str
    tool_call_tpl: str
    tool_calls_tpl: str
    block_name: str
    param_tpl: str
    tool_output_tpl: str
    tools_tpl: str | None
    response_format_tpl: str | None
    efforts: Mapping[str | None, str]
    constants: Mapping[str, Any] = field(default_factory=dict)  # as read from the encoder file


# Encoding field <- module-level name in encoding_dsv4.py.
ENCODER_NAMES = {
    "bos": "bos_token", "eos": "eos_token", "think_open": "thinking_start_token",
    "think_close": "thinking_end_token", "dsml": "dsml_token", "user": "USER_SP_TOKEN",
    "assistant": "ASSISTANT_SP_TOKEN", "latest_reminder": "LATEST_REMINDER_SP_TOKEN",
    "tasks": "DS_TASK_SP_TOKENS", "system_tpl": "system_msg_template", "user_tpl": "user_msg_template",
    "reminder_tpl": "latest_reminder_msg_template", "assistant_tpl": "assistant_msg_template",
    "assistant_wo_eos_tpl": "assistant_msg_wo_eos_template", "thinking_tpl": "thinking_template",
    "tool_call_tpl": "tool_call_template", "tool_calls_tpl": "tool_calls_template",
    "block_name": "tool_calls_block_name", "tool_output_tpl": "tool_output_template",
}
_OPTIONAL = {"tools_tpl": "TOOLS_TEMPLATE", "response_format_tpl": "response_format_template"}
_PARAM_TPL = ("encode_arguments_to_dsml", "p_dsml_template")

# Protocol facts (A2, A4, A7, A8): enough to chat, and to replay tool calls, without the file.
BUILTIN = Encoding(
    version="builtin", bos=BOS, eos=EOS, think_open=THINK_OPEN, think_close=THINK_CLOSE, dsml=DSML,
    user=USER, assistant=ASSISTANT, latest_reminder="<｜latest_reminder｜>",
    tasks={t: f"<｜{t}｜>" for t in ("action", "query", "authority", "domain", "title", "read_url")},
    system_tpl="{content}", user_tpl="{content}", reminder_tpl="{content}",
    assistant_tpl="{reasoning}{content}{tool_calls}" + EOS,
    assistant_wo_eos_tpl="{reasoning}{content}{tool_calls}",
    thinking_tpl="{reasoning_content}",
    tool_call_tpl='<{dsml_token}invoke name="{name}">\n{arguments}\n</{dsml_token}invoke>',
    tool_calls_tpl="<{dsml_token}{tc_block_name}>\n{tool_calls}\n</{dsml_token}{tc_block_name}>",
    block_name="tool_calls",
    param_tpl='<{dsml_token}parameter name="{key}" string="{is_str}">{value}</{dsml_token}parameter>',
    tool_output_tpl="<tool_result>{content}</tool_result>",
    tools_tpl=None, response_format_tpl=None, efforts={None: ""},
)


# ----- reading encoding_dsv4.py -----------------------------------------------------------------

class _NotConstant(Exception):
    pass


def _evaluate(node: ast.AST, known: Mapping[str, Any]) -> Any:
    """Value of a constant expression: literals, known names, `+`, f-strings, dicts, lists."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name) and node.id in known:
        return known[node.id]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _evaluate(node.left, known) + _evaluate(node.right, known)
    if isinstance(node, ast.JoinedStr):
        parts = []
        for v in node.values:
            if isinstance(v, ast.FormattedValue) and v.conversion == -1 and v.format_spec is None:
                parts.append(str(_evaluate(v.value, known)))
            else:
                parts.append(_evaluate(v, known))
        return "".join(parts)
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {_evaluate(k, known): _evaluate(v, known) for k, v in zip(node.keys, node.values)}
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_evaluate(e, known) for e in node.elts]
    raise _NotConstant


def _assignments(body: list[ast.stmt]):
    for node in body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            yield node.targets[0].id, node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
            yield node.target.id, node.value


def _constants(body: list[ast.stmt], known: Mapping[str, Any]) -> dict[str, Any]:
    """String and dict constants assigned in `body`, in source order."""
    found: dict[str, Any] = {}
    for name, value in _assignments(body):
        try:
            v = _evaluate(value, {**known, **found})
        except (_NotConstant, TypeError):
            v = None  # a later non-constant assignment hides the earlier value
        if isinstance(v, (str, dict)):
            found[name] = v
        else:
            found.pop(name, None)
    return found


def encoding_from_source(src: str) -> Encoding:
    """Parse the text of an `encoding_dsv4.py` (never executed) into an `Encoding`."""
    tree = ast.parse(src)
    consts = _constants(tree.body, {})
    fn = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == _PARAM_TPL[0]), None)
    param_tpl = _constants(list(ast.walk(fn)), consts).get(_PARAM_TPL[1]) if fn else None
    missing = [n for f, n in ENCODER_NAMES.items() if not isinstance(consts.get(n), dict if f == "tasks" else str)]
    if missing:
        raise ChatFormatError(f"{ENCODER_FILE} does not define {', '.join(missing)} as expected; "
                              "this encoder generation is not supported")
    prompts, default = consts.get("REASONING_EFFORT_PROMPTS"), consts.get("DEFAULT_REASONING_EFFORT")
    if isinstance(prompts, dict) and default in prompts:
        version, efforts = "0731", {None: prompts[default], **prompts}
    elif "REASONING_EFFORT_MAX" in consts:
        version, efforts = "preview", {None: "", "high": "", "max": consts["REASONING_EFFORT_MAX"]}
    else:
        raise ChatFormatError(f"{ENCODER_FILE} has neither REASONING_EFFORT_MAX nor "
                              "REASONING_EFFORT_PROMPTS: unknown encoder generation")
    fields = {f: consts[n] for f, n in ENCODER_NAMES.items()}
    fields.update({f: consts.get(n) for f, n in _OPTIONAL.items()})
    # The DSML parameter line is part of the grammar (A7); keep the built-in one if not found.
    return Encoding(version=version, param_tpl=param_tpl or BUILTIN.param_tpl, efforts=efforts,
                    constants=consts, **fields)


def load_encoding(model_dir: str | Path) -> Encoding | None:
    """The checkpoint's encoding, or None when it ships no `encoding/encoding_dsv4.py`."""
    path = Path(model_dir) / ENCODER_FILE
    return encoding_from_source(path.read_text(encoding="utf-8")) if path.is_file() else None


def reference_encoder_source() -> str:
    """An `encoding_dsv4.py` holding DeepSeek-V4-Flash-0731's texts (tools block, effort
    paragraphs), written from the constants packaged in `encoding_v0731.json` the way the
    reference file assigns them, so that `load_encoding` reads it as it reads a release's.
    Model folders made here (the selftest's) get a complete encoder with it."""
    data = json.loads((Path(__file__).parent / "encoding_v0731.json").read_text(encoding="utf-8"))
    consts, eos = data["constants"], data["constants"]["eos_token"]
    lines = [f'"""{data["_source"]}"""', ""]
    for name, value in consts.items():
        if name == "assistant_msg_template":  # the reference writes "..." + eos_token
            lines.append(f"{name} = {value[: -len(eos)]!r} + eos_token")
        else:
            lines.append(f"{name} = {value!r}")
    template = data["function_constants"][".".join(_PARAM_TPL)]
    lines += ["", f"def {_PARAM_TPL[0]}(tool_call):", f"    {_PARAM_TPL[1]} = {template!r}",
              f"    return {_PARAM_TPL[1]}.format(**tool_call)", ""]
    return "\n".join(lines)


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


def _arguments(arguments: Any) -> dict:
    """OpenAI `arguments` (a JSON string, or an object) as a dict. Text that is not a JSON object
    becomes the single string parameter `arguments`, as in the reference."""
    if isinstance(arguments, dict):
        return arguments
    if arguments is None or not str(arguments).strip():
        return {}
    try:
        value = json.loads(arguments)
    except ValueError:
        value = None
    return value if isinstance(value, dict) else {"arguments": arguments}


def _params(arguments: Any, enc: Encoding) -> list[Segment]:
    rows = []
    for key, value in _arguments(arguments).items():
        is_str = isinstance(value, str)
        text = value if is_str else json.dumps(value, ensure_ascii=False)
        rows.append(_fill(enc.param_tpl, dsml_token=enc.dsml, key=_plain(key),
                          is_str="true" if is_str else "false", value=_plain(text)))
    return _join(rows, "\n")


def _tool_calls(calls: Sequence[dict], enc: Encoding) -> list[Segment]:
    invokes = []
    for call in calls:
        fn = call.get("function", call)
        if not isinstance(fn.get("name"), str):
            raise ChatFormatError(f"tool call {call.get('id')!r} has no function name")
        invokes.append(_fill(enc.tool_call_tpl, dsml_token=enc.dsml, name=_plain(fn["name"]),
                             arguments=_params(fn.get("arguments"), enc)))
    return _fill(enc.tool_calls_tpl, dsml_token=enc.dsml, tc_block_name=enc.block_name,
                 tool_calls=_join(invokes, "\n"))


def dsml_arguments(arguments: Any, encoding: Encoding | None = None) -> str:
    """The DSML parameter lines for one call's OpenAI `arguments`."""
    return "".join(t for t, _ in _params(arguments, encoding or BUILTIN))


def render_tool_calls(tool_calls: Sequence[dict], encoding: Encoding | None = None) -> str:
    """The DSML block for OpenAI-shaped `tool_calls`, as the assistant writes it after "\\n\\n"."""
    return "".join(t for t, _ in _tool_calls(tool_calls, encoding or BUILTIN))


def _system_body(m: dict, enc: Encoding) -> list[Segment]:
    """System/developer text, then the tools block, then the response-format block."""
    out = _plain(_text(m.get("content")))
    if m.get("tools"):
        if enc.tools_tpl is None:
            raise _missing("Tool calling", "the tools prompt (TOOLS_TEMPLATE)")
        schemas = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in m["tools"])
        out += [("\n\n", False)] + _fill(
            enc.tools_tpl, tool_schemas=_plain(schemas), dsml_token=enc.dsml,
            thinking_start_token=enc.think_open, thinking_end_token=enc.think_close)
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
    task: str | None = None


def _turns(messages: Sequence[dict], enc: Encoding) -> list[_Turn]:
    """Group messages into turns; tool results are keyed by the position of their call in the
    assistant message before them (unknown ids count as the first call, as in the reference)."""
    turns: list[_Turn] = []
    call_ids: list = []
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ROLES:
            raise ChatFormatError(f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if role not in ("user", "tool"):
            if role == "assistant":
                call_ids = [c.get("id") for c in m.get("tool_calls") or []]
            turns.append(_Turn(role, m, i, task=m.get("task")))
            continue
        if not turns or turns[-1].role != "user":
            turns.append(_Turn("user", m, i))
        turn = turns[-1]
        turn.message, turn.task = m, m.get("task") or turn.task
        content = _plain(_text(m.get("content")))
        if role == "tool":
            cid = m.get("tool_call_id")
            key = call_ids.index(cid) if cid is not None and cid in call_ids else 0
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


def _transition(turn: _Turn, enc: Encoding, reasoning: bool) -> list[Segment]:
    """What ends a user-like turn before the assistant: the assistant prefix, or a task token."""
    think = enc.think_open if reasoning else enc.think_close
    if turn.task is None:
        return [(enc.assistant, False), (think, False)]
    if turn.task not in enc.tasks:
        raise ChatFormatError(f"unknown task {turn.task!r}; expected one of {', '.join(enc.tasks)}")
    token = enc.tasks[turn.task]
    if turn.task == "action":
        return [(enc.assistant, False), (think, False), (token, False)]
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


def _render_turn(turn: _Turn, prev: _Turn | None, nxt: _Turn | None, enc: Encoding,
                 reasoning: bool) -> list[Segment]:
    m = turn.message
    if turn.role == "system":  # no role token, also in mid-conversation
        return _fill(enc.system_tpl, content=_system_body(m, enc))
    if turn.role == "latest_reminder":
        content = _plain(_text(m.get("content")))
        return [(enc.latest_reminder, False)] + _fill(enc.reminder_tpl, content=content)
    if turn.role == "assistant":  # an answer to a task token carries no reasoning
        return _assistant(m, enc, reasoning and not (prev is not None and prev.task))
    body = _fill(enc.user_tpl, content=_system_body(m, enc)) if turn.role == "developer" else _user_run(turn)
    out = [(enc.user, False)] + body
    if nxt is None or nxt.role in ("assistant", "latest_reminder"):
        out += _transition(turn, enc, reasoning)
    return out


def _effort_text(enc: Encoding, effort: str | None) -> str:
    if effort in enc.efforts:
        return enc.efforts[effort]
    if enc.version == "builtin":
        raise _missing(f"reasoning_effort={effort!r}", "the effort paragraphs")
    accepted = ", ".join(repr(k) for k in enc.efforts if k is not None)
    raise ChatFormatError(f"reasoning_effort={effort!r} is not accepted by this checkpoint's "
                          f"{enc.version} encoder; use one of {accepted}")


def _last_user(turns: list[_Turn]) -> int:
    return max((i for i, t in enumerate(turns) if t.role in ("user", "developer")), default=-1)


def render_segments(messages: Sequence[dict], *, thinking: bool, reasoning_effort: str | None = None,
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
    turns = _turns(context + list(messages), enc)
    # With tools every turn keeps its reasoning; without, reasoning before the last user turn
    # is dropped and so are V4-developer turns (A9).
    drop = thinking and drop_thinking and not any(m.get("tools") for m in [*context, *messages])
    if drop:
        last = _last_user(turns)
        turns = [t for i, t in enumerate(turns) if t.role != "developer" or i >= last]
    last = _last_user(turns)
    out: list[Segment] = []
    if not context:
        out += [(enc.bos, False)] if add_bos else []
        out += [(effort, False)] if thinking else []
    for i, turn in enumerate(turns):
        prev, nxt = turns[i - 1] if i else None, turns[i + 1] if i + 1 < len(turns) else None
        segments = _render_turn(turn, prev, nxt, enc, thinking and not (drop and i < last))
        if turn.origin >= len(context):
            out += segments
    return [s for s in out if s[0]]


def render(messages: Sequence[dict], *, thinking: bool, reasoning_effort: str | None = None,
           drop_thinking: bool = True, add_bos: bool = True, encoding: Encoding | None = None,
           context: Sequence[dict] | None = None) -> str:
    """The prompt DeepSeek's `encode_messages(messages, "thinking" if thinking else "chat",
    context, drop_thinking, add_bos, reasoning_effort)` returns, byte for byte.

    Messages are OpenAI/reference-shaped dicts (roles in `ROLES`; `tools` and `response_format`
    on system/developer; `reasoning_content`, `tool_calls`, `wo_eos` on assistant; `tool_call_id`
    on tool; `task` on user). `encoding` defaults to `BUILTIN`, which cannot render tools, a
    response format or a non-default effort (`ChatFormatError`)."""
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

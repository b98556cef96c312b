"""Incremental parser of DeepSeek-V4 and V4.1 generated text (protocol A7, A11).

`ReplyParser` takes decoded text in chunks of any size and turns it into reasoning deltas,
content deltas and tool calls read from DSML blocks: each call as it is written (its start, then
its arguments JSON in fragments), then whole when its invoke closes. It owns the token *strings* a
reply may contain (think tags, EOS, DSML) and nothing else: token ids and streaming UTF-8 belong
to `tokenizer.py`, prompts to `chat_format.py`, finish reasons and HTTP shapes to the server.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Union

EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
DSML = "｜DSML｜"

# Look-alikes accepted on input (A11.3): ASCII pipes and V3.2's block name. V4.1 writes a space
# after the DSML token and names the block `calls` (`<｜DSML｜ calls>`, `<｜DSML｜ invoke …>`);
# both spellings are read whatever the model, as a model may write either.
_BARS = (DSML, "|DSML|")
_BLOCKS = ("tool_calls", "function_calls", "calls")
_P = "(?:" + "|".join(re.escape(b) for b in _BARS) + ") ?"
_INVOKE_OPEN = re.compile(rf'<{_P}invoke\s+name="([^"]*)"\s*>')
_PARAM_OPEN = re.compile(rf'<{_P}parameter\s+name="([^"]*)"(?:\s+string="(true|false)")?\s*>')
_PARAM_CLOSE = re.compile(rf"</{_P}parameter>")
_INVOKE_CLOSE = re.compile(rf"</{_P}invoke>")
_BLOCK_OPEN = re.compile(rf"<{_P}(?:{'|'.join(_BLOCKS)})>")
_BLOCK_CLOSE = re.compile(rf"</{_P}(?:{'|'.join(_BLOCKS)})>")
_CUT_TAGS = ("<｜", "</｜", "<|", "</|", "｜")  # a chat or DSML tag cut off by the end of the text
_INVOKE_STARTS = tuple(f"<{b}{sp}invoke" for b in _BARS for sp in ("", " "))
_STOPS = (EOS, USER, ASSISTANT)  # chat tokens after which nothing belongs to this reply (A11.6)
# The tokenizer's other added tokens (A2): never reply text, dropped where they appear (A11.7).
_SPECIAL = ("<｜begin▁of▁sentence｜>", "<｜▁pad▁｜>", "<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>",
            "<|EOT|>", *(f"<｜{n}｜>" for n in (
                "tool▁calls▁begin", "tool▁calls▁end", "tool▁call▁begin", "tool▁call▁end",
                "tool▁outputs▁begin", "tool▁outputs▁end", "tool▁output▁begin", "tool▁output▁end",
                "tool▁sep", "begin▁of▁repo▁name", "end▁of▁repo▁name", "begin▁of▁file▁name",
                "end▁of▁file▁name", "begin▁of▁file", "end▁of▁file", "place▁holder▁for▁copy",
                "place▁holder▁for▁pointer▁replace", "begin▁sys", "end▁sys", "latest_reminder", "action",
                "query", "authority", "domain", "task", "political", "entity", "title", "safety", "answer",
                "search", "search▁begin", "search▁end", "extracted_url", "read_url", "end_of_query",
                "rl_image_pad", "rl_image_start", "image2", "table", "/td", "td", "/tr", "tr", "/polygon",
                "polygon", "/point", "point", "/box", "box", "/ref", "ref", "image")),
            "<｜/table>｜", "<dsml:", "</dsml:")
_NUMBERED = (r"<｜place▁holder▁no▁\d+｜>", r"<\|place_holder_mm_span_\d+\|>")  # 800 + 415 more
_NUMBERED_HEADS = ("<｜place▁holder▁no▁", "<|place_holder_mm_span_")
_NUMBERED_RE = re.compile("|".join(_NUMBERED))
_TAG_STARTS = tuple(f"<{b}" for b in _BARS) + tuple(f"</{b}" for b in _BARS) + _STOPS + (THINK_CLOSE,)
# Text that hands over to the block parser: any DSML tag, the block parser reports what it
# cannot read. Only the real `｜DSML｜` token is dropped when it stands alone.
_TOOL_MARKERS = tuple(f"{lt}{b}" for b in _BARS for lt in ("<", "</"))
_DSML_TAG = re.compile(rf"</?{_P}(\w*)")  # any DSML tag's start and name
_PARAM_CLOSES = tuple(f"</{b}{sp}parameter>" for b in _BARS for sp in ("", " "))  # both spellings


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    """A call began (its invoke tag is complete): its arguments follow as `ToolCallArgs`."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArgs:
    """A fragment of call `index`'s arguments JSON: the fragments of one call, joined, are its
    `ToolCallEvent.arguments`. A string value streams as it is written, escaped; any other
    value when its parameter closes (it is checked then)."""

    index: int
    text: str


@dataclass(frozen=True)
class ToolCallEvent:
    """One complete call (after its `ToolCallStart` and `ToolCallArgs` of the same index).
    `arguments` is always a valid JSON object string; `problems` lists what the model got wrong
    and how it was read: a value marked `string="false"` that was not JSON (passed on as a
    string), a parameter given twice (the first kept), stray text inside the invoke (ignored),
    an invoke the block closed without its `</invoke>` (closed there)."""

    index: int
    id: str
    name: str
    arguments: str
    problems: tuple[str, ...] = ()

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolCallError:
    """DSML that gave no complete call: a call cut off (`truncated`: the text ended inside it;
    `index` is set when its start and some arguments were already given), stray text between
    invokes, a malformed DSML tag (dropped). `text` is the raw DSML."""

    reason: str
    text: str
    name: str | None = None
    truncated: bool = False
    index: int | None = None


Event = Union[ReasoningDelta, ContentDelta, ToolCallStart, ToolCallArgs, ToolCallEvent, ToolCallError]


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def _json_literal(raw: str) -> str | None:
    """`raw` stripped if it is one strict JSON value (no NaN/Infinity), else None."""
    def reject(name):
        raise ValueError(name)

    try:
        json.loads(raw, parse_constant=reject)
    except ValueError:
        return None
    return raw.strip()


def arguments_json(params: list[tuple[str, str | None, str]]) -> tuple[str, tuple[str, ...]]:
    """DSML parameters `(key, string_attr, raw value)` -> OpenAI `arguments` and problems.

    `string="true"` values become JSON strings; `string="false"` values are inserted as the JSON
    the model wrote, or as a string when they are not JSON (A7: never emit invalid JSON)."""
    parts, problems = [], []
    for key, is_str, raw in params:
        literal, problem = _param_literal(key, is_str, raw)
        problems += [problem] if problem else []
        parts.append(f"{json.dumps(key, ensure_ascii=False)}: {literal}")
    return "{" + ", ".join(parts) + "}", tuple(problems)


def _param_literal(key: str, is_str: str | None, raw: str) -> tuple[str, str | None]:
    """One DSML parameter's value as JSON, and a problem when `string="false"` held no JSON."""
    literal = None if is_str == "true" else _json_literal(raw)
    if literal is not None:
        return literal, None
    problem = None
    if is_str == "false":
        problem = f'parameter "{key}" is marked string="false" but is not JSON; passed on as a string'
    return json.dumps(raw, ensure_ascii=False), problem


class _Invoke:
    def __init__(self, name: str, raw: str, index: int):
        self.name, self.raw, self.index, self.id = name, raw, index, new_call_id()
        self.keys: set[str] = set()
        self.parts: list[str] = []  # the arguments fragments given so far
        self.problems: list[str] = []
        self.param: tuple[str, str | None] | None = None  # open parameter awaiting its close tag
        self.skip = False  # the open parameter repeats a key: read and dropped
        self.scan = 0  # where the search for that close tag resumes
        self.sent = 0  # characters of the open string value already given

    def note(self, problem: str) -> None:
        if problem not in self.problems:
            self.problems.append(problem)


class ReplyParser:
    """Text in (any chunking), events out; the same text gives the same events however split.

    Starts inside reasoning when `thinking` (the prompt ends with `<think>`). Text that could be
    the start of a tag (`<`, `</thi`, `<｜DSM`) and trailing whitespace are held back until the
    next chunk decides. Think tags, chat tokens and the tokenizer's other added tokens never
    reach the text; EOS, `<｜User｜>` or `<｜Assistant｜>` ends the reply (`done`). Any DSML tag
    (`<｜DSML｜…`, or `<|DSML|…` with ASCII pipes) hands over to the block parser, also before
    `</think>`; with `tools_enabled` false DSML is ordinary text.

    A call streams: `ToolCallStart` when its invoke tag is complete, `ToolCallArgs` fragments as
    its parameters are written, `ToolCallEvent` when it closes. Nothing raises, and a started
    call always ends: read leniently when malformed (see `ToolCallEvent.problems`; a block that
    closes without `</invoke>` closes the call), or as a `ToolCallError(truncated=True)` with its
    `index` when the text ends inside it. A malformed DSML tag before any block (`<｜DSML｜
    tool_calls|`) is dropped and the prose after it kept; stray text between invokes is a
    `ToolCallError`. `finish()` flushes what is held back.
    """

    def __init__(self, thinking: bool, tools_enabled: bool = True):
        self._state = "reasoning" if thinking else "content"
        self._buf = ""
        self._thought = thinking  # a reasoning block was opened (so a later <think> is stray)
        self._content_started = False
        self._after_block = False
        self._invoke: _Invoke | None = None
        self._junk = ""
        self._calls = 0
        self._tools_enabled = tools_enabled
        self._return = self._state  # the state a dropped malformed tag returns to
        self._held = ""  # whitespace dropped before a DSML tag, given back if it was no block
        self._block = False  # a block opener was read
        self.done = False
        markers = (THINK_CLOSE, THINK_OPEN) + _STOPS + _SPECIAL
        if tools_enabled:
            markers += _TOOL_MARKERS + (DSML,)  # a bare DSML token is dropped (A11.4)
        self._markers = markers
        self._marker_re = re.compile("|".join(
            [re.escape(m) for m in sorted(markers, key=len, reverse=True)] + list(_NUMBERED)))

    def feed(self, text: str) -> list[Event]:
        out: list[Event] = []
        if self.done:
            return out
        self._buf += text
        while not self.done and (self._step_tools(out) if self._state == "tools" else self._step_text(out)):
            pass
        return _merge(out)

    def finish(self) -> list[Event]:
        out = self.feed("")
        if not self.done:
            if self._state == "tools":
                self._end_tools(out, truncated=True)
            elif not self._buf.lstrip().startswith(_CUT_TAGS):
                self._emit(out, self._buf)  # held-back text that turned out to be text
        self._buf, self.done = "", True
        return _merge(out)

    def _emit(self, out: list[Event], text: str) -> None:
        if self._state == "reasoning":
            if text:
                out.append(ReasoningDelta(text))
            return
        if self._after_block:  # whitespace between a tool block and EOS is not content
            text = text.lstrip()
            self._after_block = not text
        if text:
            self._content_started = True
            out.append(ContentDelta(text))

    def _step_text(self, out: list[Event]) -> bool:
        m = self._marker_re.search(self._buf)
        if m is None:
            keep = _holdback(self._buf, self._markers)
            self._emit(out, self._buf[:keep])
            self._buf = self._buf[keep:]
            return False
        before, marker, self._buf = self._buf[: m.start()], m.group(), self._buf[m.end():]
        if marker in _TOOL_MARKERS:
            text = before.rstrip()  # A11.3: trailing whitespace before a block goes
            self._emit(out, text)
            self._held = before[len(text):]
            self._return, self._state, self._buf = self._state, "tools", marker + self._buf
        elif marker == THINK_OPEN and not self._thought and not self._content_started and not before.strip():
            self._state, self._thought = "reasoning", True  # stray leading <think> (A11.7)
        else:
            self._emit(out, before)
            if marker == THINK_CLOSE and self._state == "reasoning":
                self._state = "content"
            elif marker in _STOPS:
                self.done = True
        return True

    def _step_tools(self, out: list[Event]) -> bool:
        inv = self._invoke
        if inv is not None and inv.param is not None:
            return self._read_value(out, inv)
        body = self._buf.lstrip()
        skipped = self._buf[: len(self._buf) - len(body)]
        for pattern, action in ((_PARAM_OPEN, "param"), (_INVOKE_CLOSE, "close"), (_INVOKE_OPEN, "invoke"),
                                (_BLOCK_CLOSE, "end"), (_BLOCK_OPEN, "skip")):
            m = pattern.match(body)
            if m:
                self._buf = body[m.end():]
                self._record(skipped)
                self._tag(out, action, m, m.group())
                return True
        for stop in _STOPS + (THINK_CLOSE,):
            if body.startswith(stop):
                self._buf = body[len(stop):]
                self._record(skipped)
                if stop == THINK_CLOSE:  # ignored in a block
                    if inv is not None:
                        inv.raw += stop
                else:
                    self._end_tools(out, truncated=False)
                    self.done = True
                return True
        if (bad := self._malformed(body)) is None:
            return False  # nothing yet, or a tag still arriving
        if bad:
            self._record(skipped)
            self._buf = body[len(bad):]
            if inv is None and not self._block:  # no block began: the text after it is prose
                out.append(ToolCallError("a malformed DSML tag was dropped", bad))
                self._state = self._return
                self._buf = (self._held if self._content_started or self._state == "reasoning" else "") + self._buf
                self._after_block = self._state == "content" and not self._content_started
            else:
                self._stray(bad)
            return True
        cut = body.find("<", 1)
        cut = len(body) if cut < 0 else cut
        self._record(skipped)
        self._stray(body[:cut])
        self._buf = body[cut:]
        return True

    @staticmethod
    def _malformed(body: str) -> str | None:
        """At a DSML tag no pattern read: the tag to drop ("" when `body` starts with no DSML
        tag), or None while it may still become a known tag."""
        m = _DSML_TAG.match(body)
        if m is None:
            if not body or (">" not in body and any(t.startswith(body[: len(t)]) for t in _TAG_STARTS)):
                return None
            return ""
        if m.end() == len(body):
            return None
        nxt = body[m.end()]
        if nxt == ">":
            return body[: m.end() + 1]  # a complete tag of no known name
        if nxt.isspace() and m.group(1) in ("invoke", "parameter"):
            return None if ">" not in body else ""  # its attributes are still arriving, or stray
        return body[: m.end() + 1]  # `<｜DSML｜tool_calls|`: a tag that went wrong

    def _record(self, text: str) -> None:
        """Keep consumed block text: in the open invoke's raw DSML, else with the stray text."""
        if self._invoke is None:
            self._junk += text
        else:
            self._invoke.raw += text

    def _stray(self, text: str) -> None:
        """Text in a block that is no tag: ignored inside an invoke, else reported later."""
        self._record(text)
        if self._invoke is not None and text.strip():
            self._invoke.note("unexpected text inside the invoke was ignored")

    def _tag(self, out: list[Event], action: str, m: re.Match, raw: str) -> None:
        inv = self._invoke
        if action == "invoke":
            self._report_junk(out)
            if inv is not None:
                inv.note("a new invoke began before this one closed; it was closed there")
                self._close_invoke(out)
            self._invoke = _Invoke(m.group(1), raw, self._calls)
            self._calls += 1
            out.append(ToolCallStart(self._invoke.index, self._invoke.id, self._invoke.name))
        elif action == "end":
            self._end_tools(out, truncated=False)
            self._state, self._after_block = "content", True
        elif action == "skip":  # the block opener: expected outside an invoke only
            self._block = True
            if inv is not None:
                self._stray(raw)
        elif inv is None:  # a parameter, or an invoke close, outside an invoke
            self._stray(raw)
        elif action == "param":
            inv.raw += raw
            inv.param, inv.scan, inv.sent = (m.group(1), m.group(2)), 0, 0
            inv.skip = m.group(1) in inv.keys
            if inv.skip:
                inv.note(f'parameter "{m.group(1)}" appears twice; the first was kept')
            elif m.group(2) == "true":  # a string: its value streams as it comes
                self._args(out, inv, self._key(inv, m.group(1)) + '"')
        else:
            inv.raw += raw
            self._close_invoke(out)

    def _key(self, inv: _Invoke, key: str) -> str:
        head = "{" if not inv.keys else ", "
        inv.keys.add(key)
        return f"{head}{json.dumps(key, ensure_ascii=False)}: "

    def _args(self, out: list[Event], inv: _Invoke, text: str) -> None:
        if text:
            inv.parts.append(text)
            out.append(ToolCallArgs(inv.index, text))

    def _read_value(self, out: list[Event], inv: _Invoke) -> bool:
        key, is_str = inv.param
        streaming = is_str == "true" and not inv.skip
        m = _PARAM_CLOSE.search(self._buf, max(0, inv.scan - 24))
        if m is None:
            inv.scan = len(self._buf)
            if streaming:  # all but what may be the start of the close tag
                safe = _holdback(self._buf, _PARAM_CLOSES, strip=False)
                self._args(out, inv, _escaped(self._buf[inv.sent: safe]))
                inv.sent = max(inv.sent, safe)
            return False
        value = self._buf[: m.start()]
        if streaming:
            self._args(out, inv, _escaped(value[inv.sent:]) + '"')
        elif not inv.skip:
            literal, problem = _param_literal(key, is_str, value)
            if problem:
                inv.note(problem)
            self._args(out, inv, self._key(inv, key) + literal)
        inv.raw += self._buf[: m.end()]
        self._buf, inv.param = self._buf[m.end():], None
        return True

    def _close_invoke(self, out: list[Event]) -> None:
        inv, self._invoke = self._invoke, None
        self._args(out, inv, "}" if inv.keys else "{}")
        out.append(ToolCallEvent(inv.index, inv.id, inv.name, "".join(inv.parts), tuple(inv.problems)))

    def _report_junk(self, out: list[Event]) -> None:
        junk, self._junk = self._junk.strip(), ""
        if junk:
            out.append(ToolCallError("unexpected text inside the tool-call block", junk))

    def _end_tools(self, out: list[Event], truncated: bool) -> None:
        """Leave the block: close or report an unfinished invoke, report stray text."""
        inv = self._invoke
        pending = self._buf.strip() if truncated else ""
        if inv is not None and truncated:
            self._invoke = None
            out.append(ToolCallError("the reply ended inside a tool call", inv.raw + self._buf, inv.name,
                                     True, inv.index))
        elif inv is not None:
            if inv.param is not None:  # the block closed inside a value: what was read stands
                self._buf = ""
            inv.note("the tool-call block closed the invoke (its </invoke> was missing)")
            self._close_invoke(out)
        elif any(len(pending) > len(o) - len("invoke") and (pending.startswith(o) or o.startswith(pending))
                 for o in _INVOKE_STARTS):  # cut inside the invoke tag, past `<｜DSML｜` (and its space)
            out.append(ToolCallError("the reply ended inside a tool call", pending, truncated=True))
        self._report_junk(out)
        self._block = False


def close_arguments(partial: str) -> str:
    """What closes the arguments JSON of a call cut off after `partial` (its fragments so far):
    an open string and every open object or array, as `{}` for nothing at all."""
    if not partial.strip():
        return "{}"
    stack, in_string, escaped = [], False, False
    for c in partial:
        if in_string:
            escaped, in_string = (False, True) if escaped else (c == "\\", c != '"')
        elif c == '"':
            in_string = True
        elif c in "{[":
            stack.append("}" if c == "{" else "]")
        elif c in "}]" and stack:
            stack.pop()
    head = ('\\"' if escaped else '"') if in_string else ""
    if not in_string and partial.rstrip().endswith(":"):
        head = "null"
    return head + "".join(reversed(stack))


def _escaped(text: str) -> str:
    """`text` as the inside of a JSON string (escaping is per character, so pieces join up)."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


def _holdback(buf: str, markers: tuple[str, ...], strip: bool = True) -> int:
    """Length of `buf` that is safe to emit: not a possible marker start (nor of a numbered
    added token), and unless `strip` is off, not trailing space."""
    cut = len(buf)
    for marker in markers:
        for k in range(min(len(marker) - 1, len(buf)), 0, -1):
            if buf.endswith(marker[:k]):
                cut = min(cut, len(buf) - k)
                break
    if strip:
        at = buf.rfind("<", 0, cut)
        tail = buf[at:] if at >= 0 else ""
        if tail and any(head.startswith(tail) or (tail.startswith(head) and re.fullmatch(
                r"\d*[｜|]?", tail[len(head):])) for head in _NUMBERED_HEADS):
            cut = at
        while cut and buf[cut - 1].isspace():
            cut -= 1
    return cut


def _merge(events: list[Event]) -> list[Event]:
    """Join neighbouring deltas of the same kind (and arguments fragments of the same call)."""
    out: list[Event] = []
    for e in events:
        if out and type(e) is type(out[-1]) and isinstance(e, (ReasoningDelta, ContentDelta)):
            out[-1] = type(e)(out[-1].text + e.text)
        elif out and isinstance(e, ToolCallArgs) and isinstance(out[-1], ToolCallArgs) and e.index == out[-1].index:
            out[-1] = ToolCallArgs(e.index, out[-1].text + e.text)
        else:
            out.append(e)
    return out


def parse_reply(text: str, thinking: bool, *, tools_enabled: bool = True
                ) -> tuple[str, str, list[ToolCallEvent]]:
    """Whole reply -> `(reasoning, content, tool_calls)`: the fold of `ReplyParser`.

    Calls cut off by the end of the text are left out here; `ReplyParser` reports them as
    `ToolCallError` events."""
    parser = ReplyParser(thinking, tools_enabled)
    events = parser.feed(text) + parser.finish()
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    return reasoning, content, [e for e in events if isinstance(e, ToolCallEvent)]

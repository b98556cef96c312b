"""Incremental parser of DeepSeek-V4 and V4.1 generated text (protocol A7, A11).

`ReplyParser` takes decoded text in chunks of any size and turns it into reasoning deltas,
content deltas and complete tool calls read from DSML blocks. It owns the token *strings* a
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
_TAG_STARTS = tuple(f"<{b}" for b in _BARS) + tuple(f"</{b}" for b in _BARS) + _STOPS + (THINK_CLOSE,)
# Text that hands over to the block parser: any DSML tag, the block parser reports what it
# cannot read. Only the real `｜DSML｜` token is dropped when it stands alone.
_TOOL_MARKERS = tuple(f"{lt}{b}" for b in _BARS for lt in ("<", "</"))


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallEvent:
    """One complete call. `arguments` is always a valid JSON object string; `problems` lists
    values the model marked `string="false"` that were not JSON and were passed on as strings."""

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
    """A call that could not be returned: cut off (`truncated`: the text ended inside it) or
    malformed (stray text in the block, a duplicated parameter). `text` is the raw DSML."""

    reason: str
    text: str
    name: str | None = None
    truncated: bool = False


Event = Union[ReasoningDelta, ContentDelta, ToolCallEvent, ToolCallError]


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
        literal = None if is_str == "true" else _json_literal(raw)
        if literal is None:
            if is_str == "false":
                problems.append(f'parameter "{key}" is marked string="false" but is not JSON; '
                                "passed on as a string")
            literal = json.dumps(raw, ensure_ascii=False)
        parts.append(f"{json.dumps(key, ensure_ascii=False)}: {literal}")
    return "{" + ", ".join(parts) + "}", tuple(problems)


class _Invoke:
    def __init__(self, name: str, raw: str):
        self.name, self.raw = name, raw
        self.params: list[tuple[str, str | None, str]] = []
        self.error: str | None = None
        self.param: tuple[str, str | None] | None = None  # open parameter awaiting its close tag
        self.scan = 0  # where the search for that close tag resumes


class ReplyParser:
    """Text in (any chunking), events out; the same text gives the same events however split.

    Starts inside reasoning when `thinking` (the prompt ends with `<think>`). Text that could be
    the start of a tag (`<`, `</thi`, `<｜DSM`) and trailing whitespace are held back until the
    next chunk decides. Think tags and chat tokens never reach the text; EOS, `<｜User｜>` or
    `<｜Assistant｜>` ends the reply (`done`). Any DSML tag (`<｜DSML｜…`, or `<|DSML|…` with ASCII
    pipes) hands over to the block parser, also before `</think>`; with `tools_enabled` false
    DSML is ordinary text. A call is emitted whole when its invoke closes.

    Nothing raises. A call that cannot be read (a duplicated parameter, stray text inside the
    invoke, an invoke left open) is a `ToolCallError` instead of a `ToolCallEvent`; stray text
    between invokes is a `ToolCallError` of its own. `finish()` flushes what is held back: text
    becomes reasoning or content, an invoke cut off by the end of the text becomes a
    `ToolCallError(truncated=True)` with the raw DSML (calls finished before it still count).
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
        self.done = False
        markers = (THINK_CLOSE, THINK_OPEN) + _STOPS
        if tools_enabled:
            markers += _TOOL_MARKERS + (DSML,)  # a bare DSML token is dropped (A11.4)
        self._markers = markers
        self._marker_re = re.compile("|".join(re.escape(m) for m in sorted(markers, key=len, reverse=True)))

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
            self._emit(out, before.rstrip())  # A11.3: trailing whitespace before a block goes
            self._buf, self._state = marker + self._buf, "tools"
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
            return self._read_value(inv)
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
        if not body or (">" not in body and any(t.startswith(body[: len(t)]) for t in _TAG_STARTS)):
            return False  # nothing yet, or a tag still arriving
        cut = body.find("<", 1)
        cut = len(body) if cut < 0 else cut
        self._record(skipped)
        self._stray(body[:cut])
        self._buf = body[cut:]
        return True

    def _record(self, text: str) -> None:
        """Keep consumed block text: in the open invoke's raw DSML, else with the stray text."""
        if self._invoke is None:
            self._junk += text
        else:
            self._invoke.raw += text

    def _stray(self, text: str) -> None:
        """Text in a block that is no tag: spoils the open invoke, else is reported later."""
        self._record(text)
        if self._invoke is not None:
            self._invoke.error = self._invoke.error or "unexpected text inside the invoke"

    def _tag(self, out: list[Event], action: str, m: re.Match, raw: str) -> None:
        inv = self._invoke
        if action == "invoke":
            self._report_junk(out)
            if inv is not None:
                out.append(ToolCallError("a new invoke began before this one closed", inv.raw, inv.name))
            self._invoke = _Invoke(m.group(1), raw)
        elif action == "end":
            self._end_tools(out, truncated=False)
            self._state, self._after_block = "content", True
        elif action == "skip":  # the block opener: expected outside an invoke only
            if inv is not None:
                self._stray(raw)
        elif inv is None:  # a parameter, or an invoke close, outside an invoke
            self._stray(raw)
        elif action == "param":
            inv.raw += raw
            inv.param, inv.scan = (m.group(1), m.group(2)), 0
        else:
            inv.raw += raw
            self._close_invoke(out)

    def _read_value(self, inv: _Invoke) -> bool:
        m = _PARAM_CLOSE.search(self._buf, max(0, inv.scan - 24))
        if m is None:
            inv.scan = len(self._buf)
            return False
        key, is_str = inv.param
        value = self._buf[: m.start()]
        if any(k == key for k, _, _ in inv.params):
            inv.error = f'parameter "{key}" appears twice'
        inv.params.append((key, is_str, value))
        inv.raw += self._buf[: m.end()]
        self._buf, inv.param = self._buf[m.end():], None
        return True

    def _close_invoke(self, out: list[Event]) -> None:
        inv, self._invoke = self._invoke, None
        if inv.error:
            out.append(ToolCallError(inv.error, inv.raw, inv.name))
            return
        arguments, problems = arguments_json(inv.params)
        out.append(ToolCallEvent(self._calls, new_call_id(), inv.name, arguments, problems))
        self._calls += 1

    def _report_junk(self, out: list[Event]) -> None:
        junk, self._junk = self._junk.strip(), ""
        if junk:
            out.append(ToolCallError("unexpected text inside the tool-call block", junk))

    def _end_tools(self, out: list[Event], truncated: bool) -> None:
        """Leave the block: report an unfinished invoke and stray text."""
        inv, self._invoke = self._invoke, None
        pending = self._buf.strip() if truncated else ""
        if inv is not None:
            out.append(ToolCallError("the reply ended inside a tool call" if truncated
                                     else "the tool-call block ended inside an invoke",
                                     inv.raw + (self._buf if truncated else ""), inv.name, truncated))
        elif any(len(pending) > len(o) - len("invoke") and (pending.startswith(o) or o.startswith(pending))
                 for o in _INVOKE_STARTS):  # cut inside the invoke tag, past `<｜DSML｜` (and its space)
            out.append(ToolCallError("the reply ended inside a tool call", pending, truncated=True))
        self._report_junk(out)


def _holdback(buf: str, markers: tuple[str, ...]) -> int:
    """Length of `buf` that is safe to emit: not a possible marker start, not trailing space."""
    cut = len(buf)
    for marker in markers:
        for k in range(min(len(marker) - 1, len(buf)), 0, -1):
            if buf.endswith(marker[:k]):
                cut = min(cut, len(buf) - k)
                break
    while cut and buf[cut - 1].isspace():
        cut -= 1
    return cut


def _merge(events: list[Event]) -> list[Event]:
    """Join neighbouring deltas of the same kind."""
    out: list[Event] = []
    for e in events:
        if out and type(e) is type(out[-1]) and isinstance(e, (ReasoningDelta, ContentDelta)):
            out[-1] = type(e)(out[-1].text + e.text)
        else:
            out.append(e)
    return out


def parse_reply(text: str, thinking: bool, *, tools_enabled: bool = True
                ) -> tuple[str, str, list[ToolCallEvent]]:
    """Whole reply -> `(reasoning, content, tool_calls)`: the fold of `ReplyParser`.

    Calls that could not be parsed are left out here; `ReplyParser` reports them as
    `ToolCallError` events."""
    parser = ReplyParser(thinking, tools_enabled)
    events = parser.feed(text) + parser.finish()
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    return reasoning, content, [e for e in events if isinstance(e, ToolCallEvent)]

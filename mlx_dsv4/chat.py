"""A conversation without a terminal: messages and settings over one `Session`.

One turn renders the whole conversation with the V4 encoding, tokenizes it with the A13 guard,
lets the session reuse what its cache already holds, and parses the streamed text into
reasoning, content and tool-call events. `dsv4 chat` (repl.py) drives it; tests drive it
directly. Slash commands are parsed and applied here too, as pure functions of a `Chat`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from .chat_format import (ChatFormatError, ContentDelta, Encoding, ReasoningDelta, ReplyParser,
                          ToolCallError, ToolCallEvent, render_segments)
from .generate import Chunk
from .session import Session

DEFAULT_MAX_TOKENS = 8192


class Interrupted(Exception):
    """Raised between prefill chunks when the user asked to stop."""


@dataclass
class Done:
    """End of a turn: the last chunk's stats, why it ended, and whether the user stopped it."""

    chunk: Chunk | None
    finish_reason: str | None
    interrupted: bool = False


@dataclass
class Chat:
    session: Session
    tokenizer: object
    encoding: Encoding | None = None
    thinking: bool = True
    effort: str | None = None
    system: str | None = None
    sampling: dict = field(default_factory=lambda: {"temperature": 1.0, "top_p": 1.0})
    messages: list[dict] = field(default_factory=list)

    @classmethod
    def open(cls, model: str | Path, *, max_context: int | None = None, kv_bits: int | None = None,
             prefill_chunk: int = 512, thinking: bool = True) -> tuple["Chat", list[str]]:
        """Plan, wire memory, load a converted model (path or the repo id it came from); returns
        the chat and lines worth telling the user (context, wired limit)."""
        from .chat_format import load_encoding
        from .plan import apply_wired_limit, plan_context
        from .weights import load, resolve_model

        path = resolve_model(model)
        plan, context = plan_context(path, max_context, kv_bits=kv_bits, prefill_chunk=prefill_chunk)
        notes = [f"{path.name}: {context:,} tokens of context ({plan.verdict()})"]
        wired = apply_wired_limit(plan)
        if wired:
            notes.append(wired)
        lm, tokenizer = load(path)
        session = Session(lm, tokenizer, max_context=context, largest_context=plan.largest_context,
                          kv_bits=kv_bits, prefill_chunk=plan.run_chunk)
        encoding = load_encoding(path)
        if encoding is None:
            notes.append("this model ships no encoding/encoding_dsv4.py: tools and effort are off")
        return cls(session, tokenizer, encoding=encoding, thinking=thinking), notes

    def conversation(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    def prompt_ids(self) -> list[int]:
        segments = render_segments(self.conversation(), thinking=self.thinking,
                                   reasoning_effort=self.effort if self.thinking else None,
                                   encoding=self.encoding)
        return self.tokenizer.encode_segments(segments)

    def send(self, text: str, *, should_stop: Callable[[], bool] = lambda: False,
             progress: Callable[[int, int], None] | None = None) -> Iterator:
        """Yield parser events for the reply to `text`, then a `Done`."""
        self.messages.append({"role": "user", "content": text})
        ids = self.prompt_ids()
        limit = self.session.max_context
        room = DEFAULT_MAX_TOKENS if limit is None else max(1, limit - len(ids))
        sampling = {k: v for k, v in self.sampling.items() if v is not None}
        sampling["max_tokens"] = min(sampling.get("max_tokens") or DEFAULT_MAX_TOKENS, room)

        def check(done, total):
            if should_stop():
                raise Interrupted
            if progress:
                progress(done, total)

        parser = ReplyParser(thinking=self.thinking)
        reasoning, content, calls = [], [], []
        last, interrupted = None, False
        stream = self.session.generate(ids, progress=check, **sampling)
        try:
            for last in stream:
                for event in parser.feed(last.text):
                    _collect(event, reasoning, content, calls)
                    yield event
                if should_stop() and last.finish_reason is None:
                    interrupted = True
                    break
        except Interrupted:
            interrupted = True
        finally:
            stream.close()
        for event in parser.finish():
            _collect(event, reasoning, content, calls)
            yield event
        reply = {"role": "assistant", "content": "".join(content),
                 "reasoning_content": "".join(reasoning) if self.thinking else None}
        if calls:
            reply["tool_calls"] = [c.to_openai() for c in calls]
        self.messages.append(reply)
        yield Done(last, last.finish_reason if last else None, interrupted)

    def save(self, path: str | Path):
        state = {"messages": self.messages, "system": self.system, "thinking": self.thinking,
                 "effort": self.effort}
        Path(path).write_text(json.dumps(state, ensure_ascii=False, indent=1))

    def load(self, path: str | Path):
        state = json.loads(Path(path).read_text())
        self.messages = list(state.get("messages", []))
        self.system = state.get("system")
        self.thinking = bool(state.get("thinking", self.thinking))
        self.effort = state.get("effort")


def _collect(event, reasoning: list, content: list, calls: list):
    if isinstance(event, ReasoningDelta):
        reasoning.append(event.text)
    elif isinstance(event, ContentDelta):
        content.append(event.text)
    elif isinstance(event, ToolCallEvent):
        calls.append(event)


# ----- slash commands ---------------------------------------------------------------------------

HELP = """\
/think on|off        thinking mode (reasoning before the answer)
/effort LEVEL        reasoning effort (the checkpoint's levels, e.g. high, max; 'default' resets)
/system [TEXT]       set the system prompt (no text: clear it)
/reasoning show|hide show the reasoning as it streams, or fold it to one line
/reset               forget the conversation
/save FILE, /load FILE
/quit                leave (Ctrl-D too); Ctrl-C stops the current reply"""


@dataclass
class Command:
    name: str
    arg: str = ""


class Quit(Exception):
    pass


def parse_command(line: str) -> Command | None:
    """`/name arg…` -> Command; anything else is a message (None)."""
    text = line.strip()
    if not text.startswith("/") or text.startswith("//"):
        return None
    name, _, arg = text[1:].partition(" ")
    return Command(name.lower(), arg.strip())


def apply_command(chat: Chat, cmd: Command, view: dict) -> str:
    """Change `chat` (or the terminal `view` settings) and say what happened."""
    if cmd.name in ("quit", "exit", "q"):
        raise Quit
    if cmd.name == "help":
        return HELP
    if cmd.name == "reset":
        chat.messages.clear()
        return "Conversation cleared."
    if cmd.name == "system":
        chat.system = cmd.arg or None
        return f"System prompt set ({len(cmd.arg)} characters)." if cmd.arg else "System prompt cleared."
    if cmd.name == "think":
        if cmd.arg not in ("on", "off"):
            return "Usage: /think on|off"
        chat.thinking = cmd.arg == "on"
        return f"Thinking {cmd.arg}."
    if cmd.name == "effort":
        return _set_effort(chat, cmd.arg)
    if cmd.name == "reasoning":
        if cmd.arg not in ("show", "hide"):
            return "Usage: /reasoning show|hide"
        view["show_reasoning"] = cmd.arg == "show"
        return f"Reasoning will be {'shown' if cmd.arg == 'show' else 'folded'}."
    if cmd.name in ("save", "load"):
        if not cmd.arg:
            return f"Usage: /{cmd.name} FILE"
        try:
            getattr(chat, cmd.name)(Path(cmd.arg).expanduser())
        except (OSError, ValueError) as e:
            return f"Could not {cmd.name} {cmd.arg}: {e}"
        return f"{'Saved to' if cmd.name == 'save' else 'Loaded'} {cmd.arg} ({len(chat.messages)} messages)."
    return f"Unknown command /{cmd.name}. /help lists them."


def _set_effort(chat: Chat, level: str) -> str:
    level = level.lower()
    if level in ("", "default", "none"):
        chat.effort = None
        return "Reasoning effort: the checkpoint's default."
    try:  # let the encoding say whether this checkpoint knows the level
        render_segments([{"role": "user", "content": "x"}], thinking=True, reasoning_effort=level,
                        encoding=chat.encoding)
    except ChatFormatError as e:
        return str(e)
    chat.effort = level
    return f"Reasoning effort: {level}."


__all__ = ["Chat", "Command", "Done", "Interrupted", "Quit", "apply_command", "parse_command",
           "ToolCallError"]

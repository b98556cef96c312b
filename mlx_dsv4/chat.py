"""A conversation without a terminal: messages and settings over one `Session`.

One turn renders the whole conversation with the V4 encoding, tokenizes it with the A13 guard,
lets the session reuse what its cache already holds, and parses the streamed text into
reasoning, content and tool-call events. When the conversation outgrows the context, the oldest
turns are left out of the prompt (a `Trimmed` event says so) while `messages` keeps them all for
/save. A turn that fails leaves the conversation as it was. `dsv4 chat` (repl.py) drives it;
tests drive it directly. Slash commands are parsed and applied here too, as pure functions of a
`Chat`.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from .text.chat_format import (V41, ChatFormatError, ContentDelta, Encoding, ReasoningDelta, ReplyParser,
                          ToolCallError, ToolCallEvent, effort_on_scale, render_segments)
from .generation.generate import Chunk
from .generation.session import Session

DEFAULT_MAX_TOKENS = 8192
REPLY_SHARE = 4  # a reply is always left at least 1/4 of the context (or max_tokens if smaller)
TRIM_TO = 2  # trimming keeps the prompt to 1/2 of the context, so later turns reuse the cache


class Interrupted(Exception):
    """Raised between prefill chunks when the user asked to stop."""


class TurnError(ValueError):
    """A message that cannot be sent as it is; nothing in the conversation changed."""


@dataclass
class Done:
    """End of a turn: the last chunk's stats, why it ended, and whether the user stopped it."""

    chunk: Chunk | None
    finish_reason: str | None
    interrupted: bool = False


@dataclass
class Trimmed:
    """The oldest turns no longer fit: the prompt now starts at `messages[first]`."""

    turns: int  # turns left out by this trim
    first: int
    prompt_tokens: int
    context: int


def clean_text(text: str) -> str:
    """`text` as valid Unicode: bytes a terminal could not decode (surrogate escapes, as
    prompt-toolkit and json hand them over) become U+FFFD instead of failing the tokenizer."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # lone surrogates outside the escape range
        return text.encode("utf-8", "replace").decode("utf-8")


def _clean(value):
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


@dataclass
class Chat:
    session: Session
    tokenizer: object
    encoding: Encoding | None = None
    thinking: bool = True
    effort: str | int | None = None  # an encoder level (V4.1: or its 1-100 budget)
    system: str | None = None
    sampling: dict = field(default_factory=lambda: {"temperature": 1.0, "top_p": 1.0})
    messages: list[dict] = field(default_factory=list)  # the whole conversation, as /save writes it
    first: int = 0  # messages[first:] are what the model reads; earlier ones were trimmed

    @classmethod
    def open(cls, model: str | Path, *, max_context: int | None = None, kv_bits: int | None = None,
             prefill_chunk: int = 512, thinking: bool = True,
             draft: int | None = None, expert_memory: int | str | None = None,
             prompt_cache: dict | None = None) -> tuple["Chat", list[str]]:
        """Plan, wire memory, load a converted model (path or the repo id it came from); returns
        the chat and lines worth telling the user (context, wired limit, speculation).
        `draft`: MTP draft tokens per step (None: the default when the checkpoint has MTP).
        `expert_memory` (bytes, or "auto") streams the routed experts from disk through a cache.
        `prompt_cache`: `open_prompt_cache`'s options (None: no prompt cache); with a folder, a
        conversation reopened with /load after a restart resumes from the states kept there."""
        from .generation.cache_folder import claim_option
        from .generation.prompt_cache import DEFAULT_BYTES, open_prompt_cache
        from .generation.speculative import resolve_draft
        from .text.chat_format import load_encoding
        from .plan import apply_wired_limit, plan_context
        from .model.weights import load, resolve_model

        path = resolve_model(model)
        claim_option(prompt_cache)  # a folder that is not the cache's own is refused before loading
        plan, context = plan_context(path, max_context, kv_bits=kv_bits, prefill_chunk=prefill_chunk,
                                     expert_memory=expert_memory,
                                     other_bytes=prompt_cache.get("max_bytes", DEFAULT_BYTES) if prompt_cache else 0)
        notes = [f"{path.name}: {context:,} tokens of context ({plan.verdict()})"]
        wired = apply_wired_limit(plan)
        if wired:
            notes.append(wired)
        lm, tokenizer = load(path, expert_memory=plan.expert_memory, splits=plan.splits)
        if plan.streams:
            notes.append(f"routed experts stream from disk through a {plan.expert_memory / 2**30:.1f}"
                         f" GiB cache ({plan.cache_share:.0%} of them)")
        draft = resolve_draft(lm, draft)
        if draft:
            notes.append(f"speculative decoding: the MTP block drafts {draft} token(s) per step "
                         "(--no-mtp turns it off)")
        cache = open_prompt_cache(path, kv_bits=kv_bits, **prompt_cache) if prompt_cache else None
        if cache is not None and cache.directory is not None:
            notes.append(f"prompt cache: {cache.directory} (--no-prompt-cache turns it off)")
        session = Session(lm, tokenizer, max_context=context, largest_context=plan.largest_context,
                          kv_bits=kv_bits, prefill_chunk=plan.run_chunk, draft=draft,
                          prompt_cache=cache)
        encoding = load_encoding(path)
        if encoding is None:
            notes.append("this model ships no encoding/encoding_dsv4.py: tools and effort are off")
        return cls(session, tokenizer, encoding=encoding, thinking=thinking), notes

    def conversation(self) -> list[dict]:
        """What the model reads: the system prompt and the turns not trimmed."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages[self.first:]

    def prompt_ids(self, messages: list[dict] | None = None) -> list[int]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        segments = render_segments(head + messages if messages is not None else self.conversation(),
                                   thinking=self.thinking,
                                   reasoning_effort=self.effort if self.thinking else None,
                                   encoding=self.encoding)
        return self.tokenizer.encode_segments(segments)

    def _fit(self, messages: list[dict]) -> tuple[list[int], int, int]:
        """(prompt ids, first message sent, reply budget) for `messages`, leaving out the oldest
        turns when the reply would get less than its share of the context."""
        limit = self.session.max_context
        want = self.sampling.get("max_tokens") or DEFAULT_MAX_TOKENS
        ids = self.prompt_ids(messages[self.first:])
        if limit is None:
            return ids, self.first, want
        keep = min(want, max(1, limit // REPLY_SHARE))
        if len(ids) + keep <= limit:
            return ids, self.first, min(want, limit - len(ids))
        starts = [i for i, m in enumerate(messages) if i > self.first and m.get("role") == "user"]
        # Fewest turns dropped whose prompt fills at most 1/TRIM_TO of the context (binary search:
        # the prompt only shrinks as turns are dropped); else just the latest turn, if it fits.
        lo, hi, best = 0, len(starts) - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            trial = self.prompt_ids(messages[starts[mid]:])
            if len(trial) <= limit // TRIM_TO:
                best, hi = (starts[mid], trial), mid - 1
            else:
                lo = mid + 1
        if best is None and starts:
            best = (starts[-1], self.prompt_ids(messages[starts[-1]:]))
        if best is None or len(best[1]) + keep > limit:
            n = len(best[1]) if best else len(ids)
            what = "The system prompt and this message need" if self.system else "This message needs"
            raise TurnError(f"{what} {n:,} tokens, and the {limit:,}-token context must also keep "
                            f"{keep:,} for the reply: shorten it"
                            + (" or the system prompt (/system)" if self.system else "")
                            + ", or restart with a larger --max-context.")
        first, ids = best
        return ids, first, min(want, limit - len(ids))

    def send(self, text: str, *, should_stop: Callable[[], bool] = lambda: False,
             progress: Callable[[int, int], None] | None = None) -> Iterator:
        """Yield a `Trimmed` if old turns had to go, parser events for the reply to `text`, then
        a `Done`. If the turn fails (an exception, or the caller stops reading before `Done`),
        the conversation is left as it was; a `TurnError` means the message cannot be sent."""
        user = {"role": "user", "content": clean_text(text)}
        ids, first, room = self._fit(self.messages + [user])
        before, first_before = len(self.messages), self.first
        if first != self.first:
            dropped = sum(1 for m in self.messages[self.first:first] if m.get("role") == "user")
            yield Trimmed(dropped, first, len(ids), self.session.max_context)
        self.messages.append(user)
        self.first = first
        sampling = {k: v for k, v in self.sampling.items() if v is not None}
        sampling["max_tokens"] = room

        def check(done, total):
            if should_stop():
                raise Interrupted
            if progress:
                progress(done, total)

        kept = False
        try:
            reply, last, interrupted = yield from self._stream(ids, sampling, check, should_stop)
            self.messages.append(reply)
            kept = True
            yield Done(last, last.finish_reason if last else None, interrupted)
        except Exception:
            self.session.reset()  # a failure inside the model may leave the pools half-written
            raise
        finally:
            if not kept:
                del self.messages[before:]
                self.first = first_before

    def _stream(self, ids, sampling, check, should_stop):
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
        return reply, last, interrupted

    def save(self, path: str | Path):
        """Write the whole conversation (trimmed turns too) as JSON (`write_regular`)."""
        state = {"messages": self.messages, "system": self.system, "thinking": self.thinking,
                 "effort": self.effort}
        write_regular(Path(path), json.dumps(state, ensure_ascii=False, indent=1))

    def load(self, path: str | Path):
        """Replace the conversation with a file written by `save`; a file that is not one, or
        that this checkpoint's encoder cannot render, changes nothing."""
        try:
            state = json.loads(read_regular(Path(path)))
        except RecursionError:
            raise ValueError("it is nested too deeply to be a saved conversation") from None
        if not isinstance(state, dict) or not isinstance(state.get("messages", []), list):
            raise ValueError("not a saved conversation (a JSON object with a \"messages\" list)")
        messages = _clean(state.get("messages", []))
        for i, m in enumerate(messages, start=1):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ValueError(f"message {i} is not an object with a \"role\"")
        system, effort = _clean(state.get("system")), state.get("effort")
        thinking = state.get("thinking", self.thinking)
        if not (isinstance(system, (str, type(None))) and isinstance(effort, (str, int, type(None)))
                and not isinstance(effort, bool) and isinstance(thinking, bool)):
            raise ValueError("\"system\" must be a string or null, \"effort\" a string, a number or null, "
                             "\"thinking\" true or false")
        head = [{"role": "system", "content": system}] if system else []
        try:  # refuse now what the next turn could not render
            render_segments(head + messages, thinking=thinking,
                            reasoning_effort=effort if thinking else None, encoding=self.encoding)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"this model cannot render it: {e}") from None
        self.messages, self.first = messages, 0
        self.system, self.thinking, self.effort = system or None, thinking, effort


def write_regular(path: Path, text: str) -> None:
    """Write `text` (UTF-8) beside `path`, then rename it over `path`: only over a regular file,
    whose mode it keeps, or where nothing is (a new file is 0600: it holds a conversation). An
    existing file is replaced only once the new one is whole. A symbolic link, directory, device
    or FIFO at `path` is refused: the rename would replace it, not write into it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        mode = 0o600
    else:
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"it is {_kind(st.st_mode)}; /save writes regular files only")
        mode = stat.S_IMODE(st.st_mode)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with open(fd, "w", encoding="utf-8") as f:
            f.write(text)
            os.fchmod(f.fileno(), mode)  # not subject to the umask, unlike a new file's mode
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def read_regular(path: Path) -> str:
    """A regular file's text; a FIFO, device or directory is refused without waiting on it."""
    with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
        kind = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(kind):
            raise ValueError(f"it is {_kind(kind)}, not a regular file")
        return f.read().decode("utf-8")


def _kind(mode: int) -> str:
    kinds = [(stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket")]
    return next((name for test, name in kinds if test(mode)), "not a regular file")


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
/effort LEVEL        reasoning effort (the checkpoint's levels, e.g. high, max; V4.1 also 1-100; 'default' resets)
/system [TEXT]       set the system prompt (no text: clear it)
/reasoning show|hide show the reasoning as it streams, or fold it to one line
/reset               forget the conversation
/save FILE, /load FILE
/quit                leave (Ctrl-D too); Ctrl-C stops the current reply or clears the line
//TEXT               send /TEXT as a message
When the conversation outgrows the context, its oldest turns are left out of what the model
reads; /save still writes them all."""


@dataclass
class Command:
    name: str
    arg: str = ""


class Quit(Exception):
    pass


def parse_command(line: str) -> Command | None:
    """`/name arg…` -> Command; anything else, `//…` included, is a message (None)."""
    text = line.strip()
    if not text.startswith("/") or text.startswith("//"):
        return None
    name, *rest = text[1:].split(None, 1) or [""]
    return Command(name.lower(), rest[0].strip() if rest else "")


def message_text(line: str) -> str:
    """What a line that is not a command sends: a leading `//` stands for one `/`."""
    stripped = line.lstrip()
    return stripped[1:] if stripped.startswith("//") else line


def apply_command(chat: Chat, cmd: Command, view: dict) -> str:
    """Change `chat` (or the terminal `view` settings) and say what happened; bad arguments get
    a one-line answer and change nothing."""
    if cmd.name in ("quit", "exit", "q"):
        raise Quit
    if cmd.name == "help":
        return HELP
    if cmd.name == "reset":
        chat.messages.clear()
        chat.first = 0
        return "Conversation cleared."
    if cmd.name == "system":
        text = clean_text(cmd.arg).strip()
        chat.system = text or None
        return f"System prompt set ({len(text):,} characters)." if text else "System prompt cleared."
    if cmd.name in ("think", "reasoning"):
        choices = ("on", "off") if cmd.name == "think" else ("show", "hide")
        arg = cmd.arg.lower()
        if arg not in choices:
            return f"Usage: /{cmd.name} {'|'.join(choices)}"
        if cmd.name == "think":
            chat.thinking = arg == "on"
            return f"Thinking {arg}."
        view["show_reasoning"] = arg == "show"
        return f"Reasoning will be {'shown' if arg == 'show' else 'folded'}."
    if cmd.name == "effort":
        return _set_effort(chat, cmd.arg)
    if cmd.name in ("save", "load"):
        return _file_command(chat, cmd)
    if not cmd.name:
        return "A command goes right after the slash; /help lists them."
    return f"Unknown command /{cmd.name}. /help lists them; //{cmd.name} sends it as a message."


def _file_command(chat: Chat, cmd: Command) -> str:
    if not cmd.arg:
        return f"Usage: /{cmd.name} FILE"
    path = Path(clean_text(cmd.arg)).expanduser()
    try:
        getattr(chat, cmd.name)(path)
    except json.JSONDecodeError as e:
        return f"Could not load {cmd.arg}: not JSON ({e.msg}, line {e.lineno})."
    except UnicodeDecodeError:
        return f"Could not load {cmd.arg}: not a text file."
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        return f"Could not {cmd.name} {cmd.arg}: {reason}."
    if cmd.name == "save":
        return f"Saved {len(chat.messages)} messages to {cmd.arg}."
    return f"Loaded {cmd.arg} ({len(chat.messages)} messages)."


def _set_effort(chat: Chat, level: str) -> str:
    level = level.lower()
    if level in ("", "default", "none"):
        chat.effort = None
        return "Reasoning effort: the checkpoint's default."
    if chat.encoding is not None and chat.encoding.version == V41:
        return _set_budget(chat, level)
    if chat.encoding is not None and chat.encoding.version != "builtin":
        levels = [k for k in chat.encoding.efforts if k is not None]
        if level not in levels:
            return f"Unknown effort {level!r}; this checkpoint accepts {', '.join(levels)} (or default)."
    else:  # let the encoding say why it has no levels
        try:
            render_segments([{"role": "user", "content": "x"}], thinking=True, reasoning_effort=level,
                            encoding=chat.encoding)
        except ChatFormatError as e:
            return str(e)
    chat.effort = level
    return f"Reasoning effort: {level}."


def _set_budget(chat: Chat, level: str) -> str:
    """V4.1: a level its encoder names, an API name between them (medium, ...), or 1-100."""
    value = int(level) if level.isascii() and level.isdigit() else level
    try:
        budget = effort_on_scale(chat.encoding, value)
    except ChatFormatError:
        levels = ", ".join(k for k in chat.encoding.efforts if k is not None)
        return f"Unknown effort {level!r}; this checkpoint accepts 1 to 100, {levels}, minimal, medium, " \
               "xhigh, ultra (or default)."
    chat.effort = value if value in chat.encoding.efforts else budget  # what its encoder takes
    return f"Reasoning effort: {level} ({budget} of 100)." if isinstance(value, str) else \
        f"Reasoning effort: {budget} of 100."


__all__ = ["Chat", "Command", "Done", "Interrupted", "Quit", "Trimmed", "TurnError", "apply_command",
           "clean_text", "message_text", "parse_command", "ToolCallError"]

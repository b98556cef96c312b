"""`dsv4 chat`: the terminal around `chat.Chat` (prompt-toolkit in, rich out).

Input: Enter sends, Alt-Enter (or Esc then Enter) adds a line, pasted text keeps its newlines,
history lives in a file only its owner reads (0600); Ctrl-C clears the line, Ctrl-D or /quit
leaves. Output: a status line until the first token (prefill progress when the prompt takes a
while), then the reply as it is generated, reasoning dimmed (or folded to one line with
/reasoning hide), then one stats line.
Model text is shown without terminal control sequences; the conversation keeps it as generated.
Ctrl-C during a reply stops it and keeps the chat; no input and no failed turn ends the chat.
Everything else is in chat.py, which knows no terminal.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import threading
import time
from pathlib import Path
from typing import Callable

from rich.console import Console

from .chat import (Chat, ContentDelta, Done, Quit, ReasoningDelta, Trimmed, TurnError, apply_command,
                   clean_text, message_text, parse_command)
from .text.chat_format import ToolCallError, ToolCallEvent

HISTORY = Path.home() / ".dsv4_history"
PROGRESS_AFTER = 1.0  # seconds of prefill before its progress is worth showing

# ESC sequences (CSI, OSC/DCS/APC… up to BEL or ST, and the short ones), then lone controls:
# C0 but tab and newline, DEL, C1.
_SEQUENCE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|[\]PX^_][^\x07\x1b]*(?:\x07|\x1b\\)|[ -/]*[0-~])")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_OPEN_SEQUENCE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*|[\]PX^_][^\x07\x1b]*|[ -/]*)\Z")
_HOLD_LIMIT = 256  # an unfinished sequence longer than this is not one: let it be stripped


def strip_controls(text: str) -> str:
    """`text` with terminal control sequences and control characters (but \\t, \\n) removed."""
    return _CONTROL.sub("", _SEQUENCE.sub("", text))


class ControlFilter:
    """`strip_controls` for a stream: holds back a sequence split between two deltas."""

    def __init__(self):
        self.held = ""

    def feed(self, text: str) -> str:
        text, self.held = self.held + text, ""
        m = _OPEN_SEQUENCE.search(text)
        if m and len(text) - m.start() <= _HOLD_LIMIT:
            text, self.held = text[: m.start()], text[m.start():]
        return strip_controls(text)

    def flush(self) -> str:
        text, self.held = self.held, ""
        return strip_controls(text)


def private_file(path: Path) -> None:
    """Make `path` a file only its owner reads (0600), creating it if missing: the history holds
    everything typed into the chat. A symbolic link or a file that is not regular is left as it
    is (and never waited on)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o600)
    except OSError:
        return  # prompt-toolkit says what it makes of it
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode) and mode & 0o077:
            os.fchmod(fd, stat.S_IMODE(mode) & 0o700)
    finally:
        os.close(fd)


def _prompt_session(history: Path):
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory
    from prompt_toolkit.key_binding import KeyBindings

    keys = KeyBindings()

    @keys.add("escape", "enter")
    def _(event):
        event.current_buffer.insert_text("\n")

    @keys.add("c-c")
    def _(event):
        # Clear what was typed; on an empty line, let the loop say how to leave.
        if event.current_buffer.text:
            event.current_buffer.reset()
        else:
            event.app.exit(exception=KeyboardInterrupt, style="class:aborting")

    history.parent.mkdir(parents=True, exist_ok=True)
    private_file(history)
    return PromptSession(history=FileHistory(str(history)), key_bindings=keys, multiline=False)


def _stats(done: Done) -> str:
    c = done.chunk
    if c is None:
        return "[dim]stopped before the first token[/dim]"
    end = "stopped by you" if done.interrupted else (done.finish_reason or "")
    mtp = "" if c.acceptance is None else f" · MTP {c.acceptance:.0%} kept"
    return (f"[dim]{c.prompt_tokens:,} prompt tokens ({c.reused_tokens:,} reused) at "
            f"{c.prompt_tps:,.1f} tok/s · {c.generation_tokens:,} tokens at "
            f"{c.generation_tps:,.1f} tok/s{mtp} · peak {c.peak_memory:,.2f} GB · {end}[/dim]")


def _trimmed(t: Trimmed) -> str:
    turns = "turn" if t.turns == 1 else f"{t.turns} turns"
    return (f"[yellow]The conversation outgrew the {t.context:,}-token context: the oldest {turns} "
            f"{'is' if t.turns == 1 else 'are'} left out of what the model reads (now "
            f"{t.prompt_tokens:,} tokens); /save still writes everything, /reset starts over.[/yellow]")


class Waiting:
    """The status line from sending until the first token: a spinner, and once prefill has
    taken `after` seconds, tokens done / total, tok/s and time left."""

    def __init__(self, console: Console, *, after: float = PROGRESS_AFTER,
                 clock: Callable[[], float] = time.monotonic):
        from rich.live import Live
        from rich.spinner import Spinner

        self.clock, self.after, self.start = clock, after, clock()
        self.spinner = Spinner("dots", text="waiting for the first token…", style="green")
        self.live = Live(self.spinner, console=console, transient=True, refresh_per_second=8)
        self.active = False

    def __enter__(self):
        self.live.start(refresh=True)  # shown at once, not at the first tick
        self.active = True
        return self

    def progress(self, done: int, total: int):
        elapsed = self.clock() - self.start
        if not self.active or done >= total or done <= 0 or elapsed < self.after:
            return
        rate = done / elapsed
        self.spinner.update(text=f"reading the prompt: {done:,} / {total:,} tokens · {rate:,.0f} tok/s"
                                 f" · about {_duration((total - done) / rate)} left")
        self.live.refresh()

    def stop(self):
        if self.active:
            self.active = False
            self.live.stop()

    def __exit__(self, *exc):
        self.stop()


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


class _Printer:
    """Streams one reply: reasoning dimmed or folded, then the answer, controls stripped."""

    def __init__(self, console: Console, show_reasoning: bool):
        self.console, self.show = console, show_reasoning
        self.phase, self.reasoning_chars = None, 0
        self.filter = ControlFilter()

    def _text(self, text: str, style: str | None = None):
        self.console.print(text, style=style, end="", markup=False, highlight=False)

    def __call__(self, event):
        out = self.console
        if isinstance(event, ReasoningDelta):
            if self.phase != "reasoning":
                self.phase = "reasoning"
                out.print("[dim italic]thinking…[/dim italic]" + ("\n" if self.show else ""), end="")
            self.reasoning_chars += len(event.text)
            if self.show:
                self._text(self.filter.feed(event.text), "dim")
        elif isinstance(event, ContentDelta):
            if self.phase == "reasoning":
                self._text(self.filter.flush(), "dim")
                out.print("" if self.show else f"[dim] ({self.reasoning_chars:,} characters)[/dim]")
                out.print()
            self.phase = "content"
            self._text(self.filter.feed(event.text))
        elif isinstance(event, ToolCallEvent):
            self.end()
            out.print(f"\n[cyan]tool call {strip_controls(event.name)}"
                      f"({strip_controls(event.arguments)})[/cyan]", highlight=False, markup=False)
        elif isinstance(event, ToolCallError):
            self.end()
            out.print(f"\nunusable tool call: {strip_controls(event.reason)}", style="red",
                      highlight=False, markup=False)

    def end(self):
        self._text(self.filter.flush(), "dim" if self.phase == "reasoning" else None)


def _reply(console: Console, chat: Chat, text: str, view: dict,
           clock: Callable[[], float] = time.monotonic):
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    printer = _Printer(console, view["show_reasoning"])
    waiting = Waiting(console, clock=clock)
    try:
        with waiting:
            for event in chat.send(text, should_stop=stop.is_set, progress=waiting.progress):
                if isinstance(event, Trimmed):
                    console.print(_trimmed(event), highlight=False)
                    continue
                waiting.stop()
                if isinstance(event, Done):
                    printer.end()
                    console.print()
                    console.print(_stats(event))
                else:
                    printer(event)
    finally:
        signal.signal(signal.SIGINT, previous)


def _turn(console: Console, chat: Chat, line: str, view: dict, **kwargs):
    """One message and its reply; whatever goes wrong is one line, and the chat goes on."""
    text = message_text(line)
    if clean_text(text) != text:
        console.print("[yellow]Your input held bytes that are not UTF-8; they are sent as �.[/yellow]")
    try:
        _reply(console, chat, text, view, **kwargs)
    except TurnError as e:
        console.print(str(e), style="yellow", markup=False, highlight=False)
    except Exception as e:  # noqa: BLE001 - the chat must outlive any failed turn
        reason = (str(e).strip().splitlines() or [""])[0]
        console.print(f"\nThe reply failed ({type(e).__name__}: {reason}); the conversation is as "
                      "it was before your message (↑ brings it back).", style="red",
                      markup=False, highlight=False)


def _command(console: Console, chat: Chat, line: str, view: dict) -> bool:
    """Run a slash command; False when it was /quit."""
    cmd = parse_command(line)
    try:
        console.print(strip_controls(apply_command(chat, cmd, view)), markup=False, highlight=False)
    except Quit:
        return False
    except Exception as e:  # noqa: BLE001 - a command with odd arguments must not end the chat
        console.print(f"/{cmd.name} failed: {type(e).__name__}: {e}", style="red", markup=False,
                      highlight=False)
    return True


def run(chat: Chat, *, console: Console | None = None, banner: str = "",
        history: Path = HISTORY):
    """The read–reply loop until /quit or Ctrl-D."""
    console = console or Console()
    if banner:
        console.print(banner)
    console.print("[dim]/help for commands · Alt-Enter for a new line · Ctrl-C stops a reply · "
                  "Ctrl-D leaves[/dim]")
    prompt = _prompt_session(history)
    view = {"show_reasoning": True}
    while True:
        try:
            line = prompt.prompt("› ")
            if not line.strip():
                continue
            if parse_command(line) is not None:
                if not _command(console, chat, line, view):
                    return
                continue
            _turn(console, chat, line, view)
        except EOFError:
            return
        except KeyboardInterrupt:  # Ctrl-C on an empty line, or between two prompts
            console.print("[dim]Ctrl-D or /quit leaves the chat.[/dim]")

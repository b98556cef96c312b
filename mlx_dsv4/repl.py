"""`dsv4 chat`: the terminal around `chat.Chat` (prompt-toolkit in, rich out).

Input: Enter sends, Alt-Enter (or Esc then Enter) adds a line, pasted text keeps its newlines,
history lives in a file. Output: the reply streams as it is generated, reasoning dimmed (or
folded to one line with /reasoning hide), then one stats line. Ctrl-C stops the current reply
and keeps the chat; Ctrl-D or /quit leaves. Everything else is in chat.py, which knows no
terminal.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from rich.console import Console

from .chat import Chat, ContentDelta, Done, Quit, ReasoningDelta, apply_command, parse_command
from .chat_format import ToolCallError, ToolCallEvent

HISTORY = Path.home() / ".dsv4_history"


def _prompt_session(history: Path):
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory
    from prompt_toolkit.key_binding import KeyBindings

    keys = KeyBindings()

    @keys.add("escape", "enter")
    def _(event):
        event.current_buffer.insert_text("\n")

    history.parent.mkdir(parents=True, exist_ok=True)
    return PromptSession(history=FileHistory(str(history)), key_bindings=keys, multiline=False)


def _stats(done: Done) -> str:
    c = done.chunk
    if c is None:
        return "[dim]stopped before the first token[/dim]"
    end = "stopped by you" if done.interrupted else (done.finish_reason or "")
    return (f"[dim]{c.prompt_tokens:,} prompt tokens ({c.reused_tokens:,} reused) at "
            f"{c.prompt_tps:,.1f} tok/s · {c.generation_tokens:,} tokens at "
            f"{c.generation_tps:,.1f} tok/s · peak {c.peak_memory:,.2f} GB · {end}[/dim]")


class _Printer:
    """Streams one reply: reasoning dimmed or folded, then the answer."""

    def __init__(self, console: Console, show_reasoning: bool):
        self.console, self.show = console, show_reasoning
        self.phase, self.reasoning_chars = None, 0

    def __call__(self, event):
        out = self.console
        if isinstance(event, ReasoningDelta):
            if self.phase != "reasoning":
                self.phase = "reasoning"
                out.print("[dim italic]thinking…[/dim italic]" + ("\n" if self.show else ""), end="")
            self.reasoning_chars += len(event.text)
            if self.show:
                out.print(event.text, style="dim", end="", markup=False, highlight=False)
        elif isinstance(event, ContentDelta):
            if self.phase == "reasoning":
                out.print("" if self.show else f"[dim] ({self.reasoning_chars:,} characters)[/dim]")
                out.print()
            self.phase = "content"
            out.print(event.text, end="", markup=False, highlight=False)
        elif isinstance(event, ToolCallEvent):
            out.print(f"\n[cyan]tool call {event.name}({event.arguments})[/cyan]", highlight=False)
        elif isinstance(event, ToolCallError):
            out.print(f"\n[red]unusable tool call: {event.reason}[/red]", highlight=False)


def _reply(console: Console, chat: Chat, text: str, view: dict):
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    printer = _Printer(console, view["show_reasoning"])
    try:
        for event in chat.send(text, should_stop=stop.is_set):
            if isinstance(event, Done):
                console.print()
                console.print(_stats(event))
            else:
                printer(event)
    finally:
        signal.signal(signal.SIGINT, previous)


def run(chat: Chat, *, console: Console | None = None, banner: str = "",
        history: Path = HISTORY):
    """The read–reply loop until /quit or Ctrl-D."""
    console = console or Console()
    if banner:
        console.print(banner)
    console.print("[dim]/help for commands · Alt-Enter for a new line · Ctrl-C stops a reply[/dim]")
    prompt = _prompt_session(history)
    view = {"show_reasoning": True}
    while True:
        try:
            line = prompt.prompt("› ")
        except EOFError:
            return
        except KeyboardInterrupt:
            continue
        if not line.strip():
            continue
        cmd = parse_command(line)
        if cmd is not None:
            try:
                console.print(apply_command(chat, cmd, view), highlight=False)
            except Quit:
                return
            continue
        _reply(console, chat, line, view)

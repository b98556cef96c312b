"""`dsv4 chat`'s terminal side without a terminal: what reaches the screen, on a scripted model."""

import io
import re

import pytest

from mlx_dsv4.chat import Chat
from mlx_dsv4.generation.generate import Chunk
from mlx_dsv4.repl import ControlFilter, _command, _turn, strip_controls

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\r]")


class ScriptedSession:
    """Session stand-in: reports `steps` of prefill on a fake clock, then streams `texts`."""

    max_context = None

    def __init__(self, texts, steps=(), clock=None, fail_after=None):
        self.texts, self.steps, self.clock, self.fail_after = texts, steps, clock, fail_after
        self.resets = 0

    def generate(self, ids, *, progress=None, max_tokens=0, **sampling):
        for at, done, total in self.steps:
            self.clock.now = at
            progress(done, total)
        for i, text in enumerate(self.texts, start=1):
            if i == self.fail_after:
                raise RuntimeError("the device went away\nsecond line")
            last = i == len(self.texts)
            yield Chunk(text=text, token=i, generation_tokens=i, prompt_tokens=len(ids),
                        finish_reason="length" if last else None)

    def reset(self):
        self.resets += 1


class ByteTokenizer:
    def encode_segments(self, segments):
        return list("".join(text for text, _ in segments).encode())


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


def make_chat(*texts, **kwargs):
    return Chat(ScriptedSession(list(texts), **kwargs), ByteTokenizer(), thinking=True)


def console(terminal=False):
    from rich.console import Console

    return Console(file=io.StringIO(), force_terminal=terminal, width=200, color_system=None)


def test_model_text_reaches_the_screen_without_control_sequences(tmp_path):
    chat = make_chat("\x1b[31mred\x1b", "[0m\x07 thought\r", "</think>hello \x1b]0;pwned\x07",
                     "wor\x9bld\x1b[2J\x00\tend\n")
    out = console()
    _turn(out, chat, "hi", {"show_reasoning": True})
    screen = out.file.getvalue()
    assert re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", screen) is None
    assert "red thought" in screen and "pwned" not in screen
    assert re.search(r"hello world\s+end\n", screen)  # rich expands the tab
    # The conversation keeps what the model wrote; /save writes it as is.
    assert chat.messages[-1]["reasoning_content"] == "\x1b[31mred\x1b[0m\x07 thought\r"
    assert chat.messages[-1]["content"] == "hello \x1b]0;pwned\x07wor\x9bld\x1b[2J\x00\tend\n"
    chat.save(tmp_path / "c.json")
    assert "\\u001b]0;pwned\\u0007" in (tmp_path / "c.json").read_text()


def test_control_filter_holds_a_sequence_split_between_deltas():
    f = ControlFilter()
    assert f.feed("ab\x1b") == "ab" and f.feed("[3") == "" and f.feed("1mcd") == "cd"
    assert f.feed("x\x1b]8;;http://e") == "x" and f.feed("vil\x1b\\link") == "link"
    assert f.feed("tail\x1b[1") == "tail" and f.flush() == "1"  # never finished: ESC [ dropped
    assert f.feed("\x1b]" + "a" * 300) == "a" * 300  # too long to be held back
    assert strip_controls("tab\tnew\nline\u2028é€") == "tab\tnew\nline\u2028é€"


def test_prefill_progress_shows_after_a_second_then_gives_way_to_the_reply():
    clock = Clock()
    chat = make_chat("</think>", "the answer", steps=[(0.5, 512, 4096), (2.0, 2048, 4096),
                                                     (4.0, 4096, 4096)], clock=clock)
    out = console(terminal=True)
    _turn(out, chat, "a long paste", {"show_reasoning": True}, clock=clock)
    screen = ANSI.sub("", out.file.getvalue())
    assert "waiting for the first token…" in screen
    assert "512 / 4,096" not in screen  # under a second: the spinner alone
    assert "reading the prompt: 2,048 / 4,096 tokens · 1,024 tok/s · about 2 s left" in screen
    assert "4,096 / 4,096" not in screen
    # The status line is gone before the reply is printed: the reply is intact.
    assert screen.rindex("reading the prompt") < screen.index("the answer")
    assert "the answer\n" in screen


def test_a_failing_turn_prints_one_line_and_keeps_the_conversation():
    chat = make_chat("</think>", "ok", fail_after=2)
    chat.messages = [{"role": "user", "content": "before"}, {"role": "assistant", "content": "yes"}]
    out = console()
    _turn(out, chat, "hi", {"show_reasoning": True})
    lines = [x for x in out.file.getvalue().splitlines() if x.strip()]
    assert [x for x in lines if "failed" in x] == [
        "The reply failed (RuntimeError: the device went away); the conversation is as it was "
        "before your message (↑ brings it back)."]
    assert "second line" not in out.file.getvalue()
    assert [m["content"] for m in chat.messages] == ["before", "yes"] and chat.session.resets == 1
    chat.session.fail_after = None
    _turn(out, chat, "hi", {"show_reasoning": True})
    assert [m["content"] for m in chat.messages] == ["before", "yes", "hi", "ok"]


def test_undecodable_input_is_said_and_sent_as_replacement():
    chat = make_chat("</think>", "fine")
    out = console()
    _turn(out, chat, "\udcff", {"show_reasoning": True})
    assert "not UTF-8" in out.file.getvalue() and chat.messages[0]["content"] == "\ufffd"


@pytest.mark.parametrize("line", ["/save [/x]", "/load [bold]nope[/bold]", "/effort [/red]",
                                  "/[/oops]", "/system [/x]"])
def test_command_output_is_not_read_as_markup(line, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    chat = make_chat("x")
    out = console()
    assert _command(out, chat, line, {"show_reasoning": True}) is True
    screen = out.file.getvalue()
    assert screen.count("\n") == 1 and "failed" not in screen
    arg = line.split(" ", 1)[-1] if " " in line else line[1:]
    if not line.startswith("/system"):
        assert arg in screen


def test_the_stats_line_reports_mtp_drafts_only_when_speculating():
    from mlx_dsv4.chat import Done
    from mlx_dsv4.generation.generate import Chunk
    from mlx_dsv4.repl import _stats

    plain = Chunk(token=5, prompt_tokens=10, generation_tokens=3, finish_reason="stop")
    assert "MTP" not in _stats(Done(chunk=plain, finish_reason="stop"))
    spec = Chunk(token=5, prompt_tokens=10, generation_tokens=3, finish_reason="stop",
                 acceptance=0.8, tokens_per_forward=1.8)
    assert "tok/s · MTP 80% kept · peak" in _stats(Done(chunk=spec, finish_reason="stop"))

"""`dsv4 chat` in a real pseudo-terminal, on the selftest's tiny model: streamed replies, /reset,
/quit, Ctrl-C, and input that must not end the chat.

The screen is read as a stream: each `expect` consumes output up to the end of its match, and
every wait is for text that only a new event can produce (a stats line, a command's answer),
because prompt-toolkit may draw the same prompt more than once (again when the terminal answers
its cursor-position request).
"""

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|[\r\x08]")
STATS = r"tokens at [\d.,]+ tok/s( · MTP \d+% kept)? · peak [^\n]* · (length|stop|stopped by you)\n"
PROMPT = r"\s*›"


class Terminal:
    def __init__(self, argv, home: Path):
        self.master, slave = pty.openpty()
        env = dict(os.environ, HOME=str(home), TERM="xterm", COLUMNS="120", LINES="40")
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     close_fds=True, start_new_session=True)
        os.close(slave)
        self.raw = ""  # everything read, for the cursor-position requests and failure reports
        self.pos = 0  # how far `raw` has been consumed by matches (in its stripped form)

    def _read(self, wait: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], wait)
        if not ready:
            return True
        try:
            data = os.read(self.master, 65536).decode("utf-8", "replace")
        except OSError:  # the child closed the terminal
            return False
        # prompt-toolkit asks where the cursor is; answer every request, even one split
        # between two reads.
        before = self.raw.count("\x1b[6n")
        self.raw += data
        for _ in range(self.raw.count("\x1b[6n") - before):
            os.write(self.master, b"\x1b[1;1R")
        return True

    def expect(self, pattern: str, timeout: float = 60.0) -> str:
        """Wait for `pattern` in the output not yet consumed; return that output up to the end
        of the match and consume it."""
        end = time.monotonic() + timeout
        alive = True
        while True:
            text = ANSI.sub("", self.raw)[self.pos:]
            m = re.search(pattern, text)
            if m:
                self.pos += m.end()
                return text[: m.end()]
            if not alive or time.monotonic() > end:
                raise AssertionError(f"no {pattern!r} within {timeout} s; unread screen:\n{text}")
            alive = self._read(0.2)

    def send(self, text: str | bytes):
        os.write(self.master, text.encode() if isinstance(text, str) else text)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        os.close(self.master)


def flat(text: str) -> str:
    """`text` with the terminal's line wrapping undone."""
    return re.sub(r"\s+", " ", text)


def chat(model, home, *options) -> Terminal:
    return Terminal([sys.executable, "-m", "mlx_dsv4.cli", "chat", str(model), "--temperature", "0",
                     *options], home)


def test_chat_streams_a_reply_resets_and_quits(selftest_model, tmp_path):
    term = chat(selftest_model, tmp_path, "--max-tokens", "6")
    try:
        banner = term.expect(r"Ctrl-D leaves\n" + PROMPT)
        assert re.search(r"mlx-q4: [\d,]+ tokens of context \(fits", banner)
        term.send("hello there\r")
        stats = term.expect(STATS + PROMPT)
        assert "waiting for the first token" in stats  # the status before the first token
        assert re.search(r"6 tokens at [\d.,]+ tok/s", stats)  # --max-tokens 6 reached
        assert "(0 reused)" in stats
        term.send("and again\r")
        stats = term.expect(STATS + PROMPT)
        # The second turn's prompt starts with the first: the session reuses its cache.
        assert re.search(r"\(([1-9][\d,]*) reused\)", stats)
        term.send("/reset\r")
        term.expect(r"Conversation cleared\.\n" + PROMPT)
        term.send("/quit\r")
        assert term.proc.wait(timeout=30) == 0
        assert (tmp_path / ".dsv4_history").read_text().count("hello there") == 1
        assert (tmp_path / ".dsv4_history").stat().st_mode & 0o777 == 0o600  # issue 21: not world-readable
    finally:
        term.close()


def test_ctrl_c_stops_a_reply_and_keeps_the_chat(selftest_model, tmp_path):
    term = chat(selftest_model, tmp_path, "--max-tokens", "100000")
    try:
        term.expect(r"Ctrl-D leaves\n" + PROMPT)
        term.send("write forever\r")
        term.expect(r"thinking…")  # the reply is streaming
        term.proc.send_signal(signal.SIGINT)  # what the terminal sends on Ctrl-C
        stats = term.expect(STATS + PROMPT)
        assert "stopped by you" in stats
        term.send("/quit\r")
        assert term.proc.wait(timeout=30) == 0
    finally:
        term.close()


def test_no_input_ends_the_chat(selftest_model, tmp_path):
    """Issue 9: a byte that is not UTF-8, Ctrl-C at the prompt, a conversation that outgrows a
    256-token context, a message that cannot fit, commands with bad arguments; after each the
    chat says what happened and still answers."""
    term = chat(selftest_model, tmp_path, "--max-context", "256", "--max-tokens", "8")
    try:
        term.expect(r"Ctrl-D leaves\n" + PROMPT)
        term.send(b"\xff\r")
        out = term.expect(STATS + PROMPT)
        assert "not UTF-8; they are sent as �" in out
        # Ctrl-C clears a typed line (what follows is sent alone); on an empty line it says how
        # to leave, and the chat stays.
        term.send("typed then regretted\x03")
        term.send("kept\r")
        term.expect(STATS + PROMPT)
        term.send("\x03")
        term.expect(r"Ctrl-D or /quit leaves the chat\.\n" + PROMPT)
        # The selftest's tokenizer spends a token per byte: two of these outgrow 256 tokens.
        term.send("tell me everything " * 8 + "\r")
        term.expect(STATS + PROMPT)
        term.send("and more " * 14 + "\r")
        out = term.expect(STATS + PROMPT)
        assert re.search(r"outgrew the 256-token context: the oldest \d+ turns? (is|are) left out",
                         flat(out))
        term.send("way too long " * 30 + "\r")
        out = term.expect(r"--max-context\.\n" + PROMPT)
        assert re.search(r"This message needs [\d,]+ tokens, and the 256-token context must also "
                         r"keep 8 for the reply", flat(out))
        for line, answer in [("/save [/x]", r"Could not save \[/x\]: No such file or directory\."),
                             ("/load /nonexistent/c.json", r"Could not load /nonexistent/c\.json: "
                                                           r"No such file or directory\."),
                             ("/effort bogus", r"Unknown effort 'bogus'; this checkpoint accepts "
                                               r"low, high, max \(or default\)\."),
                             ("/system", r"System prompt cleared\.")]:
            term.send(line + "\r")
            term.expect(answer + r"\n" + PROMPT)
        term.send(f"/save {tmp_path}/all.json\r")
        term.expect(r"Saved 8 messages[\s\S]*?\.json\.\n" + PROMPT)  # all four turns, the ones
        # left out of the prompt too
        term.send("//slash\r")
        term.expect(STATS + PROMPT)
        term.send(f"/save {tmp_path}/all.json\r")
        term.expect(r"Saved 10 messages[\s\S]*?\.json\.\n" + PROMPT)
        assert "Traceback" not in term.raw
        term.send("\x04")  # Ctrl-D leaves
        assert term.proc.wait(timeout=30) == 0
        history = (tmp_path / ".dsv4_history").read_text()
        assert "+kept\n" in history and "regretted" not in history
        saved = json.loads((tmp_path / "all.json").read_text(encoding="utf-8"))["messages"]
        said = [m["content"] for m in saved if m["role"] == "user"]
        assert said[:2] == ["\ufffd", "kept"] and said[-1] == "/slash"
    finally:
        term.close()

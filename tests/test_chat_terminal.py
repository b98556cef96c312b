"""`dsv4 chat` in a real pseudo-terminal: a streamed reply, /reset, /quit, on a tiny model."""

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


class Terminal:
    def __init__(self, argv, home: Path):
        self.master, slave = pty.openpty()
        env = dict(os.environ, HOME=str(home), TERM="xterm", COLUMNS="120", LINES="40")
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     close_fds=True, start_new_session=True)
        os.close(slave)
        self.seen = ""

    def expect(self, pattern: str, timeout: float = 60.0) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            text = ANSI.sub("", self.seen)
            if re.search(pattern, text):
                self.seen = ""
                return text
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(self.master, 65536).decode("utf-8", "replace")
                except OSError:  # the child closed the terminal
                    break
                if "\x1b[6n" in data:  # answer prompt-toolkit's cursor position request
                    os.write(self.master, b"\x1b[1;1R")
                self.seen += data
        raise AssertionError(f"no {pattern!r} within {timeout} s; screen:\n{ANSI.sub('', self.seen)}")

    def send(self, text: str):
        os.write(self.master, text.encode())

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        os.close(self.master)


def test_chat_streams_a_reply_resets_and_quits(selftest_model, tmp_path):
    term = Terminal([sys.executable, "-m", "mlx_dsv4.cli", "chat", str(selftest_model),
                     "--temperature", "0", "--max-tokens", "6"], tmp_path)
    try:
        banner = term.expect(r"›\s*$")
        assert re.search(r"mlx-q4: [\d,]+ tokens of context \(fits", banner)
        term.send("hello there\r")
        stats = term.expect(r"tokens at [^›]*›\s*$")
        assert re.search(r"6 tokens at [\d.,]+ tok/s", stats)  # --max-tokens 6 reached
        assert "0 reused" in stats
        term.send("and again\r")
        stats = term.expect(r"tokens at [^›]*›\s*$")
        # The second turn's prompt starts with the first: the session reuses its cache.
        assert re.search(r"\(([1-9][\d,]*) reused\)", stats)
        term.send("/reset\r")
        term.expect(r"Conversation cleared\.")
        term.send("/quit\r")
        assert term.proc.wait(timeout=30) == 0
        assert (tmp_path / ".dsv4_history").read_text().count("hello there") == 1
    finally:
        term.close()


def test_ctrl_c_stops_a_reply_and_keeps_the_chat(selftest_model, tmp_path):
    term = Terminal([sys.executable, "-m", "mlx_dsv4.cli", "chat", str(selftest_model),
                     "--temperature", "0", "--max-tokens", "100000"], tmp_path)
    try:
        term.expect(r"›\s*$")
        term.send("write forever\r")
        term.expect(r"thinking…")  # the reply is streaming
        term.proc.send_signal(signal.SIGINT)  # what the terminal sends on Ctrl-C
        stats = term.expect(r"tokens at [^›]*›\s*$")
        assert "stopped by you" in stats
        term.send("/quit\r")
        assert term.proc.wait(timeout=30) == 0
    finally:
        term.close()

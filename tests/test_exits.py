"""Every command ends cleanly, run as a user runs it (issue 21, row 8): status 0 and no
"terminate called" on stderr.

MLX asks each thread that ran it, the main thread included, to free its streams before the
interpreter shuts down (ml-explore/mlx#4327); a thread that does not can abort the process after
a clean run (exit 134). The abort is a race, so the selftest (convert, load, chat and serve on
their threads) runs 20 times, four at a time.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from mlx_dsv4.synthetic import tiny_config, write_official_checkpoint
from test_chat_terminal import PROMPT, Terminal

DSV4 = [sys.executable, "-m", "mlx_dsv4.cli"]
RUNS, AT_ONCE = 20, 4


def assert_clean(returncode: int, stderr: str, what: str):
    assert returncode == 0 and "terminate called" not in stderr, f"{what}: exit {returncode}\n{stderr[-2000:]}"


def dsv4(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*DSV4, *args], capture_output=True, text=True, timeout=timeout)


def test_selftest_exits_0_twenty_times(tmp_path):
    pending = list(range(RUNS))
    running: list[tuple[int, subprocess.Popen, Path]] = []
    while pending or running:
        while pending and len(running) < AT_ONCE:
            i = pending.pop()
            err = tmp_path / f"selftest-{i}.err"
            with err.open("wb") as f:
                running.append((i, subprocess.Popen([*DSV4, "selftest"], stdout=subprocess.DEVNULL,
                                                    stderr=f), err))
        i, proc, err = running.pop(0)
        assert_clean(proc.wait(300), err.read_text(errors="replace"), f"selftest run {i + 1}")


def test_convert_exits_0(tmp_path):
    cfg = tiny_config(num_hidden_layers=1, compress_ratios=[0, 0])
    source = write_official_checkpoint(tmp_path / "src", cfg, shards=1, extras=False)
    r = dsv4("convert", str(source), str(tmp_path / "out"), "--recipe", "q4")
    assert_clean(r.returncode, r.stderr, "convert")
    assert "Wrote" in r.stdout


def test_bench_exits_0(selftest_model):
    r = dsv4("bench", str(selftest_model), "--prompt", "32", "--tokens", "4")
    assert_clean(r.returncode, r.stderr, "bench")
    assert "decode" in r.stdout


def test_plan_exits_0(selftest_model):
    r = dsv4("plan", str(selftest_model), "--context", "1024")
    assert_clean(r.returncode, r.stderr, "plan")


def test_chat_exits_0_on_quit(selftest_model, tmp_path):
    term = Terminal([*DSV4, "chat", str(selftest_model), "--temperature", "0", "--max-tokens", "4"],
                    tmp_path)
    try:
        term.expect(r"Ctrl-D leaves\n" + PROMPT)
        term.send("hello\r")
        term.expect(r"tokens at [\d.,]+ tok/s[^\n]*\n" + PROMPT)
        term.send("/quit\r")
        assert_clean(term.proc.wait(timeout=60), term.raw, "chat")
    finally:
        term.close()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_exits_0_when_stopped(selftest_model, tmp_path, sig):
    """Ctrl-C and SIGTERM (launchd, systemd, docker stop) both stop the server after a reply: 0."""
    log = tmp_path / "serve.err"
    with log.open("wb") as err:
        proc = subprocess.Popen([*DSV4, "serve", str(selftest_model), "--port", "0", "--max-context",
                                 "1024", "--no-prompt-cache"], stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline, url = time.monotonic() + 90, None
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            m = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", log.read_text(errors="replace"))
            url = m and m[1]
            time.sleep(0.05)
        assert url, log.read_text(errors="replace")
        r = httpx.post(url + "/v1/chat/completions", timeout=60, trust_env=False,
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert r.status_code == 200
        proc.send_signal(sig)
        assert_clean(proc.wait(60), log.read_text(errors="replace"), f"serve stopped by {sig.name}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

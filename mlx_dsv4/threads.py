"""The MLX thread exit rule, written once: every thread that ran MLX, the main thread included,
destroys its streams with `mx.clear_streams()` before it ends (ml-explore/mlx#4327).

MLX keeps per-thread state (streams, the compiled-function cache). Left to itself, a worker
thread frees it in C++ thread-exit destructors that take the GIL; when that races the
interpreter's shutdown the process aborts after a clean run ("terminate called without an active
exception", exit 134). `clear_streams` frees it while Python still runs. No MLX import here:
where MLX was never imported there is nothing to release.

Threads of this package that run MLX: the server's engine thread (`start_thread`) and the main
thread of every command, pipeline ranks included (`release_streams` at exit, registered when
`mlx_dsv4` is imported). The engine's batched job threads, the expert reader pool, the prompt
cache's writer and the grammar warm-up run no MLX.
"""

from __future__ import annotations

import atexit
import functools
import sys
import threading


def release_streams() -> None:
    """Free this thread's MLX streams and compiled functions (nothing when MLX is not loaded)."""
    mx = sys.modules.get("mlx.core")
    if mx is not None:
        mx.clear_streams()


def mlx_thread(fn):
    """`fn` for a thread of its own: it releases the thread's MLX state when it returns or raises."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            release_streams()

    return run


def start_thread(target, *args, name: str, daemon: bool = True) -> threading.Thread:
    """Start `target(*args)` on a new thread that follows the rule."""
    thread = threading.Thread(target=mlx_thread(target), args=args, name=name, daemon=daemon)
    thread.start()
    return thread


_registered = False


def release_at_exit() -> None:
    """Release the main thread's MLX state at interpreter exit, after every exit handler
    registered later (those run first, and may still use MLX: prompt-cache flushes, pipeline
    STOP messages). Called once, on import of `mlx_dsv4`."""
    global _registered
    if not _registered:
        atexit.register(release_streams)  # atexit handlers run on the main thread
        _registered = True

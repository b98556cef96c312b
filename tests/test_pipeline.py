"""Pipeline parallelism on one machine: 2 and 3 processes over the `ring` backend on 127.0.0.1
give the logits and greedy tokens of one process, and the layer split arithmetic.

Run as a script, this file is one rank of such a run (`rank_main`): the ranks get the
environment `mlx.launch` sets for the ring backend (MLX_RANK, MLX_HOSTFILE).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

PROMPT, DECODE = 150, 6  # the prompt crosses the 128-token window and an HCA window closes
RANK_TIMEOUT = 60.0


def run_rank0(model, out: Path):
    """What rank 0 (or the single process) computes: full logits of a prompt, greedy tokens
    through the generator, then the same after rewinding to a snapshot (the session's way)."""
    import mlx.core as mx

    from mlx_dsv4.generation.generate import generate_step
    from mlx_dsv4.model.cache import make_cache

    rng = np.random.default_rng(3)
    ids = rng.integers(0, model.args.vocab_size, (1, PROMPT)).tolist()[0]
    cache = make_cache(model)
    logits = model(mx.array(ids[:100])[None], cache)  # full [1, S, V] logits
    snap = [c.snapshot() for c in cache]
    tokens = [t for t, _ in generate_step(model, ids[100:], cache, max_tokens=DECODE)]
    for c, s in zip(cache, snap):
        c.restore(s)
    again = [t for t, _ in generate_step(model, ids[100:], cache, max_tokens=DECODE)]
    batch = model(mx.array([ids[:20], ids[20:40]]), last_only=True)  # batch 2, a throwaway cache
    np.savez(out, logits=np.array(logits), tokens=np.array(tokens), again=np.array(again),
             batch=np.array(batch))


def rank_main(model_dir: str, out: str, splits: str):
    import mlx.core as mx

    from mlx_dsv4.model.pipeline import init, load_pipeline, run_worker

    group = init(backend="ring")
    cuts = [int(c) for c in splits.split(",")]
    model = load_pipeline(model_dir, group, [range(a, b) for a, b in zip(cuts, cuts[1:])])
    if group.rank() == 0:
        try:
            run_rank0(model, Path(out))
        finally:
            model.close()
    else:
        run_worker(model, group)
    mx.eval(mx.zeros(1))


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def launch(model_dir: Path, out: Path, splits: list[int], tmp: Path) -> None:
    """Start one process per rank with the ring backend's environment; fail with their stderr."""
    n = len(splits) - 1
    hostfile = tmp / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(n)]))
    procs = []
    for rank in range(n):
        env = dict(os.environ, MLX_RANK=str(rank), MLX_HOSTFILE=str(hostfile))
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
        log = open(tmp / f"rank{rank}.log", "w+")
        procs.append((subprocess.Popen(
            [sys.executable, __file__, str(model_dir), str(out), ",".join(map(str, splits))],
            env=env, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + RANK_TIMEOUT
    failed = []
    for rank, (p, log) in enumerate(procs):
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if p.returncode != 0:
            failed.append(rank)
    if failed:
        report = []
        for rank, (p, log) in enumerate(procs):
            log.seek(0)
            report.append(f"--- rank {rank} (exit {p.returncode}) ---\n{log.read()[-4000:]}")
        pytest.fail(f"rank(s) {failed} failed or timed out:\n" + "\n".join(report))
    for _, log in procs:
        log.close()


if __name__ == "__main__":
    rank_main(*sys.argv[1:4])

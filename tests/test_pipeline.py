"""Pipeline parallelism on one machine: 2 and 3 processes over the `ring` backend on 127.0.0.1
give the logits and greedy tokens of one process; `dsv4 serve` as 2 ranks answers as one process;
the layer split arithmetic and the per-rank plans.

Run as a script, this file is one rank of such a run (`rank_main`): the ranks get the
environment `mlx.launch` sets for the ring backend (MLX_RANK, MLX_HOSTFILE).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mlx_dsv4.launch import free_ports, loopback_hostfile

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
    steps = list(generate_step(model, ids[100:], cache, max_tokens=DECODE))
    for c, s in zip(cache, snap):
        c.restore(s)
    again = [t for t, _ in generate_step(model, ids[100:], cache, max_tokens=DECODE)]
    batch = model(mx.array([ids[:20], ids[20:40]]), last_only=True)  # batch 2, a throwaway cache
    # One-token steps ran compiled: Model's whole-trunk graph, or each rank's stage graph.
    step = model.stage._step if hasattr(model, "stage") else model._decode_step
    np.savez(out, logits=np.array(logits), tokens=np.array([t for t, _ in steps]),
             decode=np.stack([np.array(lp) for _, lp in steps]), again=np.array(again),
             batch=np.array(batch), compiled=np.array(step is not None and len(step.steps) > 0))


def rank_main(model_dir: str, out: str, splits: str):
    import mlx.core as mx

    from mlx_dsv4.model.pipeline import init, run_worker
    from mlx_dsv4.model.weights import load_pipeline

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


def launch(model_dir: Path, out: Path, splits: list[int], tmp: Path) -> None:
    """Start one process per rank with the ring backend's environment; fail with their stderr."""
    n = len(splits) - 1
    hostfile = loopback_hostfile(tmp / "hosts.json", n)
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


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_cfg, tiny_model):
    from mlx.utils import tree_flatten

    from test_weights import write_dir

    return write_dir(tmp_path_factory.mktemp("pipe") / "m", tiny_cfg,
                     dict(tree_flatten(tiny_model.parameters())), shards=3)


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    from mlx_dsv4.model.weights import load_model

    model = load_model(model_dir)
    out = tmp_path_factory.mktemp("ref") / "ref.npz"
    run_rank0(model, out)
    return dict(np.load(out))


@pytest.mark.parametrize("splits", [[0, 2, 4], [0, 1, 3, 4]], ids=["2-ranks", "3-ranks"])
def test_ranks_match_one_process(model_dir, reference, splits, tmp_path):
    launch(model_dir, tmp_path / "out.npz", splits, tmp_path)
    got = np.load(tmp_path / "out.npz")
    assert got["compiled"] and reference["compiled"]
    for name in ("logits", "batch", "decode"):  # the same ops in the same order: bit for bit
        np.testing.assert_array_equal(got[name], reference[name], err_msg=name)
    np.testing.assert_array_equal(got["tokens"], reference["tokens"])
    # Rewinding rank 0 to a snapshot replays the kept ids into the other ranks' pools.
    np.testing.assert_array_equal(got["again"], reference["tokens"])
    assert reference["logits"].shape == (1, 100, 256) and len(reference["tokens"]) == DECODE


def test_rank_loads_only_its_layers(model_dir):
    from mlx.utils import tree_flatten

    from mlx_dsv4.model.pipeline import Stage
    from mlx_dsv4.model.weights import ModelArgs, load_part

    args = ModelArgs.from_file(model_dir)
    middle = load_part(model_dir, Stage(args, range(1, 3), first=False), lambda n: Stage(
        args, range(1, 3), False).owns(n))
    names = {k.split(".")[0] + ("." + k.split(".")[1] if k.startswith("layers.") else "")
             for k, _ in tree_flatten(middle.parameters())}
    assert names == {"layers.1", "layers.2"}
    first = Stage(args, range(0, 1), first=True)
    assert first.owns("embed.weight") and first.owns("hc_head_fn") and first.owns("layers.0.attn.wkv.weight")
    assert not first.owns("layers.1.attn.wkv.weight") and not first.owns("mtp.0.e_proj.weight")


class _NoGroup:
    def size(self):
        return 2


def test_refusals_name_what_is_off(model_dir):
    import mlx.core as mx

    from mlx_dsv4.model.cache import make_cache
    from mlx_dsv4.model.pipeline import PipelineError, PipelineModel, Stage
    from mlx_dsv4.model.weights import ModelArgs, load_part

    args = ModelArgs.from_file(model_dir)
    stage = load_part(model_dir, Stage(args, range(0, 2), first=True),
                      Stage(args, range(0, 2), True).owns)
    model = PipelineModel(stage, args, _NoGroup(), [range(0, 2), range(2, 4)])
    assert model.args.num_hidden_layers == 2 and model.full_args.num_hidden_layers == 4
    cache = make_cache(model)
    assert len(cache) == 2 and model.mtp == []  # rank 0's pools only; no MTP drafting
    ids = mx.array([[1, 2]])
    with pytest.raises(PipelineError, match="does not run the MTP block"):
        model(ids, cache, return_streams=True)
    for c in cache:
        c.offset = 5  # as if restored from a prompt cache
    with pytest.raises(PipelineError, match=r"never saw .*\(--no-prompt-cache\)"):
        model(ids, cache)


def test_ctrl_c_waits_for_the_ring_pass_to_end():
    import signal

    from mlx_dsv4.model.pipeline import whole_pass

    done = []
    # Python's own handler, whatever an earlier test in this process left installed.
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with whole_pass():
                signal.raise_signal(signal.SIGINT)
                done.append("the rest of the pass")
        assert done == ["the rest of the pass"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


def test_split_follows_memory():
    from mlx_dsv4.plan import PlanError, split_layers

    assert split_layers([10] * 8, [1, 1]) == [range(0, 4), range(4, 8)]
    assert split_layers([10] * 8, [3, 1]) == [range(0, 6), range(6, 8)]
    # Host 0 also holds the embedding and head: it gets fewer layers for them.
    assert split_layers([10] * 8, [1, 1], first_extra=20) == [range(0, 3), range(3, 8)]
    assert split_layers([10] * 6, [1, 1, 1]) == [range(0, 2), range(2, 4), range(4, 6)]
    # Every host gets a layer even when its share is tiny.
    assert split_layers([10] * 4, [100, 1, 1]) == [range(0, 2), range(2, 3), range(3, 4)]
    with pytest.raises(PlanError, match="3 host.* for 2 layer"):
        split_layers([10, 10], [1, 1, 1])


def test_plan_pipeline_for_pro():
    from mlx_dsv4.plan import GiB, parse_hosts, plan_pipeline

    two = plan_pipeline("pro", parse_hosts("512GB,512GB"), context=1 << 20)
    assert two.fits and two.largest_context == 1 << 20
    assert [s.layers for s in two.stages] == [range(0, 30), range(30, 61)]
    assert sum(s.weight_bytes for s in two.stages) > 700 * GiB
    assert two.hop_bytes_per_token == 4 * 7168 * 2
    small = plan_pipeline("pro", parse_hosts("256GB,256GB"), context=1 << 20)
    assert not small.fits and small.largest_context == 0
    assert "does not fit on 2 host(s)" in small.verdict() and "no context fits" in small.verdict()


def test_each_rank_plans_its_share(model_dir):
    from mlx_dsv4.plan import PlanError, layer_weight_bytes, pipeline_split, plan_rank

    per_layer, extra = layer_weight_bytes(model_dir)
    budgets = [1 << 30, 1 << 30]
    split = pipeline_split(model_dir, budgets)
    plans = [plan_rank(model_dir, budgets, r, 4096)[0] for r in range(2)]
    assert [p.weight_bytes for p in plans] == [
        extra + sum(per_layer[i] for i in split[0]), sum(per_layer[i] for i in split[1])]
    assert all(p.fits and p.context == 4096 for p in plans)
    assert plans[1].budget_source.startswith(f"rank 1 of 2: layers {split[1].start}-")
    # A rank too small for its share refuses the whole job, naming it.
    with pytest.raises(PlanError, match=r"does not fit on 2 host\(s\): rank 1 \(layers"):
        plan_rank(model_dir, [1 << 30, plans[1].weight_bytes // 2], 0, 4096)


def test_dsv4_plan_with_hosts():
    from typer.testing import CliRunner

    from mlx_dsv4.cli import app

    ok = CliRunner().invoke(app, ["plan", "pro", "--hosts", "512GB,512GB"], env={"COLUMNS": "150"})
    assert ok.exit_code == 0, ok.output
    assert "0-29 + embed/head" in ok.output and "30-60" in ok.output
    assert "fits on 2 host(s)" in ok.output and "57,344 bytes" in ok.output
    small = CliRunner().invoke(app, ["plan", "pro", "--hosts", "256GB,256GB"], env={"COLUMNS": "150"})
    assert small.exit_code == 2 and "does not fit on 2 host(s)" in small.output


def test_hosts_from_hostfile(tmp_path):
    from mlx_dsv4.plan import GiB, PlanError, parse_hosts

    f = tmp_path / "hosts.json"
    f.write_text(json.dumps([{"ssh": "m1", "ips": ["10.0.0.1"], "memory": "512GB"},
                             {"ssh": "m2", "ips": ["10.0.0.2"], "memory": "256GB"}]))
    assert parse_hosts(hostfile=f) == [("m1", 512 * GiB), ("m2", 256 * GiB)]
    f.write_text(json.dumps([{"ssh": "m1", "ips": ["10.0.0.1"]}]))
    with pytest.raises(PlanError, match=r"host 0 \(m1\) has no \"memory\" field"):
        parse_hosts(hostfile=f)
    with pytest.raises(PlanError, match="not a size"):
        parse_hosts("512GB,lots")


def _post(port: int, body: dict, timeout: float = 30.0) -> dict:
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                 json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _wait_up(port: int, procs, deadline: float):
    import urllib.request

    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            return False
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1).read()
            return True
        except OSError:
            time.sleep(0.2)  # polling a server that is starting, bounded by the deadline
    return False


def test_dsv4_serve_under_launch_matches_one_process(selftest_model, tmp_path):
    """`dsv4 serve` started as 2 ranks answers as one process does, and both ranks exit 0 when
    rank 0 is interrupted."""
    import signal

    web, web1 = free_ports(2)
    hostfile = loopback_hostfile(tmp_path / "hosts.json", 2)
    base = [sys.executable, "-m", "mlx_dsv4.cli", "serve", str(selftest_model), "--exact-sampling",
            "--max-context", "2048"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    logs = [open(tmp_path / f"{n}.log", "w+") for n in ("rank0", "rank1", "single")]
    runs = [(["--port", str(web)], dict(env, MLX_RANK="0", MLX_HOSTFILE=str(hostfile))),
            (["--port", str(web)], dict(env, MLX_RANK="1", MLX_HOSTFILE=str(hostfile))),
            (["--port", str(web1), "--no-mtp", "--no-prompt-cache", "--max-batch", "1"], env)]
    procs = [subprocess.Popen(base + argv, env=e, stdout=log, stderr=subprocess.STDOUT)
             for (argv, e), log in zip(runs, logs)]

    def report():
        out = []
        for name, log, p in zip(("rank 0", "rank 1", "single"), logs, procs):
            log.seek(0)
            out.append(f"--- {name} (exit {p.poll()}) ---\n{log.read()[-3000:]}")
        return "\n".join(out)

    try:
        deadline = time.monotonic() + RANK_TIMEOUT
        assert _wait_up(web, procs, deadline) and _wait_up(web1, procs, deadline), report()
        turns = [[{"role": "user", "content": "hi"}],
                 [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
                  {"role": "user", "content": "more"}],
                 [{"role": "user", "content": "hi"}]]  # rewinds to the first prompt's snapshot
        for messages in turns:
            body = {"messages": messages, "max_tokens": 12, "temperature": 0}
            a, b = _post(web, body), _post(web1, body)
            assert a["choices"][0]["message"] == b["choices"][0]["message"], report()
            assert a["usage"] == b["usage"]
        procs[0].send_signal(signal.SIGINT)
        procs[2].send_signal(signal.SIGINT)
        for p in procs[:2]:  # rank 1 stops when rank 0 tells it to
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        assert procs[1].returncode == 0, report()
        assert procs[0].returncode == 0, report()
        logs[1].seek(0)
        assert "rank 1: layers" in logs[1].read()
        assert "terminate called" not in report()  # issue 21: MLX's streams freed before exit
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()


def test_dsv4_chat_under_launch_survives_ctrl_c(selftest_model, tmp_path, monkeypatch):
    """Ctrl-C stops a pipelined reply and the chat goes on with its prefix reused (the chat's own
    SIGINT handler and the pipeline's whole-pass guard nest), and both ranks exit 0 on /quit."""
    import signal

    import test_chat_terminal as tc

    hostfile = loopback_hostfile(tmp_path / "hosts.json", 2)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]), MLX_HOSTFILE=str(hostfile))
    log = open(tmp_path / "rank1.log", "w+")
    rank1 = subprocess.Popen([sys.executable, "-m", "mlx_dsv4.cli", "chat", str(selftest_model)],
                             env=dict(env, MLX_RANK="1"), stdout=log, stderr=subprocess.STDOUT)
    monkeypatch.setenv("MLX_RANK", "0")
    monkeypatch.setenv("MLX_HOSTFILE", str(hostfile))
    term = tc.chat(selftest_model, tmp_path, "--max-tokens", "100000")
    try:
        term.expect(r"Ctrl-D leaves\n" + tc.PROMPT)
        for turn in range(2):
            term.send("write forever\r")
            term.expect(r"thinking…")
            term.proc.send_signal(signal.SIGINT)
            stats = term.expect(tc.STATS + tc.PROMPT)
            assert "stopped by you" in stats
        assert re.search(r"\(([1-9][\d,]*) reused\)", stats)  # the second turn reused the first
        term.send("/quit\r")
        assert term.proc.wait(timeout=30) == 0
        assert rank1.wait(timeout=30) == 0
        log.seek(0)
        assert "terminate called" not in log.read() + term.raw
    finally:
        term.close()
        if rank1.poll() is None:
            rank1.kill()
            rank1.wait()
        log.seek(0)
        print(log.read()[-3000:])  # shown by pytest when the test fails
        log.close()


if __name__ == "__main__":
    rank_main(*sys.argv[1:4])

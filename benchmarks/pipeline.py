"""Pipeline overhead on localhost: decode step time at 1, 2 and 3 ranks on one small model.

Writes a random q4 model (synthetic.tiny_config with `--hidden`, `--layers`, quantized as `dsv4
convert` does; on the CPU its scales, and so the streams between ranks, are fp32; on a Mac bf16),
then times `--steps` greedy one-token steps after a `--prompt`-token prefill and `--warmup` steps:
in a process with the ordinary `Model` (k = 1), and as k ranks of a ring over 127.0.0.1 with
the environment `mlx.launch` sets (k = 2, 3; an even share of the layers each). Every k runs the
same loop (model call, argmax, eval; median step, best of `--repeats` interleaved runs), so the
difference is the pipeline: a k-rank token makes k hops (rank 0 -> 1 -> ... -> k-1 -> 0). Reported: ms per token,
overhead per added rank (t_k - t_1) / (k - 1) as issue 15 asks, per hop (t_k - t_1) / k, the
bytes rank 0 sends per token (header + ids + streams; every hop carries as many), and the
transport alone: a ring ping-pong of one hop's messages, no model.

    python benchmarks/pipeline.py                       # CPU, under a minute
    python benchmarks/pipeline.py --hidden 4096         # Flash's hop size
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).parent))

from mlx_dsv4.launch import loopback_hostfile  # noqa: E402


def write_model(path: Path, a) -> None:
    """A q4 checkpoint as `dsv4 convert` lays it out (flash_layers.build), random weights."""
    from mlx.utils import tree_flatten

    from flash_layers import build
    from mlx_dsv4.synthetic import tiny_config

    ratios = ([0, 4, 128] * a.layers)[: a.layers] + [0]
    config = tiny_config(hidden_size=a.hidden, num_hidden_layers=a.layers, compress_ratios=ratios)
    # The CPU's quantized matmuls want fp32 scales, which makes the activations fp32 there.
    on_cpu = mx.default_device() == mx.cpu
    model, quant = build(config, scale_dtype=mx.float32 if on_cpu else mx.bfloat16)
    params = dict(tree_flatten(model.parameters()))
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model-00001-of-00001.safetensors"), params, metadata={"format": "mlx"})
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: "model-00001-of-00001.safetensors" for n in params}}))
    (path / "config.json").write_text(json.dumps(dict(config, quantization=quant)))


def time_decode(model, a) -> dict:
    """ms per one-token step, same loop for Model and PipelineModel."""
    from mlx_dsv4.model.cache import make_cache

    cache = make_cache(model)
    prompt = mx.random.randint(2, model.args.vocab_size, (1, a.prompt), key=mx.random.key(1))
    y = mx.argmax(model(prompt, cache, last_only=True)[:, -1], axis=-1)
    mx.eval(y)
    for _ in range(a.warmup):
        y = mx.argmax(model(y[None], cache, last_only=True)[:, -1], axis=-1)
        mx.eval(y)
    sent, times = getattr(model, "bytes_sent", 0), []
    for _ in range(a.steps):
        t = time.perf_counter()
        y = mx.argmax(model(y[None], cache, last_only=True)[:, -1], axis=-1)
        mx.eval(y)
        times.append(time.perf_counter() - t)
    # The median step: other jobs on a shared CPU come in bursts that a mean would carry.
    return {"ms": statistics.median(times) * 1000,
            "bytes_per_token": (getattr(model, "bytes_sent", 0) - sent) / a.steps}


def ping(group, hop_bytes: int, a) -> dict:
    """The transport alone: rank 0 sends one hop's messages (header, ids, streams) to rank 1,
    which sends the streams back; half the round trip is one hop."""
    from mlx_dsv4.model.pipeline import _recv, _send

    header, ids = mx.zeros((8,), mx.int32), mx.zeros((1, 1), mx.int32)
    X = mx.zeros((hop_bytes - 36) // 4, mx.float32)
    mx.eval(header, ids, X)
    times = []
    for i in range(a.warmup + a.steps):
        t = time.perf_counter()
        if group.rank() == 0:
            for m in (header, ids, X):
                _send(m, 1, group)
            _recv(X.shape, X.dtype, 1, group)
        else:
            for m in (header, ids, X):
                _recv(m.shape, m.dtype, 0, group)
            _send(X, 0, group)
        times.append(time.perf_counter() - t)
    return {"ms": statistics.median(times[a.warmup:]) * 1000 / 2}


def rank_main(path: str, splits: str, out: str, a) -> None:
    from mlx_dsv4.model.pipeline import init, run_worker
    from mlx_dsv4.model.weights import load_pipeline

    if len(splits.split(",")) == 2:  # one rank: the ordinary model, in a process of its own too
        from mlx_dsv4.model.weights import load_model

        Path(out).write_text(json.dumps(time_decode(load_model(path), a)))
        return
    group = init(backend="ring")
    if a.ping:
        result = ping(group, a.ping, a)
        if group.rank() == 0:
            Path(out).write_text(json.dumps(result))
        return
    cuts = [int(c) for c in splits.split(",")]
    model = load_pipeline(path, group, [range(x, y) for x, y in zip(cuts, cuts[1:])])
    if group.rank() == 0:
        try:
            Path(out).write_text(json.dumps(time_decode(model, a)))
        finally:
            model.close()
    else:
        run_worker(model, group)


def launch(path: Path, k: int, layers: int, a, work: Path) -> dict:
    cuts = [round(i * layers / k) for i in range(k + 1)]
    hostfile, out = loopback_hostfile(work / f"hosts{k}.json", k), work / f"out{k}.json"
    argv = [sys.executable, __file__, "--prompt", str(a.prompt), "--warmup", str(a.warmup),
            "--steps", str(a.steps), "--ping", str(a.ping),
            "--rank-of", str(path), ",".join(map(str, cuts)), str(out)]
    ring = (lambda r: {"MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)}) if k > 1 else (lambda r: {})
    procs = [subprocess.Popen(argv, env=dict(os.environ, **ring(r)), stderr=subprocess.PIPE, text=True)
             for r in range(k)]
    for r, p in enumerate(procs):
        try:
            _, err = p.communicate(timeout=a.timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"rank {r} of {k} failed (exit {p.returncode}):\n{err[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--ranks", default="1,2,3")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--ping", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--rank-of", nargs=3, metavar=("DIR", "SPLITS", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.rank_of:
        return rank_main(*a.rank_of, a)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        write_model(path, a)
        results = {}
        for _ in range(a.repeats):  # interleaved, best of each: the CPU is shared and noisy
            for k in map(int, a.ranks.split(",")):
                r = launch(path, k, a.layers, a, Path(tmp))
                if k not in results or r["ms"] < results[k]["ms"]:
                    results[k] = r
        hop = next((r["bytes_per_token"] for k, r in results.items() if k > 1), 0)
        if hop:
            a.ping = int(hop)
            transport = launch(path, 2, a.layers, a, Path(tmp))["ms"]
    t1 = results.get(1, {}).get("ms")
    print(f"hidden {a.hidden}, {a.layers} layers, hc_mult 4, q4; prompt {a.prompt}, {a.steps} steps, "
          f"best of {a.repeats} "
          f"({mx.default_device()})")
    print(f"{'ranks':>5} {'ms/token':>9} {'per added rank':>15} {'per hop':>8} {'bytes/token/hop':>16}")
    for k, r in results.items():
        extra = (f"{(r['ms'] - t1) / (k - 1):>13.2f}ms {(r['ms'] - t1) / k:>6.2f}ms"
                 if k > 1 and t1 else f"{'':>15} {'':>8}")
        print(f"{k:>5} {r['ms']:>9.2f} {extra} {r['bytes_per_token']:>16,.0f}")
    if hop:
        print(f"transport alone (ring ping-pong of one hop's {int(hop):,} bytes): {transport:.3f} ms per hop")
    print("A waiting rank spins in recv (a core each): on a shared CPU the k > 1 rows include that "
          "contention; on separate Macs it costs only power.")


if __name__ == "__main__":
    main()

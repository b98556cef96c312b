"""What one decode step costs per layer: graph nodes, kernels, host time and step time.

The yardstick of the fast-decode work. For one CSA layer (Flash layer 4) and one HCA layer
(Flash layer 5) at Flash's shapes, in the q4 layout (`flash_layers.build`, fewer routed experts
with `--experts`), at each `--contexts` length (pools filled directly, as decode_context.py does),
the eager step and the compiled step (`decode.py`) are measured side by side, alternating, in
one run:

  nodes    primitives in the step's graph (`mx.export_to_dot` of the logits and every state
           array the step writes), the embedding/head part (a 0-layer pass) subtracted
  kernels  the nodes that launch work: all but views (Reshape, Broadcast, Slice, Transpose,
           Squeeze, ExpandDims, AsStrided, StopGradient, Depends); a compiled graph's fused
           elementwise chains are one `Compiled...` node, so this counts them once
  host ms  CPU time of the Python thread building (eager) or replaying (compiled) the step,
           before evaluation (thread time, so other load on the machine does not inflate it)
  step ms  build + evaluate, wall-clock median of `--steps` after `--warmup`, less the same for
           a 0-layer pass (embedding, HyperHead, LM head)
  cpu ms   the same step in CPU time of the whole process (all MLX threads): the work done,
           which, unlike wall time, a busy machine does not stretch

A step that closes a compressor window has a few more nodes; the counts are from a step that
does not (p % 4 != 3), the times are medians over all steps.

    python benchmarks/decode_ops.py --experts 16 --contexts 1024 8192 65536 --scale-dtype float32
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from decode_context import fill  # noqa: E402
from flash_layers import build, sliced_config  # noqa: E402

from mlx_dsv4.model.cache import make_cache  # noqa: E402
from mlx_dsv4.config import ModelArgs  # noqa: E402

VIEWS = {"Reshape", "Broadcast", "Slice", "Transpose", "Squeeze", "ExpandDims", "AsStrided",
         "StopGradient", "Depends", "Unflatten", "Flatten"}


def count(outputs) -> tuple[int, int]:
    """(nodes, kernels) of the graph that computes `outputs`."""
    with tempfile.NamedTemporaryFile("r", suffix=".dot") as f:
        mx.export_to_dot(f.name, *outputs)
        labels = re.findall(r'label ="([^"]+)"', f.read())
    return len(labels), sum(1 for x in labels if x not in VIEWS)


def step_outputs(model, cache, tok):
    logits = model(tok, cache, last_only=True)
    return [logits] + [a for c in cache for a in c.state]


def timed(build_outputs) -> tuple[float, float, float]:
    """(host thread seconds, wall seconds, process CPU seconds) of one step."""
    c0, t0, h0 = time.process_time(), time.perf_counter(), time.thread_time()
    o = build_outputs()
    h1 = time.thread_time()
    mx.eval(o)
    return h1 - h0, time.perf_counter() - t0, time.process_time() - c0


def time_step(build_outputs, steps: int, warmup: int) -> tuple[float, float, float]:
    runs = [timed(build_outputs) for _ in range(warmup + steps)][warmup:]
    return tuple(1e3 * statistics.median(r[i] for r in runs) for i in range(3))


def measure(model, args, T: int, steps: int, warmup: int) -> dict:
    caches = {}
    for mode in ("eager", "compiled"):
        caches[mode] = make_cache(model, max_tokens=T + 4 * (steps + warmup) + 8)
        fill(caches[mode], args, T)
    tok = mx.array([[7]])
    out = {m: {"host": [], "step": [], "cpu": []} for m in caches}
    for i in range(warmup + steps):
        for mode, cache in caches.items():  # alternate: both see the same machine load
            model.compiled_decode = mode == "compiled"
            if i == warmup - 1:
                # Counted on a step that closes no window (p % 4 != 3 here, see the docstring).
                while cache[0].offset % 4 == 3:
                    mx.eval(step_outputs(model, cache, tok))
                out[mode]["nodes"], out[mode]["kernels"] = count(step_outputs(model, cache, tok))
            host, wall, cpu = timed(lambda: step_outputs(model, cache, tok))
            if i >= warmup:
                out[mode]["host"].append(host)
                out[mode]["step"].append(wall)
                out[mode]["cpu"].append(cpu)
    res = {}
    for mode, r in out.items():
        res[mode] = {"nodes": r["nodes"], "kernels": r["kernels"],
                     "host_ms": 1e3 * statistics.median(r["host"]),
                     "step_ms": 1e3 * statistics.median(r["step"]),
                     "cpu_ms": 1e3 * statistics.median(r["cpu"])}
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=16, help="routed experts (Flash: 256)")
    ap.add_argument("--contexts", type=int, nargs="*", default=[1024, 8192, 65536])
    ap.add_argument("--vocab", type=int, default=4096, help="vocabulary (Flash: 129280)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=9)
    ap.add_argument("--scale-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                    help="float32 on a CPU, whose bf16 kernels are ~7x slower")
    ap.add_argument("--out", default=os.path.join(os.environ["OUT"], "decode_ops.json")
                    if os.environ.get("OUT") else None)
    a = ap.parse_args()
    dt = getattr(mx, a.scale_dtype)
    print(f"device {mx.default_device()}  mlx {mx.__version__}  experts {a.experts}  "
          f"scales {a.scale_dtype}", flush=True)
    results = []
    head = {}
    print(f"{'layer':>5} {'context':>8} {'mode':>9} {'nodes':>6} {'kernels':>8} {'host ms':>8} "
          f"{'step ms':>8} {'cpu ms':>8}", flush=True)
    for kind, start in (("csa", 4), ("hca", 5)):
        cfg = sliced_config(1, start, a.experts)
        # A small vocabulary: the LM head is not part of a layer, and on a CPU its 129K-row
        # 8-bit matmul would dwarf (and add noise to) the layer being measured.
        cfg["vocab_size"] = a.vocab
        model, _ = build(cfg, scale_dtype=dt)
        args = ModelArgs.from_dict(cfg)
        assert args.layer_kinds[0] == kind, args.layer_kinds
        if not head:  # embedding, HyperHead and LM head: the same for both layer kinds
            layers, model.layers = model.layers, []
            tok = mx.array([[7]])
            head["nodes"] = count([model(tok, [], last_only=True)])
            head["host"], head["step"], head["cpu"] = time_step(
                lambda: [model(tok, [], last_only=True)], a.steps, a.warmup)
            model.layers = layers
            print(f"{'head':>5} {'':>8} {'eager':>9} {head['nodes'][0]:>6} {head['nodes'][1]:>8} "
                  f"{head['host']:>8.3f} {head['step']:>8.2f} {head['cpu']:>8.2f}  (subtracted)",
                  flush=True)
        for T in a.contexts:
            r = measure(model, args, T, a.steps, a.warmup)
            for mode, m in r.items():
                m["nodes"] -= head["nodes"][0]
                m["kernels"] -= head["nodes"][1]
                for k in ("host", "step", "cpu"):
                    m[f"{k}_ms"] -= head[k]
                print(f"{kind:>5} {T:>8,} {mode:>9} {m['nodes']:>6} {m['kernels']:>8} "
                      f"{m['host_ms']:>8.3f} {m['step_ms']:>8.2f} {m['cpu_ms']:>8.2f}", flush=True)
            c, e = r["compiled"], r["eager"]
            print(f"{'':>5} {'':>8} {'ratio':>9} {c['nodes'] / e['nodes']:>6.2f} "
                  f"{c['kernels'] / e['kernels']:>8.2f} {c['host_ms'] / e['host_ms']:>8.3f} "
                  f"{c['step_ms'] / e['step_ms']:>8.3f} {c['cpu_ms'] / e['cpu_ms']:>8.3f}", flush=True)
            results.append({"layer": kind, "context": T, **r})
            mx.clear_cache()
        del model
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "head": head, "results": results},
                                          indent=1))


if __name__ == "__main__":
    main()

"""What speculative decoding can gain: the cost of verifying k drafts against one plain step.

On Flash-shaped layers (`flash_layers.build`, q4 layout, `--layers` trunk layers from layer 4,
`--experts` routed experts) with the pools filled to `--context` tokens, it times a trunk forward
of S = 1..5 tokens (S = k+1 verifies k drafts; a k+1-token MoE step reads up to (k+1)*6
experts, so on a memory-bound GPU it costs far less than k+1 steps, on a CPU nearly k+1 times
as much), each as the median wall time and the median CPU time of the process over `--steps`
runs, alternating. From the ratios r(S) = c(S) / c(1) it prints, for each
k, the expected speed-up over plain decoding at acceptances 50/80/90% and the break-even
acceptance, for the rollback speculative.py does: a round costs c(k+1), plus c(j+2) to refeed
when a draft is refused after j kept ones, and commits j+2 tokens (k+1 if all are kept); each
round also runs the MTP block about k times, charged as one more layer of a
`--model-layers`-layer trunk (Flash: 43; the block is one decoder layer plus two projections).

A CPU is compute-bound, so there r(S) is about S and drafting never pays. A GPU at batch 1 is
bound by reading weights, so the script also prints the same table for the bytes an S-token
step of a Flash layer reads: the layer's non-expert bytes plus its routed experts' bytes times
the expected number of distinct experts S tokens pick (E * (1 - (1 - k/E)^S), E = 256, k = 6),
from the built layer's own byte counts scaled to 256 experts. That table is what the default
draft size (speculative.DEFAULT_DRAFT) is chosen from until an accelerator measures it.

    python benchmarks/spec_cost.py --experts 16 --scale-dtype float32     # CPU, ~2 min
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_context import fill  # noqa: E402
from flash_layers import build, layer_read_bytes, sliced_config  # noqa: E402

from mlx_dsv4.model.cache import make_cache  # noqa: E402
from mlx_dsv4.config import ModelArgs  # noqa: E402


def expected(r: dict[int, float], k: int, a: float, mtp: float) -> float:
    """Speed-up over plain decoding at acceptance a (r: cost ratios, mtp: MTP call / step)."""
    tokens = sum(a**j * (1 - a) * (j + 2) for j in range(k)) + a**k * (k + 1)
    cost = r[k + 1] + sum(a**j * (1 - a) * r[j + 2] for j in range(k)) + k * mtp
    return tokens / cost


def break_even(r, k, mtp) -> float | None:
    lo, hi = 0.0, 1.0
    if expected(r, k, hi, mtp) < 1:
        return None
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected(r, k, mid, mtp) < 1 else (lo, mid)
    return hi


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=16, help="routed experts (Flash: 256)")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--model-layers", type=int, default=43, help="trunk layers of the model the "
                    "MTP cost is scaled to (Flash: 43)")
    ap.add_argument("--scale-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    a = ap.parse_args()
    cfg = sliced_config(a.layers, 4, a.experts)
    cfg["vocab_size"] = 4096  # the LM head is the same for every S; keep it from dominating
    model, _ = build(cfg, scale_dtype=getattr(mx, a.scale_dtype))
    args = ModelArgs.from_dict(cfg)
    print(f"device {mx.default_device()}  {a.layers} layers  {a.experts} experts  context "
          f"{a.context:,}", flush=True)
    sizes = [1, 2, 3, 4, 5]
    wall = {s: [] for s in sizes}
    cpu = {s: [] for s in wall}
    base = make_cache(model, max_tokens=a.context + 64)
    fill(base, args, a.context)
    snap = [c.snapshot() for c in base]
    for i in range(a.steps + 1):
        for s in wall:
            for c, sn in zip(base, snap):
                c.restore(sn)
            ids = mx.random.randint(2, args.vocab_size, (1, s))
            mx.eval(ids)
            t, p = time.perf_counter(), time.process_time()
            mx.eval(model(ids, base, last_only=False), [c.state for c in base])
            if i:  # the first round compiles
                wall[s].append(time.perf_counter() - t)
                cpu[s].append(time.process_time() - p)
    med = {k: statistics.median(v) for k, v in wall.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"{'tokens':>7} {'wall ms':>8} {'x 1-token':>10} {'cpu ms':>8} {'x 1-token':>10}")
    for s in sizes:
        print(f"{s:>7} {1e3 * med[s]:>8.1f} {med[s] / med[1]:>10.2f} {1e3 * cmed[s]:>8.1f} "
              f"{cmed[s] / cmed[1]:>10.2f}")
    mtp = 1 / a.model_layers  # one decoder layer of a model_layers-layer step
    table({s: cmed[s] / cmed[1] for s in sizes}, mtp, "measured CPU-time ratios")
    # Bytes a Flash layer reads for S tokens, from this layer's counts scaled to 256 experts.
    parts = layer_read_bytes(model.layers[0], args)
    k, E = args.num_experts_per_tok, 256
    per_expert = parts["routed_experts"] / k
    rest = parts["total"] - parts["routed_experts"]
    read = {S: rest + per_expert * E * (1 - (1 - k / E) ** S) for S in sizes}
    print(f"\nbytes a Flash CSA layer reads: " + ", ".join(
        f"S={S} {read[S] / 1e6:.0f} MB" for S in sizes))
    table({S: read[S] / read[1] for S in sizes}, mtp, "memory-bound estimate, Flash")


def table(r: dict[int, float], mtp: float, title: str):
    print(f"\n{'k':>3} {'x at 50%':>9} {'x at 80%':>9} {'x at 90%':>9} {'break-even':>11}  ({title})")
    for k in range(1, 5):
        be = break_even(r, k, mtp)
        print(f"{k:>3} " + " ".join(f"{expected(r, k, acc, mtp):>9.2f}" for acc in (0.5, 0.8, 0.9))
              + f" {('none' if be is None else f'{be:.0%}'):>11}")


if __name__ == "__main__":
    main()

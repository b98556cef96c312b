"""Aggregate decode speed of continuous batching at real DeepSeek-V4-Flash shapes, random weights.

The model is `benchmarks/flash_layers.py`'s (Flash's config sliced to `--layers` trunk layers,
q4 layout, random weights; `--experts` shrinks the routed experts and `--scale-dtype float32`
makes a CPU run ~7x faster, as that file explains). For each batch size in `--batch`, a
`generation.batch.Batcher` gets that many requests with different random `--prompt`-token
prompts; once every prompt is in, `--warmup` scheduler steps run untimed, then `--steps` are
timed. Each step is the real one (one batched forward, per-request sampling and chunk making);
EOS is switched off so no request ends early. Reported: ms per step and aggregate tokens/s
(batch x steps / time), and the speedup over batch 1.

Also timed at batch 1: `batch_decode.BatchStep` alone against the model's whole-trunk compiled
step (`decode.DecodeStep`, what a lone request uses), to show what the split costs.

    python benchmarks/batch.py                          # GPU: 4 layers, 256 experts
    python benchmarks/batch.py --layers 2 --experts 8 --scale-dtype float32 --steps 5 --warmup 2
        --prompt 64                                     # CPU, a few minutes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flash_layers import build, log, sliced_config, smoke  # noqa: E402
from mlx_dsv4.config import ModelArgs  # noqa: E402
from mlx_dsv4.generation.batch import Batcher, Request  # noqa: E402
from mlx_dsv4.model.cache import make_cache  # noqa: E402


class _Silent:
    def add(self, token: int) -> str:
        return ""

    def finalize(self) -> str:
        return ""


class NoText:
    """A tokenizer stand-in: no EOS, no text (the benchmark measures tokens)."""

    eos_token_ids: list[int] = []

    def detokenizer(self):
        return _Silent()

    def decode(self, ids) -> str:
        return ""


def run_batch(model, B: int, a) -> dict:
    V = model.args.vocab_size
    batcher = Batcher(model, NoText(), max_batch=B, prefill_chunk=a.prompt)
    stop = {"now": False}
    for b in range(B):
        ids = mx.random.randint(0, V, (a.prompt,), key=mx.random.key(100 + b)).tolist()
        batcher.add(Request(ids, lambda item: None, max_tokens=1 << 20, cancelled=lambda: stop["now"]))
    while any(r.next is None for r in batcher.active) or batcher.waiting:
        batcher.step()
    for _ in range(a.warmup):
        batcher.step()
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        batcher.step()
        times.append(time.perf_counter() - t)
    stop["now"] = True
    batcher.step()
    ms = 1e3 * statistics.median(times)
    return {"batch": B, "step_ms": ms, "tok_s": B * 1e3 / ms, "peak": batcher.peak}


def split_cost(model, a) -> dict:
    """Batch-1 steps through BatchStep against the whole-trunk DecodeStep (synchronous)."""
    V = model.args.vocab_size
    ids = mx.random.randint(0, V, (1, a.prompt), key=mx.random.key(7))
    out = {}
    step = model.batch_step()
    for name, fn in (("decode_step", lambda c: model(mx.array([[5]]), c, last_only=True)),
                     ("batch_step", lambda c: step(mx.array([[5]]), [c]))):
        cache = make_cache(model)
        mx.eval(model(ids, cache, last_only=True), [c.state for c in cache])
        times = []
        for i in range(a.warmup + a.steps):
            t = time.perf_counter()
            mx.eval(fn(cache), [c.state for c in cache])
            times.append(time.perf_counter() - t)
        out[name] = 1e3 * statistics.median(times[a.warmup:])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--start", type=int, default=4, help="first real Flash layer of the slice")
    ap.add_argument("--experts", type=int, default=None, help="routed experts (default 256)")
    ap.add_argument("--expert-quant", choices=("mxfp4", "affine"), default="mxfp4")
    ap.add_argument("--scale-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 2, 4, 8])
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens per request")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/batch.json when $OUT is set)")
    a = ap.parse_args()
    if a.out is None and os.environ.get("OUT"):
        a.out = os.path.join(os.environ["OUT"], "batch.json")

    config = sliced_config(a.layers, a.start, a.experts)
    config["eos_token_id"] = []  # random weights: no request should end early
    args = ModelArgs.from_dict(config)
    try:
        model, _ = build(config, a.expert_quant, a.seed, getattr(mx, a.scale_dtype))
        smoke(model, args)
    except Exception as e:  # a backend without mxfp4 gather_qmm
        log(f"mxfp4 experts failed ({type(e).__name__}: {e}); affine 4-bit experts instead")
        a.expert_quant = "affine"
        model, _ = build(config, a.expert_quant, a.seed, getattr(mx, a.scale_dtype))
    log(f"device {mx.default_device()}  mlx {mx.__version__}; Flash layers {a.start}..{a.start + a.layers - 1} "
        f"{args.layer_kinds}, {args.n_routed_experts} experts ({a.expert_quant}), activations {model.dtype}")
    res = {"argv": sys.argv[1:], "device": str(mx.default_device()), "mlx": mx.__version__, "rows": []}
    res["batch1_ms"] = split_cost(model, a)
    log(f"batch 1, synchronous: DecodeStep {res['batch1_ms']['decode_step']:.1f} ms, "
        f"BatchStep {res['batch1_ms']['batch_step']:.1f} ms")
    log(f"{'batch':>5} {'ms/step':>9} {'tok/s':>8} {'x batch 1':>9}")
    for B in a.batch:
        row = run_batch(model, B, a)
        res["rows"].append(row)
        base = res["rows"][0]["tok_s"]
        log(f"{B:>5} {row['step_ms']:>9.1f} {row['tok_s']:>8.1f} {row['tok_s'] / base:>9.2f}")
        if a.out:
            Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

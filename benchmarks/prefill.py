"""Prefill throughput and peak memory on Flash-shaped layers, by prompt length and chunk size,
with a per-module time breakdown; optionally side by side with other implementations.

The model is `benchmarks/flash_layers.py`'s: Flash's real shapes and q4 layout, `--layers` trunk
layers from layer `--start` (CSA, HCA, ...), `--experts` routed experts, random weights. On a CPU
pass `--scale-dtype float32` (MLX's bf16 kernels are ~7x slower there; see that file).

How each figure is obtained (the JSON says which, per row, under "how"):
  full     the prompt is prefilled for real, chunk by chunk, as `generation.prefill` does
           (each chunk evaluates the cache state only; no head): tok/s = P / total seconds.
  sampled  for prompts above `--full-max`: the pools are filled directly to an offset (random
           entries of the right shapes, as benchmarks/decode_context.py does: the content only
           changes which entries top-k picks, not the work) and one chunk is timed there, at
           `--samples` offsets spread over 0 … P-C. The prompt's time is estimated as
           (P / C) x the mean chunk time (the chunk time grows about linearly with the offset,
           so an even spread's mean is the average); "at_length" is the last chunk's tok/s.
  interleaved  with --interleave, full prompts run every implementation alternately, chunk by
           chunk, so load from other processes falls on all alike (use it for ratios).
  peak     mx.get_peak_memory over the run (weights, pools and activations), / weight bytes.
           Our chunks are evaluated paced, as generation.prefill evaluates them
           (generation/pacing.py; `--no-pacing` turns it off); the other ports run as they are.
  TFLOP/s  matmul FLOPs of the measured layers per prompt token (`flops_per_token`, at the
           prompt's mean context) x tok/s; with `--peak-tflops` also MFU against that peak.
  breakdown  one chunk at offset 0 and one at the largest prompt's last offset, with timing
           shims around each module (benchmark-only monkeypatches): each shim evaluates its
           inputs, then times the call plus the evaluation of its outputs. "other" is the rest of
           the chunk (norms, RoPE, window assembly, embedding). The shims add synchronisation,
           so the sum exceeds an unshimmed chunk by a little.

Side by side, in the same process on the same weight arrays (shared, not copied):
  --baseline DIR  a copy of an older mlx_dsv4 package renamed `mlx_dsv4_base` inside DIR
                  (e.g. `git archive de02b2f mlx_dsv4 | tar -x -C DIR; mv DIR/mlx_dsv4
                  DIR/mlx_dsv4_base`); its imports are relative, so it loads beside ours.
  --pr1192 DIR    a directory holding mlx-lm PR #1192's `mlx_lm` package renamed `mlx_lm_pr1192`
                  (`git archive refs/pull/1192/head mlx_lm`); only run here, never part of the
                  package. Its parameters are ours renamed (wo_a reshaped to 3-D).

    python benchmarks/prefill.py --layers 2 --experts 32 --scale-dtype float32 \
        --prompts 2048 8192 32768 --chunks 512 --out /tmp/prefill.json
    python benchmarks/prefill.py --scale-dtype float32 --prompts 512 --chunks 512 --interleave \
        --baseline /tmp/base --pr1192 /tmp/pr1192     # side by side (dirs as described above)
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from decode_context import fill  # noqa: E402
from flash_layers import build, nbytes, sliced_config  # noqa: E402

from mlx_dsv4.config import ModelArgs  # noqa: E402


def log(*a):
    print(*a, flush=True)


# ----- implementations --------------------------------------------------------------------------


class Impl:
    """One implementation: how to make a cache, run a chunk, and list the state to evaluate."""

    def __init__(self, name, model, new_cache, forward, state, fill_to=None, pkg=None,
                 pace=None):
        self.name, self.model, self.new_cache, self.pkg = name, model, new_cache, pkg
        self.forward, self.state, self.fill_to, self.pace = forward, state, fill_to, pace

    def evaluate(self, cache, tokens: int, context: int):
        """Evaluate the state after a chunk, paced as the implementation's generator paces it."""
        with self.pace(tokens, context) if self.pace else nullcontext():
            mx.eval(self.state(cache))


def ours_impl(model, args, name="ours", pkg="mlx_dsv4", pacing=True):
    mk = importlib.import_module(f"{pkg}.model.cache").make_cache
    pace = None
    if pacing and pkg == "mlx_dsv4":  # generation.prefill's pacing (the base commit had none)
        from mlx_dsv4.generation.pacing import paced

        def pace(tokens, context):
            return paced(args, tokens, context)
    return Impl(name, model, lambda max_tokens=None: mk(model, max_tokens=max_tokens),
                lambda ids, cache: model(ids, cache, last_only=True),
                lambda cache: [c.state for c in cache],
                lambda cache, T: fill(cache, args, T), pkg, pace)


def baseline_impl(ours, args, path: str):
    sys.path.insert(0, path)
    base = importlib.import_module("mlx_dsv4_base.model.model")
    base_layers = importlib.import_module("mlx_dsv4_base.model.layers")
    m = base.Model(args)
    m.mtp = []
    quantized = {p: mod for p, mod in ours.named_modules() if hasattr(mod, "mode")}
    nn.quantize(m, class_predicate=lambda p, _: _qspec(quantized.get(p)))
    m.update(tree_unflatten(tree_flatten(ours.parameters())))
    # Fuse by sharing our fused arrays (base.fuse() would concatenate a second copy).
    for mine, theirs in zip(ours.layers, m.layers):
        for name in ("experts", "shared_experts"):
            a, b = getattr(mine.ffn, name), getattr(theirs.ffn, name)
            pair = object.__new__(base_layers.FusedPair)
            pair.split = a.w13.split
            pair.module = copy.copy(b.w1)
            for k in ("weight", "scales", "biases"):
                if a.w13.module.get(k) is not None:
                    pair.module[k] = a.w13.module[k]
            b.w13 = pair
    return ours_impl(m, args, "baseline", "mlx_dsv4_base", pacing=False)


def _qspec(mod):
    if mod is None:
        return False
    return {"group_size": mod.group_size, "bits": mod.bits, "mode": mod.mode}


def _pr_name(ours: str) -> str:
    """Our parameter/module path -> PR #1192's."""
    top = {"embed": "model.embed_tokens", "norm": "model.norm", "head": "lm_head",
           "hc_head_fn": "model.hc_head.fn", "hc_head_base": "model.hc_head.base",
           "hc_head_scale": "model.hc_head.scale"}
    first, _, rest = ours.partition(".")
    if first in top:
        return top[first] + ("." + rest if rest else "")
    k = "model." + ours
    k = k.replace(".ffn.gate.bias", ".ffn.gate.e_score_correction_bias")
    for site in ("attn", "ffn"):
        for p in ("fn", "base", "scale"):
            k = k.replace(f".hc_{site}_{p}", f".{site}_hc.{p}")
    for src, dst in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
        k = k.replace(f".shared_experts.{src}", f".shared_experts.{dst}")
        k = k.replace(f".ffn.experts.{src}", f".ffn.switch_mlp.{dst}")
    return k


def pr1192_impl(ours, config: dict, path: str):
    sys.path.insert(0, path)
    dv = importlib.import_module("mlx_lm_pr1192.models.deepseek_v4")
    cfg = dict(config, model_type="deepseek_v4")
    m = dv.Model(dv.ModelArgs.from_dict(cfg))
    specs = {_pr_name(p): _qspec(mod) for p, mod in ours.named_modules() if hasattr(mod, "mode")}
    nn.quantize(m, class_predicate=lambda p, _: specs.get(p, False))
    g = config["o_groups"]
    weights = []
    for k, v in tree_flatten(ours.parameters()):
        if ".attn.wo_a." in k:
            v = v.reshape(g, -1, v.shape[-1])
        weights.append((_pr_name(k), v))
    m.load_weights(weights, strict=True)
    return Impl("pr1192", m, lambda max_tokens=None: m.make_cache(),
                lambda ids, cache: m(ids, cache=cache),
                lambda cache: [c.state for c in cache])


# ----- measurement ------------------------------------------------------------------------------


def run_chunks(impl: Impl, P: int, C: int, vocab: int, seed: int = 1) -> dict:
    """Prefill P tokens for real in chunks of C; cache state only, as generation does."""
    ids = mx.random.randint(0, vocab, (1, P), key=mx.random.key(seed))
    mx.eval(ids)
    cache = impl.new_cache(P + 8)
    mx.clear_cache()
    mx.reset_peak_memory()
    t = time.perf_counter()
    for s in range(0, P, C):
        impl.forward(ids[:, s : s + C], cache)
        impl.evaluate(cache, min(C, P - s), min(P, s + C))
        mx.clear_cache()
    dt = time.perf_counter() - t
    peak = mx.get_peak_memory()
    del cache
    mx.clear_cache()
    return {"how": "full", "seconds": dt, "tokens_per_s": P / dt, "peak_bytes": peak}


def run_interleaved(impls: list, P: int, C: int, vocab: int, seed: int = 1) -> list[dict]:
    """Real prefill of P tokens by every implementation, alternating chunk by chunk, so that
    load from other processes falls on all of them alike; peak per implementation is the
    largest over its chunks (the other implementations' caches included, small at these P)."""
    ids = mx.random.randint(0, vocab, (1, P), key=mx.random.key(seed))
    mx.eval(ids)
    caches = [impl.new_cache(P + 8) for impl in impls]
    secs, peaks = [0.0] * len(impls), [0] * len(impls)
    for s in range(0, P, C):
        for j, impl in enumerate(impls):
            mx.clear_cache()
            mx.reset_peak_memory()
            t = time.perf_counter()
            impl.forward(ids[:, s : s + C], caches[j])
            impl.evaluate(caches[j], min(C, P - s), min(P, s + C))
            secs[j] += time.perf_counter() - t
            peaks[j] = max(peaks[j], mx.get_peak_memory())
    del caches
    mx.clear_cache()
    return [{"how": "full, interleaved chunk by chunk", "seconds": t, "tokens_per_s": P / t,
             "peak_bytes": pk, "impl": impl.name} for impl, t, pk in zip(impls, secs, peaks)]


def time_chunk_at(impl: Impl, offset: int, C: int, vocab: int, P: int, seed: int = 1):
    cache = impl.new_cache(P + 8)
    if offset:
        impl.fill_to(cache, offset)
    ids = mx.random.randint(0, vocab, (1, C), key=mx.random.key(seed))
    mx.eval(ids, impl.state(cache))
    mx.clear_cache()
    t = time.perf_counter()
    impl.forward(ids, cache)
    impl.evaluate(cache, C, offset + C)
    dt = time.perf_counter() - t
    del cache
    mx.clear_cache()
    return dt


def run_sampled(impl: Impl, P: int, C: int, vocab: int, samples: int) -> dict:
    n = P // C
    # One sample is the last chunk (the figure at length); more spread over the prompt.
    picks = sorted({round(i * (n - 1) / max(samples - 1, 1)) for i in range(samples)}
                   if samples > 1 else {n - 1})
    mx.reset_peak_memory()
    times = {p * C: time_chunk_at(impl, p * C, C, vocab, P) for p in picks}
    mean = sum(times.values()) / len(times)
    last = times[max(times)]
    return {"how": f"sampled ({len(times)} chunks at offsets {sorted(times)})",
            "seconds": n * mean, "tokens_per_s": C / mean, "at_length_tokens_per_s": C / last,
            "chunk_seconds": times, "peak_bytes": mx.get_peak_memory()}


def flops_per_token(args: ModelArgs, context: int) -> float:
    """Matmul FLOPs one prompt token costs the measured layers at `context` (2 per MAC).

    Weights: every linear of a layer once (its logical, unquantized shape) and k of the routed
    experts. Attention: scores and values over the W window plus the compressed entries a CSA
    query attends (top-k) or an HCA query sees (context/128), and the indexer's scores over
    context/4 index keys. mHC, norms, RoPE and softmax are left out (a few per cent at most).
    """
    D, H, c, R = args.hidden_size, args.num_attention_heads, args.head_dim, args.q_lora_rank
    I, k = args.moe_intermediate_size, args.num_experts_per_tok
    total = 0.0
    for kind in args.layer_kinds:
        macs = D * R + R * H * c + D * c + H * c * args.o_lora_rank
        macs += args.o_groups * args.o_lora_rank * D + D * args.n_routed_experts
        macs += (k + 1) * 3 * D * I  # routed picks and the shared expert
        macs += 2 * (D * args.hc_mult) * (args.hc_mult + 2) * args.hc_mult  # mHC projections
        entries = args.sliding_window
        if kind == "csa":
            macs += 2 * D * 2 * c  # compressor (overlapping windows: two halves)
            hi, ci = args.index_n_heads, args.index_head_dim
            macs += R * hi * ci + D * hi + 2 * D * 2 * ci + hi * ci * context / 4
            entries += min(args.index_topk, context / 4)
        elif kind == "hca":
            macs += 2 * D * c
            entries += context / 128
        macs += 2 * H * c * entries
        total += 2 * macs
    return total


# ----- breakdown shims --------------------------------------------------------------------------


def _arrays(tree):
    if isinstance(tree, mx.array):
        return [tree]
    if isinstance(tree, (list, tuple)):
        return [a for t in tree for a in _arrays(t)]
    return []


@contextmanager
def shims(times: dict, pkg: str, peaks: dict | None = None):
    """Patch each module's call so it is timed alone (outermost shim only)."""
    attention, layers, mhc, model_mod = (importlib.import_module(f"{pkg}.model.{m}")
                                         for m in ("attention", "layers", "mhc", "model"))
    active = []
    patched = []

    def wrap(owner, attr, label):
        orig = getattr(owner, attr)

        def shim(*a, **kw):
            if active:
                return orig(*a, **kw)
            mx.eval(_arrays(list(a)) + _arrays(list(kw.values())))
            active.append(label)
            if peaks is not None:
                before = mx.get_active_memory()
                mx.reset_peak_memory()
            t = time.perf_counter()
            try:
                out = orig(*a, **kw)
                mx.eval(_arrays(out))
            finally:
                active.pop()
            times[label] = times.get(label, 0.0) + time.perf_counter() - t
            if peaks is not None:
                peaks[label] = max(peaks.get(label, 0), mx.get_peak_memory() - before)
            return out

        patched.append((owner, attr, orig))
        setattr(owner, attr, shim)

    wrap(attention.Compressor, "__call__", "compressor")
    wrap(attention.Indexer, "select", "indexer")
    for name in ("_attend", "_attend_block", "_window_attend"):
        if hasattr(attention, name):
            wrap(attention, name, "attention_core")
    for cls in (nn.Linear, nn.QuantizedLinear, layers.GroupedLinear, layers.QuantizedGroupedLinear):
        wrap(cls, "__call__", "projections")
    wrap(model_mod.Gate, "__call__", "router")
    wrap(model_mod.Experts, "__call__", "experts")
    wrap(model_mod.SharedExpert, "__call__", "shared_expert")
    wrap(mhc, "mix", "mhc")
    wrap(mhc, "expand", "mhc")
    try:
        yield
    finally:
        for owner, attr, orig in reversed(patched):
            setattr(owner, attr, orig)


def breakdown(impl: Impl, offset: int, C: int, vocab: int, P: int) -> tuple[dict, dict]:
    """(ms per module, peak bytes each module's call adds over what was live before it)."""
    times: dict[str, float] = {}
    peaks: dict[str, int] = {}
    with shims(times, impl.pkg, peaks):
        total = time_chunk_at(impl, offset, C, vocab, P)
    ms = {k: 1e3 * v for k, v in sorted(times.items())}
    ms["other"] = 1e3 * total - sum(ms.values())
    ms["total"] = 1e3 * total
    return ms, dict(sorted(peaks.items()))


def indexer_scaling(impl: Impl, args: ModelArgs, T: int, queries: int, reps: int = 2) -> float:
    """Seconds for the first CSA layer's `Indexer.select` of `queries` queries at offset T
    against T/4 random index keys (scoring and top-k; its projections included)."""
    i = args.layer_kinds.index("csa")
    att = impl.model.layers[i].attn
    dt = impl.model.dtype
    D, R = args.hidden_size, args.q_lora_rank
    x = mx.random.normal((1, queries, D)).astype(dt)
    q_lat = mx.random.normal((1, queries, R)).astype(dt)
    keys = mx.random.normal((1, T // 4, args.index_head_dim)).astype(dt)
    mx.eval(x, q_lat, keys)
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval(att.indexer.select(x, q_lat, keys, T, att._index_periods))
        best = min(best, time.perf_counter() - t)
    return best


# ----- main -------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--start", type=int, default=4)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--scale-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--prompts", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--chunks", type=int, nargs="+", default=[512])
    ap.add_argument("--full-max", type=int, default=2048,
                    help="prompts up to this are prefilled for real; longer ones are sampled")
    ap.add_argument("--samples", type=int, default=3, help="chunks timed per sampled prompt")
    ap.add_argument("--allow-128k", action="store_true",
                    help="also 131072 tokens (pools of 128K entries: needs the memory)")
    ap.add_argument("--breakdown", action="store_true")
    ap.add_argument("--no-runs", action="store_true", help="breakdown only (prompts set offsets)")
    ap.add_argument("--breakdown-at", type=int, nargs="*", default=None,
                    help="offsets for the breakdown (default 0 and the largest prompt's last)")
    ap.add_argument("--interleave", action="store_true",
                    help="full prompts: run the implementations alternately, chunk by chunk")
    ap.add_argument("--indexer", action="store_true",
                    help="time the indexer alone for one query block at each prompt length")
    ap.add_argument("--baseline", default=None, help="dir with an older package as mlx_dsv4_base")
    ap.add_argument("--pr1192", default=None, help="dir with mlx-lm PR #1192 as mlx_lm_pr1192")
    ap.add_argument("--others-max", type=int, default=2048,
                    help="largest prompt run for --baseline/--pr1192 (they cost as much as ours)")
    ap.add_argument("--only", nargs="*", default=None, help="run only these implementations")
    ap.add_argument("--no-pacing", action="store_true",
                    help="evaluate our chunks without generation's memory pacing")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's dense peak (e.g. 989 for an H200 in bf16): adds MFU")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    prompts = list(a.prompts) + ([131072] if a.allow_128k else [])

    config = sliced_config(a.layers, a.start, a.experts)
    args = ModelArgs.from_dict(config)
    t = time.perf_counter()
    model, _ = build(config, "mxfp4", 0, getattr(mx, a.scale_dtype))
    W = nbytes(model)
    res = {"argv": sys.argv[1:], "device": str(mx.default_device()), "mlx": mx.__version__,
           "weight_bytes": W, "kinds": args.layer_kinds, "build_s": time.perf_counter() - t,
           "runs": [], "breakdown": []}
    impls = [ours_impl(model, args, pacing=not a.no_pacing)]
    if a.baseline:
        impls.append(baseline_impl(model, args, a.baseline))
    if a.pr1192:
        impls.append(pr1192_impl(model, config, a.pr1192))
    if a.only:
        impls = [i for i in impls if i.name in a.only]
    log(f"{mx.default_device()} mlx {mx.__version__}: {args.layer_kinds}, {a.experts} experts, "
        f"weights {W / 1e9:.2f} GB; {[i.name for i in impls]}")

    def rate(row):
        """Achieved TFLOP/s (mean context P/2) and MFU when the peak is given."""
        P = row["prompt"]
        row["tflops_per_s"] = flops_per_token(args, P / 2) * row["tokens_per_s"] / 1e12
        if a.peak_tflops:
            row["mfu"] = row["tflops_per_s"] / a.peak_tflops
        mfu = f", MFU {row['mfu']:.1%}" if a.peak_tflops else ""
        return f"  {row['tflops_per_s']:.3g} TFLOP/s{mfu}"

    def write():
        if a.out:
            Path(a.out).write_text(json.dumps(res, indent=1, default=str))

    V = args.vocab_size
    for impl in [] if a.no_runs else impls:  # compile/warm every path once (one small chunk)
        run_chunks(impl, 64, 64, V)
    log(f"{'impl':>9} {'prompt':>7} {'chunk':>6} {'tok/s':>8} {'at len':>8} {'peak/W':>7}  how")
    for P in [] if a.no_runs or not a.interleave else prompts:
        for C in a.chunks:
            for row in run_interleaved(impls, P, C, V):
                row.update(prompt=P, chunk=C, peak_over_weights=row["peak_bytes"] / W)
                res["runs"].append(row)
                log(f"{row['impl']:>9} {P:>7} {C:>6} {row['tokens_per_s']:>8.2f} {'':>8} "
                    f"{row['peak_over_weights']:>7.3f}  {row['how']}{rate(row)}")
                write()
    for P in [] if a.no_runs or a.interleave else prompts:
        for C in a.chunks:
            for impl in impls:
                if impl.name != "ours" and P > a.others_max:
                    continue
                if P <= a.full_max or impl.fill_to is None:
                    row = run_chunks(impl, P, C, V)
                else:
                    row = run_sampled(impl, P, C, V, a.samples)
                row.update(impl=impl.name, prompt=P, chunk=C,
                           peak_over_weights=row["peak_bytes"] / W)
                res["runs"].append(row)
                log(f"{impl.name:>9} {P:>7} {C:>6} {row['tokens_per_s']:>8.2f} "
                    f"{row.get('at_length_tokens_per_s', float('nan')):>8.2f} "
                    f"{row['peak_over_weights']:>7.3f}  {row['how']}{rate(row)}")
                write()
    if a.indexer:
        res["indexer"] = []
        for P in prompts:  # implementations alternate at each size: contention drifts
            for impl in [i for i in impls if i.pkg is not None]:
                sec = indexer_scaling(impl, args, P, 128)
                res["indexer"].append({"impl": impl.name, "prompt": P, "queries": 128,
                                       "seconds": sec})
                log(f"indexer {impl.name} at {P}: {1e3 * sec:.0f} ms per 128 queries")
                write()
    if a.breakdown:
        offsets = a.breakdown_at if a.breakdown_at is not None else [0, max(prompts) - a.chunks[0]]
        for impl in impls:
            if impl.pkg is None:
                continue
            time_chunk_at(impl, 0, 64, V, 64)  # compile once; chunk shapes then run as measured
            for off in offsets:
                for C in a.chunks:
                    ms, peaks = breakdown(impl, off, C, V, off + C)
                    res["breakdown"].append({"impl": impl.name, "offset": off, "chunk": C,
                                             "ms": ms, "peak_added_bytes": peaks})
                    log(f"breakdown {impl.name} offset {off} chunk {C}: "
                        + ", ".join(f"{k} {v:.0f}" for k, v in ms.items()))
                    log("   peak MB added: " + ", ".join(f"{k} {v / 1e6:.0f}"
                                                         for k, v in peaks.items()))
                    write()
    write()


if __name__ == "__main__":
    main()

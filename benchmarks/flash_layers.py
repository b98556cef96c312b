"""Decode speed and prefill memory of mlx-dsv4 at real DeepSeek-V4-Flash shapes, on random weights.

What is built: `mlx_dsv4.model.model.Model` from Flash's own config (hidden 4096, 64 heads x 512,
q_lora 1024, 8 output groups of rank 1024, window 128, index 64 heads x 128 top-512, 256 routed
experts of 2048, top-6, vocabulary 129280) with only `--layers` trunk layers, taken as a slice of
the real schedule starting at `--start` (default: layer 4, so CSA, HCA, CSA, HCA...; `--hash`
starts at layer 2, a hash-routed CSA layer). No MTP. `--experts` shrinks the routed experts (CPU).

Weights are quantized exactly as the converter's q4 recipe lays them out: the same per-module
`"quantization"` block `dsv4 convert --recipe q4` writes (FP8 linears affine 4-bit g64, experts
mxfp4 g32, embedding/head affine 8-bit g64) applied with `weights.quantization_predicate` and
`nn.quantize`, as `weights.load_model` does; unquantized tensors in their stored dtype (mHC, sinks,
`ape`, router weight and bias fp32; norms, compressor `wkv/wgate`, `weights_proj` bf16; `tid2eid`
int32). The quantized arrays are then replaced by random ones drawn directly on the default device
(packed codes from `mx.random.randint`, scales set so each weight has std ~ 1/sqrt(fan_in)),
evaluated one layer at a time. Nothing touches numpy or the disk. A 16-token and a 1-token
forward then check both expert paths; if the mxfp4 one raises (a backend without mxfp4
`gather_qmm`), the model is rebuilt with affine 4-bit experts and the JSON says so.

Measured:
  decode   prefill a `--prompt`-token prompt, then time `--steps` batch-1 decode steps after
           `--warmup`: synchronous (mx.eval of logits and cache each step; median) and pipelined
           through `generate.generate_step` (the real generator, async_eval one step ahead; mean).
           The embedding + mHC head collapse + LM head part is timed the same way on a 0-layer
           pass and subtracted: ms/layer = (step - head) / layers. Each layer, its attention and
           its MoE are also timed alone. Weight bytes read per decode step per layer are counted
           from the quantized arrays' nbytes (attention incl. compressor and indexer, shared
           expert, router, mHC, norms, and k/E of the routed experts; `tid2eid` as one row) and
           turned into GB/s, the ratio to the `--ref-ms` floor (0.435 ms, the brief's H100 figure)
           and the ratio to bytes / `--bandwidth`.
  prefill  for each `--chunks` size: a fresh cache, mx peak memory reset, one chunk of that many
           tokens, `--repeats` times (the first run also pays kernel compilation): peak memory,
           peak / total weight bytes, activation bytes (peak - memory in use before), tokens/s.
  context  for each `--context` length: the pools are filled directly to that length (as
           benchmarks/decode_context.py does; a real prefill would take too long on a CPU) and
           `--steps` synchronous decode steps are timed.

Results print as tables and go to `--out` as JSON (default $OUT/flash_layers.json when $OUT is
set), rewritten after each phase so a run cut short by a timeout keeps what it measured.

    python benchmarks/flash_layers.py                                  # GPU: 4 layers, 256 experts
    python benchmarks/flash_layers.py --layers 2 --experts 8 --steps 5 --warmup 1 --prompt 16
        --chunks 64 128 --repeats 1 --context 1024 8192 --scale-dtype float32   # CPU, ~2 min

On a CPU, MLX's bf16 kernels are ~7x slower than fp32 ones, hence `--scale-dtype float32` there
(affine scales fp32 make the activations fp32); every other choice is the GPU path's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlx_dsv4.model.cache import make_cache
from mlx_dsv4.config import ModelArgs, released_config
from mlx_dsv4.convert.plan import Header, Source, make_plan
from mlx_dsv4.generation.generate import generate_step
from mlx_dsv4.model.model import Model, keep_float32
from mlx_dsv4.synthetic import official_headers
from mlx_dsv4.model.weights import quantization_predicate

HERE = Path(__file__).resolve().parent
GB = 1e9
GiB = 1 << 30

def log(*a):
    print(*a, flush=True)


# ----- model ------------------------------------------------------------------------------------


def sliced_config(layers: int, start: int, experts: int | None) -> dict:
    """Flash with only trunk layers start … start+layers-1 of the real schedule (no MTP).

    Hash routing is `layer < num_hash_layers`, a prefix of the schedule, so the slice keeps the
    hash layers it covers by setting num_hash_layers to how many of them it starts with.
    """
    cfg = released_config("flash")
    ratios = cfg["compress_ratios"][: cfg["num_hidden_layers"]]
    if start < 0 or start + layers > len(ratios):
        raise SystemExit(f"--start {start} --layers {layers} runs past Flash's {len(ratios)} layers")
    cfg.update(
        num_hidden_layers=layers, compress_ratios=ratios[start : start + layers],
        num_nextn_predict_layers=0,
        num_hash_layers=max(0, min(cfg["num_hash_layers"] - start, layers)))
    if experts:
        cfg["n_routed_experts"] = experts
    return cfg


def q4_quantization(config: dict, expert_quant: str = "mxfp4") -> dict:
    """The `"quantization"` block `dsv4 convert --recipe q4` writes for this config, from the
    converter's own plan over the release's headers; `affine` swaps the experts' entry."""
    args = ModelArgs.from_dict(config)
    headers = {n: Header("model.safetensors", dtype, shape)
               for n, (dtype, shape, _) in official_headers(args).items()}
    quant = make_plan(Source(config, headers), "q4").quantization
    if expert_quant == "affine":
        affine = {"group_size": 64, "bits": 4, "mode": "affine"}
        quant = {k: affine if isinstance(v, dict) and v.get("mode") == "mxfp4" else v
                 for k, v in quant.items()}
    return quant


def _rand_u32(shape, key) -> mx.array:
    """Uniform random uint32 (every bit random: randint is exact only below 2^24)."""
    k1, k2 = mx.random.split(key)
    lo = mx.random.randint(0, 1 << 16, shape, dtype=mx.uint32, key=k1)
    hi = mx.random.randint(0, 1 << 16, shape, dtype=mx.uint32, key=k2)
    return lo | (hi << 16)


def _quantized_values(m: nn.Module, key, sigma: float, dt) -> dict[str, mx.array]:
    """Random packed codes and scales giving weights of std ~sigma, in the module's layout.

    The converter stores affine scales/biases in the source dtype, bf16 (`dt`)."""
    out = {"weight": _rand_u32(m["weight"].shape, key)}
    if m.mode == "affine":
        levels = 2 ** m.bits
        scale = sigma / math.sqrt((levels * levels - 1) / 12)
        out["scales"] = mx.full(m["scales"].shape, scale, dt)
        out["biases"] = mx.full(m["biases"].shape, -(levels - 1) / 2 * scale, dt)
    elif m.mode in ("mxfp4", "mxfp8"):
        # E8M0 code 2^(s-127); uniform random e2m1 codes have rms ~2.93, e4m3 codes far more.
        rms = 2.93 if m.bits == 4 else 60.0
        code = int(round(127 + math.log2(sigma / rms)))
        out["scales"] = mx.full(m["scales"].shape, code, mx.uint8)
    else:
        raise ValueError(f"no random fill for quantization mode {m.mode!r}")
    return out


def fill_random(module: nn.Module, prefix: str, key, vocab: int, experts: int, scale_dtype):
    """Replace every parameter of `module` by random values of its dtype/shape; evaluate them."""
    new = {}
    quantized = {p: m for p, m in module.named_modules() if "scales" in m and hasattr(m, "mode")}
    for path, m in quantized.items():
        key, k = mx.random.split(key)
        fan_in = m["scales"].shape[-1] * m.group_size
        sigma = 1.0 if (prefix + path).endswith("embed") else 1 / math.sqrt(fan_in)
        for leaf, v in _quantized_values(m, k, sigma, scale_dtype).items():
            new[f"{path}.{leaf}" if path else leaf] = v
    for name, p in tree_flatten(module.parameters()):
        if name in new:
            continue
        full = prefix + name
        key, k = mx.random.split(key)
        if full.endswith("tid2eid"):  # k distinct experts per token, as a real table has
            n, topk = p.shape
            pick = mx.argpartition(mx.random.uniform(shape=(n, experts), key=k), topk - 1, axis=-1)
            new[name] = pick[:, :topk].astype(mx.int32)
            continue
        if p.dtype in (mx.int32, mx.uint32, mx.int64):
            new[name] = mx.random.randint(0, vocab, p.shape, dtype=mx.int32, key=k)
            continue
        dtype = mx.float32 if keep_float32(full) else mx.bfloat16
        if full.endswith("norm.weight") or re.search(r"hc_\w+_scale$", full):
            v = mx.ones(p.shape, dtype)
        elif full.endswith(".gate.bias"):
            # A small balancing bias: a large one would send every token to the same k experts.
            v = (0.01 * mx.random.normal(p.shape, key=k)).astype(dtype)
        else:
            fan_in = p.shape[-1] if p.ndim > 1 else 1
            v = (mx.random.normal(p.shape, key=k) / math.sqrt(fan_in)).astype(dtype)
        new[name] = v
    module.update(tree_unflatten(list(new.items())))
    mx.eval(module.parameters())


def build(config: dict, expert_quant: str = "mxfp4", seed: int = 0,
          scale_dtype=mx.bfloat16) -> tuple[Model, dict]:
    args = ModelArgs.from_dict(config)
    model = Model(args)
    quant = q4_quantization(config, expert_quant)
    nn.quantize(model, class_predicate=quantization_predicate(quant, {}))
    key = mx.random.key(seed)
    V, E = args.vocab_size, args.n_routed_experts
    for i, layer in enumerate(model.layers):
        key, k = mx.random.split(key)
        fill_random(layer, f"layers.{i}.", k, V, E, scale_dtype)
    # Everything outside the layers: embed, norm, head, hc_head_*.
    top = nn.Module()
    for name in ("embed", "norm", "head"):
        top[name] = model[name]
    key, k = mx.random.split(key)
    fill_random(top, "", k, V, E, scale_dtype)
    heads = {n: mx.random.normal(model[n].shape) / math.sqrt(model[n].shape[-1])
             for n in ("hc_head_fn", "hc_head_base")}
    heads["hc_head_scale"] = mx.ones(model.hc_head_scale.shape)
    model.update(heads)
    mx.eval(model.parameters())
    model.fuse()  # as weights.load_model does
    return model, quant


def check_layout(model: Model, quant: dict):
    """Every module the q4 block names is quantized with its entry; nothing else is."""
    modules = dict(model.named_modules())
    for path, entry in quant.items():
        if not isinstance(entry, dict):
            continue
        m = modules[path]
        got = (getattr(m, "mode", None), getattr(m, "group_size", None), getattr(m, "bits", None))
        want = (entry["mode"], entry["group_size"], entry["bits"])
        assert got == want, f"{path}: quantized {got}, the q4 block says {want}"
    extra = [p for p, m in modules.items() if "scales" in m and p not in quant]
    assert not extra, f"quantized but not in the q4 block: {extra[:5]}"


# ----- byte accounting --------------------------------------------------------------------------


def layer_read_bytes(layer: nn.Module, args: ModelArgs) -> dict[str, float]:
    """Weight bytes one batch-1 decode step reads in this layer, by part."""
    k, E = args.num_experts_per_tok, args.n_routed_experts
    parts = {"attention": 0.0, "router": 0.0, "shared_expert": 0.0, "routed_experts": 0.0,
             "mhc_norms": 0.0}
    for name, p in tree_flatten(layer.parameters()):
        if name.startswith("attn."):
            parts["attention"] += p.nbytes
        elif name.startswith("ffn.experts."):
            parts["routed_experts"] += p.nbytes * k / E
        elif name.startswith("ffn.shared_experts."):
            parts["shared_expert"] += p.nbytes
        elif name.endswith("tid2eid"):
            parts["router"] += k * p.itemsize  # one row of the hash table
        elif name.startswith("ffn.gate."):
            parts["router"] += p.nbytes
        else:
            parts["mhc_norms"] += p.nbytes
    parts["total"] = sum(parts.values())
    return parts


def nbytes(module: nn.Module) -> int:
    return sum(p.nbytes for _, p in tree_flatten(module.parameters()))


# ----- timing -----------------------------------------------------------------------------------


@contextmanager
def no_layers(model: Model):
    layers = model.layers
    model.layers = []
    try:
        yield
    finally:
        model.layers = layers


def state(cache):
    return [c.state for c in cache]


def time_sync(fn, steps: int, warmup: int) -> dict:
    """Median wall time of build-and-evaluate; `graph_ms` is the Python graph-building part."""
    times, graph = [], []
    for _ in range(warmup + steps):
        t = time.perf_counter()
        out = fn()
        g = time.perf_counter()
        mx.eval(out)
        times.append(time.perf_counter() - t)
        graph.append(g - t)
    t = times[warmup:]
    return {"median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t),
            "first_ms": 1e3 * times[0], "graph_ms": 1e3 * statistics.median(graph[warmup:])}


def time_decode_sync(model, cache, steps, warmup, tok=7) -> dict:
    ids = mx.array([[tok]])
    return time_sync(lambda: (model(ids, cache, last_only=True), state(cache)), steps, warmup)


def time_decode_pipelined(model, cache, steps, warmup, tok=7) -> float:
    """Mean ms per token of the real generator (async_eval one step ahead, greedy)."""
    t0 = None
    for n, _ in enumerate(generate_step(model, [tok], cache, max_tokens=warmup + steps + 1)):
        if n == warmup:
            t0 = time.perf_counter()
    dt = time.perf_counter() - t0
    mx.synchronize()
    return 1e3 * dt / steps


def prefill(model, cache, n: int, vocab: int, seed: int = 1):
    ids = mx.random.randint(0, vocab, (1, n), key=mx.random.key(seed))
    mx.eval(model(ids, cache, last_only=True), state(cache))


# ----- phases -----------------------------------------------------------------------------------


def phase_decode(model, args, a, res):
    L = len(model.layers)
    cache = make_cache(model)
    t = time.perf_counter()
    prefill(model, cache, a.prompt, args.vocab_size)
    res["decode"] = {"prompt": a.prompt, "prompt_prefill_s": time.perf_counter() - t}
    d = res["decode"]
    d["step_sync"] = time_decode_sync(model, cache, a.steps, a.warmup)
    d["step_pipelined_ms"] = time_decode_pipelined(model, cache, a.steps, a.warmup)
    with no_layers(model):
        d["head_sync"] = time_decode_sync(model, [], a.steps, a.warmup)
        d["head_pipelined_ms"] = time_decode_pipelined(model, [], a.steps, a.warmup)
    d["layer_ms_sync"] = (d["step_sync"]["median_ms"] - d["head_sync"]["median_ms"]) / L
    d["layer_ms_pipelined"] = (d["step_pipelined_ms"] - d["head_pipelined_ms"]) / L

    # Each layer, its attention and its MoE alone (synchronous; includes one launch/sync each).
    D, N = args.hidden_size, args.hc_mult
    X = mx.random.normal((1, 1, N, D)).astype(model.dtype)
    x = mx.random.normal((1, 1, D)).astype(model.dtype)
    ids = mx.array([[7]])
    d["per_layer"] = []
    for i, (layer, c) in enumerate(zip(model.layers, cache)):
        row = {"layer": a.start + i, "kind": args.attention_kind(i),
               "hash": args.is_hash_layer(i), "bytes": layer_read_bytes(layer, args)}
        row["block_ms"] = time_sync(lambda: (layer(X, ids, c), c.state), a.steps, a.warmup)["median_ms"]
        row["attn_ms"] = time_sync(lambda: (layer.attn(x, c), c.state), a.steps, a.warmup)["median_ms"]
        row["moe_ms"] = time_sync(lambda: layer.ffn(x, ids), a.steps, a.warmup)["median_ms"]
        d["per_layer"].append(row)
    mean_bytes = sum(r["bytes"]["total"] for r in d["per_layer"]) / L
    d["layer_read_bytes"] = mean_bytes
    d["layer_floor_ms_at_bandwidth"] = 1e3 * mean_bytes / a.bandwidth
    for mode in ("sync", "pipelined"):
        ms = d[f"layer_ms_{mode}"]
        d[f"layer_GBps_{mode}"] = mean_bytes / (ms * 1e-3) / GB if ms > 0 else None
        d[f"ratio_to_ref_{mode}"] = ms / a.ref_ms
        d[f"ratio_to_bandwidth_floor_{mode}"] = ms / d["layer_floor_ms_at_bandwidth"]

    log(f"\n== decode, batch 1, after a {a.prompt}-token prompt ({a.steps} steps, {a.warmup} warm-up)")
    log(f"prompt prefill {d['prompt_prefill_s']:.2f} s (includes first-run compilation)")
    log(f"{'':>10} {'step ms':>9} {'head ms':>9} {'ms/layer':>9} {'GB/s/layer':>11} "
        f"{'x ' + str(a.ref_ms) + 'ms':>10} {'x floor':>8}")
    for mode, step, head in (("sync", d["step_sync"]["median_ms"], d["head_sync"]["median_ms"]),
                             ("pipelined", d["step_pipelined_ms"], d["head_pipelined_ms"])):
        gbps = d[f"layer_GBps_{mode}"]
        log(f"{mode:>10} {step:>9.2f} {head:>9.2f} {d[f'layer_ms_{mode}']:>9.3f} "
            f"{(gbps or 0):>11.1f} {d[f'ratio_to_ref_{mode}']:>10.2f} "
            f"{d[f'ratio_to_bandwidth_floor_{mode}']:>8.2f}")
    log(f"Python graph building per step: {d['step_sync']['graph_ms']:.2f} ms "
        f"(head-only pass {d['head_sync']['graph_ms']:.2f} ms)")
    log(f"weight bytes read per layer per step: {mean_bytes / 1e6:.1f} MB -> floor "
        f"{d['layer_floor_ms_at_bandwidth']:.4f} ms at {a.bandwidth / 1e12:.2f} TB/s")
    log(f"{'layer':>5} {'kind':>5} {'hash':>5} {'block ms':>9} {'attn ms':>8} {'moe ms':>7} "
        f"{'attn MB':>8} {'experts MB':>11} {'shared MB':>10} {'router MB':>10} {'mhc MB':>7}")
    for r in d["per_layer"]:
        b = r["bytes"]
        log(f"{r['layer']:>5} {r['kind']:>5} {str(r['hash']):>5} {r['block_ms']:>9.3f} "
            f"{r['attn_ms']:>8.3f} {r['moe_ms']:>7.3f} {b['attention'] / 1e6:>8.1f} "
            f"{b['routed_experts'] / 1e6:>11.1f} {b['shared_expert'] / 1e6:>10.1f} "
            f"{b['router'] / 1e6:>10.2f} {b['mhc_norms'] / 1e6:>7.2f}")
    del cache
    mx.clear_cache()


def phase_prefill(model, args, a, res, weight_bytes):
    res["prefill"] = []
    log(f"\n== prefill, one chunk into a fresh cache ({a.repeats} runs each)")
    log(f"{'tokens':>7} {'peak GiB':>9} {'peak/W':>7} {'act GiB':>8} {'act/W':>6} "
        f"{'s (best)':>9} {'tok/s':>9} {'s (first)':>10}")
    for S in a.chunks:
        times, peak, act = [], 0, 0
        for r in range(a.repeats):
            cache = make_cache(model)
            mx.synchronize()
            mx.clear_cache()
            before = mx.get_active_memory()
            mx.reset_peak_memory()
            t = time.perf_counter()
            prefill(model, cache, S, args.vocab_size, seed=r + 2)
            times.append(time.perf_counter() - t)
            p = mx.get_peak_memory()
            peak, act = max(peak, p), max(act, p - before)
            del cache
        row = {"tokens": S, "peak_bytes": peak, "peak_over_weights": peak / weight_bytes,
               "activation_bytes": act, "activation_over_weights": act / weight_bytes,
               "seconds": min(times), "seconds_first": times[0], "tokens_per_s": S / min(times)}
        res["prefill"].append(row)
        log(f"{S:>7} {peak / GiB:>9.2f} {row['peak_over_weights']:>7.2f} {act / GiB:>8.2f} "
            f"{row['activation_over_weights']:>6.2f} {row['seconds']:>9.3f} "
            f"{row['tokens_per_s']:>9.1f} {row['seconds_first']:>10.3f}")
        write(a, res)
        mx.clear_cache()


def _fill_pools(cache, args: ModelArgs, T: int):
    try:
        sys.path.insert(0, str(HERE))
        from decode_context import fill
    except Exception as e:
        raise SystemExit(f"benchmarks/decode_context.py:fill is needed for --context ({e})")
    fill(cache, args, T)


def phase_context(model, args, a, res):
    res["context"] = []
    L = len(model.layers)
    log(f"\n== decode against context (pools filled directly; {a.steps} steps)")
    log(f"{'context':>9} {'step ms':>9} {'ms/layer':>9} {'pool MiB':>9} {'fill s':>7}")
    head = res.get("decode", {}).get("head_sync", {}).get("median_ms")  # None with --skip-decode
    for T in a.context:
        cache = make_cache(model, max_tokens=T + a.warmup + a.steps + 8)
        t = time.perf_counter()
        _fill_pools(cache, args, T)
        fill_s = time.perf_counter() - t
        step = time_decode_sync(model, cache, a.steps, a.warmup)
        pools = sum(p.nbytes for c in cache for p in (c.kv_pool, c.index_pool) if p is not None)
        layer_ms = None if head is None else (step["median_ms"] - head) / L
        row = {"context": T, "step": step, "layer_ms": layer_ms,
               "pool_bytes": pools, "fill_s": fill_s}
        res["context"].append(row)
        per = "-" if layer_ms is None else f"{layer_ms:.3f}"
        log(f"{T:>9,} {step['median_ms']:>9.2f} {per:>9} {pools / 2**20:>9.1f} "
            f"{fill_s:>7.2f}")
        write(a, res)
        del cache
        mx.clear_cache()


def smoke(model, args):
    """One decode-sized and one prefill-sized forward (both expert paths: unsorted and sorted)."""
    cache = make_cache(model)
    prefill(model, cache, 16, args.vocab_size)
    out = model(mx.array([[3]]), cache, last_only=True)
    mx.eval(out)
    if not mx.isfinite(out).all().item():
        log("WARNING: non-finite logits from the random model")


def write(a, res):
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1, default=str))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4, help="trunk layers to build (default 4)")
    ap.add_argument("--start", type=int, default=None,
                    help="first real Flash layer of the slice (default 4, or 2 with --hash)")
    ap.add_argument("--hash", action="store_true",
                    help="start at layer 2 so the slice begins with a hash-routed CSA layer")
    ap.add_argument("--experts", type=int, default=None, help="routed experts (default 256)")
    ap.add_argument("--expert-quant", choices=("mxfp4", "affine"), default="mxfp4",
                    help="routed experts as mxfp4 g32 (q4 recipe, default) or affine 4-bit g64")
    ap.add_argument("--scale-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                    help="affine scales/biases, hence activations: bfloat16 as the converter "
                         "writes (default); float32 only to make CPU runs ~7x faster")
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens before decode")
    ap.add_argument("--steps", type=int, default=50, help="timed decode steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed decode steps first")
    ap.add_argument("--chunks", type=int, nargs="*", default=[256, 512, 1024, 2048],
                    help="prefill chunk sizes for the memory phase (none to skip)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per prefill chunk")
    ap.add_argument("--context", type=int, nargs="*", default=[],
                    help="context lengths for decode-vs-context (filled directly)")
    ap.add_argument("--ref-ms", type=float, default=0.435,
                    help="per-layer reference floor in ms (brief: H100 weight reads)")
    ap.add_argument("--bandwidth", type=float, default=4.3e12,
                    help="device bandwidth in B/s for the bytes floor (H200 copy ~4.3e12)")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None,
                    help="JSON path (default $OUT/flash_layers.json when $OUT is set)")
    a = ap.parse_args()
    if a.start is None:
        a.start = 2 if a.hash else 4
    if a.out is None and os.environ.get("OUT"):
        a.out = os.path.join(os.environ["OUT"], "flash_layers.json")

    import mlx_lm

    info = {}
    try:
        info = mx.device_info()
    except Exception as e:  # older mlx
        info = {"error": str(e)}
    log(f"device {mx.default_device()}  mlx {mx.__version__}  mlx-lm {mlx_lm.__version__}  "
        f"python {platform.python_version()}")
    log(f"device_info {info}")
    res = {"argv": sys.argv[1:], "device": str(mx.default_device()), "mlx": mx.__version__,
           "mlx_lm": mlx_lm.__version__, "device_info": info, "args": vars(a)}

    config = sliced_config(a.layers, a.start, a.experts)
    args = ModelArgs.from_dict(config)
    t = time.perf_counter()
    model, quant = build(config, a.expert_quant, a.seed, getattr(mx, a.scale_dtype))
    check_layout(model, quant)
    build_s = time.perf_counter() - t
    try:
        smoke(model, args)
    except Exception as e:  # e.g. a backend without mxfp4 gather_qmm: measure something anyway
        if a.expert_quant == "affine":
            raise
        log(f"WARNING: a forward pass with mxfp4 experts failed ({type(e).__name__}: {e}); "
            "rebuilding with affine 4-bit g64 experts")
        res["expert_quant_fallback"] = f"{type(e).__name__}: {e}"
        del model
        mx.clear_cache()
        a.expert_quant = "affine"
        t = time.perf_counter()
        model, quant = build(config, a.expert_quant, a.seed, getattr(mx, a.scale_dtype))
        check_layout(model, quant)
        build_s = time.perf_counter() - t
        smoke(model, args)
    W = nbytes(model)
    per_layer = [nbytes(l) for l in model.layers]
    rest = W - sum(per_layer)
    res["model"] = {
        "layers": [{"layer": a.start + i, "kind": args.attention_kind(i),
                    "hash": args.is_hash_layer(i), "bytes": b} for i, b in enumerate(per_layer)],
        "experts": args.n_routed_experts, "expert_quant": a.expert_quant,
        "weight_bytes": W, "embed_head_bytes": rest, "build_s": build_s,
        "active_after_build": mx.get_active_memory(),
    }
    log(f"model: layers {a.start}..{a.start + a.layers - 1} = "
        f"{[k + ('+hash' if args.is_hash_layer(i) else '') for i, k in enumerate(args.layer_kinds)]}, "
        f"{args.n_routed_experts} experts ({a.expert_quant}), q4 layout, activations {model.dtype}")
    log(f"weights {W / GB:.2f} GB (layers {', '.join(f'{b / GB:.2f}' for b in per_layer)} GB; "
        f"embed+head+rest {rest / GB:.2f} GB), built in {build_s:.1f} s")
    write(a, res)

    phases = []
    if not a.skip_decode:
        phases.append(lambda: phase_decode(model, args, a, res))
    if a.chunks:
        phases.append(lambda: phase_prefill(model, args, a, res, W))
    if a.context:
        phases.append(lambda: phase_context(model, args, a, res))
    for phase in phases:
        t = time.perf_counter()
        phase()
        write(a, res)
        log(f"(phase {time.perf_counter() - t:.1f} s)")
    res["peak_memory_overall"] = mx.get_peak_memory()
    write(a, res)
    log(f"\nwrote {a.out}" if a.out else "")


if __name__ == "__main__":
    main()

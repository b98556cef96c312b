"""Decode step time against context length, on a model with Flash's attention shapes.

Four layers (CSA, HCA, CSA, HCA) with hidden 4096, 64 heads x 512, q_lora 1024, 8 output groups
of rank 1024, the real window (128), ratios (4, 128), 64 index heads x 128 and index top-k 512;
8 routed experts (mxfp4, top-6) so it fits a laptop. Random bf16 weights.

Prefilling 64K+ tokens through this model on a CPU takes far too long, so the pools are filled
directly: every layer's ring, compressed pool and index pool get ceil(T/m) random entries of the
right scale and the offsets are set to T, which is the state a prefill of T tokens leaves behind
(the content only changes which entries top-k picks, not the work). Then `--steps` decode steps
are timed and the median reported.

    python benchmarks/decode_context.py [--contexts 1024,8192,65536,262144] [--steps 8]
"""

from __future__ import annotations

import argparse
import math
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_dsv4.model.cache import make_cache
from mlx_dsv4.config import ModelArgs
from mlx_dsv4.model.model import Model, keep_float32
from mlx_dsv4.synthetic import tiny_config


def flash_shaped(layers: int = 4) -> ModelArgs:
    cfg = tiny_config(
        vocab_size=4096, hidden_size=4096, num_hidden_layers=layers, num_attention_heads=64,
        head_dim=512, qk_rope_head_dim=64, q_lora_rank=1024, o_groups=8, o_lora_rank=1024,
        n_routed_experts=8, num_experts_per_tok=6, moe_intermediate_size=2048, num_hash_layers=0,
        compress_ratios=[4, 128] * (layers // 2) + [0], index_n_heads=64, index_head_dim=128,
        index_topk=512, num_nextn_predict_layers=1)
    return ModelArgs.from_dict(cfg)


def build(args: ModelArgs) -> Model:
    model = Model(args)
    model.mtp = []  # MTP is not part of the decode step measured here
    rng = mx.random.key(0)
    params = []
    from mlx.utils import tree_flatten

    for name, p in tree_flatten(model.parameters()):
        rng, k = mx.random.split(rng)
        if p.dtype in (mx.int32, mx.uint32):
            params.append((name, p))
            continue
        fan_in = p.shape[-1] if p.ndim > 1 else 1
        w = mx.random.normal(p.shape, key=k) / math.sqrt(fan_in)
        if name.endswith("norm.weight"):
            w = mx.ones(p.shape)
        dtype = mx.float32 if keep_float32(name) else mx.bfloat16
        params.append((name, w.astype(dtype)))
    model.load_weights(params)
    nn.quantize(model, class_predicate=lambda p, _: {"group_size": 32, "bits": 4, "mode": "mxfp4"}
                if ".experts.w" in p else False)
    mx.eval(model.parameters())
    return model


def fill(cache, args: ModelArgs, T: int):
    """Leave the cache as a prefill of T tokens would (random entries, right shapes/scale)."""
    c = args.head_dim
    for layer in cache:
        layer.offset = T
        layer.window.keys = mx.random.normal(layer.window.keys.shape).astype(mx.bfloat16)
        for pool, width in ((layer.kv_pool, c), (layer.index_pool, args.index_head_dim)):
            if pool is None:
                continue
            n = T // layer.ratio
            pool.n = 0
            for s in range(0, n, 16384):  # in pieces, so filling needs no T-sized temporaries
                k = min(16384, n - s)
                pool.append(mx.random.normal((1, k, width)).astype(mx.bfloat16))
                mx.eval(pool.arrays)
    mx.eval([l.state for l in cache])


def time_decode(model, cache, steps: int) -> float:
    tok = mx.array([[7]])
    times = []
    for _ in range(steps + 2):
        t = time.perf_counter()
        mx.eval(model(tok, cache, last_only=True))
        times.append(time.perf_counter() - t)
    return float(np.median(times[2:]))


def time_attention(model, cache, kind: str, steps: int) -> float:
    """Median time of one layer's attention alone (its projections, pools and scoring)."""
    i = model.args.layer_kinds.index(kind)
    layer, c = model.layers[i], cache[i]
    x = mx.random.normal((1, 1, model.args.hidden_size)).astype(mx.bfloat16)
    times = []
    for _ in range(steps + 2):
        t = time.perf_counter()
        mx.eval(layer.attn(x, c))
        times.append(time.perf_counter() - t)
    return float(np.median(times[2:]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="1024,8192,65536,262144")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--kv-bits", type=int, default=None)
    a = ap.parse_args()
    args = flash_shaped()
    model = build(args)
    print(f"device: {mx.default_device()}, layers: {args.layer_kinds}, kv_bits: {a.kv_bits}")
    print(f"{'context':>9} {'ms/step':>9} {'x 1K':>6} {'CSA attn ms':>12} {'HCA attn ms':>12} "
          f"{'pool MiB':>10} {'spec MiB':>10}")
    base = None
    for T in [int(x) for x in a.contexts.split(",")]:
        cache = make_cache(model, max_tokens=T + 64, kv_bits=a.kv_bits)
        fill(cache, args, T)
        dt = time_decode(model, cache, a.steps)
        csa = time_attention(model, cache, "csa", a.steps)
        hca = time_attention(model, cache, "hca", a.steps)
        base = base or dt
        pools = sum(p.nbytes for l in cache for p in (l.kv_pool, l.index_pool) if p is not None)
        # Spec §5.1 arithmetic for these layers: CSA 320 B/token, HCA 8 B/token (bf16).
        per_token = {"csa": 320, "hca": 8, "sliding": 0}
        spec = sum(per_token[k] for k in args.layer_kinds) * (T + 64)
        if a.kv_bits == 8:
            spec = spec * 544 // 1024
        print(f"{T:>9,} {dt * 1e3:>9.1f} {dt / base:>6.2f} {csa * 1e3:>12.1f} {hca * 1e3:>12.1f} "
              f"{pools / 2**20:>10.1f} {spec / 2**20:>10.1f}")
        del cache
        mx.clear_cache()


if __name__ == "__main__":
    main()

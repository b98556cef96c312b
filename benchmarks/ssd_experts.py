"""Decode speed with routed experts streamed from disk, at several expert-cache sizes.

Writes a converted directory of DeepSeek-V4-Flash shape with only `--layers` trunk layers (random
weights laid out as `dsv4 convert --recipe q4` writes them, built by benchmarks/flash_layers.py;
each expert is Flash's own, 2048 x 4096 mxfp4, 13.4 MB; `--experts` routed experts per layer),
then for each `--shares` (the expert cache as a share of all routed experts) loads it with
`load_model(expert_memory=...)`, prefills `--prompt` tokens and times `--steps` greedy decode
steps after `--warmup`. Reported per cache size: tok/s, expert hit rate, bytes read from disk per
token, and the fully resident model (compiled decode) as the reference. On Linux the store drops
each read's pages from the page cache (macOS: F_NOCACHE), so reads go to the disk as far as the
OS is concerned; a VM's host may still cache them.

    python benchmarks/ssd_experts.py --layers 2 --experts 64 --steps 12    # CPU, a few minutes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).parent))

from flash_layers import build, sliced_config  # noqa: E402

from mlx_dsv4.model.cache import make_cache  # noqa: E402
from mlx_dsv4.model.experts_stream import ExpertStore  # noqa: E402
from mlx_dsv4.model.weights import load_model, shard_files  # noqa: E402


def write_checkpoint(path: Path, a) -> None:
    config = sliced_config(a.layers, a.start, a.experts)
    model, quant = build(config, scale_dtype=mx.float32 if a.cpu_scales else mx.bfloat16)
    params = dict(tree_flatten(model.parameters()))
    del model
    shards, weight_map = {}, {}
    for name, v in params.items():  # one shard per layer, as a real conversion spreads them
        part = name.split(".")[1] if name.startswith("layers.") else "rest"
        shards.setdefault(part, {})[name] = v
    for i, (part, tensors) in enumerate(sorted(shards.items())):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(path / fname), tensors, metadata={"format": "mlx"})
        weight_map.update({n: fname for n in tensors})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(dict(config, quantization=quant)))


def run(path: Path, a, expert_memory: int | None) -> dict:
    model = load_model(path, expert_memory=expert_memory, prefetch=a.prefetch)
    store = getattr(model, "expert_store", None)
    vocab = model.args.vocab_size
    cache = make_cache(model, max_tokens=a.prompt + a.warmup + a.steps + 1)
    prompt = mx.random.randint(2, vocab, (1, a.prompt), key=mx.random.key(1))
    tok = mx.argmax(model(prompt, cache, last_only=True)[:, -1:], axis=-1)
    mx.eval(tok)
    for _ in range(a.warmup):
        tok = mx.argmax(model(tok, cache), axis=-1)
        mx.eval(tok)
    before = store.counters.copy() if store else None
    t = time.perf_counter()
    for _ in range(a.steps):
        tok = mx.argmax(model(tok, cache), axis=-1)
        mx.eval(tok)
    seconds = time.perf_counter() - t
    out = {"tok_s": a.steps / seconds, "ms_per_token": 1e3 * seconds / a.steps}
    if store:
        c = store.counters.since(before)
        out.update(expert_memory=expert_memory, hit_rate=c.hit_rate, hits=c.hits, misses=c.misses,
                   read_ahead=c.prefetched, bytes_per_token=c.bytes_read / a.steps,
                   resident_expert_bytes=store.resident_bytes)
        store.close()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--start", type=int, default=4, help="first layer of Flash's schedule to take")
    p.add_argument("--experts", type=int, default=64, help="routed experts per layer (Flash: 256)")
    p.add_argument("--shares", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--dir", type=Path, help="where to write the checkpoint (default: a temp dir)")
    p.add_argument("--prefetch", action="store_true", help="read the next layer's guessed experts ahead")
    p.add_argument("--cpu-scales", action="store_true", help="fp32 affine scales (fast on a CPU)")
    p.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) / "ssd_experts.json"
                   if os.environ.get("OUT") else None)
    a = p.parse_args()
    tmp = None if a.dir else tempfile.TemporaryDirectory(prefix="dsv4-ssd-")
    path = a.dir or Path(tmp.name)
    path.mkdir(parents=True, exist_ok=True)
    if not (path / "config.json").exists():
        t = time.perf_counter()
        write_checkpoint(path, a)
        print(f"wrote {path} in {time.perf_counter() - t:.0f} s", flush=True)
    res = {"device": str(mx.default_device()), "layers": a.layers, "experts": a.experts,
           "steps": a.steps, "prefetch": a.prefetch, "runs": {}}
    store = ExpertStore(path, shard_files(path), budget=0)
    one = store.expert_bytes("layers.0")
    total = sum(store.expert_bytes(k) * layer.experts for k, layer in store.layers.items())
    store.close()
    res.update(expert_bytes=one, all_expert_bytes=total,
               picks_bytes_per_token=one * 6 * a.layers)
    print(f"one expert {one / 1e6:.1f} MB, all experts {total / 1e9:.2f} GB, "
          f"a token's picks {one * 6 * a.layers / 1e6:.0f} MB", flush=True)
    runs = [("resident", None)] + [(f"{s:.0%}", int(s * total)) for s in a.shares]
    for name, budget in runs:
        r = run(path, a, budget)
        res["runs"][name] = r
        extra = (f"  hits {r['hit_rate']:.0%} ({r['read_ahead']} read ahead)  "
                 f"read {r['bytes_per_token'] / 1e6:.1f} MB/token"
                 if budget is not None else "")
        print(f"{name:>9}: {r['tok_s']:.2f} tok/s ({r['ms_per_token']:.0f} ms/token){extra}", flush=True)
        if a.out:
            a.out.write_text(json.dumps(res, indent=1))
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()

"""Resident memory of a V4.1 model against the size of its Engram tables (they stay on disk).

Writes a tiny V4.1 checkpoint (synthetic.tiny_v41_config) twice, once with its own small
Engram tables and once with tables grown to `--gib` each (sparse files: zeros, no disk used,
synthetic.sparse_engram_source), converts both, and in a fresh process per model loads it,
prefills `--prompt` tokens and decodes `--steps` tokens. Reported per model: the tables' bytes,
the converter's peak RSS, and the runtime's RSS after loading, after generating, and its peak
(ru_maxrss). If any step loaded, mapped or copied a table, the large model's figures would be
larger by about the table size; they are not.

    python benchmarks/engram_rss.py --gib 2        # about a minute on a laptop CPU
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys
import mlx.core as mx
import numpy as np

def rss():
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
    except OSError:
        return None

def peak():
    p = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return p if sys.platform == "darwin" else p * 1024

path, prompt, steps, what = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
out = {"start": rss()}
if what == "convert":
    from mlx_dsv4.convert import convert
    convert(path, sys.argv[5], recipe="q4")
else:
    from mlx_dsv4.model.weights import load_model
    from mlx_dsv4.model.cache import make_cache
    model = load_model(path)
    out["loaded"] = rss()
    cache = make_cache(model)
    ids = np.random.default_rng(0).integers(3, model.args.vocab_size, (1, prompt + steps))
    logits = model(mx.array(ids[:, :prompt]), cache, last_only=True)
    mx.eval(logits)
    for t in range(prompt, prompt + steps):
        mx.eval(model(mx.array(ids[:, t : t + 1]), cache))
    out["generated"] = rss()
out["peak"] = peak()
print(json.dumps(out))
mx.clear_streams()
"""


def child(*args) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{args[3]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(root: Path, vocab: int | None, prompt: int, steps: int) -> dict:
    from mlx_dsv4.synthetic import sparse_engram_source, tiny_v41_config, write_official_checkpoint

    src = write_official_checkpoint(root / "src", tiny_v41_config(), shards=2)
    if vocab:
        sparse_engram_source(src, vocab)
    conv = child(src, 0, 0, "convert", root / "out")
    run = child(root / "out", prompt, steps, "run")
    tables = sum(f.stat().st_size for f in (root / "out" / "engram").iterdir())
    return {"table_bytes": tables, "convert_peak": conv["peak"], **run}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, default=2.0, help="size of each large table, GiB")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    a = ap.parse_args()
    # rows per table ~ 6 * vocab (3 n-gram sizes x 2 heads), 33 bytes a row at head_dim 32
    vocab = int(a.gib * 2**30 / 33 / 6)
    mb = lambda n: f"{n / 2**20:,.0f} MiB" if n is not None else "n/a"  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        rows = {}
        for name, v in (("small tables", None), (f"{a.gib:g} GiB tables", vocab)):
            (Path(tmp) / name).mkdir()
            rows[name] = measure(Path(tmp) / name, v, a.prompt, a.steps)
    print(f"{'':>18} {'tables':>12} {'convert peak':>13} {'after load':>11} {'after gen':>11} {'peak':>9}")
    for name, r in rows.items():
        print(f"{name:>18} {mb(r['table_bytes']):>12} {mb(r['convert_peak']):>13} {mb(r['loaded']):>11} "
              f"{mb(r['generated']):>11} {mb(r['peak']):>9}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()

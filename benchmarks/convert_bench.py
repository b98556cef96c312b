"""Benchmark `dsv4 convert` on a multi-GB synthetic checkpoint with Flash-sized layers.

Writes an official-format checkpoint whose every tensor has Flash's shape (vocab 129,280, hidden
4,096, 64 heads of 512, 2,048-wide experts) but with few layers and experts, so it fits in a few
GB, then prints:
- conversion throughput (source MB/s) next to a plain sequential read of the same shards and a
  plain copy of them (read + write + fsync, the floor for anything that writes its output), and
- peak resident memory of the converting process (over its interpreter + MLX baseline) against
  the largest source shard (the issue's bound is 3x).
Source pages are dropped from the page cache (posix_fadvise) before each timed pass, so both
passes read from disk. Not a test: run `python benchmarks/convert_bench.py [--dir /tmp/...]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mlx_dsv4.synthetic import write_official_checkpoint

FLASH = Path(__file__).resolve().parents[1] / "mlx_dsv4" / "configs" / "flash.json"

PROBE = """
import json, resource, sys, time
import mlx.core as mx
from mlx_dsv4.convert import convert
mx.eval(mx.ones(4) + 1)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
convert(sys.argv[1], sys.argv[2], recipe=sys.argv[3])
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"base": base, "peak": peak, "seconds": seconds}))
"""


def flash_sized(layers: int, experts: int) -> dict:
    config = json.loads(FLASH.read_text())
    ratios = config["compress_ratios"]
    # Keep one sliding, one CSA and one HCA layer at least; the MTP block's ratio comes last.
    config.update(num_hidden_layers=layers, n_routed_experts=experts, num_hash_layers=1,
                  compress_ratios=[0, 4, 128, 4, 128, 4, 128][:layers] + [ratios[-1]])
    return config


def drop_cache(files) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(files) -> float:
    drop_cache(files)
    buf = bytearray(1 << 24)
    t = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - t


def raw_copy(files, into: Path) -> float:
    """Read and write the same bytes (fsync'd): the I/O floor of any converter on this disk."""
    drop_cache(files)
    into.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    for f in files:
        with open(f, "rb") as src, open(into / f.name, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 24)
            dst.flush()
            os.fsync(dst.fileno())
    seconds = time.perf_counter() - t
    shutil.rmtree(into)
    return seconds


def run_convert(src: Path, out: Path, recipe: str, files) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    drop_cache(files)
    # Through sh: a child exec'd straight from this process would start with its ru_maxrss
    # (Linux keeps the exec'ing process's high-water mark), which writing the checkpoint raised.
    run = subprocess.run(["/bin/sh", "-c", '"$@"; exit $?', "sh", sys.executable, "-c", PROBE,
                          str(src), str(out), recipe], capture_output=True, text=True, check=True)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    result["out_bytes"] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    shutil.rmtree(out)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/dsv4-convert-bench"))
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--recipes", default="q4,native")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    opts = ap.parse_args()

    src = opts.dir / "official"
    if not (src / "config.json").exists():
        t = time.perf_counter()
        write_official_checkpoint(src, flash_sized(opts.layers, opts.experts), shards=opts.shards,
                                  extras=False)
        print(f"wrote synthetic checkpoint in {time.perf_counter() - t:.0f} s")
    files = sorted(src.glob("*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    largest = max(f.stat().st_size for f in files)
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB")
    print(f"source: {len(files)} shards, {total / 1e9:.2f} GB, largest {largest / 1e9:.2f} GB")
    seconds = raw_read(files)
    print(f"sequential read      {total / 1e6 / seconds:8.0f} MB/s  ({seconds:.1f} s)")
    seconds = raw_copy(files, opts.dir / "copy")
    print(f"sequential copy      {total / 1e6 / seconds:8.0f} MB/s  ({seconds:.1f} s)")
    for recipe in opts.recipes.split(","):
        r = run_convert(src, opts.dir / f"out-{recipe}", recipe, files)
        rss = (r["peak"] - r["base"]) * unit
        print(f"convert {recipe:<12} {total / 1e6 / r['seconds']:8.0f} MB/s  ({r['seconds']:.1f} s, "
              f"{r['out_bytes'] / 1e9:.2f} GB out); peak RSS {rss / 1e9:.2f} GB over a "
              f"{r['base'] * unit / 1e9:.2f} GB baseline = {rss / largest:.2f}x the largest shard")
    if not opts.keep:
        shutil.rmtree(opts.dir)


if __name__ == "__main__":
    main()

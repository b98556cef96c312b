"""Engram tables never occupy memory: a V4.1 model with 1 GiB tables (sparse files) converts,
loads and generates within the same peak RSS as one with tables of a few kilobytes.

Each run is a fresh process (its ru_maxrss is its own). If the converter or the runtime loaded,
mapped or copied a table, the large model's peak would be larger by about the table size.
benchmarks/engram_rss.py reports the figures at any size.
"""

import json
import subprocess
import sys

import pytest

from mlx_dsv4.synthetic import sparse_engram_source, tiny_v41_config, write_official_checkpoint

MiB, GiB = 1 << 20, 1 << 30
CHILD = r"""
import json, resource, sys
import mlx.core as mx
import numpy as np
src, out = sys.argv[1], sys.argv[2]
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
if sys.argv[3] == "convert":
    from mlx_dsv4.convert import convert
    convert(src, out, recipe="q4")
else:
    from mlx_dsv4.model.weights import load_model
    from mlx_dsv4.model.cache import make_cache
    model = load_model(out)
    cache = make_cache(model)
    ids = np.random.default_rng(0).integers(3, model.args.vocab_size, (1, 72))
    mx.eval(model(mx.array(ids[:, :64]), cache, last_only=True))
    for t in range(64, 72):
        mx.eval(model(mx.array(ids[:, t : t + 1]), cache))
print(json.dumps({"peak": peak()}))
mx.clear_streams()
"""


def peak(src, out, what: str) -> int:
    done = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), what],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["peak"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for name, vocab in (("small", None), ("large", GiB // 33 // 6)):  # ~1 GiB a table
        root = tmp_path_factory.mktemp(name)
        src = write_official_checkpoint(root / "src", tiny_v41_config(), shards=2)
        if vocab:
            sparse_engram_source(src, vocab)
        converted = peak(src, root / "out", "convert")
        tables = sum(f.stat().st_size for f in (root / "out" / "engram").iterdir())
        out[name] = {"tables": tables, "convert": converted, "run": peak(src, root / "out", "run")}
    return out


def test_runtime_memory_does_not_grow_with_the_tables(runs):
    small, large = runs["small"], runs["large"]
    print(f"tables {small['tables'] / MiB:.2f} MiB -> {large['tables'] / GiB:.2f} GiB; runtime peak "
          f"{small['run'] / MiB:.0f} -> {large['run'] / MiB:.0f} MiB; convert peak "
          f"{small['convert'] / MiB:.0f} -> {large['convert'] / MiB:.0f} MiB")
    assert large["tables"] - small["tables"] > 1.9 * GiB
    assert large["run"] - small["run"] < 32 * MiB


def test_the_converter_copies_tables_in_bounded_runs(runs):
    # Its runs of rows are CHUNK_BYTES (64 MiB): a few of those, not the 2 GiB of tables.
    assert runs["large"]["convert"] - runs["small"]["convert"] < 320 * MiB

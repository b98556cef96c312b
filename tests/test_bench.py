"""`dsv4 bench` on the selftest's tiny converted model: counts, phases and the memory report."""

import pytest
from typer.testing import CliRunner

from mlx_dsv4.bench import run_bench
from mlx_dsv4.cli import app


def test_bench_decodes_the_asked_tokens_and_reports_memory(selftest_model):
    r = run_bench(selftest_model, prompt_tokens=300, gen_tokens=12, prefill_chunk=128)
    assert (r.prompt_tokens, r.generated, r.prefill_chunk) == (300, 12, 128)
    assert r.prompt_tps > 0 and r.decode_tps > 0 and r.ms_per_token > 0
    assert r.plan.context == 312  # planned for exactly what it runs
    # Measured peak holds at least the weights the planner counted (read from the shard headers).
    assert r.peak_bytes >= r.plan.weight_bytes


def test_bench_refuses_nonsense_counts(selftest_model):
    with pytest.raises(ValueError, match="at least 1 prompt token and 2 generated"):
        run_bench(selftest_model, prompt_tokens=10, gen_tokens=1)


def test_bench_command_prints_both_phases(selftest_model):
    r = CliRunner().invoke(app, ["bench", str(selftest_model), "--prompt", "64", "--tokens", "4"])
    assert r.exit_code == 0, r.output
    for text in ("prefill (64 tokens", "decode (4 tokens)", "tok/s", "peak memory (measured)",
                 "planned total"):
        assert text in r.output

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


def test_bench_times_prefill_at_each_asked_prompt_size(selftest_model):
    r = run_bench(selftest_model, prompt_tokens=16, gen_tokens=2, prefill_chunk=64,
                  prompt_sizes=[100, 300])
    assert [p.tokens for p in r.prefill_sizes] == [100, 300]
    assert all(p.seconds > 0 and p.tps == p.tokens / p.seconds for p in r.prefill_sizes)
    assert r.plan.context == 300  # planned for the largest asked size, not the 18 tokens run first
    assert all(p.peak_bytes >= r.plan.weight_bytes for p in r.prefill_sizes)


def test_bench_prompt_sizes_option(selftest_model):
    r = CliRunner().invoke(app, ["bench", str(selftest_model), "--prompt", "8", "--tokens", "2",
                                 "--prompt-sizes", "32,96"])
    assert r.exit_code == 0, r.output
    assert "prefill alone (32 tokens)" in r.output and "prefill alone (96 tokens)" in r.output
    bad = CliRunner().invoke(app, ["bench", str(selftest_model), "--prompt-sizes", "2k,0"])
    assert bad.exit_code != 0 and "--prompt-sizes" in bad.output
    with pytest.raises(ValueError, match="at least 1 token"):
        run_bench(selftest_model, prompt_tokens=8, gen_tokens=2, prompt_sizes=[0])

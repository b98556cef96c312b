"""The `dsv4` command line: exit codes, tables and one-line errors, without a terminal."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from mlx_dsv4.cli import app
from mlx_dsv4.synthetic import tiny_config, write_official_checkpoint

runner = CliRunner()


def test_plan_flash_q4_at_one_million_tokens_fits_a_256gb_mac():
    r = runner.invoke(app, ["plan", "deepseek-ai/DeepSeek-V4-Flash", "--context", "1048576",
                            "--memory", "256GB", "--recipe", "q4"])
    assert r.exit_code == 0, r.output
    assert "145.35 GiB" in r.output  # q4 weights
    assert "6,880 B/token" in r.output  # spec §5.1
    assert "fits: 153.1 GiB of 230.4 GiB (77.3 GiB to spare)" in " ".join(r.output.split())


def test_plan_pro_says_what_it_needs_and_exits_2():
    r = runner.invoke(app, ["plan", "pro", "--memory", "256GB", "--recipe", "q4"])
    assert r.exit_code == 2
    assert "the weights alone need 794.6 GiB" in " ".join(r.output.split())


def test_plan_8bit_pools_halve_the_kv_bytes():
    r = runner.invoke(app, ["plan", "flash", "-c", "1048576", "--kv-bits", "8", "--memory", "256GB"])
    assert r.exit_code == 0 and "3,655 B/token" in r.output


def test_unknown_kv_bits_are_refused():
    r = runner.invoke(app, ["plan", "flash", "--kv-bits", "3"])
    assert r.exit_code == 2 and "only 8, or 4 for a V4.1 model, is supported" in " ".join(r.output.split())
    r = runner.invoke(app, ["plan", "flash", "--kv-bits", "4"])  # FP4 pools are V4.1's formats
    assert r.exit_code == 1 and "official FP4 formats; a V4 model takes" in " ".join(r.output.split())


def test_plan_of_a_missing_path_names_what_it_accepts(tmp_path):
    r = runner.invoke(app, ["plan", str(tmp_path / "nothing")])
    assert r.exit_code == 1
    assert "no config.json there" in r.output and "flash, pro" in " ".join(r.output.split())


def test_chat_on_an_unconverted_repo_prints_the_convert_command(tmp_path, monkeypatch):
    monkeypatch.setenv("DSV4_MODELS", str(tmp_path))
    r = runner.invoke(app, ["chat", "deepseek-ai/DeepSeek-V4-Flash"])
    assert r.exit_code == 1
    assert "dsv4 convert deepseek-ai/DeepSeek-V4-Flash" in r.output
    assert "Traceback" not in r.output


def test_serve_on_an_original_fp8_checkpoint_prints_the_convert_command(tmp_path):
    src = write_official_checkpoint(tmp_path / "orig", tiny_config(num_hidden_layers=1,
                                                                   compress_ratios=[0, 0]),
                                    shards=1, extras=False)
    r = runner.invoke(app, ["serve", str(src)])
    assert r.exit_code == 1
    assert f"dsv4 convert {src} {src}-mlx-attn4" in r.output


def test_version_is_the_installed_package_version():
    from importlib.metadata import version

    import mlx_dsv4

    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0, r.output
    assert r.output == f"mlx-dsv4 {version('mlx-dsv4')}\n" == f"mlx-dsv4 {mlx_dsv4.__version__}\n"


# Everything heavy is imported inside the commands: mlx_lm pulls transformers and torch (seconds),
# the server its web stack. `dsv4 --help` and the first line of every command must not wait.
HEAVY = ("mlx", "mlx_lm", "transformers", "torch", "fastapi", "uvicorn", "starlette",
         "sse_starlette", "prompt_toolkit", "numpy", "safetensors", "huggingface_hub", "tokenizers")


def test_importing_the_cli_and_its_help_import_nothing_heavy():
    code = ("import sys; from typer.testing import CliRunner; from mlx_dsv4.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "assert 'selftest' in r.output; "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("args,usage", [
    ([], "[OPTIONS] COMMAND [ARGS]..."), (["convert"], "[OPTIONS] SOURCE OUTPUT_DIR"),
    (["chat"], "[OPTIONS] MODEL"), (["serve"], "[OPTIONS] MODEL"), (["plan"], "[OPTIONS] MODEL"),
    (["bench"], "[OPTIONS] MODEL"), (["selftest"], "[OPTIONS]"),
])
def test_help_reads_cleanly(args, usage):
    r = runner.invoke(app, [*args, "--help"])
    assert r.exit_code == 0
    first = next(line for line in r.output.splitlines() if "Usage:" in line)
    assert first.rstrip().endswith(f" {usage}")
    assert "{" not in r.output and "<bool>" not in r.output
    assert "Show this message and exit." in " ".join(r.output.replace("│", " ").split())


# ----- bench's prefill progress --------------------------------------------------------------------

def test_prefill_line_says_tokens_rate_and_time_left():
    from mlx_dsv4.cli import prefill_line

    assert prefill_line(0, 2048, 0.0) == "0/2,048 tokens"
    assert prefill_line(1024, 2048, 2.0) == "1,024/2,048 tokens · 512 tok/s · 2 s left"
    assert prefill_line(10_000, 1_000_000, 100.0).endswith("100 tok/s · 2 h 45 min left")
    assert prefill_line(30_000, 100_000, 100.0).endswith("300 tok/s · 3 min 53 s left")


def test_bench_reports_prefill_progress(selftest_model):
    from mlx_dsv4.bench import run_bench

    calls = []
    run_bench(selftest_model, prompt_tokens=300, gen_tokens=2, prefill_chunk=128,
              progress=lambda done, total: calls.append((done, total)))
    assert calls == [(0, 300), (128, 300), (256, 300), (299, 300), (300, 300)]


def test_the_prefill_bar_draws_on_a_terminal_only():
    import io

    from rich.console import Console

    from mlx_dsv4.cli import _PrefillBar

    out = io.StringIO()
    with _PrefillBar(Console(file=out, force_terminal=False)) as report:
        assert report is None  # piped: nothing to draw
    out = io.StringIO()
    with _PrefillBar(Console(file=out, force_terminal=True, width=100)) as report:
        report(0, 2048)
        report(1024, 2048)
        report(2048, 2048)
    assert "prefill" in out.getvalue() and "/2,048 tokens" in out.getvalue()

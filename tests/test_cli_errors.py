"""What `dsv4` prints when something is wrong: one `Error:` line naming the path, exit 1 or 2.

Known failures (bad paths, corrupt configs, a checkpoint that is not V4, bad sizes) must never
show a traceback; a bug shows one line too, with DSV4_DEBUG=1 as the way to the traceback.
"""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlx_dsv4.cli import app
from mlx_dsv4.synthetic import tiny_config, write_official_checkpoint

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def one_line_error(args: list[str], code: int = 1, **kwargs) -> str:
    """The single `Error:` line a failing command prints; asserts exit code and no traceback."""
    r = runner.invoke(app, args, **kwargs)
    assert r.exit_code == code and isinstance(r.exception, SystemExit), (r.exception, r.output)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    cfg = tiny_config(num_hidden_layers=1, compress_ratios=[0, 0])
    return write_official_checkpoint(tmp_path_factory.mktemp("src"), cfg, shards=1, extras=False)


@pytest.fixture
def corrupt_model(tmp_path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "deepseek_v4",')
    return model


# ----- convert -------------------------------------------------------------------------------------

def test_convert_into_a_path_under_a_file(source, tmp_path):
    (tmp_path / "file").write_text("x")
    line = one_line_error(["convert", str(source), str(tmp_path / "file" / "sub")])
    assert line == (f"Error: Cannot create the output directory {tmp_path}/file/sub: "
                    f"{tmp_path}/file is a file.")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_convert_into_proc(source):
    assert "Cannot create the output directory /proc/xyz" in one_line_error(["convert", str(source),
                                                                             "/proc/xyz"])


def test_convert_onto_an_existing_file(source, tmp_path):
    (tmp_path / "out").write_text("x")
    assert f"{tmp_path}/out is a file" in one_line_error(["convert", str(source), str(tmp_path / "out")])


def test_convert_with_a_corrupt_source_config(source, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in source.iterdir():
        (src / f.name).symlink_to(f)
    (src / "config.json").unlink()
    (src / "config.json").write_text('{"model_type": ')
    line = one_line_error(["convert", str(src), str(tmp_path / "out")])
    assert line.startswith(f"Error: {src}/config.json is not valid JSON (Expecting value at line 1")
    assert not (tmp_path / "out").exists()


def test_convert_of_a_llama_checkpoint(tmp_path):
    src = tmp_path / "llama"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4096}))
    line = one_line_error(["convert", str(src), str(tmp_path / "out")])
    assert f"{src}/config.json: model_type 'llama' is not supported" in line


def test_convert_of_a_missing_source_and_into_itself(source, tmp_path):
    assert "'/no/such/checkpoint' is neither an existing directory" in one_line_error(
        ["convert", "/no/such/checkpoint", str(tmp_path / "out")])
    assert f"The output directory {source} is the source directory" in one_line_error(
        ["convert", str(source), str(source)])
    assert f"{source}/config.json is a file; give the checkpoint's directory" in one_line_error(
        ["convert", str(source / "config.json"), str(tmp_path / "out")])


def test_convert_on_a_full_disk_says_how_to_resume(source, tmp_path, monkeypatch):
    from mlx_dsv4.convert import shards

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "out" / "config.json.tmp"))

    monkeypatch.setattr(shards, "copy_extras", full)  # after every shard: while finishing
    line = one_line_error(["convert", str(source), str(tmp_path / "out")])
    assert f"{tmp_path}/out/config.json.tmp: No space left on device" in line
    assert "rerun the same command to resume" in line and "Errno" not in line
    monkeypatch.undo()
    assert runner.invoke(app, ["convert", str(source), str(tmp_path / "out")]).exit_code == 0


def test_convert_interrupted_says_how_to_resume(source, tmp_path, monkeypatch):
    from mlx_dsv4.convert import shards

    def stop(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(shards.ShardWriter, "write", stop)
    r = runner.invoke(app, ["convert", str(source), str(tmp_path / "out")])
    assert r.exit_code == 130 and isinstance(r.exception, SystemExit)
    assert r.stderr == "Interrupted: rerun the same command to resume.\n"


def test_bad_shard_size_is_a_usage_error(source, tmp_path):
    for size in ("0", "1.2.3GB", "lots"):
        r = runner.invoke(app, ["convert", str(source), str(tmp_path / "out"), "--shard-size", size])
        assert r.exit_code == 2 and "--shard-size" in r.output, r.output


# ----- chat, serve, bench, plan on a corrupt model directory ----------------------------------------

@pytest.mark.parametrize("cmd", ["chat", "serve", "bench", "plan"])
def test_commands_on_a_corrupt_config(cmd, corrupt_model):
    line = one_line_error([cmd, str(corrupt_model)])
    assert line.startswith(f"Error: {corrupt_model}/config.json is not valid JSON (")


def test_one_corrupt_model_does_not_break_lookup_by_repo_id(tmp_path, monkeypatch, caplog):
    from mlx_dsv4.model.weights import resolve_model

    (tmp_path / "a-broken").mkdir()
    (tmp_path / "a-broken" / "config.json").write_text("{")
    (tmp_path / "b-flash").mkdir()
    (tmp_path / "b-flash" / "config.json").write_text(json.dumps(
        {"mlx_dsv4": {"source": "deepseek-ai/DeepSeek-V4-Flash"}}))
    monkeypatch.setenv("DSV4_MODELS", str(tmp_path))
    assert resolve_model("deepseek-ai/DeepSeek-V4-Flash") == tmp_path / "b-flash"
    assert f"skipping {tmp_path / 'a-broken'}: {tmp_path}/a-broken/config.json is not valid JSON" \
        in caplog.text
    line = runner.invoke(app, ["chat", "deepseek-ai/DeepSeek-V4-Pro"]).stderr
    assert "has not been converted yet" in line and "Traceback" not in line


# ----- plan ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("context", ["0", "-5", "99999999999"])
def test_plan_refuses_contexts_outside_the_model(context):
    line = one_line_error(["plan", "flash", "--context", context])
    assert f"A context of {int(context):,} tokens is outside what flash supports (1 to 1,048,576)" in line


@pytest.mark.parametrize("args,message", [
    (["--context", "abc"], "'--context'"),
    (["--memory", "12XB"], "'12XB' is not a size like 256GB"),
    (["--memory", "0"], "'0' is not a positive size"),
    (["--prefill-chunk", "0"], "'--prefill-chunk'"),
])
def test_plan_usage_errors_exit_2(args, message):
    r = runner.invoke(app, ["plan", "flash", *args])
    assert r.exit_code == 2 and message in " ".join(r.output.split()), r.output


def test_plan_of_a_nonsense_model_names_what_it_accepts():
    line = one_line_error(["plan", "no-such-model"])
    assert "no-such-model: no config.json there" in line


def test_chat_refuses_a_zero_context():
    r = runner.invoke(app, ["chat", "anything", "--max-context", "0"])
    assert r.exit_code == 2 and "--max-context" in r.output


@pytest.mark.parametrize("args,message", [
    (["--cors-origin", "*"], "lets every web page"),
    (["--cors-origin", "localhost:3000/app"], "'localhost:3000/app' is not an origin"),
    (["--cors-origin", "http://localhost:3000/chat"], "no path"),
])
def test_serve_refuses_a_cors_origin_that_is_not_one_page(args, message):
    r = runner.invoke(app, ["serve", "anything", *args])
    assert r.exit_code == 2 and message in " ".join(r.output.split()), r.output


# ----- unexpected errors ---------------------------------------------------------------------------

def test_a_bug_prints_one_line_unless_debugging(monkeypatch):
    import mlx_dsv4.plan

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(mlx_dsv4.plan, "plan_memory", boom)
    line = one_line_error(["plan", "flash"])
    assert line == "Error: RuntimeError: boom (unexpected; rerun with DSV4_DEBUG=1 for the traceback)"
    r = runner.invoke(app, ["plan", "flash"], env={"DSV4_DEBUG": "1"})
    assert isinstance(r.exception, RuntimeError)


def test_no_traceback_from_the_real_command(tmp_path, corrupt_model):
    # Through the console script's code path, not the test runner: stderr is exactly one line.
    run = subprocess.run([sys.executable, "-m", "mlx_dsv4.cli", "plan", str(corrupt_model)],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith(f"Error: {corrupt_model}/config.json is not valid JSON (")

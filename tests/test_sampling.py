"""Our sampler and logits processors against mlx-lm's, which they replace on the import path."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import sample_utils as ref

from mlx_dsv4.generation.sampling import make_logits_processors, make_sampler


def logprobs(seed: int, vocab: int = 97) -> mx.array:
    logits = mx.array(np.random.default_rng(seed).normal(0, 3, (1, vocab)).astype(np.float32))
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


@pytest.mark.parametrize("kw", [dict(temperature=0.7), dict(temperature=1.0, top_p=0.9),
                                dict(temperature=0.8, min_p=0.05), dict(temperature=1.2, top_k=5),
                                dict(temperature=1.0, top_p=0.5, min_p=0.1, top_k=20)])
def test_sampler_draws_what_mlx_lm_draws_for_the_same_seed(kw):
    ours = make_sampler(**kw)
    theirs = ref.make_sampler(kw["temperature"], top_p=kw.get("top_p", 0.0),
                              min_p=kw.get("min_p", 0.0), top_k=kw.get("top_k", 0))
    for seed in range(20):
        lp = logprobs(seed)
        mx.random.seed(seed)
        a = ours(lp).item()
        mx.random.seed(seed)
        assert a == theirs(lp).item()


def test_filters_keep_exactly_the_allowed_tokens():
    lp = mx.log(mx.array([[0.5, 0.3, 0.15, 0.05]]))
    seen = set()
    sample = make_sampler(1.0, top_p=0.8)
    for seed in range(200):
        mx.random.seed(seed)
        seen.add(sample(lp).item())
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.8
    sample = make_sampler(1.0, top_k=3)
    assert {sample(lp).item() for _ in range(200)} == {0, 1, 2}
    sample = make_sampler(1.0, min_p=0.5)  # keeps p >= 0.25
    assert {sample(lp).item() for _ in range(200)} == {0, 1}


def test_greedy_and_refusals():
    lp = logprobs(3)
    assert make_sampler(0.0)(lp).item() == int(np.argmax(np.array(lp)))
    for bad in (dict(temperature=-1), dict(temperature=float("nan")), dict(temperature=1, min_p=2),
                dict(temperature=1, top_k=-1)):
        with pytest.raises(ValueError):
            make_sampler(**bad)


def test_a_temperature_too_small_to_divide_by_is_greedy():
    """Issue 21: 1/1e-300 overflows float32, and every scaled logit became -inf."""
    from mlx_dsv4.generation.sampling import make_distribution

    for seed in range(10):
        lp = logprobs(seed)
        best = int(np.argmax(np.array(lp)))
        for t in (1e-300, 5e-324, 1e-7):
            assert make_sampler(t, seed=seed)(lp).item() == best
            p = np.array(make_distribution(t)(lp))
            assert np.isfinite(p).all() and p[0, best] == 1.0


@pytest.mark.parametrize("kw", [dict(logit_bias={3: 5.0, 7: -2.0}), dict(repetition_penalty=1.7),
                                dict(presence_penalty=0.8), dict(frequency_penalty=0.6),
                                dict(repetition_penalty=1.3, presence_penalty=0.5,
                                     frequency_penalty=0.25, logit_bias={0: 1.0})])
def test_processors_match_mlx_lm(kw):
    tokens = mx.array([3, 5, 3, 9, 3, 11, 5] * 5)  # repeats, longer than the 20-token context
    logits = mx.array(np.random.default_rng(0).normal(0, 2, (1, 32)).astype(np.float32))
    before = np.array(logits)
    a, b = logits, mx.array(before)  # the penalties assign into their input
    for p in make_logits_processors(**kw):
        a = p(tokens, a)
    for p in ref.make_logits_processors(**kw):
        b = p(tokens, b)
    assert not np.allclose(np.array(a), before)
    np.testing.assert_allclose(np.array(a), np.array(b), rtol=0, atol=1e-6)


def test_a_seeded_sampler_draws_as_the_global_seed_would_whatever_draws_between():
    logprobs = mx.log(mx.softmax(mx.array(np.random.default_rng(1).normal(0, 1, (1, 50)),
                                          mx.float32), axis=-1))
    mx.random.seed(7)
    alone = [make_sampler(0.9, top_p=0.95)(logprobs).item() for _ in range(12)]
    own = make_sampler(0.9, top_p=0.95, seed=7)
    mx.random.seed(123)
    interleaved = []
    for _ in range(12):
        mx.random.categorical(logprobs)  # another request's draw in the same batch
        interleaved.append(own(logprobs).item())
    assert interleaved == alone
    assert len(set(alone)) > 1  # sampled, not greedy

"""Speculative decoding (speculative.py): greedy output identical to plain decoding, exact
rollback after refusals and early stops, and the sampled distribution unchanged."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_dsv4.model.cache import make_cache
from mlx_dsv4.generation.generate import generate_step
from mlx_dsv4.generation.sampling import make_distribution
from mlx_dsv4.generation.speculative import MTPDrafter, SpecStats, speculative_step

GREEDY = make_distribution(0.0)


def plain(model, ids, n):
    return [t for t, _ in generate_step(model, ids, make_cache(model), max_tokens=n)]


def spec(model, ids, n, drafter, k, stats=None, distribution=GREEDY):
    cache = make_cache(model)
    out = [t for t, _ in speculative_step(model, ids, cache, drafter, distribution=distribution,
                                          draft=k, max_tokens=n, stats=stats)]
    return out, cache


class ScriptDrafter:
    """Proposes the given continuation (one-hot), wrong at the script indices `wrong` names."""

    def __init__(self, script, prompt_len, vocab, wrong=lambda j: False):
        self.script, self.vocab, self.wrong = script, vocab, wrong
        # Tokens the generator has committed before the current y0: each round's y0 reaches
        # the drafter in draft(), the rest of the round's tokens through observe().
        self.observed, self.calls = -(prompt_len - 1), 0

    def observe(self, streams, next_ids):
        self.observed += len(next_ids)

    def draft(self, streams, y0, k, distribution):
        g = self.observed + self.calls  # script index of y0
        assert self.script[g] == y0
        self.calls += 1
        out = []
        for i in range(1, k + 1):
            j = g + i
            t = self.script[j] if j < len(self.script) else 0
            t = (t + 1) % self.vocab if self.wrong(j) else t
            out.append((t, (mx.arange(self.vocab) == t).astype(mx.float32)))
        return out


@pytest.fixture(scope="module")
def prompt(token_ids):
    return token_ids[0, :100].tolist()


@pytest.fixture(scope="module")
def reference(tiny_model, prompt):
    return plain(tiny_model, prompt, 300)


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_with_the_mtp_drafter_equals_plain_decoding(tiny_model, prompt, reference, k):
    """300 tokens from position 100: windows close at every 4 and at 128, 256, 384."""
    stats = SpecStats()
    out, cache = spec(tiny_model, prompt, 300, MTPDrafter(tiny_model), k, stats)
    assert out == reference
    assert cache[0].offset == len(prompt) + 300
    assert stats.drafted > 0


@pytest.mark.parametrize("k", [1, 2, 4])
def test_an_oracle_drafter_is_always_accepted(tiny_model, prompt, reference, k):
    stats = SpecStats()
    drafter = ScriptDrafter(reference, len(prompt), tiny_model.args.vocab_size)
    out, _ = spec(tiny_model, prompt, 300, drafter, k, stats)
    assert out == reference
    assert stats.accepted == stats.drafted > 0
    # One trunk forward per k+1 generated tokens (prefill not counted).
    assert stats.forwards == math.ceil(300 / (k + 1))


def test_partial_acceptance_rolls_back_exactly(tiny_model, prompt, reference):
    stats = SpecStats()
    drafter = ScriptDrafter(reference, len(prompt), tiny_model.args.vocab_size,
                            wrong=lambda j: j % 3 == 2)
    out, cache = spec(tiny_model, prompt, 300, drafter, 3, stats)
    assert out == reference
    assert 0 < stats.accepted < stats.drafted
    # The state is that of sequential decoding: one more token gives a fresh run's logits.
    ref_cache = make_cache(tiny_model)
    tiny_model(mx.array(prompt + reference)[None], ref_cache)
    np.testing.assert_allclose(np.array(tiny_model(mx.array([[7]]), cache)),
                               np.array(tiny_model(mx.array([[7]]), ref_cache)), atol=2e-5)


def test_a_consumer_that_stops_mid_round_leaves_the_cache_at_what_it_saw(tiny_model, prompt,
                                                                         reference):
    drafter = ScriptDrafter(reference, len(prompt), tiny_model.args.vocab_size)
    cache = make_cache(tiny_model)
    steps = speculative_step(tiny_model, prompt, cache, drafter, distribution=GREEDY, draft=4,
                             max_tokens=50)
    seen = [next(steps)[0] for _ in range(7)]  # a round commits 5: stop inside the second
    steps.close()
    assert seen == reference[:7]
    assert cache[0].offset == len(prompt) + 7  # every handed-out token, nothing more
    # ... and decoding on from there continues the reference exactly.
    rest = [t for t, _ in generate_step(tiny_model, reference[7:8], cache, max_tokens=5)]
    assert rest == reference[8:13]


def test_sampling_keeps_the_target_distribution(tiny_model, prompt):
    """The second sampled token's marginal, speculative (random MTP drafts, mostly refused)
    against plain sampling: a chi-square test on fixed seeds (deterministic, so not flaky)."""
    from mlx_dsv4.generation.sampling import make_sampler

    ids = prompt[:12]
    kw = dict(temperature=1.0, top_k=3)
    dist, sampler = make_distribution(**kw), make_sampler(**kw)
    runs = 300
    a, b = [], []
    stats = SpecStats()
    for seed in range(runs):
        mx.random.seed(seed)
        a.append([t for t, _ in generate_step(tiny_model, ids, make_cache(tiny_model),
                                              sampler=sampler, max_tokens=2)][1])
        mx.random.seed(10_000 + seed)
        b.append(spec(tiny_model, ids, 2, MTPDrafter(tiny_model), 1, stats, dist)[0][1])
    assert stats.accepted < stats.drafted  # refusals happened, so the residual path ran
    values = sorted(set(a) | set(b))
    table = np.array([[a.count(v) for v in values], [b.count(v) for v in values]], float)
    expected = table.sum(0) * table.sum(1)[:, None] / table.sum()
    keep = expected.min(0) >= 5  # chi-square needs enough counts per cell; pool the rest
    cols = np.concatenate([table[:, keep], table[:, ~keep].sum(1, keepdims=True)], axis=1)
    exp = cols.sum(0) * cols.sum(1)[:, None] / cols.sum()
    chi2 = float(((cols - exp) ** 2 / np.maximum(exp, 1e-9)).sum())
    dof = cols.shape[1] - 1
    # p > 0.001 for chi-square with dof degrees of freedom (Wilson-Hilferty approximation).
    z = ((chi2 / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    assert z < 3.09, f"chi2 {chi2:.1f} on {dof} dof: {table}"


def test_verify_draft_turns_any_draft_distribution_into_the_target():
    """Draft from q, keep or replace: the result is distributed as p (exact sums, then draws)."""
    from mlx_dsv4.generation.speculative import verify_draft

    p = mx.array([0.5, 0.3, 0.15, 0.05, 0.0])
    q = mx.array([0.1, 0.2, 0.2, 0.1, 0.4])
    mx.random.seed(0)
    n = 4000
    counts = np.zeros(5)
    for _ in range(n):
        d = int(mx.random.categorical(mx.log(q)).item())
        r = verify_draft(p, q, d)
        counts[d if r is None else r] += 1
    freq = counts / n
    sigma = np.sqrt(np.array(p) * (1 - np.array(p)) / n)
    assert counts[4] == 0  # p gives it nothing; only a wrong rule would emit it
    assert np.all(np.abs(freq - np.array(p)) < 4 * sigma + 1e-9), freq


def test_a_speculative_session_matches_a_plain_one_turn_after_turn(tiny_model, token_ids):
    """Prefix reuse, early stops (EOS, max_tokens) and snapshots hold with drafting on."""
    from fakes import ByteTokenizer
    from mlx_dsv4.generation.session import Session

    runs = []
    for draft in (0, 2):
        s = Session(tiny_model, ByteTokenizer(), prefill_chunk=64, draft=draft)
        ids, out = token_ids[0, :90].tolist(), []
        for turn in range(3):
            chunks = list(s.generate(ids, max_tokens=7 + turn))
            reply = [c.token for c in chunks]
            out.append((reply, chunks[-1].reused_tokens, chunks[-1].acceptance is not None))
            ids = ids + reply + token_ids[0, 300 + 10 * turn : 305 + 10 * turn].tolist()
        assert s.cache[0].offset == len(s.tokens)
        runs.append(out)
    assert [(r, u) for r, u, _ in runs[0]] == [(r, u) for r, u, _ in runs[1]]
    assert [a for *_, a in runs[1]] == [True] * 3 and [a for *_, a in runs[0]] == [False] * 3


def test_drafting_is_on_by_default_on_a_gpu_with_mtp_weights_only(tiny_model, monkeypatch):
    from types import SimpleNamespace

    from mlx_dsv4.generation import speculative

    assert speculative.resolve_draft(tiny_model, 3) == 3
    assert speculative.resolve_draft(tiny_model, 0) == 0
    monkeypatch.setattr(speculative.mx, "default_device", lambda: mx.Device(mx.gpu))
    assert speculative.resolve_draft(tiny_model, None) == speculative.DEFAULT_DRAFT
    assert speculative.resolve_draft(SimpleNamespace(mtp=[]), None) == 0
    monkeypatch.setattr(speculative.mx, "default_device", lambda: mx.Device(mx.cpu))
    assert speculative.resolve_draft(tiny_model, None) == 0

"""Logits of the MLX port against transformers' DeepseekV4ForCausalLM (CPU, fp32), same weights.

The tiny config has sliding, CSA and HCA layers, the real ratios 4 and 128, the 128-token window
and an index top-k (16) far below the ~160 CSA entries of a 640-token sequence, so the indexer
really selects. All three decode-state paths must agree with the oracle's one-shot prefill.
"""

import numpy as np
import pytest

import mlx.core as mx

from mlx_dsv4.model.cache import make_cache

torch = pytest.importorskip("torch")
oracle = pytest.importorskip("oracle")

TOL = 1e-3
CHUNKS = [1, 3, 5, 127, 129]


@pytest.fixture(scope="module")
def reference(tiny_cfg, tiny_official, token_ids):
    # One torch thread: torch's idle workers otherwise spin against MLX's CPU threads.
    torch.set_num_threads(1)
    model = oracle.hf_model(tiny_cfg, tiny_official)
    return oracle.hf_logits(model, token_ids)


def run(model, ids, chunks):
    cache, outs, start = make_cache(model), [], 0
    for n in chunks:
        out = model(mx.array(ids[:, start : start + n]), cache)
        outs.append(np.array(out))
        start += n
    assert start == ids.shape[1]
    return np.concatenate(outs, axis=1)


def report(name, out, ref):
    err = np.abs(out - ref).max(axis=-1)[0]
    print(f"{name}: max abs logit diff {err.max():.2e} (logit scale {np.abs(ref).max():.1f})")
    bad = np.nonzero(err > TOL)[0]
    assert bad.size == 0, f"{name}: positions {bad[:10].tolist()} differ by up to {err.max():.3g}"


def test_oneshot_prefill(tiny_model, token_ids, reference):
    report("one-shot", run(tiny_model, token_ids, [token_ids.shape[1]]), reference)


def test_chunked_prefill_uneven(tiny_model, token_ids, reference):
    chunks = CHUNKS + [token_ids.shape[1] - sum(CHUNKS)]
    report("chunked", run(tiny_model, token_ids, chunks), reference)


def test_token_by_token_decode(tiny_model, token_ids, reference):
    T = token_ids.shape[1]
    report("decode", run(tiny_model, token_ids, [100] + [1] * (T - 100)), reference)


def test_oracle_chunked_agrees_with_itself(tiny_cfg, tiny_official, token_ids, reference):
    # Guards the oracle harness: its own cache path must match its one-shot path.
    model = oracle.hf_model(tiny_cfg, tiny_official)
    chunks = CHUNKS + [token_ids.shape[1] - sum(CHUNKS)]
    assert np.abs(oracle.hf_logits(model, token_ids, chunks) - reference).max() < TOL


def test_oracle_uses_the_yarn_table(tiny_cfg, tiny_official, tiny_args):
    model = oracle.hf_model(tiny_cfg, tiny_official)
    rot = model.model.rotary_emb
    np.testing.assert_allclose(rot.compress_inv_freq.numpy(), tiny_args.rope_inv_freq(1), rtol=1e-6)
    np.testing.assert_allclose(rot.main_inv_freq.numpy(), tiny_args.rope_inv_freq(0), rtol=1e-6)

"""Custom kernels: the pure-MLX twin against a NumPy reference, and the first-use check that
falls back to the twin (with one warning) when a backend's kernel disagrees or cannot run."""

from __future__ import annotations

import warnings

import mlx.core as mx
import numpy as np
import pytest

from mlx_dsv4.model import kernels


def sinkhorn_numpy(logits: np.ndarray, iters: int, eps: float) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    comb = e / e.sum(axis=-1, keepdims=True) + eps
    comb = comb / (comb.sum(axis=-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(axis=-1, keepdims=True) + eps)
        comb = comb / (comb.sum(axis=-2, keepdims=True) + eps)
    return comb


@pytest.mark.parametrize("shape", [(1, 1, 4, 4), (2, 37, 4, 4), (5, 3, 3)])
def test_twin_matches_the_numpy_reference(shape):
    x = np.random.default_rng(0).normal(0, 3, shape).astype(np.float64)
    got = np.array(kernels.sinkhorn_twin(mx.array(x.astype(np.float32)), 20, 1e-6))
    np.testing.assert_allclose(got, sinkhorn_numpy(x, 20, 1e-6), rtol=1e-5, atol=1e-6)
    # Doubly stochastic up to eps: columns sum to ~1 after the final column step.
    np.testing.assert_allclose(got.sum(axis=-2), 1.0, atol=1e-5)


def test_cpu_uses_the_twin_without_a_check(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "_backend", lambda: None)  # what the CPU backend reports
    monkeypatch.setattr(kernels, "_run_kernel", lambda *a: calls.append(a))
    x = mx.random.normal((3, 4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = kernels.sinkhorn(x, 20, 1e-6)
    assert calls == []
    np.testing.assert_array_equal(np.array(out), np.array(kernels.sinkhorn_twin(x, 20, 1e-6)))


@pytest.mark.parametrize("fault", ["wrong", "raises"])
def test_a_bad_kernel_falls_back_to_the_twin_with_one_warning(monkeypatch, fault):
    kernels.kernel_ok.cache_clear()

    def broken(backend, logits, iters, eps):
        if fault == "raises":
            raise RuntimeError("no compiler")
        return kernels.sinkhorn_twin(logits, iters, eps) + 1e-3

    monkeypatch.setattr(kernels, "_backend", lambda: "metal")
    monkeypatch.setattr(kernels, "_run_kernel", broken)
    x = mx.random.normal((2, 4, 4))
    with pytest.warns(RuntimeWarning, match="Sinkhorn kernel") as seen:
        a = kernels.sinkhorn(x, 20, 1e-6)
        b = kernels.sinkhorn(x, 20, 1e-6)
    assert len(seen) == 1
    want = np.array(kernels.sinkhorn_twin(x, 20, 1e-6))
    np.testing.assert_array_equal(np.array(a), want)
    np.testing.assert_array_equal(np.array(b), want)
    kernels.kernel_ok.cache_clear()


def test_a_kernel_that_agrees_is_used(monkeypatch):
    kernels.kernel_ok.cache_clear()
    used = []

    def good(backend, logits, iters, eps):
        used.append(backend)
        return kernels.sinkhorn_twin(logits, iters, eps)

    monkeypatch.setattr(kernels, "_backend", lambda: "cuda")
    monkeypatch.setattr(kernels, "_run_kernel", good)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels.sinkhorn(mx.random.normal((2, 4, 4)), 20, 1e-6)
    assert used == ["cuda", "cuda"]  # the check, then the call
    kernels.kernel_ok.cache_clear()

"""Custom GPU kernels, each beside the pure-MLX twin that defines it; the only file with Metal
or CUDA source.

`sinkhorn(logits, iters, eps)`: the mHC mixing matrix of every token, [..., n, n] fp32 logits to
a doubly-stochastic matrix (row softmax, +eps, then column and row normalisations ending on
columns, as the reference). The twin costs ~80 kernel launches per call (MLX does not fuse
reductions); the kernel is one launch, one thread per token's n x n matrix held in registers.

No GPU of either kind exists where the tests run, so a kernel proves itself on first use on its
backend: random inputs through kernel and twin, and on any disagreement (or failure to build)
the twin is used from then on, after one warning. The CPU backend always uses the twin.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import mlx.core as mx

F32 = mx.float32
CHECK_TOL = 1e-5


@lru_cache(maxsize=None)
def _twin(iters: int, eps: float):
    def sinkhorn(logits):
        comb = mx.softmax(logits, axis=-1, precise=True) + eps
        comb = comb / (comb.sum(axis=-2, keepdims=True) + eps)
        for _ in range(iters - 1):
            comb = comb / (comb.sum(axis=-1, keepdims=True) + eps)
            comb = comb / (comb.sum(axis=-2, keepdims=True) + eps)
        return comb

    return mx.compile(sinkhorn, shapeless=True)


def sinkhorn_twin(logits: mx.array, iters: int, eps: float) -> mx.array:
    """Reference: softmax over rows, +eps, columns, then `iters - 1` (rows, columns) rounds."""
    return _twin(iters, eps)(logits)


_BODY = """
    {index}
    if (m >= count[0]) return;
    float c[N * N];
    for (int i = 0; i < N; i++) {{
        float top = logits[m * N * N + i * N];
        for (int j = 1; j < N; j++) top = {max}(top, logits[m * N * N + i * N + j]);
        float s = 0.0f;
        for (int j = 0; j < N; j++) {{
            c[i * N + j] = {exp}(logits[m * N * N + i * N + j] - top);
            s += c[i * N + j];
        }}
        for (int j = 0; j < N; j++) c[i * N + j] = c[i * N + j] / s + EPS;
    }}
    for (int t = 0; t < ITERS; t++) {{
        if (t > 0) {{
            for (int i = 0; i < N; i++) {{
                float s = 0.0f;
                for (int j = 0; j < N; j++) s += c[i * N + j];
                for (int j = 0; j < N; j++) c[i * N + j] /= (s + EPS);
            }}
        }}
        for (int j = 0; j < N; j++) {{
            float s = 0.0f;
            for (int i = 0; i < N; i++) s += c[i * N + j];
            for (int i = 0; i < N; i++) c[i * N + j] /= (s + EPS);
        }}
    }}
    for (int k = 0; k < N * N; k++) comb[m * N * N + k] = c[k];
"""


def _backend() -> str | None:
    if mx.default_device() != mx.gpu:
        return None
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return None


@lru_cache(maxsize=None)
def _build(backend: str, eps: float):
    # eps is a compile-time constant (one kernel per model), N and ITERS are template ints.
    header = f"#define EPS {float(eps)!r}f\n"
    if backend == "metal":
        body = _BODY.format(index="uint m = thread_position_in_grid.x;", max="metal::max",
                            exp="metal::exp")
        return mx.fast.metal_kernel(name=f"dsv4_sinkhorn_{abs(hash(eps))}",
                                    input_names=["logits", "count"], output_names=["comb"],
                                    source=body, header=header)
    body = _BODY.format(index="int m = blockIdx.x * blockDim.x + threadIdx.x;", max="fmaxf",
                        exp="expf")
    return mx.fast.cuda_kernel(name=f"dsv4_sinkhorn_{abs(hash(eps))}",
                               input_names=["logits", "count"], output_names=["comb"],
                               source=body, header=header)


def _run_kernel(backend: str, logits: mx.array, iters: int, eps: float) -> mx.array:
    n = logits.shape[-1]
    flat = logits.astype(F32).reshape(-1, n * n)
    rows = flat.shape[0]
    out = _build(backend, eps)(
        inputs=[flat, mx.array([rows], mx.int32)], template=[("N", n), ("ITERS", iters)],
        grid=(max(rows, 1), 1, 1), threadgroup=(min(max(rows, 1), 256), 1, 1),
        output_shapes=[flat.shape], output_dtypes=[F32])[0]
    return out.reshape(logits.shape)


@lru_cache(maxsize=None)
def kernel_ok(backend: str | None, n: int, iters: int, eps: float) -> bool:
    """Whether the kernel for `backend` agrees with the twin (checked once per process)."""
    if backend is None:
        return False
    x = mx.random.normal((257, n, n), key=mx.random.key(7)) * 4
    try:
        got = _run_kernel(backend, x, iters, eps)
        want = sinkhorn_twin(x, iters, eps)
        err = mx.abs(got - want).max().item()
    except Exception as e:  # no compiler, a driver error: the twin still works
        warnings.warn(f"mlx-dsv4: the {backend} Sinkhorn kernel failed to run ({e}); using the "
                      "pure-MLX version.", RuntimeWarning, stacklevel=2)
        return False
    if not err <= CHECK_TOL:
        warnings.warn(f"mlx-dsv4: the {backend} Sinkhorn kernel disagrees with the pure-MLX "
                      f"version by {err:.3g} (> {CHECK_TOL}); using the pure-MLX version.",
                      RuntimeWarning, stacklevel=2)
        return False
    return True


def prepare(n: int, iters: int, eps: float) -> bool:
    """Run the first-use check now, outside any `mx.compile` trace (the check evaluates)."""
    return kernel_ok(_backend(), n, iters, eps)


def sinkhorn(logits: mx.array, iters: int, eps: float) -> mx.array:
    """The doubly-stochastic mixing matrices for `logits [..., n, n]` (fp32)."""
    backend = _backend()
    if backend is not None and kernel_ok(backend, logits.shape[-1], iters, eps):
        return _run_kernel(backend, logits, iters, eps)
    return sinkhorn_twin(logits, iters, eps)

"""V4.1's activation roundings (QAT fake-quant): values rounded through FP8 or FP4 and used as such.

DeepSeek-V4.1 was trained with, and its official inference applies, four roundings:

- linear inputs: FP8 e4m3 in blocks of 32 with power-of-two (UE8M0) scales, before every matmul
  whose weight is FP8/FP4 (the official kernels quantize activations for real);
- window KV: the same FP8 rounding over the whole 512-wide row, rope dims included;
- compressed KV entries: FP4 e2m1 in blocks of 16 with an e4m3 scale (amax / 6 rounded);
- index queries and keys: FP4 e2m1 in blocks of 32 with power-of-two scales.

What runs is set once per process by `MLX_DSV4_FAKE_QUANT`:
- unset or `kv` (default): the three KV-side roundings. The attention and the indexer were
  trained to see exactly these values, the official inference stores them, they cost a few
  element-wise ops per token per layer, and they make the pools storable as mxfp8 / mxfp4 /
  nvfp4 without further loss (cache.py).
- `all`: also the linear inputs. Off by default: it adds a rounding before every one of ~10
  matmuls per layer (a decode step's launches grow by a quarter), and leaving activations at
  bf16 is the more precise of the two (mlx-lm skips it for that reason).
- `0` (or `off`): none; parity with other implementations is taken so, since random test
  weights amplify each rounding jump.

The functions are our own; tests hold them bit for bit against mlx-vlm 0.7.10's `fakequant.py`.
"""

from __future__ import annotations

import os
from functools import partial

import mlx.core as mx

FP8_MAX, FP4_MAX = 448.0, 6.0
ENV = "MLX_DSV4_FAKE_QUANT"
KV, ALL, OFF = "kv", "all", "off"


def mode() -> str:
    """`kv`, `all` or `off`, from `MLX_DSV4_FAKE_QUANT` (read on every call: tests set it)."""
    value = os.environ.get(ENV, KV).strip().lower()
    if value in ("0", "off", "none", "false", "no"):
        return OFF
    if value in ("all", "1", "true", "yes", "on"):
        return ALL
    if value in ("kv", ""):
        return KV
    raise ValueError(f"{ENV}={value!r}: use kv (the default), all, or 0.")


def kv_on() -> bool:
    return mode() != OFF


def linear_on() -> bool:
    return mode() == ALL


def _pow2_ceil(x: mx.array) -> mx.array:
    """2^ceil(log2(x)) for positive fp32 x, from its bits (exact, unlike log2 and exp2)."""
    bits = x.view(mx.uint32)
    exponent = (bits >> 23) + ((bits & 0x7FFFFF) != 0).astype(mx.uint32)
    return (exponent << 23).view(mx.float32)


def _blocks(x: mx.array, block: int) -> mx.array:
    n = x.shape[-1]
    if n % block:
        raise ValueError(f"fake-quant: last dimension {n} is not a multiple of the block {block}")
    return x.astype(mx.float32).reshape(*x.shape[:-1], n // block, block)


def _amax(b: mx.array, floor: float) -> mx.array:
    return mx.maximum(mx.abs(b).max(axis=-1, keepdims=True), floor)


@partial(mx.compile, shapeless=True)
def _e2m1(v: mx.array) -> mx.array:
    """Round |v| <= 6 to the e2m1 grid {0, .5, 1, 1.5, 2, 3, 4, 6}, ties to the even code: the
    grid's step is .5 below 2, 1 below 4 and 2 up to 6, so each band is a scaled round-half-even."""
    m = mx.abs(v)
    q = mx.where(m < 2, mx.round(m * 2) * 0.5, mx.where(m < 4, mx.round(m), mx.round(m * 0.5) * 2))
    return mx.sign(v) * q


def fp8(x: mx.array, block: int = 32) -> mx.array:
    """FP8 e4m3 round trip per `block` values with a power-of-two scale (amax floor 1e-4)."""
    b = _blocks(x, block)
    s = _pow2_ceil(_amax(b, 1e-4) * mx.array(1 / FP8_MAX, mx.float32))
    q = mx.from_fp8(mx.to_fp8(mx.clip(b / s, -FP8_MAX, FP8_MAX)), mx.float32) * s
    return q.reshape(x.shape).astype(x.dtype)


def fp4(x: mx.array, block: int = 32) -> mx.array:
    """FP4 e2m1 round trip per `block` values with a power-of-two scale: index queries and keys."""
    b = _blocks(x, block)
    s = _pow2_ceil(_amax(b, FP4_MAX * 2.0**-126) * mx.array(1 / FP4_MAX, mx.float32))
    return (_e2m1(mx.clip(b / s, -FP4_MAX, FP4_MAX)) * s).reshape(x.shape).astype(x.dtype)


def fp4_e4m3(x: mx.array, block: int = 16) -> mx.array:
    """FP4 e2m1 round trip per `block` values with an e4m3 scale: compressed KV entries."""
    b = _blocks(x, block)
    s = mx.from_fp8(mx.to_fp8(_amax(b, FP4_MAX * 2.0**-9) / FP4_MAX), mx.float32)
    return (_e2m1(mx.clip(b / s, -FP4_MAX, FP4_MAX)) * s).reshape(x.shape).astype(x.dtype)


def linear_input(x: mx.array) -> mx.array:
    """An FP8/FP4 matmul's input, rounded when `MLX_DSV4_FAKE_QUANT=all`."""
    return fp8(x) if linear_on() else x


def window_kv(x: mx.array) -> mx.array:
    return fp8(x) if kv_on() else x


def compressed_kv(x: mx.array) -> mx.array:
    return fp4_e4m3(x) if kv_on() else x


def index_qk(x: mx.array) -> mx.array:
    return fp4(x) if kv_on() else x

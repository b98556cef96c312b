"""Small building blocks the V4 modules share: RMSNorm and the grouped (block-diagonal) linear.

The grouped linear keeps the checkpoint's 2-D layout `[groups * out, in]` so its weight loads
by name and shape like any linear; it views it as `[groups, out, in]` when multiplying. Its
quantized twin uses `gather_qmm` with one weight matrix per group. Both move the group axis in
front (`[g, rows, in]`), so a prefill chunk is one matrix product per group, not one
vector product per token and group (which reads each group's weights once per token).
"""

from __future__ import annotations

import copy

import mlx.core as mx
import mlx.nn as nn


# (group_size, bits) that mx.quantize uses when none are given, per mode.
QUANT_DEFAULTS = {"affine": (64, 4), "mxfp4": (32, 4), "mxfp8": (32, 8), "nvfp4": (16, 4)}


class RMSNorm(nn.Module):
    """Weighted RMSNorm; statistics in fp32 (mx.fast), output in the input dtype."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight.astype(x.dtype), self.eps)


class GroupedLinear(nn.Module):
    """`[..., g, in] -> [..., g, out]`: group j has its own `[out, in]` block of the weight."""

    def __init__(self, in_per_group: int, out_per_group: int, groups: int):
        super().__init__()
        self.groups = groups
        self.weight = mx.zeros((groups * out_per_group, in_per_group))

    def __call__(self, x: mx.array) -> mx.array:
        w = self.weight.reshape(self.groups, -1, self.weight.shape[-1])
        y = _by_group(x, self.groups) @ w.swapaxes(-1, -2).astype(x.dtype)
        return _from_groups(y, x)

    def to_quantized(self, group_size: int | None = None, bits: int | None = None,
                     mode: str = "affine", **_):
        q = QuantizedGroupedLinear(self.groups, group_size, bits, mode)
        q.weight, q.scales, *biases = mx.quantize(self.weight, group_size, bits, mode=mode)
        q.biases = biases[0] if biases else None
        return q


class QuantizedGroupedLinear(nn.Module):
    def __init__(self, groups: int, group_size: int | None, bits: int | None, mode: str):
        super().__init__()
        self.groups, self.mode = groups, mode
        default_group, default_bits = QUANT_DEFAULTS[mode]
        self.group_size, self.bits = group_size or default_group, bits or default_bits

    def __call__(self, x: mx.array) -> mx.array:
        g = self.groups

        def per_group(a):
            return None if a is None else a.reshape(g, -1, a.shape[-1])

        y = mx.gather_qmm(
            _by_group(x, g), per_group(self["weight"]), per_group(self["scales"]),
            per_group(self.get("biases")), rhs_indices=mx.arange(g), transpose=True,
            group_size=self.group_size, bits=self.bits, mode=self.mode)
        return _from_groups(y, x)


def _by_group(x: mx.array, g: int) -> mx.array:
    """`[..., g, in]` -> `[g, rows, in]`."""
    return x.reshape(-1, g, x.shape[-1]).swapaxes(0, 1)


def _from_groups(y: mx.array, x: mx.array) -> mx.array:
    """`[g, rows, out]` -> `[..., g, out]` with `x`'s leading shape."""
    return y.swapaxes(0, 1).reshape(*x.shape[:-1], y.shape[-1])


class ExpertLinear(nn.Module):
    """The same linear for `E` experts, weight `[E, out, in]`; rows pick their expert by index.

    `x [..., 1, in]` with `idx [...]` gives `[..., 1, out]` through one `gather_mm`.
    """

    def __init__(self, in_dims: int, out_dims: int, experts: int):
        super().__init__()
        self.weight = mx.zeros((experts, out_dims, in_dims))

    def __call__(self, x: mx.array, idx: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_mm(x, self.weight.swapaxes(-1, -2), rhs_indices=idx,
                            sorted_indices=sorted_indices)

    def to_quantized(self, group_size: int | None = None, bits: int | None = None,
                     mode: str = "affine", **_):
        q = QuantizedExpertLinear(group_size, bits, mode)
        q.weight, q.scales, *biases = mx.quantize(self.weight, group_size, bits, mode=mode)
        q.biases = biases[0] if biases else None
        return q


class QuantizedExpertLinear(nn.Module):
    def __init__(self, group_size: int | None, bits: int | None, mode: str):
        super().__init__()
        default_group, default_bits = QUANT_DEFAULTS[mode]
        self.group_size, self.bits, self.mode = group_size or default_group, bits or default_bits, mode

    def __call__(self, x: mx.array, idx: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_qmm(x, self["weight"], self["scales"], self.get("biases"), rhs_indices=idx,
                             transpose=True, group_size=self.group_size, bits=self.bits,
                             mode=self.mode, sorted_indices=sorted_indices)


class FusedPair:
    """Two linears with the same input (a SwiGLU's gate and up) as one matrix `[.., 2I, in]`.

    One matmul (or one `gather_qmm` for experts) then reads both, one launch instead of two: the
    fused matrix runs through a copy of the first module, so every linear kind (plain, quantized,
    per-expert) keeps its own code. The two modules keep their checkpoint names: their arrays
    become views into the fused ones, so memory is not doubled. A plain object, not a Module, so
    parameters are not listed twice.
    """

    def __init__(self, a: nn.Module, b: nn.Module, axis: int):
        self.split = a["weight"].shape[axis]
        self.module = copy.copy(a)
        for k in ("weight", "scales", "biases"):
            if a.get(k) is not None:
                fused = mx.concatenate([a[k], b[k]], axis=axis)
                mx.eval(fused)
                self.module[k] = fused
                a[k], b[k] = mx.split(fused, [self.split], axis=axis)
        mx.eval([a.parameters(), b.parameters()])

    def __call__(self, *args, **kwargs) -> tuple[mx.array, mx.array]:
        """`(a(...), b(...))` from one call of the fused module."""
        y = self.module(*args, **kwargs)
        return y[..., : self.split], y[..., self.split :]

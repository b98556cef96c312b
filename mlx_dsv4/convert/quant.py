"""Per-tensor arithmetic of the converter: FP8 block dequantisation, FP4/FP8 repacking, requantising.

Every function maps source arrays as `mx.load` returns them (E4M3 and E8M0 codes as uint8, packed
FP4 as int8) to the MLX arrays of one job's targets. The two repacks are byte copies with a new
dtype view (spec §4.5), so `native` and the experts shipped as mxfp4 are exact by construction;
only `fp8_affine`, `fp4_requant` and `affine` round, each once, from the exact official values.
Nothing here reads files or knows shard layouts.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .plan import FP4_GROUP, FP8_BLOCK, Job, Target

DTYPES = {"BF16": mx.bfloat16, "F16": mx.float16, "F32": mx.float32, "I32": mx.int32,
          "I64": mx.int64, "U8": mx.uint8, "I8": mx.int8, "U32": mx.uint32}
NAMES = {v: k for k, v in DTYPES.items()}


def e8m0(codes: mx.array, dtype=mx.bfloat16) -> mx.array:
    """2^(u − 127) built from its bits: exact, unlike exp2 (code 0 is the bf16 subnormal 2^-127)."""
    bits = mx.where(codes == 0, 0x0040, codes.astype(mx.uint16) << 7).astype(mx.uint16)
    return bits.view(mx.bfloat16).astype(dtype)


def dequantize_fp8(codes: mx.array, scales: mx.array, dtype=mx.bfloat16,
                   block: int = FP8_BLOCK) -> mx.array:
    """W[o, i] = e4m3(Wq[o, i]) · 2^(S[o // B, i // B] − 127) (spec §4.4; B = 128, V4.1: 32).

    In bf16 the result is exact: an E4M3 value has 4 significant bits and the scale is a power
    of two, so requantising from bf16 sees the official weights themselves.
    """
    o, i = codes.shape
    bo, bi = scales.shape
    w = mx.from_fp8(codes, dtype=dtype)
    pad = (bo * block - o, bi * block - i)
    if any(pad):  # partial edge blocks: the scale grid is ceil-sized (spec §4.4)
        w = mx.pad(w, [(0, pad[0]), (0, pad[1])])
    w = w.reshape(bo, block, bi, block) * e8m0(scales, dtype)[:, None, :, None]
    w = w.reshape(bo * block, bi * block)
    return w[:o, :i] if any(pad) else w


def dequantize_fp4(packed: mx.array, scales: mx.array, dtype=mx.bfloat16) -> mx.array:
    """The release's FP4 expert as values: exact in bf16 (an E2M1 value times a power of two)."""
    return mx.dequantize(packed.view(mx.uint32), scales, group_size=FP4_GROUP, bits=4,
                         mode="mxfp4", dtype=dtype)


def expand_block_scales(scales: mx.array, o: int, i: int, block: int = FP8_BLOCK) -> mx.array:
    """BxB block scales -> one per row and 32 columns: S_mx[o, j] = S[o // B, j // (B / 32)]."""
    per_block = block // FP4_GROUP
    rows = mx.repeat(scales, block, axis=0)[:o]
    return mx.repeat(rows, per_block, axis=1)[:, : i // FP4_GROUP] if per_block > 1 else rows


def run(job: Job, weight: mx.array, scale: mx.array | None, targets: list[Target]) -> list[mx.array]:
    """The arrays of `job.targets`, lazily; the caller evaluates and writes them."""
    if job.action == "cast":
        return [weight.astype(DTYPES[targets[0].dtype])]
    if job.action == "fp4":  # the release's FP4 layout is mxfp4: low nibble first, E8M0 per 32
        return [weight.view(mx.uint32), scale]
    if job.action == "fp8_mx":
        o, i = weight.shape
        return [weight.view(mx.uint32), expand_block_scales(scale, o, i, job.block)]
    q = job.quant
    if job.action == "fp8_affine":
        weight = dequantize_fp8(weight, scale, block=job.block)
    elif job.action == "fp4_requant":
        weight = dequantize_fp4(weight, scale)
    return list(mx.quantize(weight, q.group_size, q.bits, mode=q.mode))


def check(array: mx.array, target: Target) -> None:
    """A job's output must match the header the plan already wrote for it."""
    shape = target.shape[1:] if target.pieces > 1 else target.shape
    if NAMES.get(array.dtype) != target.dtype or tuple(array.shape) != tuple(shape):
        raise AssertionError(f"{target.name}: computed {array.dtype} {tuple(array.shape)}, planned "
                             f"{target.dtype} {tuple(shape)}")


def to_buffer(array: mx.array) -> memoryview:
    """The bytes of an evaluated array in row-major order (numpy has no bfloat16: view as uint16)."""
    if array.dtype == mx.bfloat16:
        array = array.view(mx.uint16)
    return memoryview(np.ascontiguousarray(np.asarray(array))).cast("B")

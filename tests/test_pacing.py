"""Prefill pacing: MLX's memory limit is live memory plus the planned working set while a
chunk is evaluated, never raised, and restored afterwards (also when the evaluation fails)."""

import mlx.core as mx
import pytest

from mlx_dsv4.generation.pacing import paced
from mlx_dsv4.sizes import ACTIVATION_MARGIN, activation_bytes


def test_limit_is_live_memory_plus_the_working_set_then_restored(tiny_args):
    old = mx.get_memory_limit()
    want = mx.get_active_memory() + activation_bytes(tiny_args, 64, 256, paced=True)
    with paced(tiny_args, 64, 256):
        assert mx.get_memory_limit() == min(old, want)
    assert mx.get_memory_limit() == old
    with pytest.raises(RuntimeError), paced(tiny_args, 64, 256):
        raise RuntimeError("boom")
    assert mx.get_memory_limit() == old


def test_a_lower_limit_is_kept(tiny_args):
    old = mx.get_memory_limit()
    try:
        mx.set_memory_limit(1 << 20)
        with paced(tiny_args, 64, 256):
            assert mx.get_memory_limit() == 1 << 20
    finally:
        mx.set_memory_limit(old)


def test_the_plan_reserves_a_margin_over_the_paced_working_set(tiny_args):
    for tokens, context in ((1, 8), (64, 256), (512, 4096)):
        paced_bytes = activation_bytes(tiny_args, tokens, context, paced=True)
        assert activation_bytes(tiny_args, tokens, context) == int(ACTIVATION_MARGIN * paced_bytes)

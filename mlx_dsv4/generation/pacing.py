"""Paced evaluation of prefill chunks: MLX holds what is live plus the planned activations.

MLX allocates an operation's output when the operation is queued, and frees it when its last
consumer has run; the host queues operations ahead of the device, so without a limit a chunk's
peak is the sum of the temporaries queued together, not the largest working set. Past its memory
limit MLX waits for queued work to finish (freeing temporaries) before it queues more; it never
refuses an allocation, so a limit too tight only costs overlap. `paced` sets that limit, for one
chunk's evaluation, to the memory live before it plus the planner's activation working set;
the plan reserves a margin over that for the work in flight when MLX pauses.
"""

from __future__ import annotations

from contextlib import contextmanager

import mlx.core as mx

from ..config import ModelArgs
from ..sizes import activation_bytes


def chunk_limit(args: ModelArgs, tokens: int, context: int) -> int:
    """The memory limit for evaluating `tokens` new tokens at `context`: live + activations."""
    return mx.get_active_memory() + activation_bytes(args, tokens, context, paced=True)


@contextmanager
def paced(args: ModelArgs, tokens: int, context: int):
    """Evaluate inside this block with MLX's memory limit at `chunk_limit` (never raised)."""
    old = mx.get_memory_limit()
    mx.set_memory_limit(min(old, chunk_limit(args, tokens, context)))
    try:
        yield
    finally:
        mx.set_memory_limit(old)

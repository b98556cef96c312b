"""What ranks > 0 of an `mlx.launch` job do for `dsv4 chat` and `dsv4 serve`: plan as rank 0
plans (the same options, so the same collective and the same verdict), load this rank's layers
of the planner's split, and follow rank 0 until it stops.

Above the planner and the model, which it joins: the pipeline (`model/pipeline.py`) runs stages
and knows no planner; the planner knows no loading.
"""

from __future__ import annotations

import sys
from pathlib import Path


def follow(path: str | Path, max_context: int | None = None, kv_bits: int | None = None,
           prefill_chunk: int = 512) -> int:
    """Serve this rank's layers until rank 0 stops; returns the worker's exit status."""
    from .model.pipeline import PipelineError, launched_group, run_worker
    from .model.weights import load_pipeline
    from .plan import apply_wired_limit, plan_context

    group = launched_group()
    if group is None or group.rank() == 0:
        raise PipelineError("rank.follow runs on ranks > 0 of an mlx.launch job.")
    plan, _ = plan_context(path, max_context, kv_bits=kv_bits, prefill_chunk=prefill_chunk)
    apply_wired_limit(plan)
    stage = load_pipeline(path, group, plan.splits)
    layers = stage.indices
    print(f"rank {group.rank()}: layers {layers.start}-{layers.stop - 1} loaded, following rank 0",
          file=sys.stderr, flush=True)
    return run_worker(stage, group)

"""Pipeline parallelism over `mx.distributed`: the trunk's layers split across ranks (Macs).

Rank r holds a contiguous run of layers (`plan.split_layers`, in proportion to each host's
memory) and only those layers' weights and decode pools. Rank 0 also holds the embedding and
the head (final norm, `hc_head` collapse, vocabulary projection), so the first and last steps of
a forward happen where the generator runs. A forward goes round the ring once:

    rank 0: embed, its layers ─streams─▶ rank 1: its layers ─▶ … ─▶ rank n-1: its layers
      ▲                                                                        │
      └──────────── last position's streams [B, 1, N, D] ◀────────────────────┘
    rank 0: head -> logits -> the generator samples (processors, grammar, seed: all unchanged)

Why the head sits on rank 0 rather than sampling on the last rank: `generation/generate.py`
samples with per-request logits processors (penalties, logit bias, a grammar that follows the
reply) that live with the request on rank 0. Sending logits back would cost V x 4 bytes a token
(517 KB for V4); sending the final streams costs N x D x 2 (Pro: 57 KB, Flash: 32 KB), the same
as every other hop, and the head's weights sit beside the embedding (rank 0 gets fewer layers
for it). Per decoded token each hop carries a 32-byte header, B x 4 bytes of token ids (hash
routing reads them on every rank) and the B x N x D streams (2 bytes each in bf16).

Loading: every rank reads its own layers from its copy of the one converted folder
(`weights.load_pipeline` opens only the shards the index maps them to; `mx.load` reads a tensor
only when it is evaluated). The converter writes no per-rank shard sets: the split is decided when
the job starts, from the memory each rank reports (the planner's split, handed to the loader),
so one folder serves any set of Macs, and a single Mac too.

Rank 0's `PipelineModel` is called like `Model` (`model(ids, cache, last_only=...)` -> logits);
ranks > 0 run `run_worker`, which follows the commands that arrive with the activations. Each
rank-0 cache list (one per conversation) has a key; workers keep their own layers' pools under
that key and drop them when rank 0's list is garbage-collected. A call sends and receives its
messages one evaluation at a time and returns after the round trip: the bytes between two ranks
keep one order, and nothing is left in flight when nobody reads a prefill chunk's logits; it
gives up the overlap `generate_step`'s `async_eval` gets on one Mac.

V4.1 runs too: its layers read pools, top-k and candidate blocks of earlier layers within one
forward, so a stage starts only where no later layer reads an earlier stage's (at the pool
owners: layers 2, 8, 14 or 20 of V4.1-Flash, `ModelArgs.pipeline_cuts`), and each hop also
carries the lagged mHC's `pre` weights (`[B, S, N]` fp32) beside the streams.

Off in pipeline mode, each refused with a sentence: MTP speculation and `return_streams` (the MTP
block would need the trunk's streams and a second head on rank 0), the prompt cache (it restores
pools rank 0 cannot hand to the others) and SSD expert streaming. A session's own snapshots still
work: when rank 0's cache is rewound, the workers' pools are rebuilt by replaying the kept token
ids through the ring (correct, but costs a prefill of that prefix).
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
import weakref

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import ModelArgs
from ..launch import launched
from . import decode
from .cache import LayerCache, make_cache
from .head import embed_streams, first_pre, head41, head_logits, init_head
from .model import Block
from .layers import RMSNorm
from .engram import engram_rows
from .v41 import Block41, Handoff
from .v41_decode import DecodeStep41

HEADER = 8  # int32 slots: command, key, B, S, flags, offset, kv_bits, dtypes (streams + 4 x pools)
FORWARD, DROP, STOP = 1, 2, 3
LAST_ONLY, REPLY = 1, 2  # flags
DTYPES = (mx.float32, mx.bfloat16, mx.float16)
REPLAY_CHUNK = 512


class PipelineError(RuntimeError):
    """Something pipeline mode does not do, or ranks that disagree."""


def init(backend: str = "any") -> mx.distributed.Group | None:
    """The global group when this process was started with several ranks (`mlx.launch`), else
    None: one process runs the ordinary model. A launched rank whose backend cannot connect
    raises, rather than quietly running the whole model alone."""
    if not mx.distributed.is_available():
        return None
    group = mx.distributed.init(strict=True, backend=backend)
    return group if group.size() > 1 else None


def launched_group() -> mx.distributed.Group | None:
    """`init()` for a process that a launcher started, None at once for any other (no backend
    is probed, so a plain `dsv4 chat` never waits on one)."""
    return init() if launched() else None


class Stage(nn.Module):
    """Layers `layers` of the trunk (attribute paths as in `Model`, so checkpoint names load as
    they are), plus the embedding and head on the first stage."""

    def __init__(self, args: ModelArgs, layers: range, first: bool):
        super().__init__()
        self.args, self.indices, self.first = args, layers, first
        # One-token steps replay a compiled graph of this stage's layers, as Model's do.
        self.compiled_decode, self._step = True, None
        # Placeholders below `layers.start` keep `layers.{i}` the checkpoint's own index.
        block = Block41 if args.is_v41 else Block
        self.layers = [nn.Module() for _ in range(layers.start)] + [block(args, i) for i in layers]
        self.engram_hash = None  # V4.1: set by the loader when this stage has Engram layers
        if first:
            self.embed = nn.Embedding(args.vocab_size, args.hidden_size)
            self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
            self.head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
            if not args.is_v41:  # V4.1 has no HyperHead: its last `pre` collapses the streams
                init_head(self, args)

    def owns(self, name: str) -> bool:
        """Whether checkpoint tensor `name` belongs to this stage."""
        if name.startswith("layers."):
            return int(name.split(".")[1]) in self.indices
        return self.first and not name.startswith("mtp.")

    @property
    def dtype(self) -> mx.Dtype:
        e = self.embed
        return e["scales"].dtype if "scales" in e else e.weight.dtype

    def fuse(self):
        for i in self.indices:
            self.layers[i].ffn.experts.fuse()
            self.layers[i].ffn.shared_experts.fuse()
            mx.clear_cache()
        self._step = None  # compiled steps captured the unfused weights

    def make_cache(self, batch: int, dtype: mx.Dtype, kv_bits: int | None) -> list[LayerCache]:
        return [LayerCache(self.args, i, batch, dtype, None, kv_bits) for i in self.indices]

    def __call__(self, X: mx.array | None, ids: mx.array, cache: list[LayerCache], pre=None):
        """Streams `[B, S, N, D]` after this stage's layers; the first stage embeds `ids`.
        V4.1: `(streams, pre)`, taking the `pre` the previous stage handed on."""
        if self.args.is_v41:
            return self._v41(X, pre, ids, cache)
        if self.compiled_decode and decode.one_token(cache, ids):
            if self._step is None:
                self._step = StageStep(self)
            return self._step(X, ids, cache)
        if X is None:
            X = embed_streams(self, ids)
        for i, c in zip(self.indices, cache):
            X = self.layers[i](X, ids, c)
        return X

    def _v41(self, X, pre, ids, cache):
        if self.compiled_decode and decode.one_token(cache, ids):
            if self._step is None:
                self._step = StageStep41(self)
            return self._step(X, pre, ids, cache)
        rows = engram_rows(self, self.indices, ids, cache)
        if X is None:
            X, pre = embed_streams(self, ids), first_pre(*ids.shape, self.args.hc_mult)
        handoff = Handoff()
        for i, c in zip(self.indices, cache):
            X, pre = self.layers[i](X, pre, ids, c, handoff, rows.get(i))
        return X, pre

    def logits(self, X: mx.array, pre: mx.array | None = None) -> mx.array:
        return head41(self, X, pre) if self.args.is_v41 else head_logits(self, X)


class StageStep41(DecodeStep41):
    """A V4.1 stage's one-token step: `v41_decode.DecodeStep41` over this stage's layers."""

    def _layers(self) -> list[int]:
        return list(self.model.indices)

    def _start(self, ids, X, pre):
        return super()._start(ids, X, pre) if self.model.first else (X, pre)

    def _finish(self, X, pre) -> tuple:
        return X, pre

    def __call__(self, X, pre, ids, cache):
        none = self.no_streams
        return tuple(self.run(ids, none if X is None else X, none if pre is None else pre, cache))


class StageStep(decode.DecodeStep):
    """A stage's one-token step: decode.py's compiled variants over this stage's layers only,
    so a rank decodes as fast as its share of `Model`."""

    def _blocks(self) -> list:
        return [self.model.layers[i] for i in self.model.indices]

    def _begin(self, ids: mx.array, X: mx.array) -> mx.array:
        return super()._begin(ids, X) if self.model.first else X

    def _end(self, X: mx.array) -> tuple:
        return (X,)

    def __call__(self, X: mx.array | None, ids: mx.array, cache: list[LayerCache]) -> mx.array:
        return self.run(ids, self.no_streams if X is None else X, cache)[0]


def _send(x: mx.array, dst: int, group) -> None:
    # Each message is evaluated on its own, so the byte stream between two ranks keeps one order.
    mx.eval(mx.distributed.send(x, dst, group=group))


def _recv(shape, dtype, src: int, group) -> mx.array:
    x = mx.distributed.recv(shape, dtype, src, group=group)
    mx.eval(x)
    return x


@contextlib.contextmanager
def whole_pass():
    """Hold Ctrl-C until the block ends: a ring pass cut in half (header sent, streams not) would
    leave the ranks out of step for good. Only the main thread receives SIGINT in Python."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            signal.raise_signal(signal.SIGINT)  # now, to the handler that was there


@dataclasses.dataclass
class _Track:
    key: int
    offset: int = 0  # where the workers' pools are
    ids: list = dataclasses.field(default_factory=list)  # [B, S] chunks they consumed


class PipelineModel(nn.Module):
    """Rank 0's model: called like `Model`, it runs its own layers and the others' through the ring.

    `args` is the model's config cut to rank 0's layers, so `make_cache(pipeline_model)` (as the
    generator and session call it) builds the pools of those layers only; `full_args` is the
    whole model's.
    """

    def __init__(self, stage: Stage, full_args: ModelArgs, group, splits: list[range]):
        super().__init__()
        self.stage = stage
        self.full_args, self.group, self.splits = full_args, group, splits
        self.args = full_args.first_layers(stage.indices.stop)
        self.mtp: list = []  # no MTP block: speculation stays off (resolve_draft reads this)
        self.compiled_decode = False
        self.bytes_sent = 0  # activation and id bytes rank 0 sent to rank 1 (benchmarks)
        self._tracks: weakref.WeakKeyDictionary[LayerCache, _Track] = weakref.WeakKeyDictionary()
        self._next_key, self._dead, self._closed = 1, [], False

    @property
    def dtype(self) -> mx.Dtype:
        return self.stage.dtype

    def fuse(self):
        self.stage.fuse()

    def _track(self, cache: list[LayerCache]) -> _Track:
        t = self._tracks.get(cache[0])
        if t is None:
            t = self._tracks[cache[0]] = _Track(self._next_key)
            self._next_key += 1
            # The workers' pools go when this cache does (told with the next command).
            weakref.finalize(cache[0], self._dead.append, t.key)
        return t

    def _header(self, cmd, key=0, B=0, S=0, flags=0, offset=0, kv_bits=0, dtype=0):
        _send(mx.array([cmd, key, B, S, flags, offset, kv_bits, dtype], mx.int32), 1, self.group)

    def _flush_dead(self):
        while self._dead:
            self._header(DROP, self._dead.pop())

    def _ring(self, ids: mx.array, cache: list[LayerCache], t: _Track, flags: int) -> mx.array | None:
        """One pass of `ids` round the ring; the last stage's streams come back with REPLY."""
        B, S = ids.shape
        X, pre = self.stage(None, ids, cache), None
        if self.full_args.is_v41:
            X, pre = X
        kv_bits = next((c.kv_pool.bits or 0 for c in cache if c.kv_pool is not None), 0)
        dtypes = DTYPES.index(X.dtype) + 4 * DTYPES.index(cache[0].window.keys.dtype)
        self._header(FORWARD, t.key, B, S, flags, t.offset, kv_bits, dtypes)
        _send(ids.astype(mx.int32), 1, self.group)
        _send(X, 1, self.group)
        if pre is not None:
            _send(pre, 1, self.group)
        self.bytes_sent += HEADER * 4 + B * S * 4 + X.nbytes + (pre.nbytes if pre is not None else 0)
        t.ids.append(np.array(ids))
        t.offset += S
        if not flags & REPLY:
            return None
        rows, last = 1 if flags & LAST_ONLY else S, self.group.size() - 1
        X = _recv((B, rows, *X.shape[2:]), X.dtype, last, self.group)
        return X if pre is None else (X, _recv((B, rows, pre.shape[-1]), mx.float32, last, self.group))

    def _replay(self, cache: list[LayerCache], t: _Track):
        """Rank 0's cache was rewound to a snapshot: rebuild the workers' pools up to it."""
        p = cache[0].offset
        kept = np.concatenate(t.ids, axis=1)[:, :p] if t.ids else None
        self._dead.append(t.key)
        self._flush_dead()
        t.offset, t.ids = 0, []
        keys = cache[0].window.keys
        kv_bits = next((c.kv_pool.bits for c in cache if c.kv_pool is not None), None)
        scratch = make_cache(self, batch=keys.shape[0], dtype=keys.dtype, kv_bits=kv_bits)
        for start in range(0, p, REPLAY_CHUNK):
            self._ring(mx.array(kept[:, start : start + REPLAY_CHUNK]), scratch, t, 0)

    def __call__(self, ids: mx.array, cache: list[LayerCache] | None = None,
                 last_only: bool = False, return_streams: bool = False):
        """Logits `[B, S, V]` (`[B, 1, V]` with `last_only`) in fp32; advances every rank's cache."""
        if return_streams:
            raise PipelineError("Pipeline mode does not run the MTP block or hand out the trunk's "
                                "streams: use --no-mtp (speculative decoding is off).")
        if self._closed:
            raise PipelineError("The pipeline was closed: its worker ranks have stopped.")
        if cache is None:
            cache = make_cache(self, batch=ids.shape[0])
        t = self._track(cache)
        p = cache[0].offset
        if p > t.offset:
            raise PipelineError(
                f"This cache holds {p} tokens the other ranks never saw (restored from a prompt "
                "cache?): pipeline mode cannot load saved state into remote ranks; run without "
                "the prompt cache (--no-prompt-cache).")
        with whole_pass():
            if p < t.offset:
                self._replay(cache, t)
            self._flush_dead()
            X = self._ring(ids, cache, t, REPLY | (LAST_ONLY if last_only else 0))
        return self.stage.logits(*X) if isinstance(X, tuple) else self.stage.logits(X)

    def close(self):
        """Tell the workers to stop (they return from `run_worker`)."""
        if not self._closed:
            with whole_pass():
                self._flush_dead()
                self._header(STOP)
            self._closed = True


def run_worker(stage: Stage, group) -> int:
    """Rank > 0: follow rank 0's commands until it sends STOP; returns the commands served."""
    rank, size = group.rank(), group.size()
    src, dst, last = rank - 1, rank + 1, rank == size - 1
    caches: dict[int, list[LayerCache]] = {}
    served = 0
    while True:
        h = _recv((HEADER,), mx.int32, src, group)
        if not last:
            _send(h, dst, group)
        cmd, key, B, S, flags, offset, kv_bits, dtype = h.tolist()
        served += 1
        if cmd == STOP:
            return served
        if cmd == DROP:
            caches.pop(key, None)
            continue
        if cmd != FORWARD:
            raise PipelineError(f"rank {rank}: unknown pipeline command {cmd} (ranks out of step?)")
        ids = _recv((B, S), mx.int32, src, group)
        if not last:
            _send(ids, dst, group)
        N, D = stage.args.hc_mult, stage.args.hidden_size
        X = _recv((B, S, N, D), DTYPES[dtype % 4], src, group)
        pre = _recv((B, S, N), mx.float32, src, group) if stage.args.is_v41 else None
        cache = caches.get(key)
        if cache is None:
            cache = caches[key] = stage.make_cache(B, DTYPES[dtype // 4], kv_bits or None)
        if cache[0].offset != offset:
            raise PipelineError(f"rank {rank}: cache {key} is at {cache[0].offset} tokens, rank 0 "
                                f"sent position {offset} (ranks out of step)")
        Y = stage(X, ids, cache, pre) if pre is not None else stage(X, ids, cache)
        parts = list(Y) if pre is not None else [Y]
        if not last:
            out = [mx.distributed.send(y, dst, group=group) for y in parts]
        elif flags & REPLY:
            out = [mx.distributed.send(y[:, -1:] if flags & LAST_ONLY else y, 0, group=group)
                   for y in parts]
        else:
            out = [y[:, :0] for y in parts]
        for o in out:  # one message at a time: the byte stream between two ranks keeps one order
            mx.eval(o)
        mx.eval([c.state for c in cache])


def gather_budgets(group, budget: int) -> list[int]:
    """Every rank's memory budget (this rank's is `budget`, bytes) in rank order, in whole MiB so
    that every rank computes the same split from the same numbers."""
    mib = mx.array([budget >> 20], mx.int32)
    return [b << 20 for b in mx.distributed.all_gather(mib, group=group).tolist()]

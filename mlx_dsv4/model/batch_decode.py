"""One decode step for several sequences at once, each with its own cache at its own position.

What reads the weights runs once over the batch's rows `[B, 1, ...]`: the mHC mixes, norms, the
attention projections (rope takes one position per row), the output projections, the MoE and
the head. What touches a sequence's pools (the ring, compressors, compressed and index pools,
the indexer's top-k and the attention over them) runs per sequence, through `decode.core`
compiled once per (layer, variant key): sequences sit at different positions, so their keys
differ, and a graph keyed on the whole batch would need every combination of them.

Each layer's batched halves are compiled once (MLX retraces them per batch size), unless the
model decodes eagerly (`Model.compiled_decode` False, as with experts streamed from disk). A one-sequence
step through here computes what `decode.DecodeStep` computes, split into the same pieces.
"""

from __future__ import annotations

import mlx.core as mx

from . import decode, mhc
from .cache import LayerCache


class BatchStep(decode.DecodeStep):
    """Batched one-token steps of one model (see the module docstring).

    Shares `DecodeStep`'s setup: weights evaluated, kernel checks run, ranges kept as constants.
    """

    def __init__(self, model):
        super().__init__(model)
        self.cores: dict[tuple, object] = {}
        # Experts streamed from disk read the routing on the host (experts_stream.py): a graph
        # holding the MoE cannot be compiled then, the attention cores still can.
        wrap = mx.compile if model.compiled_decode else (lambda f: f)
        self._before = [wrap(self._attn_in(layer)) for layer in model.layers]
        self._after = [wrap(self._attn_out(layer)) for layer in model.layers]
        self._head = wrap(lambda X: self._end(X)[0])

    @staticmethod
    def _attn_in(block):
        def run(X, P):
            x, post, comb = block._mix(X, "attn")
            q, kv, side = decode.project(block.attn, block.attn_norm(x), P)
            return q, kv, post, comb, *side

        return run

    @staticmethod
    def _attn_out(block):
        def run(o, P, X, post, comb, ids):
            X = mhc.expand(decode.output(block.attn, o, P, X.dtype), X, post, comb)
            x, post, comb = block._mix(X, "ffn")
            return mhc.expand(block.ffn(block.ffn_norm(x), ids), X, post, comb)

        return run

    def _core(self, i: int, spec: tuple, size: int):
        key = (i, spec, size)
        if key not in self.cores:
            att = self.model.layers[i].attn
            ar = self._ranges([spec])

            def run(q, kv, p, side, *st):
                o, new = decode.core(att, q, kv, side, list(st), p, spec, ar)
                return (o, *new)

            self.cores[key] = mx.compile(run)
        return self.cores[key]

    def __call__(self, ids: mx.array, caches: list[list[LayerCache]]) -> mx.array:
        """Logits `[B, 1, V]` (fp32) for token `ids [B, 1]`, row b fed to `caches[b]`, whose
        layers must be at one offset each (`decode.supported`); every cache advances by one."""
        model = self.model
        ps = [c[0].offset for c in caches]
        keys = [decode.plan(model, c, p) for c, p in zip(caches, ps)]
        P = mx.array(ps, mx.int32)
        pos = [mx.array(p, mx.int32) for p in ps]
        X = self._begin(ids, self.no_streams)
        for i in range(len(model.layers)):
            q, kv, post, comb, *side = self._before[i](X, P)
            outs = []
            for b, (cache, key) in enumerate(zip(caches, keys)):
                c = cache[i]
                state = decode.state_arrays(c)
                r = slice(b, b + 1)
                res = self._core(i, key[i], len(state))(q[r], kv[r], pos[b], [a[r] for a in side],
                                                        *state)
                del state
                decode.set_state(c, list(res[1:]), key[i][1])
                outs.append(res[0])
            o = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)
            X = self._after[i](o, P, X, post, comb, ids)
        return self._head(X)

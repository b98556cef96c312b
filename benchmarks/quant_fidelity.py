"""How much each conversion recipe costs in fidelity, against what it saves in bytes.

For every recipe (the registered ones, or `--candidates` for the wider sweep the defaults were
chosen from) this prints: bytes one decoded token reads and total GiB for the released Flash and
Pro configs (both from `convert.plan`, the planner's own arithmetic), and, on tiny official-format
checkpoints, the KL divergence of the next-token distribution from the exact model (the
dequantised official weights, fp32) and the median relative logit error per position.

Two fixtures: `gaussian` (synthetic.write_official_checkpoint) and `heavy` (the same checkpoint
with every linear, the embedding, the head and the experts redrawn from a Student-t with 4
degrees of freedom at the same standard deviation, so some groups hold outliers, as real weights
do). Random-weight logits are nearly flat, which is why KL (not top-1 agreement) is the measure.
The converted model runs in fp32 activations (its bf16 tensors upcast), so the numbers are the
weights' error alone. Not a test: `python benchmarks/quant_fidelity.py [--candidates] [--seeds 2]`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import zlib
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

from mlx_dsv4.config import ModelArgs, released_config
from mlx_dsv4.convert import RECIPES, convert
from mlx_dsv4.convert.plan import A4, A8, BIG_ATTENTION, Quant, Recipe, decode_bytes, recipe_bytes
from mlx_dsv4.model.model import Model
from mlx_dsv4.synthetic import (decode_official, read_safetensors, tiny_config, to_model_weights,
                                write_official_checkpoint, write_safetensors)
from mlx_dsv4.model.weights import load_model

# Wide enough for groups of 128 in every matrix (the experts' w2 reads 256), every layer kind.
CONFIG = tiny_config(hidden_size=512, q_lora_rank=256, o_lora_rank=128, moe_intermediate_size=256,
                     n_routed_experts=16, num_experts_per_tok=4, vocab_size=1024)
TOKENS = (2, 160)  # two sequences across the 128-token window and a 128-token HCA entry
GiB = 1 << 30


def candidates() -> list[Recipe]:
    """The sweep behind the registered recipes: what each part costs at which bits."""
    out = []
    for g in (32, 64, 128):
        out.append(Recipe(f"big-attn-4bit-g{g}", "", head=A8, rules=((BIG_ATTENTION, Quant("affine", g, 4)),)))
    out.append(Recipe("big-attn-4bit+embed8", "", head=A8, embed=A8, rules=((BIG_ATTENTION, A4),)))
    out.append(Recipe("big-attn+indexer-4bit", "", head=A8,
                      rules=((BIG_ATTENTION, A4), (r"indexer\.wq_b$", A4))))
    # One part at a time at 4 bits (everything else exact): where the q4 error comes from.
    for part, pattern in (("wq_a", r"attn\.wq_a$"), ("wkv", r"attn\.wkv$"),
                          ("wq_b", r"attn\.wq_b$"), ("wo_a", r"attn\.wo_a$"), ("wo_b", r"attn\.wo_b$"),
                          ("indexer", r"indexer\.wq_b$"), ("shared", r"shared_experts\.w\d$")):
        out.append(Recipe(f"only-{part}-4bit", "", rules=((pattern, A4),)))
    out.append(Recipe("only-embed-4bit", "", embed=A4))
    out.append(Recipe("only-embed-8bit", "", embed=A8))
    out.append(Recipe("only-head-8bit", "", head=A8))
    # Routed experts requantised from FP4, on top of the new default's other settings.
    for bits in (2, 3):
        for g in (32, 64, 128):
            out.append(Recipe(f"experts-{bits}bit-g{g}", "", head=A8, experts=Quant("affine", g, bits),
                              rules=((BIG_ATTENTION, A4),)))
    for g in (64, 128):
        two, three = Quant("affine", g, 2), Quant("affine", g, 3)
        out.append(Recipe(f"experts-w2-3bit-w13-2bit-g{g}", "", head=A8, experts=two,
                          rules=((BIG_ATTENTION, A4), (r"experts\.w2$", three))))
        out.append(Recipe(f"experts-w13-3bit-w2-2bit-g{g}", "", head=A8, experts=three,
                          rules=((BIG_ATTENTION, A4), (r"experts\.w2$", two))))
    out.append(Recipe("experts-mxfp4-as-2bit-g64-q4rest", "", fp8=A4, embed=A8, head=A8,
                      experts=Quant("affine", 64, 2)))
    return out


# ----- the heavy-tailed fixture --------------------------------------------------------------------

def heavy_tailed(src: Path, dst: Path, seed: int) -> Path:
    """`src` (an official-format checkpoint) with its weights redrawn from a unit-variance
    Student-t (4 degrees of freedom) at each tensor's own scale, re-encoded in the release format."""
    import shutil

    shutil.copytree(src, dst)
    args = ModelArgs.from_dict(json.loads((src / "config.json").read_text()))
    roles = {n: r for n, _, r in args.tensors()}
    for f in sorted(dst.glob("model-*.safetensors")):
        tensors = read_safetensors(f)
        out = dict(tensors)
        for name, (dtype, a) in tensors.items():
            role = roles.get(name)
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            if role == "expert":
                w = _student(rng, (a.shape[0], a.shape[1] * 2), (2 * a.shape[1]) ** -0.5)
                packed, scales = mx.quantize(mx.array(w), 32, 4, mode="mxfp4")
                out[name] = ("I8", np.array(packed).view(np.int8).reshape(a.shape))
                out[name[: -len("weight")] + "scale"] = ("F8_E8M0", np.array(scales))
            elif role == "fp8":
                codes, scales = _fp8(_student(rng, a.shape, a.shape[1] ** -0.5))
                out[name] = ("F8_E4M3", codes)
                out[name[: -len("weight")] + "scale"] = ("F8_E8M0", scales)
            elif role in ("linear", "embed", "head") and not name.endswith("gate.weight"):
                std = 1.0 if role == "embed" else a.shape[-1] ** -0.5
                out[name] = ("BF16", _bf16(_student(rng, a.shape, std)))
        write_safetensors(f, out)
    return dst


def _student(rng, shape, std: float) -> np.ndarray:
    return (rng.standard_t(4, shape) * (std / np.sqrt(2.0))).astype(np.float32)  # var of t(4) is 2


def _fp8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    o, i = w.shape
    bo, bi = -(-o // 128), -(-i // 128)
    padded = np.zeros((bo * 128, bi * 128), np.float32)
    padded[:o, :i] = np.abs(w)
    e = np.ceil(np.log2(np.maximum(padded.reshape(bo, 128, bi, 128).max(axis=(1, 3)), 1e-30) / 448))
    step = np.repeat(np.repeat(np.exp2(e), 128, 0), 128, 1)[:o, :i].astype(np.float32)
    return np.array(mx.to_fp8(mx.array(w / step))), (e + 127).astype(np.uint8)


def _bf16(x: np.ndarray) -> np.ndarray:
    return np.array(mx.array(x).astype(mx.bfloat16).view(mx.uint16))


# ----- measuring -----------------------------------------------------------------------------------

def reference_logits(official: Path, ids: mx.array) -> mx.array:
    model = Model(ModelArgs.from_dict(json.loads((official / "config.json").read_text())))
    weights = to_model_weights(decode_official(official))
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    return model(ids)


def recipe_logits(official: Path, recipe: Recipe, ids: mx.array, work: Path) -> mx.array:
    out = work / re.sub(r"[^\w.-]", "_", recipe.name)
    convert(official, out, recipe=recipe)
    model = load_model(out)
    model.update(tree_map(lambda a: a.astype(mx.float32) if a.dtype == mx.bfloat16 else a,
                          model.parameters()))
    return model(ids)


def fidelity(want: mx.array, got: mx.array) -> tuple[float, float]:
    """(mean KL(exact || recipe) of the next-token distributions in nats, median over positions
    of |logits - exact| / |exact|)."""
    p = want - mx.logsumexp(want, axis=-1, keepdims=True)
    q = got - mx.logsumexp(got, axis=-1, keepdims=True)
    kl = mx.sum(mx.exp(p) * (p - q), axis=-1)
    rel = mx.linalg.norm(got - want, axis=-1) / mx.linalg.norm(want, axis=-1)
    return mx.mean(kl).item(), float(np.median(np.array(rel)))


def measure(recipes: list[Recipe], seeds: int) -> dict[str, dict]:
    flash, pro = released_config("flash"), released_config("pro")
    rows = {r.name: {"token_gb": decode_bytes(flash, r) / 1e9,
                     "flash_gib": recipe_bytes(flash, r) / GiB, "pro_gib": recipe_bytes(pro, r) / GiB}
            for r in recipes}
    for seed in range(seeds):
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            gaussian = write_official_checkpoint(work / "gaussian", CONFIG, seed=seed, extras=False)
            fixtures = {"gaussian": gaussian, "heavy": heavy_tailed(gaussian, work / "heavy", seed)}
            ids = mx.array(np.random.default_rng(seed + 100).integers(0, CONFIG["vocab_size"], TOKENS))
            for kind, path in fixtures.items():
                want = reference_logits(path, ids)
                for r in recipes:
                    kl, rel = fidelity(want, recipe_logits(path, r, ids, work / f"out-{kind}"))
                    row = rows[r.name]
                    row.setdefault(f"{kind}_kl", []).append(kl)
                    row.setdefault(f"{kind}_rel", []).append(rel)
                    print(f"  seed {seed} {kind:8s} {r.name:36s} KL {kl:.5f}  rel {rel:.4f}",
                          file=sys.stderr, flush=True)
    return rows


def table(rows: dict[str, dict]) -> str:
    lines = ["| recipe | GB read per token (Flash) | Flash GiB | Pro GiB | KL gaussian | KL heavy-tailed "
             "| rel. logit error gaussian | heavy-tailed |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in rows.items():
        kl = [np.mean(r[f"{k}_kl"]) for k in ("gaussian", "heavy")]
        rel = [np.mean(r[f"{k}_rel"]) for k in ("gaussian", "heavy")]
        lines.append(f"| `{name}` | {r['token_gb']:.2f} | {r['flash_gib']:.1f} | {r['pro_gib']:.1f} | "
                     f"{kl[0]:.4f} | {kl[1]:.4f} | {rel[0]:.3f} | {rel[1]:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--candidates", action="store_true", help="the wider sweep, not the registered recipes")
    ap.add_argument("--seeds", type=int, default=1, help="fixtures per kind (results are averaged)")
    ap.add_argument("--json", type=Path, help="also write the raw rows here")
    opts = ap.parse_args()
    recipes = list(RECIPES.values()) + (candidates() if opts.candidates else [])
    rows = measure(recipes, opts.seeds)
    if opts.json:
        opts.json.write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()

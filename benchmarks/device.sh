#!/usr/bin/env bash
# One device check on the H200 (MLX CUDA build): Flash-shaped decode, batching and prefill.
#
# Run from the repository root, after the wheels are installed (../shared/tools/gpu-wheels.sh):
#   call 2: carry [".gpu/b"]  command: bash .gpu/b/install.sh && bash benchmarks/device.sh
# Steps, each under its own `timeout` (guards 30 + 60 + 120 + 120 + 60 + 90 = 480 s, +3 s kill
# grace each), so the whole script ends within ~8 minutes and a step that overruns never eats the next:
#   1. nvidia-smi, python / mlx / mlx-lm versions, mx.device_info(), and an import check
#   1b. the CUDA Sinkhorn kernel against its pure-MLX twin (kernels.kernel_ok) and its time
#   1c. benchmarks/decode_ops.py: nodes, kernels, host and step ms per CSA/HCA layer, eager vs
#      compiled, 256 experts, contexts 1K/8K/64K
#   2. benchmarks/flash_layers.py at full Flash shapes: 4 layers (4..7: CSA, HCA, CSA, HCA),
#      256 experts (mxfp4), q4 layout, 50 decode steps, prefill chunks 512..4096, decode at
#      contexts 1K..256K (writes its JSON after every phase, so a cut run keeps what it measured)
#   3. benchmarks/batch.py: aggregate decode tok/s at batch 1/2/4/8 (4 Flash layers, 256 experts)
#   4. benchmarks/prefill.py: prefill tok/s, TFLOP/s, MFU and peak/weights at 2K and 8K, chunks
#      512 and 2048, with the per-module breakdown
# Logs: $OUT/*.log; JSON: $OUT/flash_layers.json, $OUT/decode_ops.json, batch.json, prefill.json.
# FLASH_ARGS overrides step 2's arguments (e.g. FLASH_ARGS="--hash --steps 30 --chunks 2048").
set -uo pipefail
OUT=${OUT:-$PWD/out-device}
mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
t0=$SECONDS
PY=${PY:-python3}
FLASH_ARGS=${FLASH_ARGS:---layers 4 --steps 50 --warmup 3 --prompt 256 --chunks 512 1024 2048 4096 --repeats 2 --context 1024 8192 65536 262144}

{
  echo "== env $(date -u +%FT%TZ)"
  nvidia-smi -L
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
  $PY --version
  timeout -k 3 30 $PY - <<'EOF'
import time
t = time.perf_counter()
import mlx.core as mx
import mlx_lm
import mlx_dsv4.model.model, mlx_dsv4.generation.generate
print("mlx", mx.__version__, "mlx-lm", mlx_lm.__version__, "device", mx.default_device(),
      f"imports {time.perf_counter() - t:.1f} s")
try:
    print("device_info", mx.device_info())
except Exception as e:
    print("device_info unavailable:", e)
EOF
  echo "env rc=$?"
} 2>&1 | tee "$OUT/env.log"

echo "== sinkhorn kernel" | tee "$OUT/kernels.log"
timeout -k 3 60 $PY - <<'EOF' 2>&1 | tee -a "$OUT/kernels.log"
import time
import mlx.core as mx
from mlx_dsv4.model import kernels
backend = kernels._backend()
print("backend", backend, "kernel agrees with twin:", kernels.kernel_ok(backend, 4, 20, 1e-6))
x = mx.random.normal((4096, 4, 4)) * 4
for name, f in (("twin", lambda: kernels.sinkhorn_twin(x, 20, 1e-6)),
                ("kernel", lambda: kernels._run_kernel(backend, x, 20, 1e-6))):
    mx.eval(f())
    t = time.perf_counter()
    for _ in range(50):
        mx.eval(f())
    print(f"{name}: {(time.perf_counter() - t) / 50 * 1e3:.3f} ms for 4096 tokens")
EOF

echo "== decode_ops" | tee "$OUT/decode_ops.log"
timeout -k 3 120 $PY benchmarks/decode_ops.py --experts 256 --contexts 1024 8192 65536 \
  --out "$OUT/decode_ops.json" 2>&1 | tee -a "$OUT/decode_ops.log"

echo "== flash_layers $FLASH_ARGS" | tee "$OUT/flash_layers.log"
# shellcheck disable=SC2086
timeout -k 3 120 $PY benchmarks/flash_layers.py $FLASH_ARGS --out "$OUT/flash_layers.json" 2>&1 \
  | tee -a "$OUT/flash_layers.log"
rc1=${PIPESTATUS[0]}
echo "flash_layers rc=$rc1 ($((SECONDS - t0)) s so far)" | tee -a "$OUT/flash_layers.log"

echo "== batch" | tee "$OUT/batch.log"
timeout -k 3 60 $PY benchmarks/batch.py --layers 4 --steps 20 --warmup 3 --prompt 256 \
  --out "$OUT/batch.json" 2>&1 | tee -a "$OUT/batch.log"
rc2=${PIPESTATUS[0]}
echo "batch rc=$rc2" | tee -a "$OUT/batch.log"

echo "== prefill" | tee "$OUT/prefill.log"
# Dense bf16 peak for MFU: 989 TFLOP/s for H100 SXM and H200, 756 for H100 PCIe.
PEAK=989
nvidia-smi -L | grep -q "PCIe" && PEAK=756
timeout -k 3 90 $PY benchmarks/prefill.py --layers 4 --experts 256 --prompts 2048 8192 \
  --chunks 512 2048 --full-max 8192 --breakdown --peak-tflops $PEAK --out "$OUT/prefill.json" \
  2>&1 | tee -a "$OUT/prefill.log"
rc3=${PIPESTATUS[0]}
echo "prefill rc=$rc3" | tee -a "$OUT/prefill.log"

echo "== done in $((SECONDS - t0)) s: flash_layers rc=$rc1 batch rc=$rc2 prefill rc=$rc3 (124 = timed out)"
ls -la "$OUT"

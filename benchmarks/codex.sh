#!/usr/bin/env bash
# The real Codex CLI against `dsv4 serve` of the selftest model, set up as a new user would: a
# model provider with a base URL only (wire_api "responses"), an API key from the environment,
# no OpenAI login. Prints Codex's output, its exit code and the wall time, and keeps the server log.
#
#   npm install -g @openai/codex        # once
#   bash benchmarks/codex.sh [PROMPT]   # default prompt: "say hi"
#
# Env: PY (python, default python3), WORK (scratch dir, default /tmp/dsv4-codex; the selftest
# model is built there once), PORT (default 18767), TIMEOUT (seconds for codex, default 1800).
# With the byte tokenizer Codex's ~40K-token prompt takes minutes to read on a laptop CPU; the
# server sends response.in_progress every 15 s meanwhile, which keeps Codex's 300 s idle timer
# from firing. The random model writes gibberish, and may call a tool: Codex runs in its
# read-only sandbox with approval "never", so a call fails and is answered as a tool result.
set -uo pipefail
PY=${PY:-python3}
WORK=${WORK:-/tmp/dsv4-codex}
PORT=${PORT:-18767}
TIMEOUT=${TIMEOUT:-1800}
PROMPT=${1:-say hi}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$WORK/project" "$WORK/codex-home"

MODEL=$WORK/selftest/mlx-q4
if [ ! -f "$MODEL/config.json" ]; then
  "$PY" -m mlx_dsv4.cli selftest --keep "$WORK/selftest" > "$WORK/selftest.log" 2>&1 || true
  [ -f "$MODEL/config.json" ] || { echo "selftest did not build $MODEL; see $WORK/selftest.log"; exit 2; }
fi
# Codex always offers tools. A selftest model whose stand-in encoder cannot render them gets the
# v0731 encoder of the tests (same protocol tokens, DeepSeek's tools prompt) instead.
"$PY" - "$MODEL" <<'EOF'
import sys
sys.path.insert(0, "tests")
from mlx_dsv4.text.chat_format import load_encoding
if load_encoding(sys.argv[1]).tools_tpl is None:
    from test_chat_format import encoder_source
    open(f"{sys.argv[1]}/encoding/encoding_dsv4.py", "w", encoding="utf-8").write(encoder_source("v0731"))
    print("selftest encoder has no tools prompt: using the v0731 test encoder")
EOF

cat > "$WORK/codex-home/config.toml" <<EOF
model = "deepseek-v4-flash"
model_provider = "dsv4"
check_for_update_on_startup = false

[model_providers.dsv4]
name = "mlx-dsv4"
base_url = "http://127.0.0.1:$PORT/v1"
wire_api = "responses"
env_key = "DSV4_API_KEY"

[analytics]
enabled = false
EOF

"$PY" -m mlx_dsv4.cli serve "$MODEL" --port "$PORT" --model-id deepseek-v4-flash \
  --prompt-cache-dir "$WORK/prompt-cache" > "$WORK/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
  kill -0 $SERVER 2>/dev/null || { echo "dsv4 serve exited; see $WORK/serve.log"; exit 2; }
  sleep 1
done

cd "$WORK/project"
start=$(date +%s)
CODEX_HOME="$WORK/codex-home" DSV4_API_KEY=sk-local timeout "$TIMEOUT" \
  codex exec --skip-git-repo-check "$PROMPT" < /dev/null
rc=$?
echo "codex exec exit code: $rc, wall time: $(( $(date +%s) - start )) s (server log: $WORK/serve.log)"
grep -E "POST /v1/responses|prompt cache:" "$WORK/serve.log" | tail -n 10
grep -E "prefill .*tok/s" "$WORK/serve.log" | tail -n 1
exit $rc

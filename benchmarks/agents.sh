#!/usr/bin/env bash
# Coding agents end to end against `dsv4 serve`, each set up as a new user would (a fresh home, a
# base URL only, no login): the real `claude -p "say hi"` with its default tools (Messages API),
# and `codex exec "say hi"` (Responses API). Prints one line per agent: exit code and seconds.
#
#   npm install -g @anthropic-ai/claude-code @openai/codex    # once
#   bash benchmarks/agents.sh [MODEL_DIR]
#
# MODEL_DIR defaults to the selftest's tiny random model, built in $WORK (random weights: the
# replies are gibberish; what is checked is that each agent completes its turn and exits 0).
# With the selftest's byte-level tokenizer Claude Code's prompt is ~77K tokens and Codex's ~40K:
# minutes of prefill on a laptop CPU, during which the server keeps both clients' idle timers
# fed. Environment: DSV4 (the command, default `python -m mlx_dsv4.cli`), WORK (scratch folder,
# default /tmp/dsv4-agents; the model and the prompt cache are kept there between runs), PORT
# (8765), MAX_CONTEXT (131072), AGENT_TIMEOUT (3600 s), AGENTS ("claude codex").
set -uo pipefail
DSV4=${DSV4:-python -m mlx_dsv4.cli}
WORK=${WORK:-/tmp/dsv4-agents}
PORT=${PORT:-8765}
MAX_CONTEXT=${MAX_CONTEXT:-131072}
AGENT_TIMEOUT=${AGENT_TIMEOUT:-3600}
AGENTS=${AGENTS:-claude codex}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$WORK"
MODEL=${1:-$WORK/selftest/mlx-q4}
if [ ! -f "$MODEL/config.json" ]; then
  $DSV4 selftest --keep "$WORK/selftest" > "$WORK/selftest.log" 2>&1 \
    || { echo "selftest failed: $WORK/selftest.log"; exit 1; }
fi

$DSV4 serve "$MODEL" --port "$PORT" --max-context "$MAX_CONTEXT" --model-id dsv4-local \
  --prompt-cache-dir "$WORK/prompt-cache" > "$WORK/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
  kill -0 $SERVER 2>/dev/null || { echo "dsv4 serve exited: $WORK/serve.log"; exit 1; }
  sleep 0.5
done

status=0
for agent in $AGENTS; do
  command -v "$agent" > /dev/null || { echo "$agent: not installed, skipped"; continue; }
  home="$WORK/home-$agent"  # a new user's home: no settings, no login
  rm -rf "$home" && mkdir -p "$home/project"
  start=$SECONDS
  case $agent in
    claude)
      (cd "$home/project" && HOME="$home" ANTHROPIC_BASE_URL="http://127.0.0.1:$PORT" \
        ANTHROPIC_API_KEY=local CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 DISABLE_AUTOUPDATER=1 \
        timeout "$AGENT_TIMEOUT" claude -p "say hi" < /dev/null > "$WORK/claude.out" 2> "$WORK/claude.err") ;;
    codex)
      mkdir -p "$home/.codex"
      cat > "$home/.codex/config.toml" <<EOF
model = "dsv4-local"
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
      (cd "$home/project" && HOME="$home" DSV4_API_KEY=local \
        timeout "$AGENT_TIMEOUT" codex exec --skip-git-repo-check "say hi" \
        < /dev/null > "$WORK/codex.out" 2> "$WORK/codex.err") ;;
  esac
  rc=$?
  echo "$agent: exit $rc in $((SECONDS - start)) s (output: $WORK/$agent.out, $WORK/$agent.err)"
  [ $rc -eq 0 ] || status=1
done
echo "requests served:"
grep -E '"(POST|GET|HEAD) ' "$WORK/serve.log" | sed 's/^.*"\(\(POST\|GET\|HEAD\) [^"]*\)".*/  \1/' | sort | uniq -c
exit $status

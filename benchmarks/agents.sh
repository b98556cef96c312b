#!/usr/bin/env bash
# Coding agents end to end against `dsv4 serve`: the real `claude -p "say hi"` (its default tools),
# and `codex exec "say hi"` where codex is installed, each as a new user would point it at the server.
#
#   bash benchmarks/agents.sh [MODEL_DIR]
#
# MODEL_DIR defaults to the selftest's tiny random model, made in a temporary folder (random
# weights: the replies are gibberish; what is checked is that each agent completes its turn and
# exits 0). Prints one line per agent: exit code and seconds. Logs: $OUT (default ./out-agents).
# With the selftest's byte-level tokenizer Claude Code's prompt is ~77K tokens and the first
# request prefills for ~8 minutes on a 2-core x86 CPU; the script waits up to $AGENT_TIMEOUT s.
# Needs: node/npm (`npm install -g @anthropic-ai/claude-code`, optionally `@openai/codex`).
# Environment: DSV4 (the command, default `dsv4`), PORT (8765), MAX_CONTEXT (131072),
# AGENT_TIMEOUT (1800), AGENTS ("claude codex").
set -uo pipefail
DSV4=${DSV4:-dsv4}
PORT=${PORT:-8765}
MAX_CONTEXT=${MAX_CONTEXT:-131072}
AGENT_TIMEOUT=${AGENT_TIMEOUT:-1800}
AGENTS=${AGENTS:-claude codex}
OUT=${OUT:-$PWD/out-agents}
mkdir -p "$OUT"
WORK=$(mktemp -d -t dsv4-agents-XXXXXX)
MODEL=${1:-}
if [ -z "$MODEL" ]; then
  # Judged by its report, not its exit status: MLX may abort at interpreter exit (issue 21).
  $DSV4 selftest --keep "$WORK/selftest" > "$OUT/selftest.log" 2>&1
  grep -q "selftest passed" "$OUT/selftest.log" || { echo "selftest failed: $OUT/selftest.log"; exit 1; }
  MODEL="$WORK/selftest/mlx-q4"
fi

$DSV4 serve "$MODEL" --port "$PORT" --max-context "$MAX_CONTEXT" --model-id dsv4-local > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null; rm -rf "$WORK"' EXIT
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
  kill -0 $SERVER 2>/dev/null || { echo "dsv4 serve exited: $OUT/serve.log"; exit 1; }
  sleep 0.5
done

status=0
for agent in $AGENTS; do
  command -v "$agent" > /dev/null || { echo "$agent: not installed, skipped"; continue; }
  home="$WORK/home-$agent"  # a new user's home: no settings, no login
  mkdir -p "$home"
  start=$SECONDS
  case $agent in
    claude)
      (cd "$home" && HOME="$home" ANTHROPIC_BASE_URL="http://127.0.0.1:$PORT" ANTHROPIC_API_KEY=local \
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 DISABLE_AUTOUPDATER=1 \
        timeout "$AGENT_TIMEOUT" claude -p "say hi" < /dev/null > "$OUT/claude.out" 2> "$OUT/claude.err") ;;
    codex)
      mkdir -p "$home/.codex"
      printf 'model = "dsv4-local"\nmodel_provider = "dsv4"\n\n[model_providers.dsv4]\nname = "dsv4"\nbase_url = "http://127.0.0.1:%s/v1"\nwire_api = "responses"\n' \
        "$PORT" > "$home/.codex/config.toml"
      (cd "$home" && HOME="$home" timeout "$AGENT_TIMEOUT" codex exec --skip-git-repo-check "say hi" \
        < /dev/null > "$OUT/codex.out" 2> "$OUT/codex.err") ;;
  esac
  rc=$?
  echo "$agent: exit $rc in $((SECONDS - start)) s (output: $OUT/$agent.out, $OUT/$agent.err)"
  [ $rc -eq 0 ] || status=1
done
exit $status

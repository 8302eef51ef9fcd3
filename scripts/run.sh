#!/usr/bin/env bash
# Starts every R3MES process under honcho in the foreground; Ctrl-C (or SIGTERM) stops them all.
set -euo pipefail
cd "$(dirname "$0")/.."
export PORT="${PORT:-8000}"
export R3MES_DATA_DIR="${R3MES_DATA_DIR:-$PWD/var}"
export PYTHONUNBUFFERED=1
processes="web inference worker beat"
if [ -z "${REDIS_URL:-}" ]; then
  # Our own Redis, on a port derived from PORT so instances never share one.
  export REDIS_PORT=$((PORT + 10000))
  export REDIS_URL="redis://127.0.0.1:${REDIS_PORT}/0"
  mkdir -p "$R3MES_DATA_DIR/redis"
  processes="redis $processes"
fi
echo "R3MES on http://127.0.0.1:${PORT}/  (data: ${R3MES_DATA_DIR}, redis: ${REDIS_URL})"
exec .venv/bin/honcho --no-prefix -f Procfile start $processes 2>&1 || true

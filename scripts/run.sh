#!/usr/bin/env bash
# Starts every R3MES process under honcho in the foreground; Ctrl-C (or SIGTERM) stops them all.
set -euo pipefail
cd "$(dirname "$0")/.."
export PORT="${PORT:-8000}"
export R3MES_DATA_DIR="${R3MES_DATA_DIR:-$PWD/var}"
export PYTHONUNBUFFERED=1
# honcho gives every process its own $PORT; the web port travels as R3MES_PORT instead.
export R3MES_PORT="$PORT"
processes="web inference worker beat"
if [ -z "${REDIS_URL:-}" ]; then
  # Our own Redis, on a port derived from PORT so instances never share one.
  export REDIS_PORT=$((PORT + 10000))
  export REDIS_URL="redis://127.0.0.1:${REDIS_PORT}/0"
  mkdir -p "$R3MES_DATA_DIR/redis"
  processes="redis $processes"
fi
echo "R3MES on http://127.0.0.1:${PORT}/  (data: ${R3MES_DATA_DIR}, redis: ${REDIS_URL})"
status=0
.venv/bin/honcho -f Procfile start $processes || status=$?
# Ctrl-C is how a user stops R3MES: honcho has stopped every process, so it is a clean exit.
if [ "$status" -eq 130 ] || [ "$status" -eq 143 ]; then status=0; fi
exit "$status"

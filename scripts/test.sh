#!/usr/bin/env bash
# Runs every test on a fresh machine: installs Redis (Debian's redis-server) and the Python side
# (Synapse, LiveKit's SDK) into .venv if needed, then builds and runs unit, property and
# integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! .venv/bin/python -c 'import synapse, livekit.api' 2>/dev/null; then
  echo "==> installing matrix-synapse and livekit-api into .venv"
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
fi

if ! command -v redis-server >/dev/null; then
  echo "==> installing redis-server"
  if [ "$(id -u)" -ne 0 ]; then
    echo "redis-server is missing: install Debian's redis-server package (as root)" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi

echo "==> cargo test"
cargo test --locked "$@"

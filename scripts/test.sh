#!/usr/bin/env bash
# Runs every test on a fresh machine: installs the Python side (Synapse, LiveKit's SDK) into
# .venv if needed, then builds and runs unit, property and integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! .venv/bin/python -c 'import synapse, livekit.api' 2>/dev/null; then
  echo "==> installing matrix-synapse and livekit-api into .venv"
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
fi

echo "==> cargo test"
cargo test --locked "$@"

#!/usr/bin/env bash
# Runs every test on a fresh machine: installs Redis and promtool (Debian) and the Python side
# (Synapse, LiveKit's SDK) into .venv if needed, then builds and runs unit, property and
# integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! .venv/bin/python -c 'import synapse, livekit.api' 2>/dev/null; then
  echo "==> installing matrix-synapse and livekit-api into .venv"
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
fi

# Debian packages the tests use: a real Redis, and promtool (in prometheus) for the alert rules.
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v promtool >/dev/null || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing Debian packages: ${missing[*]} (install them as root)" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

echo "==> cargo test"
cargo test --locked "$@"

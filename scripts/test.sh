#!/usr/bin/env bash
# Runs every test on a fresh machine: installs Redis, promtool, nft, Chromium and Node.js (Debian),
# the Python side (Synapse, LiveKit's server and client SDKs) into .venv, LiveKit server (Go) and
# Element Call with playwright-core (npm) if needed, then checks formatting and clippy, builds and
# runs unit, property and integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! .venv/bin/python -c 'import synapse, livekit.api, livekit.rtc' 2>/dev/null; then
  echo "==> installing matrix-synapse, livekit-api and livekit into .venv"
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
fi

# A real LiveKit server, at the pinned tag (its go.mod has no replace directives there, so
# `go install pkg@version` builds it), cached between runs; its own --version checked.
LIVEKIT_SERVER_VERSION=1.13.5
lk_dir="${XDG_CACHE_HOME:-$HOME/.cache}/rtc-leave-bridge/livekit-server-v$LIVEKIT_SERVER_VERSION"
if ! "$lk_dir/server" --version 2>/dev/null | grep -q "$LIVEKIT_SERVER_VERSION"; then
  echo "==> building livekit-server v$LIVEKIT_SERVER_VERSION (go install, cached in $lk_dir)"
  command -v go >/dev/null || { echo "Go is needed to build livekit-server" >&2; exit 1; }
  mkdir -p "$lk_dir"
  GOBIN="$lk_dir" go install "github.com/livekit/livekit-server/cmd/server@v$LIVEKIT_SERVER_VERSION"
  "$lk_dir/server" --version | grep -q "$LIVEKIT_SERVER_VERSION" || {
    echo "livekit-server at $lk_dir/server is not v$LIVEKIT_SERVER_VERSION" >&2; exit 1; }
fi
export LIVEKIT_SERVER_BIN="$lk_dir/server"

# Debian packages the tests use: a real Redis, promtool (in prometheus) for the alert rules, nft
# (nftables) to cut a real participant's network, Chromium and Node.js for Element Call.
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v promtool >/dev/null || missing+=(prometheus)
command -v nft >/dev/null || missing+=(nftables)
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v npm >/dev/null || missing+=(nodejs npm)
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing Debian packages: ${missing[*]} (install them as root)" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Element Call (its embedded build) and playwright-core, at the exact versions package.json pins
# (npm ls fails when one is missing or another version).
if ! (cd tests/element-call && npm ls --depth=0 >/dev/null 2>&1); then
  echo "==> installing Element Call and playwright-core (npm ci in tests/element-call)"
  (cd tests/element-call && npm ci --no-audit --no-fund --loglevel=error)
fi

# The code's own hygiene first: formatted as rustfmt.toml says, and no clippy warning.
echo "==> cargo fmt --check; cargo clippy -D warnings"
cargo fmt --check
cargo clippy --locked --all-targets --quiet -- -D warnings

echo "==> cargo test"
cargo test --locked "$@"

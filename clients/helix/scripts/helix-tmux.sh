#!/usr/bin/env bash
# Helix 25.x with exlsp, driven in tmux like a person at the keyboard:
# - completion: typing a word shows exlsp's item in the completion menu;
#   accepting it replaces the typed word (no duplication) and the saved file
#   holds exactly the item's edit;
# - hover (`space k`) on a function shows exlsp's explanation;
# - code actions (`space a`) on a function list exlsp's refactors; choosing
#   one is resolved (codeAction/resolve) promptly and either changes the
#   file or shows the server's reason in the status line.
#
# usage: helix-tmux.sh [PYTHON] [MODEL_DIR]
#
# Helix comes from Debian sid (clients/scripts/debian-sid.sh) unless
# EXLSP_HX names an `hx` to use. Needs tmux. The LSP traffic is read back
# from Helix's own log (hx -vvv) to know the exact completion item.
# EXLSP_KEEP=1 keeps the work folder (screens, logs).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../../.." && pwd)
python=${1:-python3}
# The editor starts the server from another folder: use an absolute path.
case $python in */*) python=$(realpath -s "$python") ;; *) python=$(command -v "$python") ;; esac
model=${2:-}
session=exlsp-helix-$$

work=$(mktemp -d)
if [ -n "${EXLSP_KEEP:-}" ]; then
  echo "work folder: $work"
  trap 'tmux kill-session -t "$session" 2>/dev/null || true' EXIT
else
  trap 'tmux kill-session -t "$session" 2>/dev/null || true; rm -rf "$work"' EXIT
fi

if [ -n "${EXLSP_HX:-}" ]; then
  hx=$EXLSP_HX
else
  # shellcheck source=../../scripts/debian-sid.sh
  source "$repo/clients/scripts/debian-sid.sh"
  sid_fetch hx >/dev/null
  hx=$(sid_wrapper hx /usr/lib/hx/hx "HELIX_RUNTIME=$SID_ROOT/usr/lib/hx/runtime")
fi
if [ -z "$model" ]; then
  model=$("$python" -c 'from exlsp.benchmarks.build_model import DEFAULT_MODEL, ensure_model; print(ensure_model(**DEFAULT_MODEL))')
fi

mkdir -p "$work/config/helix"
cat >"$work/config/helix/config.toml" <<'EOF'
[editor]
# Ask as soon as one character of a word is typed, without waiting.
completion-trigger-len = 1
completion-timeout = 5
EOF
# The example's server entry, with this interpreter and model; python served
# by exlsp alone so the check does not depend on other servers being installed.
cat >"$work/config/helix/languages.toml" <<EOF
[language-server.exlsp]
command = "$python"
args = ["-m", "exlsp.server", "--log-file", "$work/server.log", "--log-level", "debug", "serve"]
timeout = 60

[language-server.exlsp.config.exlsp.model]
path = "$model"

[language-server.exlsp.config.exlsp.completion]
multiline = "never"

[[language]]
name = "python"
language-servers = [{ name = "exlsp", only-features = ["completion", "code-action", "hover"] }]
EOF
# The last line is a function body being written (typed into below, so the
# check does not depend on Helix's auto-indent, which needs a grammar).
printf 'import math\n\n\ndef area(radius):\n    return math.pi * radius * radius\n\n\ndef diameter(radius):\n    return \n' >"$work/shapes.py"
typed="    return ra"

"$hx" --version
tmux new-session -d -s "$session" -x 120 -y 40 -c "$work" \
  "XDG_CONFIG_HOME='$work/config' '$hx' -vvv --log '$work/helix.log' shapes.py; sleep 600"

screen() { tmux capture-pane -p -t "$session"; }
keep_screen() { screen >"$work/screen-$1.txt"; }
wait_for() { # wait_for SECONDS COMMAND...: poll until COMMAND succeeds
  local deadline=$((SECONDS + $1))
  shift
  until "$@"; do
    [ $SECONDS -ge $deadline ] && return 1
    sleep 0.3
  done
}
keys() { tmux send-keys -t "$session" "$@"; }
# A key right after Escape would arrive as Alt+key.
normal() { keys Escape; sleep 0.3; }
goto_line() { normal; keys ":$1" Enter; sleep 0.3; }

fail=0
check() { # check NAME STATUS
  if [ "$2" = 0 ]; then echo "ok   $1"; else echo "FAIL $1"; fail=1; fi
}

r=0; wait_for 240 grep -q "model ready" "$work/server.log" 2>/dev/null || r=$?
check "server loaded the model" $r
screen_has() { screen | grep -qF -- "$1"; }

# 1. Completion: append "ra" to the last line; the menu shows the item with
# its kind ("snippet").
goto_line 9
keys A
tmux send-keys -t "$session" -l "ra"
r=0; wait_for 30 screen_has " snippet" || r=$?
check "completion menu shows an exlsp item" $r
keep_screen completion
echo "--- screen with the menu"
screen | sed -n '8,10p'

keys Tab
sleep 0.5
normal
keys ":w" Enter
sleep 1

# The last completion item exlsp sent, from Helix's log, applied to the typed line.
r=0
"$python" - "$work" "$typed" <<'EOF' || r=$?
import json, re, sys
from pathlib import Path

work, typed = Path(sys.argv[1]), sys.argv[2]
responses = []
for line in (work / "helix.log").read_text(errors="replace").splitlines():
    m = re.search(r"exlsp <- (\{.*\})\s*$", line)
    if m:
        try:
            responses.append(json.loads(m.group(1)))
        except json.JSONDecodeError:
            pass
items = [r["result"]["items"] for r in responses
         if isinstance(r.get("result"), dict) and r["result"].get("items")]
if not items:
    sys.exit("FAIL no completion items from exlsp in Helix's log")
item = items[-1][0]
edit = item["textEdit"]
start, end = edit["range"]["start"]["character"], edit["range"]["end"]["character"]
expected = typed[:start] + edit["newText"] + typed[end:]
saved = (work / "shapes.py").read_text().splitlines()
print(f"item label {item['label']!r}, kind {item.get('kind')}, edit {start}-{end} -> {edit['newText']!r}")
print(f"saved line 9: {saved[8]!r}")
ok = saved[8] == expected
print(("ok   " if ok else "FAIL ") + f"accepted item replaced the typed word: {expected!r}")
dup = saved[8].startswith(typed + typed.split()[-1])
print(("ok   " if not dup else "FAIL ") + "no duplicated word")
sys.exit(0 if ok and not dup else 1)
EOF
check "saved file holds the accepted completion" $r

# 2. Hover on `def area`.
goto_line 4
keys Space k
r=0; wait_for 20 screen_has "area (function)" || r=$?
keep_screen hover
check "hover shows exlsp's explanation of area (space k)" $r
echo "--- screen after space k"
screen | sed -n '4,10p'
normal

# 3. Code actions on `def area`: the menu lists exlsp's refactors, the first
# one is chosen and resolved.
goto_line 4
keys Space a
r=0; wait_for 20 screen_has "Add a docstring to area" || r=$?
keep_screen code-actions
check "code action menu lists exlsp's refactors (space a)" $r
echo "--- screen after space a"
screen | sed -n '4,9p'
if [ $r = 0 ]; then
  before=$(cat "$work/shapes.py")
  keys Enter
  # Helix waits for codeAction/resolve before it redraws; the answer (an edit,
  # or an error with the reason) must come within the refactor's deadline.
  resolved() {
    "$python" - "$work/helix.log" <<'EOF'
import json, re, sys
sent, answered = set(), set()
for line in open(sys.argv[1], errors="replace"):
    m = re.search(r"exlsp (->|<-) (\{.*\})\s*$", line)
    if not m:
        continue
    try:
        msg = json.loads(m.group(2))
    except json.JSONDecodeError:
        continue
    if m.group(1) == "->" and msg.get("method") == "codeAction/resolve":
        sent.add(msg["id"])
    elif m.group(1) == "<-" and "method" not in msg:
        answered.add(msg.get("id"))
sys.exit(0 if sent & answered else 1)
EOF
  }
  chosen_at=$SECONDS
  r=0; wait_for 30 resolved || r=$?
  check "codeAction/resolve answered within 30 s (after $((SECONDS - chosen_at)) s)" $r
  sleep 1
  keep_screen code-action-answered
  echo "--- status line after the answer"
  screen | tail -2
  normal
  keys ":w" Enter
  sleep 1
  after=$(cat "$work/shapes.py")
  if [ "$before" != "$after" ]; then
    echo "the refactor changed the file:"
    diff <(echo "$before") <(echo "$after") || true
    r=0; "$python" -c 'import ast, sys; ast.parse(open(sys.argv[1]).read())' "$work/shapes.py" || r=$?
    check "the refactored file is valid Python" $r
  else
    reason=$(grep -oE 'exlsp <- \{"error".*' "$work/helix.log" | tail -1 | grep -oE '"message": "[^"]*"' || true)
    echo "the server refused the refactor: $reason"
    r=0; [ -n "$reason" ] || r=1
    check "no change, and the server said why" $r
  fi
fi

[ $fail = 0 ] && echo PASS || echo FAILED
exit $fail

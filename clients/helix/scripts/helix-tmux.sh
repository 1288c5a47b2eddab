#!/usr/bin/env bash
# Helix 25.x with exlsp, driven in tmux: the completion menu shows exlsp's
# suggestion, accepting it replaces the typed word (no duplication), the saved
# file holds it; code actions (`space a`) and hover (`space k`) are tried when
# the server offers them.
#
# usage: helix-tmux.sh [PYTHON] [MODEL_DIR]
#
# Helix comes from Debian sid (clients/scripts/debian-sid.sh) unless
# EXLSP_HX names an `hx` to use. Needs tmux. The LSP traffic is read back
# from Helix's own log (hx -vvv) to know the exact completion item.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../../.." && pwd)
python=${1:-python3}
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
printf 'import math\n\n\ndef area(radius):\n    return math.pi * radius * radius\n\n\n' >"$work/shapes.py"

"$hx" --version
tmux new-session -d -s "$session" -x 120 -y 40 -c "$work" \
  "XDG_CONFIG_HOME='$work/config' '$hx' -vvv --log '$work/helix.log' shapes.py; sleep 600"

screen() { tmux capture-pane -p -t "$session"; }
wait_for() { # wait_for SECONDS COMMAND...: poll until COMMAND succeeds
  local deadline=$((SECONDS + $1))
  shift
  until "$@"; do
    [ $SECONDS -ge $deadline ] && return 1
    sleep 0.3
  done
}

fail=0
check() { # check NAME STATUS
  if [ "$2" = 0 ]; then echo "ok   $1"; else echo "FAIL $1"; fail=1; fi
}

r=0; wait_for 240 grep -q "model ready" "$work/server.log" 2>/dev/null || r=$?
check "server loaded the model" $r

# Type a new function; the word "ra" triggers completion.
tmux send-keys -t "$session" g e o
sleep 0.3
tmux send-keys -t "$session" -l "def diameter(radius):"
tmux send-keys -t "$session" Enter
tmux send-keys -t "$session" -l "return ra"
menu_shown() { screen | grep -q "snippet"; }
r=0; wait_for 30 menu_shown || r=$?
check "completion menu shows an exlsp item" $r
echo "--- screen with the menu"
screen | sed -n '7,12p'

tmux send-keys -t "$session" Tab
sleep 0.5
tmux send-keys -t "$session" Escape
sleep 0.3
tmux send-keys -t "$session" ":w" Enter
sleep 1

# The last completion item exlsp sent, from Helix's log, applied to the typed line.
r=0
"$python" - "$work" <<'EOF' || r=$?
import json, re, sys
from pathlib import Path

work = Path(sys.argv[1])
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
typed = "return ra"
start, end = edit["range"]["start"]["character"], edit["range"]["end"]["character"]
expected = typed[:start] + edit["newText"] + typed[end:]
saved = (work / "shapes.py").read_text().splitlines()
print(f"item label {item['label']!r}, edit {start}-{end} -> {edit['newText']!r}")
print(f"saved line 9: {saved[8]!r}")
ok = saved[8] == expected
print(("ok   " if ok else "FAIL ") + f"accepted item replaced the typed word: {expected!r}")
dup = saved[8].startswith("return rara")
print(("ok   " if not dup else "FAIL ") + "no duplicated word")
caps = next(r["result"]["capabilities"] for r in responses
            if isinstance(r.get("result"), dict) and "capabilities" in r["result"])
(work / "caps.txt").write_text(
    " ".join(k for k in ("codeActionProvider", "hoverProvider") if caps.get(k)))
sys.exit(0 if ok and not dup else 1)
EOF
check "saved file holds the accepted completion" $r

caps=$(cat "$work/caps.txt" 2>/dev/null || true)
for feature in "codeActionProvider:a:code actions" "hoverProvider:k:hover"; do
  cap=${feature%%:*}
  rest=${feature#*:}
  key=${rest%%:*}
  name=${rest#*:}
  tmux send-keys -t "$session" Escape
  if [[ " $caps " == *" $cap "* ]]; then
    tmux send-keys -t "$session" g g Space "$key"
    sleep 3
    if screen | grep -q "No configured language server supports"; then
      check "$name from exlsp (space $key)" 1
    else
      check "$name from exlsp (space $key)" 0
    fi
    echo "--- screen after space $key"
    screen | tail -12
  else
    tmux send-keys -t "$session" Space "$key"
    sleep 1
    echo "skip $name: the server does not offer them yet; Helix says: $(screen | tail -1 | sed 's/  */ /g')"
  fi
done

[ $fail = 0 ] && echo PASS || echo FAILED
exit $fail

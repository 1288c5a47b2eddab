#!/usr/bin/env bash
# exlsp.el with lsp-mode 10 in `emacs --batch` against the real server.
#
# usage: emacs-lsp-batch.sh [PYTHON] [MODEL_DIR]
#
# Uses the host's `emacs` (27.1+; Debian: apt-get install emacs-nox) and
# lsp-mode 10 with its dependencies from Debian sid (elpa-lsp-mode, lisp
# sources only: clients/scripts/debian-sid.sh), unless EXLSP_LOAD_PATH
# already names lisp folders holding lsp-mode. Checks that the exlsp client
# starts, reports ready, enables lsp-inline-completion-mode; that typing
# makes the mode show a suggestion as an overlay; that ESC RET (M-RET, as a
# terminal sends it) inserts the text and the saved file holds it; that
# C-<return> and M-<return> are bound too; that C-g hides the next one;
# that a suggestion asked for mid-word replaces the word (it appears once);
# that `exlsp stats` counted each accept (lsp-mode runs the item's command,
# exlsp.accepted, after inserting it).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../../.." && pwd)
python=${1:-python3}
# The editor starts the server from another folder: use an absolute path.
case $python in */*) python=$(realpath -s "$python") ;; *) python=$(command -v "$python") ;; esac
model=${2:-}

if [ -z "${EXLSP_LOAD_PATH:-}" ]; then
  # shellcheck source=../../scripts/debian-sid.sh
  source "$repo/clients/scripts/debian-sid.sh"
  sid_fetch elpa-lsp-mode >/dev/null
  EXLSP_LOAD_PATH=$(find "$SID_ROOT/usr/share/emacs/site-lisp/elpa-src" -mindepth 1 -maxdepth 1 -type d | paste -sd:)
fi
if [ -z "$model" ]; then
  model=$("$python" -c 'from exlsp.benchmarks.build_model import DEFAULT_MODEL, ensure_model; print(ensure_model(**DEFAULT_MODEL))')
fi

work=$(mktemp -d)
if [ -n "${EXLSP_KEEP:-}" ]; then echo "work folder: $work"; else trap 'rm -rf "$work"' EXIT; fi
# The server's acceptance counts, which the script reads back with `exlsp stats`.
export EXLSP_STATE_DIR=$work/exlsp-state
export EXLSP_LOAD_PATH EXLSP_EL_DIR=$repo/clients/emacs EXLSP_PYTHON=$python EXLSP_MODEL=$model EXLSP_WORK=$work
HOME=$work timeout 600 emacs --batch -Q -l "$here/emacs_lsp_batch.el"

"""The Emacs package's accept keys, in a real `emacs --batch` with lsp-mode 10.

lsp-mode's `C-<return>` reaches a graphical Emacs only: a terminal (and tmux)
sends RET for it. exlsp.el also binds Meta+Enter, which a terminal sends as
ESC RET and a graphical Emacs reports as M-<return>. Needs `emacs` and
lsp-mode 10's lisp folders: `$EXLSP_LOAD_PATH` (colon-separated), or those
clients/scripts/debian-sid.sh fetched (`sid_fetch elpa-lsp-mode`); skipped
otherwise. No server is started.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

EMACS_DIR = Path(__file__).resolve().parents[1] / "clients" / "emacs"

CHECK = r"""
(dolist (dir (split-string (getenv "EXLSP_LOAD_PATH") ":" t))
  (add-to-list 'load-path dir))
(add-to-list 'load-path (getenv "EXLSP_EL_DIR"))
(require 'exlsp)
(require 'lsp-inline-completion)
(dolist (key `(("C-<return>" . ,(kbd "C-<return>"))
               ("M-<return>" . ,(kbd "M-<return>"))
               ("M-RET" . ,(kbd "M-RET"))
               ("ESC-RET" . [27 13])))
  (princ (format "%s %S\n" (car key)
                 (lookup-key lsp-inline-completion-active-map (cdr key)))))
"""


def _lsp_mode_dirs() -> list[str]:
    configured = os.environ.get("EXLSP_LOAD_PATH")
    if configured:
        return configured.split(":")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    sid = Path(os.environ.get("EXLSP_SID_DIR") or cache / "exlsp-sid")
    elpa = sid / "root" / "usr" / "share" / "emacs" / "site-lisp" / "elpa-src"
    return [str(d) for d in sorted(elpa.glob("*")) if d.is_dir()]


def test_meta_return_accepts_in_a_terminal_and_in_a_gui(tmp_path: Path) -> None:
    emacs = shutil.which("emacs")
    if emacs is None:
        pytest.skip("no emacs (Debian: apt-get install emacs-nox)")
    dirs = _lsp_mode_dirs()
    if not any((Path(d) / "lsp-inline-completion.el").is_file() for d in dirs):
        pytest.skip("no lsp-mode 10: set EXLSP_LOAD_PATH or run sid_fetch elpa-lsp-mode")
    proc = subprocess.run(
        [emacs, "--batch", "-Q", "--eval", f"(progn {CHECK})"],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "HOME": str(tmp_path),
            "EXLSP_LOAD_PATH": ":".join(dirs),
            "EXLSP_EL_DIR": str(EMACS_DIR),
        },
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    bound = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    accept = "lsp-inline-completion-accept"
    assert bound == {
        "C-<return>": accept,  # graphical Emacs, lsp-mode's own key
        "M-<return>": accept,  # graphical Emacs
        "M-RET": accept,
        "ESC-RET": accept,  # the events a terminal sends for Meta+Enter
    }, proc.stdout

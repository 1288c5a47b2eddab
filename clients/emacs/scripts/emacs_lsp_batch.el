;;; emacs_lsp_batch.el --- exlsp.el with lsp-mode in `emacs --batch'  -*- lexical-binding: t; -*-

;; Loaded by emacs-lsp-batch.sh with these variables set in the environment:
;; EXLSP_LOAD_PATH (colon-separated lisp folders), EXLSP_EL_DIR, EXLSP_PYTHON,
;; EXLSP_MODEL, EXLSP_WORK.  Prints "ok"/"FAIL" lines and exits non-zero on a
;; failure.

;;; Code:

(dolist (dir (split-string (or (getenv "EXLSP_LOAD_PATH") "") ":" t))
  (add-to-list 'load-path dir)
  ;; What package.el would do for installed packages.
  (dolist (autoloads (directory-files dir t "-autoloads\\.el\\'"))
    (load autoloads nil t)))
(add-to-list 'load-path (getenv "EXLSP_EL_DIR"))

(defvar exlsp-test-failures 0)
(defvar exlsp-test-work (file-name-as-directory (getenv "EXLSP_WORK")))

(defun exlsp-test-check (name ok &optional detail)
  (princ (format "%s %s%s\n" (if ok "ok  " "FAIL") name
                 (if (and detail (not ok)) (format " -- %S" detail) "")))
  (unless ok (setq exlsp-test-failures (1+ exlsp-test-failures)))
  ok)

(defun exlsp-test-wait (pred seconds)
  "Process events until PRED returns non-nil or SECONDS pass; PRED's value."
  (let ((deadline (+ (float-time) seconds)) value)
    (while (and (not (setq value (funcall pred))) (< (float-time) deadline))
      (accept-process-output nil 0.1))
    value))

(defun exlsp-test-finish ()
  (princ (if (zerop exlsp-test-failures) "PASS\n" "FAILED\n"))
  (kill-emacs (if (zerop exlsp-test-failures) 0 1)))

(setq lsp-session-file (expand-file-name "lsp-session" exlsp-test-work)
      lsp-auto-guess-root t
      lsp-enabled-clients '(exlsp)
      lsp-log-io t
      lsp-restart 'ignore
      lsp-warn-no-matched-clients nil
      python-indent-guess-indent-offset nil)

(require 'lsp-mode)
(require 'exlsp)
(princ (format "Emacs %s, %s\n" emacs-version
               (file-name-nondirectory
                (directory-file-name (file-name-directory (locate-library "lsp-mode"))))))

(setq exlsp-python (getenv "EXLSP_PYTHON")
      exlsp-server-args (list "--log-file" (expand-file-name "server.log" exlsp-test-work)
                              "--log-level" "debug")
      exlsp-model-path (getenv "EXLSP_MODEL"))

(exlsp-test-check "settings tree: camelCase, false as :json-false"
                  (let ((json (json-encode (exlsp--tree))))
                    (and (string-match-p "\"maxSeqLen\":8192" json)
                         (string-match-p "\"ngramDraft\":false" json)
                         (string-match-p "\"kvReuse\":true" json)))
                  (json-encode (exlsp--tree)))

(make-directory (expand-file-name ".git" exlsp-test-work) t)
(let ((file (expand-file-name "shapes.py" exlsp-test-work)))
  (with-temp-file file
    (insert "import math\n\n\ndef area(radius):\n    return math.pi * radius * radius\n\n\n"))
  (find-file file))
(python-mode)
(lsp)

(unless (exlsp-test-check
         "exlsp workspace started"
         (exlsp-test-wait (lambda ()
                            (cl-some (lambda (w) (eq (lsp--workspace-status w) 'initialized))
                                     (lsp-workspaces)))
                          60))
  (exlsp-test-finish))
(exlsp-test-check "exlsp/status ready"
                  (exlsp-test-wait (lambda () (and exlsp--status
                                                   (equal (gethash "state" exlsp--status) "ready")))
                                   180)
                  exlsp--status)
(exlsp-test-check "lsp-inline-completion-mode on in the buffer"
                  (bound-and-true-p lsp-inline-completion-mode))
(exlsp-test-check "server offers inline completion"
                  (lsp-feature? "textDocument/inlineCompletion"))

;; Type, and let lsp-inline-completion-mode ask by itself: a change arms
;; lsp-mode's idle timer for `lsp-on-change-hook', where the mode arms its
;; own idle timer that asks for a suggestion.  A batch Emacs is never idle,
;; so each armed idle timer is run by hand (what Emacs does after that many
;; seconds without input).
(defun exlsp-test-run-idle-timer (timer-fn)
  "Wait for the idle timer TIMER-FN returns to be armed, run it; non-nil if it was."
  (let ((timer (exlsp-test-wait (lambda ()
                                  (let ((timer (funcall timer-fn)))
                                    (and (timerp timer) (memq timer timer-idle-list) timer)))
                                5)))
    (when timer
      (timer-event-handler timer)
      t)))

(defun exlsp-test-overlay-text ()
  (and (overlayp lsp-inline-completion--overlay)
       (overlay-get lsp-inline-completion--overlay 'after-string)))

(defvar exlsp-test-armed nil "Non-nil once typing armed the mode's idle timer.")

(defun exlsp-test-type-until-shown (chunks)
  "Insert CHUNKS one by one until a suggestion shows; its overlay text."
  (let (shown)
    (while (and chunks (not shown))
      (insert (pop chunks))
      (when (and (exlsp-test-run-idle-timer (lambda () lsp--on-change-timer))
                 (exlsp-test-run-idle-timer (lambda () lsp-inline-completion--idle-timer)))
        (setq exlsp-test-armed t)
        (setq shown (exlsp-test-wait #'exlsp-test-overlay-text 20))))
    shown))

;; The accepts lsp-mode reports: it runs the item's command after inserting it.
(defvar exlsp-test-reported 0 "How many times lsp-mode ran exlsp.accepted.")
(advice-add 'lsp--execute-command :before
            (lambda (action &rest _)
              (when (equal (lsp:command-command action) "exlsp.accepted")
                (setq exlsp-test-reported (1+ exlsp-test-reported)))))

(defun exlsp-test-key (key)
  "Run what KEY does while a suggestion shows; return the command.
KEY is a `kbd' string, or a vector of the events a terminal sends, looked
up in the keymaps active now (lsp-mode pushes its active map while the
overlay shows)."
  (let ((command (if (stringp key)
                     (lookup-key lsp-inline-completion-active-map (kbd key))
                   (key-binding key t))))
    (when (commandp command)
      (setq this-command command)
      (call-interactively command))
    command))

(goto-char (point-max))
(let ((shown (exlsp-test-type-until-shown '("def diameter(radius):" "\n    return " "2"))))
  (exlsp-test-check "typing armed lsp-inline-completion-mode's idle timer" exlsp-test-armed)
  (when (exlsp-test-check "ghost text overlay shown" shown)
    (let* ((before (buffer-string))
           ;; Where the request was made: at the end of a line lsp-mode parks
           ;; point one character back while the overlay shows.
           (start lsp-inline-completion--start-point)
           (item (elt lsp-inline-completion--items lsp-inline-completion--current))
           (text (lsp:inline-completion-item-insert-text item)))
      (princ (format "suggestion at %d: %S\n" start text))
      (exlsp-test-check "overlay shows the suggestion"
                        (string-suffix-p (substring-no-properties text)
                                         (substring-no-properties shown))
                        shown)
      ;; C-<return> reaches a graphical Emacs only; a terminal (and tmux)
      ;; sends ESC RET for Meta+Enter, a graphical Emacs M-<return>.
      (exlsp-test-check "C-<return> is lsp-inline-completion-accept"
                        (eq (lookup-key lsp-inline-completion-active-map (kbd "C-<return>"))
                            'lsp-inline-completion-accept))
      (exlsp-test-check "M-<return> (graphical Emacs) is lsp-inline-completion-accept"
                        (eq (key-binding (kbd "M-<return>") t) 'lsp-inline-completion-accept)
                        (key-binding (kbd "M-<return>") t))
      (let ((command (exlsp-test-key [27 13])))
        (exlsp-test-check "ESC RET (M-RET from a terminal) runs lsp-inline-completion-accept"
                          (eq command 'lsp-inline-completion-accept) command))
      (let ((expected (concat (substring before 0 (1- start)) text
                              (substring before (1- start)))))
        (exlsp-test-check "accept inserts it at point"
                          (string= (buffer-substring-no-properties (point-min) (point-max))
                                   expected)
                          (list :got (buffer-substring-no-properties (point-min) (point-max))
                                :expected expected))
        (exlsp-test-check "the overlay is gone after accepting" (not (exlsp-test-overlay-text)))
        (save-buffer)
        ;; Saving may add the final newline python-mode requires.
        (exlsp-test-check "saved file holds it"
                          (string= (string-trim-right expected "\n")
                                   (let ((file buffer-file-name))
                                     (with-temp-buffer
                                       (insert-file-contents file)
                                       (string-trim-right (buffer-string) "\n")))))))))

;; A second suggestion, cancelled with C-g: the overlay goes, the text stays.
(goto-char (point-max))
(let ((shown (exlsp-test-type-until-shown '("\n\ndef volume(side):" "\n    return " "side"))))
  (when shown
    (let ((before (buffer-substring-no-properties (point-min) (point-max))))
      (exlsp-test-check "C-g is lsp-inline-completion-cancel"
                        (eq (exlsp-test-key "C-g") 'lsp-inline-completion-cancel))
      (exlsp-test-check "C-g hides the suggestion, the text stays"
                        (and (not (exlsp-test-overlay-text))
                             (string= before (buffer-substring-no-properties
                                              (point-min) (point-max))))))))

;; A suggestion asked for in the middle of a word: its range starts where the
;; word starts and its text begins with the word; accepting replaces the
;; word, which then appears once.
(goto-char (point-max))
(let ((shown (exlsp-test-type-until-shown '("\n\ndef cube(side):\n    return si" "de" " * si" "de"))))
  (when (exlsp-test-check "a suggestion after part of a word" shown)
    (let* ((before (buffer-substring-no-properties (point-min) (point-max)))
           (start lsp-inline-completion--start-point)
           (item (elt lsp-inline-completion--items lsp-inline-completion--current))
           (text (lsp:inline-completion-item-insert-text item))
           (range-start (lsp--position-to-point
                         (lsp:range-start (lsp:inline-completion-item-range? item))))
           (word (buffer-substring-no-properties range-start start)))
      (exlsp-test-check "its range starts at the word, its text begins with it"
                        (and (< range-start start) (string-prefix-p word text))
                        (list :word word :text text))
      (exlsp-test-check "it carries the exlsp.accepted command"
                        (equal (lsp:command-command (lsp:inline-completion-item-command? item))
                               "exlsp.accepted"))
      (exlsp-test-key [27 13])
      (let ((expected (concat (substring before 0 (1- range-start)) text
                              (substring before (1- start)))))
        (exlsp-test-check "accept replaces the typed word: it appears once"
                          (string= (buffer-substring-no-properties (point-min) (point-max))
                                   expected)
                          (list :got (buffer-substring-no-properties (point-min) (point-max))
                                :expected expected))))))

(exlsp-test-check "mode line status" (string-prefix-p "exlsp" (exlsp-status-string))
                  (exlsp-status-string))
(princ (format "mode line: %s\n" (exlsp-status-string)))

(exlsp-test-check "exlsp/stats answers"
                  (let ((stats (lsp-request "exlsp/stats" (make-hash-table))))
                    (princ (format "stats: %s\n" (json-encode stats)))
                    stats))

;; The server writes its acceptance counts at shutdown; `exlsp stats` reads
;; them ($EXLSP_STATE_DIR, set by emacs-lsp-batch.sh).
(let ((workspaces (lsp-workspaces)))
  (mapc #'lsp-workspace-shutdown workspaces)
  (exlsp-test-check "server stopped"
                    (exlsp-test-wait
                     (lambda ()
                       (cl-notany (lambda (w) (process-live-p (lsp--workspace-proc w))) workspaces))
                     15)))
(let* ((out (with-temp-buffer
              (call-process exlsp-python nil '(t nil) nil "-m" "exlsp.server" "stats" "--json")
              (buffer-string)))
       (data (ignore-errors (json-parse-string out :object-type 'alist)))
       (accepted 0))
  (dolist (model (alist-get 'models data))
    (dolist (language (cdr model))
      (setq accepted (+ accepted (alist-get 'accepted (cdr language) 0)))))
  (princ (format "exlsp stats: %s accepted (lsp-mode ran exlsp.accepted %d times)\n"
                 accepted exlsp-test-reported))
  (exlsp-test-check "exlsp stats counted each accept lsp-mode reported"
                    (and (>= exlsp-test-reported 1) (= accepted exlsp-test-reported))
                    out))
(exlsp-test-finish)
;;; emacs_lsp_batch.el ends here

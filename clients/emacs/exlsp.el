;;; exlsp.el --- exlsp (local AI code completion) for lsp-mode  -*- lexical-binding: t; -*-

;; Version: 0.1.0
;; Package-Requires: ((emacs "27.1") (lsp-mode "9.0"))
;; Keywords: languages, tools, convenience
;; SPDX-License-Identifier: Apache-2.0

;;; Commentary:

;; Registers the exlsp language server with lsp-mode as an add-on client, so
;; it runs beside each buffer's usual server, and turns on
;; `lsp-inline-completion-mode' (lsp-mode 10) in the buffers it serves: the
;; suggestion is drawn as an overlay after point, C-<return> (graphical
;; Emacs) or M-RET (also in a terminal) accepts it, C-n / C-p cycle, C-g
;; cancels.  With lsp-mode 9, which has the
;; overlay but not the minor mode, an idle timer asks for suggestions instead.
;; Without either, exlsp still offers completion items (company / corfu).
;;
;;   (add-to-list 'load-path "/path/to/exlsp/clients/emacs")
;;   (require 'exlsp)
;;   (setq exlsp-python "~/.venvs/exlsp/bin/python")  ; or exlsp-server-command
;;   (setq exlsp-model-path "/models/Qwen2.5-Coder-1.5B-exl2"
;;         exlsp-model-backend "exllamav2")
;;   (add-hook 'python-mode-hook #'lsp-deferred)
;;
;; The settings below mirror the server's configuration tree: they are sent
;; as initializationOptions, answered for workspace/configuration (section
;; "exlsp") and pushed again with workspace/didChangeConfiguration by
;; `lsp--set-configuration' when changed through Customize.

;;; Code:

(require 'lsp-mode)
(require 'cl-lib)
(require 'subr-x)

(defgroup exlsp nil
  "exlsp: code completion from a local code model."
  :group 'lsp-mode
  :prefix "exlsp-")

(defcustom exlsp-server-command nil
  "Full command that starts the server, e.g. (\"ssh\" \"gpu-box\" \"exlsp\" \"serve\").
Nil: `exlsp-python' -m exlsp.server serve when that is set, else exlsp serve."
  :type '(choice (const :tag "Default" nil) (repeat string)))

(defcustom exlsp-python nil
  "Python interpreter that has exlsp installed.
The server is started as PYTHON -m exlsp.server serve."
  :type '(choice (const :tag "exlsp on PATH" nil) file))

(defcustom exlsp-server-args nil
  "Server options placed before `serve', e.g. (\"--log-level\" \"debug\")."
  :type '(repeat string))

(defcustom exlsp-major-modes '(prog-mode)
  "Major modes (and modes derived from them) exlsp runs in."
  :type '(repeat symbol))

(defcustom exlsp-inline-completion t
  "Show suggestions as ghost text (inline completion) in exlsp buffers."
  :type 'boolean)

(defcustom exlsp-accept-keys '("M-RET" "M-<return>")
  "Extra keys that accept the shown suggestion (lsp-mode 10).
lsp-mode's own `C-<return>' works in a graphical Emacs only: a terminal
sends the same byte for C-<return> as for RET.  Meta+Enter arrives in a
terminal (also under tmux and screen) as ESC RET, which is `M-RET'; a
graphical Emacs reports it as `M-<return>'.  Each key is bound in
`lsp-inline-completion-active-map', the keymap active while a suggestion
shows, so it does nothing else meanwhile and keeps its usual meaning
otherwise.  Set before lsp-inline-completion is loaded."
  :type '(repeat string))

(defcustom exlsp-idle-delay 0.3
  "Idle seconds after a change before asking for a suggestion."
  :type 'number)

(defconst exlsp--settings
  ;; (setting-name default type docstring) for each leaf of the tree.
  '(("exlsp.model.path" "" string "Hugging Face / EXL2 model directory; empty: the built-in default.")
    ("exlsp.model.backend" "transformers" string "transformers, exllamav2, exllamav3, openai or instant.")
    ("exlsp.model.device" "auto" string "auto, cpu, cuda, cuda:1, ...")
    ("exlsp.model.dtype" "auto" string "auto, float32, float16 or bfloat16.")
    ("exlsp.model.fimTemplate" "auto" string "FIM template family; auto detects it.")
    ("exlsp.model.contextLength" 0 integer "Tokens kept in the KV cache; 0: the model's limit.")
    ("exlsp.model.cacheType" "q8" string "exllamav2 KV cache: fp16, q8, q6 or q4.")
    ("exlsp.model.maxSeqLen" 8192 integer "exllamav2 cache length (multiple of 256).")
    ("exlsp.model.ngramDraft" nil boolean "exllamav2, exllamav3: n-gram speculative decoding.")
    ("exlsp.model.prefillChunk" 1024 integer "exllamav3: prompt tokens per prefill pass (a multiple of 256).")
    ("exlsp.model.pageCacheRamMiB" 0 integer "exllamav3: pinned RAM (MiB) for cache pages evicted from the GPU; 0: off.")
    ("exlsp.model.pageCacheDiskMiB" 0 integer "exllamav3: disk budget (MiB) for cache pages kept across restarts; 0: off.")
    ("exlsp.model.pageCacheDir" "" string "exllamav3: folder of the disk cache pages; empty: <cache dir>/exl3-pages.")
    ("exlsp.model.threads" 1 integer "CPU threads of the transformers backend; 0: torch's default (one per core).")
    ("exlsp.model.host" "auto" string "auto: one model host shared by every editor; off: in the server's process.")
    ("exlsp.model.hostIdleMinutes" 15 integer "The model host exits this long after its last editor left.")
    ("exlsp.model.hostSlots" 4 integer "KV caches the model host keeps, least recently used dropped first.")
    ("exlsp.model.baseUrl" "" string "openai backend: the OpenAI-compatible server's base URL, e.g. http://gpu-pool:8000/v1.")
    ("exlsp.model.remoteModel" "" string "openai backend: the model name sent with each request; empty: the server's first model.")
    ("exlsp.model.apiKey" "" string "openai backend: API key; prefer the variable named by `exlsp-model-api-key-env'.")
    ("exlsp.model.apiKeyEnv" "EXLSP_API_KEY" string "openai backend: environment variable read for the API key.")
    ("exlsp.model.promptFormat" "auto" string "openai backend: how the prompt is sent.")
    ("exlsp.model.verifyTls" t boolean "openai backend: check the server's TLS certificate.")
    ("exlsp.model.caFile" "" string "openai backend: PEM bundle of a private CA.")
    ("exlsp.model.connectTimeoutMs" 3000 integer "openai backend: connection timeout (ms).")
    ("exlsp.model.readTimeoutMs" 10000 integer "openai backend: longest silence while a reply streams (ms).")
    ("exlsp.model.cachePrompt" t boolean "openai backend: ask llama.cpp's server to keep the prompt's KV cache.")
    ("exlsp.model.fallback" [] sexp "What serves when the model cannot load or dies, tried in order: each entry is a partial 'exlsp.model' object applied over it, e.g. '[{\"backend\": \"transformers\", \"device\": \"cuda\"}, {\"backend\": \"openai\", \"baseUrl\": \"http://gpu-pool:8000/v1\"}, {\"backend\": \"transformers\", \"path\": \"\"}]' (the last: the built-in model).")
    ("exlsp.completion.enabled" t boolean "Show completions.")
    ("exlsp.completion.prefixTokens" 1024 integer "Token budget above the cursor line.")
    ("exlsp.completion.suffixTokens" 256 integer "Token budget after the cursor.")
    ("exlsp.completion.middleTokens" 256 integer "Token budget left of the cursor on its line.")
    ("exlsp.completion.snippetTokens" 1024 integer "Token budget for context snippets.")
    ("exlsp.completion.maxTokens" 128 integer "Most tokens of a multi-line suggestion.")
    ("exlsp.completion.maxTokensSingleLine" 48 integer "Most tokens of a single-line suggestion.")
    ("exlsp.completion.deadlineMs" 2000 integer "Wall-clock limit per suggestion (ms).")
    ("exlsp.completion.multiline" "auto" string "auto, always or never.")
    ("exlsp.completion.attachGraceMs" 40 integer "Grace for attaching to a cancelled generation (ms).")
    ("exlsp.completion.snippetRefreshLines" 40 integer "Refresh snippets after moving this many lines.")
    ("exlsp.completion.snippetRefreshIdleMs" 1500 integer "Refresh snippets after this idle time (ms).")
    ("exlsp.completion.kvReuse" t boolean "Reuse the KV cache across requests.")
    ("exlsp.completion.streamPartial" t boolean "Send exlsp/partialCompletion while streaming.")
    ("exlsp.completion.typeAheadEntries" 64 integer "Type-ahead results kept per document.")
    ("exlsp.completion.prefetch" t boolean "Prepare the next suggestion as if the shown one were accepted.")
    ("exlsp.completion.acceptanceStats" t boolean "Count suggestions shown and accepted in a local file (never sent).")
    ("exlsp.hover.enabled" t boolean "Explain the code under the cursor on hover with the model.")
    ("exlsp.hover.deadlineMs" 2000 integer "Wall-clock limit of a hover explanation (ms); what is ready by then is shown.")
    ("exlsp.hover.maxTokens" 160 integer "Most tokens of a hover explanation.")
    ("exlsp.codeActions.enabled" t boolean "Offer refactor code actions computed by the model.")
    ("exlsp.codeActions.deadlineMs" 8000 integer "Wall-clock limit to compute a refactor edit (ms).")
    ("exlsp.codeActions.maxTokens" 400 integer "Most tokens of a refactor edit.")
    ("exlsp.assist.backend" "" string "Model for hover and code actions. Empty: the completion model ('exlsp.model') serves them; else a second model: 'transformers', 'exllamav2' (loaded in the same process, on its own thread) or 'openai' (a remote server).")
    ("exlsp.assist.path" "" string "Assist model directory (an instruction-tuned model with a chat template); 'openai': the served model's tokenizer directory. Empty with a local backend: the built-in model.")
    ("exlsp.assist.device" "auto" string "Device for the assist model: 'auto', 'cpu', 'cuda', 'cuda:1', ...")
    ("exlsp.assist.dtype" "auto" string "Assist model weights' dtype.")
    ("exlsp.assist.fimTemplate" "auto" string "Assist model's FIM template (docstrings from a base model); 'auto' detects it.")
    ("exlsp.assist.contextLength" 0 integer "Tokens the assist model may keep in its KV cache; 0: the model's own limit.")
    ("exlsp.assist.cacheType" "q8" string "exllamav2: the assist model's KV cache type.")
    ("exlsp.assist.maxSeqLen" 4096 integer "exllamav2: the assist model's cache length in tokens.")
    ("exlsp.assist.threads" 0 integer "CPU threads for the assist model (0: torch's default).")
    ("exlsp.assist.baseUrl" "" string "'openai' assist backend: the server's base URL, e.g. 'http://gpu-pool:8000/v1'.")
    ("exlsp.assist.remoteModel" "" string "'openai' assist backend: the model name to request (empty: the server's first).")
    ("exlsp.assist.apiKey" "" string "'openai' assist backend: API key. Prefer 'exlsp.assist.apiKeyEnv'. Never logged.")
    ("exlsp.assist.apiKeyEnv" "EXLSP_API_KEY" string "'openai' assist backend: the environment variable read for the API key (only 'EXLSP_*' names).")
    ("exlsp.assist.promptFormat" "auto" string "'openai' assist backend: 'tokens', 'text' or 'auto'.")
    ("exlsp.assist.verifyTls" t boolean "'openai' assist backend: check the server's TLS certificate.")
    ("exlsp.assist.caFile" "" string "'openai' assist backend: a private CA's PEM bundle.")
    ("exlsp.assist.connectTimeoutMs" 3000 integer "'openai' assist backend: connection timeout.")
    ("exlsp.assist.readTimeoutMs" 10000 integer "'openai' assist backend: the longest silence while a reply streams.")
    ("exlsp.index.enabled" t boolean "Index the workspace and show the model code retrieved from other files.")
    ("exlsp.index.include" ["*"] sexp "Files to index (.gitignore syntax).")
    ("exlsp.index.exclude" [".git/" ".hg/" ".svn/" ".jj/" "node_modules/" "bower_components/" "__pycache__/" ".mypy_cache/" ".pytest_cache/" ".ruff_cache/" ".tox/" ".nox/" ".venv/" "venv/" ".direnv/" "site-packages/" "*.egg-info/" ".eggs/" "build/" "dist/" "target/" ".gradle/" ".next/" ".nuxt/" ".cache/" ".idea/" "coverage/" "htmlcov/" "*.min.js" "*.min.css" "*.map" "*.lock" "package-lock.json" "tokenizer.json" "*.jsonl" "*.ndjson" "*.pyc" "*.pyo" "*.so" "*.dll" "*.dylib" "*.o" "*.a" "*.class" "*.jar" ".gitignore" ".gitattributes" ".gitmodules" ".DS_Store"] sexp "Files never indexed (.gitignore syntax); replaces the default list.")
    ("exlsp.index.maxFileBytes" 1000000 integer "Skip files larger than this.")
    ("exlsp.index.maxDataFileBytes" 65536 integer "Data files (.json, .jsonl, .ndjson, .geojson, .csv, .tsv) larger than this many bytes are not indexed (0: no limit).")
    ("exlsp.index.embeddingModel" "" string "\"\": the built-in all-MiniLM-L6-v2; \"none\": lexical retrieval only; else a local sentence-transformers directory.")
    ("exlsp.index.embeddingDevice" "auto" string "auto, cpu or cuda.")
    ("exlsp.index.embeddingBatchSize" 32 integer "Chunks embedded per batch.")
    ("exlsp.index.databaseDir" "" string "Where the index lives; \"\": a per-workspace folder in the user cache.")
    ("exlsp.index.sharedIndex" "" string "A shared index built elsewhere (s3://bucket/prefix or a directory), read only.")
    ("exlsp.index.storageEndpoint" "" string "Object storage: an S3-compatible endpoint URL; empty: AWS or AWS_ENDPOINT_URL.")
    ("exlsp.index.storageRegion" "" string "Object storage region; empty: AWS_REGION.")
    ("exlsp.index.storageAccessKeyId" "" string "Object storage access key id; empty: AWS_ACCESS_KEY_ID.")
    ("exlsp.index.storageSecretAccessKey" "" string "Object storage secret key; empty: AWS_SECRET_ACCESS_KEY (preferred).")
    ("exlsp.index.debounceMs" 300 integer "Wait this long after file changes before indexing them (ms).")
    ("exlsp.index.chunkLines" 60 integer "Lines per chunk outside definitions.")
    ("exlsp.index.chunkOverlap" 10 integer "Lines shared by neighbouring chunks.")
    ("exlsp.index.queryLinesBefore" 15 integer "Lines above the cursor used as the retrieval query.")
    ("exlsp.index.queryLinesAfter" 5 integer "Lines below the cursor used as the retrieval query.")
    ("exlsp.index.excludeLines" 80 integer "Chunks of the current file within this many lines of the cursor are not retrieved.")
    ("exlsp.index.maxSnippets" 8 integer "Most snippets retrieved per refresh.")
    ("exlsp.index.recentEdits" 3 integer "Recently edited ranges of other open documents to include.")
    ("exlsp.logging.level" "info" string "debug, info, warning, error or critical.")
    ("exlsp.logging.file" "" string "Also log to this file."))
  "The server's settings, their defaults and types.")

(defun exlsp--variable (name)
  "The Lisp variable of setting NAME.
exlsp.model.maxSeqLen -> `exlsp-model-max-seq-len'."
  (let ((case-fold-search nil))
    (intern (downcase (replace-regexp-in-string
                       "\\([a-z0-9]\\)\\([A-Z]\\)" "\\1-\\2"
                       (replace-regexp-in-string "\\." "-" name))))))

;; One defcustom per setting, registered with lsp-mode under its wire name.
(dolist (spec exlsp--settings)
  (cl-destructuring-bind (name default type doc) spec
    (let ((var (exlsp--variable name)))
      (eval `(defcustom ,var ',default ,doc
               :type ',type
               :group 'exlsp
               :initialize #'custom-initialize-default
               :set (lambda (sym value)
                      (set-default sym value)
                      (when (fboundp 'exlsp--push-configuration)
                        (exlsp--push-configuration))))
            t)
      (lsp-register-custom-settings
       (list (list name var (if (eq type 'boolean) t nil)))))))

(defun exlsp--tree ()
  "The configuration tree as a nested hash table (camelCase keys)."
  (let ((tree (make-hash-table :test 'equal)))
    (dolist (spec exlsp--settings)
      (let* ((name (car spec))
             (type (nth 2 spec))
             (parts (cdr (split-string name "\\.")))
             (section (or (gethash (car parts) tree)
                          (puthash (car parts) (make-hash-table :test 'equal) tree)))
             (value (symbol-value (exlsp--variable name))))
        (puthash (cadr parts)
                 (if (eq type 'boolean) (if value t :json-false) value)
                 section)))
    tree))

(defun exlsp--push-configuration ()
  "Send the settings to running exlsp servers."
  (dolist (workspace (lsp--session-workspaces (lsp-session)))
    (when (eq (lsp--client-server-id (lsp--workspace-client workspace)) 'exlsp)
      (with-lsp-workspace workspace
        (lsp-notify "workspace/didChangeConfiguration"
                    (list :settings (let ((h (make-hash-table :test 'equal)))
                                      (puthash "exlsp" (exlsp--tree) h)
                                      h)))))))

(defun exlsp--command ()
  "The command line that starts the server."
  (or exlsp-server-command
      (append (if exlsp-python
                  (list (expand-file-name exlsp-python) "-m" "exlsp.server")
                (list "exlsp"))
              exlsp-server-args
              (list "serve"))))

(defvar exlsp--status nil "Last exlsp/status payload (a hash table).")

(defun exlsp--on-status (_workspace params)
  "Handle exlsp/status PARAMS."
  (setq exlsp--status params)
  (force-mode-line-update t))

(defun exlsp-status-string ()
  "A short status for the mode line: exlsp 42ms, exlsp loading, ..."
  (if (null exlsp--status)
      ""
    (let ((state (gethash "state" exlsp--status))
          (ms (gethash "lastLatencyMs" exlsp--status)))
      (cond ((and (equal state "ready") (numberp ms)) (format "exlsp %dms" (round ms)))
            ((equal state "ready") "exlsp")
            (t (format "exlsp %s" state))))))

(defun exlsp-status ()
  "Show the exlsp server status."
  (interactive)
  (if (null exlsp--status)
      (message "exlsp: no status yet")
    (message "exlsp: %s %s — model %s, backend %s"
             (gethash "state" exlsp--status)
             (or (gethash "message" exlsp--status) "")
             (gethash "model" exlsp--status)
             (gethash "backend" exlsp--status))))

(defun exlsp--activate-p (&rest _)
  "Whether exlsp should run in this buffer."
  (and buffer-file-name (apply #'derived-mode-p exlsp-major-modes)))

(lsp-register-client
 (make-lsp-client
  :new-connection (lsp-stdio-connection #'exlsp--command)
  :activation-fn #'exlsp--activate-p
  :add-on? t
  :priority -2
  :server-id 'exlsp
  :initialization-options #'exlsp--tree
  :initialized-fn (lambda (workspace)
                    (with-lsp-workspace workspace
                      (lsp--set-configuration (lsp-configuration-section "exlsp"))))
  :notification-handlers
  (ht ("exlsp/status" #'exlsp--on-status)
      ;; The overlay shows the final text; streamed text is for clients that draw it.
      ("exlsp/partialCompletion" #'ignore))))

;;; Inline completion

(declare-function lsp-inline-completion-display "lsp-inline-completion" (&optional implicit))
(declare-function lsp-inline-completion--overlay-visible "lsp-inline-completion" ())
(declare-function lsp-inline-completion-mode "lsp-inline-completion" (&optional arg))
(declare-function lsp-inline-completion-accept "lsp-inline-completion" ())
(defvar lsp-inline-completion-idle-delay)
(defvar lsp-inline-completion-active-map)

(defun exlsp--bind-accept-keys ()
  "Bind `exlsp-accept-keys' in the keymap active while a suggestion shows."
  (dolist (key exlsp-accept-keys)
    (define-key lsp-inline-completion-active-map (kbd key) #'lsp-inline-completion-accept)))

(with-eval-after-load 'lsp-inline-completion
  (exlsp--bind-accept-keys))

(defvar-local exlsp--idle-timer nil)

(defun exlsp--serves-buffer-p ()
  "Whether an exlsp workspace serves the current buffer."
  (cl-some (lambda (workspace)
             (eq (lsp--client-server-id (lsp--workspace-client workspace)) 'exlsp))
           (lsp-workspaces)))

(defun exlsp--idle-request (buffer)
  "lsp-mode 9: ask for a suggestion in BUFFER if it is still current."
  (when (and (eq buffer (current-buffer))
             (not (lsp-inline-completion--overlay-visible)))
    (lsp-inline-completion-display t)))

(defun exlsp--after-change (&rest _)
  (when exlsp--idle-timer
    (cancel-timer exlsp--idle-timer))
  (setq exlsp--idle-timer
        (run-with-idle-timer exlsp-idle-delay nil #'exlsp--idle-request (current-buffer))))

(defun exlsp--enable-inline-completion ()
  "Turn on ghost text in a buffer exlsp serves."
  (when (and exlsp-inline-completion (exlsp--serves-buffer-p))
    (require 'lsp-inline-completion nil t)
    (cond
     ((fboundp 'lsp-inline-completion-mode)
      ;; lsp-mode waits 2 s by default; suggestions from a local model are meant
      ;; to follow typing closely.
      (setq-local lsp-inline-completion-idle-delay exlsp-idle-delay)
      (lsp-inline-completion-mode 1))
     ((fboundp 'lsp-inline-completion-display)
      (add-hook 'after-change-functions #'exlsp--after-change nil t))
     (t (message "exlsp: this lsp-mode has no inline completion; completion items only")))))

(add-hook 'lsp-after-open-hook #'exlsp--enable-inline-completion)

(provide 'exlsp)
;;; exlsp.el ends here

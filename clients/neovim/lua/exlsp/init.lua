-- exlsp for Neovim: starts the exlsp language server and shows its inline
-- completions as ghost text (natively on Neovim 0.12+, with this plugin's own
-- renderer on 0.10 and 0.11).
local compat = require('exlsp.compat')

local M = {}

M.name = 'exlsp'

---@class exlsp.Keymaps
---@field accept string|false
---@field accept_word string|false
---@field accept_line string|false
---@field next string|false
---@field prev string|false
---@field dismiss string|false
---@field trigger string|false

---@class exlsp.Options
---@field cmd? string[]            full server command; overrides python/args
---@field python? string           interpreter with exlsp installed: `<python> -m exlsp.server serve`
---@field args? string[]           server options before `serve` (e.g. { '--log-level', 'debug' })
---@field filetypes? string[]      nil: every filetype
---@field root_markers? string[]
---@field settings? table          the server's configuration tree (camelCase), sent as
---                                initializationOptions and answered for workspace/configuration
---@field inline? 'auto'|'native'|'plugin'|false
---@field debounce_ms? integer     plugin renderer: wait this long after a keystroke
---@field show_partial? boolean    plugin renderer: draw `exlsp/partialCompletion` text while streaming
---@field keymaps? exlsp.Keymaps|false
---@field on_attach? fun(client: vim.lsp.Client, bufnr: integer)

---@type exlsp.Options
M.defaults = {
  cmd = nil,
  python = nil,
  args = {},
  filetypes = nil,
  root_markers = { '.git', 'pyproject.toml', 'package.json', 'Cargo.toml', 'go.mod', '.hg' },
  settings = {},
  inline = 'auto',
  debounce_ms = 75,
  show_partial = true,
  keymaps = {
    accept = '<M-l>',
    accept_word = '<M-w>',
    accept_line = '<M-j>',
    next = '<M-]>',
    prev = '<M-[>',
    dismiss = '<C-]>',
    trigger = '<M-\\>',
  },
  on_attach = nil,
}

---@type exlsp.Options
M.options = vim.deepcopy(M.defaults)

--- Last `exlsp/status` payload per client id.
---@type table<integer, {state: string, message: string, model: string, backend: string, lastLatencyMs: number|vim.NIL|nil}>
M.status = {}

local augroup = vim.api.nvim_create_augroup('exlsp', { clear = true })

---@return boolean
function M.has_native_inline()
  local ic = vim.lsp.inline_completion
  return ic ~= nil and type(ic.enable) == 'function'
end

--- Which renderer attaches to buffers: 'native', 'plugin' or false.
---@return 'native'|'plugin'|false
function M.inline_mode()
  local mode = M.options.inline
  if mode == false then
    return false
  end
  if mode == 'native' or (mode == 'auto' and M.has_native_inline()) then
    return 'native'
  end
  return 'plugin'
end

---@return string[]
function M.server_cmd()
  local o = M.options
  if o.cmd then
    return o.cmd
  end
  -- The server's options (--log-file, --log-level) come before the subcommand.
  local cmd = o.python and { o.python, '-m', 'exlsp.server' } or { 'exlsp' }
  vim.list_extend(cmd, o.args or {})
  table.insert(cmd, 'serve')
  return cmd
end

local function on_status(_, result, ctx)
  if type(result) == 'table' and ctx and ctx.client_id then
    M.status[ctx.client_id] = result
    vim.api.nvim_exec_autocmds('User', { pattern = 'ExlspStatus', modeline = false, data = result })
  end
end

local function on_partial(_, result, ctx)
  if M.inline_mode() == 'plugin' and M.options.show_partial then
    require('exlsp.ghost').on_partial(ctx.client_id, result)
  end
end

local function on_attach(client, bufnr)
  local mode = M.inline_mode()
  if mode == 'native' then
    require('exlsp.native').attach(client, bufnr)
  elseif mode == 'plugin' then
    require('exlsp.ghost').attach(client, bufnr)
  end
  if M.options.on_attach then
    M.options.on_attach(client, bufnr)
  end
end

--- A deep copy of the settings tree in which every empty table is a JSON
--- object: `{}` alone would be sent as `[]`.
---@param tree table?
---@return table
function M.wire_settings(tree)
  local function copy(value)
    if type(value) ~= 'table' then
      return value
    end
    if next(value) == nil then
      return vim.empty_dict()
    end
    local out = {}
    for k, v in pairs(value) do
      out[k] = copy(v)
    end
    return out
  end
  return copy(tree or {})
end

--- The client configuration shared by vim.lsp.config (0.11+) and vim.lsp.start (0.10).
---@return vim.lsp.ClientConfig
function M.client_config()
  local o = M.options
  local capabilities = vim.tbl_deep_extend('force', vim.lsp.protocol.make_client_capabilities(), {
    textDocument = { inlineCompletion = { dynamicRegistration = false } },
  })
  return {
    name = M.name,
    cmd = M.server_cmd(),
    filetypes = o.filetypes,
    root_markers = o.root_markers,
    capabilities = capabilities,
    init_options = M.wire_settings(o.settings),
    -- Answered by Neovim's own workspace/configuration handler (section "exlsp").
    settings = { exlsp = M.wire_settings(o.settings) },
    handlers = {
      ['exlsp/status'] = on_status,
      ['exlsp/partialCompletion'] = on_partial,
    },
    on_attach = on_attach,
  }
end

---@param bufnr integer
local function start_in_buffer(bufnr)
  if vim.bo[bufnr].buftype ~= '' then
    return
  end
  local ft = vim.bo[bufnr].filetype
  if M.options.filetypes and not vim.tbl_contains(M.options.filetypes, ft) then
    return
  end
  local config = M.client_config()
  config.root_dir = vim.fs.root(bufnr, M.options.root_markers or {})
  vim.lsp.start(config, { bufnr = bufnr })
end

---@return vim.lsp.Client[]
function M.clients(bufnr)
  return vim.lsp.get_clients({ name = M.name, bufnr = bufnr })
end

--- Sends the current settings to running clients (workspace/didChangeConfiguration).
local function push_settings()
  for _, client in ipairs(M.clients()) do
    client.settings = { exlsp = M.wire_settings(M.options.settings) }
    compat.notify(client, 'workspace/didChangeConfiguration', { settings = client.settings })
  end
end

--- Merges `tree` into the server settings and tells the running server.
---@param tree table
function M.update_settings(tree)
  M.options.settings = vim.tbl_deep_extend('force', M.options.settings or {}, tree)
  if vim.lsp.config and M.setup_done then
    -- A restarted server starts from the registered config: keep it current.
    vim.lsp.config(M.name, {
      init_options = M.wire_settings(M.options.settings),
      settings = { exlsp = M.wire_settings(M.options.settings) },
    })
  end
  push_settings()
end

---@return boolean
function M.is_enabled()
  local completion = (M.options.settings or {}).completion
  return not (completion and completion.enabled == false)
end

---@param enabled boolean
function M.set_enabled(enabled)
  M.update_settings({ completion = { enabled = enabled } })
  local mode = M.inline_mode()
  if mode == 'native' then
    require('exlsp.native').set_enabled(enabled)
  elseif mode == 'plugin' then
    require('exlsp.ghost').set_enabled(enabled)
  end
end

function M.restart()
  for _, client in ipairs(M.clients()) do
    compat.stop(client)
  end
  vim.defer_fn(function()
    if vim.lsp.config and vim.lsp.enable then
      vim.lsp.enable(M.name, false)
      vim.lsp.enable(M.name)
    else
      for _, bufnr in ipairs(vim.api.nvim_list_bufs()) do
        if vim.api.nvim_buf_is_loaded(bufnr) and vim.bo[bufnr].filetype ~= '' then
          start_in_buffer(bufnr)
        end
      end
    end
  end, 500)
end

--- A short status for statuslines: "exlsp 42ms", "exlsp loading", "exlsp off", "".
---@return string
function M.statusline()
  local client = M.clients(0)[1]
  if not client then
    return ''
  end
  if not M.is_enabled() then
    return 'exlsp off'
  end
  local s = M.status[client.id]
  if not s then
    return 'exlsp starting'
  end
  if s.state == 'ready' then
    local ms = s.lastLatencyMs
    if type(ms) == 'number' then
      return ('exlsp %dms'):format(math.floor(ms + 0.5))
    end
    return 'exlsp'
  end
  return 'exlsp ' .. tostring(s.state)
end

local function show_status()
  local clients = M.clients()
  if #clients == 0 then
    vim.notify('exlsp: no server running', vim.log.levels.WARN)
    return
  end
  for _, client in ipairs(clients) do
    local s = M.status[client.id] or {}
    vim.notify(
      ('exlsp[%d]: %s%s — model %s, backend %s, last suggestion %s, inline %s'):format(
        client.id,
        s.state or 'starting',
        (s.message and s.message ~= '') and (' (' .. s.message .. ')') or '',
        s.model or '?',
        s.backend or '?',
        type(s.lastLatencyMs) == 'number' and ('%d ms'):format(s.lastLatencyMs) or '-',
        tostring(M.inline_mode())
      )
    )
  end
end

local function show_stats()
  local client = M.clients(0)[1] or M.clients()[1]
  if not client then
    vim.notify('exlsp: no server running', vim.log.levels.WARN)
    return
  end
  compat.request(client, 'exlsp/stats', {}, function(err, result)
    if err then
      vim.notify('exlsp/stats: ' .. vim.inspect(err), vim.log.levels.ERROR)
    else
      vim.notify('exlsp stats: ' .. vim.inspect(result))
    end
  end)
end

-- Grey for terminals without 'termguicolors': colour 8 ("bright black") of
-- the 16-colour palette, which 8-, 16- and 256-colour terminals all have.
M.GHOST_CTERM_FG = 8

--- `ExlspGhostText`: `Comment` when the colorscheme gives `Comment` a
--- terminal colour; else `Comment`'s GUI colour plus a grey `ctermfg`. (The
--- default colorscheme colours `Comment` for the GUI only, so without
--- 'termguicolors' a plain link would draw the ghost text like typed text.)
--- `default`: a group the user defined is kept. Run again on `ColorScheme`,
--- whose `:hi clear` removes it.
function M.define_highlights()
  local comment = vim.api.nvim_get_hl(0, { name = 'Comment', link = false })
  if comment.ctermfg then
    vim.api.nvim_set_hl(0, 'ExlspGhostText', { link = 'Comment', default = true })
  else
    vim.api.nvim_set_hl(0, 'ExlspGhostText', {
      fg = comment.fg,
      ctermfg = M.GHOST_CTERM_FG,
      italic = comment.italic,
      default = true,
    })
  end
end

local function create_commands()
  local cmds = {
    ExlspRestart = { M.restart, 'Restart the exlsp server' },
    ExlspEnable = { function() M.set_enabled(true) end, 'Enable exlsp completions' },
    ExlspDisable = { function() M.set_enabled(false) end, 'Disable exlsp completions' },
    ExlspToggle = { function() M.set_enabled(not M.is_enabled()) end, 'Toggle exlsp completions' },
    ExlspStatus = { show_status, 'Show the exlsp server status' },
    ExlspStats = { show_stats, 'Show the stats of the last completion' },
    ExlspLog = {
      function() vim.cmd.tabnew(vim.lsp.get_log_path()) end,
      "Open Neovim's LSP log (the server's window/logMessage lines land there)",
    },
  }
  for name, spec in pairs(cmds) do
    vim.api.nvim_create_user_command(name, spec[1], { desc = spec[2] })
  end
end

---@param opts? exlsp.Options
function M.setup(opts)
  opts = opts or {}
  M.options = vim.tbl_deep_extend('force', vim.deepcopy(M.defaults), opts)
  -- Lists replace, they do not merge index by index.
  for _, key in ipairs({ 'cmd', 'args', 'filetypes', 'root_markers' }) do
    if opts[key] ~= nil then
      M.options[key] = opts[key]
    end
  end
  if opts.keymaps == false then
    M.options.keymaps = false
  end

  M.setup_done = true
  create_commands()
  vim.api.nvim_clear_autocmds({ group = augroup })
  M.define_highlights()
  vim.api.nvim_create_autocmd('ColorScheme', { group = augroup, callback = M.define_highlights })

  if vim.lsp.config and vim.lsp.enable then
    vim.lsp.config(M.name, M.client_config())
    vim.lsp.enable(M.name)
  else
    vim.api.nvim_create_autocmd('FileType', {
      group = augroup,
      callback = function(args)
        start_in_buffer(args.buf)
      end,
    })
    for _, bufnr in ipairs(vim.api.nvim_list_bufs()) do
      if vim.api.nvim_buf_is_loaded(bufnr) and vim.bo[bufnr].filetype ~= '' then
        start_in_buffer(bufnr)
      end
    end
  end
end

return M

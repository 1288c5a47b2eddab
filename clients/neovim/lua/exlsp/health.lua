-- :checkhealth exlsp
local M = {}

local health = vim.health

local function check_version()
  local v = vim.version()
  local version = ('%d.%d.%d'):format(v.major, v.minor, v.patch)
  if vim.fn.has('nvim-0.10') == 0 then
    health.error(('Neovim %s: exlsp needs 0.10 or newer'):format(version))
    return false
  end
  local exlsp = require('exlsp')
  if exlsp.has_native_inline() then
    health.ok(('Neovim %s: native inline completion (vim.lsp.inline_completion)'):format(version))
  else
    health.ok(('Neovim %s: inline completion drawn by this plugin'):format(version))
  end
  return true
end

local function check_command(cmd)
  if type(cmd) ~= 'table' then
    health.info('server command: a Lua function (in-process client)')
    return
  end
  local exe = cmd[1]
  if vim.fn.executable(exe) == 0 then
    health.error(('server command not found: %s'):format(exe), {
      'Install exlsp from a clone: python3 -m venv .venv && .venv/bin/pip install -e /path/to/exlsp',
      "or pass setup{ python = '/path/to/venv/bin/python' } or setup{ cmd = {...} }",
    })
    return
  end
  health.ok(('server command: %s'):format(table.concat(cmd, ' ')))
  -- `<python> -m exlsp.server serve`: check that this interpreter has exlsp.
  if cmd[2] == '-m' and cmd[3] == 'exlsp.server' and vim.system then
    local ok, result = pcall(function()
      return vim.system({ exe, '-c', 'import exlsp.server' }, { text = true }):wait(20000)
    end)
    if not ok or not result then
      health.warn('could not run ' .. exe)
    elseif result.code == 0 then
      health.ok(exe .. ' can import exlsp.server')
    else
      health.error(exe .. ' cannot import exlsp.server', { vim.trim(result.stderr or '') })
    end
  end
end

local function check_clients()
  local exlsp = require('exlsp')
  local clients = exlsp.clients()
  if #clients == 0 then
    health.info('no exlsp server running (it starts when a buffer with a filetype opens)')
    return
  end
  for _, client in ipairs(clients) do
    local s = exlsp.status[client.id]
    local head = ('client %d (%s encoding)'):format(client.id, client.offset_encoding or '?')
    if not s then
      health.warn(head .. ': no exlsp/status received yet')
    else
      local line = ('%s: %s — model %s, backend %s, last suggestion %s%s'):format(
        head,
        s.state,
        tostring(s.model),
        tostring(s.backend),
        type(s.lastLatencyMs) == 'number' and ('%d ms'):format(s.lastLatencyMs) or '-',
        (s.message and s.message ~= '') and (' (' .. s.message .. ')') or ''
      )
      if s.state == 'ready' then
        health.ok(line)
      elseif s.state == 'error' then
        health.error(line)
      else
        health.info(line)
      end
    end
    local caps = client.server_capabilities or {}
    if caps.inlineCompletionProvider then
      health.ok('server offers textDocument/inlineCompletion')
    else
      health.warn('server does not offer textDocument/inlineCompletion')
    end
  end
end

local function check_keymaps()
  local exlsp = require('exlsp')
  local keys = exlsp.options.keymaps
  if not keys then
    health.info('default keymaps disabled (keymaps = false)')
    return
  end
  local names = { 'accept', 'accept_word', 'accept_line', 'next', 'prev', 'dismiss', 'trigger' }
  if exlsp.inline_mode() == 'native' then
    -- The native client asks by itself; it has no "ask now".
    table.remove(names)
  end
  for _, name in ipairs(names) do
    local lhs = keys[name]
    if lhs then
      local other = vim.fn.maparg(lhs, 'i', false, true)
      if type(other) == 'table' and other.lhs and not (other.desc or ''):match('^exlsp') then
        health.warn(('%s (%s) is also mapped globally in insert mode: %s'):format(
          lhs,
          name,
          other.rhs or other.desc or 'a Lua function'
        ))
      else
        health.ok(('%s: %s'):format(name, lhs))
      end
    end
  end
end

function M.check()
  health.start('exlsp')
  if not check_version() then
    return
  end
  local exlsp = require('exlsp')
  if not exlsp.setup_done then
    health.warn("require('exlsp').setup{} has not been called")
  end
  health.info('inline completion: ' .. tostring(exlsp.inline_mode()))
  check_command(exlsp.server_cmd())
  check_clients()
  check_keymaps()
end

return M

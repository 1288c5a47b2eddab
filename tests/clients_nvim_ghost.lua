-- The Neovim plugin against the real server and a real (tiny) model: open a
-- Python file, type, wait for the ghost text, accept it with the keymap, and
-- record what the buffer holds. Run by tests/test_clients_neovim.py, which
-- asserts on the JSON this writes.
local H = dofile(assert(os.getenv('EXLSP_HARNESS')))
local plugin_dir = assert(os.getenv('EXLSP_PLUGIN_DIR'))
local work_dir = assert(os.getenv('EXLSP_TEST_DIR'))
local python = assert(os.getenv('EXLSP_PYTHON'))
local model = assert(os.getenv('EXLSP_MODEL'))
local server_log = work_dir .. '/server.log'

vim.opt.rtp:prepend(plugin_dir)
vim.o.showmode = false

local file = work_dir .. '/shapes.py'
local f = assert(io.open(file, 'w'))
f:write(table.concat({
  'import math',
  '',
  '',
  'def area(radius):',
  '    return math.pi * radius * radius',
  '',
  '',
  'def circumference(radius):',
  '    return 2 * math.pi * radius',
  '',
  '',
}, '\n'))
f:close()

local exlsp = require('exlsp')
local ghost = require('exlsp.ghost')

-- Count streamed partial notifications without changing what they do.
local partials = 0
local on_partial = ghost.on_partial
ghost.on_partial = function(...)
  partials = partials + 1
  return on_partial(...)
end

-- Count the accepts the plugin reports, to compare with what the server counted.
local compat = require('exlsp.compat')
local reported = { accepted = 0, partially = 0 }
local exec_cmd, notify = compat.exec_cmd, compat.notify
compat.exec_cmd = function(client, command, bufnr)
  if command.command == 'exlsp.accepted' then
    reported.accepted = reported.accepted + 1
  end
  return exec_cmd(client, command, bufnr)
end
compat.notify = function(client, method, params)
  if method == 'exlsp/didPartiallyAccept' then
    reported.partially = reported.partially + 1
  end
  return notify(client, method, params)
end

local function ghost_mark()
  return H.extmark_text(0, ghost.ns)
end

--- The ghost text once the whole suggestion is in: streamed partial text may
--- show first (a lone space, say), and accepting it is not what is checked here.
local function final_mark()
  local item = ghost.current(0)
  return item and not item.partial and ghost_mark()
end

local function lines()
  return vim.api.nvim_buf_get_lines(0, 0, -1, false)
end

--- Types `text`, then waits for a ghost text; up to `attempts` times with more
--- typing (`more`), since a tiny model may have nothing to say at one spot.
local function type_until_ghost(text, more, timeout_ms, want)
  H.type(text, 60)
  local mark = H.wait_until(final_mark, timeout_ms, 50)
  local extra = 1
  while (not mark or (want and not want(mark))) and extra <= #more do
    H.type(more[extra], 60)
    mark = H.wait_until(final_mark, timeout_ms, 50)
    extra = extra + 1
  end
  return mark
end

H.run(function()
  exlsp.setup({
    python = python,
    args = { '--log-file', server_log, '--log-level', 'debug' },
    settings = { model = { path = model } },
    -- The plugin's renderer, also on Neovim 0.12+ (whose native one
    -- clients/neovim/scripts/nvim012-native.sh checks).
    inline = 'plugin',
  })
  vim.cmd.edit(file)
  local client = H.wait_until(function()
    local c = exlsp.clients(0)[1]
    return c and c.initialized and c
  end, 60000, 100)
  if not H.check('server started and initialized', client ~= nil) then
    return
  end
  H.note('offset_encoding', client.offset_encoding)
  H.check(
    'server offers inline completion',
    client.server_capabilities.inlineCompletionProvider ~= nil,
    vim.inspect(client.server_capabilities)
  )
  local status = H.wait_until(function()
    local s = exlsp.status[client.id]
    return s and (s.state == 'ready' or s.state == 'error') and s
  end, 180000, 100)
  H.note('status', status)
  if not H.check('model loaded (exlsp/status ready)', status and status.state == 'ready', vim.inspect(status)) then
    return
  end

  -- Phase 1: type, wait for the ghost text, accept all with <M-l>.
  H.input('G', 50)
  H.input('o', 100)
  local mark = type_until_ghost('def diameter(radius):', { '\n', '    return ', '2' }, 15000)
  if not H.check('ghost text appeared', mark ~= nil) then
    H.note('buffer_without_ghost', lines())
    return
  end
  local before = lines()
  local cursor = H.cursor()
  local item = ghost.current(0)
  H.results.accept_all = {
    before = before,
    cursor = cursor,
    ghost_text = mark.text,
    suggestion_text = item and item.text,
    replace_after = item and item.replace_after,
    extmark = { row = mark.row, col = mark.col, pos = mark.pos, count = mark.count },
  }
  H.input('<M-l>', 200)
  H.results.accept_all.after = lines()
  H.results.accept_all.cursor_after = H.cursor()

  -- Phase 2: a fresh suggestion, accepted word by word.
  H.input('<Esc>', 50)
  H.input('o', 100)
  mark = type_until_ghost('def perimeter(width, height):', { '\n', '    return ', '2 * ' }, 15000)
  if mark then
    local phase = { before = lines(), cursor = H.cursor(), ghost_text = mark.text }
    H.input('<M-w>', 200)
    phase.after = lines()
    phase.cursor_after = H.cursor()
    local rest = ghost_mark()
    phase.rest_text = rest and rest.text
    H.input('<C-]>', 100)
    phase.after_dismiss_mark = ghost_mark() ~= nil
    H.results.accept_word = phase
  end

  -- Phase 3: two characters of the suggested word typed, then accepted at
  -- once: nothing typed is left behind or repeated (neovim#36529).
  H.input('<Esc>', 50)
  H.input('o', 100)
  local function two_word_chars(m)
    return m.text:match('^[%w_][%w_]') ~= nil
  end
  mark = type_until_ghost('def volume(side):', { '\n', '    return ', 'side * ', 's', 'i' }, 15000, two_word_chars)
  if mark and two_word_chars(mark) then
    local phase = { before = lines(), cursor = H.cursor(), ghost_text = mark.text }
    H.type(mark.text:sub(1, 2), 1)
    H.input('<M-l>', 200)
    phase.after = lines()
    H.results.accept_typed = phase
  end

  H.note('partial_notifications', partials)
  local done, stats = false, nil
  require('exlsp.compat').request(client, 'exlsp/stats', {}, function(err, result)
    stats = err and { error = err } or result
    done = true
  end)
  H.wait_until(function()
    return done
  end, 5000)
  H.note('stats', stats)
  H.note('status_after', exlsp.status[client.id])
  H.note('statusline', exlsp.statusline())

  vim.cmd('checkhealth exlsp')
  H.note('checkhealth', lines())
  H.input('<Esc>', 50)

  -- The server writes its acceptance counts at shutdown.
  H.results.reported = reported
  local client_id = client.id
  compat.stop(client)
  H.results.server_stopped = H.wait_until(function()
    return vim.lsp.get_client_by_id(client_id) == nil
  end, 10000, 50) == true
end, 400000)

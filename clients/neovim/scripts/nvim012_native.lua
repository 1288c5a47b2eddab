-- Neovim 0.12+: the plugin with the built-in vim.lsp.inline_completion,
-- against the real server. Type in a Python buffer, wait for the native ghost
-- text, accept it with <M-l>, then take one word of the next suggestion with
-- <M-w> (get{ on_accept }) and dismiss the rest with <C-]>.
-- Run by nvim012-native.sh; writes its observations to $EXLSP_TEST_OUT.
local H = dofile(assert(os.getenv('EXLSP_HARNESS')))
local plugin_dir = assert(os.getenv('EXLSP_PLUGIN_DIR'))
local work_dir = assert(os.getenv('EXLSP_TEST_DIR'))
local python = assert(os.getenv('EXLSP_PYTHON'))
local model = os.getenv('EXLSP_MODEL') or ''

vim.opt.rtp:prepend(plugin_dir)
vim.o.showmode = false

local file = work_dir .. '/shapes.py'
local f = assert(io.open(file, 'w'))
f:write('import math\n\n\ndef area(radius):\n    return math.pi * radius * radius\n\n\n')
f:close()

local exlsp = require('exlsp')
local ns = vim.api.nvim_create_namespace('nvim.lsp.inline_completion')

local function mark()
  return H.extmark_text(0, ns)
end

local function lines()
  return vim.api.nvim_buf_get_lines(0, 0, -1, false)
end

local function type_until_ghost(text, more)
  H.type(text, 60)
  local m = H.wait_until(mark, 15000, 50)
  local i = 1
  while not m and i <= #more do
    H.type(more[i], 60)
    m = H.wait_until(mark, 15000, 50)
    i = i + 1
  end
  return m
end

H.run(function()
  H.note('nvim', tostring(vim.version()))
  exlsp.setup({
    python = python,
    args = { '--log-file', work_dir .. '/server.log', '--log-level', 'debug' },
    settings = { model = { path = model } },
  })
  H.check('native inline completion chosen', exlsp.inline_mode() == 'native', exlsp.inline_mode())
  vim.cmd.edit(file)
  local client = H.wait_until(function()
    local c = exlsp.clients(0)[1]
    return c and c.initialized and c
  end, 60000, 100)
  if not H.check('server started', client ~= nil) then
    return
  end
  local status = H.wait_until(function()
    local s = exlsp.status[client.id]
    return s and (s.state == 'ready' or s.state == 'error') and s
  end, 180000, 100)
  if not H.check('model ready', status and status.state == 'ready', vim.inspect(status)) then
    return
  end
  H.check(
    'vim.lsp.inline_completion enabled for the buffer',
    vim.lsp.inline_completion.is_enabled({ bufnr = 0 })
  )

  H.input('G', 50)
  H.input('o', 100)
  local m = type_until_ghost('def diameter(radius):', { '\n', '    return ', '2' })
  if not H.check('native ghost text appeared', m ~= nil) then
    return
  end
  local accept = { before = lines(), cursor = H.cursor(), ghost_text = m.text, extmark = m }
  H.input('<M-l>', 300)
  accept.after = lines()
  accept.cursor_after = H.cursor()
  H.results.accept_all = accept

  H.input('<Esc>', 50)
  H.input('o', 100)
  m = type_until_ghost('def perimeter(width, height):', { '\n', '    return ', '2 * ' })
  if m then
    local word = { before = lines(), cursor = H.cursor(), ghost_text = m.text }
    H.input('<M-w>', 300)
    word.after = lines()
    -- The native client asks again after the cursor moved; dismiss what it shows.
    H.wait_until(mark, 3000, 50)
    H.input('<C-]>', 100)
    word.mark_after_dismiss = mark() ~= nil
    H.results.accept_word = word
  end
  H.note('statusline', exlsp.statusline())
  H.input('<Esc>', 50)
end, 400000)

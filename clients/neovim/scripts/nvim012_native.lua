-- Neovim 0.12+: the plugin with the built-in vim.lsp.inline_completion,
-- against the real server. Type in a Python buffer, wait for the native ghost
-- text, accept it with <M-l>; take one word of a longer suggestion with <M-w>
-- and the rest of its line with <M-j> (get{ on_accept }), dismiss with <C-]>;
-- <Esc> hides a suggestion; :checkhealth exlsp.
-- Run by nvim012-native.sh; writes its observations to $EXLSP_TEST_OUT.
local H = dofile(assert(os.getenv('EXLSP_HARNESS')))
local plugin_dir = assert(os.getenv('EXLSP_PLUGIN_DIR'))
local work_dir = assert(os.getenv('EXLSP_TEST_DIR'))
local python = assert(os.getenv('EXLSP_PYTHON'))
local model = os.getenv('EXLSP_MODEL') or ''

vim.opt.rtp:prepend(plugin_dir)
vim.o.showmode = false

local file = work_dir .. '/shapes.py'
local original = { 'import math', '', '', 'def area(radius):', '    return math.pi * radius * radius', '', '' }
local f = assert(io.open(file, 'w'))
f:write(table.concat(original, '\n') .. '\n')
f:close()

local exlsp = require('exlsp')
local text_util = require('exlsp.text')
local ns = vim.api.nvim_create_namespace('nvim.lsp.inline_completion')

local function mark()
  return H.extmark_text(0, ns)
end

local function lines()
  return vim.api.nvim_buf_get_lines(0, 0, -1, false)
end

-- Every textDocument/inlineCompletion answer the native client got: where it
-- asked and the first item's text. While the user types, the native renderer
-- keeps drawing the previous suggestion (shifted past the typed text) until
-- the new answer arrives, so "a ghost text is shown" alone does not say that
-- it belongs to the cursor position.
local answers = {}

local function record_answers(client)
  local request = client.request
  client.request = function(self, method, params, handler, bufnr)
    if method == 'textDocument/inlineCompletion' and handler then
      local inner = handler
      handler = function(err, result, ctx)
        local items = type(result) == 'table' and (result.items or result) or {}
        local first = items[1]
        local text = first and first.insertText
        answers[#answers + 1] = {
          line = params.position.line,
          character = params.position.character,
          text = type(text) == 'table' and text.value or text,
        }
        return inner(err, result, ctx)
      end
    end
    return request(self, method, params, handler, bufnr)
  end
end

-- The accepts reported to the server: Neovim runs the item's command
-- (exlsp.accepted) after a whole accept; the plugin notifies partial ones.
local reported = { accepted = 0, partially = 0 }

local function record_reports(client)
  local exec_cmd, notify = client.exec_cmd, client.notify
  client.exec_cmd = function(self, command, ...)
    if command.command == 'exlsp.accepted' then
      reported.accepted = reported.accepted + 1
    end
    return exec_cmd(self, command, ...)
  end
  client.notify = function(self, method, ...)
    if method == 'exlsp/didPartiallyAccept' then
      reported.partially = reported.partially + 1
    end
    return notify(self, method, ...)
  end
end

--- The answer to a request made at the cursor (ASCII buffer: LSP characters
--- are byte columns), once it has arrived.
local function answer_here()
  local a = answers[#answers]
  local c = H.cursor()
  return a and a.line == c[1] and a.character == c[2] and a
end

--- Waits for the answer at the cursor; the ghost text it shows, or nil when
--- the server had nothing to say there.
local function ghost_here(timeout_ms)
  local a = H.wait_until(answer_here, timeout_ms or 20000, 50)
  if a and a.text and a.text ~= '' then
    local m = H.wait_until(mark, 1000, 20)
    if m then
      m.item_text = a.text
    end
    return m
  end
end

--- More than one word by the <M-w> rule.
local function is_multiword(m)
  return text_util.next_word(m.text) ~= m.text
end

local seen = {}

--- Types `text`, then `more` piece by piece until a ghost text for the cursor
--- shows (one that satisfies `want`, when given): a tiny model may have
--- nothing, or little, to say at one spot.
local function type_until_ghost(text, more, want)
  H.type(text, 60)
  local m = ghost_here()
  local i = 1
  while (not m or (want and not want(m))) and i <= #more do
    seen[#seen + 1] = m and m.text or vim.NIL
    H.type(more[i], 60)
    m = ghost_here()
    i = i + 1
  end
  seen[#seen + 1] = m and m.text or vim.NIL
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
  record_answers(client)
  record_reports(client)
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

  -- Accept a whole suggestion.
  H.input('G', 50)
  H.input('o', 100)
  local m = type_until_ghost('def diameter(radius):', { '\n', 'return ', '2' })
  if not H.check('native ghost text appeared at the cursor', m ~= nil) then
    return
  end
  H.check('the ghost text is the suggestion', m.text == m.item_text, { m.text, m.item_text })
  local accept = { before = lines(), cursor = H.cursor(), ghost_text = m.text, extmark = m }
  H.input('<M-l>', 300)
  accept.after = lines()
  accept.cursor_after = H.cursor()
  H.results.accept_all = accept

  -- A suggestion of more than one word, taken one word, then one line, at a
  -- time; from the original text, so that the first suggestion does not
  -- steer the next ones.
  H.input('<Esc>', 50)
  vim.api.nvim_buf_set_lines(0, 0, -1, false, original)
  H.input('G', 50)
  H.input('o', 100)
  m = type_until_ghost('def perimeter(width, height):', { '\n', 'return 2 * (', 'width', ' + (' }, is_multiword)
  if H.check('a suggestion of more than one word appeared', m ~= nil and is_multiword(m), m) then
    local word = { before = lines(), cursor = H.cursor(), ghost_text = m.text }
    H.input('<M-w>', 300)
    word.after = lines()
    word.cursor_after = H.cursor()
    -- The cursor moved, so the native client asks again; the server answers
    -- with the rest of the same suggestion from its type-ahead cache.
    local rest = ghost_here()
    word.rest_text = rest and rest.text
    if rest then
      word.line_before = lines()
      word.line_cursor = H.cursor()
      H.input('<M-j>', 300)
      word.line_after = lines()
      -- Let the request after <M-j> be answered, so nothing redraws after the dismissal.
      H.wait_until(answer_here, 20000, 50)
    end
    word.mark_before_dismiss = mark() ~= nil
    H.input('<C-]>', 100)
    H.sleep(500)
    word.mark_after_dismiss = mark() ~= nil
    H.results.accept_word = word
  end

  -- Two characters of the suggested word typed, then accepted at once, before
  -- the answer for them: nothing typed is left behind or repeated (neovim#36529).
  H.input('<Esc>', 50)
  vim.api.nvim_buf_set_lines(0, 0, -1, false, original)
  H.input('G', 50)
  H.input('o', 100)
  local function two_word_chars(g)
    return g.text:match('^[%w_][%w_]') ~= nil
  end
  m = type_until_ghost('def volume(side):', { '\n', 'return ', 's', 'ide * ', 'si', '(' }, two_word_chars)
  if H.check('a suggestion starting with a word appeared', m ~= nil and two_word_chars(m), m) then
    local typed = { before = lines(), cursor = H.cursor(), ghost_text = m.text }
    H.type(m.text:sub(1, 2), 1)
    H.input('<M-l>', 300)
    typed.after = lines()
    H.results.accept_typed = typed
  end

  -- Leaving insert mode hides the suggestion.
  H.input('<Esc>', 50)
  H.input('o', 100)
  m = type_until_ghost('def volume(side):', { '\n', 'return ', 'side * ' })
  if m then
    H.input('<Esc>', 300)
    H.check('<Esc> hides the suggestion', mark() == nil, mark())
  end

  H.note('statusline', exlsp.statusline())
  H.note('ghost_texts_seen', seen)
  H.note('answers', #answers)
  vim.cmd('checkhealth exlsp')
  local health = lines()
  H.results.checkhealth = health
  local text = table.concat(health, '\n')
  H.check('checkhealth: native inline completion', text:find('native inline completion', 1, true) ~= nil)
  H.check('checkhealth: server ready', text:find('OK client %d+ %(utf%-%d+ encoding%): ready') ~= nil)
  H.check('checkhealth: no errors or warnings', not text:find('ERROR') and not text:find('WARNING'), text)

  -- The server writes its acceptance counts at shutdown.
  H.results.reported = reported
  local client_id = client.id
  client:stop()
  H.check(
    'server stopped',
    H.wait_until(function()
      return vim.lsp.get_client_by_id(client_id) == nil
    end, 10000, 50)
  )
end, 400000)

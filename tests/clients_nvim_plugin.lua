-- The Neovim plugin against an in-process fake server (no model, no Python):
-- ghost text, type-ahead, accept all / word / line, cycle, dismiss, streamed
-- partial text, ranges, settings. Run by tests/test_clients_neovim.py.
local H = dofile(assert(os.getenv('EXLSP_HARNESS')))
local plugin_dir = assert(os.getenv('EXLSP_PLUGIN_DIR'))
local work_dir = assert(os.getenv('EXLSP_TEST_DIR'))

vim.opt.rtp:prepend(plugin_dir)
vim.o.showmode = false

-- ---------------------------------------------------------------------------
-- The fake server: answers initialize, records everything, and lets each
-- scenario decide how textDocument/inlineCompletion is answered.

local Fake = {
  requests = {}, ---@type {method: string, params: table, id: integer}[]
  notifications = {}, ---@type {method: string, params: any}[]
  pending = {},
  dispatchers = nil,
  init_params = nil,
}

--- Scenario hook: called with each inlineCompletion request.
---@type fun(req: table)
Fake.on_inline = function(req)
  Fake.respond(req, { items = {} })
end

function Fake.respond(req, result, err)
  if req.done then
    return
  end
  req.done = true
  Fake.pending[req.id] = nil
  if req.notify_reply then
    req.notify_reply(req.id)
  end
  req.callback(err, result)
end

function Fake.respond_later(req, ms, result)
  vim.defer_fn(function()
    Fake.respond(req, result)
  end, ms)
end

function Fake.inline_requests()
  local out = {}
  for _, r in ipairs(Fake.requests) do
    if r.method == 'textDocument/inlineCompletion' then
      out[#out + 1] = r
    end
  end
  return out
end

function Fake.cancelled_ids()
  local out = {}
  for _, n in ipairs(Fake.notifications) do
    if n.method == '$/cancelRequest' then
      out[n.params.id] = true
    end
  end
  return out
end

function Fake.last_notification(method)
  for i = #Fake.notifications, 1, -1 do
    if Fake.notifications[i].method == method then
      return Fake.notifications[i].params
    end
  end
end

local function fake_cmd(dispatchers)
  Fake.dispatchers = dispatchers
  local closing = false
  local next_id = 0
  return {
    request = function(method, params, callback, notify_reply)
      next_id = next_id + 1
      local id = next_id
      table.insert(Fake.requests, { method = method, params = params, id = id })
      local req = { id = id, params = params, callback = callback, notify_reply = notify_reply }
      if method == 'initialize' then
        Fake.init_params = params
        vim.schedule(function()
          Fake.respond(req, {
            capabilities = {
              positionEncoding = 'utf-8',
              textDocumentSync = { openClose = true, change = 2 },
              inlineCompletionProvider = vim.empty_dict(),
              executeCommandProvider = { commands = { 'exlsp.accepted' } },
            },
            serverInfo = { name = 'fake-exlsp' },
          })
        end)
      elseif method == 'textDocument/inlineCompletion' then
        Fake.pending[id] = req
        vim.schedule(function()
          Fake.on_inline(req)
        end)
      else
        vim.schedule(function()
          Fake.respond(req, vim.NIL)
        end)
      end
      return true, id
    end,
    notify = function(method, params)
      table.insert(Fake.notifications, { method = method, params = params })
      if method == '$/cancelRequest' then
        local req = Fake.pending[params.id]
        if req then
          vim.schedule(function()
            Fake.respond(req, nil, { code = -32800, message = 'cancelled' })
          end)
        end
      elseif method == 'exit' then
        closing = true
      end
      return true
    end,
    is_closing = function()
      return closing
    end,
    terminate = function()
      closing = true
    end,
  }
end

-- ---------------------------------------------------------------------------

local ghost = require('exlsp.ghost')
local exlsp = require('exlsp')

local function ghost_mark()
  return H.extmark_text(0, ghost.ns)
end

local function wait_ghost(expected, timeout)
  return H.wait_until(function()
    local m = ghost_mark()
    return m and (expected == nil or m.text == expected) and m
  end, timeout or 2000)
end

local function line(n)
  return vim.api.nvim_buf_get_lines(0, n, n + 1, false)[1]
end

--- Leaves insert mode, opens a fresh line at the end of the buffer in insert mode.
local function fresh_line()
  H.input('<Esc>', 50)
  Fake.on_inline = function(req)
    Fake.respond(req, { items = {} })
  end
  H.input('Go', 80)
end

local function respond_with(items, delay)
  Fake.on_inline = function(req)
    Fake.respond_later(req, delay or 10, { items = items })
  end
end

local file = work_dir .. '/sample.py'
local f = assert(io.open(file, 'w'))
f:write('def foo():\n    pass\n')
f:close()

H.run(function()
  exlsp.setup({
    cmd = fake_cmd,
    settings = { model = { path = '/models/tiny' }, completion = {} },
    debounce_ms = 30,
    -- This script checks the plugin's own renderer, also on Neovim 0.12+.
    inline = 'plugin',
  })
  vim.cmd.edit(file)
  H.check('filetype detected', vim.bo.filetype == 'python', vim.bo.filetype)
  local client = H.wait_until(function()
    local c = exlsp.clients(0)[1]
    return c and c.initialized and c
  end, 3000)
  if not H.check('client attached', client ~= nil) then
    return
  end
  H.check('inline mode is the plugin renderer', exlsp.inline_mode() == 'plugin', exlsp.inline_mode())

  -- Highlight: visible without 'termguicolors' -------------------------------
  vim.o.termguicolors = false
  local function ghost_hl()
    return vim.api.nvim_get_hl(0, { name = 'ExlspGhostText', link = false })
  end
  local function normal_ctermfg()
    return vim.api.nvim_get_hl(0, { name = 'Normal', link = false }).ctermfg
  end
  H.check(
    'ghost highlight has a terminal colour (default colorscheme, notermguicolors)',
    ghost_hl().ctermfg ~= nil and ghost_hl().ctermfg ~= normal_ctermfg(),
    vim.inspect(ghost_hl())
  )
  -- :colorscheme runs :hi clear, which removes the group; it comes back.
  vim.cmd.colorscheme('default')
  H.check('ghost highlight survives :colorscheme', ghost_hl().ctermfg ~= nil, vim.inspect(ghost_hl()))
  -- A colorscheme that colours Comment for terminals: the ghost text is Comment.
  vim.cmd.colorscheme('vim')
  local comment = vim.api.nvim_get_hl(0, { name = 'Comment', link = false })
  H.check(
    'ghost highlight follows a colorscheme whose Comment has a terminal colour',
    comment.ctermfg ~= nil
      and ghost_hl().ctermfg == comment.ctermfg
      and vim.api.nvim_get_hl(0, { name = 'ExlspGhostText' }).link == 'Comment',
    vim.inspect({ ghost = ghost_hl(), comment = comment })
  )
  vim.cmd.colorscheme('default')

  -- Settings ---------------------------------------------------------------
  local init_json = vim.json.encode(Fake.init_params.initializationOptions)
  H.check(
    'initializationOptions carry the settings tree, empty tables as objects',
    vim.tbl_get(vim.json.decode(init_json), 'model', 'path') == '/models/tiny'
      and init_json:find('"completion":{}', 1, true),
    init_json
  )
  H.check(
    'client advertises inlineCompletion',
    vim.tbl_get(Fake.init_params, 'capabilities', 'textDocument', 'inlineCompletion') ~= nil
  )
  local answer = Fake.dispatchers.server_request('workspace/configuration', { items = { { section = 'exlsp' } } })
  H.check(
    'workspace/configuration answers section exlsp',
    type(answer) == 'table' and vim.tbl_get(answer, 1, 'model', 'path') == '/models/tiny',
    vim.inspect(answer)
  )
  Fake.dispatchers.notification('exlsp/status', {
    state = 'ready',
    message = 'model ready',
    model = '/models/tiny',
    backend = 'transformers',
    lastLatencyMs = 42.4,
  })
  H.sleep(30)
  H.check('exlsp/status feeds the statusline', exlsp.statusline() == 'exlsp 42ms', exlsp.statusline())

  -- A: ghost text appears, debounced; accept all -------------------------------
  respond_with({ { insertText = 'bar(x)\n    return x' } }, 20)
  H.input('Go', 50)
  local before = #Fake.inline_requests()
  H.type('y = ', 5)
  local mark = wait_ghost('bar(x)\n    return x')
  H.check('A: ghost text shows the suggestion', mark ~= nil, vim.inspect(ghost_mark()))
  if mark then
    H.check('A: ghost text sits at the cursor', mark.row == 2 and mark.col == 4, vim.inspect(mark))
    H.check('A: first line drawn inline', mark.pos == 'inline', mark.pos)
  end
  local reqs = Fake.inline_requests()
  local sent = #reqs - before
  H.check('A: typing 4 keys quickly sends at most 2 requests (debounce)', sent >= 1 and sent <= 2, sent)
  local last = reqs[#reqs].params
  H.check(
    'A: request has the cursor position and an automatic trigger',
    last.position.line == 2 and last.position.character == 4 and last.context.triggerKind == 2,
    vim.inspect(last)
  )
  H.check('A: request names the document', last.textDocument.uri == vim.uri_from_fname(file), last.textDocument.uri)
  respond_with({})
  H.input('<M-l>', 60)
  H.check('A: accept all inserts every line', line(2) == 'y = bar(x)' and line(3) == '    return x', H.buffer_text())
  H.check('A: cursor after the inserted text', vim.deep_equal(H.cursor(), { 3, 12 }), vim.inspect(H.cursor()))

  -- B: type-ahead, accept word, accept line ------------------------------------------
  fresh_line()
  respond_with({ { insertText = 'alpha beta(1)\nsecond line\nthird' } })
  H.type('z', 5)
  H.check('B: ghost shown', wait_ghost('alpha beta(1)\nsecond line\nthird') ~= nil, vim.inspect(ghost_mark()))
  local count = #Fake.inline_requests()
  H.type('al', 20)
  H.sleep(150)
  mark = ghost_mark()
  H.check('B: typing what the suggestion begins with trims it', mark and mark.text == 'pha beta(1)\nsecond line\nthird', vim.inspect(mark))
  H.check('B: ... without a new request', #Fake.inline_requests() == count, #Fake.inline_requests() - count)
  H.input('<M-w>', 40)
  H.check('B: accept word', line(4) == 'zalpha', line(4))
  H.check('B: rest still shown', (ghost_mark() or {}).text == ' beta(1)\nsecond line\nthird', vim.inspect(ghost_mark()))
  H.input('<M-w>', 40)
  H.check('B: accept next word', line(4) == 'zalpha beta', line(4))
  H.input('<M-j>', 40)
  H.check('B: accept line ends the line', line(4) == 'zalpha beta(1)' and line(5) == '', H.buffer_text())
  H.check('B: cursor on the next line', vim.deep_equal(H.cursor(), { 5, 0 }), vim.inspect(H.cursor()))
  H.check('B: rest after accept line', (ghost_mark() or {}).text == 'second line\nthird', vim.inspect(ghost_mark()))
  H.check('B: partial accepts sent no request', #Fake.inline_requests() == count, #Fake.inline_requests() - count)
  respond_with({})
  H.input('<M-l>', 40)
  H.check('B: accept the rest', line(5) == 'second line' and line(6) == 'third', H.buffer_text())

  -- C: cycle between suggestions ---------------------------------------------
  fresh_line()
  respond_with({ { insertText = 'one' }, { insertText = 'two' } })
  H.type('c', 5)
  H.check('C: first suggestion', wait_ghost('one') ~= nil, vim.inspect(ghost_mark()))
  H.input('<M-]>', 30)
  H.check('C: next', (ghost_mark() or {}).text == 'two', vim.inspect(ghost_mark()))
  H.input('<M-]>', 30)
  H.check('C: next wraps around', (ghost_mark() or {}).text == 'one', vim.inspect(ghost_mark()))
  H.input('<M-[>', 30)
  H.check('C: previous wraps around', (ghost_mark() or {}).text == 'two', vim.inspect(ghost_mark()))
  respond_with({})
  H.input('<M-l>', 40)
  H.check('C: accept the shown one', line(7) == 'ctwo', line(7))

  -- D: dismiss ----------------------------------------------------------------
  fresh_line()
  respond_with({ { insertText = 'dismiss me' } })
  H.type('d', 5)
  H.check('D: ghost shown', wait_ghost('dismiss me') ~= nil)
  count = #Fake.inline_requests()
  H.input('<C-]>', 30)
  H.check('D: dismissed', ghost_mark() == nil, vim.inspect(ghost_mark()))
  H.sleep(200)
  H.check('D: stays dismissed, no new request', ghost_mark() == nil and #Fake.inline_requests() == count)
  H.type('x', 5)
  H.check('D: typing asks again', wait_ghost('dismiss me') ~= nil and #Fake.inline_requests() > count)
  H.check('D: unmapped fallback: <C-]> without suggestion does not error', true)

  -- E: partial text streams in before the response ---------------------------------
  fresh_line()
  Fake.on_inline = function(req)
    local uri, pos = req.params.textDocument.uri, req.params.position
    local function partial(ms, text)
      vim.defer_fn(function()
        if not req.done then
          Fake.dispatchers.notification('exlsp/partialCompletion', { uri = uri, position = pos, text = text })
        end
      end, ms)
    end
    partial(20, 'par')
    partial(60, 'partial te')
    Fake.respond_later(req, 400, { items = { { insertText = 'partial text!' } } })
  end
  H.type('e', 5)
  local seen_partial = wait_ghost('partial te', 350)
  H.check('E: streamed text shown before the response', seen_partial ~= nil, vim.inspect(ghost_mark()))
  H.check('E: final text replaces it', wait_ghost('partial text!', 1000) ~= nil, vim.inspect(ghost_mark()))

  -- F: ranges, utf-8 columns, replacing text after the cursor ---------------------------
  fresh_line()
  Fake.on_inline = function(req)
    local p = req.params.position
    Fake.respond_later(req, 10, {
      items = {
        {
          insertText = 'foobar()',
          range = { start = { line = p.line, character = p.character - 2 }, ['end'] = p },
        },
      },
    })
  end
  H.type('é = fo', 5)
  H.check('F: ghost strips the word already typed', wait_ghost('obar()') ~= nil, vim.inspect(ghost_mark()))
  last = Fake.inline_requests()[#Fake.inline_requests()].params
  H.check('F: position in utf-8 bytes', last.position.character == 7, vim.inspect(last.position))
  respond_with({})
  H.input('<M-l>', 40)
  H.check('F: accepted over the range', line(10) == 'é = foobar()', line(10))

  fresh_line()
  H.type('call()', 5)
  H.input('<Left>', 40)
  Fake.on_inline = function(req)
    local p = req.params.position
    Fake.respond_later(req, 10, {
      items = {
        {
          insertText = 'arg)',
          range = {
            start = { line = p.line, character = p.character - 1 },
            ['end'] = { line = p.line, character = p.character + 1 },
          },
        },
      },
    })
  end
  H.type('a', 5)
  H.check('F: ghost before the closing bracket', wait_ghost('rg)') ~= nil, vim.inspect(ghost_mark()))
  respond_with({})
  H.input('<M-l>', 40)
  H.check('F: accept replaces the bracket it covers', line(11) == 'call(arg)', line(11))

  -- G: leaving insert mode cancels the pending request -------------------------------
  fresh_line()
  Fake.on_inline = function() end -- never answers
  H.type('g', 5)
  local pending_req = H.wait_until(function()
    local r = Fake.inline_requests()
    local req = r[#r]
    return req and Fake.pending[req.id] and req
  end, 1000)
  H.input('<Esc>', 80)
  H.check(
    'G: InsertLeave sends $/cancelRequest',
    pending_req ~= nil and Fake.cancelled_ids()[pending_req.id] == true,
    vim.inspect(Fake.cancelled_ids())
  )
  H.check('G: no ghost in normal mode', ghost_mark() == nil)

  -- H: disable / enable -------------------------------------------------------------
  vim.cmd('ExlspDisable')
  H.sleep(30)
  local change = Fake.last_notification('workspace/didChangeConfiguration')
  H.check(
    'H: disabling tells the server',
    change and vim.tbl_get(change, 'settings', 'exlsp', 'completion', 'enabled') == false,
    vim.inspect(change)
  )
  H.check('H: statusline says off', exlsp.statusline() == 'exlsp off', exlsp.statusline())
  respond_with({ { insertText = 'should not show' } })
  count = #Fake.inline_requests()
  H.input('o', 50)
  H.type('h', 5)
  H.sleep(200)
  H.check('H: disabled: no request, no ghost', #Fake.inline_requests() == count and ghost_mark() == nil)
  vim.cmd('ExlspEnable')
  H.type('i', 5)
  H.check('H: enabled again', wait_ghost('should not show') ~= nil)
  change = Fake.last_notification('workspace/didChangeConfiguration')
  H.check('H: enabling tells the server', vim.tbl_get(change, 'settings', 'exlsp', 'completion', 'enabled') == true)

  -- I: accepts are reported: exlsp/didPartiallyAccept for a word or a line,
  -- the item's command (exlsp.accepted) once all of it is in ---------------------
  local function executed()
    local out = {}
    for _, r in ipairs(Fake.requests) do
      if r.method == 'workspace/executeCommand' then
        out[#out + 1] = r.params
      end
    end
    return out
  end
  local function partials()
    local out = {}
    for _, n in ipairs(Fake.notifications) do
      if n.method == 'exlsp/didPartiallyAccept' then
        out[#out + 1] = n.params
      end
    end
    return out
  end
  --- Items whose range starts at the word typed before the cursor, like the server's.
  local function respond_from_word(insert, id)
    Fake.on_inline = function(req)
      local p = req.params.position
      local l = vim.api.nvim_buf_get_lines(0, p.line, p.line + 1, false)[1]:sub(1, p.character)
      local word = l:match('[%w_]*$')
      Fake.respond_later(req, 10, {
        items = {
          {
            insertText = insert,
            range = { start = { line = p.line, character = p.character - #word }, ['end'] = p },
            command = { title = 'accepted', command = 'exlsp.accepted', arguments = { id } },
          },
        },
      })
    end
  end
  fresh_line()
  respond_from_word('fooé bar(baz)\nnext', 'id-1')
  H.type('x = fo', 5)
  H.check('I: ghost text after the typed word', wait_ghost('oé bar(baz)\nnext') ~= nil, vim.inspect(ghost_mark()))
  respond_with({})
  H.type('oé', 5)
  H.input('<M-w>', 40)
  H.check('I: accept word after typing along', vim.api.nvim_get_current_line() == 'x = fooé bar', vim.api.nvim_get_current_line())
  H.input('<M-j>', 40)
  H.input('<M-l>', 40)
  H.check('I: the whole item accepted', H.buffer_text():sub(-23) == 'x = fooé bar(baz)\nnext', H.buffer_text():sub(-30))
  local sent = partials()
  H.check(
    'I: partial accepts report the characters of the insertText accepted so far, from its start',
    #sent == 2
      and vim.deep_equal(sent[1], { id = 'id-1', acceptedLength = 8, kind = 'word' })
      and vim.deep_equal(sent[2], { id = 'id-1', acceptedLength = 14, kind = 'line' }),
    vim.inspect(sent)
  )
  local commands = H.wait_until(function()
    local e = executed()
    return #e > 0 and e
  end, 1000)
  H.check(
    'I: accepting the rest runs the item command',
    commands and #commands == 1 and commands[1].command == 'exlsp.accepted' and vim.deep_equal(commands[1].arguments, { 'id-1' }),
    vim.inspect(commands)
  )

  -- Two more characters typed, accepted at once (before an answer for them
  -- arrives): nothing typed is left behind or repeated (neovim#36529).
  fresh_line()
  respond_from_word('foobar(1)', 'id-2')
  H.type('fo', 5)
  H.check('I: ghost for the word being typed', wait_ghost('obar(1)') ~= nil, vim.inspect(ghost_mark()))
  Fake.on_inline = function() end -- the next answers never come
  H.type('ob', 1)
  H.input('<M-l>', 40)
  H.check('I: accepted right after typing: no leftover', vim.api.nvim_get_current_line() == 'foobar(1)', vim.api.nvim_get_current_line())
  commands = H.wait_until(function()
    local e = executed()
    return #e > 1 and e
  end, 1000)
  H.check('I: ... and counted', commands and vim.deep_equal(commands[2].arguments, { 'id-2' }), vim.inspect(commands))
  H.check('I: no partial accept reported for it', #partials() == 2, vim.inspect(partials()))

  H.input('<Esc>', 30)
end, 30000)

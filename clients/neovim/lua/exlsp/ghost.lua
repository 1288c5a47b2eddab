-- Inline completion for Neovim 0.10/0.11, which have no native support:
-- requests `textDocument/inlineCompletion` while typing (debounced, the
-- previous request cancelled), draws the suggestion as ghost text (extmark:
-- inline `virt_text` for the rest of the cursor line, `virt_lines` below) and
-- accepts it whole, word by word or line by line.
local api = vim.api
local uv = vim.uv or vim.loop
local compat = require('exlsp.compat')
local text_util = require('exlsp.text')

local M = {}

local ns = api.nvim_create_namespace('exlsp.ghost')
M.ns = ns

local TRIGGER_INVOKED = 1
local TRIGGER_AUTOMATIC = 2

---@class exlsp.Suggestion
---@field text string           what is still to be inserted at the anchor
---@field replace_after integer bytes after the anchor (same line) that accepting all replaces
---@field command? lsp.Command
---@field offset integer        characters of the item's insertText before `text` (typed or accepted)
---@field partial? boolean      streamed text of a request still running

---@class exlsp.Pending
---@field client_id integer
---@field id integer
---@field row integer
---@field col integer
---@field tick integer
---@field position {line: integer, character: integer}

---@class exlsp.BufState
---@field client_id integer
---@field timer uv.uv_timer_t
---@field pending? exlsp.Pending
---@field items exlsp.Suggestion[]
---@field index integer
---@field anchor? {row: integer, col: integer, prefix: string}
---@field tick? integer           changedtick when the suggestion was drawn
---@field dismissed_tick? integer no new request until the buffer changes again
---@field check_scheduled boolean

---@type table<integer, exlsp.BufState>
local states = {}
local enabled = true

local function options()
  return require('exlsp').options
end

---@return integer row (0-based), integer col (byte)
local function cursor()
  local pos = api.nvim_win_get_cursor(0)
  return pos[1] - 1, pos[2]
end

local function in_insert_mode()
  local mode = api.nvim_get_mode().mode
  return mode:sub(1, 1) == 'i'
end

local function expand_tabs(s)
  if not s:find('\t', 1, true) then
    return s
  end
  return (s:gsub('\t', string.rep(' ', vim.bo.tabstop > 0 and vim.bo.tabstop or 8)))
end

---@param bufnr integer
local function clear(bufnr)
  local st = states[bufnr]
  if api.nvim_buf_is_valid(bufnr) then
    api.nvim_buf_clear_namespace(bufnr, ns, 0, -1)
  end
  if st then
    st.items = {}
    st.index = 1
    st.anchor = nil
    st.tick = nil
  end
end

---@param st exlsp.BufState
local function cancel_pending(st)
  local pending = st.pending
  st.pending = nil
  if pending then
    local client = vim.lsp.get_client_by_id(pending.client_id)
    if client then
      pcall(compat.cancel_request, client, pending.id)
    end
  end
end

--- Draws the current suggestion at the cursor and makes the cursor its anchor.
---@param bufnr integer
local function render(bufnr)
  local st = states[bufnr]
  local item = st and st.items[st.index]
  api.nvim_buf_clear_namespace(bufnr, ns, 0, -1)
  if not item then
    return
  end
  local row, col = cursor()
  local line = api.nvim_buf_get_lines(bufnr, row, row + 1, false)[1] or ''
  st.anchor = { row = row, col = col, prefix = line:sub(1, col) }
  st.tick = api.nvim_buf_get_changedtick(bufnr)

  local lines = vim.split(item.text, '\n', { plain = true })
  local hl = 'ExlspGhostText'
  local mark = { hl_mode = 'combine', priority = 200 }
  if lines[1] ~= '' then
    mark.virt_text = { { expand_tabs(lines[1]), hl } }
    mark.virt_text_pos = 'inline'
  end
  if #lines > 1 then
    mark.virt_lines = {}
    for i = 2, #lines do
      table.insert(mark.virt_lines, { { expand_tabs(lines[i]), hl } })
    end
  end
  api.nvim_buf_set_extmark(bufnr, ns, row, col, mark)
end

--- The text typed between the anchor and the cursor, or nil when the buffer
--- changed in a way that is not typing forward from the anchor.
---@return string?
local function typed_since_anchor(bufnr, st, row, col)
  local a = st.anchor
  if not a or row < a.row or (row == a.row and col < a.col) then
    return nil
  end
  local lines = api.nvim_buf_get_lines(bufnr, a.row, row + 1, false)
  if #lines ~= row - a.row + 1 or lines[1]:sub(1, a.col) ~= a.prefix then
    return nil
  end
  if row == a.row then
    return lines[1]:sub(a.col + 1, col)
  end
  local parts = { lines[1]:sub(a.col + 1) }
  for i = 2, #lines - 1 do
    parts[#parts + 1] = lines[i]
  end
  parts[#parts + 1] = lines[#lines]:sub(1, col)
  return table.concat(parts, '\n')
end

---@param bufnr integer
---@param trigger_kind? integer
function M.request(bufnr, trigger_kind)
  local st = states[bufnr]
  if not st or not enabled or api.nvim_get_current_buf() ~= bufnr or not in_insert_mode() then
    return
  end
  local client = vim.lsp.get_client_by_id(st.client_id)
  if not client then
    return
  end
  cancel_pending(st)
  local params = vim.lsp.util.make_position_params(0, client.offset_encoding)
  params.context = { triggerKind = trigger_kind or TRIGGER_AUTOMATIC }
  local row, col = cursor()
  ---@type exlsp.Pending
  local pending = {
    client_id = client.id,
    id = -1,
    row = row,
    col = col,
    tick = api.nvim_buf_get_changedtick(bufnr),
    position = params.position,
  }
  local ok, id = compat.request(client, 'textDocument/inlineCompletion', params, function(err, result)
    M._on_result(bufnr, pending, err, result)
  end, bufnr)
  if ok and id then
    pending.id = id
    st.pending = pending
  end
end

--- Whether the buffer and cursor are still where the request was made.
local function still_at(bufnr, pending)
  if api.nvim_get_current_buf() ~= bufnr or not in_insert_mode() then
    return false
  end
  local row, col = cursor()
  return pending.tick == api.nvim_buf_get_changedtick(bufnr) and row == pending.row and col == pending.col
end

---@return exlsp.Suggestion[]
local function parse_items(bufnr, client, result, row, col)
  local items = {}
  local raw_items = type(result) == 'table' and (result.items or result) or {}
  local line = api.nvim_buf_get_lines(bufnr, row, row + 1, false)[1] or ''
  for _, raw in ipairs(raw_items) do
    local text = raw.insertText
    if type(text) == 'table' then
      text = text_util.snippet_text(text.value or '')
    end
    local replace_after = 0
    local offset = 0
    if type(text) == 'string' and raw.range then
      local s, e = raw.range.start, raw.range['end']
      local scol = s.line == row and compat.byte_col(bufnr, s, client.offset_encoding) or nil
      local ecol = e.line == row and compat.byte_col(bufnr, e, client.offset_encoding) or nil
      if not scol or not ecol or scol > col then
        text = nil -- a range we cannot show as typing forward from the cursor
      else
        -- The range may start before the cursor (at the word being typed):
        -- what is already in the buffer is not ghost text.
        local typed = line:sub(scol + 1, col)
        if text:sub(1, #typed) == typed then
          text = text:sub(#typed + 1)
          offset = vim.fn.strchars(typed)
          replace_after = math.max(0, ecol - col)
        else
          text = nil
        end
      end
    end
    if type(text) == 'string' and text ~= '' then
      items[#items + 1] = { text = text, replace_after = replace_after, command = raw.command, offset = offset }
    end
  end
  return items
end

function M._on_result(bufnr, pending, err, result)
  local st = states[bufnr]
  if not st or st.pending ~= pending then
    return -- superseded or cancelled
  end
  st.pending = nil
  if err then
    if err.code ~= -32800 then -- RequestCancelled
      vim.lsp.log.warn('exlsp: inlineCompletion failed', err)
    end
    return
  end
  if not enabled or not still_at(bufnr, pending) then
    return
  end
  local client = vim.lsp.get_client_by_id(pending.client_id)
  if not client then
    return
  end
  local items = parse_items(bufnr, client, result, pending.row, pending.col)
  clear(bufnr)
  if #items == 0 then
    return
  end
  st.items = items
  st.index = 1
  render(bufnr)
end

--- `exlsp/partialCompletion`: the text generated so far for a running request.
function M.on_partial(client_id, params)
  if not enabled or type(params) ~= 'table' or type(params.text) ~= 'string' or params.text == '' then
    return
  end
  for bufnr, st in pairs(states) do
    local pending = st.pending
    if
      pending
      and pending.client_id == client_id
      and pending.position.line == params.position.line
      and pending.position.character == params.position.character
      and vim.uri_from_bufnr(bufnr) == params.uri
      and (#st.items == 0 or st.items[1].partial)
      and still_at(bufnr, pending)
    then
      st.items = { { text = params.text, replace_after = 0, offset = 0, partial = true } }
      st.index = 1
      render(bufnr)
      return
    end
  end
end

--- After any edit or cursor move: keep the suggestion if the user typed what it
--- begins with, otherwise drop it and ask again (debounced).
---@param bufnr integer
function M.check(bufnr)
  local st = states[bufnr]
  if not st or not enabled or api.nvim_get_current_buf() ~= bufnr or not in_insert_mode() then
    return
  end
  local tick = api.nvim_buf_get_changedtick(bufnr)
  local row, col = cursor()
  if st.anchor and st.tick == tick and st.anchor.row == row and st.anchor.col == col then
    return -- nothing moved since the suggestion was drawn
  end
  if st.anchor and #st.items > 0 then
    local typed = typed_since_anchor(bufnr, st, row, col)
    if typed and typed ~= '' then
      local kept, index = {}, 1
      for i, item in ipairs(st.items) do
        if item.text:sub(1, #typed) == typed and #item.text > #typed then
          kept[#kept + 1] = {
            text = item.text:sub(#typed + 1),
            replace_after = row == st.anchor.row and item.replace_after or 0,
            command = item.command,
            offset = item.offset + vim.fn.strchars(typed),
            partial = item.partial,
          }
          if i == st.index then
            index = #kept
          end
        end
      end
      if #kept > 0 then
        st.items = kept
        st.index = index
        render(bufnr)
        return
      end
    end
  end
  clear(bufnr)
  cancel_pending(st)
  if st.dismissed_tick == tick then
    return
  end
  st.dismissed_tick = nil
  st.timer:stop()
  st.timer:start(
    options().debounce_ms or 75,
    0,
    vim.schedule_wrap(function()
      if states[bufnr] == st then
        M.request(bufnr)
      end
    end)
  )
end

local function schedule_check(bufnr)
  local st = states[bufnr]
  if not st or st.check_scheduled then
    return
  end
  st.check_scheduled = true
  vim.schedule(function()
    st.check_scheduled = false
    if states[bufnr] == st and api.nvim_buf_is_valid(bufnr) then
      M.check(bufnr)
    end
  end)
end

---@param bufnr? integer
---@return exlsp.Suggestion?
function M.current(bufnr)
  if bufnr == nil or bufnr == 0 then
    bufnr = api.nvim_get_current_buf()
  end
  local st = states[bufnr]
  return st and st.anchor and st.items[st.index] or nil
end

--- The id the server gave an item for counting its acceptance (the argument
--- of its `exlsp.accepted` command), or nil.
---@param item exlsp.Suggestion
---@return string?
local function acceptance_id(item)
  local command = item.command
  local id = command and command.command == 'exlsp.accepted' and command.arguments and command.arguments[1]
  return type(id) == 'string' and id or nil
end

--- Tells the server that the first `accepted_length` characters of the item's
--- insertText (the word typed before it included) are in the buffer now.
---@param st exlsp.BufState
---@param item exlsp.Suggestion
---@param accepted_length integer
---@param kind 'word'|'line'
local function report_partial(st, item, accepted_length, kind)
  local id = acceptance_id(item)
  local client = id and vim.lsp.get_client_by_id(st.client_id)
  if client then
    compat.notify(client, 'exlsp/didPartiallyAccept', { id = id, acceptedLength = accepted_length, kind = kind })
  end
end

--- Accepts the current suggestion, whole or in part.
---@param how? 'all'|'word'|'line'
---@return boolean accepted
function M.accept(how)
  local bufnr = api.nvim_get_current_buf()
  local st = states[bufnr]
  if not st then
    return false
  end
  M.check(bufnr) -- account for keys typed since the last redraw
  local item = st.items[st.index]
  if not item or not st.anchor then
    return false
  end
  local row, col = cursor()
  local part = item.text
  if how == 'word' then
    part = text_util.next_word(item.text)
  elseif how == 'line' then
    part = text_util.next_line(item.text)
  end
  local whole = part == item.text
  local end_col = col
  if whole and item.replace_after > 0 then
    local line = api.nvim_buf_get_lines(bufnr, row, row + 1, false)[1] or ''
    end_col = math.min(col + item.replace_after, #line)
  end
  cancel_pending(st)
  st.timer:stop()
  local lines = vim.split(part, '\n', { plain = true })
  api.nvim_buf_set_text(bufnr, row, col, row, end_col, lines)
  local new_row = row + #lines - 1
  local new_col = #lines == 1 and col + #lines[1] or #lines[#lines]
  api.nvim_win_set_cursor(0, { new_row + 1, new_col })
  if whole then
    clear(bufnr)
    if item.command then
      local client = vim.lsp.get_client_by_id(st.client_id)
      if client then
        compat.exec_cmd(client, item.command, bufnr)
      end
    end
  else
    local offset = item.offset + vim.fn.strchars(part)
    st.items = {
      {
        text = item.text:sub(#part + 1),
        replace_after = 0,
        command = item.command,
        offset = offset,
        partial = item.partial,
      },
    }
    report_partial(st, item, offset, how == 'line' and 'line' or 'word')
    st.index = 1
    render(bufnr)
  end
  return true
end

---@param delta integer
---@return boolean cycled
function M.cycle(delta)
  local bufnr = api.nvim_get_current_buf()
  local st = states[bufnr]
  if not st or not st.anchor or #st.items == 0 then
    return false
  end
  st.index = (st.index - 1 + delta) % #st.items + 1
  render(bufnr)
  return true
end

---@return boolean dismissed
function M.dismiss()
  local bufnr = api.nvim_get_current_buf()
  local st = states[bufnr]
  if not st or (not st.anchor and not st.pending) then
    return false
  end
  cancel_pending(st)
  st.timer:stop()
  clear(bufnr)
  st.dismissed_tick = api.nvim_buf_get_changedtick(bufnr)
  return true
end

--- Asks for a suggestion now (trigger kind Invoked), without debounce.
function M.trigger()
  local bufnr = api.nvim_get_current_buf()
  local st = states[bufnr]
  if not st then
    return false
  end
  st.dismissed_tick = nil
  clear(bufnr)
  M.request(bufnr, TRIGGER_INVOKED)
  return true
end

---@param value boolean
function M.set_enabled(value)
  enabled = value
  if not value then
    for bufnr, st in pairs(states) do
      cancel_pending(st)
      st.timer:stop()
      clear(bufnr)
    end
  end
end

--- Runs `fn`; when it did nothing, the key does what it would do unmapped.
local function key_or_fallback(lhs, fn)
  return function()
    if not fn() then
      api.nvim_feedkeys(api.nvim_replace_termcodes(lhs, true, false, true), 'n', false)
    end
  end
end

local function set_keymaps(bufnr)
  local keys = options().keymaps
  if not keys then
    return
  end
  local actions = {
    accept = { function() return M.accept('all') end, 'exlsp: accept suggestion' },
    accept_word = { function() return M.accept('word') end, 'exlsp: accept next word' },
    accept_line = { function() return M.accept('line') end, 'exlsp: accept next line' },
    next = { function() return M.cycle(1) end, 'exlsp: next suggestion' },
    prev = { function() return M.cycle(-1) end, 'exlsp: previous suggestion' },
    dismiss = { M.dismiss, 'exlsp: dismiss suggestion' },
    trigger = { M.trigger, 'exlsp: suggest now' },
  }
  for name, action in pairs(actions) do
    local lhs = keys[name]
    if lhs then
      vim.keymap.set('i', lhs, key_or_fallback(lhs, action[1]), { buffer = bufnr, desc = action[2] })
    end
  end
end

---@param client vim.lsp.Client
---@param bufnr integer
function M.attach(client, bufnr)
  local st = states[bufnr]
  if st then
    st.client_id = client.id
    return
  end
  st = {
    client_id = client.id,
    timer = assert(uv.new_timer()),
    items = {},
    index = 1,
    check_scheduled = false,
  }
  states[bufnr] = st
  local group = api.nvim_create_augroup('exlsp.ghost.' .. bufnr, { clear = true })
  api.nvim_create_autocmd({ 'InsertEnter', 'TextChangedI', 'TextChangedP', 'CursorMovedI' }, {
    group = group,
    buffer = bufnr,
    callback = function()
      schedule_check(bufnr)
    end,
  })
  api.nvim_create_autocmd({ 'InsertLeave', 'BufLeave' }, {
    group = group,
    buffer = bufnr,
    callback = function()
      cancel_pending(st)
      st.timer:stop()
      clear(bufnr)
    end,
  })
  api.nvim_create_autocmd('LspDetach', {
    group = group,
    buffer = bufnr,
    callback = function(args)
      if args.data and args.data.client_id == st.client_id then
        M.detach(bufnr)
      end
    end,
  })
  api.nvim_create_autocmd({ 'BufUnload', 'BufWipeout' }, {
    group = group,
    buffer = bufnr,
    callback = function()
      M.detach(bufnr)
    end,
  })
  set_keymaps(bufnr)
end

---@param bufnr integer
function M.detach(bufnr)
  local st = states[bufnr]
  if not st then
    return
  end
  cancel_pending(st)
  st.timer:stop()
  st.timer:close()
  clear(bufnr)
  states[bufnr] = nil
  pcall(api.nvim_del_augroup_by_name, 'exlsp.ghost.' .. bufnr)
end

return M

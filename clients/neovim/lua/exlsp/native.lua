-- Neovim 0.12+: the built-in `vim.lsp.inline_completion` requests and draws
-- the suggestions; this module enables it and maps the same keys as the
-- plugin renderer. Partial accepts and dismiss go through `get{on_accept}`.
-- Accepting a whole item, Neovim itself runs the item's command
-- (`exlsp.accepted`, which counts the accept); partial accepts are reported
-- with `exlsp/didPartiallyAccept`.
local api = vim.api
local text_util = require('exlsp.text')

local M = {}

local enabled = true
---@type table<integer, true>
local attached = {}

local function ic()
  return vim.lsp.inline_completion
end

--- 0-based row and byte column where a `vim.Range` starts (0.12 has
--- `start_row`/`start_col`; later versions a `start` position).
---@return integer?, integer?
function M.range_start(range)
  if range.start_row ~= nil then
    return range.start_row, range.start_col
  end
  local start = range.start
  if type(start) == 'table' then
    return start.row or start[1], start.col or start[2]
  end
end

--- The part of the item not yet in the buffer: its text minus what was typed
--- between the start of its range and the cursor.
---@param item vim.lsp.inline_completion.Item
---@return string?
function M.remaining_text(item)
  local insert = item.insert_text
  local text = type(insert) == 'string' and insert or text_util.snippet_text(insert.value or '')
  local range = item.range
  if not range then
    return text
  end
  local row, col = unpack(api.nvim_win_get_cursor(0))
  row = row - 1
  local start_row, start_col = M.range_start(range)
  if start_row ~= row or not start_col or start_col > col then
    return nil
  end
  local line = api.nvim_buf_get_lines(0, row, row + 1, false)[1] or ''
  local typed = line:sub(start_col + 1, col)
  if text:sub(1, #typed) ~= typed then
    return nil
  end
  return text:sub(#typed + 1)
end

--- 0-based row and byte column where a `vim.Range` ends.
---@return integer?, integer?
local function range_end(range)
  if range.end_row ~= nil then
    return range.end_row, range.end_col
  end
  local stop = range['end']
  if type(stop) == 'table' then
    return stop.row or stop[1], stop.col or stop[2]
  end
end

--- The item with its range grown to the cursor over what was typed since it
--- was requested, when that is how the item begins. Neovim 0.12 replaces the
--- range as the server sent it, so characters typed after the request would
--- stay behind the inserted text, e.g. `foobarob` (neovim#36529).
---@param item vim.lsp.inline_completion.Item
---@return vim.lsp.inline_completion.Item
function M.grow_range(item)
  local range = item.range
  if not range or not M.remaining_text(item) then
    return item
  end
  local row, col = unpack(api.nvim_win_get_cursor(0))
  row = row - 1
  local start_row, start_col = M.range_start(range)
  local end_row, end_col = range_end(range)
  local extmark_range = vim.range and vim.range.extmark
  if end_row == row and end_col and end_col < col and extmark_range then
    local ok, grown = pcall(extmark_range, api.nvim_get_current_buf(), start_row, start_col, row, col)
    if ok and grown then
      item.range = grown
    end
  end
  return item
end

--- Tells the server that the first `accepted_length` characters of the item's
--- insertText (the word typed before it included) are in the buffer now.
---@param item vim.lsp.inline_completion.Item
---@param accepted_length integer
---@param kind 'word'|'line'
local function report_partial(item, accepted_length, kind)
  local command = item.command
  local id = command and command.command == 'exlsp.accepted' and command.arguments and command.arguments[1]
  local client = type(id) == 'string' and vim.lsp.get_client_by_id(item.client_id)
  if client then
    client:notify('exlsp/didPartiallyAccept', { id = id, acceptedLength = accepted_length, kind = kind })
  end
end

---@param pick fun(text: string): string
---@param kind 'word'|'line'
local function accept_part(pick, kind)
  return ic().get({
    -- Returning nil tells Neovim not to apply the item: this inserts part of it.
    on_accept = function(item)
      local rest = M.remaining_text(item)
      if not rest or rest == '' then
        return nil
      end
      local part = pick(rest)
      if part == rest then
        -- All that is left: Neovim applies the item and runs its command.
        return item
      end
      text_util.insert_at_cursor(part)
      local insert = item.insert_text
      local text = type(insert) == 'string' and insert or text_util.snippet_text(insert.value or '')
      local typed = vim.fn.strchars(text) - vim.fn.strchars(rest)
      report_partial(item, typed + vim.fn.strchars(part), kind)
      return nil
    end,
  })
end

local function key_or_fallback(lhs, fn)
  return function()
    if not fn() then
      api.nvim_feedkeys(api.nvim_replace_termcodes(lhs, true, false, true), 'n', false)
    end
  end
end

local function set_keymaps(bufnr)
  local keys = require('exlsp').options.keymaps
  if not keys then
    return
  end
  local actions = {
    accept = { function() return ic().get({ on_accept = M.grow_range }) end, 'exlsp: accept suggestion' },
    accept_word = { function() return accept_part(text_util.next_word, 'word') end, 'exlsp: accept next word' },
    accept_line = { function() return accept_part(text_util.next_line, 'line') end, 'exlsp: accept next line' },
    next = {
      function()
        ic().select({ count = 1 })
        return true
      end,
      'exlsp: next suggestion',
    },
    prev = {
      function()
        ic().select({ count = -1 })
        return true
      end,
      'exlsp: previous suggestion',
    },
    -- Accepting with a handler that inserts nothing hides the suggestion and
    -- cancels the pending request.
    dismiss = { function() return ic().get({ on_accept = function() end }) end, 'exlsp: dismiss suggestion' },
  }
  for name, action in pairs(actions) do
    local lhs = keys[name]
    if lhs then
      vim.keymap.set('i', lhs, key_or_fallback(lhs, action[1]), { buffer = bufnr, desc = action[2] })
    end
  end
end

---@param _client vim.lsp.Client
---@param bufnr integer
function M.attach(_client, bufnr)
  if not attached[bufnr] then
    attached[bufnr] = true
    set_keymaps(bufnr)
    api.nvim_create_autocmd({ 'BufWipeout' }, {
      buffer = bufnr,
      once = true,
      callback = function()
        attached[bufnr] = nil
      end,
    })
  end
  if enabled then
    ic().enable(true, { bufnr = bufnr })
  end
end

---@param value boolean
function M.set_enabled(value)
  enabled = value
  for bufnr in pairs(attached) do
    if api.nvim_buf_is_valid(bufnr) then
      ic().enable(value, { bufnr = bufnr })
    end
  end
end

return M

-- Text helpers shared by the plugin renderer and the native (0.12+) keymaps.
local M = {}

--- Leading whitespace and one word, or one run of punctuation, or a line break
--- with the next line's indentation.
---@param text string
---@return string
function M.next_word(text)
  return text:match('^\r?\n[ \t]*')
    or text:match('^[ \t]*[%w_]+')
    or text:match('^[ \t]*[^%w_%s]+')
    or text:match('^[ \t]+')
    or text
end

--- The rest of the current line including its line break (the whole text on the last line).
---@param text string
---@return string
function M.next_line(text)
  return text:match('^[^\n]*\n') or text
end

--- Plain text of an LSP snippet: placeholders keep their default text, tab stops vanish.
---@param value string
---@return string
function M.snippet_text(value)
  local ok, grammar = pcall(require, 'vim.lsp._snippet_grammar')
  if ok then
    local parsed_ok, parsed = pcall(grammar.parse, value)
    if parsed_ok then
      return tostring(parsed)
    end
  end
  return (value:gsub('%${%d+:([^}]*)}', '%1'):gsub('%$%d+', ''))
end

--- Inserts `text` at the cursor of the current window and moves the cursor after it.
---@param text string
function M.insert_at_cursor(text)
  local row, col = unpack(vim.api.nvim_win_get_cursor(0))
  row = row - 1
  local lines = vim.split(text, '\n', { plain = true })
  vim.api.nvim_buf_set_text(0, row, col, row, col, lines)
  local new_row = row + #lines - 1
  local new_col = #lines == 1 and col + #lines[1] or #lines[#lines]
  vim.api.nvim_win_set_cursor(0, { new_row + 1, new_col })
end

return M

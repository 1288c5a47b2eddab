-- Client methods became `client:method()` in Neovim 0.11; 0.10 has `client.method()`.
local M = {}

local has_011 = vim.fn.has('nvim-0.11') == 1

---@return boolean, integer?
function M.request(client, method, params, handler, bufnr)
  if has_011 then
    return client:request(method, params, handler, bufnr)
  end
  return client.request(method, params, handler, bufnr)
end

function M.notify(client, method, params)
  if has_011 then
    return client:notify(method, params)
  end
  return client.notify(method, params)
end

function M.cancel_request(client, id)
  if has_011 then
    return client:cancel_request(id)
  end
  return client.cancel_request(id)
end

function M.stop(client)
  if has_011 then
    return client:stop()
  end
  return client.stop()
end

function M.exec_cmd(client, command, bufnr)
  if has_011 then
    return client:exec_cmd(command, { bufnr = bufnr })
  end
  -- ExecuteCommandParams: the command and its arguments, not the title.
  local params = { command = command.command, arguments = command.arguments }
  return client.request('workspace/executeCommand', params, nil, bufnr)
end

--- Byte column of an LSP position in a buffer line.
---@param bufnr integer
---@param position {line: integer, character: integer}
---@param encoding string
---@return integer
function M.byte_col(bufnr, position, encoding)
  return vim.lsp.util._get_line_byte_from_position(bufnr, position, encoding)
end

return M

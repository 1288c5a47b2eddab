-- Helpers for the headless Neovim client tests: scripted steps in a
-- coroutine (so the main loop keeps processing keys and LSP messages between
-- them), observations collected into a JSON file the Python test reads.
local H = {}

H.out_path = assert(os.getenv('EXLSP_TEST_OUT'), 'EXLSP_TEST_OUT not set')
H.results = { checks = {}, notes = {}, errors = {} }

local co

function H.sleep(ms)
  local current = assert(coroutine.running(), 'sleep outside the test coroutine')
  vim.defer_fn(function()
    local ok, err = coroutine.resume(current)
    if not ok then
      H.fail_hard(err)
    end
  end, ms)
  coroutine.yield()
end

--- Polls `pred` until it returns a truthy value; returns that value, or nil on timeout.
function H.wait_until(pred, timeout_ms, step_ms)
  step_ms = step_ms or 20
  local waited = 0
  while true do
    local ok, value = pcall(pred)
    if ok and value then
      return value
    end
    if waited >= timeout_ms then
      return nil
    end
    H.sleep(step_ms)
    waited = waited + step_ms
  end
end

--- Types `keys` (nvim_input notation) and lets the main loop handle them.
function H.input(keys, settle_ms)
  vim.api.nvim_input(keys)
  H.sleep(settle_ms or 30)
end

--- Types text one character at a time, `delay_ms` apart, like a person.
function H.type(text, delay_ms)
  for ch in text:gmatch('[%z\1-\127\194-\244][\128-\191]*') do
    vim.api.nvim_input(ch == '<' and '<lt>' or ch)
    H.sleep(delay_ms or 40)
  end
end

function H.check(name, ok, detail)
  table.insert(H.results.checks, { name = name, ok = ok and true or false, detail = detail })
  return ok
end

function H.note(key, value)
  H.results.notes[key] = value
end

function H.buffer_text(bufnr)
  return table.concat(vim.api.nvim_buf_get_lines(bufnr or 0, 0, -1, false), '\n')
end

function H.cursor()
  local pos = vim.api.nvim_win_get_cursor(0)
  return { pos[1] - 1, pos[2] }
end

--- The text an extmark shows: its inline/eol virt_text, then its virt_lines.
function H.extmark_text(bufnr, ns)
  local marks = vim.api.nvim_buf_get_extmarks(bufnr, ns, 0, -1, { details = true })
  if #marks == 0 then
    return nil
  end
  local mark = marks[1]
  local details = mark[4]
  local parts = {}
  local first = {}
  for _, chunk in ipairs(details.virt_text or {}) do
    first[#first + 1] = chunk[1]
  end
  parts[1] = table.concat(first)
  for _, vline in ipairs(details.virt_lines or {}) do
    local l = {}
    for _, chunk in ipairs(vline) do
      l[#l + 1] = chunk[1]
    end
    parts[#parts + 1] = table.concat(l)
  end
  return {
    text = table.concat(parts, '\n'),
    row = mark[2],
    col = mark[3],
    pos = details.virt_text_pos,
    count = #marks,
  }
end

function H.write()
  local f = assert(io.open(H.out_path, 'w'))
  f:write(vim.json.encode(H.results))
  f:close()
end

function H.finish()
  H.results.done = true
  H.write()
  vim.cmd('qa!')
end

function H.fail_hard(err)
  table.insert(H.results.errors, tostring(err))
  H.finish()
end

--- Runs `fn` as the test body; any error is recorded and Neovim quits.
function H.run(fn, deadline_ms)
  vim.defer_fn(function()
    table.insert(H.results.errors, ('deadline of %d ms passed'):format(deadline_ms))
    H.finish()
  end, deadline_ms)
  co = coroutine.create(function()
    local ok, err = xpcall(fn, debug.traceback)
    if not ok then
      table.insert(H.results.errors, err)
    end
    H.finish()
  end)
  vim.schedule(function()
    local ok, err = coroutine.resume(co)
    if not ok then
      H.fail_hard(err)
    end
  end)
end

return H

-- llama.vim (llama.cpp's own plug-in) in a real headless Neovim against `dg-edit serve`'s /infill.
--
-- Run by tests/test_llama_vim.py as
--   nvim --headless --clean -c "luafile tests/llama_vim_e2e.lua"
-- with LLAMA_VIM_E2E = JSON {plugin, harness, endpoint, other, main, row, out}. It does what a person does:
-- visits and saves another file (llama.vim picks chunks of it for its ring, sent as input_extra),
-- opens the main file, goes to the end of a line in insert mode, presses <C-F> (llama.vim's manual
-- trigger), waits for the ghost text, presses <Tab> to accept it. Keys go through typeahead, so
-- llama.vim's mappings, autocommands and timers run as for a person. Observations go to `out` as
-- JSON; pytest asserts.

local spec = vim.json.decode(vim.env.LLAMA_VIM_E2E)
local obs = {}

local function finish(err)
  if err then
    obs.error = tostring(err)
  end
  obs.messages = vim.api.nvim_exec2("messages", { output = true }).output
  local f = assert(io.open(spec.out, "w"))
  f:write(vim.json.encode(obs))
  f:close()
  vim.cmd("qall!")
end

local harness = dofile(spec.harness)
local sleep, wait_for, type_keys = harness.sleep, harness.wait_for, harness.type_keys

--- llama.vim's ghost text: the extmarks in its namespace, as text (first line, then virtual lines).
local function ghost()
  local ns = vim.api.nvim_create_namespace("vt_fim")
  local marks = vim.api.nvim_buf_get_extmarks(0, ns, 0, -1, { details = true })
  if #marks == 0 then
    return nil
  end
  local first, rest = nil, {}
  for _, mark in ipairs(marks) do
    local details = mark[4]
    if details.virt_text and first == nil then
      first = details.virt_text[1][1]
    end
    for _, line in ipairs(details.virt_lines or {}) do
      rest[#rest + 1] = line[1][1]
    end
  end
  return { first = first or "", rest = rest }
end

-- Its configuration dict is read whole when the plug-in loads (this release merges no defaults).
vim.g.llama_config = {
  endpoint = spec.endpoint,
  n_prefix = 256, n_suffix = 64, n_predict = 24,
  t_max_prompt_ms = 500, t_max_predict_ms = 3000,
  show_info = 2, auto_fim = false, max_line_suffix = 8,
  ring_n_chunks = 16, ring_chunk_size = 64, ring_scope = 1024, ring_update_ms = 200,
}
vim.opt.runtimepath:prepend(spec.plugin)

harness.run(function()
  vim.fn["llama#init"]()
  -- Another file, visited and saved: llama.vim queues chunks of it for its ring, and in normal mode
  -- its ring update moves them in (and warms the server up with them).
  vim.cmd("edit " .. vim.fn.fnameescape(spec.other))
  vim.cmd("write")
  sleep(600)
  vim.cmd("edit " .. vim.fn.fnameescape(spec.main))
  sleep(600)
  obs.before = table.concat(vim.api.nvim_buf_get_lines(0, 0, -1, false), "\n")
  vim.api.nvim_win_set_cursor(0, { spec.row, 0 })
  type_keys("A")
  sleep(700) -- llama.vim ignores a manual trigger within 0.6 s of the last one
  obs.line_before = vim.api.nvim_get_current_line()
  type_keys("<C-F>")
  local shown = wait_for("llama.vim's ghost text", 60000, function()
    local g = ghost()
    return g and (g.first ~= "" or #g.rest > 0) and g
  end)
  obs.ghost_first = shown.first
  obs.ghost_rest = shown.rest
  obs.mode_while_shown = vim.api.nvim_get_mode().mode
  obs.buffer_while_shown = table.concat(vim.api.nvim_buf_get_lines(0, 0, -1, false), "\n")
  type_keys("<Tab>")
  wait_for("the accepted text", 10000, function()
    return ghost() == nil
  end)
  sleep(100)
  obs.after = table.concat(vim.api.nvim_buf_get_lines(0, 0, -1, false), "\n")
  obs.cursor_after = vim.api.nvim_win_get_cursor(0)
  type_keys("<Esc>")
  sleep(50)
  finish()
end, finish)

-- Coroutine helpers for scenarios that drive a real headless Neovim as a person would.
--
-- A scenario runs in a coroutine so that Neovim's main loop keeps running while it waits: keys go
-- through typeahead (mappings, autocommands, timers run as for a person) and plug-in callbacks
-- arrive. Used by editors/nvim/tests/e2e.lua (the dg-edit plug-in) and tests/llama_vim_e2e.lua
-- (llama.vim against dg-edit serve):
--
--   local h = dofile(".../harness.lua")
--   h.run(function() h.type_keys("A"); h.wait_for("insert mode", 2000, function() ... end) end, finish)
--
-- `finish(err)` is called with the error when the scenario fails; a scenario that ends well calls
-- it itself.

local M = {}
local co, on_error

--- Let the main loop run for `ms` milliseconds.
function M.sleep(ms)
  vim.defer_fn(function()
    local ok, err = coroutine.resume(co)
    if not ok then
      on_error(err)
    end
  end, ms)
  coroutine.yield()
end

--- Poll `cond` every 20 ms until it returns a truthy value (returned); error with `what` after `timeout` ms.
function M.wait_for(what, timeout, cond)
  local deadline = vim.uv.now() + timeout
  while true do
    local value = cond()
    if value then
      return value
    end
    if vim.uv.now() > deadline then
      error("timed out waiting for " .. what, 2)
    end
    M.sleep(20)
  end
end

--- Type `keys`: "m" through mappings (a plug-in's <Tab>), "t" as if typed by the user.
function M.type_keys(keys)
  vim.api.nvim_feedkeys(vim.keycode(keys), "mt", false)
end

--- Run `body` as the scenario; `finish(err)` gets any error it raises.
function M.run(body, finish)
  on_error = finish
  co = coroutine.create(body)
  local ok, err = coroutine.resume(co)
  if not ok then
    finish(err)
  end
end

return M

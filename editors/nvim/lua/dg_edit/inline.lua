--- Inline completion on Neovim 0.11, which has no `vim.lsp.inline_completion`.
---
--- The plug-in sends `textDocument/inlineCompletion` itself and draws the first item as ghost
--- text. Neovim flushes the pending `didChange` before every request, so the server always knows
--- the version the request was made for; the answer is dropped when the buffer's version (or the
--- cursor) moved on meanwhile. Typing cancels the in-flight request (`$/cancelRequest`) and
--- clears the ghost at once, so a suggestion for text that is gone never stays on screen.

local ghost = require("dg_edit.ghost")
local util = require("dg_edit.util")

local M = {}

local TRIGGER_INVOKED, TRIGGER_AUTOMATIC = 1, 2
local REQUEST_CANCELLED, CONTENT_MODIFIED = -32800, -32801

--- Per-buffer state: the debounce timer, the request in flight, the suggestion on screen
--- ({ item, client, version, row, col, text }). `M.cancel` stops the timer and cancels the request
--- (the server stops denoising); `M.pending`, `M.visible` and `M.current` read the state.
local requests = util.buffer_requests()
local state = requests.state
M.cancel, M.pending, M.visible, M.current = requests.cancel, requests.pending, requests.visible, requests.current

--- @type dg_edit.Config
local config

--- The server's `debounce_ms` (dg_edit.config.Settings), used when the user set none.
M.server_debounce_ms = nil
local FALLBACK_DEBOUNCE_MS = 150 -- only until the server has answered dgEdit/stats

--- @param cfg dg_edit.Config
function M.configure(cfg)
  config = cfg
end

--- Cancel and clear the ghost text.
function M.dismiss(bufnr)
  M.cancel(bufnr)
  state(bufnr).shown = nil
  ghost.clear(bufnr)
end

--- The text the ghost must show for `item` at the cursor: the inserted text after what the
--- item's range already covers before the cursor (the spec lets `range` start before it).
local function ghost_text(bufnr, item, cursor_row, cursor_col, encoding)
  local text = type(item.insertText) == "table" and item.insertText.value or item.insertText or ""
  if not item.range then
    return text
  end
  local start_col = util.lsp_to_byte(bufnr, item.range.start.line, item.range.start.character, encoding)
  if item.range.start.line ~= cursor_row or start_col > cursor_col then
    return nil -- not anchored at this cursor: do not guess
  end
  local typed = vim.api.nvim_buf_get_text(bufnr, cursor_row, start_col, cursor_row, cursor_col, {})[1]
  if text:sub(1, #typed) ~= typed then
    return nil
  end
  return text:sub(#typed + 1)
end

--- Show `item` as ghost text if it still fits the buffer and cursor.
local function show(bufnr, client, item, version, row, col)
  local text = ghost_text(bufnr, item, row, col, client.offset_encoding)
  if not text or text == "" then
    ghost.clear(bufnr)
    return
  end
  ghost.show(bufnr, row, col, text, { hl = config.hl_group, pos = config.ghost_pos })
  state(bufnr).shown = { item = item, client = client, version = version, row = row, col = col, text = text }
end

--- Ask the server for a suggestion at the cursor of the current window (which shows `bufnr`).
--- @param bufnr integer
--- @param invoked boolean true for an explicit request (the server may offer more candidates)
--- @return boolean sent
function M.request(bufnr, invoked)
  M.cancel(bufnr)
  local client = util.client(bufnr)
  if not client or vim.api.nvim_get_current_buf() ~= bufnr then
    return false
  end
  local cursor = vim.api.nvim_win_get_cursor(0)
  local row, col = cursor[1] - 1, cursor[2]
  local params = vim.lsp.util.make_position_params(0, client.offset_encoding)
  params.context = { triggerKind = invoked and TRIGGER_INVOKED or TRIGGER_AUTOMATIC }
  local request = { client = client }
  local ok, id = client:request("textDocument/inlineCompletion", params, function(err, result, ctx)
    local s = state(bufnr)
    if s.request ~= request then
      return -- cancelled or superseded by a newer request
    end
    s.request = nil
    if err then
      if err.code ~= REQUEST_CANCELLED and err.code ~= CONTENT_MODIFIED then
        util.notify("inline completion failed: " .. (err.message or vim.inspect(err)), vim.log.levels.WARN)
      end
      return
    end
    -- Drop answers for a text or cursor that moved on while the model worked.
    if ctx.version ~= util.version(bufnr) or vim.api.nvim_get_current_buf() ~= bufnr then
      return
    end
    local now = vim.api.nvim_win_get_cursor(0)
    if now[1] - 1 ~= row or now[2] ~= col then
      return
    end
    local items = result and (result.items or result) or {}
    if items[1] then
      show(bufnr, client, items[1], ctx.version, row, col)
    else
      ghost.clear(bufnr)
    end
  end, bufnr)
  if not ok then
    return false
  end
  request.id = id
  request.version = util.version(bufnr)
  request.row, request.col = row, col
  state(bufnr).request = request
  return true
end

--- Request after `debounce_ms` of quiet (called on every keystroke in insert mode).
function M.schedule(bufnr)
  M.dismiss(bufnr)
  requests.debounce(bufnr, config.debounce_ms or M.server_debounce_ms or FALLBACK_DEBOUNCE_MS, function()
    if vim.fn.mode():sub(1, 1) == "i" then
      M.request(bufnr, false)
    end
  end)
end

--- Insert the suggestion on screen. Returns false when there is none (the key falls through).
function M.accept(bufnr)
  local shown = state(bufnr).shown
  if not shown then
    return false
  end
  M.dismiss(bufnr)
  if shown.version ~= util.version(bufnr) then
    return false -- the text changed under the ghost: never insert a stale suggestion
  end
  local item, client = shown.item, shown.client
  local text = type(item.insertText) == "table" and item.insertText.value or item.insertText
  local position = { line = shown.row, character = util.byte_to_lsp(bufnr, shown.row, shown.col, client.offset_encoding) }
  local range = item.range or { start = position, ["end"] = position }
  vim.lsp.util.apply_text_edits({ { range = range, newText = text } }, bufnr, client.offset_encoding)
  -- Cursor after the inserted text.
  local start_row = range.start.line
  local start_col = util.lsp_to_byte(bufnr, start_row, range.start.character, client.offset_encoding)
  local lines = vim.split(text, "\n", { plain = true })
  local end_row = start_row + #lines - 1
  local end_col = (#lines == 1 and start_col or 0) + #lines[#lines]
  vim.api.nvim_win_set_cursor(0, { end_row + 1, end_col })
  if item.command then
    client:exec_cmd(item.command, { bufnr = bufnr })
  end
  return true
end

--- Redraw the ghost from a `dgEdit/canvas` draft of our request in flight.
--- @param bufnr integer
--- @param params { version: integer, requestId: any, step: integer, text: string, done: boolean }
function M.on_canvas(bufnr, params)
  local request = state(bufnr).request
  if not request or params.version ~= request.version or params.version ~= util.version(bufnr) then
    return -- not ours, or for a text that is gone
  end
  if params.requestId ~= nil and params.requestId ~= request.id then
    return
  end
  if params.done or not config.show_canvas then
    return -- the final answer arrives as the request's result
  end
  ghost.show(bufnr, request.row, request.col, params.text, { hl = config.canvas_hl_group, pos = config.ghost_pos })
end

return M

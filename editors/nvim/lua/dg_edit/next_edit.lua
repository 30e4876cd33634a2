--- Next-edit suggestions: the edit the server predicts you will make next, near the cursor.
---
--- After an edit in normal mode (or on leaving insert mode), once the buffer has been quiet for
--- `next_edit_debounce_ms`, the plug-in asks the server with `textDocument/copilotInlineEdit`
--- (the method copilot-lsp and sidekick.nvim speak). The first suggested edit is drawn without
--- touching the buffer: the text it replaces highlighted (`DgEditNextEditOld`), the new text as
--- virtual text after it and virtual lines below (`DgEditNextEditNew`). Keys jump to it, accept it
--- (one undo step, then the server's `command` runs) and dismiss it. An answer for a buffer version
--- that is gone is dropped, and any change clears the suggestion on screen.

local util = require("dg_edit.util")

local M = {}

M.ns = vim.api.nvim_create_namespace("dg_edit_next_edit")

local REQUEST_CANCELLED, CONTENT_MODIFIED = -32800, -32801
local FALLBACK_DEBOUNCE_MS = 500

--- Per-buffer state: the quiet timer, the request in flight, the suggestion on screen
--- ({ edit, client, version, start = {row, col}, finish = {row, col} }). `M.cancel` stops the timer and
--- cancels the request; `M.pending`, `M.visible` and `M.current` read the state.
local requests = util.buffer_requests()
local state = requests.state
M.cancel, M.pending, M.visible, M.current = requests.cancel, requests.pending, requests.visible, requests.current

--- @type dg_edit.Config
local config

--- @param cfg dg_edit.Config
function M.configure(cfg)
  config = cfg
end

--- Cancel, and clear the suggestion from the screen.
function M.dismiss(bufnr)
  M.cancel(bufnr)
  state(bufnr).shown = nil
  if vim.api.nvim_buf_is_valid(bufnr) then
    vim.api.nvim_buf_clear_namespace(bufnr, M.ns, 0, -1)
  end
end

--- Byte positions {row, col} (0-based) of an LSP range in `bufnr`.
local function byte_range(bufnr, range, encoding)
  local srow, erow = range.start.line, range["end"].line
  return { srow, util.lsp_to_byte(bufnr, srow, range.start.character, encoding) },
    { erow, util.lsp_to_byte(bufnr, erow, range["end"].character, encoding) }
end

--- Draw `edit`: the replaced range highlighted, the new text after it (first line inline, the rest below).
local function draw(bufnr, start, finish, text)
  vim.api.nvim_buf_clear_namespace(bufnr, M.ns, 0, -1)
  local last_row = math.max(vim.api.nvim_buf_line_count(bufnr) - 1, 0)
  if start[1] ~= finish[1] or start[2] ~= finish[2] then
    vim.api.nvim_buf_set_extmark(bufnr, M.ns, start[1], start[2], {
      end_row = finish[1],
      end_col = finish[2],
      hl_group = config.next_edit_old_hl_group,
      strict = false,
      undo_restore = false,
      invalidate = true,
    })
  end
  local lines = vim.split(text, "\n", { plain = true })
  local mark = {
    virt_text = { { lines[1] == "" and " " or lines[1], config.next_edit_new_hl_group } },
    virt_text_pos = "inline",
    hl_mode = "combine",
    strict = false,
    undo_restore = false,
    invalidate = true,
  }
  if #lines > 1 then
    mark.virt_lines = vim.tbl_map(function(line)
      return { { line, config.next_edit_new_hl_group } }
    end, vim.list_slice(lines, 2))
  end
  vim.api.nvim_buf_set_extmark(bufnr, M.ns, math.min(finish[1], last_row), finish[2], mark)
end

--- Ask the server for the next edit at the cursor of the current window (which shows `bufnr`).
--- @return boolean sent
function M.request(bufnr)
  M.cancel(bufnr)
  local client = util.client(bufnr)
  if not client or vim.api.nvim_get_current_buf() ~= bufnr then
    return false
  end
  local params = vim.lsp.util.make_position_params(0, client.offset_encoding)
  local version = util.version(bufnr)
  params.textDocument.version = version
  local request = { client = client, version = version }
  local ok, id = client:request("textDocument/copilotInlineEdit", params, function(err, result, ctx)
    local s = state(bufnr)
    if s.request ~= request then
      return -- cancelled or superseded
    end
    s.request = nil
    if err then
      if err.code ~= REQUEST_CANCELLED and err.code ~= CONTENT_MODIFIED then
        util.notify("next-edit suggestion failed: " .. (err.message or vim.inspect(err)), vim.log.levels.WARN)
      end
      return
    end
    M.show(bufnr, client, result, ctx.version)
  end, bufnr)
  if not ok then
    return false
  end
  request.id = id
  state(bufnr).request = request
  return true
end

--- Show the first edit of a `copilotInlineEdit` result, if it still belongs to the buffer's text.
function M.show(bufnr, client, result, version)
  local edit = result and result.edits and result.edits[1]
  local current = util.version(bufnr)
  if not edit or version ~= current or (edit.textDocument and edit.textDocument.version ~= current) then
    M.dismiss(bufnr)
    return false
  end
  local start, finish = byte_range(bufnr, edit.range, client.offset_encoding)
  draw(bufnr, start, finish, edit.text)
  state(bufnr).shown = { edit = edit, client = client, version = version, start = start, finish = finish }
  return true
end

--- Ask once the buffer has been quiet for the debounce (called after every edit).
function M.schedule(bufnr)
  M.dismiss(bufnr)
  if not config.next_edit then
    return
  end
  requests.debounce(bufnr, config.next_edit_debounce_ms or FALLBACK_DEBOUNCE_MS, function()
    if vim.fn.mode() == "n" then
      M.request(bufnr)
    end
  end)
end

--- Move the cursor to the start of the suggested edit. False when none is shown.
function M.jump(bufnr)
  local shown = state(bufnr).shown
  if not shown then
    return false
  end
  vim.api.nvim_win_set_cursor(0, { shown.start[1] + 1, shown.start[2] })
  return true
end

--- Whether the cursor is inside the suggested edit's lines (where <Tab> accepts rather than jumps).
function M.at_suggestion(bufnr)
  local shown = state(bufnr).shown
  if not shown then
    return false
  end
  local row = vim.api.nvim_win_get_cursor(0)[1] - 1
  return row >= shown.start[1] and row <= shown.finish[1]
end

--- Apply the suggested edit (one undo step), run its command. False when none is shown or it is stale.
function M.accept(bufnr)
  local shown = state(bufnr).shown
  if not shown then
    return false
  end
  M.dismiss(bufnr)
  if shown.version ~= util.version(bufnr) then
    return false -- the text changed under the suggestion: never apply it
  end
  local edit, client = shown.edit, shown.client
  vim.lsp.util.apply_text_edits({ { range = edit.range, newText = edit.text } }, bufnr, client.offset_encoding)
  local lines = vim.split(edit.text, "\n", { plain = true })
  local row = shown.start[1] + #lines - 1
  local col = (#lines == 1 and shown.start[2] or 0) + #lines[#lines]
  pcall(vim.api.nvim_win_set_cursor, 0, { row + 1, math.max(col - 1, 0) })
  if edit.command then
    client:exec_cmd(edit.command, { bufnr = bufnr })
  end
  return true
end

return M

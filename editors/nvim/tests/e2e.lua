-- End-to-end scenarios for the dg-edit Neovim plug-in against the real `dg-edit lsp`.
--
-- Run by tests/test_nvim.py as
--   nvim --headless --clean --cmd "set rtp^=editors/nvim" -c "luafile editors/nvim/tests/e2e.lua"
-- with DG_EDIT_E2E = JSON {cmd, out, lsp, scenarios = [{name, file, row, auto_trigger?, debounce_ms?}]}.
-- One Neovim and one server run every scenario in turn (each on its own file), which keeps the
-- suite fast: the model loads once. The scenarios run in a coroutine so the editor's main loop
-- keeps running: keys go through typeahead (mappings, TextChangedI, timers) exactly as when a
-- person types. What each scenario observed is written to `out` as JSON; pytest asserts.

local session = vim.json.decode(vim.env.DG_EDIT_E2E)
local results = {}
local spec, obs -- the scenario running now, and what it observed

local function note(name, value)
  obs[name] = value
end

local function finish(err)
  if err then
    results._error = tostring(err)
  end
  local f = assert(io.open(session.out, "w"))
  f:write(vim.json.encode(results))
  f:close()
  vim.cmd("qall!")
end

local harness = dofile(vim.fs.joinpath(vim.fs.dirname(debug.getinfo(1, "S").source:sub(2)), "harness.lua"))
local sleep, wait_for, type_keys = harness.sleep, harness.wait_for, harness.type_keys

local dg = require("dg_edit")
local util = require("dg_edit.util")
local inline = require("dg_edit.inline")
local next_edit = require("dg_edit.next_edit")

dg.setup({
  cmd = session.cmd,
  auto_trigger = false,
  settings = session.settings or {},
  lsp = session.lsp or {},
})

-- Tee the server's dgEdit/canvas notifications: `done` carries each request's final text.
local canvases = {}
local function tee_canvas(client)
  if client._dg_edit_tee then
    return
  end
  client._dg_edit_tee = true
  local original = client.handlers["dgEdit/canvas"]
  client.handlers["dgEdit/canvas"] = function(err, params, ctx)
    canvases[#canvases + 1] = params
    return original(err, params, ctx)
  end
end

local function done_for(request_id)
  for _, c in ipairs(canvases) do
    if c.done and tostring(c.requestId) == tostring(request_id) then
      return c
    end
  end
end

local function buffer_text(bufnr)
  return table.concat(vim.api.nvim_buf_get_lines(bufnr, 0, -1, false), "\n")
end

--- Open the file, wait for the server, put the cursor at the end of line `row` in insert mode.
local function open_at_end_of(row)
  vim.cmd.edit(vim.fn.fnameescape(spec.file))
  local bufnr = vim.api.nvim_get_current_buf()
  local client = wait_for("the dg-edit client to attach", 30000, function()
    local c = util.client(bufnr)
    return c and c.initialized and c
  end)
  tee_canvas(client)
  note("offset_encoding", client.offset_encoding)
  note("has_native_inline_completion", vim.lsp.inline_completion ~= nil)
  vim.api.nvim_win_set_cursor(0, { row, 0 })
  type_keys("A")
  wait_for("insert mode", 2000, function()
    return vim.fn.mode() == "i"
  end)
  return bufnr, client
end

--- The server's counters (dgEdit/stats), asked synchronously.
local function server_stats(client)
  local done, answer
  client:request("dgEdit/stats", vim.empty_dict(), function(err, result)
    done, answer = true, err and { error = err } or result
  end)
  wait_for("dgEdit/stats", 10000, function()
    return done
  end)
  if answer then
    answer.recent = nil
  end
  return answer
end

--- Wait for the suggestion of the request just triggered; fail at once, with the reason, when
--- the server answered but had nothing to suggest (the model's infill was empty).
local function wait_for_suggestion(bufnr, what)
  wait_for(what .. " (request sent)", 10000, function()
    return inline.pending(bufnr) or inline.current(bufnr)
  end)
  wait_for(what, 180000, function()
    return inline.current(bufnr) or not inline.pending(bufnr)
  end)
  return inline.current(bufnr)
    or error(what .. ": the server answered with no suggestion (the model's infill was empty)", 2)
end

local scenarios = {}

-- Trigger, see the server's text as ghost text, accept it with <Tab>.
function scenarios.accept()
  local bufnr = open_at_end_of(spec.row)
  local before = buffer_text(bufnr)
  note("before", before)
  note("version_before", util.version(bufnr))
  type_keys("<M-\\>")
  local shown = wait_for_suggestion(bufnr, "a suggestion")
  note("ghost", dg.ghost_text(bufnr))
  note("shown_text", shown.text)
  -- Extmarks show control characters the way Neovim prints them (^\ for \x1c): compare like that.
  note("shown_text_displayed", table.concat(vim.tbl_map(vim.fn.strtrans, vim.split(shown.text, "\n", { plain = true })), "\n"))
  note("shown_version", shown.version)
  note("version_at_ghost", util.version(bufnr))
  local request_id = nil
  for _, c in ipairs(canvases) do
    if c.done then
      request_id = c.requestId
    end
  end
  local done = done_for(request_id)
  note("server_final_text", done and done.text)
  note("canvas_steps", #canvases)
  note("buffer_while_ghost", buffer_text(bufnr)) -- ghost text must not be in the buffer
  type_keys("<Tab>")
  wait_for("the suggestion to be inserted", 5000, function()
    return buffer_text(bufnr) ~= before
  end)
  note("after", buffer_text(bufnr))
  note("ghost_after_accept", dg.ghost_text(bufnr))
  local cursor = vim.api.nvim_win_get_cursor(0)
  note("cursor_after_accept", cursor)
  -- <Tab> with nothing visible falls through to a real tab (the python ftplugin would expand it).
  vim.bo[bufnr].expandtab = false
  vim.bo[bufnr].softtabstop = 0
  local without = buffer_text(bufnr)
  type_keys("<Tab>")
  wait_for("the fall-through tab", 5000, function()
    return buffer_text(bufnr) ~= without
  end)
  note("after_plain_tab", buffer_text(bufnr))
  type_keys("<Esc>")
end

-- Trigger and type on at once: the request is cancelled, and no ghost text for the old text stays.
function scenarios.cancel_on_type()
  local bufnr, client = open_at_end_of(spec.row)
  note("before", buffer_text(bufnr))
  note("stats_before", server_stats(client))
  type_keys("<M-\\>x")
  wait_for("the typed character", 5000, function()
    return buffer_text(bufnr) ~= obs.before
  end)
  note("after_typing", buffer_text(bufnr))
  note("ghost_right_after_typing", dg.ghost_text(bufnr))
  -- Wait until the server has answered the cancelled request (-32800 or a late result), then a bit more.
  wait_for("the first request to end", 120000, function()
    return next(client.requests) == nil
  end)
  sleep(300)
  note("stats", server_stats(client))
  note("canvases", canvases)
  note("ghost_after_request_ended", dg.ghost_text(bufnr))
  note("visible_after_request_ended", dg.visible(bufnr))
  -- <C-]> dismisses a visible suggestion: trigger again, wait, dismiss.
  type_keys("<M-\\>")
  wait_for_suggestion(bufnr, "a second suggestion")
  note("ghost_before_dismiss", dg.ghost_text(bufnr))
  type_keys("<C-]>")
  wait_for("the dismissal", 5000, function()
    return not dg.visible(bufnr)
  end)
  note("ghost_after_dismiss", dg.ghost_text(bufnr))
  note("buffer_after_dismiss", buffer_text(bufnr))
  type_keys("<Esc>")
end

-- An answer for an older version is dropped, even when nothing else cancelled the request.
-- tests/test_nvim.py holds back Neovim's didChange (flags.debounce_text_changes) so the server
-- answers before it hears of the edit: only the plug-in's version check stands in the way.
function scenarios.stale_answer()
  local bufnr, client = open_at_end_of(spec.row)
  type_keys("<Esc>")
  wait_for("normal mode", 2000, function()
    return vim.fn.mode() == "n"
  end)
  -- Warm up: one answered request, so the next one is not waiting for the model to load.
  inline.request(bufnr, false)
  wait_for("the warm-up answer", 120000, function()
    return next(client.requests) == nil
  end)
  inline.dismiss(bufnr)
  note("stats_before", server_stats(client))
  -- Send the request from normal mode, then change the text through the API: no TextChangedI,
  -- so the plug-in's cancel-on-type does not run; only the version check can drop the answer.
  note("sent", inline.request(bufnr, false))
  local version_sent = util.version(bufnr)
  vim.api.nvim_buf_set_lines(bufnr, -1, -1, false, { "# edited while the model ran" })
  note("version_sent", version_sent)
  note("version_now", util.version(bufnr))
  wait_for("the request to end", 120000, function()
    return next(client.requests) == nil
  end)
  note("answered_at", vim.uv.now())
  note("ghost", dg.ghost_text(bufnr))
  note("visible", dg.visible(bufnr))
  note("stats", server_stats(client))
end

-- Auto-trigger while typing: the ghost on screen always belongs to the current text.
function scenarios.auto_trigger()
  local bufnr = open_at_end_of(spec.row)
  type_keys("a")
  sleep(30)
  type_keys(" ")
  local shown = wait_for_suggestion(bufnr, "an automatic suggestion")
  note("shown_version", shown.version)
  note("version_now", util.version(bufnr))
  note("ghost", dg.ghost_text(bufnr))
  note("buffer", buffer_text(bufnr))
  note("canvases", canvases)
  type_keys("<Esc>")
end

-- :DgEditRewrite on a visual selection: the server's rewrite replaces exactly the selection.
function scenarios.rewrite()
  vim.cmd.edit(vim.fn.fnameescape(spec.file))
  local bufnr = vim.api.nvim_get_current_buf()
  local client = wait_for("the dg-edit client to attach", 30000, function()
    local c = util.client(bufnr)
    return c and c.initialized and c
  end)
  tee_canvas(client)
  note("before", buffer_text(bufnr))
  note("stats_before", server_stats(client))
  -- Select line `row` linewise, then run the command the way a user does (:'<,'>DgEditRewrite).
  vim.api.nvim_win_set_cursor(0, { spec.row, 0 })
  type_keys("V<Esc>")
  wait_for("the visual selection", 2000, function()
    return vim.api.nvim_buf_get_mark(bufnr, ">")[1] == spec.row and vim.fn.mode() == "n"
  end)
  vim.cmd("'<,'>DgEditRewrite simplify")
  note("pending_after_command", next(client.requests) ~= nil)
  wait_for("the rewrite to finish", 120000, function()
    return next(client.requests) == nil
  end)
  sleep(100)
  local final
  for _, c in ipairs(canvases) do
    if c.done then
      final = c
    end
  end
  note("server_final_text", final and final.text)
  note("after", buffer_text(bufnr))
  note("stats", server_stats(client))
end

--- Extmarks of the next-edit namespace: the highlighted old range and the new text drawn beside it.
local function next_edit_marks(bufnr)
  local out = {}
  for _, mark in ipairs(vim.api.nvim_buf_get_extmarks(bufnr, next_edit.ns, 0, -1, { details = true })) do
    local d = mark[4]
    local lines = {}
    if d.virt_text then
      lines[1] = table.concat(vim.tbl_map(function(chunk)
        return chunk[1]
      end, d.virt_text))
    end
    for _, vline in ipairs(d.virt_lines or {}) do
      lines[#lines + 1] = table.concat(vim.tbl_map(function(chunk)
        return chunk[1]
      end, vline))
    end
    out[#out + 1] = {
      row = mark[2], col = mark[3], end_row = d.end_row, end_col = d.end_col, hl = d.hl_group,
      text = d.virt_text and table.concat(lines, "\n") or nil,
      text_hl = d.virt_text and d.virt_text[1][2] or nil,
    }
  end
  return out
end

--- Wait for the next-edit suggestion the plug-in asked for; fail with the reason when there is none.
local function wait_for_next_edit(bufnr, what)
  wait_for(what .. " (request sent)", 10000, function()
    return next_edit.pending(bufnr) or next_edit.current(bufnr)
  end)
  wait_for(what, 180000, function()
    return next_edit.current(bufnr) or not next_edit.pending(bufnr)
  end)
  return next_edit.current(bufnr) or error(what .. ": the server answered with no edit", 2)
end

--- The server's answer to copilotInlineEdit at (row, col) of the current version, asked directly.
local function server_next_edit(client, bufnr, row, col)
  local params = {
    textDocument = { uri = vim.uri_from_bufnr(bufnr), version = util.version(bufnr) },
    position = { line = row, character = util.byte_to_lsp(bufnr, row, col, client.offset_encoding) },
  }
  local answer = client:request_sync("textDocument/copilotInlineEdit", params, 180000, bufnr)
  return answer and answer.result
end

-- Rename in normal mode; once quiet, the predicted next edit is drawn; <Tab> jumps, <Tab> accepts, u undoes it.
function scenarios.next_edit()
  vim.cmd.edit(vim.fn.fnameescape(spec.file))
  local bufnr = vim.api.nvim_get_current_buf()
  local client = wait_for("the dg-edit client to attach", 30000, function()
    local c = util.client(bufnr)
    return c and c.initialized and c
  end)
  note("offset_encoding", client.offset_encoding)
  vim.api.nvim_win_set_cursor(0, { spec.row, 4 })
  note("stats_before", server_stats(client))
  type_keys("ciwtotal<Esc>")
  wait_for("normal mode after the rename", 5000, function()
    return vim.fn.mode() == "n" and buffer_text(bufnr) ~= ""
  end)
  local shown = wait_for_next_edit(bufnr, "a next-edit suggestion after the rename")
  note("before", buffer_text(bufnr))
  note("buffer_while_shown", buffer_text(bufnr))
  note("shown_edit", shown.edit)
  note("shown_version", shown.version)
  note("version_now", util.version(bufnr))
  note("marks", next_edit_marks(bufnr))
  local cursor = vim.api.nvim_win_get_cursor(0)
  note("server_edit", (server_next_edit(client, bufnr, cursor[1] - 1, cursor[2]) or {}).edits)
  -- Move off the suggestion's lines, then <Tab> jumps to its start.
  local last = vim.api.nvim_buf_line_count(bufnr)
  vim.api.nvim_win_set_cursor(0, { shown.finish[1] + 1 < last and last or 1, 0 })
  note("cursor_before_jump", vim.api.nvim_win_get_cursor(0))
  type_keys("<Tab>")
  wait_for("the jump", 5000, function()
    return vim.api.nvim_win_get_cursor(0)[1] == shown.start[1] + 1
  end)
  note("cursor_after_jump", vim.api.nvim_win_get_cursor(0))
  note("visible_after_jump", next_edit.visible(bufnr))
  -- On its lines, <Tab> accepts: the buffer changes by exactly the edit, in one undo step.
  local before_accept = buffer_text(bufnr)
  type_keys("<Tab>")
  wait_for("the accepted edit", 5000, function()
    return buffer_text(bufnr) ~= before_accept
  end)
  note("after_accept", buffer_text(bufnr))
  note("marks_after_accept", next_edit_marks(bufnr))
  sleep(200)
  note("stats_after_accept", server_stats(client))
  next_edit.dismiss(bufnr)
  type_keys("u")
  wait_for("the undo", 5000, function()
    return buffer_text(bufnr) ~= obs.after_accept
  end)
  note("after_undo", buffer_text(bufnr))
end

-- <M-n> asks at once; <Esc> dismisses without touching the buffer; an answer for a changed buffer is dropped.
function scenarios.next_edit_dismiss()
  vim.cmd.edit(vim.fn.fnameescape(spec.file))
  local bufnr = vim.api.nvim_get_current_buf()
  local client = wait_for("the dg-edit client to attach", 30000, function()
    local c = util.client(bufnr)
    return c and c.initialized and c
  end)
  vim.api.nvim_win_set_cursor(0, { spec.row, 4 })
  type_keys("ciwtotal<Esc>")
  wait_for_next_edit(bufnr, "the automatic suggestion")
  next_edit.dismiss(bufnr)
  note("before", buffer_text(bufnr))
  type_keys("<M-n>")
  wait_for_next_edit(bufnr, "a suggestion on <M-n>")
  note("visible_before_dismiss", next_edit.visible(bufnr))
  type_keys("<Esc>")
  wait_for("the dismissal", 5000, function()
    return not next_edit.visible(bufnr)
  end)
  note("marks_after_dismiss", next_edit_marks(bufnr))
  note("buffer_after_dismiss", buffer_text(bufnr))
  -- Ask, then change the text through the API before the answer comes: it must not be drawn
  -- (automatic requests off, so the change does not start a new one).
  dg.config.next_edit = false
  note("sent", next_edit.request(bufnr))
  vim.api.nvim_buf_set_lines(bufnr, -1, -1, false, { "# edited while the model ran" })
  wait_for("the request to end", 180000, function()
    return next(client.requests) == nil
  end)
  sleep(100)
  note("visible_after_stale", next_edit.visible(bufnr))
  note("marks_after_stale", next_edit_marks(bufnr))
end

harness.run(function()
  for _, scenario in ipairs(session.scenarios) do
    spec, obs, canvases = scenario, {}, {}
    results[scenario.name] = obs
    -- Per-scenario plug-in options: the plug-in reads its config table at event time.
    dg.config.auto_trigger = scenario.auto_trigger or false
    dg.config.debounce_ms = scenario.debounce_ms
    dg.config.next_edit = scenario.next_edit or false
    dg.config.next_edit_debounce_ms = scenario.next_edit_debounce_ms or 500
    local ok, err = xpcall(scenarios[scenario.scenario or scenario.name], debug.traceback)
    if not ok then
      obs.error = tostring(err)
    end
    -- Back to normal mode with nothing pending before the next scenario.
    vim.api.nvim_feedkeys(vim.keycode("<Esc>"), "nt", false)
    sleep(50)
    dg.dismiss()
    dg.next_edit_dismiss()
  end
  finish()
end, finish)

--- dg-edit for Neovim: ghost-text infilling and selection rewrite from `dg-edit lsp`.
---
--- require("dg_edit").setup({ ... }) registers the server with `vim.lsp.config` / `vim.lsp.enable`
--- and installs the keys. On Neovim 0.12+ the native `vim.lsp.inline_completion` draws the
--- suggestions; on 0.11 this plug-in requests `textDocument/inlineCompletion` itself and draws
--- them with extmarks (lua/dg_edit/inline.lua). Either way, `dgEdit/canvas` drafts are drawn while
--- the model refines, and `:DgEditRewrite` rewrites the visual selection. After an edit, once the
--- buffer is quiet, the next edit the server predicts is shown near the cursor (lua/dg_edit/next_edit.lua).

local ghost = require("dg_edit.ghost")
local inline = require("dg_edit.inline")
local next_edit = require("dg_edit.next_edit")
local util = require("dg_edit.util")

local M = {}

--- Defaults. Server-side settings (model, max_new_tokens, candidates, languages, sampling) are
--- not repeated here: they go in `settings` and the server fills in the rest from its one source
--- of defaults, `dg_edit.config.Settings`.
--- @class dg_edit.Config
M.defaults = {
  -- how to start the language server (argv); e.g. { "/path/to/venv/bin/dg-edit", "lsp", "--threads", "2" }
  cmd = { "dg-edit", "lsp" },
  -- filetypes to attach to; nil = every file buffer (the server's `languages` setting also filters)
  filetypes = nil,
  -- files that mark a project root (nil root = single-file mode, which works too)
  root_markers = { ".git", "pyproject.toml" },
  -- dg_edit.config.Settings keys sent as initializationOptions / didChangeConfiguration,
  -- e.g. { model = "/models/dg", max_new_tokens = 32, max_denoising_steps = 12 }
  settings = {},
  -- request a suggestion while typing in insert mode (false: only on `keymap_trigger`)
  auto_trigger = true,
  -- ms of quiet after a keystroke before asking; nil = the server's `debounce_ms` setting
  -- (read once from dgEdit/stats when the server attaches)
  debounce_ms = nil,
  -- insert-mode keys; "" disables one. accept falls through to the key's normal job when no
  -- suggestion is visible
  keymap_accept = "<Tab>",
  keymap_dismiss = "<C-]>",
  keymap_trigger = "<M-\\>",
  -- draw each denoising step's draft while the model refines
  show_canvas = true,
  -- "inline" pushes the rest of the line right, "overlay" draws over it
  ghost_pos = "inline",
  hl_group = "DgEditGhost", -- final suggestion (linked to Comment)
  canvas_hl_group = "DgEditCanvas", -- draft while refining (linked to NonText)
  -- use vim.lsp.inline_completion when Neovim has it (0.12+)
  native = true,
  -- next-edit suggestions: after an edit (normal mode, or on leaving insert mode), once the buffer
  -- has been quiet for next_edit_debounce_ms, show the edit the server predicts next
  next_edit = true,
  next_edit_debounce_ms = 500,
  -- normal-mode keys; "" disables one. keymap_next_edit jumps to the suggestion, and accepts it when
  -- the cursor is already on its lines; it and dismiss fall through to the key's normal job when no
  -- suggestion is shown
  keymap_next_edit = "<Tab>",
  keymap_next_edit_accept = "<M-a>",
  keymap_next_edit_dismiss = "<Esc>",
  keymap_next_edit_trigger = "<M-n>",
  next_edit_old_hl_group = "DgEditNextEditOld", -- the text the edit replaces (linked to DiffDelete)
  next_edit_new_hl_group = "DgEditNextEditNew", -- the text it writes (linked to DiffAdd)
  -- extra fields for vim.lsp.config("dg_edit", ...), e.g. { flags = { debounce_text_changes = 300 } }
  lsp = {},
}

--- @type dg_edit.Config
M.config = vim.deepcopy(M.defaults)

local function native_available()
  return M.config.native and vim.lsp.inline_completion ~= nil
end

--- Ask for a suggestion now (explicit trigger: the server may offer several candidates).
function M.trigger(bufnr)
  bufnr = bufnr or vim.api.nvim_get_current_buf()
  if native_available() then
    -- 0.12+: the native module requests on its own; nothing to force beyond re-enabling.
    vim.lsp.inline_completion.enable(true, { bufnr = bufnr })
    return true
  end
  return inline.request(bufnr, true)
end

--- Accept the visible suggestion; false when there is none.
function M.accept(bufnr)
  bufnr = bufnr or vim.api.nvim_get_current_buf()
  if native_available() then
    return vim.lsp.inline_completion.get({ bufnr = bufnr }) and true or false
  end
  return inline.accept(bufnr)
end

function M.dismiss(bufnr)
  bufnr = bufnr or vim.api.nvim_get_current_buf()
  inline.dismiss(bufnr)
end

--- Whether a suggestion is visible in `bufnr` (0.11 path).
function M.visible(bufnr)
  return inline.visible(bufnr or vim.api.nvim_get_current_buf())
end

--- The ghost text on screen in `bufnr` ("" when none).
function M.ghost_text(bufnr)
  return ghost.text(bufnr or vim.api.nvim_get_current_buf())
end

--- Next-edit suggestions (lua/dg_edit/next_edit.lua): ask now, jump to it, accept it, dismiss it.
function M.next_edit(bufnr)
  return next_edit.request(bufnr or vim.api.nvim_get_current_buf())
end

function M.next_edit_jump(bufnr)
  return next_edit.jump(bufnr or vim.api.nvim_get_current_buf())
end

function M.next_edit_accept(bufnr)
  return next_edit.accept(bufnr or vim.api.nvim_get_current_buf())
end

function M.next_edit_dismiss(bufnr)
  next_edit.dismiss(bufnr or vim.api.nvim_get_current_buf())
end

function M.rewrite(opts)
  return require("dg_edit.rewrite").rewrite(opts)
end

--- `dgEdit/canvas`: redraw the ghost from the draft of the request in flight.
local function on_canvas(_, params, ctx)
  local client = vim.lsp.get_client_by_id(ctx.client_id)
  if not client or type(params) ~= "table" then
    return
  end
  local bufnr = util.attached_buf(client, params.uri)
  if bufnr then
    inline.on_canvas(bufnr, params)
  end
end

local function set_keymaps(bufnr)
  local cfg = M.config
  if cfg.keymap_accept ~= "" then
    local fallback = vim.keycode(cfg.keymap_accept)
    vim.keymap.set("i", cfg.keymap_accept, function()
      if native_available() then
        -- 0.12+: the native module accepts (or reports nothing to accept) itself.
        return vim.lsp.inline_completion.get({ bufnr = bufnr }) and "" or fallback
      end
      if M.visible(bufnr) then
        -- Text cannot change inside an <expr> mapping: insert right after it.
        vim.schedule(function()
          M.accept(bufnr)
        end)
        return ""
      end
      return fallback
    end, { buffer = bufnr, expr = true, replace_keycodes = false, desc = "dg-edit: accept suggestion" })
  end
  if cfg.keymap_dismiss ~= "" then
    vim.keymap.set("i", cfg.keymap_dismiss, function()
      M.dismiss(bufnr)
    end, { buffer = bufnr, desc = "dg-edit: dismiss suggestion" })
  end
  if cfg.keymap_trigger ~= "" then
    vim.keymap.set("i", cfg.keymap_trigger, function()
      M.trigger(bufnr)
    end, { buffer = bufnr, desc = "dg-edit: suggest now" })
  end
end

--- Normal-mode keys of next-edit suggestions; the expr ones fall through when nothing is shown.
local function set_next_edit_keymaps(bufnr)
  local cfg = M.config
  local function expr(lhs, desc, action)
    if lhs == "" then
      return
    end
    local fallback = vim.keycode(lhs)
    vim.keymap.set("n", lhs, function()
      if not next_edit.visible(bufnr) then
        return fallback
      end
      vim.schedule(function() -- the buffer cannot change inside an <expr> mapping
        action(bufnr)
      end)
      return ""
    end, { buffer = bufnr, expr = true, replace_keycodes = false, desc = desc })
  end
  expr(cfg.keymap_next_edit, "dg-edit: jump to the next-edit suggestion, or accept it", function(b)
    if next_edit.at_suggestion(b) then
      next_edit.accept(b)
    else
      next_edit.jump(b)
    end
  end)
  expr(cfg.keymap_next_edit_accept, "dg-edit: accept the next-edit suggestion", next_edit.accept)
  expr(cfg.keymap_next_edit_dismiss, "dg-edit: dismiss the next-edit suggestion", next_edit.dismiss)
  if cfg.keymap_next_edit_trigger ~= "" then
    vim.keymap.set("n", cfg.keymap_next_edit_trigger, function()
      next_edit.request(bufnr)
    end, { buffer = bufnr, desc = "dg-edit: suggest the next edit now" })
  end
end

--- After an edit, once quiet: ask for the next edit. Typing or leaving the buffer clears it.
local function watch_edits(client, bufnr)
  local group = vim.api.nvim_create_augroup("dg_edit_next_edit_" .. bufnr, { clear = true })
  local tick_at_insert = nil
  vim.api.nvim_create_autocmd("TextChanged", { group = group, buffer = bufnr, callback = function()
    next_edit.schedule(bufnr)
  end })
  vim.api.nvim_create_autocmd("InsertEnter", { group = group, buffer = bufnr, callback = function()
    tick_at_insert = vim.b[bufnr].changedtick
    next_edit.dismiss(bufnr)
  end })
  vim.api.nvim_create_autocmd("InsertLeave", { group = group, buffer = bufnr, callback = function()
    if tick_at_insert ~= vim.b[bufnr].changedtick then
      next_edit.schedule(bufnr)
    end
  end })
  vim.api.nvim_create_autocmd({ "TextChangedI", "BufLeave" }, { group = group, buffer = bufnr, callback = function()
    next_edit.dismiss(bufnr)
  end })
  vim.api.nvim_create_autocmd("LspDetach", { group = group, buffer = bufnr, callback = function(args)
    if args.data and args.data.client_id == client.id then
      next_edit.dismiss(bufnr)
      vim.api.nvim_del_augroup_by_id(group)
    end
  end })
end

local function on_attach(client, bufnr)
  if client.name ~= util.CLIENT_NAME then
    return
  end
  set_keymaps(bufnr)
  set_next_edit_keymaps(bufnr)
  watch_edits(client, bufnr)
  if M.config.debounce_ms == nil then
    client:request("dgEdit/stats", vim.empty_dict(), function(err, stats)
      if not err and stats and stats.settings then
        inline.server_debounce_ms = stats.settings.debounce_ms
      end
    end, bufnr)
  end
  if native_available() then
    vim.lsp.inline_completion.enable(true, { bufnr = bufnr })
    return
  end
  local group = vim.api.nvim_create_augroup("dg_edit_buf_" .. bufnr, { clear = true })
  -- Typing on: the suggestion on screen is for text that is gone. Cancel, clear, maybe re-ask.
  vim.api.nvim_create_autocmd({ "TextChangedI", "TextChangedP" }, {
    group = group,
    buffer = bufnr,
    callback = function()
      if M.config.auto_trigger then
        inline.schedule(bufnr)
      else
        inline.dismiss(bufnr)
      end
    end,
  })
  vim.api.nvim_create_autocmd("CursorMovedI", {
    group = group,
    buffer = bufnr,
    callback = function()
      local shown = inline.current(bufnr)
      local cursor = vim.api.nvim_win_get_cursor(0)
      if shown and (shown.row ~= cursor[1] - 1 or shown.col ~= cursor[2]) then
        inline.dismiss(bufnr)
      end
    end,
  })
  vim.api.nvim_create_autocmd({ "InsertLeave", "BufLeave" }, {
    group = group,
    buffer = bufnr,
    callback = function()
      inline.dismiss(bufnr)
    end,
  })
  vim.api.nvim_create_autocmd("LspDetach", {
    group = group,
    buffer = bufnr,
    callback = function(args)
      if args.data and args.data.client_id == client.id then
        inline.dismiss(bufnr)
        vim.api.nvim_del_augroup_by_id(group)
      end
    end,
  })
end

--- @param opts dg_edit.Config?
function M.setup(opts)
  M.config = vim.tbl_deep_extend("force", vim.deepcopy(M.defaults), opts or {})
  -- tbl_deep_extend merges lists key by key: take the user's cmd/markers/settings as given.
  for _, key in ipairs({ "cmd", "filetypes", "root_markers", "settings", "lsp" }) do
    if opts and opts[key] ~= nil then
      M.config[key] = opts[key]
    end
  end
  inline.configure(M.config)
  next_edit.configure(M.config)
  local exe = type(M.config.cmd) == "table" and M.config.cmd[1]
  if exe and vim.fn.executable(exe) == 0 then
    util.notify(("server not found: %q is not executable; set cmd = { \"/full/path/to/dg-edit\", \"lsp\" }"):format(exe),
      vim.log.levels.ERROR)
  end
  vim.api.nvim_set_hl(0, "DgEditGhost", { link = "Comment", default = true })
  vim.api.nvim_set_hl(0, "DgEditCanvas", { link = "NonText", default = true })
  vim.api.nvim_set_hl(0, "DgEditNextEditOld", { link = "DiffDelete", default = true })
  vim.api.nvim_set_hl(0, "DgEditNextEditNew", { link = "DiffAdd", default = true })

  vim.lsp.config(util.CLIENT_NAME, vim.tbl_extend("force", M.config.lsp, {
    cmd = M.config.cmd,
    filetypes = M.config.filetypes,
    root_markers = M.config.root_markers,
    -- an empty Lua table would travel as a JSON array: send nothing instead
    init_options = next(M.config.settings) and M.config.settings or nil,
    settings = M.config.settings,
    handlers = { ["dgEdit/canvas"] = on_canvas },
    on_attach = on_attach,
  }))
  vim.lsp.enable(util.CLIENT_NAME)
end

return M

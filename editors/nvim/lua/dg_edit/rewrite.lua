--- :DgEditRewrite: rewrite the visual selection with the server's `dg-edit.rewrite` command.
---
--- The server runs `engine.rewrite` and applies the result itself with `workspace/applyEdit`,
--- naming the document version it read; Neovim refuses that edit if the buffer changed
--- meanwhile, so a rewrite never lands on text that moved on. A failed model call changes nothing.

local util = require("dg_edit.util")

local M = {}

--- The LSP range of the last visual selection in `bufnr` (charwise, linewise or blockwise-as-lines).
--- @return lsp.Range?
function M.selection_range(bufnr, encoding)
  local start = vim.api.nvim_buf_get_mark(bufnr, "<") -- {row 1-based, col bytes}
  local finish = vim.api.nvim_buf_get_mark(bufnr, ">")
  if start[1] == 0 or finish[1] == 0 then
    return nil
  end
  local srow, erow = start[1] - 1, finish[1] - 1
  if vim.fn.visualmode() ~= "v" then
    -- Linewise (and blockwise, taken as whole lines): the lines' text, not their final line break,
    -- so a rewrite that does not end in a newline cannot glue the next line onto it.
    local line = vim.api.nvim_buf_get_lines(bufnr, erow, erow + 1, false)[1] or ""
    return {
      start = { line = srow, character = 0 },
      ["end"] = { line = erow, character = util.byte_to_lsp(bufnr, erow, #line, encoding) },
    }
  end
  -- Charwise: '> is the last character (inclusive); LSP ranges end after it.
  local line = vim.api.nvim_buf_get_lines(bufnr, erow, erow + 1, false)[1] or ""
  local ecol = math.min(finish[2], #line)
  if ecol < #line then
    ecol = ecol + #vim.fn.strcharpart(line:sub(ecol + 1), 0, 1)
  end
  return {
    start = { line = srow, character = util.byte_to_lsp(bufnr, srow, start[2], encoding) },
    ["end"] = { line = erow, character = util.byte_to_lsp(bufnr, erow, ecol, encoding) },
  }
end

--- Rewrite the last visual selection. `opts.instruction` (optional) steers the rewrite;
--- `opts.on_done(err, result)` is called with the server's answer {applied, text, version}.
--- @param opts { bufnr?: integer, instruction?: string, on_done?: fun(err: table?, result: table?) }?
function M.rewrite(opts)
  opts = opts or {}
  local bufnr = opts.bufnr or vim.api.nvim_get_current_buf()
  local client = util.client(bufnr)
  if not client then
    util.notify("no dg-edit language server attached to this buffer (see :checkhealth vim.lsp)", vim.log.levels.ERROR)
    return false
  end
  local range = M.selection_range(bufnr, client.offset_encoding)
  if not range then
    util.notify("select the code to rewrite first (visual mode), then :DgEditRewrite", vim.log.levels.WARN)
    return false
  end
  local argument = { uri = vim.uri_from_bufnr(bufnr), range = range }
  if opts.instruction and opts.instruction ~= "" then
    argument.instruction = opts.instruction
  end
  util.notify("rewriting the selection…")
  client:exec_cmd({ title = "dg-edit: rewrite", command = "dg-edit.rewrite", arguments = { argument } }, { bufnr = bufnr },
    function(err, result)
      if err then
        util.notify("rewrite failed: " .. (err.message or vim.inspect(err)), vim.log.levels.ERROR)
      elseif result and not result.applied then
        util.notify("rewrite not applied: " .. (result.failureReason or "the buffer changed"), vim.log.levels.WARN)
      end
      if opts.on_done then
        opts.on_done(err, result)
      end
    end)
  return true
end

return M

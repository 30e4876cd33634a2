--- Ghost text: a suggestion drawn with extmarks, never written into the buffer until accepted.
---
--- One namespace, at most one ghost per buffer. The first line is drawn at the cursor
--- (`virt_text_pos` "inline" pushes the rest of the line right, "overlay" draws over it); further
--- lines are virtual lines below. `text()` reads back what is on screen, for tests and :checkhealth.

local M = {}

M.ns = vim.api.nvim_create_namespace("dg_edit_ghost")

--- Draw `text` at (row, col), both 0-based, col in bytes.
--- @param bufnr integer
--- @param row integer
--- @param col integer
--- @param text string
--- @param opts { hl: string, pos: "inline"|"overlay" }
function M.show(bufnr, row, col, text, opts)
  M.clear(bufnr)
  if text == "" then
    return
  end
  local lines = vim.split(text, "\n", { plain = true })
  local mark = {
    virt_text = { { lines[1], opts.hl } },
    virt_text_pos = opts.pos,
    hl_mode = "combine",
    -- The text lives only in this extmark: keep it out of undo and off other windows' folds.
    undo_restore = false,
    invalidate = true,
  }
  if #lines > 1 then
    mark.virt_lines = vim.tbl_map(function(line)
      return { { line, opts.hl } }
    end, vim.list_slice(lines, 2))
  end
  vim.api.nvim_buf_set_extmark(bufnr, M.ns, row, col, mark)
end

--- @param bufnr integer
function M.clear(bufnr)
  if vim.api.nvim_buf_is_valid(bufnr) then
    vim.api.nvim_buf_clear_namespace(bufnr, M.ns, 0, -1)
  end
end

--- The ghost text currently drawn in `bufnr` ("" when none), lines joined with "\n".
--- @param bufnr integer
--- @return string
function M.text(bufnr)
  local marks = vim.api.nvim_buf_get_extmarks(bufnr, M.ns, 0, -1, { details = true })
  local out = {}
  for _, mark in ipairs(marks) do
    local details = mark[4]
    local first = {}
    for _, chunk in ipairs(details.virt_text or {}) do
      first[#first + 1] = chunk[1]
    end
    out[#out + 1] = table.concat(first)
    for _, vline in ipairs(details.virt_lines or {}) do
      local parts = {}
      for _, chunk in ipairs(vline) do
        parts[#parts + 1] = chunk[1]
      end
      out[#out + 1] = table.concat(parts)
    end
  end
  return table.concat(out, "\n")
end

return M

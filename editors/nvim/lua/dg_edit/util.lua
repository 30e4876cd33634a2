--- Small helpers shared by the dg-edit modules: the client, document versions, position encodings.

local M = {}

M.CLIENT_NAME = "dg_edit"

--- The dg-edit client attached to `bufnr`, if any.
--- @return vim.lsp.Client?
function M.client(bufnr)
  return vim.lsp.get_clients({ bufnr = bufnr, name = M.CLIENT_NAME })[1]
end

--- The document version Neovim reports to servers for `bufnr` (its changedtick).
function M.version(bufnr)
  return vim.lsp.util.buf_versions[bufnr]
end

function M.notify(msg, level)
  vim.notify("dg-edit: " .. msg, level or vim.log.levels.INFO)
end

local function line_text(bufnr, row)
  return vim.api.nvim_buf_get_lines(bufnr, row, row + 1, false)[1] or ""
end

--- LSP character offset (in `encoding` units) on 0-based `row` -> byte column.
function M.lsp_to_byte(bufnr, row, character, encoding)
  local line = line_text(bufnr, row)
  if character <= 0 then
    return 0
  end
  local ok, col = pcall(vim.str_byteindex, line, encoding, character, false)
  return ok and col or #line
end

--- Byte column on 0-based `row` -> LSP character offset in `encoding` units.
function M.byte_to_lsp(bufnr, row, col, encoding)
  local line = line_text(bufnr, row)
  if col <= 0 then
    return 0
  end
  local ok, character = pcall(vim.str_utfindex, line, encoding, math.min(col, #line), false)
  return ok and character or col
end

--- The buffer of `client` whose URI is `uri` (nil when none is attached; never creates one).
--- @return integer?
function M.attached_buf(client, uri)
  for bufnr in pairs(client.attached_buffers) do
    if vim.uri_from_bufnr(bufnr) == uri then
      return bufnr
    end
  end
  return nil
end

--- Per-buffer request state, one table per feature (inline completion, next edit): a debounce timer
--- (and whether it is due to fire), the request in flight, the suggestion on screen.
--- @return { state: fun(bufnr: integer): table, cancel: fun(bufnr: integer), pending: fun(bufnr: integer): boolean, visible: fun(bufnr: integer): boolean, current: fun(bufnr: integer): table? }
function M.buffer_requests()
  --- @type table<integer, { timer?: uv.uv_timer_t, waiting?: boolean, request?: table, shown?: table }>
  local bufs = {}
  local R = {}

  function R.state(bufnr)
    bufs[bufnr] = bufs[bufnr] or {}
    return bufs[bufnr]
  end

  --- Stop the timer and cancel the request in flight (the server stops denoising).
  function R.cancel(bufnr)
    local s = R.state(bufnr)
    if s.timer then
      s.timer:stop()
    end
    s.waiting = false
    local request = s.request
    s.request = nil
    if request and not request.client:is_stopped() then
      request.client:cancel_request(request.id)
    end
  end

  --- Call `fire()` once `bufnr` has been quiet for `ms` (a new call restarts the wait; `cancel` stops
  --- it), on the main loop, while the buffer is still valid.
  function R.debounce(bufnr, ms, fire)
    local s = R.state(bufnr)
    s.timer = s.timer or vim.uv.new_timer()
    s.waiting = true -- until the timer's callback has sent the request (or found nothing to do)
    s.timer:start(
      ms,
      0,
      vim.schedule_wrap(function()
        if not s.waiting then
          return -- cancelled meanwhile
        end
        s.waiting = false
        if vim.api.nvim_buf_is_valid(bufnr) then
          fire()
        end
      end)
    )
  end

  --- Whether a request (or its timer) is in flight for `bufnr`.
  function R.pending(bufnr)
    local s = R.state(bufnr)
    return s.request ~= nil or s.waiting == true
  end

  --- Whether a suggestion is on screen in `bufnr`.
  function R.visible(bufnr)
    return R.state(bufnr).shown ~= nil
  end

  --- The suggestion on screen, or nil (for tests and statuslines).
  function R.current(bufnr)
    return R.state(bufnr).shown
  end

  return R
end

return M

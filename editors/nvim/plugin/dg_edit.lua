-- dg-edit user commands. Nothing starts until require("dg_edit").setup{} is called.
if vim.g.loaded_dg_edit then
  return
end
vim.g.loaded_dg_edit = true

if vim.fn.has("nvim-0.11") == 0 then
  vim.notify("dg-edit needs Neovim 0.11 or newer (vim.lsp.config)", vim.log.levels.ERROR)
  return
end

vim.api.nvim_create_user_command("DgEditRewrite", function(cmd)
  require("dg_edit").rewrite({ instruction = cmd.args })
end, { range = true, nargs = "?", desc = "dg-edit: rewrite the visual selection [instruction]" })

vim.api.nvim_create_user_command("DgEditTrigger", function()
  require("dg_edit").trigger()
end, { desc = "dg-edit: ask for a suggestion at the cursor" })

vim.api.nvim_create_user_command("DgEditDismiss", function()
  require("dg_edit").dismiss()
end, { desc = "dg-edit: clear the suggestion" })

vim.api.nvim_create_user_command("DgEditNextEdit", function()
  require("dg_edit").next_edit()
end, { desc = "dg-edit: suggest the next edit near the cursor" })

vim.api.nvim_create_user_command("DgEditNextEditJump", function()
  require("dg_edit").next_edit_jump()
end, { desc = "dg-edit: move the cursor to the next-edit suggestion" })

vim.api.nvim_create_user_command("DgEditNextEditAccept", function()
  require("dg_edit").next_edit_accept()
end, { desc = "dg-edit: apply the next-edit suggestion" })

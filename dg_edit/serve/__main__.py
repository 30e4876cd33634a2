"""`python -m dg_edit.serve ARGS` = `dg-edit serve ARGS`."""

import sys

from dg_edit.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))

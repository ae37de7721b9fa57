"""`python -m sslocal COMMAND ...`: the `sslocal` command."""

from sslocal import cli

cli.run()

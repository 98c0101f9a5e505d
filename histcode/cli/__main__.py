"""`python -m histcode.cli` is the `histcode` command."""

from histcode.cli import main

main()

"""`python -m histcode` is the `histcode` command."""

from histcode.cli import main

main()

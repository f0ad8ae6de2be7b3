"""`python -m twotower_cli` runs the command-line interface."""

from twotower_cli.cli import main

main()

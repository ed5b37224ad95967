"""`python -m fdngx` runs the CLI (handy where the console script is not on PATH)."""

from fdngx.cli import main

main()

"""Help text that click prints as written: examples, one comment line and one command each.

click re-wraps every paragraph of a help text to the terminal (at most 78 columns), which would break a
command line in the middle and run its comment into it; a paragraph after a line holding only "\\b" is printed
as it stands. A command too long for one line is given as several, joined with a shell's " \\".
"""

from __future__ import annotations

NO_WRAP = "\b"


def examples(*items: tuple[str, str]) -> str:
    """An epilog's "Examples:" part: for each (what it does, the command), a "# what" line above the command."""
    blocks = []
    for what, command in items:
        lines = " \\\n      ".join(part.strip() for part in command.split("\n"))
        blocks.append(f"{NO_WRAP}\n  # {what}\n  {lines}")
    return "Examples:\n\n" + "\n\n".join(blocks) + "\n\n"

"""Help text as click prints it, kept readable at 80 columns.

- Examples: click re-wraps every paragraph of a help text to the terminal (at most 78 columns), which would
  break a command line in the middle and run its comment into it; a paragraph after a line holding only
  "\\b" is printed as it stands. A command too long for one line is given as several, joined with a shell's
  " \\".
- Hyphens: click's wrapping breaks a line after any hyphen inside a word (`--push-` / `to/--push-to-file`,
  `.fdngx-` / `admin-token`): copied, a wrong flag or file name. HelpContext's formatter wraps only at spaces.
"""

from __future__ import annotations

from collections.abc import Sequence

from typer.core import TyperGroup

NO_WRAP = "\b"
_HYPHEN, _NO_BREAK = "-", "\u2011"  # U+2011 NON-BREAKING HYPHEN while wrapping, a plain hyphen in the output


def examples(*items: tuple[str, str]) -> str:
    """An epilog's "Examples:" part: for each (what it does, the command), a "# what" line above the command."""
    blocks = []
    for what, command in items:
        lines = " \\\n      ".join(part.strip() for part in command.split("\n"))
        blocks.append(f"{NO_WRAP}\n  # {what}\n  {lines}")
    return "Examples:\n\n" + "\n\n".join(blocks) + "\n\n"


class HelpFormatter(TyperGroup.context_class.formatter_class):  # type: ignore[misc,name-defined]
    """click's formatter (typer's own click), wrapping help text at spaces only."""

    def write_text(self, text: str) -> None:
        super().write_text(text.replace(_HYPHEN, _NO_BREAK))

    def write_dl(self, rows: Sequence[tuple[str, str]], col_max: int = 30, col_spacing: int = 2) -> None:
        super().write_dl([(term, text.replace(_HYPHEN, _NO_BREAK)) for term, text in rows], col_max, col_spacing)

    def getvalue(self) -> str:
        return str(super().getvalue()).replace(_NO_BREAK, _HYPHEN)


class HelpContext(TyperGroup.context_class):  # type: ignore[misc,name-defined]
    """The context of fdngx and each of its commands: its help through HelpFormatter."""

    formatter_class = HelpFormatter

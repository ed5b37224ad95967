"""The generation stamp of a config fdngx renders, and what it says of the file it is in.

A rendered text carries `# fdngx-generation: G` (and site/standalone configs serve G back, so a reload can be
confirmed). G is a hash of the text with a placeholder where G stands, so the text checks itself: hash the
file with G put back to the placeholder, and a file as fdngx wrote it gives G again, one edited by hand since
(a server line added, a weight changed) gives something else. Nothing is kept beside the file for it.
"""

from __future__ import annotations

import hashlib
import re

GENERATION_TOKEN = "@@FDNGX_GENERATION@@"
_GENERATION = re.compile(rb"^# fdngx-generation: ([0-9a-f]{12})$", re.M)


def generation_of(text: str) -> str:
    """The stamp of `text`, which holds GENERATION_TOKEN where the stamp goes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def stamp_generation(text: str) -> str:
    """Replace the generation placeholder by a hash of the text around it (so it is stable)."""
    return text.replace(GENERATION_TOKEN, generation_of(text))


def edited_by_hand(data: bytes | None) -> bool:
    """Whether `data`, a file with fdngx's stamp, was changed since fdngx rendered it. False when it has no stamp
    (no file, not fdngx's, or an fdngx from before the stamp: nothing to check it by)."""
    m = _GENERATION.search(data[:4096]) if data else None
    if m is None:
        return False
    stamp = m.group(1)
    try:
        text = data.decode("utf-8")  # type: ignore[union-attr]
    except UnicodeDecodeError:
        return True  # fdngx writes UTF-8 only
    return generation_of(text.replace(stamp.decode("ascii"), GENERATION_TOKEN)) != stamp.decode("ascii")

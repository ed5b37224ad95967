"""A fast path for the few metrics lines the policy reads, with prometheus_client's parser as the judge.

At fleet scale the sidecar parses 1,000 pages per cycle; prometheus_client's pure-Python text parser costs
~0.15 ms on the ~15 lines kept from a page (fdngx.weights.scrape.relevant_lines), a fifth of a core at a
2 s interval. Here every kept line must match a strict grammar that prometheus_client reads the same way:

    # HELP <name>[ <text>]
    # TYPE <name> gauge|histogram|summary|untyped
    # TYPE <name>_total counter                          (other counters: left to the parser)
    <name>[{<label>="<value>",...}] <number>[ <integer timestamp>]

with single spaces, label values without quotes or backslashes, no reserved (`__`) or repeated label
names, and plain numbers (digits, a decimal point, an exponent, NaN, +-Inf). Then the values are exactly
what the parser gives: `float(int(s))` for an integer, `float(s)` otherwise. If ANY kept line falls outside
the grammar the whole page goes to prometheus_client instead (`None` here), so a page the parser would
refuse, or read differently, is still refused or read the same way.

Both paths gather their samples the same way (`Gathered`; scrape.parse_metrics gathers the parser's samples
with it too): one value per label set, except where an engine says some of its samples are copies of one
count (fdngx.engines.base.MetricNames.one_per, e.g. SGLang's TP ranks each exporting the same batch): of the
samples of one name whose labels differ only in those labels, one stands for all. A label set repeated
exactly for a name whose values add up is a bad page (Prometheus refuses it too): ValueError, not twice the
count. Both read a page up to an OpenMetrics `# EOF` line (`before_eof`), never past it.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import TypeVar

_LABEL = r'(?!__)[a-zA-Z_][a-zA-Z0-9_]*="[^"\\\n]*"'
_NUMBER = r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[-+]?Inf|NaN"
_SAMPLE = re.compile(
    rf"(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{{(?P<labels>{_LABEL}(?:,{_LABEL})*)?\}})? "
    rf"(?P<value>{_NUMBER})(?: -?[0-9]{{1,19}})?"
)
_COMMENT = re.compile(r"# (?:HELP [a-zA-Z_:][a-zA-Z0-9_:]*(?: [^\n]*)?|TYPE [a-zA-Z_:][a-zA-Z0-9_:]* "
                      r"(?:gauge|histogram|summary|untyped)|TYPE [a-zA-Z_:][a-zA-Z0-9_:]*_total counter)")
_INTEGER = re.compile(r"[-+]?[0-9]+")
_LABEL_NAME = re.compile(r'(?:^|,)([a-zA-Z_][a-zA-Z0-9_]*)="')
_LABEL_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="([^"]*)"')  # exact on _LABEL's values (no quote, no escape)
_MAX_VALUE = 40  # longer numbers go to the parser (int() refuses over 4,300 digits, float() does not)


@functools.lru_cache(maxsize=16)
def _lines_of(names: frozenset[str]) -> re.Pattern[str]:
    """fdngx.weights.scrape._line_filter's lines, anchored on a literal newline instead of `^` (re.M): the
    engine then jumps from newline to newline instead of trying each of a page's ~20,000 positions (2.5x
    faster). Used on "\n" + page, so the first line has its newline too.
    An OpenMetrics `# EOF` line matches too (the caller stops there: before_eof in the same pass)."""
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return re.compile(rf"\n(# EOF|(?:#[ \t]+(?:TYPE|HELP)[ \t]+)?(?:{alternatives})(?:[{{ \t].*)?)(?=\n|\Z)")


# Sample name -> the labels in which copies of one count differ (MetricNames.one_per); see Gathered.
Copies = Mapping[str, frozenset[str]]
NO_COPIES: Copies = MappingProxyType({})
T = TypeVar("T")


def _stands_for(new: float, old: float) -> bool:
    """Whether copy `new` stands for a count instead of copy `old`: the larger does, and so does any value no
    count can take (negative, NaN, infinite), so that such a page is refused as when every copy added up."""
    return not 0.0 <= new < math.inf or (0.0 <= old < math.inf and new > old)


_EOF = "# EOF"


def before_eof(text: str) -> str:
    """The page up to its first `# EOF` line (the OpenMetrics end): what follows is not the page."""
    at = text.find("# EOF")
    while at >= 0:
        end = at + 5
        if (at == 0 or text[at - 1] == "\n") and (end == len(text) or text[end] == "\n"):
            return text[:at]
        at = text.find("# EOF", end)
    return text


def duplicate(name: str) -> ValueError:
    return ValueError(f"duplicate series {name}: one label set twice (the page is refused, not added up)")


class Gathered:
    """What both paths read (`values`): sample name -> values, one per label set, in the page's order. Of the
    samples of a name in `copies` whose labels differ only in copies[name], one value stands for all: at the
    first one's place, the largest one's value (a choice free of the order, so the fast path and the parser
    agree on any page)."""

    def __init__(self, copies: Copies) -> None:
        self.values: dict[str, list[float]] = {}
        self._copies = copies
        self._at: dict[tuple[str, frozenset[tuple[str, str]]], int] = {}
        self._seen: set[tuple[str, frozenset[tuple[str, str]]]] = set()  # label sets of names that add up

    def add(self, name: str, value: float, pairs: Callable[[T], Iterable[tuple[str, str]]], labels: T) -> None:
        """One sample; its labels are `pairs(labels)`, only read where copies[name] says they matter."""
        kept = self.values.setdefault(name, [])
        ignored = self._copies.get(name)
        if not ignored:
            key = (name, frozenset(pairs(labels)))
            if key in self._seen:
                raise duplicate(name)
            self._seen.add(key)
            kept.append(value)
            return
        key = (name, frozenset(pair for pair in pairs(labels) if pair[0] not in ignored))
        at = self._at.get(key)
        if at is None:
            self._at[key] = len(kept)
            kept.append(value)
        elif _stands_for(value, kept[at]):
            kept[at] = value


def fast_values(text: str, names: frozenset[str], copies: Copies = NO_COPIES) -> dict[str, list[float]] | None:
    """Sample name -> values of the lines fdngx.weights.scrape.relevant_lines keeps, or None when one of them
    is outside the strict grammar. Raises ValueError for a label set repeated (Gathered), and may raise
    OverflowError where the parser's result would too (an integer beyond a float)."""
    values = Gathered(copies)
    seen: set[tuple[str, str | frozenset[tuple[str, str]]]] = set()  # Gathered._seen's, keyed as cheaply
    repeated: str | None = None  # told once every line is known to be in the grammar
    for m in _lines_of(names).finditer("\n" + text):
        line = m.group(1)
        if line == _EOF:
            break  # the OpenMetrics end (before_eof), found in the same pass as the lines
        if line.startswith("#"):
            if _COMMENT.fullmatch(line) is None:
                return None
            continue
        s = _SAMPLE.fullmatch(line)
        if s is None:
            return None
        labels = s.group("labels") or ""
        if "," in labels:
            label_names = _LABEL_NAME.findall(labels)
            if len(label_names) != len(set(label_names)):
                return None  # a repeated label name: the parser refuses the page
        raw = s.group("value")
        if len(raw) > _MAX_VALUE:
            return None
        value = float(int(raw)) if _INTEGER.fullmatch(raw) else float(raw)
        name = s.group("name")
        if name in copies:
            values.add(name, value, _LABEL_PAIR.findall, labels)
        else:  # Gathered.add's first branch, inline: most pages have no copies
            # One label is its own set's key (no escapes here); more are a set, as the parser's dict is.
            key = (name, labels if "," not in labels else frozenset(_LABEL_PAIR.findall(labels)))
            if key in seen:
                repeated = repeated or name
            seen.add(key)
            values.values.setdefault(name, []).append(value)
    if repeated is not None:
        raise duplicate(repeated)
    return values.values

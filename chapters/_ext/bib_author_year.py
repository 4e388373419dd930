"""Sphinx extension: an author-year bibliography whose labels match the in-text citations.

``bibtex_reference_style: author_year`` (``_config.yml``) makes sphinxcontrib-bibtex cite as
"[Jiang et al., 2024]", but the pybtex formatting styles label the bibliography entries alphabetically
("[JSR+24]"). This registers the pybtex formatting style ``author_year`` (used by ``chapters/bibliography.md``
as ``:style: author_year``): pybtex's ``unsrt`` entry formatting, with

* labels built like sphinxcontrib-bibtex's in-text author-year citations: the last names (with any "von"
  part) of one author, "A and B" for two, "A et al." for three or more, then ", year"; two entries with the
  same label get "a", "b", ... after the year, in sorting order;
* entries sorted by that label's names, then year, then the full author list and the title, with LaTeX
  accents and braces stripped for the comparison (``{DeepSeek-AI}`` sorts under D, ``L{\\'e}onard`` as
  Leonard).

Registered in ``_config.yml`` under ``sphinx: local_extensions``.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

from pybtex.plugin import register_plugin
from pybtex.richtext import Text
from pybtex.style.formatting.unsrt import Style as UnsrtStyle
from pybtex.style.labels import BaseLabelStyle
from pybtex.style.sorting import BaseSortingStyle

STYLE_NAME = "author_year"


def _plain(rich) -> str:
    """A pybtex rich-text name part (parsed from LaTeX) as plain text: accents decoded, braces gone."""
    return rich.render_as("text")


def _last(person) -> str:
    """What the in-text citation shows for a person: the "von" and last parts, e.g. "de Las Casas"."""
    return " ".join(_plain(part) for part in (*person.rich_prelast_names, *person.rich_last_names))


def _persons(entry):
    return entry.persons.get("author") or entry.persons.get("editor") or []


def _names(entry) -> str:
    """The names part of the label, as sphinxcontrib-bibtex's ``author_year`` cites the entry."""
    persons = _persons(entry)
    if not persons:
        return _plain_field(entry, "title")
    if len(persons) == 1:
        return _last(persons[0])
    if len(persons) == 2 and str(persons[1]) != "others":
        return f"{_last(persons[0])} and {_last(persons[1])}"
    return f"{_last(persons[0])} et al."


def _plain_field(entry, name: str) -> str:
    return _plain(Text.from_latex(entry.fields[name])) if name in entry.fields else ""


def _fold(s: str) -> str:
    """Sorting form: accents and everything but letters, digits and spaces dropped, lower case."""
    s = "".join(c for c in unicodedata.normalize("NFD", s) if not unicodedata.combining(c))
    return re.sub(r"[^0-9a-z ]+", "", s.lower())


class AuthorYearLabelStyle(BaseLabelStyle):
    """Labels "Last, 2020", "Last and Other, 2020", "Last et al., 2020"; "2020a", "2020b" for clashes."""

    def format_label(self, entry) -> str:
        return f"{_names(entry)}, {entry.fields.get('year', 'n.d.')}"

    def format_labels(self, sorted_entries):
        labels = [self.format_label(entry) for entry in sorted_entries]
        count, seen = Counter(labels), Counter()
        for label in labels:
            if count[label] == 1:
                yield label
            else:
                yield label + "abcdefghijklmnopqrstuvwxyz"[seen[label]]
                seen[label] += 1


class AuthorYearSortingStyle(BaseSortingStyle):
    """Sort by the label's names, then year, then the full author list, then title."""

    def sorting_key(self, entry):
        everyone = "  ".join(_fold(_last(p)) for p in _persons(entry))
        return (_fold(_names(entry)), entry.fields.get("year", ""), everyone, _fold(_plain_field(entry, "title")))


class AuthorYearStyle(UnsrtStyle):
    """pybtex's ``unsrt`` entry formatting with author-year labels and sorting."""

    default_label_style = AuthorYearLabelStyle
    default_sorting_style = AuthorYearSortingStyle


def setup(app):
    register_plugin("pybtex.style.formatting", STYLE_NAME, AuthorYearStyle, force=True)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}

"""How a notebook shows its results on the book's page: figure style, glued numbers, tables, progress.

The rendered book has a text column about 6.4 inches wide and is read on phones too, so figures are drawn at
that width (at most two panels a row) with fonts of at least 10 pt, and shown as SVG, which stays sharp at
any zoom. Numbers that the prose quotes are *glued* (myst-nb's ``{glue:text}`` role pastes them into the
text when the book is built), so the prose never disagrees with the run that produced the outputs. Tables
are shown as HTML tables rather than wide printed text. None of this is needed to use ``moe_ref``.

In a notebook::

    from moe_ref.book import page
    page.style()                              # once, in the set-up cell
    fig, axes = plt.subplots(1, 2, figsize=page.figsize(2))
    page.glue("drop_pct", 100 * drop_rate, "{:.1f}")   # prose: {glue:text}`drop_pct` %
    page.table(rows, ["E", "k", "loss"], formats={"loss": "{:.3f}"})
"""

from __future__ import annotations

import html
import re
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

WIDTH = 6.4
"""Width of the book's text column, in inches. Figures are drawn at this width, so 1 pt shows as 1 pt."""

FONT_SIZE = 11
"""Base font size in points; tick and legend labels are one point smaller, never under 10."""

GLUE_PREFIX = "application/papermill.record/"  # the mime prefix myst-nb reads glued values from
_NUMBER = re.compile(r"[+\-−]?[\d,]*\.?\d+(e[+-]?\d+)?[%×]?")  # what a table right-aligns


def style() -> None:
    """Set matplotlib's defaults for the book: column width, ≥10 pt fonts, SVG output in Jupyter."""
    import logging

    import matplotlib as mpl

    # importing transformers' model code imports torchao when it is installed, which logs that its GPU kernels
    # are not built for this machine (and torch's pytree a deprecation notice): harmless, kept off the page
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    mpl.rcParams.update({
        "figure.figsize": (WIDTH, 3.6),
        "figure.dpi": 100,
        "figure.constrained_layout.use": True,
        "font.size": FONT_SIZE,
        "axes.titlesize": FONT_SIZE,
        "axes.labelsize": FONT_SIZE,
        "xtick.labelsize": FONT_SIZE - 1,
        "ytick.labelsize": FONT_SIZE - 1,
        "legend.fontsize": FONT_SIZE - 1,
        "legend.title_fontsize": FONT_SIZE - 1,
        "figure.titlesize": FONT_SIZE + 1,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "savefig.bbox": "tight",
        "svg.fonttype": "none",   # text stays text in the SVG: small files, searchable, sharp
        "image.interpolation": "nearest",
    })
    try:
        from matplotlib_inline.backend_inline import set_matplotlib_formats
    except ImportError:  # not in Jupyter: nothing to configure
        return
    set_matplotlib_formats("svg")


def figsize(columns: int = 1, height: float | None = None) -> tuple[float, float]:
    """``(width, height)`` in inches for a row of ``columns`` panels (1 or 2) at the column's width."""
    if columns not in (1, 2):
        raise ValueError(f"columns must be 1 or 2 (phones show at most two panels a row), got {columns!r}")
    return WIDTH, (height if height is not None else (3.6 if columns == 1 else 3.0))


def _in_jupyter() -> bool:
    """True inside a Jupyter kernel (where displays can be updated in place and glued)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return getattr(get_ipython(), "kernel", None) is not None


def glue(name: str, value: Any, fmt: str = "{}") -> None:
    """Store ``fmt.format(value)`` under ``name`` for the prose, without showing it.

    The markdown cells quote it with myst-nb's ``glue:text`` role and the book pastes it in at build time,
    so a number in the prose is always the one the committed run printed. Outside Jupyter it only checks
    the name and the format. It returns nothing, so a cell that ends with it shows nothing.
    """
    if not isinstance(name, str) or not name.replace("_", "").isalnum():
        raise ValueError(f"name must be letters, digits and underscores, got {name!r}")
    text = fmt.format(value)
    if _in_jupyter():
        from IPython.display import display

        display({GLUE_PREFIX + "text/plain": text}, raw=True,
                metadata={"scrapbook": {"name": name, "mime_prefix": GLUE_PREFIX}})


class Table:
    """A table that shows as HTML in Jupyter and the book, and as aligned text elsewhere.

    Args:
        rows: sequence of rows, each a mapping ``column -> value`` or a sequence in ``columns`` order.
        columns: column names, in order.
        formats: optional ``column -> format string`` (e.g. ``"{:.3f}"``); other values use ``str``.
        caption: optional caption shown above the table.
    """

    def __init__(self, rows: Sequence[Mapping[str, Any] | Sequence[Any]], columns: Sequence[str],
                 formats: Mapping[str, str] | None = None, caption: str | None = None):
        self.columns = [str(c) for c in columns]
        formats = dict(formats or {})
        unknown = set(formats) - set(self.columns)
        if unknown:
            raise ValueError(f"formats names columns that are not in columns: {sorted(unknown)}")
        self.cells: list[list[str]] = []
        for i, row in enumerate(rows):
            values = [row[c] for c in self.columns] if isinstance(row, Mapping) else list(row)
            if len(values) != len(self.columns):
                raise ValueError(f"row {i} has {len(values)} values for {len(self.columns)} columns")
            self.cells.append([formats.get(c, "{}").format(v) if v is not None else ""
                               for c, v in zip(self.columns, values)])
        self.caption = caption

    @staticmethod
    def _numeric(text: str) -> bool:
        """Whether a cell reads as a number ("1,192", "-0.5", "10.7%", "2.0e-03", "1.5×"): right-aligned."""
        return _NUMBER.fullmatch(text.strip()) is not None

    def __repr__(self) -> str:
        widths = [max(len(c), *(len(r[j]) for r in self.cells)) if self.cells else len(c)
                  for j, c in enumerate(self.columns)]
        def line(values):
            return "  ".join(v.rjust(w) if self._numeric(v) else v.ljust(w)
                             for v, w in zip(values, widths)).rstrip()
        lines = ([self.caption] if self.caption else []) + [line(self.columns)]
        lines += ["  ".join("-" * w for w in widths)] + [line(r) for r in self.cells]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        def cell(tag, text):
            align = ' style="text-align:right"' if tag == "td" and self._numeric(text) else ""
            return f"<{tag}{align}>{html.escape(text)}</{tag}>"
        head = "".join(cell("th", c) for c in self.columns)
        body = "".join("<tr>" + "".join(cell("td", v) for v in r) + "</tr>" for r in self.cells)
        caption = f"<caption>{html.escape(self.caption)}</caption>" if self.caption else ""
        return (f'<table class="moe-table">{caption}<thead><tr>{head}</tr></thead>'
                f"<tbody>{body}</tbody></table>")


def table(rows, columns, formats=None, caption=None) -> Table:
    """Build a :class:`Table`; end a cell with it (or ``display`` it) to show it."""
    return Table(rows, columns, formats, caption)


class Progress:
    """A progress line with an ETA that updates in place and leaves one final line behind.

    In Jupyter it is a display that is rewritten at most every ``every`` seconds, so a saved notebook, and
    the book rendered from it, keeps only the last state. In a terminal (``stream`` is a TTY) it rewrites
    one line with ``\\r``; elsewhere (a log file, a pipe) it prints only the final line.

    Args:
        total: the number of units (``unit``: "steps" by default) the work has.
        desc: what is running, printed first.
        every: seconds between redraws.
        enabled: ``False`` shows nothing.
        unit: the name of a unit.
        stream: where a terminal line goes (default ``sys.stderr``).
    """

    def __init__(self, total: int, desc: str = "", every: float = 0.5, enabled: bool = True,
                 unit: str = "steps", stream=None):
        self.total, self.desc, self.every, self.unit = total, desc, every, unit
        self.enabled = enabled
        self.count, self.start, self._shown, self.postfix = 0, time.perf_counter(), 0.0, ""
        self._handle = None
        self._stream = sys.stderr if stream is None else stream
        self._terminal = enabled and not _in_jupyter() and getattr(self._stream, "isatty", lambda: False)()
        if enabled and _in_jupyter():
            from IPython.display import display

            self._handle = display({"text/plain": self._line()}, raw=True, display_id=True)

    def _line(self) -> str:
        elapsed = time.perf_counter() - self.start
        extra = f", {self.postfix}" if self.postfix else ""
        eta = ""
        if 0 < self.count < self.total:
            eta = f", ETA {_duration(elapsed / self.count * (self.total - self.count))}"
        return f"{self.desc}: {self.count}/{self.total} {self.unit}, {_duration(elapsed)}{eta}{extra}"

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        self.count += n
        if postfix is not None:
            self.postfix = postfix
        now = time.perf_counter()
        if now - self._shown < self.every:
            return
        if self._handle is not None:
            self._handle.update({"text/plain": self._line()}, raw=True)
        elif self._terminal:
            self._stream.write("\r\033[K" + self._line())
            self._stream.flush()
        self._shown = now

    def write(self, text: str) -> None:
        """Print ``text`` as its own line, above the live progress line (when enabled)."""
        if not self.enabled:
            return
        if self._terminal:
            self._stream.write("\r\033[K")
        print(text, flush=True)
        if self._terminal:
            self._stream.write(self._line())
            self._stream.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._handle is not None:
            self._handle.update({"text/plain": self._line()}, raw=True)
        elif self._terminal:
            self._stream.write("\r\033[K" + self._line() + "\n")
            self._stream.flush()
        else:
            print(self._line())


def _duration(seconds: float) -> str:
    """``12.3 s`` under a minute, ``4 min 05 s`` under an hour, else ``1 h 02 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"

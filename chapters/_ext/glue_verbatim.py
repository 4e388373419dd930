"""Sphinx extension: a glued value without a format spec shows exactly as the notebook stored it.

``moe_ref.book.page.glue`` stores the text the committed run formatted (``"1.10"``, ``"8,193"``). myst-nb's
``glue:text`` role passes that text through ``ast.literal_eval`` before showing it, which turns ``"1.10"``
into ``1.1`` and ``"8,193"`` into the tuple ``(8, 193)``. With this extension a role without a format spec
(``{glue:text}`name```) shows the stored text verbatim; one with a spec (``{glue:text}`name:.2f```) is
formatted as before.

Registered in ``_config.yml`` under ``sphinx: local_extensions``.
"""

from __future__ import annotations

from myst_nb.core import variables
from myst_nb.ext.glue import crossref, roles

_format_plain_text = variables.format_plain_text


def format_plain_text(text: str, fmt_spec: str) -> str:
    """The stored text itself without a format spec (the role's default is ``"s"``); myst-nb's formatting with
    one."""
    return text if fmt_spec in ("", "s") else _format_plain_text(text, fmt_spec)


def setup(app):
    for module in (variables, roles, crossref):  # the two glue modules import the function by name
        module.format_plain_text = format_plain_text
    return {"parallel_read_safe": True, "parallel_write_safe": True}

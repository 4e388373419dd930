"""The committed notebooks as a reader meets them: no wide lines, no stderr, no widgets or progress-bar
debris, every figure numbered and captioned, every glued number defined. Runs on the saved .ipynb files
(no execution), so it checks exactly what the book renders."""

import json
import re
from pathlib import Path

import pytest

CHAPTERS = sorted((Path(__file__).parent.parent / "chapters").glob("*.ipynb"))
MAX_COLUMNS = 88
GLUE_PREFIX = "application/papermill.record/"


def load(path):
    return json.loads(path.read_text())


def text_of(output):
    if output["output_type"] == "stream":
        return "".join(output["text"])
    data = output.get("data", {})
    if "text/html" in data or any(k.startswith("image/") for k in data):
        return ""
    return "".join(data.get("text/plain", ""))


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_code_and_printed_output_fit_the_column(path):
    wide = []
    for i, cell in enumerate(load(path)["cells"]):
        if cell["cell_type"] != "code":
            continue
        for line in "".join(cell["source"]).splitlines():
            if len(line) > MAX_COLUMNS:
                wide.append(f"cell {i} source ({len(line)}): {line[:60]}…")
        for output in cell.get("outputs", []):
            for line in text_of(output).splitlines():
                if len(line) > MAX_COLUMNS:
                    wide.append(f"cell {i} output ({len(line)}): {line[:60]}…")
    assert not wide, "\n".join(wide)


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_no_stderr_widgets_errors_or_progress_debris(path):
    bad = []
    for i, cell in enumerate(load(path)["cells"]):
        for output in cell.get("outputs", []):
            kind = output["output_type"]
            if kind == "stream" and output["name"] == "stderr":
                bad.append(f"cell {i}: stderr {''.join(output['text'])[:80]!r}")
            if kind == "error":
                bad.append(f"cell {i}: error {output.get('ename')}")
            data = output.get("data", {})
            if "application/vnd.jupyter.widget-view+json" in data:
                bad.append(f"cell {i}: widget output")
            if re.search(r"\d+%\|", text_of(output)):
                bad.append(f"cell {i}: progress-bar text")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_every_figure_is_numbered_and_captioned(path):
    missing = []
    names = set()
    for i, cell in enumerate(load(path)["cells"]):
        images = [o for o in cell.get("outputs", [])
                  if any(k.startswith("image/") for k in o.get("data", {}))]
        if not images:
            continue
        figure = cell.get("metadata", {}).get("mystnb", {}).get("figure", {})
        if not figure.get("caption") or not figure.get("name"):
            missing.append(f"cell {i}: figure without mystnb.figure caption and name")
        if len(images) > 1:
            missing.append(f"cell {i}: {len(images)} images in one cell (one figure per cell)")
        names.add(figure.get("name"))
    assert not missing, "\n".join(missing)
    text = "".join("".join(c["source"]) for c in load(path)["cells"] if c["cell_type"] == "markdown")
    for ref in re.findall(r"\{numref\}`([^`<]+?)`", text):
        assert ref in names, f"{{numref}} to {ref!r}, which is not a figure of this chapter"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_every_glued_name_is_defined(path):
    cells = load(path)["cells"]
    defined = set()
    for cell in cells:
        for output in cell.get("outputs", []):
            name = output.get("metadata", {}).get("scrapbook", {}).get("name")
            if name:
                defined.add(name)
    text = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    used = set(re.findall(r"\{glue(?::text|:md)?\}`([A-Za-z0-9_]+)", text))
    assert used <= defined, f"glued in prose but never glued by a cell: {sorted(used - defined)}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_figures_at_most_two_panels_a_row(path):
    for i, cell in enumerate(load(path)["cells"]):
        src = "".join(cell["source"]) if cell["cell_type"] == "code" else ""
        for match in re.finditer(r"subplots\(\s*(\d+)\s*,\s*(\d+)", src):
            assert int(match.group(2)) <= 2, f"cell {i}: subplots({match.group(1)}, {match.group(2)})"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_figures_are_svg_at_column_width(path):
    """SVG (or a retina PNG with its display size) no wider than the column, so 10 pt shows as 10 pt."""
    bad = []
    for i, cell in enumerate(load(path)["cells"]):
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/svg+xml" in data:
                svg = "".join(data["image/svg+xml"])
                width = re.search(r'<svg[^>]*\swidth="([\d.]+)pt"', svg)
                if width is None or float(width.group(1)) > 6.6 * 72:
                    bad.append(f"cell {i}: SVG width {width and width.group(1)} pt")
            elif "image/png" in data:
                shown = output.get("metadata", {}).get("image/png", {}).get("width")
                if shown is None or shown > 6.6 * 96:
                    bad.append(f"cell {i}: PNG without a retina display width (or too wide)")
    assert not bad, "\n".join(bad)

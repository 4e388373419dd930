"""moe_ref.book.page: the notebooks' display helpers, checked against hand-written expectations."""

import importlib.util
import io
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from moe_ref.book import page  # noqa: E402


def test_glue_formats_and_validates_names(monkeypatch):
    shown = []
    monkeypatch.setattr(page, "_in_jupyter", lambda: True)
    import IPython.display

    monkeypatch.setattr(IPython.display, "display", lambda bundle, **kw: shown.append(bundle))
    assert page.glue("ch0_loss", 1.23456, "{:.2f}") is None  # a cell ending with it shows nothing
    page.glue("ch0_pct", 0.107, "{:.1%}")
    assert [list(b.values())[0] for b in shown] == ["1.23", "10.7%"]
    with pytest.raises(ValueError):
        page.glue("ch0_bad", 1.0, "{:d}")  # the format is checked even outside Jupyter
    for bad in ("has space", "dash-name", "", "a.b"):
        with pytest.raises(ValueError, match="name"):
            page.glue(bad, 1)


def test_glue_emits_the_bundle_myst_nb_reads(monkeypatch):
    shown = []
    monkeypatch.setattr(page, "_in_jupyter", lambda: True)
    import IPython.display

    monkeypatch.setattr(IPython.display, "display", lambda *a, **kw: shown.append((a, kw)))
    page.glue("ch0_x", 3, "{:d} experts")
    (bundle,), kw = shown[0]
    assert bundle == {"application/papermill.record/text/plain": "3 experts"}
    assert kw["metadata"] == {"scrapbook": {"name": "ch0_x",
                                            "mime_prefix": "application/papermill.record/"}}
    assert kw["raw"] is True


def test_table_text_and_html():
    t = page.table([{"E": 8, "loss": 1.23456, "name": "a<b"}, [64, 2.0, "dense"]],
                   ["E", "loss", "name"], formats={"loss": "{:.3f}"})
    assert repr(t).splitlines() == [
        "E   loss   name",
        "--  -----  -----",
        " 8  1.235  a<b",
        "64  2.000  dense",
    ]
    html = t._repr_html_()
    assert "<th>loss</th>" in html and "a&lt;b" in html and "a<b" not in html
    assert html.count("<tr>") == 3
    assert '<td style="text-align:right">1.235</td>' in html


def test_table_rejects_bad_rows_and_formats():
    with pytest.raises(ValueError, match="row 0 has 1 values for 2 columns"):
        page.table([[1]], ["a", "b"])
    with pytest.raises(ValueError, match="formats names columns"):
        page.table([[1]], ["a"], formats={"b": "{}"})


def test_figsize_allows_at_most_two_panels_a_row():
    assert page.figsize(1) == (page.WIDTH, 3.6)
    assert page.figsize(2, height=2.5) == (page.WIDTH, 2.5)
    with pytest.raises(ValueError, match="columns"):
        page.figsize(3)


def test_style_sets_legible_fonts():
    page.style()
    rc = matplotlib.rcParams
    assert rc["figure.figsize"][0] == page.WIDTH
    for key in ("font.size", "axes.labelsize", "xtick.labelsize", "ytick.labelsize", "legend.fontsize"):
        assert float(rc[key]) >= 10, key
    plt.close("all")


def test_progress_leaves_one_final_line_outside_ipython(capsys):
    bar = page.Progress(3, desc="train")
    for _ in range(3):
        bar.update(postfix="loss 1.000")
    bar.close()
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and re.fullmatch(r"train: 3/3 steps, \d+\.\d s, loss 1\.000", out[0])
    quiet = page.Progress(3, enabled=False)
    quiet.update()
    quiet.close()
    assert capsys.readouterr().out == ""


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_in_a_terminal_shows_eta_and_rewrites_one_line(monkeypatch, capsys):
    now = [0.0]
    monkeypatch.setattr(page.time, "perf_counter", lambda: now[0])
    stream = _Terminal()
    bar = page.Progress(4, desc="experts", every=0.0, stream=stream)
    now[0] = 10.0
    bar.update()                      # 1 of 4 done after 10 s: 30 s to go
    bar.write("seed 0 done")
    now[0] = 50.0
    bar.update(3)
    bar.close()
    text = stream.getvalue()
    assert "\r\033[Kexperts: 1/4 steps, 10.0 s, ETA 30.0 s" in text
    assert text.endswith("experts: 4/4 steps, 50.0 s\n")  # no ETA once done
    assert capsys.readouterr().out == "seed 0 done\n"


@pytest.mark.parametrize("seconds,text", [(5.04, "5.0 s"), (65, "1 min 05 s"), (3725, "1 h 02 min")])
def test_durations(seconds, text):
    assert page._duration(seconds) == text


def _load_check_site():
    path = Path(__file__).parent / "check_site.py"
    spec = importlib.util.spec_from_file_location("check_site", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_site"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("text, raw", [
    ("the loss $L = x$ here", True),
    (r"where \frac{a}{b} is", True),
    (r"display \begin{aligned} x", True),
    ("costs 5 dollars and 10% of it", False),
    ("a plain sentence about experts", False),
])
def test_site_check_spots_raw_tex(text, raw):
    assert bool(_load_check_site().TEX.search(text)) is raw


def test_site_check_spots_widget_reprs():
    check = _load_check_site()
    assert check.WIDGET.search("interactive(children=(IntSlider(value=4")
    assert not check.WIDGET.search("the interactive explorer below")

"""Load every page of the built book in headless Chromium, as a reader would, and fail on what a reader
would see as broken. Run by ``make check-site`` (after ``make book``); not a pytest module.

For each HTML page of ``_build/html`` (served from 127.0.0.1, nothing else is contacted) at 1280 px and
390 px wide, it fails on:

- raw TeX or a stray ``$`` in the text once MathJax (served locally) has typeset the page;
- an image that does not load, or any request for a file of the site that fails;
- horizontal overflow of the page (the reader would scroll sideways), and, at 1280 px, a code block or
  table wider than the text column;
- an error traceback or a widget repr (``interactive(children=...``, ``HBox(...)``) in the page;
- dead space: an empty cell output that still takes up height.

It writes a full-page screenshot of every chapter at both widths to ``_build/site-check/`` (not committed).
Usage: ``python tests/check_site.py [--html _build/html] [--out _build/site-check] [--browser PATH]``.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import re
import shutil
import sys
import threading
from pathlib import Path

WIDTHS = {"desktop": 1280, "phone": 390}
TEX = re.compile(r"\$[^$\s]|\\(begin|end|frac|sum|mathrm|text|left|right|cdot|times)\b|\\\(|\\\[")
WIDGET = re.compile(r"\b(interactive|HBox|VBox|IntSlider|FloatSlider|Dropdown)\(\s*children=|"
                    r"\b(HBox|VBox|IntSlider|FloatSlider)\(value=")

# Runs in the page: returns what is wrong with it.
PAGE_PROBE = r"""
async ({phone}) => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    await MathJax.startup.promise;
  }
  await Promise.all(Array.from(document.images).map(img => img.complete ? null :
    new Promise(done => { img.onload = img.onerror = done; setTimeout(done, 10000); })));
  const problems = [];
  const article = document.querySelector('article.bd-article') || document.body;
  // images
  for (const img of document.querySelectorAll('img')) {
    if (!img.complete || img.naturalWidth === 0) problems.push('image does not load: ' + img.src);
  }
  // text outside code and math
  const clone = article.cloneNode(true);
  for (const el of clone.querySelectorAll(
      'pre, code, mjx-container, .MathJax, script, style, .highlight, .cell_input'))
    el.remove();
  const text = clone.innerText || clone.textContent || '';
  // page overflow
  const docWidth = document.documentElement.scrollWidth;
  if (docWidth > window.innerWidth + 1)
    problems.push(`page is ${docWidth}px wide in a ${window.innerWidth}px window`);
  const box = article.getBoundingClientRect();
  if (article.scrollWidth > article.clientWidth + 1)
    problems.push(`main column overflows: ${article.scrollWidth}px > ${article.clientWidth}px`);
  // wide code blocks and tables (sideways scrolling inside the column)
  if (!phone) {
    for (const el of article.querySelectorAll('pre, table, mjx-container[display="true"]')) {
      const scroller = el.tagName === 'PRE' ? el : el.parentElement;
      if (el.scrollWidth > scroller.clientWidth + 2 || el.getBoundingClientRect().right > box.right + 2) {
        const what = (el.innerText || el.textContent || '').trim().split('\n')[0].slice(0, 60);
        problems.push(`${el.tagName.toLowerCase()} wider than the column ` +
                      `(${el.scrollWidth}px > ${scroller.clientWidth}px): ${what}`);
      }
    }
  }
  // dead space: empty outputs that take up height
  for (const out of article.querySelectorAll('.cell_output > *')) {
    const visual = 'img, svg, table, figure, mjx-container';
    const empty = !(out.innerText || '').trim() && !out.matches(visual) && !out.querySelector(visual);
    if (empty && out.getBoundingClientRect().height > 8)
      problems.push(`empty output ${Math.round(out.getBoundingClientRect().height)}px high`);
  }
  return {problems, text, tracebacks: (article.innerText || '').includes('Traceback (most recent call last)')};
}
"""


def find_browser(explicit: str | None) -> str:
    for candidate in ([explicit] if explicit else []) + ["/usr/lib/chromium/chromium", "chromium",
                                                         "chromium-browser", "google-chrome"]:
        path = candidate if Path(candidate).is_file() else shutil.which(candidate)
        if path:
            return path
    sys.exit("check-site: no Chromium found (Debian: apt-get install chromium)")


def serve(root: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def pages(root: Path) -> list[Path]:
    skip = {"genindex.html", "search.html", "py-modindex.html"}
    def redirect(p: Path) -> bool:  # index.html only forwards to the first chapter
        return 'http-equiv="refresh"' in p.read_text(errors="replace")[:2000].lower()
    return sorted(p for p in root.rglob("*.html")
                  if p.name not in skip and not redirect(p)
                  and not any(part.startswith("_") for part in p.relative_to(root).parts))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--html", default="_build/html")
    parser.add_argument("--out", default="_build/site-check")
    parser.add_argument("--browser", default=None)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    root, out = Path(args.html), Path(args.out)
    if not (root / "index.html").exists():
        sys.exit(f"check-site: {root}/index.html not found; run `make book` first")
    out.mkdir(parents=True, exist_ok=True)
    server, base = serve(root)
    failures: list[str] = []
    checked = 0
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=find_browser(args.browser),
                                     args=["--no-sandbox", "--disable-gpu"])
        for label, width in WIDTHS.items():
            context = browser.new_context(viewport={"width": width, "height": 900},
                                          device_scale_factor=2 if width < 500 else 1)
            page = context.new_page()
            failed_requests: list[str] = []
            page.on("requestfailed", lambda r: failed_requests.append(r.url))
            page.route(re.compile(r"^(?!http://127\.0\.0\.1:).*"), lambda route: route.abort())
            for path in pages(root):
                rel = path.relative_to(root).as_posix()
                failed_requests.clear()
                page.goto(base + rel, wait_until="load")
                result = page.evaluate(PAGE_PROBE, {"phone": width < 500})
                problems = list(result["problems"])
                tex = TEX.search(result["text"])
                if tex:
                    start = max(0, tex.start() - 30)
                    problems.append(f"raw TeX in text: …{result['text'][start:tex.end() + 30]!r}…")
                if result["tracebacks"]:
                    problems.append("an error traceback is shown")
                if WIDGET.search(result["text"]):
                    problems.append("a widget repr is shown")
                problems += [f"request failed: {u}" for u in failed_requests if u.startswith(base)]
                failures += [f"{rel} @{width}px: {p}" for p in problems]
                checked += 1
                if rel.startswith("chapters/") and "api" not in rel:
                    page.screenshot(path=str(out / f"{path.stem}-{label}.png"), full_page=True)
            context.close()
        browser.close()
    server.shutdown()
    for failure in failures:
        print("FAIL", failure)
    print(f"check-site: {checked} page loads, {len(failures)} problems; screenshots in {out}/")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

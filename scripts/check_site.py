"""Open every page of the built site in headless Chromium, the way a reader meets it, and fail on what they would see.

Usage:  python scripts/check_site.py [SITE_DIR]           (default: _build/html; run after `jupyter-book build .`)
        python scripts/check_site.py --help

The site is served from localhost (http.server in a thread) and each page is loaded, screenshotted (full page,
into _build/screenshots/ by default) and checked for:

  external-request  a request to any host but the local server (it is blocked, so an offline reader's view is
                    what is checked: a widget or formula that needs a CDN shows nothing)
  missing-file      a local request answered with an HTTP error or failing (a vendored file that was not copied)
  console-error     a JavaScript console error, or an uncaught exception in the page
  empty-widget      a stored widget view that did not render, or a widget output area with nothing in it
  h-scroll          an output, code cell or other element of the article that scrolls sideways
  too-wide          a code cell, output, figure, table or widget whose right edge is past the content column
  broken-link       a link to a local page that does not exist, or to an anchor that page does not have
  harness-text      a code cell that shows a test-harness comment (# NBVAL_IGNORE_OUTPUT: use a cell tag instead,
                    scripts/nbval_tags.py)
  small-text        a figure shown so small that its smallest text (MIN_FIGURE_FONT_PT, the least any figure of the
                    book sets: tests/test_figure_fonts.py) is under MIN_TEXT_PX CSS pixels; the size comes from the
                    PNG's resolution (its pHYs dpi) and how wide the page shows it
  repeated-title    a page title that says the same thing twice ("DeepSeek-V3, built — DeepSeek-V3, built")
  load-error        the page did not load (or a check could not run in it)

Pages are checked in a 1280×900 window (--viewport), the width the site is designed for.

Exit status 0 when no page has a problem, 1 otherwise (2 when Chromium or Playwright is missing).
Chromium is the system one (Debian: apt-get install chromium); Playwright drives it, with no browser download:
`pip install -r requirements-ci.txt`.
"""

from __future__ import annotations

import argparse
import functools
import html.parser
import http.server
import os
import shutil
import struct
import sys
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Problem", "check_site", "figure_text_px", "find_chromium", "main", "png_dpi"]

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Folders of the built site that hold assets, not pages.
NOT_PAGES = ("_static", "_sources", "_images", "_downloads")
# Figure text: no figure sets text under MIN_FIGURE_FONT_PT points (tests/test_figure_fonts.py holds the notebooks
# and dsv3lib.viz to it), and the page must show that text at MIN_TEXT_PX CSS pixels or more.
MIN_FIGURE_FONT_PT = 9.0
MIN_TEXT_PX = 9.0
VIEWPORT = (1280, 900)


@dataclass(frozen=True)
class Problem:
    page: str  # path of the page inside the site
    kind: str  # one of the kinds in the module docstring
    detail: str

    def __str__(self) -> str:
        return f"{self.page}: {self.kind}: {self.detail}"


def find_chromium(explicit: str | None = None) -> str | None:
    """The Chromium executable: `explicit`, $CHROMIUM, or the first of CHROMIUM_CANDIDATES on PATH."""
    for name in (explicit, os.environ.get("CHROMIUM"), *CHROMIUM_CANDIDATES):
        if name:
            path = shutil.which(name)
            if path:
                return path
    return None


# ---- serving


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


def _serve(root: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


# ---- links (checked against the files, not by loading every target)


class _Anchors(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key == "id" or (tag == "a" and key == "name"):
                self.ids.add(value or "")


@functools.lru_cache(maxsize=None)
def _anchors(path: Path) -> frozenset[str]:
    parser = _Anchors()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    return frozenset(parser.ids)


def _link_problem(root: Path, base_url: str, href: str) -> str | None:
    """Why a resolved same-site link is broken, or None if it is fine."""
    parts = urllib.parse.urlsplit(href)
    rel = urllib.parse.unquote(parts.path[len(urllib.parse.urlsplit(base_url).path) :])
    target = root / rel
    if target.is_dir():
        target = target / "index.html"
    if not target.is_file():
        return f"{href} -> no file {rel or '/'}"
    fragment = urllib.parse.unquote(parts.fragment)
    if fragment and target.suffix == ".html" and fragment not in _anchors(target):
        return f"{href} -> {rel} has no id {fragment!r}"
    return None


# ---- the checks that run in the page

# Waits for what renders after `load`: MathJax typesetting and the stored widget views.
_SETTLE_JS = """
async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    try { await MathJax.startup.promise; } catch (e) {}
  }
  const views = () => [...document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]')];
  const rendered = (s) => {
    const area = s.parentElement && s.parentElement.querySelector('.widget-subarea');
    return !!(area && area.children.length);
  };
  for (let i = 0; i < 100 && !views().every(rendered); i++) {
    await new Promise((r) => setTimeout(r, 100));
  }
  await document.fonts.ready;
}
"""

# Returns [kind, detail] pairs for the widget and width checks, and the page's links.
_INSPECT_JS = """
() => {
  const out = [];
  const describe = (el) => {
    const cls = (typeof el.className === 'string' && el.className.trim())
      ? '.' + el.className.trim().split(/\\s+/).slice(0, 2).join('.') : '';
    const cell = el.closest('div.cell');
    const where = cell ? ` in code cell ${[...document.querySelectorAll('div.cell')].indexOf(cell) + 1}` : '';
    const text = (el.innerText || el.getAttribute('alt') || el.getAttribute('src') || '').trim()
      .split('\\n')[0].slice(0, 60);
    return `<${el.tagName.toLowerCase()}${cls}>${where} "${text}"`;
  };
  const visible = (el) => {
    const r = el.getBoundingClientRect();
    return r.width > 0 && r.height > 0 && getComputedStyle(el).visibility !== 'hidden';
  };

  // widgets: every stored view rendered, and no widget output area left empty
  for (const s of document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]')) {
    const area = s.parentElement && s.parentElement.querySelector('.widget-subarea');
    let model = '';
    try { model = JSON.parse(s.textContent).model_id; } catch (e) {}
    if (!area || !area.children.length || !visible(area)) {
      out.push(['empty-widget', `widget view ${model} did not render`]);
    }
  }
  for (const w of document.querySelectorAll('.jupyter-widgets.widget-output, .widget-output')) {
    const hasContent = (w.innerText || '').trim() || w.querySelector('img, svg, canvas, video, table, input');
    if (!hasContent) out.push(['empty-widget', `widget output area is empty: ${describe(w)}`]);
  }

  // test-harness comments in the code a reader sees (scripts/nbval_tags.py moves them into cell tags)
  for (const pre of document.querySelectorAll('div.cell_input pre')) {
    const m = (pre.textContent || '').match(/^\\s*#+\\s*(NBVAL_[A-Z_]+|PYTEST_VALIDATE_[A-Z_]+)/m);
    if (m) out.push(['harness-text', `${describe(pre)} shows # ${m[1]}`]);
  }

  // width: nothing in the article scrolls sideways or sticks out of the content column
  const article = document.querySelector('article.bd-article') || document.querySelector('[role=main]')
    || document.body;
  const right = article.getBoundingClientRect().right;
  const seen = new Set();
  for (const el of article.querySelectorAll('*')) {
    if (!visible(el)) continue;
    const ox = getComputedStyle(el).overflowX;
    if ((ox === 'auto' || ox === 'scroll') && el.scrollWidth > el.clientWidth + 1) {
      out.push(['h-scroll', `${describe(el)} scrolls sideways (${el.scrollWidth}px in ${el.clientWidth}px)`]);
      seen.add(el);
    }
  }
  const boxes = 'pre, img, svg, table, canvas, video, iframe, .widget-subarea, .jupyter-widgets, mjx-container,'
    + ' div.cell_output > div, div.cell_input';
  for (const el of article.querySelectorAll(boxes)) {
    if (!visible(el) || seen.has(el)) continue;
    const r = el.getBoundingClientRect();
    const width = Math.max(r.width, el.scrollWidth);  // content spilling out of its box counts too
    if (r.left + width > right + 1 && ![...seen].some((s) => s.contains(el))) {
      out.push(['too-wide', `${describe(el)} is ${Math.round(r.left + width - right)}px wider than the column`
        + ` (${Math.round(width)}px)`]);
      seen.add(el);
    }
  }
  const doc = document.documentElement;
  if (doc.scrollWidth > doc.clientWidth + 1) {
    out.push(['h-scroll', `the page scrolls sideways (${doc.scrollWidth}px in ${doc.clientWidth}px)`]);
  }
  // the browser tab's title: "Page — Site", not the same words twice
  const parts = document.title.split(/\\s+[\u2014|-]\\s+/).map((t) => t.trim()).filter(Boolean);
  if (parts.length > 1 && new Set(parts).size < parts.length) out.push(['repeated-title', `"${document.title}"`]);

  // figures: [where, file, drawn width, shown width] for the text-size check in Python
  const figures = [...article.querySelectorAll('div.cell_output img, figure img')].filter(visible)
    .filter((img) => img.complete && img.naturalWidth > 0)
    .map((img) => [describe(img), img.currentSrc, img.naturalWidth, img.getBoundingClientRect().width]);

  const links = [...document.querySelectorAll('a[href]')].map((a) => a.href);
  return {problems: out, links: links, figures: figures};
}
"""


def _watch(page, rel: str, found: list[Problem], local: str, base: str) -> None:
    """Record what the page requests and logs into `found`; block requests to other hosts."""

    def add(kind: str, detail: str) -> None:
        problem = Problem(rel, kind, detail)
        if problem not in found:
            found.append(problem)

    def route(r) -> None:
        parts = urllib.parse.urlsplit(r.request.url)
        if parts.scheme in ("http", "https", "ws", "wss") and parts.netloc != local:
            add("external-request", r.request.url)
            r.abort("blockedbyclient")
        else:
            r.continue_()

    def on_console(msg) -> None:
        # A failed load is reported as missing-file / external-request / request-failed instead.
        if msg.type == "error" and not msg.text.startswith("Failed to load resource"):
            loc = msg.location or {}
            where = f" ({loc.get('url', '')}:{loc.get('lineNumber', '')})" if loc.get("url") else ""
            add("console-error", msg.text.strip()[:300] + where)

    def on_response(resp) -> None:
        if urllib.parse.urlsplit(resp.url).netloc == local and resp.status >= 400:
            add("missing-file", f"{resp.status} {resp.url[len(base) - 1:]}")

    def on_failed(req) -> None:
        if urllib.parse.urlsplit(req.url).netloc == local:
            add("missing-file", f"{req.failure} {req.url[len(base) - 1:]}")

    page.route("**/*", route)
    page.on("requestfailed", on_failed)
    page.on("console", on_console)
    page.on("pageerror", lambda exc: add("console-error", f"uncaught {exc}"[:300]))
    page.on("response", on_response)


def _check_page(page, url, rel, root, base, local, found, screenshots, log) -> None:
    page.goto(url, wait_until="load", timeout=60_000)
    try:
        page.wait_for_load_state("networkidle", timeout=15_000)
    except Exception:  # noqa: BLE001 - a page that keeps polling is still checked
        pass
    if page.url.split("#")[0] != url:
        log(f"{rel}: redirects to {page.url[len(base) - 1:]}")
        return
    page.evaluate(_SETTLE_JS)
    result = page.evaluate(_INSPECT_JS)
    for kind, detail in result["problems"] + _figure_problems(root, base, result["figures"]):
        found.append(Problem(rel, kind, detail))
    for href in dict.fromkeys(result["links"]):
        parts = urllib.parse.urlsplit(href)
        if parts.netloc != local or parts.scheme not in ("http", "https"):
            continue
        why = _link_problem(root, base, href)
        if why:
            found.append(Problem(rel, "broken-link", why))
    if screenshots is not None:
        shot = screenshots / (rel.replace("/", "__").removesuffix(".html") + ".png")
        page.screenshot(path=str(shot), full_page=True)


def png_dpi(path: Path) -> float | None:
    """The resolution a PNG declares (its pHYs chunk, pixels per metre → dpi), or None (none, or not a PNG).
    Matplotlib writes its figure dpi there, so points in the figure are pixels × 72 / dpi."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"pHYs" and length == 9:
            x, _, unit = struct.unpack(">IIB", data[pos + 8:pos + 17])
            return x * 0.0254 if unit == 1 and x else None
        if kind in (b"IDAT", b"IEND"):  # pHYs must come before the image data
            return None
        pos += 12 + length
    return None


def figure_text_px(dpi: float, drawn: float, shown: float, font_pt: float = MIN_FIGURE_FONT_PT) -> float:
    """CSS pixels of ``font_pt``-point text in a figure drawn ``drawn`` pixels wide at ``dpi`` and shown ``shown``
    CSS pixels wide."""
    return font_pt * dpi / 72 * shown / drawn


def _figure_problems(root: Path, base: str, figures: list) -> list[tuple[str, str]]:
    out = []
    for where, src, drawn, shown in figures:
        if not src.startswith(base):
            continue
        dpi = png_dpi(root / urllib.parse.unquote(urllib.parse.urlsplit(src).path[len(urllib.parse.urlsplit(base).path):]))
        if dpi is None:  # not a figure that says how big its points are
            continue
        px = figure_text_px(dpi, drawn, shown)
        if px < MIN_TEXT_PX - 0.05:
            out.append(("small-text", f"{where}: {MIN_FIGURE_FONT_PT:g}-pt text shows at {px:.1f}px (drawn {drawn}px "
                                      f"wide at {dpi:.0f} dpi, shown {shown:.0f}px wide)"))
    return out


def _pages(root: Path) -> list[str]:
    pages = []
    for path in sorted(root.rglob("*.html")):
        rel = path.relative_to(root)
        if rel.parts[0] not in NOT_PAGES:
            pages.append(rel.as_posix())
    return pages


def check_site(
    root: Path,
    screenshots: Path | None = None,
    chromium: str | None = None,
    viewport: tuple[int, int] = VIEWPORT,
    log=print,
) -> tuple[list[str], list[Problem]]:
    """Check every page under `root`; returns (pages checked, problems found)."""
    from playwright.sync_api import sync_playwright

    root = Path(root).resolve()
    pages = _pages(root)
    problems: list[Problem] = []
    if screenshots is not None:
        shutil.rmtree(screenshots, ignore_errors=True)
        screenshots.mkdir(parents=True)
    server, base = _serve(root)
    local = urllib.parse.urlsplit(base).netloc
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=chromium or find_chromium(), headless=True, args=["--no-sandbox"]
            )
            context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
            for rel in pages:
                found: list[Problem] = []
                page = context.new_page()
                _watch(page, rel, found, local, base)
                url = base + rel
                try:
                    _check_page(page, url, rel, root, base, local, found, screenshots, log)
                except Exception as exc:  # noqa: BLE001 - one page that cannot load is a problem, not a crash
                    found.append(Problem(rel, "load-error", f"{type(exc).__name__}: {str(exc).splitlines()[0]}"))
                page.close()
                log(f"{rel}: {'ok' if not found else f'{len(found)} problem(s)'}")
                problems.extend(found)
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    return pages, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", nargs="?", default="_build/html", type=Path, help="built site (default _build/html)")
    parser.add_argument(
        "--screenshots", type=Path, default=None, help="folder for full-page PNGs (default: SITE/../screenshots)"
    )
    parser.add_argument("--no-screenshots", action="store_true")
    parser.add_argument("--chromium", default=None, help="Chromium executable (default: $CHROMIUM or on PATH)")
    parser.add_argument("--viewport", default="{}x{}".format(*VIEWPORT),
                        help="WIDTHxHEIGHT in CSS pixels (default {}x{})".format(*VIEWPORT))
    args = parser.parse_args(argv)

    if not (args.site / "index.html").is_file() and not list(args.site.glob("*.html")):
        print(f"check_site: no HTML pages in {args.site} (build the site first)", file=sys.stderr)
        return 2
    chromium = find_chromium(args.chromium)
    if chromium is None:
        print("check_site: no Chromium found (apt-get install chromium, or --chromium PATH)", file=sys.stderr)
        return 2
    try:
        import playwright  # noqa: F401
    except ImportError:
        print("check_site: Playwright is not installed (pip install -r requirements-ci.txt)", file=sys.stderr)
        return 2
    shots = None if args.no_screenshots else (args.screenshots or args.site.resolve().parent / "screenshots")
    width, height = (int(v) for v in args.viewport.lower().split("x"))

    pages, problems = check_site(args.site, shots, chromium, (width, height))
    for problem in problems:
        print(problem)
    print(
        f"check_site: {len(pages)} pages, {len(problems)} problem(s)"
        + (f"; screenshots in {shots}" if shots else "")
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

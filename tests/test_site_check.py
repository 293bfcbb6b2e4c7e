"""scripts/check_site.py finds what a reader would meet: tested on tiny sites built here, one broken, one clean."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import check_site  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(check_site.find_chromium() is None, reason="no Chromium (apt-get install chromium)"),
    pytest.mark.skipif(
        importlib.util.find_spec("playwright") is None,
        reason="no Playwright (pip install -r requirements-ci.txt)",
    ),
]

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>{head}</head>
<body><article class="bd-article" style="width: 400px">
{body}
</article></body></html>
"""


def _site(tmp_path: Path, head: str, body: str, title: str = "Page &#8212; Site") -> Path:
    site = tmp_path / "html"
    site.mkdir()
    (site / "index.html").write_text(PAGE.format(title=title, head=head, body=body), encoding="utf-8")
    other = PAGE.format(title="Other &#8212; Site", head="", body='<h1 id="there">other</h1>')
    (site / "other.html").write_text(other, encoding="utf-8")
    return site


def _figure(path: Path, width_in: float) -> None:
    """A matplotlib PNG ``width_in`` inches wide at 100 dpi (so it carries a pHYs chunk, as the notebooks' do)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width_in, 1))
    ax.plot([0, 1])
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _run(site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_site.py"), str(site), "--no-screenshots"],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_checker_fails_on_a_broken_page(tmp_path):
    head = '<script src="https://cdn.example.invalid/lib.js"></script>'
    body = "\n".join(
        [
            "<script>undefinedFunction();</script>",  # a JavaScript error
            '<div class="cell_output"><pre style="white-space: pre; overflow-x: auto">' + "x" * 300 + "</pre></div>",
            '<div class="cell_output"><pre style="white-space: pre; overflow: visible">' + "y" * 300 + "</pre></div>",
            '<a href="missing.html">gone</a> <a href="other.html#nowhere">no anchor</a>',
            '<a href="other.html#there">fine</a> <a href="https://arxiv.org/abs/2412.19437">external link</a>',
            '<div class="cell_output"><script type="application/vnd.jupyter.widget-view+json">'
            '{"version_major": 2, "version_minor": 0, "model_id": "abc"}</script></div>',  # no widget manager
            '<img src="nothere.png" alt="missing figure">',
            '<div class="cell_input"><pre># NBVAL_IGNORE_OUTPUT\nprint(1)</pre></div>',
            '<div class="cell_output"><img src="wide.png" style="width: 300px"></div>',  # 15 in shown in 300 px
        ]
    )
    site = _site(tmp_path, head, body, title="Site &#8212; Site")
    _figure(site / "wide.png", 15)
    result = _run(site)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    problems = [line for line in out.splitlines() if line.startswith("index.html: ") and line.count(": ") >= 2]
    kinds = {line.split(": ")[1] for line in problems}
    assert kinds == {
        "external-request",
        "console-error",
        "h-scroll",
        "too-wide",
        "broken-link",
        "empty-widget",
        "missing-file",
        "harness-text",
        "repeated-title",
        "small-text",
    }, out
    assert "9-pt text shows at 2.5px (drawn 1500px wide at 100 dpi, shown 300px wide)" in out
    assert "index.html: external-request: https://cdn.example.invalid/lib.js" in out
    assert "undefinedFunction" in out
    assert "missing.html -> no file missing.html" in out
    assert "has no id 'nowhere'" in out
    assert "other.html#there" not in out and "arxiv" not in out
    assert "other.html: ok" in out
    assert "check_site: 2 pages," in out


def test_checker_passes_a_clean_page(tmp_path):
    body = (
        '<div class="cell_input"><pre># (a comment)\nprint(1)</pre></div>'
        '<div class="cell_output"><pre>short output</pre></div><a href="other.html#there">see</a>'
        '<div class="cell_output"><img src="fig.png" style="width: 360px"></div>'  # 4 in at 360 px: 11.3 px
    )
    site = _site(tmp_path, "", body)
    _figure(site / "fig.png", 4)
    result = _run(site)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "check_site: 2 pages, 0 problem(s)" in result.stdout

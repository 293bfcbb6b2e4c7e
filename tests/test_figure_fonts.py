"""No figure of the book sets text below scripts/check_site.py's MIN_FIGURE_FONT_PT (9 pt).

check_site measures how wide the site shows each figure at a 1280-px window and fails one whose 9-pt text would be
under 9 CSS px; that is only a bound on the figure's text if nothing in it is smaller than 9 pt. Matplotlib's
defaults are 10 pt (``font.size``; tick labels and legends "medium"), so what can go below is an explicit size:
``fontsize=8``, ``labelsize=7``, ``"small"``, a smaller ``font.size``. This test reads every code cell of the
notebooks for one (dsv3lib.viz is checked by drawing its figures: tests/test_viz.py).
"""

import re
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from check_site import MIN_FIGURE_FONT_PT, figure_text_px, png_dpi  # noqa: E402

NOTEBOOKS = sorted((ROOT / "book").glob("*.ipynb"))
# fontsize=8, labelsize=7.5, title_fontsize=8, "font.size": 8, prop={"size": 8}, fontsize="small"
SIZE = re.compile(r"""(?:\b(?:\w*fontsize|labelsize)\s*=|["'](?:font\.size|size|fontsize)["']\s*:)\s*(["']?)([\w.\-]+)\1""")
RELATIVE = {"xx-small", "x-small", "small", "smaller"}


def small_sizes(source: str) -> list[str]:
    found = []
    for m in SIZE.finditer(source):
        value = m.group(2)
        try:
            small = float(value) < MIN_FIGURE_FONT_PT
        except ValueError:
            small = value in RELATIVE
        if small:
            found.append(m.group(0))
    return found


def test_the_scanner_finds_small_sizes():
    assert small_sizes('ax.legend(fontsize=8); ax.tick_params(labelsize=7.5)') == ["fontsize=8", "labelsize=7.5"]
    assert small_sizes('plt.rcParams["font.size"] = 8') == []  # an assignment, not a keyword: see the next one
    assert small_sizes('plt.rcParams.update({"font.size": 8}); ax.legend(prop={"size": 6})') == [
        '"font.size": 8', '"size": 6']
    assert small_sizes('ax.legend(fontsize="small", title_fontsize="x-small")') == [
        'fontsize="small"', 'title_fontsize="x-small"']
    assert small_sizes('ax.legend(fontsize=9); ax.text(0, 0, "s", fontsize="large")') == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_no_figure_text_below_the_minimum(path):
    nb = nbformat.read(path, as_version=4)
    bad = {i: small_sizes(c.source) for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    bad = {i: found for i, found in bad.items() if found}
    assert not bad, f"text below {MIN_FIGURE_FONT_PT:g} pt in cells {bad}"
    rc = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and re.search(r"rcParams\[[\"']font\.size", c.source)]
    assert not rc, f"cells {rc} change font.size: keep matplotlib's 10 pt"


def test_png_dpi_and_shown_text_size(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(11, 2))
    fig.savefig(tmp_path / "f.png", dpi=100)
    plt.close(fig)
    assert png_dpi(tmp_path / "f.png") == pytest.approx(100, abs=0.01)
    (tmp_path / "not.png").write_bytes(b"GIF89a")
    assert png_dpi(tmp_path / "not.png") is None and png_dpi(tmp_path / "missing.png") is None
    # 11 in at 100 dpi (1100 px) shown in the 800-px column: 9 pt = 12.5 px drawn, 9.09 px shown
    assert figure_text_px(100, 1100, 800) == pytest.approx(9 * 800 / (11 * 72))
    assert figure_text_px(100, 1300, 800) < 9 < figure_text_px(100, 1100, 800)

"""The notebooks as stored are what a reader should open: no harness comments in the code, no stale progress bars or
widget reprs in the saved outputs, and nothing JupyterLab rewrites on opening (so an unedited notebook stays
unmodified). Fix a failure with:  python scripts/nbval_tags.py book/*.ipynb && python scripts/clean_outputs.py book/*.ipynb
"""

import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import clean_outputs  # noqa: E402
import nbval_tags  # noqa: E402

NOTEBOOKS = sorted((ROOT / "book").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_no_harness_comments_in_code(path):
    nb = nbformat.read(path, as_version=4)
    marked = [
        i for i, c in enumerate(nb.cells) if c.cell_type == "code" and nbval_tags._MARKER.match(c.source.split("\n")[0])
    ]
    assert not marked, f"cells {marked} start with an nbval comment: run scripts/nbval_tags.py {path.name}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_saved_outputs_are_clean(path):
    raw = path.read_text(encoding="utf-8")
    nb = nbformat.reads(raw, as_version=nbformat.NO_CONVERT)
    clean_outputs.clean_notebook(nb, log=lambda msg: None)
    assert nbformat.writes(nb) + "\n" == raw, f"run scripts/clean_outputs.py {path.relative_to(ROOT)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_nothing_for_jupyterlab_to_rewrite_on_opening(path):
    nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    assert (nb.nbformat, nb.nbformat_minor) >= (4, 5), "nbformat 4.5 (cell ids): JupyterLab adds ids to older ones"
    assert all("id" in cell for cell in nb.cells)
    # JupyterLab writes the running kernel's spec on start; a different display name marks the notebook modified.
    assert nb.metadata.get("kernelspec") == clean_outputs.KERNELSPEC

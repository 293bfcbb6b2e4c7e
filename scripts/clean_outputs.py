"""Tidy the outputs and metadata stored in the chapter notebooks, so that what a reader opens is what they should see.

Usage:  python scripts/clean_outputs.py book/*.ipynb            rewrite in place (run after every re-execution)
        python scripts/clean_outputs.py --check book/*.ipynb    exit 1 if a notebook would change

What it changes, and why it does not change what nbval compares:

1. Stream outputs. Consecutive outputs of the same stream are merged into one (nbval merges all outputs of a
   stream before it compares, nbval/plugin.py `coalesce_streams`, and JupyterLab merges consecutive ones as it
   loads a notebook), and, in cells whose output nbval ignores, text a terminal would have overwritten
   (`\\r` progress bars, backspaces) is removed, keeping the last state of each line. In a compared cell such a
   stream is reported and left.
2. The plain-text fallback of widget outputs. A widget output stores the widget's first repr as `text/plain`,
   shown wherever the widget itself cannot be drawn (an untrusted notebook in JupyterLab, GitHub, nbviewer):
   a tqdm bar is stored at `train:   0%|` and an `interact` as `interactive(children=(IntSlider(...`.
   A tqdm bar gets its final line, rebuilt from the widget state stored in the notebook
   (`train: 100%|██████████| 400/400 [00:50<00:00, ...]`); any other widget gets a one-line note
   (or, with --drop-widget-text, nothing). nbval compares `text/plain`, so this is done only in cells whose output
   nbval ignores (tag nbval-ignore-output / nbval-skip, or the comment markers); others are reported and left.
3. The kernelspec. JupyterLab writes the running kernel's spec into the notebook when it starts the kernel on
   opening; a stored spec that differs (`"display_name": "Python 3"` vs ipykernel's "Python 3 (ipykernel)") makes
   an unedited notebook "modified". It is set to ipykernel's default spec.

The file is written the way nbformat (Jupyter) writes it; a clean notebook is left byte-identical.
"""

from __future__ import annotations

import argparse
import html
import re
import sys
from pathlib import Path

import nbformat

__all__ = ["clean_notebook", "clean_streams", "KERNELSPEC"]

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
# ipykernel's default kernel spec (`python -m ipykernel install` writes this display name).
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
WIDGET_NOTE = "[an interactive widget: run the cell to use it]"

# Text before a carriage return that does not end the line (nbval's pattern), a character before a backspace.
_CARRIAGE_RETURN = re.compile(r"^.*\r(?=[^\n])", re.MULTILINE)
_BACKSPACE = re.compile("[^\n]\x08")
_IGNORED_MARKERS = re.compile(r"^\s*#+\s*(NBVAL_IGNORE_OUTPUT|NBVAL_SKIP|PYTEST_VALIDATE_IGNORE_OUTPUT)\s*$", re.M)
_IGNORED_TAGS = {"nbval-ignore-output", "nbval-skip"}
_TAG = re.compile(r"<[^>]*>")


def _overwritten_removed(text: str) -> str:
    old = None
    while old is None or len(text) < len(old):
        old, text = text, _BACKSPACE.sub("", text)
    text = _CARRIAGE_RETURN.sub("", text)
    return text.replace("\r\n", "\n")


def clean_streams(outputs: list, overwrite: bool = True) -> list:
    """Merge consecutive outputs of the same stream and (if `overwrite`) remove the text a terminal would overwrite."""
    merged: list = []
    for out in outputs:
        if (
            out.get("output_type") == "stream"
            and merged
            and merged[-1].get("output_type") == "stream"
            and merged[-1].get("name") == out.get("name")
        ):
            merged[-1]["text"] = merged[-1]["text"] + out["text"]
        else:
            merged.append(out)
    for out in merged if overwrite else ():
        if out.get("output_type") == "stream" and ("\r" in out["text"] or "\x08" in out["text"]):
            text = _overwritten_removed(out["text"])
            # A bar left at the end of the stream with a trailing \r keeps its last state.
            out["text"] = text.rstrip("\r")
    return merged


def _text(value: str) -> str:
    return html.unescape(_TAG.sub("", value)).replace("\u2007", " ").replace("\xa0", " ")


def _tqdm_line(state: dict, model_id: str) -> str | None:
    """The final text line of a tqdm.notebook bar (HBox of HTML, progress, HTML), from the stored widget state."""
    box = state.get(model_id)
    if not box or box.get("model_name") != "HBoxModel":
        return None
    children = [state.get(c.replace("IPY_MODEL_", ""), {}) for c in box["state"].get("children", [])]
    names = [c.get("model_name") for c in children]
    if len(children) != 3 or names[0] != "HTMLModel" or names[2] != "HTMLModel" or "Progress" not in names[1]:
        return None
    left, bar, right = (c.get("state", {}) for c in children)
    total = float(bar.get("max") or 0)
    filled = round(10 * float(bar.get("value", 0)) / total) if total else 0
    return f"{_text(left.get('value', '')).rstrip()}|{'█' * filled}{' ' * (10 - filled)}|{_text(right.get('value', ''))}"


def _output_ignored(cell) -> bool:
    return bool(_IGNORED_TAGS & set(cell.metadata.get("tags", []))) or bool(_IGNORED_MARKERS.search(cell.source))


def clean_notebook(nb, drop_widget_text: bool = False, log=print) -> None:
    """Apply the three clean-ups of the module docstring to `nb` in place."""
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        ignored = _output_ignored(cell)
        cell.outputs = clean_streams(cell.outputs, overwrite=ignored)
        if not ignored and any("\r" in o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream"):
            log(f"cell {index} ({cell.get('id', '?')}): carriage returns left in a stream (nbval compares it)")
        for out in cell.outputs:
            data = out.get("data", {})
            if WIDGET_VIEW not in data or "text/plain" not in data:
                continue
            line = _tqdm_line(state, data[WIDGET_VIEW].get("model_id", ""))
            new = line if line is not None else (None if drop_widget_text else WIDGET_NOTE)
            if new == data["text/plain"]:
                continue
            if not ignored:
                log(f"cell {index} ({cell.get('id', '?')}): widget text left as it is (nbval compares this output)")
                continue
            if new is None:
                del data["text/plain"]
            else:
                data["text/plain"] = new
    if nb.metadata.get("kernelspec", {}).get("name", "python3") == "python3":
        nb.metadata["kernelspec"] = dict(KERNELSPEC)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a notebook would change")
    parser.add_argument("--drop-widget-text", action="store_true", help="remove a widget's text/plain fallback")
    args = parser.parse_args(argv)

    dirty = 0
    for path in args.notebooks:
        raw = path.read_text(encoding="utf-8")
        nb = nbformat.reads(raw, as_version=nbformat.NO_CONVERT)
        clean_notebook(nb, args.drop_widget_text, log=lambda msg, path=path: print(f"{path}: {msg}"))
        out = nbformat.writes(nb) + "\n"
        changed = out != raw
        dirty += changed
        if changed and not args.check:
            path.write_text(out, encoding="utf-8")
        print(f"{path}: {'would change' if args.check and changed else 'cleaned' if changed else 'clean'}")
    return 1 if args.check and dirty else 0


if __name__ == "__main__":
    sys.exit(main())

"""Move nbval's comment markers (`# NBVAL_IGNORE_OUTPUT`, ...) out of the code a reader sees, into cell tags.

Usage:  python scripts/nbval_tags.py book/*.ipynb            rewrite the notebooks in place
        python scripts/nbval_tags.py --check book/*.ipynb    exit 1 if a notebook still has a marker comment

nbval reads the same instruction from a cell tag as from a comment (nbval/plugin.py: `metadata_tags` is
`comment_markers` with the names lower-cased and `_` turned into `-`), so

    # NBVAL_IGNORE_OUTPUT                                  tags: ["nbval-ignore-output"]
    # (timings depend on the machine)            ->        metadata.nbval.reason: "timings depend on the machine"
    import time                                            import time

Only the comment lines at the top of a cell are moved: the marker lines, and the one line right after them
when it is a whole-line comment in parentheses (the reason, harness text). Markers further down a cell are
reported and left alone. Outputs, ids and everything else are untouched; the file is written the way
nbformat writes it (what Jupyter writes), so a notebook with nothing to move is left byte-identical.
The site shows tags only as CSS classes (tag_nbval-ignore-output); JupyterLab shows them in the cell's
property inspector.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat

__all__ = ["MARKER_TAGS", "move_markers"]

# nbval's comment markers and the tag for each (nbval also accepts "raises-exception").
MARKER_TAGS = {
    "NBVAL_IGNORE_OUTPUT": "nbval-ignore-output",
    "NBVAL_CHECK_OUTPUT": "nbval-check-output",
    "NBVAL_RAISES_EXCEPTION": "nbval-raises-exception",
    "NBVAL_SKIP": "nbval-skip",
    "PYTEST_VALIDATE_IGNORE_OUTPUT": "nbval-ignore-output",
}
_MARKER = re.compile(r"^\s*#+\s*(" + "|".join(MARKER_TAGS) + r")\s*$")
_REASON = re.compile(r"^\s*#\s*\((.*)\)\s*$")


def move_markers(cell) -> list[str]:
    """Move the leading marker comments of one code cell into its tags; returns the markers moved."""
    lines = cell.source.split("\n")
    moved: list[str] = []
    while lines and _MARKER.match(lines[0]):
        moved.append(_MARKER.match(lines.pop(0)).group(1))
    if not moved:
        return moved
    reason = _REASON.match(lines[0]) if lines else None
    if reason:
        lines.pop(0)
        cell.metadata.setdefault("nbval", {})["reason"] = reason.group(1).strip()
    tags = list(cell.metadata.get("tags", []))
    for marker in moved:
        if MARKER_TAGS[marker] not in tags:
            tags.append(MARKER_TAGS[marker])
    cell.metadata["tags"] = tags
    cell.source = "\n".join(lines)
    return moved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a marker comment is left")
    args = parser.parse_args(argv)

    left = 0
    for path in args.notebooks:
        raw = path.read_text(encoding="utf-8")
        nb = nbformat.reads(raw, as_version=nbformat.NO_CONVERT)
        n_moved = 0
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            if args.check:
                leading = cell.source.split("\n", 1)[0]
                if _MARKER.match(leading):
                    print(f"{path}: cell {index} ({cell.get('id', '?')}): starts with {leading.strip()}")
                    left += 1
                continue
            n_moved += bool(move_markers(cell))
            for line in cell.source.split("\n"):
                if _MARKER.match(line):
                    print(f"{path}: cell {index}: marker not at the top, left as it is: {line.strip()}")
        if args.check:
            continue
        out = nbformat.writes(nb) + "\n"
        if out != raw:
            path.write_text(out, encoding="utf-8")
        print(f"{path}: {n_moved} cell(s) tagged")
    if args.check and left:
        print(f"{left} cell(s) still start with an nbval marker comment (run scripts/nbval_tags.py on them)")
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())

"""Build the corpus that ships with dsv3lib (chapter 0) from the running Python's own text.

    python scripts/build_corpus.py            # rewrite dsv3lib/corpus/ (prose.json.gz, code.json.gz, manifest)
    python scripts/build_corpus.py --check    # rebuild in memory and say whether the shipped files match

Run once; the files are committed, so every reader trains on the same bytes whatever Python they use.
The shipped files were built with CPython 3.11.7 (recorded in the manifest); building with another version
gives different text and therefore different losses, samples and counts in every chapter.

Domains (one gzip-compressed JSON object ``{name: text}`` per domain, documents in this order):
    prose  Python's bundled documentation topics, ``pydoc_data.topics.topics``, one document per topic,
           sorted by topic name.
    code   the source of ``CODE_MODULES``, a fixed list of pure-Python stdlib files, one document each,
           in list order.

``manifest.json`` records, per file, the SHA-256 of the compressed file (what ``dsv3lib.data`` verifies),
the SHA-256 of the uncompressed JSON and the document count, plus the Python version it was built with.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import platform
import sys
import sysconfig
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "dsv3lib" / "corpus"

# Paths relative to the stdlib folder; ~470 KB, about the size of the prose domain.
CODE_MODULES = (
    "abc.py", "base64.py", "bisect.py", "calendar.py", "colorsys.py", "contextlib.py", "copy.py",
    "csv.py", "fnmatch.py", "fractions.py", "functools.py", "glob.py", "graphlib.py", "heapq.py",
    "json/decoder.py", "json/encoder.py", "numbers.py", "operator.py", "pprint.py", "queue.py",
    "random.py", "reprlib.py", "sched.py", "shlex.py", "statistics.py", "string.py", "textwrap.py",
    "weakref.py",
)

NOTICE = """\
The corpus files in this folder (prose.json.gz, code.json.gz) are text taken from CPython {version}:
the documentation topics in Lib/pydoc_data/topics.py and the source of {n_code} standard-library modules
(listed in scripts/build_corpus.py). Copyright (c) 2001-2023 Python Software Foundation; All Rights Reserved.
They are distributed under the Python Software Foundation License Version 2 (PSF-2.0):
https://docs.python.org/3/license.html. The rest of dsv3lib is under the MIT License (see LICENSE).
"""


def prose_documents() -> dict[str, str]:
    from pydoc_data.topics import topics

    return {name: topics[name] for name in sorted(topics)}


def code_documents(modules: tuple[str, ...] = CODE_MODULES) -> dict[str, str]:
    root = sysconfig.get_paths()["stdlib"]
    docs = {}
    for rel in modules:
        path = os.path.join(root, rel)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"code corpus file {rel!r} not found in the stdlib folder {root!r}")
        with open(path, encoding="utf-8") as f:
            docs[rel] = f.read()
    return docs


def encode(docs: dict[str, str]) -> tuple[bytes, bytes]:
    """(uncompressed JSON, gzip of it); mtime=0 so the same text always gives the same file."""
    for name, text in docs.items():
        if "\0" in text:
            raise ValueError(f"document {name!r} contains NUL, which the tokenizer reserves as eot_id")
    text = json.dumps(docs, ensure_ascii=False, indent=0).encode("utf-8")
    return text, gzip.compress(text, compresslevel=9, mtime=0)


def build() -> tuple[dict[str, bytes], dict]:
    """The files to write (name -> bytes, manifest included) and the manifest itself."""
    sources = {"prose": (prose_documents(), "pydoc_data.topics.topics"),
               "code": (code_documents(), "stdlib sources, CODE_MODULES in scripts/build_corpus.py")}
    version = platform.python_version()
    files, entries = {}, {}
    for domain, (docs, source) in sources.items():
        text, blob = encode(docs)
        name = f"{domain}.json.gz"
        files[name] = blob
        entries[name] = {"domain": domain, "source": source, "documents": len(docs),
                         "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob),
                         "text_sha256": hashlib.sha256(text).hexdigest(), "text_bytes": len(text)}
    manifest = {"built_with": f"{platform.python_implementation()} {version}",
                "format": "gzip of a UTF-8 JSON object {document name: text}, documents in corpus order",
                "license": "PSF-2.0 (see NOTICE)", "files": entries}
    files["manifest.json"] = (json.dumps(manifest, indent=2) + "\n").encode("utf-8")
    files["NOTICE"] = NOTICE.format(version=version, n_code=len(CODE_MODULES)).encode("utf-8")
    return files, manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped files; write nothing")
    args = parser.parse_args(argv)
    files, manifest = build()
    if args.check:
        shipped = json.loads((OUT / "manifest.json").read_text(encoding="utf-8"))
        same = all(shipped["files"][n]["text_sha256"] == e["text_sha256"] for n, e in manifest["files"].items())
        print(f"{manifest['built_with']}: text {'matches' if same else 'DIFFERS from'} the shipped corpus "
              f"(built with {shipped['built_with']})")
        return 0 if same else 1
    OUT.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        (OUT / name).write_bytes(blob)
    for name, e in manifest["files"].items():
        print(f"{name}: {e['documents']} documents, {e['text_bytes']:,} bytes -> {e['bytes']:,} compressed")
    print(f"wrote {OUT} with {manifest['built_with']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

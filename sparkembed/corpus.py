"""The bundled sample corpus: real English text that ships with Python itself.

Rows come from the ``pydoc_data`` help topics, and from the docstrings of a fixed
set of standard-library modules, read with ``ast`` (nothing is imported or run).
Each module also gets one row holding all of its docstrings together: the big
modules make texts longer than 8191 tokens, the long-text case. A few rows are
null, empty or whitespace-only, the skipped case. Ids are stable names.

Usage: ``python -m sparkembed.corpus data/sample.parquet``
"""

from __future__ import annotations

import ast
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

MODULES = (
    "argparse", "asyncio/events", "asyncio/tasks", "base64", "bisect", "calendar", "collections/__init__",
    "concurrent/futures/_base", "configparser", "contextlib", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email/message", "enum", "fractions", "ftplib", "functools", "gettext",
    "glob", "gzip", "heapq", "http/client", "http/cookiejar", "imaplib", "inspect", "ipaddress",
    "json/__init__", "logging/__init__", "mailbox", "multiprocessing/pool", "nntplib",
    "optparse", "os", "pathlib", "pickle", "pydoc", "queue", "random", "shutil", "smtplib",
    "socket", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "tkinter/__init__", "turtle", "typing", "unittest/case", "urllib/parse",
    "urllib/request", "uuid", "zipfile/__init__", "zipfile",
)  # fmt: skip

MIN_DOC_CHARS = 40


def _topics() -> Iterator[tuple[str, str, str]]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"topic:{name}", name, topics[name]


def _module_docs(stdlib: Path, module: str) -> Iterator[tuple[str, str, str]]:
    path = stdlib / f"{module}.py"
    if not path.exists():
        return
    dotted = module.replace("/__init__", "").replace("/", ".")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    everything: list[str] = []
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, _DOC_NODES))]
    for node in nodes:
        doc = ast.get_docstring(node)
        if not doc or len(doc) < MIN_DOC_CHARS:
            continue
        name, line = (dotted, 0) if isinstance(node, ast.Module) else (f"{dotted}.{node.name}", node.lineno)
        everything.append(doc)
        yield f"doc:{name}:{line}", name, doc
    if everything:
        yield f"module:{dotted}", f"{dotted} (all docstrings)", "\n\n".join(everything)


_DOC_NODES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)

_BLANKS: tuple[tuple[str, str, str | None], ...] = (
    ("blank:null-1", "null text", None),
    ("blank:null-2", "null text", None),
    ("blank:empty-1", "empty text", ""),
    ("blank:spaces-1", "whitespace text", "   \n\t  "),
)


def build_corpus() -> pa.Table:
    """All rows, in a stable order, with columns id, title, source, text."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rows: dict[str, tuple[str, str, str | None]] = {}
    for row_id, title, text in _topics():
        rows[row_id] = (title, "pydoc_data", text)
    for module in MODULES:
        for row_id, title, text in _module_docs(stdlib, module):
            rows.setdefault(row_id, (title, f"stdlib:{module}", text))
    for row_id, title, blank in _BLANKS:
        rows[row_id] = (title, "blank", blank)
    ids = list(rows)
    return pa.table(
        {
            "id": ids,
            "title": [rows[i][0] for i in ids],
            "source": [rows[i][1] for i in ids],
            "text": pa.array([rows[i][2] for i in ids], pa.string()),
        }
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0] if args else "data/sample.parquet")
    out.parent.mkdir(parents=True, exist_ok=True)
    table = build_corpus()
    tmp = out.with_suffix(".tmp")
    pq.write_table(table, tmp)
    tmp.replace(out)
    longest = max(len(t or "") for t in table.column("text").to_pylist())
    print(f"sample corpus: {table.num_rows} rows, longest text {longest} chars -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Delete parquet files that no Delta commit references (orphans of failed attempts)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.fs as pafs

from sparkembed.sinks.deltars import load
from sparkembed.sinks.files import resolve_root


def vacuum_orphans(
    table_uri: str, *, prefix: str, keep: Iterable[str] = (), older_than_s: float = 0.0
) -> list[str]:
    """Delete files named ``prefix*`` under the table root that no commit references.

    They come from failed or speculative task attempts and from commits that failed.
    Files of the current snapshot, and files named by any add or remove in the JSON
    commit log, are kept, so time travel still works.

    Args:
        prefix: the file prefix of one run, e.g. its ``app_id``; never a prefix that a
            run still writing could use, unless ``older_than_s`` spares its files.
        keep: more relative paths to spare.
        older_than_s: only delete files last modified more than this many seconds ago.

    Returns:
        The relative paths deleted.
    """
    fs, root = resolve_root(table_uri)
    spared = set(keep) | _logged_paths(table_uri, fs, root)
    cutoff = time.time() - older_than_s
    removed = []
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        name = info.base_name
        if info.type != pafs.FileType.File or not name.startswith(prefix) or name in spared:
            continue
        if info.mtime is not None and info.mtime.timestamp() > cutoff:
            continue
        fs.delete_file(info.path)
        removed.append(name)
    return sorted(removed)


def _logged_paths(table_uri: str, fs: pafs.FileSystem, root: str) -> set[str]:
    """Relative paths of the current snapshot and of every add and remove in the JSON log."""
    table = load(table_uri)
    paths: set[str] = set()
    if table is not None:  # a checkpoint may have replaced the JSON that added these
        paths.update(pa.table(table.get_add_actions()).column("path").to_pylist())
    selector = pafs.FileSelector(f"{root}/_delta_log", allow_not_found=True)
    for info in fs.get_file_info(selector):
        if info.type != pafs.FileType.File or not info.base_name.endswith(".json"):
            continue
        with fs.open_input_stream(info.path) as stream:
            for line in stream.read().decode("utf-8").splitlines():
                action = json.loads(line) if line.strip() else {}
                for kind in ("add", "remove"):
                    if kind in action:
                        paths.add(action[kind]["path"])
    return {unquote(p) for p in paths}

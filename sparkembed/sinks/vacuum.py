"""Delete parquet files that sparkembed wrote and no Delta commit references.

They come from failed task attempts, from commits that lost a race, and from runs that
crashed. A file is deleted only when its name says a sparkembed run wrote it: this run's
id, or for older runs the full name pattern :data:`sparkembed.sinks.files.OWN_FILE_RE`
and an age past Delta's own 7-day VACUUM retention. Any other file is never touched.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.fs as pafs

from sparkembed.sinks.deltars import load
from sparkembed.sinks.files import OWN_FILE_RE, resolve_root

DELTA_RETENTION_S = 7 * 86_400
"""Delta's default ``delta.deletedFileRetentionDuration``: a writer's files younger than this
may still be about to be committed."""


def vacuum_after_run(table_uri: str, run_id: str) -> list[str]:
    """What a run deletes when it ends: uncommitted files that sparkembed runs wrote.

    This run's leftovers (failed task attempts, a lost race) go now. Another run's go
    once older than :data:`DELTA_RETENTION_S`, since a concurrent run may still be about
    to commit them. A file whose name is not sparkembed's is never touched, whatever its age.

    Returns:
        The relative paths deleted.
    """
    mine = vacuum_orphans(table_uri, prefix=f"part-{run_id}-", name=OWN_FILE_RE)
    older = vacuum_orphans(table_uri, prefix="part-", name=OWN_FILE_RE, older_than_s=DELTA_RETENTION_S)
    return sorted(mine + older)


def vacuum_orphans(
    table_uri: str,
    *,
    prefix: str,
    name: re.Pattern[str] | None = None,
    keep: Iterable[str] = (),
    older_than_s: float = 0.0,
) -> list[str]:
    """Delete files named ``prefix*`` (and matching ``name``) that no commit references.

    Files of the current snapshot, and files named by any add or remove in the JSON
    commit log, are kept, so time travel still works.

    Args:
        prefix: the file prefix of one run, e.g. its ``app_id``; never a prefix that a
            run still writing could use, unless ``older_than_s`` spares its files.
        name: the whole file name must match this too.
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
        base = info.base_name
        if info.type != pafs.FileType.File or not base.startswith(prefix) or base in spared:
            continue
        if name is not None and not name.match(base):
            continue
        if info.mtime is not None and info.mtime.timestamp() > cutoff:
            continue
        fs.delete_file(info.path)
        removed.append(base)
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

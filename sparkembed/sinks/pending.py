"""Deferred upserts through delta-rs: waves append to a pending table, one commit applies them.

An upsert wave used to rewrite every target file holding one of its replaced ids. With ids
spread by hash, that is nearly every file, once per wave: a rerun changing 10 % of the rows
in 20 waves wrote the table about nine times over. Instead, the waves of a run append the
rows that replace old ones to a pending table beside the target (:func:`pending_location`),
and :func:`apply_pending` replaces, in ONE target commit, every old row of each pending id
by the pending rows: each touched target file is rewritten once per run, whatever the
number of waves.

Readers of the target see it as it was until that commit, then the new rows: never two
live rows for one (id, chunk_index). A run that crashes leaves the pending table; the next
run applies it first (:func:`apply_pending` is idempotent, by the pending table's id and
version), so what the crashed run embedded is in the target before planning, and is not
paid for again.

Example::

    pending = pending_location("/lake/docs_vectors")   # /lake/docs_vectors__sparkembed_pending
    ...  # waves: commit_files(pending, files, mode="append", ...)
    version = apply_pending("/lake/docs_vectors", id_col="id", expected_version=12)
"""

from __future__ import annotations

import logging

import pyarrow as pa

from sparkembed.sinks.deltars import already_committed, load
from sparkembed.sinks.migration import copy_files, drop_staging
from sparkembed.sinks.upsert import upsert_files

log = logging.getLogger(__name__)

PENDING_SUFFIX = "__sparkembed_pending"
"""Appended to the target's last name: ``/lake/t`` → ``/lake/t__sparkembed_pending``."""


def pending_location(target: str) -> str:
    """The pending table of ``target``: a sibling folder (path) or a sibling table (catalog name)."""
    return target.rstrip("/\\") + PENDING_SUFFIX


def apply_pending(
    target_uri: str, *, id_col: str, run_id: str, expected_version: int | None = None
) -> int | None:
    """Replace every target row of each id in the pending table by its pending rows, in one
    commit, then drop the pending table.

    The pending files are copied into the target folder; the commit adds them, and rewrites
    each target file holding a pending id once, without that id's rows
    (:func:`~sparkembed.sinks.upsert.upsert_files`). It carries the transaction
    ``(sparkembed-apply-<pending table id>, <pending version>)``: after a crash between the
    commit and the drop, a second call only drops.

    Args:
        run_id: the run applying; rewritten files are named ``part-<run_id>-apply-rw…``, so
            its :func:`~sparkembed.sinks.vacuum_after_run` removes those of a failed apply.
        expected_version: the target version this run last saw; another writer's commit
            since then fails the apply (nothing applied, the pending table kept).

    Returns:
        The target's version after the apply, or None when there was no pending table.

    Raises:
        ConcurrentWriteError: another writer committed to the target first.
    """
    pending_uri = pending_location(target_uri)
    pending = load(pending_uri)
    if pending is None:
        drop_staging(pending_uri)  # a first pending commit that never landed leaves files only
        return None
    app_id, version = f"sparkembed-apply-{pending.metadata().id}", pending.version()
    target = load(target_uri)
    if target is not None and already_committed(target, app_id, version):
        drop_staging(pending_uri)
        return target.version()
    schema = pa.schema(pending.schema().to_arrow())
    files = copy_files(pending, pending_uri, target_uri, schema)
    applied = upsert_files(
        target_uri, files, schema=schema, id_col=id_col, app_id=app_id, version=version,
        rewrite_prefix=f"part-{run_id}-apply-rw",
        expected_version=expected_version,
    )  # fmt: skip
    log.info("applied %d pending file(s) to %s (version %d)", len(files), target_uri, applied)
    drop_staging(pending_uri)
    return applied

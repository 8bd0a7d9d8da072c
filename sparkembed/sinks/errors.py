"""Errors the Delta sinks raise (candidates to move into ``sparkembed.errors``).

SparkEmbedError
 └── DeltaSinkError           the target cannot take this commit as asked
      ├── ConcurrentWriteError another writer committed to the target first
      └── TargetSchemaError    the rows' schema differs from the target's
"""

from __future__ import annotations

from sparkembed.errors import SparkEmbedError


class DeltaSinkError(SparkEmbedError):
    """The Delta target cannot take this commit as asked."""


class ConcurrentWriteError(DeltaSinkError):
    """Another writer changed the target since this run last read it.

    Nothing of this commit was applied; its files are orphans that
    :func:`sparkembed.sinks.vacuum_orphans` can delete. Rerun when the other
    run has finished: the rerun embeds only what is still missing.
    """


class TargetSchemaError(DeltaSinkError):
    """Appending or upserting rows whose columns differ from the target's."""

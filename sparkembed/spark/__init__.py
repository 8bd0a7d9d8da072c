"""Spark glue: the notebook API, the driver's run in waves, planning, the per-partition job,
the wave writers, targets, sources, the session and secrets.

Executors run :mod:`.partition` (and :mod:`.writers`' task side); everything else runs on
the driver.
"""

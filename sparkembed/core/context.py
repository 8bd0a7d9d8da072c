"""What the driver learns or decides for one run, beside what the user wrote.

:class:`~sparkembed.config.EmbedConfig` holds only the user's settings. A
:class:`RunContext` holds the runtime facts: the run id, how many tasks share the quota,
and what the service said it runs (the preflight). The driver builds it and ships it
to every task with the config.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunContext:
    """Runtime facts of one run.

    Attributes:
        run_id: names the run's rows, files and logs ("" outside a run).
        workers: concurrent tasks sharing the quota (the cluster's task slots, or fewer).
        served_model: the model the service reported in the preflight.
        served_dimensions: the vector size the service answered in the preflight.
        tokens_left: prompt tokens the tasks of this wave may bill together (the run's cap,
            less what earlier waves billed); None: no cap (:mod:`sparkembed.core.budget`).
    """

    run_id: str = ""
    workers: int = 1
    served_model: str | None = None
    served_dimensions: int | None = None
    tokens_left: int | None = None

    @property
    def quota_share(self) -> float:
        """The part of ``limits.tokens_per_minute`` / ``requests_per_minute`` one task may use."""
        return 1.0 / max(1, self.workers)

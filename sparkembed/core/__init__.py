"""The pure core: rows to requests, limits, retries, tokens, and the engine that runs them.

Nothing here imports pyspark, an HTTP client, an Azure SDK or Delta (the import contract
in pyproject.toml checks it): the engine talks to the service through the
:class:`sparkembed.core.types.Backend` protocol that :mod:`sparkembed.backends` implements.
"""

"""The local Azure-like embeddings endpoint (``sparkembed serve``).

``start_local_endpoint`` runs it in a child process; the server itself lives in ``app``.
"""

from sparkembed.server.launch import LocalEndpoint, start_local_endpoint

__all__ = ["LocalEndpoint", "start_local_endpoint"]

"""Every error sparkembed raises.

    SparkEmbedError
     ├── ConfigError              bad config or flags; raised before any money is spent
     │    ├── InputError          bad source: missing column, null or duplicate ids
     │    ├── EndpointConfigError the service refused the setup (401/403/404/422); names the fix
     │    └── BudgetError         the run's estimate is over run.max_tokens / run.max_cost_usd
     ├── QuotaExhaustedError      a 429 asked to wait longer than retry.max_wait_s
     ├── ServiceError             one request's non-2xx answer (status, code, message)
     └── TransportError          timeout or dropped connection (no HTTP answer)

Messages never carry a key or token: they are built from status, code and the
service's message only, never from request headers.
"""

from __future__ import annotations


class SparkEmbedError(Exception):
    """Base of all sparkembed errors."""


class ConfigError(SparkEmbedError):
    """The configuration or command line is wrong; fix it and rerun."""


class InputError(ConfigError):
    """The source table cannot be embedded as given."""


class EndpointConfigError(ConfigError):
    """The endpoint refused the setup itself (auth, deployment, parameters)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class BudgetError(ConfigError):
    """The run's estimate is over its token or cost cap (and ``--allow-partial`` was not given)."""


class QuotaExhaustedError(SparkEmbedError):
    """The deployment's quota is used up for longer than ``retry.max_wait_s``."""


class ServiceError(SparkEmbedError):
    """A non-2xx answer for one request.

    Args:
        status: HTTP status code.
        code: the service's error code, e.g. ``context_length_exceeded``.
        message: the service's error message.
        retry_after_s: seconds the service asked us to wait, if it said.
    """

    def __init__(
        self,
        status: int,
        code: str | None,
        message: str,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"{status} {code or 'error'}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


class TransportError(SparkEmbedError):
    """No HTTP answer: timeout, reset or refused connection.

    Attributes:
        unreachable: no connection could be made at all (host not found, connection
            refused): a wrong ``endpoint.url`` is the likely cause, so the preflight does not
            retry it.
    """

    def __init__(self, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


class SparkConnectError(SparkEmbedError):
    """A Spark Connect server refused or failed a request, or could not be reached.

    Raised in place of pyspark's Connect exceptions and raw ``grpc.RpcError`` at the API
    boundary; the original is its ``__cause__``. The message is the error's first line
    (its class and message, without the JVM stack trace), with any token in it hidden.
    """

"""Where secrets may travel, and keeping them out of logs.

- :func:`check_endpoint_url`: the key or token goes over HTTPS, or over plain HTTP to
  this machine only (loopback); ``endpoint.allow_insecure_http`` lifts that for test rigs.
- :class:`RedactingTraceLoggingPolicy`: azure-core's HTTP trace (``logging_enable=True``
  with DEBUG logging) prints every request header; this one prints auth headers as
  ``REDACTED``.
- :func:`env_proxies`: the proxy the environment names for the endpoint, looked up once per
  client; aiohttp's own lookup (``trust_env``) runs in a worker thread on every request.
- :func:`hide_bridge_traffic`: py4j logs every driver-to-JVM command at DEBUG, and the
  commands carry pickled task closures, which hold the API key (base64 encoded). The
  command is summarised instead.

    check_endpoint_url("http://10.0.0.5/models", allow_insecure_http=False)  # ConfigError

Pure core: imports neither pyspark nor py4j (only the names of py4j's loggers).
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

from azure.core.pipeline import PipelineRequest
from azure.core.pipeline.policies import NetworkTraceLoggingPolicy

from sparkembed.errors import ConfigError

log = logging.getLogger(__name__)

SECRET_HEADERS = frozenset(
    {"authorization", "api-key", "ocp-apim-subscription-key", "proxy-authorization", "cookie"}
)
"""Request headers whose values are credentials (compared lower-case)."""
PY4J_LOGGERS = ("py4j.clientserver", "py4j.java_gateway")
"""The loggers py4j writes each command and answer to, at DEBUG."""
_BRIDGE_PREFIXES = ("Command to send:", "Answer received:")


def check_endpoint_url(url: str | None, *, allow_insecure_http: bool = False) -> None:
    """Refuse an endpoint that would send the key or token in clear text over a network.

    Args:
        url: ``endpoint.url``; ``local`` (the bundled endpoint, started on loopback) passes.
        allow_insecure_http: ``endpoint.allow_insecure_http``: allow plain HTTP to any host.

    Raises:
        ConfigError: unset, not http(s), no host, credentials inside the URL, or plain HTTP to a
            host that is not loopback (127.0.0.0/8, ::1, localhost) without the flag. The
            message names ``endpoint.allow_insecure_http``; it never repeats a password.
    """
    if url == "local":
        return
    if not url:
        raise ConfigError(
            "no endpoint: set endpoint.url, pass --endpoint URL, or export AZURE_INFERENCE_ENDPOINT"
        )
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            "endpoint.url must not hold credentials (user:password@host); "
            "give the key through auth.key_env or use auth.mode: entra"
        )
    if scheme not in ("http", "https"):
        raise ConfigError(f"endpoint.url must be an https URL, got scheme {scheme or 'none'!r}")
    host = parts.hostname
    if not host:
        raise ConfigError(f"endpoint.url {url!r} has no host")
    if scheme == "https" or is_loopback(host):
        return
    if not allow_insecure_http:
        raise ConfigError(
            f"endpoint.url {url!r} is plain http to {host!r}, which is not loopback: the key "
            "or token would cross the network unencrypted. Use https, or set "
            "endpoint.allow_insecure_http: true (test rigs only)"
        )
    log.warning("endpoint %s is plain http (endpoint.allow_insecure_http is set)", url)


def env_proxies(url: str) -> dict[str, str]:
    """azure-core's ``proxies`` for ``url`` from HTTP(S)_PROXY and NO_PROXY, as aiohttp's
    ``trust_env`` reads them: ``{scheme: proxy}``, or empty when none applies."""
    parts = urlsplit(url)
    proxy = getproxies().get(parts.scheme)
    if not proxy or (parts.hostname and proxy_bypass(parts.hostname)):
        return {}
    return {parts.scheme: proxy}


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine: ``localhost``, 127.0.0.0/8 or ::1 (also IPv4-mapped)."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # a DNS name: it may resolve anywhere
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


class RedactingTraceLoggingPolicy(NetworkTraceLoggingPolicy):
    """azure-core's network trace, with the values of :data:`SECRET_HEADERS` shown as ``REDACTED``.

    The trace runs after the auth policy, so the real headers are on the request: they
    are swapped out while the trace is written and put back before it is sent.
    """

    def on_request(self, request: PipelineRequest[Any]) -> None:
        headers = request.http_request.headers
        hidden = {name: headers[name] for name in list(headers) if name.lower() in SECRET_HEADERS}
        for name in hidden:
            headers[name] = "REDACTED"
        try:
            super().on_request(request)
        finally:
            headers.update(hidden)


class _BridgeTrafficFilter(logging.Filter):
    """Replaces py4j's DEBUG dump of a command or answer with its length."""

    def filter(self, record: logging.LogRecord) -> bool:
        # py4j formats the command into msg itself; checking msg first keeps this cheap.
        if not (isinstance(record.msg, str) and record.msg.startswith(_BRIDGE_PREFIXES)):
            return True
        message = record.getMessage()
        for prefix in _BRIDGE_PREFIXES:
            if message.startswith(prefix):
                size = len(message) - len(prefix)
                record.msg = f"{prefix} <{size} characters hidden by sparkembed: may hold secrets>"
                record.args = ()
        return True


_BRIDGE_FILTER = _BridgeTrafficFilter()


def hide_bridge_traffic() -> None:
    """Keep py4j's DEBUG log of driver-to-JVM commands from showing task closures. Idempotent.

    Call on the driver before a task closure holding a secret goes to the JVM.
    """
    for name in PY4J_LOGGERS:
        logger = logging.getLogger(name)
        if _BRIDGE_FILTER not in logger.filters:
            logger.addFilter(_BRIDGE_FILTER)

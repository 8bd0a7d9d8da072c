"""Settings of one local endpoint process (built by ``__main__`` from the command line)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sparkembed.server.quota import LimiterModel


@dataclass(frozen=True)
class ServerSettings:
    """Everything ``sparkembed serve`` can be told.

    Attributes:
        host: interface to bind; loopback by default.
        port: TCP port; 0 picks a free one.
        model: ``wordllama`` or ``hash``.
        dimensions: default vector size (hash default 1536, wordllama 256).
        key: the accepted API key, or None. Never shown in repr or logs.
        no_auth: accept every request, with or without credentials.
        accept_token_prefix: also accept bearer tokens starting with this prefix.
        deployments: deployment names served under ``/openai/deployments/{name}``; empty
            accepts any name, otherwise others get 404 DeploymentNotFound.
        max_inputs: most inputs in one request.
        max_input_tokens: most tokens in one input.
        tokens_per_minute: TPM quota, or None for unlimited.
        requests_per_minute: RPM quota (enforced per 10 s), or None for unlimited.
        limiter: how both quotas are metered: ``token-bucket``, ``sliding-window`` or
            ``fixed-window`` (see :mod:`sparkembed.server.quota`).
        tpm_jitter: the TPM limit wanders within ± this fraction (e.g. 0.05), seeded by ``seed``.
        window_scale: multiplies the 60 s and 10 s quota windows, so tests run in seconds.
        quota_headers: send ``x-ratelimit-remaining-tokens`` / ``-requests``; off models a
            service that never says what is left, so a client learns only from 429s.
        latency_ms: milliseconds added to every response.
        error_rate: fraction of requests answered 500 or 503.
        reset_rate: fraction of requests whose connection is dropped with no response.
        slow_rate: fraction of requests delayed by ``slow_ms`` after billing.
        slow_ms: milliseconds of delay for slow requests.
        shuffle: return ``data`` in a shuffled order (clients must place by ``index``).
        seed: seed for fault draws and shuffles; None draws a random one.
        fail_texts: inputs containing any of these substrings get a 400 invalid_input.
        access_log: log one line per request to stderr (never headers, so never keys).
    """

    host: str = "127.0.0.1"
    port: int = 0
    model: str = "wordllama"
    dimensions: int | None = None
    key: str | None = field(default=None, repr=False)
    no_auth: bool = False
    accept_token_prefix: str | None = field(default=None, repr=False)
    deployments: tuple[str, ...] = ()
    max_inputs: int = 2048
    max_input_tokens: int = 8191
    tokens_per_minute: int | None = None
    requests_per_minute: int | None = None
    limiter: LimiterModel = "token-bucket"
    tpm_jitter: float = 0.0
    window_scale: float = 1.0
    quota_headers: bool = True
    latency_ms: float = 0.0
    error_rate: float = 0.0
    reset_rate: float = 0.0
    slow_rate: float = 0.0
    slow_ms: float = 0.0
    shuffle: bool = False
    seed: int | None = None
    fail_texts: tuple[str, ...] = ()
    access_log: bool = False

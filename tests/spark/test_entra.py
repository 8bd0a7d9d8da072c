"""Entra ID auth: credential types, custom factories, token refresh, tokens minted on executors.

The local endpoint accepts bearer tokens with the fake credential's prefix
(``--accept-token-prefix``) and counts distinct ones in ``/_stats`` ``bearer_tokens_seen``.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakes
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from azure.identity import aio as identity
from pyspark.sql import SparkSession
from support import build_config

from sparkembed.backends import make_backend
from sparkembed.backends.azure_inference import AzureInferenceBackend
from sparkembed.backends.credentials import SyncCredentialAdapter, build_credential
from sparkembed.config import COGNITIVE_SERVICES_SCOPE, AuthConfig, EmbedConfig
from sparkembed.core.engine import Embedder
from sparkembed.errors import ConfigError, EndpointConfigError
from sparkembed.server.launch import LocalEndpoint
from sparkembed.server.models import HashModel
from sparkembed.sinks import read_table
from sparkembed.spark import driver

DIMS = 32
TESTS_DIR = str(Path(__file__).resolve().parents[1])  # where fakes.py is
ENTRA = {"mode": "entra", "credential": "custom", "credential_factory": "fakes:make_credential"}


def entra_config(url: str, **sections: dict[str, Any]) -> EmbedConfig:
    retry = {"backoff_initial_s": 0.05, "backoff_max_s": 0.5}
    return build_config({"endpoint": {"url": url}, "auth": ENTRA, "retry": retry}, sections)


def close(credential: Any) -> None:
    asyncio.run(credential.close())


@pytest.fixture(scope="module")
def entra_endpoint(start_endpoint: Any) -> Iterator[LocalEndpoint]:
    endpoint = start_endpoint(
        "--model", "hash", "--dims", str(DIMS), "--accept-token-prefix", fakes.TOKEN_PREFIX
    )
    yield endpoint
    endpoint.stop()


# -- credential types -----------------------------------------------------------------


def test_default_credential_is_default_azure_credential() -> None:
    credential = build_credential(AuthConfig(mode="entra"))
    assert isinstance(credential, identity.DefaultAzureCredential)
    close(credential)


def test_managed_identity_uses_the_client_id() -> None:
    credential = build_credential(AuthConfig(mode="entra", credential="managed_identity", client_id="abc"))
    assert isinstance(credential, identity.ManagedIdentityCredential)
    close(credential)


def test_client_secret_reads_azure_identity_variables() -> None:
    env = {"AZURE_TENANT_ID": "tenant-1", "AZURE_CLIENT_ID": "client-1", "AZURE_CLIENT_SECRET": "s3cret"}
    credential = build_credential(AuthConfig(mode="entra", credential="client_secret"), environ=env)
    assert isinstance(credential, identity.ClientSecretCredential)
    close(credential)


def test_client_secret_names_missing_variables_never_values() -> None:
    env = {"AZURE_TENANT_ID": "tenant-1", "AZURE_CLIENT_ID": "client-1"}
    with pytest.raises(ConfigError) as caught:
        build_credential(AuthConfig(mode="entra", credential="client_secret"), environ=env)
    assert str(caught.value) == (
        "auth.credential is 'client_secret' but $AZURE_CLIENT_SECRET is not set in this process "
        "(executors need it too)"
    )


def test_workload_identity_needs_token_file(tmp_path: Path) -> None:
    env = {"AZURE_TENANT_ID": "t", "AZURE_CLIENT_ID": "c"}
    with pytest.raises(ConfigError, match=r"\$AZURE_FEDERATED_TOKEN_FILE is not set"):
        build_credential(AuthConfig(mode="entra", credential="workload_identity"), environ=env)
    token_file = tmp_path / "token"
    token_file.write_text("jwt")
    env["AZURE_FEDERATED_TOKEN_FILE"] = str(token_file)
    credential = build_credential(AuthConfig(mode="entra", credential="workload_identity"), environ=env)
    assert isinstance(credential, identity.WorkloadIdentityCredential)
    close(credential)


def test_custom_factory_async_credential_is_used_as_is() -> None:
    credential = build_credential(AuthConfig(**ENTRA))
    assert isinstance(credential, fakes.ShortLivedCredential)


def test_custom_factory_sync_credential_is_wrapped() -> None:
    auth = AuthConfig(mode="entra", credential="custom", credential_factory="fakes:make_sync_credential")
    credential = build_credential(auth)
    assert isinstance(credential, SyncCredentialAdapter)
    token = asyncio.run(credential.get_token(COGNITIVE_SERVICES_SCOPE))
    assert token.token.startswith(fakes.TOKEN_PREFIX)
    close(credential)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (None, "auth.credential_factory None is not 'module:function'"),
        ("fakes", "auth.credential_factory 'fakes' is not 'module:function'"),
        ("no_such_module_xyz:f", "cannot import auth.credential_factory 'no_such_module_xyz:f'"),
        ("fakes:missing", "cannot import auth.credential_factory 'fakes:missing'"),
        ("fakes:broken_factory", "'fakes:broken_factory' failed: RuntimeError: no identity available"),
        ("fakes:not_a_credential", "'fakes:not_a_credential' returned a object, which has no get_token"),
    ],
)
def test_bad_factories_are_config_errors(factory: str | None, message: str) -> None:
    auth = AuthConfig(mode="entra", credential="custom", credential_factory=factory)
    with pytest.raises(ConfigError) as caught:
        build_credential(auth)
    assert message in str(caught.value)


# -- over HTTP: scope, refresh, refusal -------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize(("lifetime_s", "one_token_per_request"), [(3600.0, False), (120.0, True)])
def test_tokens_refresh_within_five_minutes_of_expiry(
    entra_endpoint: LocalEndpoint, lifetime_s: float, one_token_per_request: bool
) -> None:
    entra_endpoint.reset()
    config = entra_config(entra_endpoint.url, batching={"max_inputs": 10}, limits={"concurrency": 4})
    credential = fakes.ShortLivedCredential(lifetime_s=lifetime_s)
    embedder = Embedder(config, AzureInferenceBackend(config, credential=credential))
    texts = [f"text number {i}" for i in range(200)]
    results = embedder.embed(texts)
    embedder.close()

    assert list(results.status) == ["ok"] * 200
    want = HashModel(DIMS).embed(texts, [], DIMS, "text")
    assert np.array_equal(results.vectors, want)
    stats = entra_endpoint.stats(billed=False)
    assert stats["ok_requests"] == 20
    # A token with more than ~5 minutes left is reused; one closer to expiry is replaced
    # before every request. Every token the credential issued reached the server.
    assert credential.issued == (20 if one_token_per_request else 1)
    assert stats["bearer_tokens_seen"] == credential.issued
    assert set(credential.scopes) == {(COGNITIVE_SERVICES_SCOPE,)}
    assert not credential.closed  # passed in: the caller owns it


@pytest.mark.integration
def test_configured_scope_is_requested(entra_endpoint: LocalEndpoint) -> None:
    config = entra_config(entra_endpoint.url, auth={"scope": "api://custom/.default"})
    credential = fakes.ShortLivedCredential()
    embedder = Embedder(config, AzureInferenceBackend(config, credential=credential))
    embedder.preflight()
    embedder.close()
    assert credential.scopes == [("api://custom/.default",)]


@pytest.mark.integration
def test_refused_token_is_a_config_error_without_the_token(start_endpoint: Any) -> None:
    endpoint = start_endpoint("--model", "hash", "--dims", str(DIMS), "--accept-token-prefix", "other-")
    config = entra_config(endpoint.url, retry={"max_attempts": 2})
    credential = fakes.ShortLivedCredential()
    embedder = Embedder(config, AzureInferenceBackend(config, credential=credential))
    with pytest.raises(EndpointConfigError) as caught:
        embedder.preflight()
    embedder.close()
    assert caught.value.status == 401
    assert fakes.TOKEN_PREFIX not in str(caught.value)
    assert "Cognitive Services User" in str(caught.value)
    endpoint.stop()


def test_entra_over_plain_http_to_another_host_is_refused() -> None:
    config = entra_config("http://10.1.2.3:8080/models")
    with pytest.raises(ConfigError, match="endpoint.allow_insecure_http"):
        AzureInferenceBackend(config)


# -- Spark: each executor process builds its own credential -----------------------------


@pytest.fixture
def executor_env(spark: SparkSession, tmp_path: Path) -> Iterator[Path]:
    """Executors import ``fakes`` and record their events to a file; restored afterwards.

    ``SparkContext.environment`` reaches the Python workers of every later job (it is
    what ``spark.executorEnv.*`` fills), even on a session that already runs.
    """
    events = tmp_path / "events.jsonl"
    environment = spark.sparkContext.environment
    saved = dict(environment)
    environment["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS_DIR, saved.get("PYTHONPATH")) if p)
    environment[fakes.EVENTS_ENV] = str(events)
    os.environ[fakes.EVENTS_ENV] = str(events)  # the driver's preflight records too
    yield events
    os.environ.pop(fakes.EVENTS_ENV, None)
    environment.clear()
    environment.update(saved)


@pytest.mark.spark
@pytest.mark.integration
def test_spark_job_in_entra_mode_executors_mint_their_own_tokens(
    spark: SparkSession, entra_endpoint: LocalEndpoint, executor_env: Path, tmp_path: Path
) -> None:
    entra_endpoint.reset()
    texts = [f"row {i} about lakes and rivers" for i in range(400)]
    source = tmp_path / "source.parquet"
    pq.write_table(pa.table({"id": list(range(400)), "text": texts}), source)
    target = tmp_path / "target"
    config = entra_config(
        entra_endpoint.url,
        source={"path": str(source)},
        target={"path": str(target)},
        batching={"max_inputs": 20},
        limits={"concurrency": 2},
        run={"partitions": 2, "log_dir": str(tmp_path / "runs")},
    )

    summary = driver.run(spark, config, progress=lambda line: None)

    assert summary.counts["ok_rows"] == 400
    table = read_table(str(target))
    assert sorted(table.column("status").to_pylist()) == ["ok"] * 400
    events = fakes.read_events(executor_env)
    factories = Counter(e["pid"] for e in events if e["event"] == "factory")
    tokens = Counter(e["pid"] for e in events if e["event"] == "token")
    driver_pid = os.getpid()
    executors = set(factories) - {driver_pid}
    # One credential per process: the driver's preflight, and each executor's own.
    assert factories[driver_pid] == 1
    assert executors and all(factories[pid] == 1 for pid in executors)
    # Executors fetched tokens themselves, a fresh one per request (2 s tokens).
    assert sum(tokens[pid] for pid in executors) >= 20
    stats = entra_endpoint.stats(billed=False)
    assert stats["bearer_tokens_seen"] == sum(tokens.values()) == stats["requests"]
    assert {tuple(e["scopes"]) for e in events if e["event"] == "token"} == {(COGNITIVE_SERVICES_SCOPE,)}


@pytest.mark.integration
def test_credential_without_a_token_stops_the_preflight_at_once(entra_endpoint: LocalEndpoint) -> None:
    entra_endpoint.reset()
    config = entra_config(entra_endpoint.url, auth={"credential_factory": "fakes:unavailable_credential"})
    embedder = Embedder(config, make_backend(config))
    with pytest.raises(EndpointConfigError) as caught:
        embedder.preflight()
    embedder.close()
    assert caught.value.status == 401
    assert str(caught.value).startswith(
        "401 credential_unavailable: ClientAuthenticationError: ManagedIdentityCredential: "
        "no identity endpoint found. Fix: "
    )
    assert entra_endpoint.stats(billed=False)["requests"] == 0  # no request, no retries

"""Credentials for the backends: an API key, or a Microsoft Entra ID token credential."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
from collections.abc import Mapping
from typing import Any

from sparkembed.config import AuthConfig
from sparkembed.errors import ConfigError


def build_credential(auth: AuthConfig, *, environ: Mapping[str, str] | None = None) -> Any:
    """The credential for ``auth``: a key, a dummy key for ``none``, or an async Entra credential.

    Entra credentials are built in the process that uses them (each executor's backend),
    since azure-identity caches tokens per instance, in memory.

    Args:
        auth: the auth section.
        environ: where ``client_secret`` reads AZURE_TENANT_ID, AZURE_CLIENT_ID and
            AZURE_CLIENT_SECRET (default ``os.environ``), as azure-identity names them.

    Raises:
        ConfigError: no key resolved, missing environment variables (named, never their
            values), or a ``credential_factory`` that cannot be imported or called.
    """
    from azure.core.credentials import AzureKeyCredential

    if auth.mode == "key":
        if auth.key is None:
            raise ConfigError("auth.mode is 'key' but no key was resolved (see auth.key_env)")
        return AzureKeyCredential(auth.key.get_secret_value())
    if auth.mode == "none":
        return AzureKeyCredential("unused")  # the SDK insists on a credential
    if auth.credential == "custom":
        return load_credential(auth.credential_factory)
    from azure.identity import aio as identity

    env = os.environ if environ is None else environ
    if auth.credential == "managed_identity":
        return identity.ManagedIdentityCredential(client_id=auth.client_id)  # None: system-assigned
    if auth.credential == "workload_identity":
        _require_env(env, "workload_identity", "AZURE_TENANT_ID", "AZURE_FEDERATED_TOKEN_FILE")
        if not auth.client_id:
            _require_env(env, "workload_identity", "AZURE_CLIENT_ID")
        return identity.WorkloadIdentityCredential(
            tenant_id=env["AZURE_TENANT_ID"],
            client_id=auth.client_id or env["AZURE_CLIENT_ID"],
            token_file_path=env["AZURE_FEDERATED_TOKEN_FILE"],
        )
    if auth.credential == "client_secret":
        _require_env(env, "client_secret", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET")
        if not auth.client_id:
            _require_env(env, "client_secret", "AZURE_CLIENT_ID")
        return identity.ClientSecretCredential(
            env["AZURE_TENANT_ID"], auth.client_id or env["AZURE_CLIENT_ID"], env["AZURE_CLIENT_SECRET"]
        )
    if auth.client_id:
        return identity.DefaultAzureCredential(managed_identity_client_id=auth.client_id)
    return identity.DefaultAzureCredential()


def load_credential(factory: str | None) -> Any:
    """Call the ``module:function`` named by ``auth.credential_factory``; async-wrap a sync result.

    Raises:
        ConfigError: unset, malformed, not importable, failing, or not a TokenCredential.
    """
    where = f"auth.credential_factory {factory!r}"
    module_name, _, attribute = (factory or "").partition(":")
    if not (module_name and attribute):
        raise ConfigError(
            f"auth.credential is 'custom' but {where} is not 'module:function' "
            "(a zero-argument callable returning a TokenCredential)"
        )
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import {where} in this process: {exc}") from exc
    try:
        credential = target()
    except Exception as exc:  # the user's code: any failure means no credential
        raise ConfigError(f"{where} failed: {type(exc).__name__}: {str(exc)[:300]}") from exc
    get_token = getattr(credential, "get_token", None)
    if get_token is None:
        raise ConfigError(f"{where} returned a {type(credential).__name__}, which has no get_token")
    return credential if inspect.iscoroutinefunction(get_token) else SyncCredentialAdapter(credential)


class SyncCredentialAdapter:
    """An async TokenCredential over a sync one, for the aio client.

    ``get_token`` runs in a worker thread, so a slow token endpoint never stalls the
    event loop that carries every request of the process.
    """

    def __init__(self, credential: Any) -> None:
        self._credential = credential

    async def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        return await asyncio.to_thread(self._credential.get_token, *scopes, **kwargs)

    async def close(self) -> None:
        close = getattr(self._credential, "close", None)
        if close is not None:
            await asyncio.to_thread(close)

    async def __aenter__(self) -> SyncCredentialAdapter:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _require_env(env: Mapping[str, str], credential: str, *names: str) -> None:
    missing = [name for name in names if not env.get(name)]
    if missing:
        raise ConfigError(
            f"auth.credential is {credential!r} but {', '.join('$' + n for n in missing)} "
            "is not set in this process (executors need it too)"
        )


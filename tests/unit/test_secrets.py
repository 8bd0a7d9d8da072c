"""Driver-side key resolution: env, Databricks secret scopes, Key Vault via notebookutils.

The platforms' utilities are faked at their real seams: ``dbutils`` through
``_find_dbutils`` or a notebook's IPython namespace, ``notebookutils``/``mssparkutils``
as modules in ``sys.modules``.
"""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import SecretStr

from sparkembed.config import AuthConfig, EmbedConfig
from sparkembed.errors import ConfigError
from sparkembed.spark import secrets
from sparkembed.spark.secrets import apply_secret, resolve_key

KEY = "sk-distinctive-0123456789abcdef"
VAULT = "https://kv-embed.vault.azure.net/"


class FakeDbutils:
    """``dbutils`` with only ``secrets.get``; records each call."""

    def __init__(self, store: dict[tuple[str, str], str]) -> None:
        self.calls: list[tuple[str, str]] = []
        self.secrets = types.SimpleNamespace(get=self._get)
        self._store = store

    def _get(self, *, scope: str, key: str) -> str:
        self.calls.append((scope, key))
        if (scope, key) not in self._store:
            # The runtime's own wording, which names scope and key only.
            raise RuntimeError(f"Secret does not exist with scope: {scope} and key: {key}")
        return self._store[(scope, key)]


def fake_get_secret(store: dict[str, str], calls: list[tuple[Any, ...]]) -> Callable[..., str]:
    def get_secret(*args: Any) -> str:
        calls.append(args)
        if args[1] not in store:
            raise RuntimeError(f"Secret {args[1]} not found in {args[0]}")
        return store[args[1]]

    return get_secret


def module(name: str, **attributes: Any) -> types.ModuleType:
    mod = types.ModuleType(name)
    for attribute, value in attributes.items():
        setattr(mod, attribute, value)
    return mod


@pytest.fixture(autouse=True)
def no_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts off-platform: no notebook shell, no notebookutils/mssparkutils."""
    for name in ("IPython", "notebookutils", "mssparkutils"):
        monkeypatch.setitem(sys.modules, name, None)  # None makes `import name` fail


def databricks_auth(**overrides: Any) -> AuthConfig:
    fields = {"key_source": "databricks", "secret_scope": "embed", "secret_name": "api-key"}
    return AuthConfig(**{**fields, **overrides})


def keyvault_auth(**overrides: Any) -> AuthConfig:
    fields = {"key_source": "keyvault", "key_vault_url": VAULT, "secret_name": "api-key"}
    return AuthConfig(**{**fields, **overrides})


# env ------------------------------------------------------------------------------------


def test_env_key_is_read_from_the_named_variable_without_stray_whitespace() -> None:
    auth = AuthConfig(key_env="MY_KEY")
    key = resolve_key(auth, environ={"MY_KEY": f"{KEY}\n", "AZURE_INFERENCE_CREDENTIAL": "other"})
    assert isinstance(key, SecretStr)
    assert key.get_secret_value() == KEY


def test_env_key_missing_names_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_key(AuthConfig(key_env="MY_KEY"), environ={"MY_KEY": "  "})
    assert str(info.value) == (
        "auth.mode is 'key' but $MY_KEY is empty; export the key there "
        "(or name another variable in auth.key_env), or use auth.mode: entra"
    )


def test_other_modes_need_no_key_and_pass_through() -> None:
    config = EmbedConfig(auth=AuthConfig(mode="entra", key_source="databricks"))
    assert resolve_key(config.auth, environ={}) is None
    assert apply_secret(config, environ={}) is config


def test_a_key_already_resolved_is_kept() -> None:
    auth = AuthConfig(key=SecretStr(KEY), key_source="keyvault")  # no vault configured
    assert resolve_key(auth, environ={}) == SecretStr(KEY)


# databricks -----------------------------------------------------------------------------


def test_databricks_reads_the_scope_and_name(monkeypatch: pytest.MonkeyPatch) -> None:
    dbutils = FakeDbutils({("embed", "api-key"): KEY})
    monkeypatch.setattr(secrets, "_find_dbutils", lambda spark: dbutils)
    key = resolve_key(databricks_auth(), environ={})
    assert key is not None and key.get_secret_value() == KEY
    assert dbutils.calls == [("embed", "api-key")]


def test_databricks_finds_the_notebooks_dbutils(monkeypatch: pytest.MonkeyPatch) -> None:
    dbutils = FakeDbutils({("embed", "api-key"): KEY})
    shell = types.SimpleNamespace(user_ns={"dbutils": dbutils})
    monkeypatch.setitem(sys.modules, "IPython", module("IPython", get_ipython=lambda: shell))
    key = resolve_key(databricks_auth())
    assert key is not None and key.get_secret_value() == KEY
    assert dbutils.calls == [("embed", "api-key")]


def test_databricks_off_platform_says_so() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_key(databricks_auth())
    assert str(info.value).startswith(
        "auth.key_source is 'databricks' but dbutils is not available: this is not a Databricks runtime;"
    )


def test_databricks_without_a_scope_names_the_missing_field() -> None:
    with pytest.raises(ConfigError, match=r"^auth.key_source is 'databricks' but "
                       r"auth.secret_scope is not set$"):  # fmt: skip
        resolve_key(databricks_auth(secret_scope=None))


def test_databricks_refusal_gives_the_runtimes_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(secrets, "_find_dbutils", lambda spark: FakeDbutils({}))
    with pytest.raises(ConfigError) as info:
        resolve_key(databricks_auth())
    assert str(info.value) == (
        "cannot read secret 'api-key' in Databricks secret scope 'embed': "
        "RuntimeError: Secret does not exist with scope: embed and key: api-key"
    )


def test_databricks_empty_secret_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    dbutils = FakeDbutils({("embed", "api-key"): "\n"})
    monkeypatch.setattr(secrets, "_find_dbutils", lambda spark: dbutils)
    with pytest.raises(ConfigError, match="^secret 'api-key' in Databricks secret scope "
                       "'embed' is empty$"):  # fmt: skip
        resolve_key(databricks_auth())


# keyvault -------------------------------------------------------------------------------


def test_keyvault_uses_fabric_notebookutils_with_the_vault_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[Any, ...]] = []
    credentials = types.SimpleNamespace(getSecret=fake_get_secret({"api-key": KEY}, calls))
    monkeypatch.setitem(sys.modules, "notebookutils", module("notebookutils", credentials=credentials))
    key = resolve_key(keyvault_auth())
    assert key is not None and key.get_secret_value() == KEY
    assert calls == [(VAULT, "api-key")]


def test_keyvault_passes_the_synapse_linked_service(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []
    credentials = types.SimpleNamespace(getSecret=fake_get_secret({"api-key": KEY}, calls))
    monkeypatch.setitem(sys.modules, "notebookutils", module("notebookutils", credentials=credentials))
    # Synapse names the vault by name; the URL's first label is that name.
    resolve_key(keyvault_auth(linked_service="ls_keyvault"))
    resolve_key(keyvault_auth(key_vault_url="kv-other", linked_service="ls_keyvault"))
    assert calls == [("kv-embed", "api-key", "ls_keyvault"), ("kv-other", "api-key", "ls_keyvault")]


def test_keyvault_falls_back_to_synapse_mssparkutils_with_the_vault_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[Any, ...]] = []
    mssparkutils = types.SimpleNamespace(
        credentials=types.SimpleNamespace(getSecret=fake_get_secret({"api-key": KEY}, calls))
    )
    # Synapse's notebookutils is a package holding mssparkutils, with no credentials of its own.
    monkeypatch.setitem(sys.modules, "notebookutils", module("notebookutils", mssparkutils=mssparkutils))
    key = resolve_key(keyvault_auth())
    assert key is not None and key.get_secret_value() == KEY
    assert calls == [("kv-embed", "api-key")]


def test_keyvault_falls_back_to_a_top_level_mssparkutils(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []
    credentials = types.SimpleNamespace(getSecret=fake_get_secret({"api-key": KEY}, calls))
    monkeypatch.setitem(sys.modules, "mssparkutils", module("mssparkutils", credentials=credentials))
    key = resolve_key(keyvault_auth())
    assert key is not None and key.get_secret_value() == KEY
    assert calls == [("kv-embed", "api-key")]


def test_keyvault_uses_a_synapse_notebooks_predefined_mssparkutils(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[Any, ...]] = []
    mssparkutils = types.SimpleNamespace(
        credentials=types.SimpleNamespace(getSecret=fake_get_secret({"api-key": KEY}, calls))
    )
    shell = types.SimpleNamespace(user_ns={"mssparkutils": mssparkutils})
    monkeypatch.setitem(sys.modules, "IPython", module("IPython", get_ipython=lambda: shell))
    key = resolve_key(keyvault_auth())
    assert key is not None and key.get_secret_value() == KEY
    assert calls == [("kv-embed", "api-key")]


def test_keyvault_off_platform_says_so() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_key(keyvault_auth())
    assert str(info.value).startswith(
        "auth.key_source is 'keyvault' but neither notebookutils nor mssparkutils is "
        "importable: this is not a Synapse or Fabric Spark runtime;"
    )


def test_keyvault_without_a_vault_names_the_missing_field() -> None:
    with pytest.raises(ConfigError, match="^auth.key_source is 'keyvault' but "
                       "auth.key_vault_url is not set$"):  # fmt: skip
        resolve_key(keyvault_auth(key_vault_url=None))


def test_keyvault_refusal_gives_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    credentials = types.SimpleNamespace(getSecret=fake_get_secret({}, []))
    monkeypatch.setitem(sys.modules, "notebookutils", module("notebookutils", credentials=credentials))
    with pytest.raises(ConfigError) as info:
        resolve_key(keyvault_auth(linked_service="ls_keyvault"))
    assert str(info.value) == (
        "cannot read secret 'api-key' in Key Vault 'kv-embed' via linked service 'ls_keyvault': "
        "RuntimeError: Secret api-key not found in kv-embed"
    )


# the key never shows --------------------------------------------------------------------


def test_apply_secret_sets_the_key_and_hides_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    dbutils = FakeDbutils({("embed", "api-key"): KEY})
    monkeypatch.setattr(secrets, "_find_dbutils", lambda spark: dbutils)
    caplog.set_level(logging.DEBUG)
    config = apply_secret(EmbedConfig(auth=databricks_auth()))
    assert config.auth.key is not None and config.auth.key.get_secret_value() == KEY
    for shown in (repr(config), str(config), repr(config.auth), config.model_dump_json()):
        assert KEY not in shown
    assert "API key read from secret 'api-key' in Databricks secret scope 'embed'" in caplog.text
    assert KEY not in caplog.text


def test_no_error_shows_a_key_that_is_within_reach(monkeypatch: pytest.MonkeyPatch) -> None:
    # The key sits in the environment and in another scope: every failure must still omit it.
    environ = {"AZURE_INFERENCE_CREDENTIAL": KEY, "OTHER": KEY}
    monkeypatch.setattr(secrets, "_find_dbutils", lambda spark: FakeDbutils({("other", "api-key"): KEY}))
    failures = [
        AuthConfig(key_env="MISSING"),
        databricks_auth(),
        databricks_auth(secret_name=None),
        keyvault_auth(),
    ]
    for auth in failures:
        with pytest.raises(ConfigError) as info:
            resolve_key(auth, environ=environ)
        assert KEY not in str(info.value)
        assert KEY not in repr(info.value)

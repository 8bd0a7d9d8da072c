"""Driver-side API key resolution: an env var, a Databricks secret scope, or Azure Key Vault.

Runs on the driver only, before any money is spent. The key then travels to the
executors inside the task closure as a :class:`pydantic.SecretStr`, never through Spark
conf, which the Spark UI and the event log show to anyone who can read them.

    auth.key_source   where the driver reads the key
    ───────────────   ───────────────────────────────────────────────────────────────
    env               os.environ[auth.key_env]        (default AZURE_INFERENCE_CREDENTIAL)
    databricks        dbutils.secrets.get(scope=auth.secret_scope, key=auth.secret_name)
    keyvault          Fabric:  notebookutils.credentials.getSecret(vault URL, secret_name)
                      Synapse: mssparkutils.credentials.getSecret(vault name, secret_name
                                   [, linked_service])  (the name is the URL's first label)

Messages and logs name where we looked (variable, scope, vault, secret name), never the value.

Example::

    config = apply_secret(load_config("conf/databricks.yaml"), spark=spark)
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pydantic import SecretStr

from sparkembed.config import AuthConfig, EmbedConfig
from sparkembed.errors import ConfigError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger("sparkembed.spark.secrets")

_ELSEWHERE = "elsewhere, set auth.key_source: env and export the key, or use auth.mode: entra"


def resolve_key(
    auth: AuthConfig,
    *,
    environ: Mapping[str, str] | None = None,
    spark: SparkSession | None = None,
) -> SecretStr | None:
    """Read the API key named by ``auth`` on the driver.

    Args:
        auth: the auth section; only ``mode: key`` needs a key.
        environ: the environment to read (default ``os.environ``); for ``key_source: env``.
        spark: the session, to build ``dbutils`` on Databricks when no notebook provides it.

    Returns:
        The key, or None when ``auth.mode`` is not ``key``. A key already set is returned as is.

    Raises:
        ConfigError: the variable is empty, a name is missing, the platform's secret
            utility is absent or refused. The message never holds the key.
    """
    if auth.mode != "key":
        return None
    if auth.key is not None:
        return auth.key
    if auth.key_source == "databricks":
        return _from_databricks(auth, spark)
    if auth.key_source == "keyvault":
        return _from_keyvault(auth)
    return _from_env(auth, os.environ if environ is None else environ)


SHORT_KEY = 16
"""Keys shorter than this are warned about: no Azure key is (they have 32 or 84 characters)."""


def apply_secret(
    config: EmbedConfig,
    *,
    environ: Mapping[str, str] | None = None,
    spark: SparkSession | None = None,
) -> EmbedConfig:
    """``config`` with ``auth.key`` resolved (``mode: key`` only); other modes pass through.

    Raises:
        ConfigError: as :func:`resolve_key`.
    """
    if config.auth.mode != "key":
        return config
    config = _apply_pool_keys(config, os.environ if environ is None else environ)
    pool = config.endpoint.pool
    if config.auth.key is not None or (pool and all(member.key is not None for member in pool)):
        return config  # every pool entry has its own key: the shared one is not needed
    key = resolve_key(config.auth, environ=environ, spark=spark)
    length = len(key.get_secret_value()) if key is not None else 0
    if 0 < length < SHORT_KEY:
        log.warning(
            "the API key is only %d characters long; Azure keys have 32 or more: check that "
            "the right value is set", length
        )  # fmt: skip
    return config.model_copy(update={"auth": config.auth.model_copy(update={"key": key})})


def _apply_pool_keys(config: EmbedConfig, environ: Mapping[str, str]) -> EmbedConfig:
    """Each pool entry's ``key_env`` read as the shared key is (entries without one use that)."""
    pool = config.endpoint.pool
    if not any(member.key_env and member.key is None for member in pool):
        return config
    members = []
    for member in pool:
        if member.key_env and member.key is None:
            auth = config.auth.model_copy(update={"key_env": member.key_env})
            member = member.model_copy(update={"key": _from_env(auth, environ)})
        members.append(member)
    endpoint = config.endpoint.model_copy(update={"pool": tuple(members)})
    return config.model_copy(update={"endpoint": endpoint})


def _from_env(auth: AuthConfig, environ: Mapping[str, str]) -> SecretStr:
    value = _clean(environ.get(auth.key_env))
    if value is None:
        raise ConfigError(
            f"auth.mode is 'key' but ${auth.key_env} is empty; export the key there "
            "(or name another variable in auth.key_env), or use auth.mode: entra"
        )
    log.debug("API key read from $%s", auth.key_env)
    return SecretStr(value)


def _from_databricks(auth: AuthConfig, spark: SparkSession | None) -> SecretStr:
    scope = _required(auth.secret_scope, "secret_scope", "databricks")
    name = _required(auth.secret_name, "secret_name", "databricks")
    dbutils = _find_dbutils(spark)
    if dbutils is None:
        raise ConfigError(
            "auth.key_source is 'databricks' but dbutils is not available: this is not a "
            f"Databricks runtime; {_ELSEWHERE}"
        )
    where = f"secret {name!r} in Databricks secret scope {scope!r}"
    try:
        value = dbutils.secrets.get(scope=scope, key=name)
    except Exception as exc:  # py4j and the runtime raise their own types; all mean "refused"
        raise ConfigError(f"cannot read {where}: {_reason(exc)}") from exc
    return _found(value, where)


def _from_keyvault(auth: AuthConfig) -> SecretStr:
    vault = _required(auth.key_vault_url, "key_vault_url", "keyvault")
    name = _required(auth.secret_name, "secret_name", "keyvault")
    found = _find_get_secret()
    if found is None:
        raise ConfigError(
            "auth.key_source is 'keyvault' but neither notebookutils nor mssparkutils is "
            f"importable: this is not a Synapse or Fabric Spark runtime; {_ELSEWHERE}"
        )
    get_secret, utility = found
    # Synapse documents getSecret(vault NAME, secret[, linked service]); Fabric's
    # notebookutils takes the vault URL and has no linked services.
    if auth.linked_service is not None:
        args: tuple[str, ...] = (_vault_name(vault), name, auth.linked_service)
    elif utility == "mssparkutils":
        args = (_vault_name(vault), name)
    else:
        args = (vault, name)
    via = "" if auth.linked_service is None else f" via linked service {auth.linked_service!r}"
    where = f"secret {name!r} in Key Vault {args[0]!r}{via}"
    try:
        value = get_secret(*args)
    except Exception as exc:  # py4j wraps the JVM's errors; all mean "refused"
        raise ConfigError(f"cannot read {where}: {_reason(exc)}") from exc
    return _found(value, where)


def _find_dbutils(spark: SparkSession | None) -> Any | None:
    """The notebook's ``dbutils``, or one built for the session on a Databricks runtime.

    A seam: tests replace it to hand in a fake. Returns None off Databricks.
    """
    notebook = _ipython_user_ns().get("dbutils")
    if notebook is not None:
        return notebook
    try:
        from pyspark.dbutils import DBUtils  # type: ignore[import-not-found]  # Databricks only
    except ImportError:
        return None
    if spark is None:
        from pyspark.sql import SparkSession

        # On Databricks getOrCreate attaches to the cluster's session; it never builds one.
        spark = SparkSession.getActiveSession() or SparkSession.builder.getOrCreate()
    return DBUtils(spark)


# (utility, path to its credentials): Fabric (and newer Synapse) first, then Synapse's
# classic spellings, whose getSecret takes the vault name.
_GET_SECRET_PATHS = (
    ("notebookutils", ("notebookutils", "credentials")),
    ("mssparkutils", ("notebookutils", "mssparkutils", "credentials")),  # Synapse batch jobs
    ("mssparkutils", ("mssparkutils", "credentials")),
)


def _find_get_secret() -> tuple[Callable[..., Any], str] | None:
    """``credentials.getSecret`` and the utility that holds it; None off Synapse and Fabric.

    A notebook's own names come first: Synapse notebooks predefine ``mssparkutils``.
    """
    namespace = _ipython_user_ns()
    for utility, (module_name, *attributes) in _GET_SECRET_PATHS:
        target = namespace.get(module_name) or _import(module_name)
        for attribute in attributes:
            target = getattr(target, attribute, None)
        get_secret = getattr(target, "getSecret", None)
        if callable(get_secret):
            return get_secret, utility
    return None


def _vault_name(vault: str) -> str:
    """``https://kv-embed.vault.azure.net/`` -> ``kv-embed``; a bare name stays as it is."""
    if "://" not in vault:
        return vault
    host = urlsplit(vault).hostname or ""
    return host.split(".", 1)[0] or vault


def _ipython_user_ns() -> Mapping[str, Any]:
    """Names a notebook defined (Databricks puts ``dbutils`` there); empty outside one."""
    try:
        from IPython import get_ipython  # type: ignore[import-not-found]
    except ImportError:
        return {}
    shell = get_ipython()
    return getattr(shell, "user_ns", None) or {}


def _import(module_name: str) -> Any | None:
    try:
        return importlib.import_module(module_name)
    except ImportError:
        return None


def _required(value: str | None, field: str, source: str) -> str:
    if not value:
        raise ConfigError(f"auth.key_source is {source!r} but auth.{field} is not set")
    return value


def _clean(value: object) -> str | None:
    """The secret as text, without the stray newline a file upload leaves; None if empty.

    Whitespace cannot be part of a key: HTTP header values may not hold it.
    """
    if value is None:
        return None
    text = str(value).strip()  # py4j may hand back a Java string proxy
    return text or None


def _found(value: object, where: str) -> SecretStr:
    text = _clean(value)
    if text is None:
        raise ConfigError(f"{where} is empty")
    log.debug("API key read from %s", where)
    return SecretStr(text)


def _reason(exc: BaseException) -> str:
    """The platform's own words, shortened: they name scope and secret, not the value."""
    message = str(exc).strip().splitlines()
    first = message[0] if message else ""
    return f"{type(exc).__name__}: {first[:300]}" if first else type(exc).__name__

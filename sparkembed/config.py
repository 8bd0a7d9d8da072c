"""Run configuration: frozen, typed, validated once at the edge.

YAML (or a dict) becomes an :class:`EmbedConfig`; dotted overrides
(``--set limits.concurrency=8``) are applied before validation. Core code never
reads environment variables: :func:`sparkembed.secrets.apply_secret` on the driver
turns the configured secret into a :class:`pydantic.SecretStr`, which never shows in ``repr``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from sparkembed.errors import ConfigError

if TYPE_CHECKING:
    from sparkembed.core.context import RunContext

HARD_MAX_INPUTS = 1024
COGNITIVE_SERVICES_SCOPE = "https://cognitiveservices.azure.com/.default"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DeploymentConfig(_Frozen):
    """One deployment of a pool (``endpoint.pool``): the rest of ``endpoint`` applies to all."""

    url: str
    """An https URL, as ``endpoint.url``."""
    tokens_per_minute: int = Field(gt=0)
    """This deployment's quota (TPM) for the whole job."""
    requests_per_minute: int | None = Field(default=None, gt=0)
    """This deployment's quota (RPM) for the whole job."""
    key_env: str | None = None
    """The env var holding this deployment's key; default ``auth.key_env``."""
    model: str | None = None
    """The deployment name on the v1 route, when it is not ``endpoint.model``."""
    name: str | None = None
    """What the ``deployment`` column and the summary call it; default the URL's host and path."""
    key: SecretStr | None = None
    """Resolved on the driver from ``key_env``; never set this in a file."""

    @field_validator("url")
    @classmethod
    def _url_shape(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"a pool entry's url must be an http(s) URL, got {v!r}")
        return v

    @property
    def label(self) -> str:
        """``name``, else the URL's host and path (and the deployment name, when set here)."""
        return self.name or deployment_name(self.url, self.model)


def deployment_name(url: str | None, model: str | None = None) -> str:
    """``https://a.openai.azure.com/openai/v1`` -> ``a.openai.azure.com/openai/v1`` (``/model``
    appended when a pool entry names its own deployment on a shared URL)."""
    parts = urlsplit(url or "")
    name = (parts.netloc + parts.path.rstrip("/")) or (url or "")
    return f"{name}/{model}" if model else name


class EndpointConfig(_Frozen):
    """Where and what to call."""

    url: str | None = None
    """``local`` starts the bundled endpoint; otherwise an https URL. Unset: $AZURE_INFERENCE_ENDPOINT."""
    pool: tuple[DeploymentConfig, ...] = ()
    """Several deployments of the same model, used together in proportion to their quota
    (instead of ``url``)."""
    api: Literal["auto", "azure-ai-inference", "openai-v1"] = "auto"
    """``auto`` picks by the URL: ``…/openai/v1`` is the OpenAI-compatible v1 route (what Microsoft
    now recommends), anything else (``…/models``, ``…/openai/deployments/<d>``, self-hosted)
    the Azure AI model inference API. See :attr:`route`."""
    model: str | None = None
    api_version: str | None = None
    dimensions: int | None = Field(default=None, gt=0)
    input_type: Literal["text", "query", "document"] | None = None
    encoding_format: Literal["base64", "float"] = "base64"
    allow_insecure_http: bool = False
    """Allow plain http to a non-loopback host (test rigs only)."""
    local_model: Literal["wordllama", "hash"] = "wordllama"
    """Model served when ``url: local``."""
    price_per_million_tokens: float = Field(default=0.02, ge=0)
    """USD per 1M prompt tokens, for estimates (text-embedding-3-small list price)."""

    @property
    def route(self) -> Literal["azure-ai-inference", "openai-v1"]:
        """The API to call: ``api``, or with ``auto`` the one the URL's path names."""
        if self.api != "auto":
            return self.api
        path = urlsplit(self.url or "").path.rstrip("/")
        return "openai-v1" if path.endswith("/openai/v1") else "azure-ai-inference"


class AuthConfig(_Frozen):
    mode: Literal["key", "entra", "none"] = "key"
    key_source: Literal["env", "databricks", "keyvault"] = "env"
    """Where the driver reads the key: an env var, a Databricks secret scope, or Azure Key Vault
    through Synapse/Fabric ``notebookutils``/``mssparkutils``."""
    key_env: str = "AZURE_INFERENCE_CREDENTIAL"
    secret_scope: str | None = None
    """Databricks secret scope (key_source: databricks)."""
    secret_name: str | None = None
    """Secret name in the scope or the vault."""
    key_vault_url: str | None = None
    """https://<vault>.vault.azure.net/ (key_source: keyvault)."""
    linked_service: str | None = None
    """Synapse linked service to the vault, if the workspace uses one."""
    key: SecretStr | None = None
    """Resolved on the driver; never set this in a file."""
    credential: Literal["default", "managed_identity", "workload_identity", "client_secret", "custom"] = (
        "default"
    )
    """Entra credential type; ``custom`` calls ``credential_factory`` in each process."""
    credential_factory: str | None = None
    """``module:function``: a zero-argument callable returning an (async or sync) TokenCredential."""
    client_id: str | None = None
    scope: str = COGNITIVE_SERVICES_SCOPE


class BatchingConfig(_Frozen):
    max_inputs: int = Field(default=HARD_MAX_INPUTS, ge=1, le=HARD_MAX_INPUTS)
    """Inputs per request; the service maximum is 1024 (Cohere: 96)."""
    max_request_tokens: int = Field(default=300_000, ge=1)
    """Estimated tokens per request."""
    max_input_tokens: int = Field(default=8191, ge=1)
    """The model's per-input token limit."""


class LimitsConfig(_Frozen):
    concurrency: int = Field(default=8, ge=1, le=256)
    """Requests in flight per task."""
    tokens_per_minute: int | None = Field(default=None, gt=0)
    """Deployment quota (TPM) for the whole job; None relies on 429 feedback."""
    requests_per_minute: int | None = Field(default=None, gt=0)
    """Deployment quota (RPM) for the whole job."""
    max_share: float = Field(default=1.0, gt=0, le=1)
    """The part of the quota the job may use (``0.7``): online traffic on the same deployment
    keeps the rest, even when the job could take it. Needs ``tokens_per_minute``."""


class RetryConfig(_Frozen):
    max_attempts: int = Field(default=8, ge=1)
    """Attempts per request for errors other than 429 (a 429 is retried until total_timeout_s)."""
    max_wait_s: float = Field(default=60.0, gt=0)
    """A 429 asking to wait longer than this is quota exhaustion."""
    total_timeout_s: float = Field(default=600.0, gt=0)
    """Give up on a request after this many seconds including retries."""
    backoff_initial_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=20.0, gt=0)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    read_timeout_s: float = Field(default=60.0, gt=0)
    on_quota_exhausted: Literal["fail_rows", "stop"] = "fail_rows"


class LongTextConfig(_Frozen):
    strategy: Literal["chunk", "mean", "truncate", "fail"] = "chunk"
    chunk_tokens: int = Field(default=512, ge=16)
    overlap_tokens: int = Field(default=64, ge=0)
    tokenizer: Literal["auto", "cl100k_base", "wordllama", "utf8_bytes"] = "auto"
    """How tokens are counted. auto: wordllama for the local endpoint, cl100k_base for
    models named text-embedding-3-*/ada, else UTF-8 bytes (a safe upper bound). Name it
    when a deployment's name does not tell the model."""
    tiktoken_file: str | None = None
    """Offline copy of cl100k_base.tiktoken (see ``sparkembed cache-tokenizer``)."""

    @model_validator(mode="after")
    def _overlap_smaller(self) -> LongTextConfig:
        if self.overlap_tokens >= self.chunk_tokens:
            raise ValueError("long_text.overlap_tokens must be smaller than chunk_tokens")
        return self


class SourceConfig(_Frozen):
    path: str | None = None
    format: Literal["delta", "parquet", "csv", "jsonl", "table"] | None = None
    id_col: str = "id"
    text_col: str = "text"
    passthrough: tuple[str, ...] = ()
    cast_text: bool = True
    """Cast a non-string text column to string (with a warning) instead of refusing."""


class TargetConfig(_Frozen):
    path: str | None = None
    mode: Literal["append", "overwrite", "upsert"] = "upsert"
    sink: Literal["auto", "native", "delta-rs"] = "auto"


class RunConfig(_Frozen):
    commit_every_rows: int = Field(default=50_000, ge=1)
    """A wave commits at most this many rows..."""
    commit_every_tokens: int = Field(default=5_000_000, ge=1)
    """...and about this many estimated tokens (money at risk in one wave)..."""
    commit_every_seconds: float = Field(default=300.0, gt=0)
    """...and about this many seconds of work (from the quota, then from measured speed)."""
    fail_on_existing_failures: bool = False
    """Exit 1 while failed rows from earlier runs remain (they are left alone without retry_failed)."""
    max_failed_fraction: float = Field(default=0.0, ge=0, le=1)
    partitions: int | None = Field(default=None, ge=1)
    spark_master: str | None = None
    """Used only when sparkembed builds the session itself (CLI, local mode)."""
    log_dir: str = "runs"
    """Run logs, and the folder tasks write their spend to: on a cluster, a path every node
    sees (e.g. ``/dbfs/...``) gives live progress, full spend and a prompt stop."""
    prune: bool = False
    retry_failed: bool = False
    reembed_all: bool = False
    """Allow a new fingerprint (model, dimensions, input type, long-text settings) on a target
    that holds another: the new vectors are built in a staging table and switched in one commit."""
    switch: bool = True
    """Switch a migration's target to the staging table once it is complete; false keeps the
    staging table ready (and checked) for a later run to switch."""
    check_sample: int = Field(default=0, ge=0, le=20_000)
    """Before a migration's switch, compare the nearest neighbours of this many sample ids in the
    old and the new vectors (0: no check)."""
    dedup: bool = True
    """Send each distinct text once per run (and not at all when the target already holds it),
    and each chunk shared by different long texts once per task: rows sharing a text or a
    chunk copy the vector of the row that paid, named in ``dedup_of``."""
    max_tokens: int | None = Field(default=None, gt=0)
    """Prompt tokens this run may be billed at most (after dedup)."""
    max_cost_usd: float | None = Field(default=None, gt=0)
    """USD this run may cost at most, at ``endpoint.price_per_million_tokens``."""
    allow_partial: bool = False
    """A run estimated over ``max_tokens``/``max_cost_usd`` starts anyway, stops sending at the
    cap and commits what is done (``--allow-partial``); without it such a run is refused."""


class CacheConfig(_Frozen):
    path: str | None = None
    """A Delta path or catalog table shared by runs of any target: texts it holds ``ok`` under
    the run's fingerprint are not sent (their rows carry ``cached_from``), and what a run
    embeds is added to it wave by wave. None: no cache."""


class EmbedConfig(_Frozen):
    endpoint: EndpointConfig = EndpointConfig()
    auth: AuthConfig = AuthConfig()
    batching: BatchingConfig = BatchingConfig()
    limits: LimitsConfig = LimitsConfig()
    retry: RetryConfig = RetryConfig()
    long_text: LongTextConfig = LongTextConfig()
    source: SourceConfig = SourceConfig()
    target: TargetConfig = TargetConfig()
    run: RunConfig = RunConfig()
    cache: CacheConfig = CacheConfig()

    @field_validator("endpoint")
    @classmethod
    def _url_shape(cls, v: EndpointConfig) -> EndpointConfig:
        if v.url is not None and v.url != "local" and not v.url.startswith(("http://", "https://")):
            raise ValueError(f"endpoint.url must be 'local' or an http(s) URL, got {v.url!r}")
        if v.pool and v.url is not None:
            raise ValueError(
                "endpoint.url and endpoint.pool exclude each other: give one URL, or a pool of deployments"
            )
        labels = [member.label for member in v.pool]
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            raise ValueError(f"endpoint.pool lists {', '.join(twice)} twice: give each entry its own name")
        return v

    @model_validator(mode="after")
    def _quotas(self) -> EmbedConfig:
        limits = self.limits
        if self.endpoint.pool and (limits.tokens_per_minute or limits.requests_per_minute):
            raise ValueError(
                "limits.tokens_per_minute and requests_per_minute do not apply to a pool: "
                "give each endpoint.pool entry its own tokens_per_minute"
            )
        if limits.max_share < 1 and not (limits.tokens_per_minute or self.endpoint.pool):
            raise ValueError("limits.max_share needs limits.tokens_per_minute: the share is of that quota")
        return self

    def deployments(self) -> tuple[tuple[str, EmbedConfig], ...]:
        """(name, config) per deployment: each pool entry as a one-URL config with its own URL,
        model, key and quota; or this config alone, named after ``endpoint.url``."""
        endpoint = self.endpoint
        if not endpoint.pool:
            return ((deployment_name(endpoint.url), self),)
        found = []
        for member in endpoint.pool:
            model = member.model or endpoint.model
            one = endpoint.model_copy(update={"url": member.url, "model": model, "pool": ()})
            key_env = member.key_env or self.auth.key_env
            auth = self.auth.model_copy(update={"key": member.key or self.auth.key, "key_env": key_env})
            quota = {
                "tokens_per_minute": member.tokens_per_minute,
                "requests_per_minute": member.requests_per_minute,
            }
            limits = self.limits.model_copy(update=quota)
            parts = {"endpoint": one, "auth": auth, "limits": limits}
            found.append((member.label, self.model_copy(update=parts)))
        return tuple(found)

    @property
    def quota_tokens_per_minute(self) -> int | None:
        """The job's TPM quota: ``limits.tokens_per_minute``, or a pool's sum."""
        if self.endpoint.pool:
            return sum(member.tokens_per_minute for member in self.endpoint.pool)
        return self.limits.tokens_per_minute

    def fingerprint(self, context: RunContext | None = None) -> str:
        """What the vectors mean: a new value means old vectors must not be mixed in.

        ``context`` gives what the service said it runs (the preflight), which beats what
        was asked for: a deployment URL may change model without any config key changing.
        The route is not part of it: the same deployment answers the same vectors on the
        v1 route and the inference API, so moving a table to another route re-embeds nothing.
        """
        return self._fingerprint({}, context)

    def equivalent_fingerprints(self, context: RunContext | None = None) -> tuple[str, ...]:
        """This fingerprint, then those that releases before 0.2 wrote for the same vectors
        (they hashed the route in too): rows carrying any of them are done."""
        legacy = (self._fingerprint({"api": api}, context) for api in ("azure-ai-inference", "openai-v1"))
        return (self.fingerprint(context), *legacy)

    def _fingerprint(self, extra: dict[str, Any], context: RunContext | None) -> str:
        endpoint = self.endpoint
        served_model = context.served_model if context else None
        served_dimensions = context.served_dimensions if context else None
        meaning = extra | {
            "model": served_model
            or endpoint.model
            or (endpoint.local_model if endpoint.url == "local" else None),
            "dimensions": served_dimensions or endpoint.dimensions,
            "input_type": endpoint.input_type,
            "long_text": [
                self.long_text.strategy,
                self.long_text.chunk_tokens,
                self.long_text.overlap_tokens,
                self.batching.max_input_tokens,
            ],
        }
        return hashlib.sha256(json.dumps(meaning, sort_keys=True).encode()).hexdigest()[:16]

    def with_overrides(self, overrides: Mapping[str, Any]) -> EmbedConfig:
        """A copy with dotted keys set (``{"source.text_col": "body"}``), validated; the resolved
        API key is kept (it never passes through a dict).

        Raises:
            ConfigError: an unknown key or an invalid value, with the key named.
        """
        tree = self.model_dump(exclude={"auth": {"key"}})
        for key, value in overrides.items():
            _set_dotted(tree, key, value)
        merged = validate_config(tree)
        if self.auth.key is None:
            return merged
        return merged.model_copy(update={"auth": merged.auth.model_copy(update={"key": self.auth.key})})

    def client_key(self) -> str:
        """Identity of the per-process client: everything that shapes requests, and the secret."""
        raw = self.model_dump_json(include={"endpoint", "auth", "limits", "retry", "batching"})
        keys = [self.auth.key, *(member.key for member in self.endpoint.pool)]
        secret = "/".join(key.get_secret_value() if key else "" for key in keys)
        return hashlib.sha256((raw + secret).encode()).hexdigest()


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted!r}: {part!r} is not a section")
    node[leaf] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``limits.concurrency=8`` -> ("limits.concurrency", 8): the value means what was typed.

    A text key keeps the text as typed (``api_version=2024-10-21`` stays a string, not a
    YAML date); a list key takes ``a,b`` or YAML ``[a, b]``; anything else is read as YAML.

    Raises:
        ConfigError: no ``=``, or a key that does not exist (with the closest one named).
    """
    if "=" not in item:
        raise ConfigError(f"--set expects dotted.key=value, got {item!r}")
    key, raw = (part.strip() for part in item.split("=", 1))
    kind = _key_kind(key)
    if not raw:
        return key, None
    if kind == "text":
        parsed = yaml.safe_load(raw) if raw[0] in "'\"" else raw
        return key, parsed
    if kind == "list" and not raw.startswith("["):
        return key, tuple(part.strip() for part in raw.split(",") if part.strip())
    return key, yaml.safe_load(raw)


def _key_kind(dotted: str) -> str:
    """``text``, ``list`` or ``other`` for a dotted key of :class:`EmbedConfig`."""
    section, _, name = dotted.partition(".")
    fields = EmbedConfig.model_fields
    if section not in fields or not name:
        raise ConfigError(f"unknown config key {dotted!r}{_did_you_mean(dotted)}")
    model = fields[section].annotation
    model_fields = getattr(model, "model_fields", {})
    if name not in model_fields:
        raise ConfigError(f"unknown config key {dotted!r}{_did_you_mean(dotted)}")
    annotation = str(model_fields[name].annotation)
    if "tuple" in annotation:
        return "list"
    if annotation in ("<class 'str'>", "str | None", "typing.Optional[str]") or "Literal" in annotation:
        return "text"
    return "other"


def config_keys() -> list[str]:
    """Every dotted key a user can set, e.g. ``limits.tokens_per_minute``."""
    return [
        f"{section}.{name}"
        for section, field in EmbedConfig.model_fields.items()
        for name in getattr(field.annotation, "model_fields", {})
    ]


def _did_you_mean(dotted: str) -> str:
    close = difflib.get_close_matches(dotted, config_keys(), n=1, cutoff=0.6)
    if not close:  # a right name under a wrong section, or a section's name alone
        leaf = dotted.rpartition(".")[2]
        close = [k for k in config_keys() if k.endswith("." + leaf)][:1]
    return f": did you mean {close[0]!r}?" if close else ""


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> EmbedConfig:
    """Read a YAML file (optional), apply dotted overrides, validate.

    Raises:
        ConfigError: unreadable file, unknown key or invalid value, with the key named.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        if not isinstance(tree, dict):
            raise ConfigError(f"config {path} must be a mapping of sections")
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    if tree.get("auth", {}).get("key") is not None:
        raise ConfigError("auth.key must not be written in config; name an env var in auth.key_env")
    pool = tree.get("endpoint", {}).get("pool") or []
    if any(isinstance(member, dict) and member.get("key") is not None for member in pool):
        raise ConfigError("endpoint.pool keys must not be written in config; name an env var in key_env")
    return validate_config(tree)


def validate_config(tree: dict[str, Any]) -> EmbedConfig:
    """Validate a tree of sections; errors name each key, and the closest key for a typo."""
    try:
        return EmbedConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError("invalid config: " + "; ".join(_describe(e) for e in exc.errors())) from None
    except ValueError as exc:
        raise ConfigError(f"invalid config: {exc}") from None


def _describe(error: Any) -> str:
    """One pydantic error as ``key: what is wrong``."""
    key = ".".join(str(part) for part in error["loc"] if not isinstance(part, int))
    if error["type"] == "extra_forbidden":
        return f"unknown key {key!r}{_did_you_mean(key)}"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{key}: {message} (got {error['input']!r})" if "input" in error else f"{key}: {message}"


def resolve_endpoint(config: EmbedConfig, environ: Mapping[str, str]) -> EmbedConfig:
    """Edge-side: an unset ``endpoint.url`` comes from ``AZURE_INFERENCE_ENDPOINT``.

    Raises:
        ConfigError: neither is set.
    """
    if config.endpoint.url is not None or config.endpoint.pool:
        return config
    url = environ.get("AZURE_INFERENCE_ENDPOINT")
    if not url:
        raise ConfigError(
            "no endpoint: set endpoint.url in the config, pass --endpoint URL, or export "
            "AZURE_INFERENCE_ENDPOINT (use 'local' for the bundled local endpoint)"
        )
    endpoint = validate_config({"endpoint": config.endpoint.model_dump() | {"url": url}}).endpoint
    return config.model_copy(update={"endpoint": endpoint})

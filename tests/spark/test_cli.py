"""Command-line edges: config precedence, the endpoint env var, exit codes, speculation."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from sparkembed.cli import _run_parser, config_from_args, main
from sparkembed.errors import ConfigError
from sparkembed.spark.driver import refuse_speculation


def parse(*argv: str, environ: dict[str, str] | None = None):
    return config_from_args(_run_parser("t").parse_args(list(argv)), environ or {})


def test_flags_override_the_file_and_set_overrides_flags(tmp_path: Path) -> None:
    conf = tmp_path / "c.yaml"
    conf.write_text("endpoint: {url: https://a.example/models, model: m1}\nlimits: {concurrency: 3}\n")
    config = parse(
        "--config", str(conf), "--model", "m2", "--set", "limits.concurrency=5", "--retry-failed",
        "--source", "s.parquet", "--target", "t",
    )  # fmt: skip
    assert config.endpoint.model == "m2" and config.limits.concurrency == 5
    assert config.run.retry_failed and not config.run.prune
    assert (config.source.path, config.target.path) == ("s.parquet", "t")


def test_the_endpoint_falls_back_to_the_azure_env_var_and_is_required() -> None:
    config = parse(environ={"AZURE_INFERENCE_ENDPOINT": "https://r.services.ai.azure.com/models"})
    assert config.endpoint.url == "https://r.services.ai.azure.com/models"
    with pytest.raises(ConfigError, match="AZURE_INFERENCE_ENDPOINT"):
        parse()
    with pytest.raises(ConfigError, match="endpoint.url must be 'local' or an http"):
        parse("--endpoint", "ftp://x")
    with pytest.raises(ConfigError, match="limits"):
        parse("--endpoint", "local", "--set", "limits.nonsense=1")


def test_a_config_error_exits_2_with_a_json_last_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--endpoint", "local", "--set", "batching.max_inputs=5000"]) == 2
    out, err = capsys.readouterr()
    last = json.loads(out.strip().splitlines()[-1])
    assert last["error_type"] == "ConfigError" and "max_inputs" in last["error"]
    assert "sparkembed: error:" in err


def test_speculation_is_refused_because_it_pays_twice() -> None:
    def session(value: str) -> SimpleNamespace:
        return SimpleNamespace(conf=SimpleNamespace(get=lambda key, default=None: value))

    with pytest.raises(ConfigError, match="spark.speculation"):
        refuse_speculation(session("true"))  # type: ignore[arg-type]
    refuse_speculation(session("false"))  # type: ignore[arg-type]

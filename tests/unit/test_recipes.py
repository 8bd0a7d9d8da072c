"""Platform recipes stay runnable: the Databricks bundle, the Synapse job, the example configs.

The bundle's task must name the wheel's real console script, and its parameters must parse
with the real ``sparkembed run`` parser into a valid config. Every bundle job must load
through the typed models of ``databricks-bundles`` (offline: no CLI, no workspace), which
refuse a field Databricks does not know. No file may carry a secret.
"""

from __future__ import annotations

import ast
import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from sparkembed.cli import _run_parser, config_from_args
from sparkembed.config import load_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "databricks"
SYNAPSE = ROOT / "synapse"

# Fields of a Jobs API python_wheel_task; anything else is a typo the CLI would reject.
WHEEL_TASK_FIELDS = {"package_name", "entry_point", "parameters", "named_parameters"}
# What a key, token or secret reference looks like: long opaque strings, {{secrets/...}}.
SECRETISH_VALUE = re.compile(r"\{\{\s*secrets/|^[A-Za-z0-9+/=_\-]{32,}$")
SECRETISH_NAME = re.compile(r"key|secret|token|password|credential", re.IGNORECASE)
# Names that say "credential" but hold a name: a Unity Catalog service credential's.
NOT_SECRETS = {"DATABRICKS_DEFAULT_SERVICE_CREDENTIAL_NAME"}


def load_bundle() -> dict[str, Any]:
    """databricks.yml with its included resource files merged in, as the CLI does."""
    bundle = yaml.safe_load((BUNDLE / "databricks.yml").read_text())
    resources: dict[str, Any] = {}
    for pattern in bundle.get("include", []):
        for path in sorted(BUNDLE.glob(pattern)):
            for kind, items in yaml.safe_load(path.read_text())["resources"].items():
                resources.setdefault(kind, {}).update(items)
    bundle["resources"] = resources
    return bundle


def the_job(bundle: dict[str, Any]) -> dict[str, Any]:
    """The classic job, on a job cluster (the serverless one has its own tests)."""
    job: dict[str, Any] = bundle["resources"]["jobs"]["sparkembed_embed"]
    return job


def the_wheel_task(bundle: dict[str, Any]) -> dict[str, Any]:
    (task,) = [t for t in the_job(bundle)["tasks"] if "python_wheel_task" in t]
    return task


def substitute(value: str, variables: dict[str, Any]) -> str:
    """Replace ``${var.NAME}`` with the variable's default, as a deploy without --var does."""
    return re.sub(r"\$\{var\.(\w+)\}", lambda m: str(variables[m.group(1)]["default"]), value)


def project_scripts() -> tuple[str, dict[str, str]]:
    """(project name, [project.scripts]) from pyproject.toml; a regex where tomllib is absent."""
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib
    except ImportError:  # Python 3.10
        name = re.search(r'(?m)^name\s*=\s*"([^"]+)"', text)
        section = re.search(r"(?ms)^\[project\.scripts\]\s*\n(.*?)(?=^\[|\Z)", text)
        assert name and section, "pyproject.toml lacks [project] name or [project.scripts]"
        scripts = dict(re.findall(r'(?m)^([\w.-]+)\s*=\s*"([^"]+)"', section.group(1)))
        return name.group(1), scripts
    project = tomllib.loads(text)["project"]
    return project["name"], project["scripts"]


def walk_strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in walk_strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in walk_strings(v)]
    return [node] if isinstance(node, str) else []


# Databricks ------------------------------------------------------------------------------


def test_the_wheel_task_runs_the_packages_console_script() -> None:
    name, scripts = project_scripts()
    task = the_wheel_task(load_bundle())["python_wheel_task"]
    assert set(task) <= WHEEL_TASK_FIELDS
    assert task["package_name"] == name == "sparkembed"
    module, func = scripts[task["entry_point"]].split(":")
    assert module == "sparkembed.cli"
    import sparkembed.cli

    assert callable(getattr(sparkembed.cli, func))


def test_the_wheel_task_parameters_parse_into_a_valid_config() -> None:
    bundle = load_bundle()
    variables = bundle["variables"]
    parameters = [substitute(p, variables) for p in the_wheel_task(bundle)["python_wheel_task"]["parameters"]]
    assert parameters[0] == "run"
    args = _run_parser("sparkembed run").parse_args(parameters[1:])
    assert args.config == variables["config_path"]["default"]
    assert args.source == variables["source_table"]["default"]
    assert args.target == variables["target_table"]["default"]
    # The volume copy is conf/databricks.yaml: the flags on top of it must validate.
    args.config = str(ROOT / "conf" / "databricks.yaml")
    config = config_from_args(args, environ={})
    assert config.endpoint.url == variables["endpoint"]["default"]
    assert config.endpoint.model == variables["model"]["default"]
    assert config.auth.mode == "key"
    assert config.auth.key_source == "databricks"
    assert config.auth.secret_scope == variables["secret_scope"]["default"]
    assert config.auth.secret_name == variables["secret_name"]["default"]
    assert config.source.path == variables["source_table"]["default"]
    assert config.target.path == variables["target_table"]["default"]
    assert config.cache.path is None  # cache_path's default, empty: no shared cache


def test_every_variable_used_is_declared() -> None:
    bundle = load_bundle()
    used = set(re.findall(r"\$\{var\.(\w+)\}", json.dumps(bundle["resources"])))
    assert used <= set(bundle["variables"])
    assert {"endpoint", "model", "secret_scope", "source_table", "target_table"} <= used


def test_the_task_installs_the_wheel_the_bundle_builds() -> None:
    bundle = load_bundle()
    artifact = bundle["artifacts"]["sparkembed"]
    assert artifact["type"] == "whl"
    assert (BUNDLE / artifact["path"] / "pyproject.toml").is_file()
    task = the_wheel_task(bundle)
    # Paths in a resource file are relative to that file.
    (wheel,) = [lib["whl"] for lib in task["libraries"]]
    assert (BUNDLE / "resources" / wheel).resolve() == ROOT / "dist" / "*.whl"
    clusters = {c["job_cluster_key"] for c in the_job(bundle)["job_clusters"]}
    assert task["job_cluster_key"] in clusters


def test_the_job_cluster_disables_speculation_and_holds_no_secret() -> None:
    for cluster in the_job(load_bundle())["job_clusters"]:
        spec = cluster["new_cluster"]
        assert spec["spark_conf"]["spark.speculation"] == "false"
        for section in ("spark_conf", "spark_env_vars"):
            for name, value in spec.get(section, {}).items():
                assert name in NOT_SECRETS or not SECRETISH_NAME.search(name), name
                assert not SECRETISH_VALUE.search(str(value)), f"{section}.{name} holds a secret"


def test_the_secret_detector_is_not_vacuous() -> None:
    assert SECRETISH_VALUE.search("{{secrets/sparkembed/azure-inference-key}}")
    assert SECRETISH_VALUE.search("0123456789abcdef0123456789abcdef")
    assert SECRETISH_NAME.search("AZURE_INFERENCE_CREDENTIAL")
    assert SECRETISH_NAME.search("spark.executorEnv.API_KEY")
    assert not SECRETISH_VALUE.search("false")
    assert not SECRETISH_VALUE.search("/Volumes/main/rag/sparkembed/databricks.yaml")


def test_no_bundle_file_holds_a_secret() -> None:
    bundle = load_bundle()
    for text in walk_strings(bundle):
        assert not SECRETISH_VALUE.search(text), text


def resolve_variables(node: Any, variables: dict[str, Any]) -> Any:
    """``node`` with every ``${var.NAME}`` replaced by its default, as a deploy without --var.

    A value that is one reference takes the default's own type (``num_workers: 2`` stays an
    int), so the typed models check it as the CLI would.
    """
    if isinstance(node, dict):
        return {key: resolve_variables(value, variables) for key, value in node.items()}
    if isinstance(node, list):
        return [resolve_variables(value, variables) for value in node]
    if isinstance(node, str):
        whole = re.fullmatch(r"\$\{var\.(\w+)\}", node)
        return variables[whole.group(1)]["default"] if whole else substitute(node, variables)
    return node


def load_job(job: dict[str, Any]) -> Any:
    """The job through ``databricks-bundles``' typed models; raises on a field they do not know.

    ``Job.from_dict`` refuses an unknown key of any nested model (ValueError "Unexpected
    field"). Loading it back out must give the very same document: a value the models
    dropped or reshaped would be a field Databricks does not read as we meant it.
    """
    from databricks.bundles.jobs import Job

    loaded = Job.from_dict(job)  # type: ignore[arg-type]
    if loaded.as_dict() != job:
        raise ValueError(f"the typed job differs from the bundle's: {loaded.as_dict()} != {job}")
    return loaded


def test_the_bundle_validates_against_the_databricks_schema() -> None:
    """Every job loads through ``databricks-bundles``' typed models: no unknown field anywhere."""
    bundle = load_bundle()
    jobs = bundle["resources"]["jobs"]
    assert set(jobs) == {"sparkembed_embed", "sparkembed_embed_serverless"}
    for name, job in jobs.items():
        load_job(job)  # as written, ${var.*} references and all
        loaded = load_job(resolve_variables(job, bundle["variables"]))
        assert loaded.tasks, name


@pytest.mark.parametrize(
    "name, path, typo",
    [
        ("sparkembed_embed_serverless", ("tasks", 0, "python_wheel_task"), "entry_pont"),
        ("sparkembed_embed_serverless", ("tasks", 0), "enviroment_key"),
        ("sparkembed_embed_serverless", ("environments", 0, "spec"), "dependencies_"),
        ("sparkembed_embed_serverless", (), "max_concurent_runs"),
        ("sparkembed_embed", ("job_clusters", 0, "new_cluster"), "num_worker"),
    ],
)
def test_a_misspelled_field_is_refused(name: str, path: tuple[str | int, ...], typo: str) -> None:
    job = copy.deepcopy(load_bundle()["resources"]["jobs"][name])
    node: Any = job
    for step in path:
        node = node[step]
    node[typo] = "x"
    with pytest.raises(ValueError, match=f"Unexpected field '{typo}'"):
        load_job(job)


def test_a_value_of_the_wrong_kind_is_refused() -> None:
    job = copy.deepcopy(load_bundle()["resources"]["jobs"]["sparkembed_embed"])
    job["job_clusters"][0]["new_cluster"]["data_security_mode"] = "SINGEL_USER"
    with pytest.raises(ValueError):
        load_job(job)


def test_the_serverless_job_runs_the_same_task_on_an_environment_with_the_wheel() -> None:
    bundle = load_bundle()
    jobs = bundle["resources"]["jobs"]
    classic, serverless = jobs["sparkembed_embed"], jobs["sparkembed_embed_serverless"]
    assert "job_clusters" not in serverless
    (task,) = serverless["tasks"]
    assert not {"job_cluster_key", "new_cluster", "existing_cluster_id", "libraries"} & set(task)
    (environment,) = serverless["environments"]
    assert task["environment_key"] == environment["environment_key"]
    spec = environment["spec"]
    assert str(resolve_variables(spec["environment_version"], bundle["variables"])).isdigit()
    # The wheel the bundle builds, relative to the resource file, as the classic task's.
    (wheel,) = spec["dependencies"]
    assert (BUNDLE / "resources" / wheel).resolve() == ROOT / "dist" / "*.whl"
    # The same run: on Spark Connect the job asks the server for its task slots.
    parameters = task["python_wheel_task"]["parameters"]
    (classic_task,) = classic["tasks"]
    assert parameters == classic_task["python_wheel_task"]["parameters"]
    args = _run_parser("sparkembed run").parse_args(
        [substitute(p, bundle["variables"]) for p in parameters[1:]]
    )
    args.config = str(ROOT / "conf" / "databricks.yaml")
    config = config_from_args(args, environ={})
    assert config.run.partitions is None
    assert config.auth.key_source == "databricks"
    assert config.endpoint.url.endswith("/openai/v1")


# Synapse ---------------------------------------------------------------------------------


def synapse_job() -> dict[str, Any]:
    return json.loads((SYNAPSE / "sparkJobDefinition.json").read_text())["properties"]


def test_the_synapse_job_runs_embed_table_with_parsable_args() -> None:
    job = synapse_job()
    assert job["language"] == "python"
    assert job["targetBigDataPool"]["type"] == "BigDataPoolReference"
    props = job["jobProperties"]
    assert props["file"].endswith("/embed_table.py")
    assert (ROOT / "jobs" / "embed_table.py").is_file()
    args = _run_parser("embed_table.py").parse_args(props["args"])
    # --config names a file shipped in `files`, which lands in the driver's working directory.
    assert args.config in {f.rsplit("/", 1)[-1] for f in props["files"]}
    args.config = str(ROOT / "conf" / args.config)
    config = config_from_args(args, environ={})
    assert config.auth.key_source == "keyvault"
    assert config.source.path == args.source and config.target.path == args.target


def test_the_synapse_job_disables_speculation_and_holds_no_secret() -> None:
    props = synapse_job()["jobProperties"]
    assert props["conf"]["spark.speculation"] == "false"
    for name, value in props["conf"].items():
        assert not SECRETISH_NAME.search(name)
        assert not SECRETISH_VALUE.search(value)
    for text in walk_strings(synapse_job()):
        assert not SECRETISH_VALUE.search(text), text


def test_the_notebook_snippet_config_validates_and_it_uses_the_api() -> None:
    source = (SYNAPSE / "notebook_snippet.py").read_text()
    tree = ast.parse(source)
    (config,) = [
        ast.literal_eval(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "CONFIG"
    ]
    parsed = validate_config(config)
    assert parsed.auth.key_source == "keyvault" and parsed.auth.linked_service
    called = {
        node.func.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    assert {"apply_secret", "validate_config", "write"} <= called


# Example configs -------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((ROOT / "conf").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_loads(path: Path) -> None:
    config = load_config(path)
    assert config.auth.key is None  # a file never carries a key
    if config.endpoint.url != "local":
        assert config.endpoint.url.startswith("https://")


def test_the_platform_configs_exist() -> None:
    names = {p.name for p in (ROOT / "conf").glob("*.yaml")}
    assert {"databricks.yaml", "synapse.yaml", "foundry-key.yaml", "aoai-entra.yaml"} <= names

"""Secrets never leak: a whole CLI run with a distinctive key (or Entra token), then a search
of every file the run produced for it, raw and base64-encoded.

The run is as loud as a user can make it: DEBUG logging in the driver and in every
executor's Python worker, azure-core's HTTP trace on (``logging_enable``), and the Spark
event log enabled. A ``sitecustomize`` on PYTHONPATH does the logging part, since the CLI
configures INFO and the executors' Python workers configure nothing.
"""

from __future__ import annotations

import base64
import gzip
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import fakes
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from azure.core.pipeline import PipelineContext, PipelineRequest
from azure.core.rest import HttpRequest
from pydantic import SecretStr

from sparkembed.backends.azure_inference import AzureInferenceBackend
from sparkembed.backends.transport import RedactingTraceLoggingPolicy, check_endpoint_url, hide_bridge_traffic
from sparkembed.config import load_config
from sparkembed.core.context import RunContext
from sparkembed.errors import ConfigError
from sparkembed.sinks import read_table
from sparkembed.spark.partition import PartitionJob

KEY = "sk-LEAKCHECK-7f3a9c1e5d2b48a6b0c4e9f1a2d3c5e7"
POISON = "POISON-ROW"
ROWS = 120
TESTS_DIR = Path(__file__).resolve().parents[1]  # where fakes.py is
REPO = TESTS_DIR.parent

SITECUSTOMIZE = textwrap.dedent(
    """
    import logging, sys
    logging.basicConfig(
        level=logging.DEBUG, stream=sys.stderr,
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
    )
    # azure-core's network trace (headers and bodies) on for every client, as
    # logging_enable=True does.
    from azure.core.pipeline.policies import NetworkTraceLoggingPolicy
    NetworkTraceLoggingPolicy.__init__.__defaults__ = (True,)
    """
)

# -- the search ----------------------------------------------------------------------


def needles(secret: str) -> list[bytes]:
    """Byte patterns that reveal ``secret``: itself, and its base64 at each of the three
    alignments (standard and URL-safe alphabets), cut to the characters that depend on
    the secret alone."""
    raw = secret.encode()
    found = [raw]
    for shift, skip in ((0, 0), (1, 2), (2, 3)):
        whole_groups = (shift + len(raw)) // 3
        encoded = base64.b64encode(b"\0" * shift + raw)[skip : 4 * whole_groups]
        found += [encoded, encoded.translate(bytes.maketrans(b"+/", b"-_"))]
    return list(dict.fromkeys(found))


def file_views(path: Path) -> list[bytes]:
    """The file's bytes, plus decoded views a byte search would miss (parquet pages are
    compressed, gzip streams too)."""
    data = path.read_bytes()
    views = [data]
    if data[:4] == b"PAR1":  # parquet, whatever its name
        rows = pq.read_table(path).to_pylist()
        views.append(json.dumps(rows, default=repr, ensure_ascii=False).encode())
    if data[:2] == b"\x1f\x8b":
        views.append(gzip.decompress(data))
    for suffix in (".zst", ".lz4", ".snappy", ".lzf"):
        assert not path.name.endswith(suffix), f"cannot search compressed {path}"
    return views


def read_if_there(path: Path) -> str:
    """A file's text; empty if Spark renamed it away (an in-progress event log) meanwhile."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def settled_files(root: Path, timeout_s: float = 20.0) -> list[Path]:
    """The files under ``root`` once they stop changing: the JVM of a finished run may
    still be deleting its temp files for a moment after the driver process exits."""
    listing = sorted(p for p in root.rglob("*") if p.is_file())
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.5)
        again = sorted(p for p in root.rglob("*") if p.is_file())
        if again == listing:
            break
        listing = again
    return listing


def find_secret(root: Path, secret: str) -> list[tuple[str, bytes]]:
    """(file, pattern) for every file under ``root`` that reveals ``secret``."""
    patterns = needles(secret)
    hits = []
    for path in settled_files(root):
        try:
            views = file_views(path)
        except FileNotFoundError:  # deleted after settling: gone, so it holds nothing
            continue
        for view in views:
            hits += [(str(path.relative_to(root)), p) for p in patterns if p in view]
    return hits


def test_the_search_finds_planted_secrets(tmp_path: Path) -> None:
    """Positive control: each way a secret could hide is found."""
    (tmp_path / "log.txt").write_text(f"2026 DEBUG header 'api-key': '{KEY}'\n")
    for shift in range(3):
        planted = base64.b64encode(b"x" * shift + f"Authorization: Bearer {KEY}".encode())
        (tmp_path / f"b64-{shift}.txt").write_bytes(b"Command to send: j" + planted)
    (tmp_path / "urlsafe.txt").write_bytes(base64.urlsafe_b64encode(b"\xfb\xff" + KEY.encode()))
    texts = [f"filler text {i}" for i in range(2000)] + [f"error: key {KEY} refused"]
    pq.write_table(pa.table({"error": texts}), tmp_path / "part-0.parquet", compression="zstd")
    (tmp_path / "events.gz").write_bytes(gzip.compress(f'{{"x": "{KEY}"}}'.encode()))
    (tmp_path / "clean.txt").write_text("nothing here " + KEY[:-1])

    found = {name for name, _ in find_secret(tmp_path, KEY)}
    assert found == {
        "log.txt", "b64-0.txt", "b64-1.txt", "b64-2.txt", "urlsafe.txt", "part-0.parquet", "events.gz",
    }  # fmt: skip


# -- reprs ---------------------------------------------------------------------------


def test_config_and_job_reprs_hide_the_key() -> None:
    config = load_config(None, {"endpoint.url": "https://x.services.ai.azure.com/models"})
    config = config.model_copy(update={"auth": config.auth.model_copy(update={"key": SecretStr(KEY)})})
    job = PartitionJob(config, RunContext(run_id="run-1"), "id", "text", (), pa.schema([("id", pa.int64())]))
    shown = [repr(config), str(config), repr(config.auth), config.model_dump_json(), repr(job)]
    assert all(KEY not in text for text in shown)
    assert "**********" in repr(config.auth)


# -- whole runs ----------------------------------------------------------------------


def write_source(path: Path) -> None:
    texts = [f"note {i}: the river meets the lake" for i in range(ROWS)]
    texts[7], texts[8], texts[9] = f"{POISON} seven", "", None  # type: ignore[call-overload]
    pq.write_table(pa.table({"id": [f"doc-{i}" for i in range(ROWS)], "text": texts}), path)


def run_cli(root: Path, endpoint_url: str, *sets: str) -> subprocess.CompletedProcess[str]:
    """``python -m sparkembed.cli run`` in ``root``, at DEBUG, with the event log on."""
    site = root / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    write_source(root / "source.parquet")
    for folder in ("events", "local", "tmp"):
        (root / folder).mkdir()
    spark_args = [
        "--conf spark.eventLog.enabled=true",
        f"--conf spark.eventLog.dir=file://{root / 'events'}",
        "--conf spark.eventLog.compress=false",
        f"--conf spark.local.dir={root / 'local'}",
        f"--conf spark.driver.extraJavaOptions=-Djava.io.tmpdir={root / 'tmp'}",
        "pyspark-shell",
    ]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PYSPARK_", "AZURE_INFERENCE"))},
        "PYTHONPATH": os.pathsep.join([str(site), str(TESTS_DIR), str(REPO)]),
        "AZURE_INFERENCE_CREDENTIAL": KEY,
        "PYSPARK_SUBMIT_ARGS": " ".join(spark_args),
        "TMPDIR": str(root / "tmp"),
    }
    argv = [
        sys.executable, "-m", "sparkembed.cli", "run",
        "--source", str(root / "source.parquet"), "--target", str(root / "target"),
        "--endpoint", endpoint_url,
        "--set", f"run.log_dir={root / 'runs'}", "--set", "run.max_failed_fraction=0.5",
        "--set", "batching.max_inputs=16", "--set", "retry.backoff_initial_s=0.05",
        *[item for s in sets for item in ("--set", s)],
    ]  # fmt: skip
    with (root / "stdout.txt").open("w") as out, (root / "stderr.txt").open("w") as err:
        process = subprocess.run(argv, cwd=root, env=env, stdout=out, stderr=err, text=True, timeout=300)
    return process


def check_run_was_loud_and_complete(root: Path, process: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The run succeeded and wrote everything the search must cover; returns its summary."""
    stdout = (root / "stdout.txt").read_text()
    stderr = (root / "stderr.txt").read_text()
    assert process.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert (summary["rows_ok"], summary["rows_skipped"], summary["rows_failed"]) == (ROWS - 3, 2, 1)
    # Loud: azure-core's trace ran in the driver and executors, and py4j's command log.
    assert stderr.count("Request headers:") >= 3
    assert "Command to send: <" in stderr
    assert " DEBUG " in stderr
    # Complete: the event log, the Delta log and data, the run log exist.
    event_logs = "".join(read_if_there(p) for p in (root / "events").rglob("*") if p.is_file())
    # Spark conf is in the event log's environment update: searching the log searches it.
    for event in ("SparkListenerEnvironmentUpdate", "Spark Properties", "SparkListenerTaskEnd"):
        assert event in event_logs
    assert list((root / "target" / "_delta_log").glob("*.json"))
    assert list((root / "target").glob("*.parquet"))
    run_dir = root / "runs" / summary["run_id"]
    assert (run_dir / "summary.json").exists() and (run_dir / "timeline.json").exists()
    table = read_table(str(root / "target"))
    failed = [r["error"] for r in table.select(["status", "error"]).to_pylist() if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0].startswith("400 invalid_input")  # a message was written
    return summary


@pytest.mark.spark
@pytest.mark.integration
@pytest.mark.slow
def test_key_appears_in_no_file_of_a_run(start_endpoint: Any, tmp_path: Path) -> None:
    endpoint = start_endpoint(
        "--model", "hash", "--dims", "16", "--fail-text", POISON, "--error-rate", "0.1", "--seed", "3",
        env={"SPARKEMBED_SERVE_KEY": KEY},
    )  # fmt: skip
    process = run_cli(tmp_path, endpoint.url)
    check_run_was_loud_and_complete(tmp_path, process)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "'api-key': 'REDACTED'" in stderr
    assert find_secret(tmp_path, KEY) == []
    endpoint.stop()


@pytest.mark.spark
@pytest.mark.integration
@pytest.mark.slow
def test_bearer_tokens_appear_in_no_file_of_an_entra_run(start_endpoint: Any, tmp_path: Path) -> None:
    endpoint = start_endpoint(
        "--model", "hash", "--dims", "16", "--fail-text", POISON, "--error-rate", "0.1", "--seed", "3",
        "--accept-token-prefix", fakes.TOKEN_PREFIX,
    )  # fmt: skip
    process = run_cli(
        tmp_path, endpoint.url,
        "auth.mode=entra", "auth.credential=custom", "auth.credential_factory=fakes:make_credential",
    )  # fmt: skip
    check_run_was_loud_and_complete(tmp_path, process)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "'Authorization': 'REDACTED'" in stderr
    # Every token starts with the prefix, so finding none of it finds no token.
    assert endpoint.stats(billed=False)["bearer_tokens_seen"] >= 3
    assert find_secret(tmp_path, fakes.TOKEN_PREFIX) == []
    assert find_secret(tmp_path, KEY) == []
    endpoint.stop()


# -- transport safety ------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "local",
        "https://res.services.ai.azure.com/models",
        "https://10.0.0.5/models",
        "http://127.0.0.1:8080",
        "http://127.5.6.7/models",
        "http://localhost:1234/models",
        "http://LOCALHOST",
        "http://[::1]:8080/models",
        "http://[::ffff:127.0.0.1]:80",
    ],
)
def test_https_and_loopback_http_are_accepted(url: str) -> None:
    check_endpoint_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.5/models",
        "http://example.com/models",
        "http://localhost.evil.example/models",
        "http://127.0.0.1.nip.io/models",
        "http://0.0.0.0:8080",
        "http://[fe80::1]:8080",
    ],
)
def test_plain_http_to_other_hosts_is_refused_unless_allowed(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        check_endpoint_url(url)
    message = str(caught.value)
    assert message.startswith(f"endpoint.url {url!r} is plain http to ")
    assert message.endswith(
        "which is not loopback: the key or token would cross the network unencrypted. Use "
        "https, or set endpoint.allow_insecure_http: true (test rigs only)"
    )
    check_endpoint_url(url, allow_insecure_http=True)  # the test-rig escape hatch


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://user:pa55word@res.openai.azure.com", "endpoint.url must not hold credentials"),
        ("ftp://res.openai.azure.com", "endpoint.url must be an https URL, got scheme 'ftp'"),
        ("https:///models", "endpoint.url 'https:///models' has no host"),
        (None, "no endpoint: set endpoint.url, pass --endpoint URL, or export AZURE_INFERENCE_ENDPOINT"),
    ],
)
def test_malformed_endpoints_are_refused(url: str | None, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        check_endpoint_url(url)
    assert str(caught.value).startswith(message)
    assert "pa55word" not in str(caught.value)


def test_backend_refuses_insecure_endpoint_before_building_anything() -> None:
    config = load_config(None, {"endpoint.url": "http://10.0.0.5/models"})
    with pytest.raises(ConfigError, match="endpoint.allow_insecure_http"):
        AzureInferenceBackend(config)
    allowed = load_config(
        None, {"endpoint.url": "http://10.0.0.5/models", "endpoint.allow_insecure_http": True}
    )
    AzureInferenceBackend(allowed)


def test_http_trace_redacts_auth_headers_and_restores_them(caplog: pytest.LogCaptureFixture) -> None:
    request = HttpRequest(
        "POST",
        "https://res.services.ai.azure.com/models/embeddings",
        headers={"api-key": KEY, "Authorization": f"Bearer {KEY}", "x-ms-client-request-id": "r-1"},
        json={"input": ["hello"]},
    )
    policy = RedactingTraceLoggingPolicy(logging_enable=True)
    with caplog.at_level(logging.DEBUG, logger="azure.core.pipeline.policies"):
        policy.on_request(PipelineRequest(request, PipelineContext(None)))
    assert "'api-key': 'REDACTED'" in caplog.text
    assert "'Authorization': 'REDACTED'" in caplog.text
    assert "'x-ms-client-request-id': 'r-1'" in caplog.text and '"hello"' in caplog.text
    assert KEY not in caplog.text
    # The request still goes out with its credentials.
    assert request.headers["api-key"] == KEY and request.headers["Authorization"] == f"Bearer {KEY}"


def test_py4j_command_log_is_summarised(caplog: pytest.LogCaptureFixture) -> None:
    hide_bridge_traffic()
    hide_bridge_traffic()  # idempotent
    command = "c\no0\nmapInArrow\nj" + base64.b64encode(f"pickled closure {KEY}".encode()).decode() + "\ne\n"
    logger = logging.getLogger("py4j.clientserver")
    with caplog.at_level(logging.DEBUG, logger="py4j"):
        logger.debug(f"Command to send: {command}")  # noqa: UP030  # as py4j does
        logger.debug("Answer received: {0}".format("!yro123"))  # noqa: UP030
        logger.debug("Closing down clientserver connection")
    assert caplog.messages == [
        f"Command to send: <{len(command) + 1} characters hidden by sparkembed: may hold secrets>",
        "Answer received: <8 characters hidden by sparkembed: may hold secrets>",
        "Closing down clientserver connection",
    ]
    assert sum(isinstance(f, type(logger.filters[0])) for f in logger.filters) == 1

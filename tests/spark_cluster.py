"""A real standalone Spark cluster from pip-installed pyspark's own jars.

A master and one worker are started with ``spark-class`` on loopback; executors
run in their own JVMs and Python workers, as on a real cluster.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyspark


def python_workers(session: int) -> list[int]:
    """Spark's forked Python workers (children of a pyspark.daemon) in one process session."""
    found: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if b"pyspark.daemon" in cmdline and int(fields[3]) == session:
            found[int(entry.name)] = int(fields[1])  # pid -> parent pid
    return [pid for pid, parent in found.items() if parent in found]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"spark process exited early:\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"spark master did not listen on {port}:\n{log.read_text()[-3000:]}")


def _wait_for_worker(log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if "Successfully registered with master" in log.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise TimeoutError(f"spark worker did not register:\n{log.read_text()[-3000:]}")


@contextmanager
def standalone_cluster(workdir: Path, cores: int = 2, memory: str = "2g") -> Iterator[str]:
    """Yield ``spark://127.0.0.1:PORT`` for a running master plus one worker."""
    spark_home = Path(pyspark.__file__).parent
    spark_class = str(spark_home / "bin" / "spark-class")
    env = {
        **os.environ,
        "SPARK_HOME": str(spark_home),
        "PYSPARK_PYTHON": sys.executable,
        "SPARK_LOCAL_IP": "127.0.0.1",
        "SPARK_WORKER_DIR": str(workdir / "work"),
    }
    workdir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    url = f"spark://127.0.0.1:{port}"
    master_log, worker_log = workdir / "master.log", workdir / "worker.log"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with master_log.open("wb") as out:
            master = subprocess.Popen(
                [spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                 "--port", str(port), "--webui-port", "0"],
                env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        procs.append(master)
        _wait_for_port(port, master, master_log, 60)
        with worker_log.open("wb") as out:
            worker = subprocess.Popen(
                [spark_class, "org.apache.spark.deploy.worker.Worker", url, "--cores", str(cores),
                 "--memory", memory, "--webui-port", "0", "--host", "127.0.0.1"],
                env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        procs.append(worker)
        _wait_for_worker(worker_log, 60)
        yield url
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()

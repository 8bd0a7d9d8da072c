"""Start the local endpoint in a child process and talk to its accounting routes.

Example::

    with start_local_endpoint("--model", "hash", "--no-auth") as endpoint:
        client = EmbeddingsClient(endpoint.url, AzureKeyCredential("unused"))
        ...
        assert endpoint.stats()["ok_requests"] == 1

Uses the standard library only, so it is cheap to import from a driver or a test.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

READY_PREFIX = "LISTENING "
_STDERR_TAIL_LINES = 200


@dataclass
class LocalEndpoint:
    """A running local endpoint.

    Attributes:
        url: base URL, e.g. ``http://127.0.0.1:54321``.
        process: the server process (hidden from repr: its arguments may hold a key).
    """

    url: str
    process: subprocess.Popen[str] = field(repr=False)
    _stderr_tail: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=_STDERR_TAIL_LINES), repr=False
    )

    def stats(self, billed: bool = True) -> dict[str, Any]:
        """The server's ``/_stats`` document; ``billed=False`` omits the per-text dict."""
        suffix = "" if billed else "?billed=0"
        with urllib.request.urlopen(f"{self.url}/_stats{suffix}", timeout=30) as response:
            document: dict[str, Any] = json.loads(response.read())
        return document

    def reset(self) -> None:
        """Zero the server's stats, refill its quota and restart its fault streams."""
        request = urllib.request.Request(f"{self.url}/_reset", data=b"", method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()

    def outage(self, seconds: float) -> None:
        """Start an outage: for ``seconds``, every embeddings request loses its connection."""
        request = urllib.request.Request(f"{self.url}/_outage?seconds={seconds}", data=b"", method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()

    def stderr(self) -> str:
        """The last lines the server wrote to stderr."""
        return "".join(self._stderr_tail)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server with SIGTERM (SIGKILL after ``timeout_s`` seconds); idempotent."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> LocalEndpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def start_local_endpoint(
    *args: str, env: dict[str, str] | None = None, timeout_s: float = 60
) -> LocalEndpoint:
    """Run ``python -m sparkembed.server --port 0 *args`` and wait until it listens.

    Args:
        args: more ``sparkembed serve`` arguments, e.g. ``"--model", "hash"``.
        env: environment variables set for the server on top of this process's
            (e.g. ``{"SPARKEMBED_SERVE_KEY": key}`` keeps a key off the command line).
        timeout_s: seconds to wait for the server to listen.

    Raises:
        RuntimeError: the server exited or did not listen in time; the message holds the
            end of its stderr.
    """
    child_env = {**os.environ, **(env or {})}
    # The child must import this very package, installed or not.
    package_root = str(Path(__file__).resolve().parents[2])
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, child_env.get("PYTHONPATH")) if p)
    process = subprocess.Popen(
        [sys.executable, "-m", "sparkembed.server", "--port", "0", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env,
        text=True,
        encoding="utf-8",
        errors="replace",
    )
    endpoint = LocalEndpoint(url="", process=process)
    assert process.stdout is not None and process.stderr is not None
    urls: queue.Queue[str | None] = queue.Queue()
    # Both pipes are drained for the life of the process, so it never blocks writing.
    _drain(process.stdout, urls.put, None)
    stderr_reader = _drain(process.stderr, None, endpoint._stderr_tail)
    try:
        url = urls.get(timeout=timeout_s)
    except queue.Empty:
        endpoint.stop()
        raise RuntimeError(
            f"the local endpoint did not listen within {timeout_s:g} s; stderr:\n{endpoint.stderr()}"
        ) from None
    if url is None:
        process.wait()
        stderr_reader.join(timeout=5)
        raise RuntimeError(
            f"the local endpoint exited with code {process.returncode} before listening; "
            f"stderr:\n{endpoint.stderr()}"
        )
    endpoint.url = url
    return endpoint


def _drain(
    stream: IO[str],
    on_url: Callable[[str | None], None] | None,
    tail: collections.deque[str] | None,
) -> threading.Thread:
    """Read ``stream`` to its end in a daemon thread.

    Stdout (``on_url`` set): the first ``LISTENING`` line's URL goes to ``on_url``, and
    ``on_url(None)`` follows at end of stream. Stderr (``tail`` set): lines are kept in ``tail``.
    """

    def run() -> None:
        for line in stream:
            if tail is not None:
                tail.append(line)
            elif on_url is not None and line.startswith(READY_PREFIX):
                on_url(line[len(READY_PREFIX) :].strip())
        if on_url is not None:
            on_url(None)
        stream.close()

    thread = threading.Thread(target=run, name="sparkembed-endpoint-drain", daemon=True)
    thread.start()
    return thread

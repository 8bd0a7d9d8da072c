"""Benchmark the local endpoint's hash model: inputs per second, base64 and float JSON.

The server runs in its own process pinned to one core; a concurrent aiohttp client runs in
another process (on another core when there is one) and checks every answer.

Goal (issue 2): at 1536 dimensions, >= 10,000 inputs/s with base64 and >= 3,000 inputs/s
with float JSON, on one server core.

    .venv/bin/python scripts/bench_server.py [--seconds 5] [--batch 256] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparkembed.server.launch import start_local_endpoint  # noqa: E402

GOALS = {"base64": 10_000, "float": 3_000}
MEASURING = "MEASURING"


class SampleTexts:
    """Realistic inputs: slices of Python's help topics, about 50 tokens each.

    Text ``k`` starts ``k * step`` characters in (modulo the corpus), so a run sends ever new
    texts, cut mid-word at both ends: the endpoint's per-word count cache gets no free hits
    from texts sent again.
    """

    def __init__(self, chars: int = 200, step: int = 997) -> None:
        from pydoc_data.topics import topics

        self._corpus = " ".join(topics.values())
        self._chars = chars
        self._step = step

    def __getitem__(self, k: int) -> str:
        start = (k * self._step) % (len(self._corpus) - self._chars)
        return self._corpus[start : start + self._chars]


def check_vectors(data: list[dict], encoding: str, dims: int) -> None:
    """Check every vector's size; fully decode one per response.

    Decoding all base64 would cost the client more CPU (about 20 us per 1536-d vector in
    binascii) than the server spends per input, and the client must not be the bottleneck.
    """
    base64_chars = 4 * math.ceil(4 * dims / 3)
    for item in data:
        vector = item["embedding"]
        size = len(vector)
        if (encoding == "base64" and size != base64_chars) or (encoding == "float" and size != dims):
            raise RuntimeError(f"vector {item['index']} has the wrong size")
    if encoding == "base64":
        vector = np.frombuffer(base64.b64decode(data[0]["embedding"]), dtype="<f4")
        if not math.isclose(float(np.linalg.norm(vector)), 1.0, rel_tol=1e-4):
            raise RuntimeError("not a unit vector")


async def run_client(
    url: str, encoding: str, seconds: float, batch: int, concurrency: int, dims: int
) -> dict:
    """Post batches from ``concurrency`` workers for ``seconds``; count inputs embedded."""
    import aiohttp

    texts = SampleTexts()
    done = {"inputs": 0, "requests": 0}

    async def worker(session: aiohttp.ClientSession, first: int, deadline: float) -> None:
        position = first
        while time.perf_counter() < deadline:
            inputs = [texts[position + i] for i in range(batch)]
            position += batch * concurrency
            body = orjson.dumps({"input": inputs, "encoding_format": encoding})
            async with session.post(f"{url}/embeddings", data=body) as response:
                payload = await response.read()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {payload[:200]!r}")
            data = orjson.loads(payload)["data"]
            check_vectors(data, encoding, dims)
            done["inputs"] += len(data)
            done["requests"] += 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"content-type": "application/json", "api-key": "bench"}
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        await asyncio.gather(*(worker(session, i * batch, time.perf_counter() + 1.0)
                               for i in range(concurrency)))  # warm-up  # fmt: skip
        done.update(inputs=0, requests=0)
        print(MEASURING, flush=True)  # lets the parent read the server's CPU time now
        started = time.perf_counter()
        await asyncio.gather(*(worker(session, i * batch, started + seconds) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {**done, "seconds": elapsed, "inputs_per_s": done["inputs"] / elapsed}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pin_process(pid: int, cpu: int) -> None:
    """Pin every thread of ``pid`` to ``cpu`` (threads started later inherit it)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), {cpu})


def bench(args: argparse.Namespace) -> int:
    cpus = sorted(os.sched_getaffinity(0))
    env = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}
    dims = ("--dims", str(args.dims))
    with start_local_endpoint("--model", "hash", "--no-auth", *dims, env=env) as endpoint:
        pid = endpoint.process.pid
        pin_process(pid, cpus[0])
        client_cpus = cpus[1:] or cpus
        print(f"server pid {pid} on CPU {cpus[0]}; client on CPU(s) {client_cpus}; {args.dims} dims")
        print(f"batch {args.batch} inputs, {args.concurrency} requests in flight, {args.seconds} s")
        failed = False
        for encoding in ("base64", "float"):
            result, server_cpu_s = run_client_process(endpoint.url, pid, encoding, args, client_cpus)
            goal = GOALS[encoding]
            verdict = "ok" if result["inputs_per_s"] >= goal else "BELOW GOAL"
            failed |= verdict != "ok"
            print(
                f"{encoding:>6}: {result['inputs_per_s']:>8,.0f} inputs/s, "
                f"{result['inputs'] / server_cpu_s:>8,.0f} inputs per server CPU second "
                f"(server busy {server_cpu_s / result['seconds']:.0%}; "
                f"{result['requests']} requests; goal {goal:,}: {verdict})"
            )
        stats = endpoint.stats(billed=False)
        print(f"server stats: {json.dumps(stats)}")
    return 1 if failed else 0


def run_client_process(
    url: str, server_pid: int, encoding: str, args: argparse.Namespace, cpus: list[int]
) -> tuple[dict, float]:
    """Run the client in its own process; return its result and the server CPU seconds used
    while it measured."""
    command = [
        sys.executable, __file__, "--client", url, "--encoding", encoding,
        "--seconds", str(args.seconds), "--batch", str(args.batch),
        "--concurrency", str(args.concurrency), "--dims", str(args.dims),
    ]  # fmt: skip
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: os.sched_setaffinity(0, set(cpus)),
    ) as client:
        assert client.stdout is not None
        lines = iter(client.stdout)
        for line in lines:
            if line.strip() == MEASURING:
                break
        cpu_before = cpu_seconds(server_pid)
        last = "".join(lines).strip().splitlines()[-1]
        cpu_used = cpu_seconds(server_pid) - cpu_before
    if client.returncode != 0:
        raise RuntimeError(f"the benchmark client failed with code {client.returncode}")
    result: dict = json.loads(last)
    return result, cpu_used


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per format")
    parser.add_argument("--batch", type=int, default=256, help="inputs per request")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--dims", type=int, default=1536, help="vector size")
    parser.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--encoding", default="base64", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        result = asyncio.run(
            run_client(args.client, args.encoding, args.seconds, args.batch, args.concurrency, args.dims)
        )
        print(json.dumps(result))
        return 0
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())

"""``sparkembed serve`` / ``python -m sparkembed.server``: run the local embeddings endpoint.

When ready it prints exactly ``LISTENING http://HOST:PORT`` on stdout. SIGTERM and SIGINT
stop it cleanly (exit 0). The key may come from ``SPARKEMBED_SERVE_KEY`` so it need not
appear on a command line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable

from aiohttp import web

from sparkembed.core.memory import keep_freed_memory
from sparkembed.server.app import create_app
from sparkembed.server.quota import LIMITER_MODELS
from sparkembed.server.settings import ServerSettings

KEY_ENV_VAR = "SPARKEMBED_SERVE_KEY"


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``sparkembed serve``."""
    parser = argparse.ArgumentParser(
        prog="sparkembed serve", description="Run the local Azure-like embeddings endpoint."
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="interface to bind (default loopback)")
    add("--port", type=int, default=0, help="TCP port; 0 picks a free one")
    add("--model", choices=("wordllama", "hash"), default="wordllama")
    add("--dims", type=_positive_int, default=None, help="default vector size (hash: 1536)")
    add("--key", default=None, help=f"accepted API key (or set {KEY_ENV_VAR})")
    add("--no-auth", action="store_true", help="accept requests without a valid key")
    add("--accept-token-prefix", default=None, help="also accept bearer tokens with this prefix")
    add("--deployment", action="append", default=[], help="known deployment name (repeatable)")
    add("--max-inputs", type=_positive_int, default=2048, help="most inputs per request")
    add("--max-input-tokens", type=_positive_int, default=8191, help="most tokens per input")
    add("--tpm", type=_positive_int, default=None, help="quota in tokens per minute")
    add("--rpm", type=_positive_int, default=None, help="quota in requests per minute, checked per 10 s")
    add("--limiter", choices=LIMITER_MODELS, default="token-bucket", help="how TPM and RPM are metered")
    add("--tpm-jitter", type=_jitter, default=0.0, help="TPM limit wanders by ± this fraction, e.g. 0.05")
    add("--window-scale", type=_positive_float, default=1.0, help="multiply the 60 s / 10 s quota windows")
    add("--no-quota-headers", action="store_true", help="never send x-ratelimit-remaining-* headers")
    add("--latency-ms", type=_milliseconds, default=0.0, help="milliseconds added to every response")
    add("--error-rate", type=_fraction, default=0.0, help="fraction answered 500/503")
    add("--reset-rate", type=_fraction, default=0.0, help="fraction whose connection is dropped")
    add("--slow-rate", type=_fraction, default=0.0, help="fraction answered --slow-ms late")
    add("--slow-ms", type=_milliseconds, default=0.0, help="delay of slow answers, milliseconds")
    add("--shuffle", action="store_true", help="return data items in a shuffled order")
    add("--seed", type=int, default=None, help="seed for faults and shuffles")
    add("--fail-text", action="append", default=[], help="reject inputs containing this text")
    add("--access-log", action="store_true", help="log each request to stderr")
    return parser


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return number


def _milliseconds(value: str) -> float:
    number = float(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value} is not a duration in milliseconds")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not (number > 0 and number < float("inf")):
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return number


def _jitter(value: str) -> float:
    number = float(value)
    if not 0.0 <= number < 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not a fraction in [0, 1)")
    return number


def _fraction(value: str) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not a fraction between 0 and 1")
    return number


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """Turn parsed arguments into settings, taking the key from the environment if absent."""
    return ServerSettings(
        host=args.host,
        port=args.port,
        model=args.model,
        dimensions=args.dims,
        key=args.key or os.environ.get(KEY_ENV_VAR) or None,
        no_auth=args.no_auth,
        accept_token_prefix=args.accept_token_prefix,
        deployments=tuple(args.deployment),
        max_inputs=args.max_inputs,
        max_input_tokens=args.max_input_tokens,
        tokens_per_minute=args.tpm,
        requests_per_minute=args.rpm,
        limiter=args.limiter,
        tpm_jitter=args.tpm_jitter,
        window_scale=args.window_scale,
        quota_headers=not args.no_quota_headers,
        latency_ms=args.latency_ms,
        error_rate=args.error_rate,
        reset_rate=args.reset_rate,
        slow_rate=args.slow_rate,
        slow_ms=args.slow_ms,
        shuffle=args.shuffle,
        seed=args.seed,
        fail_texts=tuple(args.fail_text),
        access_log=args.access_log,
    )


async def serve(settings: ServerSettings, on_ready: Callable[[str], None]) -> None:
    """Serve until SIGTERM or SIGINT; call ``on_ready(url)`` once listening."""
    app = create_app(settings)
    access_log = logging.getLogger("aiohttp.access") if settings.access_log else None
    runner = web.AppRunner(app, access_log=access_log, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        # Not available on Windows, nor outside the main thread.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    site = web.TCPSite(runner, settings.host, settings.port, backlog=1024)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        on_ready(f"http://{f'[{host}]' if ':' in host else host}:{port}")
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the endpoint; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = settings_from_args(args)
    if not (settings.key or settings.no_auth or settings.accept_token_prefix):
        parser.error(f"give --key (or set {KEY_ENV_VAR}), --accept-token-prefix or --no-auth")
    if settings.access_log:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)

    def announce(url: str) -> None:
        print(f"LISTENING {url}", flush=True)

    keep_freed_memory()  # each answer is megabytes: reuse their memory, request after request
    try:
        asyncio.run(serve(settings, announce))
    except (OSError, ValueError, ModuleNotFoundError) as exc:
        print(f"sparkembed serve: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

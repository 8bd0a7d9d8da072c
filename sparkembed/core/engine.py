"""The embedding engine: rows in, per-row vectors and status out, within quota.

Two sides meet here. The caller's thread (a Spark task, a script) pulls input
chunks, packs their non-blank rows into requests across chunk boundaries, keeps
``limits.concurrency`` requests in flight, and yields each chunk's results in
input order once all its rows are done. One background event loop per process
sends the requests: rate limiter, HTTP attempt, retry policy, and bisection of
batches the service refused with a 400.

    embedder = get_embedder(config, make_backend)   # one per Python worker process
    for results in embedder.embed_stream(chunks_of_texts, metrics):
        results.vectors, results.status        # one EmbedResults per input chunk

With ``endpoint.pool`` each deployment is a :class:`~sparkembed.core.pool.Route` with its own
backend, limiter and circuit breaker: every attempt goes to the least booked deployment that
is in, and a request whose deployment fails moves to another (see :mod:`sparkembed.core.pool`).
"""

from __future__ import annotations

import asyncio
import atexit
import bisect
import concurrent.futures
import contextlib
import os
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import numpy as np

from sparkembed.config import EmbedConfig, LimitsConfig
from sparkembed.core.answers import AnswerLog
from sparkembed.core.budget import POLL_S as budget_poll_s
from sparkembed.core.budget import WAIT_S as budget_wait_s
from sparkembed.core.budget import BudgetGuard
from sparkembed.core.memory import keep_freed_memory
from sparkembed.core.metrics import Metrics, RequestRecord
from sparkembed.core.pool import Breaker, Route, choose, ready_in_s, verdict
from sparkembed.core.ratelimit import Grant, RateLimiter
from sparkembed.core.retry import Decision, RetryPolicy, config_error_for
from sparkembed.core.streaming import EmbedResults, RowStream, Segment
from sparkembed.core.tokens import estimate_tokens
from sparkembed.core.types import Backend, BackendResponse
from sparkembed.errors import (
    EndpointConfigError,
    QuotaExhaustedError,
    ServiceError,
    TransportError,
)

__all__ = ["EmbedResults", "Embedder", "get_embedder"]

T = TypeVar("T")
PREFLIGHT_TEXT = "sparkembed preflight"
BISECT_STATUSES = frozenset({400, 413})
"""A batch refused with these may hold one bad input: split it to find it."""
CLOSE_TIMEOUT_S = 10.0
REQUESTS_PER_QUOTA_MINUTE = 10
"""A request never costs more than this fraction of a worker's minute of token quota, so
pacing stays smooth and workers' first requests together fit in the service's bucket."""


def _never() -> bool:
    return False


class Embedder:
    """Embeds streams of texts through one backend (or a pool of them), limiter and retry policy.

    Args:
        config: the run configuration (endpoint, limits, batching, retry).
        backend: the service seam (:func:`sparkembed.backends.make_backend`), for one deployment.
        share: the part of the quota this embedder may use (:attr:`RunContext.quota_share`).
        limiter: default: ``share`` of the configured TPM and RPM.
        routes: the deployments of a pool, instead of ``backend`` and ``limiter``
            (:func:`build_routes`).
        clock: monotonic seconds, for retry time limits.
        sleep: awaits a retry delay in seconds (tests pass a fake).
        policy: default ``RetryPolicy(config.retry)``.
    """

    def __init__(
        self,
        config: EmbedConfig,
        backend: Backend | None = None,
        *,
        share: float = 1.0,
        limiter: RateLimiter | None = None,
        routes: Sequence[Route] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        policy: RetryPolicy | None = None,
    ) -> None:
        if routes is None:
            if backend is None or config.endpoint.pool:
                raise ValueError("an Embedder needs one backend, or routes for a pool (build_routes)")
            name = config.deployments()[0][0]
            routes = [Route(name, backend, limiter or _share_limiter(config.limits, share), config)]
        self.config = config
        self._routes = list(routes)
        self._pooled = len(self._routes) > 1
        self._backend = self._routes[0].backend
        self._limiter = self._routes[0].limiter
        self._share = share
        self._policy = policy or RetryPolicy(config.retry)
        self._clock = clock
        self._sleep = sleep
        self._loop = _process_loop()
        self._dims: int | None = config.endpoint.dimensions
        self._attempt_timeout_s = config.retry.connect_timeout_s + config.retry.read_timeout_s
        self.closed = False

    @property
    def dimensions(self) -> int | None:
        """Vector size: configured, or learned from the first response."""
        return self._dims

    @property
    def deployments(self) -> list[str]:
        """The names of the deployments this embedder sends to."""
        return [route.name for route in self._routes]

    @property
    def limiters(self) -> dict[str, RateLimiter]:
        """Each deployment's rate limiter, by name."""
        return {route.name: route.limiter for route in self._routes}

    def embed_stream(
        self,
        chunks: Iterable[Any],
        metrics: Metrics | None = None,
        stop: Callable[[], bool] = _never,
        answers: AnswerLog | None = None,
        budget: BudgetGuard | None = None,
    ) -> Generator[EmbedResults, None, None]:
        """Embed chunks of texts lazily; yield one :class:`EmbedResults` per chunk, in order.

        A chunk is a sequence of texts, or an object with ``texts`` and exact ``tokens``
        (a :class:`sparkembed.longtext.Plan`).

        Requests are packed across chunk boundaries. Input is read only as far as
        the in-flight requests allow, so memory stays bounded on endless input.

        Once ``stop()`` is true, no request is sent or retried any more: rows not yet
        answered end with status ``unsent``. The caller stops feeding chunks.

        ``answers`` keeps each answered request, and fills texts an earlier attempt of the
        same task was answered for (see :mod:`sparkembed.core.answers`).

        ``budget`` reserves each request's tokens against the run's cap before it is sent
        (:mod:`sparkembed.core.budget`); a request it refuses leaves its rows ``unsent``.

        Raises:
            EndpointConfigError: the service refused the setup (401/403/404/422).
            QuotaExhaustedError: with ``retry.on_quota_exhausted: stop``.
        """
        metrics = metrics if metrics is not None else Metrics()
        stream = RowStream(
            lambda texts, estimates: self._loop.submit(
                self._embed_batch(texts, estimates, metrics, stop, budget)
            ),
            max_inputs=self.config.batching.max_inputs,
            max_request_tokens=request_token_cap(self.config, self._share),
            concurrency=self.config.limits.concurrency,
            dimensions=lambda: self._dims,
            metrics=metrics,
            stop=stop,
            answers=answers,
        )
        try:
            for chunk in chunks:
                # A long-text Plan carries exact token counts: pack and pace by those.
                counts = getattr(chunk, "tokens", None)
                stream.feed(getattr(chunk, "texts", chunk), counts)
                yield from stream.ready()
            yield from stream.finish()
        finally:
            stream.cancel()

    def embed(self, texts: Sequence[Any], metrics: Metrics | None = None) -> EmbedResults:
        """Embed one chunk of texts (see :meth:`embed_stream`)."""
        with contextlib.closing(self.embed_stream([texts], metrics)) as stream:
            return next(stream)

    def preflight(self) -> tuple[int, str | None]:
        """Send one tiny request; return ``(dimensions, model)``.

        Raises:
            EndpointConfigError: 401/403/404/422, with the fix named.
            ServiceError, TransportError, QuotaExhaustedError: the request failed otherwise.
        """
        response = self.probe()
        return response.vectors.shape[1], response.model

    def probe(self, text: str = PREFLIGHT_TEXT) -> BackendResponse:
        """Embed one short text (the preflight's); the answer, with its vector.

        Raises:
            as :meth:`preflight`.
        """
        estimates = np.array([estimate_tokens(text)])
        segment = self._run(self._send([text], estimates, Metrics(), fail_fast=True))
        assert segment is not None  # one text is never split
        if segment.response is None:
            assert segment.failure is not None
            raise segment.failure
        return segment.response

    def close(self) -> None:
        """Close the backends' connections; later calls build nothing and fail."""
        if not self.closed:
            self.closed = True
            for route in self._routes:
                self._loop.submit(route.backend.close()).result(timeout=CLOSE_TIMEOUT_S)

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self._loop.submit(coroutine).result()

    # -- async core: runs on the process loop -------------------------------------------

    async def _embed_batch(
        self,
        texts: list[str],
        estimates: np.ndarray,
        metrics: Metrics,
        stop: Callable[[], bool],
        budget: BudgetGuard | None = None,
    ) -> list[Segment]:
        """Embed one packed batch; on a 400, bisect until the bad inputs stand alone. A batch
        too large for the quota the limiter learned is split in two halves of its tokens."""
        segment = await self._send(texts, estimates, metrics, stop, budget=budget)
        if segment is None:  # the halves go side by side, as the batch would have
            mid = _token_midpoint(estimates)
            left, right = await asyncio.gather(
                self._embed_batch(texts[:mid], estimates[:mid], metrics, stop, budget),
                self._embed_batch(texts[mid:], estimates[mid:], metrics, stop, budget),
            )
        elif segment.stop < len(texts):  # the limiter had room for a first part: the rest waits its turn
            mid = segment.stop
            left = await self._bisected(segment, texts[:mid], estimates[:mid], metrics, stop, budget)
            right = await self._embed_batch(texts[mid:], estimates[mid:], metrics, stop, budget)
        else:
            return await self._bisected(segment, texts, estimates, metrics, stop, budget)
        return _joined(left, right, mid)

    async def _bisected(
        self,
        segment: Segment,
        texts: list[str],
        estimates: np.ndarray,
        metrics: Metrics,
        stop: Callable[[], bool],
        budget: BudgetGuard | None,
    ) -> list[Segment]:
        """``segment``, the answer to the whole of ``texts``; if refused in a way one bad input
        may cause, the texts again in two halves, until the bad inputs stand alone."""
        failure = segment.failure
        if len(texts) == 1 or not (isinstance(failure, ServiceError) and failure.status in BISECT_STATUSES):
            return [segment]
        mid = len(texts) // 2
        left = await self._embed_batch(texts[:mid], estimates[:mid], metrics, stop, budget)
        right = await self._embed_batch(texts[mid:], estimates[mid:], metrics, stop, budget)
        return _joined(left, right, mid)

    async def _send(
        self,
        texts: list[str],
        estimates: np.ndarray,
        metrics: Metrics,
        stop: Callable[[], bool] = _never,
        *,
        fail_fast: bool = False,
        budget: BudgetGuard | None = None,
    ) -> Segment | None:
        """One request with retries: a response, why its rows failed, or unsent when stopping.

        A segment of a first part of the texts only (``stop`` below their number): the limiter
        had room for that part now, and the whole would have waited long; the caller sends the
        rest.

        None: the batch holds more tokens than the limiter now allows one request, and more
        than one text; the caller splits it. The limiter checks it on arrival and again when the
        request's turn comes: a limit learned while it waited (the first requests of a job told
        no quota are sized before any is known) must not send a request that takes a task's
        window.

        ``fail_fast`` (the preflight): a host that cannot be reached at all is a wrong
        ``endpoint.url``, raised at once instead of retried.

        In a pool, each attempt goes to the deployment :func:`~sparkembed.core.pool.choose`
        picks. An attempt that takes its deployment out moves the request to another at once,
        and does not count against ``retry.max_attempts``.
        """
        tokens = int(estimates.sum())
        started, waited, attempt, counted, throttled = self._clock(), 0.0, 0, 0, False
        failed: Segment | None = None  # why the rows fail, if every deployment stays out
        while True:
            if stop():
                metrics.limiter_wait_s += waited
                return Segment(0, len(texts), attempt, unsent=True)
            route = self._routes[0] if not self._pooled else choose(self._routes, tokens)
            if route is None:  # every deployment of the pool is out
                given_up = await self._wait_for_a_deployment(started + waited, failed, len(texts), attempt)
                if given_up is not None:
                    metrics.limiter_wait_s += waited
                    return given_up
                continue
            if route.exhausted and self._clock() < route.exhausted[0] and not self._pooled:
                reason = route.exhausted[1]
                failure = QuotaExhaustedError(reason)
                return Segment(0, len(texts), attempt, error=reason, failure=failure, deployment=route.name)
            probe = self._pooled and route.breaker.state == "half-open"
            if self._pooled:
                route.breaker.admit()
            attempt += 1
            try:
                # After a 429 the request goes ahead of new ones, or they would take the room it waits for.
                cuts = _cuts(estimates)
                grant = await route.limiter.acquire(tokens, retry=throttled, cuts=cuts)
            except BaseException:  # cancelled: a probe that never went must not keep the others out
                if probe:
                    route.breaker.release()
                raise
            if grant is None:  # a limit learned while it waited makes it too large: split it
                if probe:
                    route.breaker.release()
                metrics.limiter_wait_s += waited
                return None
            waited += grant.waited_s
            if grant.estimate < tokens:  # the limiter had room for a first part only: it goes alone
                kept = bisect.bisect_right(cuts, grant.estimate)
                texts, estimates, tokens = texts[:kept], estimates[:kept], grant.estimate
            if self._pooled and not probe and route.breaker.state != "closed":
                route.limiter.withdraw(grant)  # it went out while this waited: choose again
                attempt -= 1
                continue
            # The wait for quota may have been long: hand the quota back. A budget at its cap
            # leaves the rows unsent too, like a stop.
            if stop() or (budget is not None and not await self._reserve(budget, tokens, stop)):
                route.limiter.withdraw(grant)
                if probe:
                    route.breaker.release()
                metrics.limiter_wait_s += waited
                return Segment(0, len(texts), attempt - 1, unsent=True)
            try:
                response = await self._attempt(route, texts, attempt, metrics)
            except (ServiceError, TransportError) as error:
                if budget is not None:
                    budget.settle(tokens, 0)
                if fail_fast and isinstance(error, TransportError) and error.unreachable:
                    raise EndpointConfigError(f"{error}: check endpoint.url") from None
                # Time in the limiter is pacing, not hanging: the total timeout leaves it out.
                elapsed_s = self._clock() - started - waited
                decision = self._after_failure(route, error, grant, counted + 1, elapsed_s)
                if self._pooled and self._took_out(route, error, decision):
                    failed = self._give_up(route, error, decision, attempt, len(texts), pooled=True)
                    continue  # to another deployment, at once
                counted += 1
                if decision.action == "retry":
                    throttled = isinstance(error, ServiceError) and error.status == 429
                    await self._sleep(decision.delay_s)
                    continue
                metrics.limiter_wait_s += waited
                return self._give_up(route, error, decision, attempt, len(texts))
            except BaseException:
                if budget is not None:
                    budget.settle(tokens, 0)
                if probe:
                    route.breaker.release()
                raise
            if budget is not None:
                budget.settle(tokens, response.prompt_tokens)
            route.breaker.succeeded()
            route.last_failure = None
            route.limiter.settle(grant, response.prompt_tokens)
            route.limiter.on_success(grant, response.remaining_tokens, response.remaining_requests)
            metrics.limiter_wait_s += waited
            return Segment(0, len(texts), attempt, response=response, deployment=route.name)

    async def _reserve(self, budget: BudgetGuard, tokens: int, stop: Callable[[], bool]) -> bool:
        """Reserve ``tokens`` against the run's cap, waiting while requests in flight might be
        billed below it (up to :data:`~sparkembed.core.budget.WAIT_S`); False at the cap."""
        deadline = self._clock() + budget_wait_s
        while (verdict := budget.take(tokens)) is None:
            if stop() or self._clock() > deadline:
                budget.give_up()
                return False
            await self._sleep(budget_poll_s)
        return verdict

    def _took_out(self, route: Route, error: ServiceError | TransportError, decision: Decision) -> bool:
        """Tell ``route``'s breaker; whether the deployment is out now."""
        hold_s = error.retry_after_s if isinstance(error, ServiceError) else None
        route.breaker.failed(verdict(error, decision.action), hold_s)
        return route.breaker.state != "closed"

    async def _wait_for_a_deployment(
        self, paused_since: float, failed: Segment | None, n: int, attempts: int
    ) -> Segment | None:
        """Every deployment is out: wait for one to be probed again, unless that would pass
        ``retry.total_timeout_s``; the rows' failed segment when giving up.

        Raises:
            EndpointConfigError: every deployment refused the setup (401/403/404).
            QuotaExhaustedError: every deployment's quota is exhausted, with ``on_quota_exhausted: stop``.
        """
        causes = {route.name: route.exhausted for route in self._routes}
        refused = all(isinstance(route.last_failure, EndpointConfigError) for route in self._routes)
        if refused and failed is not None and failed.failure is not None:
            raise failed.failure
        now = self._clock()
        if all(until is not None and now < until[0] for until in causes.values()):
            reason = "every deployment's quota is exhausted: " + "; ".join(
                until[1] for until in causes.values() if until is not None
            )
            if self.config.retry.on_quota_exhausted == "stop":
                raise QuotaExhaustedError(reason)
            return Segment(0, n, attempts, error=reason, failure=QuotaExhaustedError(reason))
        wait_s = ready_in_s(self._routes)
        if now + wait_s - paused_since > self.config.retry.total_timeout_s:
            why = failed.error if failed is not None else "no deployment answered"
            reason = f"every deployment of the pool is out: {why}"
            failure = failed.failure if failed is not None else None
            deployment = failed.deployment if failed is not None else None
            return Segment(0, n, attempts, error=reason, failure=failure, deployment=deployment)
        await self._sleep(wait_s)
        return None

    def _after_failure(
        self, route: Route, error: ServiceError | TransportError, grant: Grant, attempt: int, elapsed_s: float
    ) -> Decision:
        """Tell the limiter, then ask the policy what to do."""
        route.limiter.settle(grant, 0)  # a refused request costs no quota
        decision = self._policy.decide(error, attempt, elapsed_s)
        # The quota is shared: a 429 cools down all traffic, not only this request. (An
        # exhausted quota fails rows instead: pausing everyone for hours would hang the run.)
        if isinstance(error, ServiceError) and error.status == 429 and decision.action != "quota_exhausted":
            route.limiter.on_throttle(grant, error.retry_after_s)
        return decision

    async def _attempt(
        self, route: Route, texts: list[str], attempt: int, metrics: Metrics
    ) -> BackendResponse:
        """One HTTP attempt under a hard time cap, recorded in the timeline."""
        start, status, usage = time.time(), 0, (0, 0)
        try:
            response = await asyncio.wait_for(route.backend.embed(texts), timeout=self._attempt_timeout_s)
            self._check_dims(response)
            status, usage = 200, (response.prompt_tokens, response.total_tokens)
            return response
        except asyncio.TimeoutError as exc:
            raise TransportError(f"no answer within {self._attempt_timeout_s:g} s") from exc
        except ServiceError as error:
            status = error.status
            raise
        finally:
            record = RequestRecord(start, time.time(), len(texts), usage[0], status, attempt, route.name)
            metrics.record(record, total_tokens=usage[1])

    def _check_dims(self, response: BackendResponse) -> None:
        dims = response.vectors.shape[1]
        if self._dims is None:
            self._dims = dims
        elif dims != self._dims:
            raise ServiceError(502, "invalid_response", f"{dims} dimensions, expected {self._dims}")

    def _give_up(
        self,
        route: Route,
        error: ServiceError | TransportError,
        decision: Decision,
        attempts: int,
        n: int,
        *,
        pooled: bool = False,
    ) -> Segment:
        """Raise for config errors and ``stop``; otherwise the rows fail with the reason.

        ``pooled``: ``route`` is out and the request moves on; the segment is kept only
        in case every deployment stays out, and config errors are raised only then.
        """
        named = f"{route.name}: " if self._pooled else ""
        if decision.action == "config_error" and isinstance(error, ServiceError):
            endpoint = route.config.endpoint
            problem = config_error_for(
                error,
                model=endpoint.model,
                dimensions=endpoint.dimensions,
                input_type=endpoint.input_type,
                key_env=route.config.auth.key_env,
                url=endpoint.url,
            )
            if self._pooled and error.status in (401, 403, 404):
                problem = EndpointConfigError(f"deployment {named}{problem}", status=error.status)
                route.last_failure = problem
                if pooled:
                    return Segment(0, n, attempts, error=str(problem), failure=problem, deployment=route.name)
            raise problem from error
        route.last_failure = None
        if decision.action == "quota_exhausted":
            reason = f"{named}quota exhausted: {decision.reason}"
            # Until the service's retry-after passes, fail rows without sending.
            retry_after = (error.retry_after_s if isinstance(error, ServiceError) else None) or 0.0
            route.exhausted = (self._clock() + retry_after, reason)
            if self.config.retry.on_quota_exhausted == "stop" and not pooled:
                raise QuotaExhaustedError(reason) from error
            return Segment(
                0, n, attempts, error=reason, failure=QuotaExhaustedError(reason), deployment=route.name
            )
        reason = named + (decision.reason or str(error))
        return Segment(0, n, attempts, error=reason, failure=error, deployment=route.name)


def request_token_cap(config: EmbedConfig, share: float = 1.0) -> int:
    """Estimated tokens per request: ``batching.max_request_tokens``, and with a TPM quota at
    most 1/:data:`REQUESTS_PER_QUOTA_MINUTE` of this worker's ``share`` of it (of a pool's
    smallest deployment's)."""
    cap = config.batching.max_request_tokens
    limits = config.limits
    # In a pool, the smallest deployment's quota: a request must fit whichever one it goes to.
    quota = min((m.tokens_per_minute for m in config.endpoint.pool), default=limits.tokens_per_minute)
    if quota:
        mine = quota * limits.max_share * share
        cap = min(cap, max(1, int(mine / REQUESTS_PER_QUOTA_MINUTE)))
    return cap


def _share_limiter(
    limits: LimitsConfig,
    share: float,
    *,
    minute_s: float = 60.0,
    clock: Callable[[], float] = time.monotonic,
) -> RateLimiter:
    """This worker's ``share`` of the job's part of the quota (learned from the service if unset).

    With ``limits.max_share`` below 1 the job keeps the rest of the quota free for others: its
    limits shrink to that share. The room the service reports already leaves out what the
    others sent, so it is not cut again: others busier than their part shrink the job's
    bound, and idle ones leave it at the share.
    """
    tpm, rpm, mine = limits.tokens_per_minute, limits.requests_per_minute, limits.max_share
    return RateLimiter(
        tpm * mine * share if tpm else None,
        rpm * mine * share if rpm else None,
        share=share,
        minute_s=minute_s,
        keep_share=mine < 1,
        clock=clock,
    )


def build_routes(
    config: EmbedConfig,
    make_backend: Callable[[EmbedConfig], Backend],
    share: float = 1.0,
    *,
    minute_s: float = 60.0,
    clock: Callable[[], float] = time.monotonic,
) -> list[Route]:
    """One :class:`Route` per deployment of ``config`` (a pool's, or its one URL): its backend,
    this worker's ``share`` of its quota, and a breaker.

    Args:
        minute_s: the service's minute in seconds (tests against a scaled endpoint shorten it).
    """
    routes = []
    for name, one in config.deployments():
        limiter = _share_limiter(one.limits, share, minute_s=minute_s, clock=clock)
        routes.append(Route(name, make_backend(one), limiter, one, Breaker(clock=clock)))
    return routes


def _cuts(estimates: np.ndarray) -> list[int]:
    """Where a batch may be cut: the estimated tokens of its first 1 .. n - 1 texts."""
    return [int(total) for total in np.cumsum(estimates)[:-1]]


def _joined(left: list[Segment], right: list[Segment], mid: int) -> list[Segment]:
    """The segments of a batch cut at ``mid``: ``right``'s positions follow ``left``'s."""
    return left + [replace(s, start=s.start + mid, stop=s.stop + mid) for s in right]


def _token_midpoint(estimates: np.ndarray) -> int:
    """Where to cut a batch into two halves of about the same estimated tokens (1 to n - 1)."""
    half = int(np.searchsorted(np.cumsum(estimates), estimates.sum() / 2, side="right"))
    return min(max(half, 1), len(estimates) - 1)


# -- one event loop and one embedder per process --------------------------------------


class _LoopThread:
    """An asyncio event loop running forever on a daemon thread."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="sparkembed-loop")
        self._thread.daemon = True
        self._thread.start()

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=CLOSE_TIMEOUT_S)


_lock = threading.RLock()
_loop_thread: _LoopThread | None = None
_embedders: dict[str, Embedder] = {}


def _process_loop() -> _LoopThread:
    """This process's loop; a forked child (Spark's Python workers) builds its own."""
    global _loop_thread
    with _lock:
        if _loop_thread is None or _loop_thread.pid != os.getpid():
            _loop_thread = _LoopThread()
            _embedders.clear()  # the parent's clients live on the parent's loop
        return _loop_thread


def get_embedder(
    config: EmbedConfig, make_backend: Callable[[EmbedConfig], Backend], share: float = 1.0
) -> Embedder:
    """The process's :class:`Embedder` for ``config``: built once, reused by every task.

    ``make_backend`` builds its backend the first time (:func:`sparkembed.backends.make_backend`).
    """
    key = f"{config.client_key()}/{share}"
    keep_freed_memory()  # answers are megabytes each: reuse their memory, request after request
    with _lock:
        _process_loop()
        embedder = _embedders.get(key)
        if embedder is None or embedder.closed:
            if config.endpoint.pool:
                routes = build_routes(config, make_backend, share)
                embedder = Embedder(config, share=share, routes=routes)
            else:
                embedder = Embedder(config, make_backend(config), share=share)
            _embedders[key] = embedder
        return embedder


@atexit.register
def _shutdown() -> None:
    with _lock:
        if _loop_thread is None or _loop_thread.pid != os.getpid():
            return
        for embedder in _embedders.values():
            # Exiting anyway: a failed close must not mask the exit status.
            with contextlib.suppress(Exception):
                embedder.close()
        _embedders.clear()
        _loop_thread.stop()

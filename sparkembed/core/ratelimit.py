"""Pacing one worker's share of a deployment's quota, whatever way the service meters it.

Azure does not say exactly how it meters TPM and RPM: a token bucket holding a minute of
quota, a count over the last 60 s (10 s for RPM), or a count reset every clock minute all
fit its documentation. The pacer must be right under all three without being told which,
so it keeps the strictest: what this worker sent in any trailing window stays within its
limit. That is safe under each model, since a fixed window lies inside a trailing one, and a
bucket refilled over a minute grants at least a trailing window's worth. It never plans on a
burst a service may refuse, yet spends a full window's quota as soon as it is there.

The limit starts at the configured share (quota / workers), or none. Then the service's own
signals bound what the job may send in a window: after a success, what was sent in the
window plus the room the service reports left (``x-ratelimit-remaining-*``); after a 429,
what was sent plus the refused cost. "What was sent" is what the service counted when it
took the request: the sends of its minute before then, including those that have aged out
of the pacer's window by the time the answer (or a peer's file) arrives, so each worker
keeps its charges two windows. The tightest bound of the last few windows wins, so
the pacer finds the real limit when the quota is unset or set too high, and follows a limit
that wanders down. A reading taken when the job had nothing in the window is the limit now
under every model, so it replaces the older bounds: a job that spends each window in a burst
(as it does once a trailing window frees all at once) follows a limit that rose, too.
And the room a success reports is what the service admits right then, under every model:
once the whole job has sent its bound, one worker spends that room past it for a second
(:meth:`RateLimiter._room_fits`), so a burst is not held to the wander's low of the last
windows.

What the other workers sent is known in one of two ways:

- **Peers** (:class:`PeerView`, from the run's spend files, :mod:`.runlog`): every worker
  publishes its charges, so each knows the others' and how many are active. The bound is
  then exact, and each active worker takes an equal part of it, cut in whole requests
  (:meth:`SendWindow._in_whole_requests`): tasks of equal work finish together, and when a
  task ends the others' parts grow at once (the wave's tail). One that holds more than its
  part (it spent room the service reported, below) keeps it, and the others share what is
  left (:func:`equal_part`): once the job's older sends age out, they do not each spend the
  same room. A worker
  also never sends past the bound counting what the others sent (a task that just ended
  still has its last minute counted by the service).
- **No peers** (the UDF, or a folder the executors cannot share): the worker assumes the
  others sent what it sent, so its part is what it sent plus its share of the room. A worker
  that started first keeps a larger part, and the part grows in a wave's tail as old bounds
  age out (never past the configured quota).

With ``limits.max_share`` the room the service reports is partly other clients' part: the
job never replaces a tight bound with a fresh reading, and after its first window it sends at
an even rate instead of a window at once, so its readings see the limit all through the
window, and a limit that dips after a burst does not leave the others' requests refused.

Estimates are in the job's tokens, which may not be the service's (a tokenizer guessed for an
unnamed model, or the byte bound): the pacer learns the ratio of billed usage to estimate
from every success and charges estimates at that rate, so a burst never outruns the room.

The first request goes alone: its answer tells the room there is, before any burst. So does
the first after a quiet spell (a sixth of the window with no answer, as between the bursts of
a sliding window): the limit may have wandered meanwhile, and a burst on a stale reading
would be refused.
A 429 pauses every acquirer until its retry-after. Waiters go first come, first served, and
a request retried after a 429 goes ahead of new ones, so a large request is never starved.
A request that can be split and has become larger than a fifth of the limit while it waited
(a limit learned meanwhile) is handed back to be split when its turn comes, instead of
waiting for a window of its own. One that would wait long for its window sends now the longest
first part that fits, so a burst spends the room it leaves under one request (a window's room
never carries over), and the rest goes as a request of its own. Where no confirmed quota caps
the bound, that part must also fit the room the service reported just now.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

HEADROOM = 0.01
"""Fraction of the limit left unused, so small estimate errors don't cost 429s."""
WINDOW_MARGIN = 0.005
"""Windows are this much longer than the service's, so a request that reaches the service
later than the one it replaces (network jitter) still finds the old one gone: 0.3 s of a
minute, 50 ms of RPM's 10 s. Every bit of it is quota left unused in a steady run."""
DEFAULT_COOLDOWN_S = 1.0
"""Pause after a 429 that gave no retry-after, in seconds."""
RATIO_MEMORY = 0.9
"""Weight of the past in the learned ratio of billed tokens to estimated tokens, per success."""
BOUND_HORIZON_WINDOWS = 2.0
"""A bound learned from the service counts for this many windows, then a newer one may raise the limit."""
REQUESTS_PER_LIMIT = 5
"""A request larger than this part of the limit is split before it is sent (see
:meth:`RateLimiter.request_cap`): with several workers it could otherwise wait forever for room."""
SMOOTH_BURST = 0.1
"""With ``limits.max_share``, after its first window the job sends at an even rate, with bursts
of at most this part of its limit: other clients' traffic keeps its room all through the window."""
ROOM_FRESH = 1 / 60
"""The room a success reports may be spent this part of a minute after its request went (1 s)."""
FIRST_PART_WAIT = 1 / 6
"""A request that may be cut and would wait longer than this part of a window sends now the
longest first part that fits, and the rest waits its turn: room a burst leaves under one request
is spent, not lost when the window turns (:meth:`RateLimiter._first_part`)."""
QUOTA_CONFIRMED = 0.9
"""A bound learned from the service at least this part of the configured quota confirms the
quota: a limit that wanders a few percent about it reads near it, one set too high (twice the
limit, say) reads well under it."""
LEAST_PART = 0.1
"""A first part holds at least this part of its request's tokens, so no request is cut into crumbs."""
PEER_POLL_S = 0.25
"""With peers, a sleeping waiter looks again at least this often: their charges change."""
_EPSILON = 1e-9
"""Slack for float round-off when a sleeper wakes on time (seconds; relative for amounts)."""


class SendWindow:
    """What this worker sent in the trailing ``window_s`` seconds, and the most it may send.

    ``bound`` is the most the whole job may send in a window: the tightest of what
    :meth:`learn` was told in the last :data:`BOUND_HORIZON_WINDOWS` windows, never above
    ``quota`` (None: unknown). This worker's limit is its part of that: ``share`` of it, up to
    the whole quota (if ``alone``), or with ``peers`` set (active workers, this
    one included) an equal part of what workers that ended do not still hold (``held``):
    equal among those that hold less than it, while one that holds more (it spent room the
    service reported past the bound) keeps what it holds (``peer_used``: what each other
    active worker holds in the window).
    Before anything is learned the limit is ``share`` (or the equal part) of ``quota``. A cost
    larger than the limit goes into an empty window. Unless ``alone``, sends are also spread
    evenly once the first window's worth is spent (:data:`SMOOTH_BURST`)::

        window = SendWindow(60_000, 60.0)
        window.delay_s(1_000)            # 0.0
        charge = window.take(60_000)
        window.delay_s(1_000)            # 60.0: when the 60,000 age out
        window.correct(charge, 59_000)   # the service billed less
    """

    __slots__ = (
        "window_s", "share", "peers", "rank", "held", "peer_used", "_clock", "_sent", "_used", "_quota",
        "_bounds", "_keep", "_alone", "_history", "_level", "_level_at",
    )  # fmt: skip

    def __init__(
        self,
        quota: float | None,
        window_s: float,
        *,
        share: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        headroom: float = 0.0,
        alone: bool = True,
    ) -> None:
        self.window_s = window_s
        self.share = share
        self._alone = alone
        self.peers: int | None = None
        self.rank = 0  # with peers: how many of them come before this one (by pacer id)
        self.held = 0.0
        self.peer_used: tuple[float, ...] = ()
        self._clock = clock
        self._keep = 1 - headroom
        self._sent: deque[list[float]] = deque()  # [when, amount], oldest first
        self._history: deque[list[float]] = deque()  # the same charges, kept two windows
        self._used = 0.0
        self._quota = None if quota is None else quota * self._keep
        self._bounds: deque[tuple[float, float]] = deque()  # (when, bound)
        self._level: float | None = None  # not alone: what may be sent now at the even rate
        self._level_at = 0.0

    @property
    def bound(self) -> float | None:
        """The most the whole job may send in one window now (headroom taken off); None: unknown."""
        if not self._bounds:
            return self._quota
        self._forget(self._clock())
        learned = self._bounds[0][1]
        return learned if self._quota is None else min(learned, self._quota)

    @property
    def quota(self) -> float | None:
        """The configured quota of a window (headroom taken off); None: none configured."""
        return self._quota

    @property
    def learned(self) -> bool:
        """Whether the service said anything yet (else the bound is the configured quota)."""
        return bool(self._bounds)

    @property
    def learned_bound(self) -> float | None:
        """The tightest bound the service taught (headroom taken off), None before any."""
        if not self._bounds:
            return None
        self._forget(self._clock())
        return self._bounds[0][1]

    def adopt(self, bound: float) -> None:
        """Start from ``bound``, another worker's :attr:`learned_bound`, until this one learns
        its own: a worker joining a busy job then waits for room instead of probing into it."""
        if not self._bounds:
            self._bounds.append((self._clock(), bound))

    @property
    def limit(self) -> float | None:
        """The most this worker may send in one window now (headroom taken off); None: no limit."""
        split = self._split()
        return None if split is None else split[0]

    @property
    def part(self) -> float | None:
        """This worker's limit once what ended workers hold has aged out (an equal part, with peers)."""
        bound = self.bound
        if self.peers is None or bound is None:
            return self._part()
        return bound / self.peers

    def _split(self) -> tuple[float, int, int] | None:
        """This worker's limit, how many workers share the job's bound equally (with peers),
        and how many of those come before this one."""
        bound = self.bound
        if self.peers is None or bound is None:
            part = self._part()
            return None if part is None else (part, 1, 0)
        held = list(self.peer_used) + [0.0] * (self.peers - 1 - len(self.peer_used))
        held.insert(self.rank, self.used())
        part, shares = equal_part(bound - self.held, held)
        return max(1.0, part), sum(shares), sum(shares[: self.rank])

    def _part(self) -> float | None:
        bound = self.bound
        if bound is None:
            return None
        if not self._bounds or self._quota is None or not self._alone:
            return bound * self.share
        return min(self._bounds[0][1] * self.share, self._quota)  # a tail task may take it all

    def used(self, now: float | None = None) -> float:
        """What was sent in the window ending now."""
        self._expire(self._clock() if now is None else now)
        return self._used

    def sent(self, windows: float = 1.0) -> list[list[float]]:
        """The charges of the last ``windows`` windows (at most 2), oldest first: ``[when,
        amount]`` on this window's clock. Safe from another thread: it changes nothing."""
        start = self._clock() - windows * self.window_s
        return [[when, amount] for when, amount in list(self._history) if when > start]

    def sent_between(self, start: float, end: float) -> float:
        """What was sent after ``start`` and up to ``end`` (within the last two windows)."""
        return _sum_between(self._history, start, end)

    def delay_s(self, cost: float) -> float:
        """Seconds until ``cost`` fits in the window (until it is empty, if it exceeds the limit)."""
        now = self._clock()
        self._expire(now)
        split = self._split()
        if split is None:
            return 0.0
        limit, sharing, rank = split
        pace = self._pace_delay(cost, limit, now)
        limit = self._in_whole_requests(limit, sharing, rank, cost)
        if self._used < 1 or self._used + cost <= limit * (1 + _EPSILON):
            return pace  # under a token left: only refused or withdrawn charges, none counted
        must_free = self._used + cost - limit if cost <= limit else self._used
        return max(pace, _time_to_free(self._sent, must_free, self.window_s, now))

    def _in_whole_requests(self, limit: float, sharing: int, rank: int, cost: float) -> float:
        """With peers, this worker's part when the ``sharing`` equal parts are cut in whole
        requests of ``cost`` (``rank``: how many of those come before this one).

        Equal parts each strand what is left under one request: with parts of 7.9 requests,
        every worker sends 7, and the job 0.89 of its bound. Cut in whole requests, the parts
        still add up to the bound: the first workers by rank take the one more request that
        fits, and each keeps an equal part of what is left under one. Not with
        ``limits.max_share`` (not ``alone``): in the integration test of a client beside the
        job, whole-request parts gave that client over 1 % 429s in 4 of 6 runs (not yet
        understood), equal parts in none.
        """
        if self.peers is None or sharing < 2 or cost <= 0 or not self._alone:
            return limit
        whole = limit * sharing
        fits = math.floor(whole / cost * (1 + _EPSILON))
        if fits < sharing:
            return limit  # under a request each: each waits for its window to empty
        mine = fits // sharing + (rank < fits % sharing)
        return mine * cost + (whole - fits * cost) / sharing

    def _pace_delay(self, cost: float, limit: float, now: float) -> float:
        """Seconds until the even rate allows ``cost`` (not ``alone``; else 0)."""
        if self._alone:
            return 0.0
        level, need = self._refill(limit, now), min(cost, limit * SMOOTH_BURST)
        return 0.0 if level >= need * (1 - _EPSILON) else (need - level) * self.window_s / limit

    def _refill(self, limit: float, now: float) -> float:
        """The even rate's allowance now: a whole limit at first (the first window goes at
        once, as a bucket's would), then refilled at ``limit`` a window up to a small burst."""
        if self._level is None:
            self._level = limit
        else:
            refilled = self._level + (now - self._level_at) * limit / self.window_s
            self._level = min(refilled, max(self._level, limit * SMOOTH_BURST))
        self._level_at = now
        return self._level

    def take(self, cost: float) -> list[float]:
        """Record ``cost`` sent now; return the charge, for :meth:`correct`."""
        now = self._clock()
        self._expire(now)
        charge = [now, float(cost)]
        limit = None if self._alone else self.limit
        if limit is not None:
            self._level = self._refill(limit, now) - cost
        self._sent.append(charge)
        self._history.append(charge)
        self._used += cost
        return charge

    def correct(self, charge: list[float], amount: float) -> None:
        """Change a charge to what the service billed (0: it refused the request)."""
        if charge[0] > self._clock() - self.window_s:  # still counted
            self._used += amount - charge[1]
        if self._level is not None:
            self._level += charge[1] - amount
        charge[1] = float(amount)

    def learn(self, bound: float, *, fresh: bool = False) -> None:
        """The service says the job may send at most ``bound`` in a window (headroom aside).

        ``fresh``: read with nothing of the job's in the window, so the room the service
        reported is its whole limit now (whether it meters a trailing window, clock minutes or
        a bucket of a minute): it replaces the older bounds, so a limit that rose is followed
        at once (unless other clients share the deployment: not ``alone``). Other readings
        may be loose (a clock minute that reset, a bucket that refilled): only the tightest
        of the horizon counts.
        """
        now, bound = self._clock(), max(1.0, bound) * self._keep
        if fresh and self._alone:
            self._bounds.clear()
        # Oldest first, and increasing: an older, larger bound can never be the tightest again.
        while self._bounds and self._bounds[-1][1] >= bound:
            self._bounds.pop()
        self._bounds.append((now, bound))
        self._forget(now)

    def _forget(self, now: float) -> None:
        while len(self._bounds) > 1 and self._bounds[0][0] < now - BOUND_HORIZON_WINDOWS * self.window_s:
            self._bounds.popleft()

    def _expire(self, now: float) -> None:
        while self._sent and self._sent[0][0] <= now - self.window_s:
            self._used -= self._sent.popleft()[1]
        while self._history and self._history[0][0] <= now - 2 * self.window_s:
            self._history.popleft()
        if not self._sent:
            self._used = 0.0  # no float residue once empty


def equal_part(total: float, held: Sequence[float]) -> tuple[float, tuple[bool, ...]]:
    """An equal part of ``total`` for the workers that hold ``held`` now, and which of them
    share it: one that holds more than its part keeps what it holds, and the others share
    what is left, so the limits add up to ``total`` (no room is left to two workers)::

        equal_part(240, [0, 0, 0, 0])     # (60.0, (True, True, True, True))
        equal_part(240, [0, 190, 0, 0])   # (16.66..., (True, False, True, True))
    """
    over, shares = 0.0, [True] * len(held)
    for index in sorted(range(len(held)), key=lambda k: -held[k])[: len(held) - 1]:
        if held[index] <= (total - over) / sum(shares):
            break
        over += held[index]
        shares[index] = False
    return (total - over) / sum(shares), tuple(shares)


def _time_to_free(sent: Iterable[Sequence[float]], must_free: float, window_s: float, now: float) -> float:
    """Seconds until charges ``sent`` (``[when, amount]``, oldest first) free ``must_free``
    as they age out of the window; until the last ages out if they hold less."""
    freed, last = 0.0, now - window_s
    for when, amount in sent:
        freed += amount
        last = when
        if freed >= must_free * (1 - _EPSILON):
            break
    return max(0.0, last + window_s - now)


def _sum_between(charges: Iterable[Sequence[float]], start: float, end: float) -> float:
    """What ``charges`` (``(when, amount)``) hold after ``start`` and up to ``end``."""
    return sum(amount for when, amount in charges if start < when <= end)


Charges = tuple[tuple[float, float], ...]
"""A pacer's charges: ``(when, amount)``, oldest first."""


@dataclass(frozen=True)
class PeerView:
    """The other workers pacing on the same deployment, as their spend files last said.

    Attributes:
        workers: workers sending now, this one included.
        tokens, requests: the others' charges of the last two windows, ``(when, amount)`` oldest
            first, ``when`` on the wall clock (``time.time()``), since they ran elsewhere.
        as_of: the others' charges are all known up to this wall-clock time.
        ended_tokens, ended_requests: the part of those charges made by workers that no
            longer send (their tasks ended): what they hold ages out, and no one else's.
        tokens_bound, requests_bound: the tightest bounds the sending ones learned (per
            window, headroom taken off), None if none did.
        rank: how many of the sending ones come before this one (by pacer id); the first
            alone spends room the service reports past the bound (:meth:`RateLimiter._room_fits`).
        each_tokens, each_requests: the charges of each sending one (those of ``tokens`` and
            ``requests``, worker by worker, by pacer id): one that holds more than an equal
            part keeps it, and the others share what is left (:func:`equal_part`).
    """

    workers: int
    tokens: Charges = ()
    requests: Charges = ()
    as_of: float = math.inf
    ended_tokens: Charges = ()
    ended_requests: Charges = ()
    tokens_bound: float | None = None
    requests_bound: float | None = None
    rank: int = 0
    each_tokens: tuple[Charges, ...] = ()
    each_requests: tuple[Charges, ...] = ()


class _Reading:
    """The room a service reported, as bounds on what the job may send in a window, waiting
    until this worker's requests in flight when it arrived are settled: any of them may have
    been counted. ``scale``: how much one unit this worker sent weighs in the bounds (the
    workers it stands for, without peers). ``fresh``: the job had nothing in the window when
    the request went (with peers, once their files confirm it)."""

    __slots__ = ("tokens", "requests", "waiting", "scale", "at", "fresh")

    def __init__(
        self,
        tokens: float | None,
        requests: float | None,
        waiting: int,
        scale: float,
        at: float | None,
        fresh: bool = False,
    ) -> None:
        self.tokens = tokens
        self.requests = requests
        self.waiting = waiting
        self.scale = scale
        self.at = at  # with peers: when it arrived (wall clock), to add what they had sent by then
        self.fresh = fresh


@dataclass(eq=False)
class Grant:
    """One admitted request, handed back to :meth:`RateLimiter.settle` and friends.

    Attributes:
        tokens: the tokens charged: the estimate at the learned rate of billed to estimated.
        waited_s: seconds :meth:`RateLimiter.acquire` waited.
        estimate: the caller's estimate (of the first part only, if :meth:`RateLimiter.acquire` cut it).
    """

    tokens: float
    waited_s: float = 0.0
    estimate: int = 0
    _charges: tuple[list[float] | None, list[float] | None] = field(default=(None, None), repr=False)
    _readings: list[_Reading] = field(default_factory=list, repr=False)


class RateLimiter:
    """Admit requests within a learned share of TPM and RPM; pause on 429s.

    Only the head waiter sleeps, until the moment its cost fits; the rest wait for their
    turn, so no one polls::

        limiter = RateLimiter(tokens_per_minute=150_000, requests_per_minute=900)
        grant = await limiter.acquire(estimated_tokens)
        try:
            response = await send(batch)
        except ServiceError as exc:
            limiter.settle(grant, 0)                    # a refused request costs nothing
            if exc.status == 429:
                limiter.on_throttle(grant, exc.retry_after_s)
        else:
            limiter.settle(grant, response.prompt_tokens)
            limiter.on_success(grant, response.remaining_tokens, response.remaining_requests)

    Args:
        tokens_per_minute: this worker's share of the TPM quota; None: learn it from the service.
        requests_per_minute: this worker's share of the RPM quota; None likewise.
        share: this worker's part of the quota (1 / workers sharing it), when it has no
            peers (:attr:`peers`): it counts this fraction of the room the service reports
            as its own, and never goes past the whole quota (its limit / ``share``).
        clock: monotonic seconds; must tick with the event loop's ``time()``.
        headroom: fraction of the limit left unused.
        minute_s: the service's minute, in seconds (tests against a scaled endpoint shorten it);
            RPM is paced over a sixth of it.
        keep_share: the job's quota is below the deployment's (``limits.max_share``): room the
            service reports may be other clients' part, not workers that ended, so without
            peers this worker never takes more than its share of the job's quota; and a fresh
            reading does not replace tighter bounds, since the others' traffic comes and goes
            and the limit may wander down under it (the job follows it down at once, and up
            only as tight bounds age out).
    """

    __slots__ = (
        "_tokens", "_requests", "_share", "_clock", "_queue", "_retries", "_kick",
        "_paused_until", "_waited_s", "_told_room", "_in_flight", "_heard_at", "_waiting",
        "_billed", "_estimated", "_wall", "_due", "_minute_s", "_room", "_keep_share", "_headroom",
        "peers", "id",
    )  # fmt: skip

    def __init__(
        self,
        tokens_per_minute: float | None,
        requests_per_minute: float | None,
        *,
        share: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        headroom: float = HEADROOM,
        minute_s: float = 60.0,
        keep_share: bool = False,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if not 0 <= headroom < 1:
            raise ValueError(f"headroom must be in [0, 1), got {headroom}")
        window_s = minute_s * (1 + WINDOW_MARGIN)
        self._minute_s = minute_s

        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share}")

        def window(per_minute: float | None, per_window: float, length_s: float) -> SendWindow:
            quota = None if per_minute is None else per_minute * per_window / share
            return SendWindow(
                quota, length_s, share=share, clock=clock, headroom=headroom, alone=not keep_share
            )

        self._tokens = window(tokens_per_minute, 1.0, window_s)
        self._requests = window(requests_per_minute, 1 / 6, window_s / 6)
        self._share = share
        self._clock = clock
        self._queue: deque[asyncio.Future[None]] = deque()
        self._retries = 0  # waiters at the front of the queue retrying after a 429
        self._kick: asyncio.Future[None] | None = None
        self._paused_until = clock()
        self._waited_s = 0.0
        self._told_room = False  # the service reports the tokens it has left
        self._in_flight: weakref.WeakSet[Grant] = weakref.WeakSet()  # granted, not yet settled
        self._heard_at: float | None = None  # when a request was last settled
        self._waiting = [0.0, 0]  # tokens and requests of the callers waiting in acquire
        self._billed = self._estimated = 0.0  # decayed sums of successes' usage and estimates
        self._wall = wall
        self._due: list[_Reading] = []  # readings waiting for the peers' charges until then
        self._keep_share = keep_share
        self._headroom = headroom
        self._room: tuple[float, float, float, float] | None = None
        """The latest success's room: when its request was charged, the room, the round trip, its charge."""
        self.peers: Callable[[], PeerView | None] | None = None
        """What the other workers on this deployment sent (set per task; None: unknown)."""
        self.id = uuid.uuid4().hex[:12]
        """Names this pacer in the spend files its peers read."""

    @property
    def waited_s(self) -> float:
        """Total seconds callers spent waiting in :meth:`acquire`."""
        return self._waited_s

    @property
    def token_limit(self) -> float | None:
        """Tokens this worker may send per minute now (headroom taken off); None: no limit known."""
        return self._tokens.limit

    @property
    def request_limit(self) -> float | None:
        """Requests this worker may send per 10 s now; None: no limit known."""
        return self._requests.limit

    @property
    def ratio(self) -> float:
        """Tokens the service bills per estimated token, learned from successes (1.0 at first)."""
        return self._billed / self._estimated if self._estimated else 1.0

    def sent(self) -> dict[str, list[list[float]]]:
        """This worker's charges of the last two windows, for its peers: ``[when, amount]`` on
        the wall clock, tokens and requests. A peer completes a reading with the charges of
        the service's window before it, once this file was written after it: kept one window
        only, those that aged out between the reading and the write would be missing."""
        offset = self._wall() - self._clock()
        return {
            "tokens": [[when + offset, amount] for when, amount in self._tokens.sent(2)],
            "requests": [[when + offset, amount] for when, amount in self._requests.sent(2)],
        }

    def learned(self) -> dict[str, float | None]:
        """The bounds the service taught this worker (per window, headroom taken off; None: not
        yet), for peers that start later and know nothing yet."""
        return {"tokens_bound": self._tokens.learned_bound, "requests_bound": self._requests.learned_bound}

    def request_cap(self) -> float | None:
        """Most estimated tokens one request should hold now: a :data:`REQUESTS_PER_LIMIT`
        part of the token limit (what ended peers still hold aside: it ages out within a
        window); None when no limit is known."""
        limit = self._tokens.part
        return None if limit is None else limit / REQUESTS_PER_LIMIT / self.ratio

    def _too_large(self, estimate: int) -> bool:
        cap = self.request_cap()
        return cap is not None and estimate > cap

    def load(self, tokens: int) -> float:
        """How booked this limiter would be with ``tokens`` more: what was sent in the window,
        what waits, and ``tokens``, over the limit (1.0: a full window), plus a 429's pause in
        windows. Of several deployments, the least booked sends soonest (:mod:`.pool`).
        0 with no limit known."""
        windows = max(0.0, self._paused_until - self._clock()) / self._tokens.window_s
        waiting_tokens, waiting_requests = self._waiting
        token_limit, request_limit = self._tokens.limit, self._requests.limit
        booked = 0.0
        if token_limit:
            booked = (self._tokens.used() + waiting_tokens + tokens * self.ratio) / token_limit
        if request_limit:
            booked = max(booked, (self._requests.used() + waiting_requests + 1) / request_limit)
        return windows + booked

    async def acquire(self, tokens: int, *, retry: bool = False, cuts: Sequence[int] = ()) -> Grant | None:
        """Wait until a request of ``tokens`` estimated tokens may be sent; charge it.

        Args:
            tokens: estimated tokens of the request.
            retry: the request was refused with a 429: it goes ahead of new requests.
            cuts: where the request may be cut: the estimated tokens of its first parts,
                ascending, each below ``tokens`` (none: one text). Such a request returns None,
                charging nothing, once its turn comes if it holds more than
                :meth:`request_cap` then: the caller splits it. A request sized before any limit
                was known (a job told no quota) would otherwise wait for a window of its own,
                then take a whole part at once. And if it would wait long, a first part that
                fits now may be granted: the grant's ``estimate`` is one of ``cuts``, and the
                caller sends that part alone (:meth:`_first_part`).
        """
        start, estimate = self._clock(), tokens
        cost = tokens * self.ratio
        divisible = bool(cuts)
        if divisible and self._too_large(estimate):
            return None
        if not self._queue and self._delay_s(cost) == 0:
            return self._take(cost, 0.0, estimate)
        turn = asyncio.get_running_loop().create_future()
        if retry:
            self._queue.insert(self._retries, turn)
            self._retries += 1
        else:
            self._queue.append(turn)
        if self._queue[0] is turn:
            self._wake_sleeper()  # a retry took the head: the old head must wait its turn
        self._waiting[0] += cost
        self._waiting[1] += 1
        try:
            while True:
                if self._queue[0] is not turn:
                    if turn.done():
                        turn = self._replace(turn)
                    await turn
                    continue
                if divisible and self._too_large(estimate):
                    self._waited_s += self._clock() - start
                    return None
                delay = self._delay_s(estimate * self.ratio)
                if delay == 0:
                    break
                long_wait = delay > FIRST_PART_WAIT * self._tokens.window_s
                if long_wait and (part := self._first_part(estimate, cuts)):
                    estimate = part
                    break
                await self._nap(delay)
            waited = self._clock() - start
            return self._take(estimate * self.ratio, waited, estimate)
        finally:
            self._waiting[0] -= cost
            self._waiting[1] -= 1
            if self._queue.index(turn) < self._retries:
                self._retries -= 1
            self._queue.remove(turn)
            if self._queue and not self._queue[0].done():
                self._queue[0].set_result(None)

    def settle(self, grant: Grant, actual_tokens: int) -> None:
        """Correct the charge once the service reported the real usage (0: it refused it)."""
        self._heard_at = self._clock()
        self._correct(grant, actual_tokens)

    def withdraw(self, grant: Grant) -> None:
        """Hand back a grant whose request was never sent (a stop, a budget at its cap, another
        deployment chosen): its charges are undone, and nothing counts as heard, so the first
        request of a task still goes alone until its answer's room is known."""
        self._correct(grant, 0)

    def _correct(self, grant: Grant, actual_tokens: int) -> None:
        self._in_flight.discard(grant)
        if actual_tokens > 0 and grant.estimate > 0:
            self._billed = self._billed * RATIO_MEMORY + actual_tokens
            self._estimated = self._estimated * RATIO_MEMORY + grant.estimate
        charge_tokens, charge_requests = grant._charges
        token_change = 0.0 if charge_tokens is None else actual_tokens - charge_tokens[1]
        if charge_tokens is not None and token_change:
            self._tokens.correct(charge_tokens, actual_tokens)
        if charge_requests is not None and actual_tokens == 0:
            self._requests.correct(charge_requests, 0)
        for reading in grant._readings:
            if reading.tokens is not None:
                reading.tokens += token_change * reading.scale
            if reading.requests is not None and actual_tokens == 0:
                reading.requests -= reading.scale
            reading.waiting -= 1
            self._learn(reading)
        grant._readings.clear()
        self._wake_sleeper()

    def on_success(
        self, grant: Grant, remaining_tokens: int | None = None, remaining_requests: int | None = None
    ) -> None:
        """A request succeeded; the service said what room it has left, if it said.

        What the job has sent in the window, plus that room, bounds what it may send. With
        peers, what they sent is known; without, each other worker is taken to have sent what
        this one did. This worker's requests still in flight count as sent, since the service
        may have counted them before this one (requests overtake each other) and a bound must
        never be too low; the bound is tightened once they are settled, without those the
        service refused. With peers, see :meth:`_read_with_peers`.
        """
        if remaining_tokens is None and remaining_requests is None:
            return
        self._told_room = self._told_room or remaining_tokens is not None
        tokens_room = None if remaining_tokens is None else float(remaining_tokens)
        requests_room = None if remaining_requests is None else float(remaining_requests)
        if tokens_room is not None:
            now = self._clock()
            at = _sent_at(grant, now)
            if self._room is None or at >= self._room[0]:
                self._room = (at, tokens_room, now - at, _charged(grant))
                self._wake_sleeper()
        if self._view() is not None:
            self._read_with_peers(grant, tokens_room, requests_room)
            return
        scale = 1 / self._share
        used = self._tokens.used()
        reading = _Reading(
            None if tokens_room is None else used * scale + tokens_room,
            None if requests_room is None else self._requests.used() * scale + requests_room,
            len(self._in_flight),
            scale,
            None,
            fresh=self._share == 1 and not self._in_flight and used <= _charged(grant),
        )
        for other in self._in_flight:
            other._readings.append(reading)
        # Loose until then, but a bound already: the next sends must not plan on more.
        waiting, reading.waiting = reading.waiting, 0
        self._learn(reading)
        reading.waiting = waiting

    def _read_with_peers(
        self, grant: Grant, tokens_room: float | None, requests_room: float | None, *, exact: bool = True
    ) -> None:
        """The room the service had when it took ``grant``'s request (or the cost it refused),
        plus what all had sent in the service's minute before it: this worker's charges now,
        its peers' once their files show them all. That minute is the service's, not the
        pacer's longer window, and charges that aged out of the window since still count: the
        service had counted them when it took the request.

        Requests sent later are left out, though the service may have taken one first (a
        bound a request too low, at times); counting them would put every request in flight
        in both the room and the sends, and each bound too high.

        An ``exact`` reading (a success's room, not a 429's cost) taken when the job had
        nothing in the window is the limit now under every metering model, so it replaces the
        older bounds (:meth:`SendWindow.learn`).
        """
        sent_at = _sent_at(grant, self._clock())

        def mine(window: SendWindow, counted_s: float) -> float:
            return window.sent_between(sent_at - counted_s, sent_at)

        earlier = [g for g in self._in_flight if (g._charges[0] or g._charges[1] or [sent_at])[0] <= sent_at]
        mine_tokens = mine(self._tokens, self._minute_s)
        reading = _Reading(
            None if tokens_room is None else mine_tokens + tokens_room,
            None if requests_room is None else mine(self._requests, self._minute_s / 6) + requests_room,
            len(earlier),
            1.0,
            self._wall() - (self._clock() - sent_at),
            fresh=exact and not earlier and mine_tokens <= _charged(grant),
        )
        for other in earlier:
            other._readings.append(reading)
        self._due.append(reading)
        self._learn(reading)

    def on_throttle(self, grant: Grant | None, retry_after_s: float | None) -> None:
        """A 429 arrived: pause every acquirer until its retry-after, and lower the limit.

        The service had less room than the refused cost: the job may send less than it had
        sent plus that cost. That bound is learned only from a service that does not report
        its room (the 429 may be for requests, not tokens). With peers it counts what all had
        sent when the request went, once their files show it, as a success's room does (see
        :meth:`_read_with_peers`); while the wave's files are not all there yet, each other
        task is taken to have tried what this one did. Counting this task's sends alone, one
        whose first answer is a 429 would learn a bound of one request, and keep a tiny part.

        Args:
            grant: the refused request's grant (None: learn nothing from it).
            retry_after_s: seconds the service asked to wait; None pauses
                :data:`DEFAULT_COOLDOWN_S`.
        """
        now = self._clock()
        pause = DEFAULT_COOLDOWN_S if retry_after_s is None else max(0.0, retry_after_s)
        self._paused_until = max(self._paused_until, now + pause)
        self._room = None
        if grant is None or self._told_room:
            return
        if self._view() is not None:
            self._read_with_peers(grant, grant.tokens, None, exact=False)  # once their files show it
        elif self.peers is None:
            self._tokens.learn(self._tokens.used() / self._share + grant.tokens)
        else:  # the wave is starting: the others are taken to have sent what this one tried to
            self._tokens.learn((self._tokens.used() + grant.tokens) / self._share)

    def _view(self) -> PeerView | None:
        """The peers' latest view, if any; it sets the windows' equal parts, and completes the
        readings that waited for it."""
        view = self.peers() if self.peers is not None else None
        workers = None if view is None else max(1, view.workers)
        self._tokens.peers = self._requests.peers = workers
        self._tokens.rank = self._requests.rank = 0 if view is None else view.rank
        if view is not None:  # what peers that stopped sending still hold is no one's part
            self._tokens.held = self._others_sent(self._tokens, view.ended_tokens)
            self._requests.held = self._others_sent(self._requests, view.ended_requests)
            self._tokens.peer_used = tuple(self._others_sent(self._tokens, each) for each in view.each_tokens)
            self._requests.peer_used = tuple(
                self._others_sent(self._requests, each) for each in view.each_requests
            )
            if view.tokens_bound is not None:
                self._tokens.adopt(view.tokens_bound)
            if view.requests_bound is not None:
                self._requests.adopt(view.requests_bound)
        if view is None:
            self._due.clear()  # a task ended: its peers' files are no longer read
        for reading in list(self._due):
            self._learn(reading, view)
        return view

    def _others_sent(self, window: SendWindow, theirs: Charges) -> float:
        """What the peers' charges ``theirs`` hold in ``window`` now."""
        start = self._wall() - window.window_s
        return sum(amount for when, amount in theirs if when > start)

    def _room_delay(self, window: SendWindow, theirs: Charges, cost: float) -> float:
        """Seconds until ``cost`` fits under the job's bound, counting the peers' charges too."""
        bound = window.bound
        if bound is None or cost > bound:
            return 0.0
        now = self._clock()
        offset = self._wall() - now
        start = now - window.window_s
        charges = [(when - offset, amount) for when, amount in theirs if when - offset > start]
        charges += [(when, amount) for when, amount in window.sent()]
        must_free = sum(amount for _, amount in charges) + cost - bound
        if must_free <= bound * _EPSILON:
            return 0.0
        return _time_to_free(sorted(charges), must_free, window.window_s, now)

    def _learn(self, reading: _Reading, view: PeerView | None = None) -> None:
        if reading.waiting > 0:
            return
        tokens, requests, fresh = reading.tokens, reading.requests, reading.fresh
        if reading.at is not None:  # the peers' charges until then are still to be added
            view = view or (self.peers() if self.peers is not None else None)
            if view is None or view.as_of < reading.at or reading not in self._due:
                return  # not yet, or dropped when the task ended
            self._due.remove(reading)
            theirs = _sum_between(view.tokens, reading.at - self._minute_s, reading.at)
            fresh = fresh and theirs == 0
            if tokens is not None:
                tokens += theirs
            if requests is not None:
                requests += _sum_between(view.requests, reading.at - self._minute_s / 6, reading.at)
        if tokens is not None:
            self._tokens.learn(tokens, fresh=fresh)
        if requests is not None:
            self._requests.learn(requests, fresh=fresh)
        self._wake_sleeper()

    def _delay_s(self, tokens: float) -> float:
        heard_at = self._heard_at
        quiet = heard_at is None or self._clock() - heard_at > self._requests.window_s
        if self._in_flight and quiet:
            # Nothing heard yet, or not lately: one request goes first, to learn the room from its answer.
            return DEFAULT_COOLDOWN_S
        view = self._view()
        if view is not None and self._due and not self._tokens.learned:
            # The first answer's room, until the peers' files complete it: a quota set too
            # high must not be burst into meanwhile.
            return PEER_POLL_S
        token_delay = self._tokens.delay_s(tokens)
        request_delay = self._requests.delay_s(1)
        if view is not None:
            token_delay = max(token_delay, self._room_delay(self._tokens, view.tokens, tokens))
            request_delay = max(request_delay, self._room_delay(self._requests, view.requests, 1))
        if token_delay > 0 and self._room_fits(tokens, view):
            token_delay = 0.0  # the service said just now that it has the room
        delay = max(self._paused_until - self._clock(), token_delay, request_delay)
        return delay if delay > _EPSILON else 0.0

    def _room_fits(self, cost: float, view: PeerView | None) -> bool:
        """Whether ``cost`` fits, past the bound, in the room the latest success reported.

        That room is what the service would admit right then, whatever way it meters, and it
        may be more than the bound: the bound is the tightest of the last windows (a limit
        that wandered up since), and a burst stops up to a request short of it. One worker
        alone spends it, so no two hand out the same room: the first of the peers by rank (or
        a worker with no one else on the deployment), once the whole job is at its bound (the
        others wait). It gives up if a peer's window freed since that room was read (their
        sends on that room may not be in their files yet), and never goes past the configured
        quota in a window.
        """
        if view is not None and view.rank > 0:
            return False
        left = self._room_left(view)
        if left is None or cost > left:
            return False
        assert self._room is not None  # there is room left
        window, now = self._tokens, self._clock()
        in_window = window.used()
        if view is not None:
            offset, since = self._wall() - now, self._room[0] - self._room[2]
            if any(since < when - offset + window.window_s <= now for when, _ in view.tokens):
                return False  # a peer may have sent in the room that freed
            in_window += self._others_sent(window, view.tokens)
        bound, quota = window.bound, window.quota
        if bound is not None and in_window + cost <= bound:
            return False  # the job is not at its bound: its workers send on their parts
        return quota is None or in_window + cost <= quota

    def _room_left(self, view: PeerView | None) -> float | None:
        """The room the latest success reported, less what the whole job sent since (from a
        round trip before that request: the service may have taken those after it) and the
        headroom; None when that is not known.

        Not known: no room reported within :data:`ROOM_FRESH` of a minute, other workers whose
        sends are not known (no peers' files), peers' files that may not show yet what they
        sent on that room, or ``max_share`` (the room is partly other clients' part).
        """
        if self._room is None or self._keep_share:
            return None
        if view is None and (self.peers is not None or self._share < 1):
            return None  # other workers, and what they send is not known
        at, room, round_trip_s, charged = self._room
        now = self._clock()
        if now - at > ROOM_FRESH * self._minute_s:
            return None
        window, since = self._tokens, at - round_trip_s
        sent = window.sent_between(since, now) - charged
        if view is not None:
            offset = self._wall() - now
            if view.as_of < at + offset + round_trip_s:
                return None  # the peers' files may not show what they sent on that room yet
            sent += _sum_between(view.tokens, since + offset, math.inf)
        return room - sent - self._headroom * (window.bound or room)

    def _first_part(self, estimate: int, cuts: Sequence[int]) -> int | None:
        """The longest first part of a request of ``estimate`` tokens (one of ``cuts``) that may
        go now, holding at least :data:`LEAST_PART` of it; None if none does.

        A burst's last request rarely fits what is left of the window: with parts of about 8
        requests, that room is an eighth of the quota, and it is lost when the window turns
        (it never carries over). Sent in a first part, it is spent; the rest of the request
        waits for the next window as a request of its own.

        Unless the service confirmed the configured quota (:data:`QUOTA_CONFIRMED`), the part
        must also fit this worker's equal part of the room the service reported just now, less
        what the job sent since (:meth:`_room_left`): a bound of sends plus room may be loose,
        up to twice the limit (a bucket that refilled, a clock minute that reset), and a part
        with no request's slack left would find it out; every worker reads that room. A
        confirmed quota caps the bound, and sending no more than the limit in any trailing
        minute is safe however the service meters. With ``max_share`` nothing is cut: the job
        sends at an even rate, beside other clients.

        The search assumes a longer part never fits where a shorter one does not; it only
        returns a part that fits.
        """
        if self._keep_share:
            return None
        high, quota, learned = len(cuts), self._tokens.quota, self._tokens.learned_bound
        if quota is None or (learned is not None and learned < QUOTA_CONFIRMED * quota):
            view = self._view()
            left = self._room_left(view)
            if left is None:
                return None
            workers = 1 if view is None else view.workers  # each may spend its part of that room
            high = bisect.bisect_right(cuts, left / workers / self.ratio)
        low, found = bisect.bisect_left(cuts, estimate * LEAST_PART), None
        while low < high:
            middle = (low + high) // 2
            if self._delay_s(cuts[middle] * self.ratio) == 0:
                found, low = cuts[middle], middle + 1
            else:
                high = middle
        return found

    def _take(self, tokens: float, waited: float, estimate: int) -> Grant:
        self._waited_s += waited
        grant = Grant(tokens, waited, estimate, (self._tokens.take(tokens), self._requests.take(1)))
        self._in_flight.add(grant)
        return grant

    def _replace(self, turn: asyncio.Future[None]) -> asyncio.Future[None]:
        """A fresh future in ``turn``'s place in the queue (a head demoted by a retry)."""
        fresh: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue[self._queue.index(turn)] = fresh
        return fresh

    async def _nap(self, delay: float) -> None:
        """Sleep ``delay`` seconds, or less if :meth:`_wake_sleeper` is called."""
        loop = asyncio.get_running_loop()
        self._kick = kick = loop.create_future()
        if self.peers is not None:
            delay = min(delay, PEER_POLL_S)  # their charges age out and change meanwhile
        timer = loop.call_later(delay, _resolve, kick)
        try:
            await kick
        finally:
            timer.cancel()
            if self._kick is kick:
                self._kick = None

    def _wake_sleeper(self) -> None:
        """Room came back early, or the head changed: let the head recompute its delay."""
        if self._kick is not None:
            _resolve(self._kick)


def _charged(grant: Grant) -> float:
    """The tokens ``grant`` holds in its window now (its billed usage, once settled)."""
    return grant._charges[0][1] if grant._charges[0] is not None else 0.0


def _sent_at(grant: Grant, default: float) -> float:
    """When ``grant`` was charged (the limiter's clock); ``default`` if it holds no charge."""
    charged = grant._charges[0] or grant._charges[1]
    return charged[0] if charged is not None else default


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)

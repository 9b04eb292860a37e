"""Per-worker quotas on the selector, so one worker cannot starve the others (`selector.quota.*`).

Who a worker is (`worker_identity`, shared by the plain gRPC server and the Ray Serve deployment):
  1. the bearer token it authenticated with, by its position in `selector.auth_tokens` (one token per
     worker), when the selector has tokens: a worker cannot change it to escape its quota;
  2. else the `worker-id` metadata it sends (`worker.worker_id`, default <hostname>-<pid>): cooperative only,
     a client that sends another id every call gets a fresh quota every call;
  3. else the host the call came from (the port is dropped: a reconnect comes from a new port), so workers
     on one host share a quota;
  4. an in-process caller (tests, profiling) with no transport is one worker, LOCAL_CALLER.

The quotas (each None = unlimited, today's behaviour), per selector replica:
  positions_per_s  a token bucket of scored positions per worker (Select: its positions; Decode: max_tokens,
                   the tokens it may generate), charged when the request's turn comes, never for a replayed
                   reply (it costs no compute). A request larger than the bucket goes through when the bucket
                   is full and leaves it in debt, so no request is refused forever. Refusal hint: when the
                   bucket will hold the request.
  max_sessions     sessions a worker holds; a new session beyond it is refused (SESSION_QUOTA_RETRY_MS).
                   Refusing rather than evicting the worker's own oldest session: a worker with more
                   concurrent requests than its quota would otherwise evict its own live sessions in turn and
                   resync them all with full contexts (more compute for the same sessions); refused, the extra
                   requests wait or decide locally while the others keep their sessions. Sessions the worker
                   closes (at every request's end) or leaves idle past session_idle_ttl_s free their place.
  max_kv_bytes     KV bytes a worker's sessions hold, enforced after each batch (that is when sessions grow) by
                   evicting the worker's own least recently used idle sessions, never its most recently used
                   one and never another worker's. Evicting rather than refusing: refusing new sessions would
                   not bound the growth of the open ones, and an evicted session only costs its worker a
                   resync (FAILED_PRECONDITION), the same as the global `kv_budget_mb` LRU would, which now
                   no longer reaches the other workers' sessions on this worker's account.

A refusal is RESOURCE_EXHAUSTED with a `retry-after-ms` hint (SelectorCore builds it from a QuotaRefusal),
which the worker treats as busy, not down: it waits for the hint within its deadline, else decides the
block's positions locally and counts them.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import math
import time
import weakref
from typing import Callable, Iterable

from s2t.config import QuotaSettings
from s2t.security import BearerTokens, presented_worker_id

from .metrics import QuotaKind
from .sessions import Session

SESSION_QUOTA_RETRY_MS = 500  # a session quota frees up when one of the worker's requests ends: soon, unknown when
BURST_SECONDS = 2.0  # positions_burst when unset: this many seconds of positions_per_s
MAX_PEER_LEN = 128
PRUNE_AT = 1024  # worker states kept before the ones equal to a fresh state are dropped


class IdentitySource(enum.Enum):
    """Where a worker's identity came from (module docstring, in order of precedence)."""

    TOKEN = "token"
    WORKER_ID = "worker-id"
    PEER = "peer"
    LOCAL = "local"


@dataclasses.dataclass(frozen=True)
class WorkerIdentity:
    """Who a request comes from: the key of its quotas. `name` is never a secret (a token is its index)."""

    source: IdentitySource
    name: str

    def __str__(self) -> str:
        if self.source is IdentitySource.TOKEN:
            return f"the worker of selector.auth_tokens[{self.name}]"
        if self.source is IdentitySource.WORKER_ID:
            return f"worker-id {self.name!r}"
        if self.source is IdentitySource.PEER:
            return f"the worker at {self.name}"
        return "the in-process caller"


LOCAL_CALLER = WorkerIdentity(IdentitySource.LOCAL, "")


def peer_host(peer: str) -> str:
    """The host of a gRPC peer string: 'ipv4:10.0.0.5:53211' -> '10.0.0.5', 'ipv6:[::1]:53211' -> '[::1]';
    other forms (unix:...) as they are. Bounded to MAX_PEER_LEN characters."""
    scheme, sep, rest = peer.partition(":")
    if sep and scheme in ("ipv4", "ipv6"):
        host, colon, port = rest.rpartition(":")
        if colon and port.isdigit():
            rest = host
        return rest[:MAX_PEER_LEN]
    return peer[:MAX_PEER_LEN]


def worker_identity(metadata: Iterable[tuple[str, str | bytes]] | None, peer: str | None,
                    tokens: BearerTokens | None = None) -> WorkerIdentity:
    """Who is calling (module docstring): the accepted bearer token's index, else the `worker-id` metadata,
    else the peer's host, else LOCAL_CALLER. Both transports call this with the call's metadata and peer."""
    metadata = tuple(metadata or ())
    if tokens is not None and tokens.enabled:
        index = tokens.accepted_index(metadata)
        if index is not None:
            return WorkerIdentity(IdentitySource.TOKEN, str(index))
    worker_id = presented_worker_id(metadata)
    if worker_id is not None:
        return WorkerIdentity(IdentitySource.WORKER_ID, worker_id)
    if peer:
        return WorkerIdentity(IdentitySource.PEER, peer_host(peer))
    return LOCAL_CALLER


class TokenBucket:
    """`rate` units per second up to `burst`. A take of n needs min(n, burst) in the bucket and then removes
    all n (the level may go negative): a request larger than the bucket is not refused forever, and its
    excess is paid back before the next one."""

    def __init__(self, rate: float, burst: float, now: float):
        self.rate, self.burst = rate, burst
        self._level, self._updated = burst, now

    def level(self, now: float) -> float:
        """Units in the bucket at `now` (negative: in debt)."""
        return min(self.burst, self._level + max(0.0, now - self._updated) * self.rate)

    def take(self, amount: float, now: float) -> float:
        """Take `amount` if the bucket allows it: returns 0.0 when taken, else the seconds until it would
        be (nothing is taken then)."""
        self._level, self._updated = self.level(now), max(now, self._updated)
        need = min(amount, self.burst)
        if self._level >= need:
            self._level -= amount
            return 0.0
        return (need - self._level) / self.rate

    def full(self, now: float) -> bool:
        return self.level(now) >= self.burst


@dataclasses.dataclass(frozen=True)
class QuotaRefusal:
    """Why a worker's request is refused: which quota, what its limit is, where the worker stands."""

    kind: QuotaKind
    worker: WorkerIdentity
    limit: float | int
    detail: str
    retry_after_ms: int


@dataclasses.dataclass
class _WorkerState:
    bucket: TokenBucket | None
    refusals: collections.Counter[QuotaKind] = dataclasses.field(default_factory=collections.Counter)


class WorkerQuotas:
    """The quotas of one selector replica: each worker's position bucket and refusal counts, and who owns
    which session. Runs on the selector's event loop (no locking)."""

    def __init__(self, settings: QuotaSettings, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.clock = clock
        rate = settings.positions_per_s
        self.burst = None if rate is None else settings.positions_burst or BURST_SECONDS * rate
        self._states: dict[WorkerIdentity, _WorkerState] = {}
        self._prune_at = PRUNE_AT
        # Who opened each session: its owner is charged for it. Weak: a session the store dropped goes with it.
        self._owners: weakref.WeakKeyDictionary[Session, WorkerIdentity] = weakref.WeakKeyDictionary()

    @property
    def tracks_sessions(self) -> bool:
        return self.settings.max_sessions is not None or self.settings.max_kv_bytes is not None

    def _state(self, worker: WorkerIdentity) -> _WorkerState:
        state = self._states.get(worker)
        if state is None:
            if len(self._states) >= self._prune_at:
                self._prune()
            rate = self.settings.positions_per_s
            bucket = None if rate is None else TokenBucket(rate, self.burst, self.clock())
            state = self._states[worker] = _WorkerState(bucket)
        return state

    def _prune(self) -> None:
        """Drop the states a fresh one would equal (a full bucket, no refusals), so workers that come and go
        (or ids that change every call) do not accumulate; the next bound is twice what is left."""
        now = self.clock()
        self._states = {w: s for w, s in self._states.items()
                        if s.refusals or (s.bucket is not None and not s.bucket.full(now))}
        self._prune_at = max(PRUNE_AT, 2 * len(self._states))

    def _refused(self, state: _WorkerState, refusal: QuotaRefusal) -> QuotaRefusal:
        state.refusals[refusal.kind] += 1
        return refusal

    def refusals(self, worker: WorkerIdentity) -> dict[QuotaKind, int]:
        """How often `worker` was refused, by quota (workers never refused: empty)."""
        state = self._states.get(worker)
        return {} if state is None else dict(state.refusals)

    # -- positions per second ------------------------------------------------------------------------------

    def charge_positions(self, worker: WorkerIdentity, positions: int) -> QuotaRefusal | None:
        """Charge `positions` to the worker's bucket; a refusal (nothing charged) when it does not allow them."""
        if self.settings.positions_per_s is None:
            return None
        state = self._state(worker)
        now = self.clock()
        wait_s = state.bucket.take(positions, now)
        if wait_s == 0.0:
            return None
        return self._refused(state, QuotaRefusal(
            QuotaKind.POSITIONS_PER_S, worker, self.settings.positions_per_s,
            f"{positions} positions asked, {state.bucket.level(now):.1f} left of a burst of {self.burst:g}",
            max(1, math.ceil(wait_s * 1000))))

    # -- sessions and their KV memory ------------------------------------------------------------------------

    def owner(self, session: Session) -> WorkerIdentity | None:
        return self._owners.get(session)

    def check_new_session(self, worker: WorkerIdentity, sessions: Iterable[Session]) -> QuotaRefusal | None:
        """May `worker` open one more session, given the sessions held now? A refusal when it holds its
        max_sessions already."""
        limit = self.settings.max_sessions
        if limit is None:
            return None
        held = sum(1 for s in sessions if self._owners.get(s) == worker)
        if held < limit:
            return None
        return self._refused(self._state(worker), QuotaRefusal(
            QuotaKind.MAX_SESSIONS, worker, limit, f"it holds {held} sessions", SESSION_QUOTA_RETRY_MS))

    def opened(self, session: Session, worker: WorkerIdentity) -> None:
        """`worker` opened `session`: its sessions and KV bytes count toward the worker's quotas."""
        if self.tracks_sessions:
            self._owners[session] = worker

    def kv_evictions(self, sessions: Iterable[Session]) -> list[Session]:
        """The sessions to evict so that every worker holds at most max_kv_bytes: for each worker over it, its
        least recently used idle sessions, sparing its most recently used one. `sessions` in LRU order (the
        store's)."""
        limit = self.settings.max_kv_bytes
        if limit is None:
            return []
        owned: dict[WorkerIdentity, list[Session]] = {}
        for s in sessions:
            owner = self._owners.get(s)
            if owner is not None:
                owned.setdefault(owner, []).append(s)
        evict: list[Session] = []
        for worker, held in owned.items():
            total = sum(s.cache.nbytes for s in held)
            for s in held[:-1]:  # oldest first; the most recent one stays even if it alone is over the limit
                if total <= limit:
                    break
                if not s.busy:
                    total -= s.cache.nbytes
                    evict.append(s)
        return evict

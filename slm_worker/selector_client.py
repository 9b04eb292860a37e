"""The worker's side of the selector protocol: deadlines, retries, back-pressure, a circuit breaker, a call budget.

A busy selector and a dead one are different things, and only the second may open the breaker:

  busy    the selector answered RESOURCE_EXHAUSTED (its queue is full, or this worker is over one of its
          selector.quota.* quotas; the answer carries a retry hint) or
          ABORTED, or one attempt ran into the per-attempt cap while the channel was connected. The client
          waits (the hint, else a jittered backoff) and resends the same (session_id, step) until the
          request's own deadline. Nothing counts toward the breaker: under load every session would
          otherwise degrade at once while the selector is alive and working.
  outage  the channel cannot connect (UNAVAILABLE, or an attempt that timed out while the channel was not
          connected). Consecutive outages open the breaker; while it is open calls fail at once; after
          `breaker_open_s` one probe goes through (half-open) and the first answer of any kind closes it.

An attempt normally lasts until the request's deadline (capped only by `select_timeout_s`): cancelling one
early would not save the selector anything (it finishes an admitted step and keeps the reply), it would only
add a resend. Retries resend the same (session_id, step), which the selector answers idempotently.

Every failure here is something the decode loop degrades around, never a client-visible error:
  SessionLost          the selector does not hold what the request builds on (FAILED_PRECONDITION): resync
  SelectorUnavailable  no usable answer; one of
    SelectorBusy         the deadline passed while the selector was busy or slow ("selector busy past the deadline")
    SelectorDown         an outage: connection failures, or the breaker is open
    SelectorRefused      the selector answered with an error that a resend cannot fix (INTERNAL, INVALID_ARGUMENT, ...)
      SelectorAuthRefused  ... because of the worker's credentials (UNAUTHENTICATED, PERMISSION_DENIED): the selector
                           is up, so the breaker stays closed and nothing is resent; the request degrades saying so

Identity: every RPC carries `worker-id: <worker.worker_id>` (default <hostname>-<pid>), the key of the selector's
per-worker quotas when it has no bearer tokens (with them, the token is the key).

Credentials: every RPC carries `authorization: Bearer <worker.selector_auth_token>` when that is set, and the
channel is TLS (or mTLS) when `worker.selector_tls` enables it. Its keepalive is s2t.wire's client policy, which
Ray Serve's gRPC proxy accepts (an idle channel is never pinged; see there).

Tracing: with `tracing.enabled` the channel carries s2t.tracing's client interceptors, so every attempt is a
CLIENT span and sends its `traceparent`; the worker runs each request's calls in the request's context, which
makes them children of its Generate span.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import random
import re
import time
from typing import Callable, Sequence

import grpc
from asyncio_throttle import Throttler

from pydantic import SecretStr

from s2t.config import ClientTlsSettings, WorkerSettings
from s2t.security import WORKER_ID, bearer_metadata, default_worker_id, open_channel
from s2t.v1 import selector_pb2 as pb
from s2t.v1 import selector_pb2_grpc as pb_grpc
from s2t.wire import client_channel_options

log = logging.getLogger(__name__)

# The selector's back-pressure contract (llm_selector/core.py): a RESOURCE_EXHAUSTED answer carries the
# trailing metadata `retry-after-ms: <int>` and the same `retry-after-ms=<int>` in its message; the message is
# the part every transport keeps, so it is parsed when the metadata is missing.
RETRY_AFTER_KEY = "retry-after-ms"
_RETRY_AFTER_IN_MESSAGE = re.compile(r"retry-after-ms[=:]\s*(\d+)")
# A refusal for this worker's quota also carries `quota-exceeded: selector.quota.<name>`, and the message names
# the setting.
QUOTA_KEY = "quota-exceeded"
_QUOTA_IN_MESSAGE = re.compile(r"selector\.quota\.[a-z_]+")

BUSY_CODES = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED})
OUTAGE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})
AUTH_CODES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})

BACKOFF_INITIAL_S = 0.05
BACKOFF_MAX_S = 1.0
HINT_JITTER = 0.25  # a hinted wait is stretched by up to this share, so a rejected burst does not return as one


class SessionLost(Exception):
    """The selector lost the session or the prefix the request built on: resend the full context."""


class SelectorUnavailable(Exception):
    """The selector did not answer usefully in time (see the subclasses for why)."""


class SelectorBusy(SelectorUnavailable):
    """The request's deadline passed while the selector was up but busy (queue full) or slow."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s  # the selector's last retry hint, if it gave one


class SelectorDown(SelectorUnavailable):
    """An outage: the selector cannot be reached (connection failures, or the breaker is open)."""

    def __init__(self, message: str, retry_in_s: float = 0.0):
        super().__init__(message)
        self.retry_in_s = retry_in_s  # until the breaker lets a probe through (0: it may already)


class SelectorRefused(SelectorUnavailable):
    """The selector answered with an error that resending the same request cannot fix."""


class SelectorAuthRefused(SelectorRefused):
    """The selector refused the worker's credentials (a missing, wrong or revoked bearer token, or a client
    certificate it does not accept): only a configuration change fixes that."""


class SelectorState(enum.Enum):
    """What the worker can report about its selector."""

    UP = "up"  # answering
    BUSY = "busy"  # answering, but the last answer was back-pressure or a slow attempt: calls wait and retry
    DOWN = "down"  # unreachable: the breaker is open or probing


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"  # one probe call is in flight


class Permit(enum.Enum):
    """What the breaker granted one attempt: a normal call, or the half-open probe."""

    NORMAL = "normal"
    PROBE = "probe"


def retry_after_s(error: grpc.aio.AioRpcError) -> float | None:
    """The selector's retry hint of a RESOURCE_EXHAUSTED answer, in seconds: trailing metadata first (plain
    grpc.aio server, Ray Serve's proxy), else the message; None when there is none (e.g. Ray's own
    back-pressure)."""
    for key, value in error.trailing_metadata() or ():
        if key == RETRY_AFTER_KEY:
            try:
                return max(0, int(value)) / 1000
            except (TypeError, ValueError):
                break
    match = _RETRY_AFTER_IN_MESSAGE.search(error.details() or "")
    return int(match.group(1)) / 1000 if match else None


def quota_exceeded(error: grpc.aio.AioRpcError) -> str | None:
    """The selector quota (its setting) that refused a RESOURCE_EXHAUSTED answer, or None when the answer was
    not about this worker's quota (e.g. the selector's queue is full)."""
    for key, value in error.trailing_metadata() or ():
        if key == QUOTA_KEY:
            return value if isinstance(value, str) else value.decode("latin-1")
    match = _QUOTA_IN_MESSAGE.search(error.details() or "")
    return match.group(0) if match else None


class CallBudget:
    """A per-worker rate limit on selector calls (asyncio-throttle), so one worker cannot flood a shared
    selector. `try_take` never waits long: a position over budget is decided locally instead."""

    def __init__(self, calls_per_s: float):
        self.throttler = None
        if calls_per_s > 0:
            limit, period = (round(calls_per_s), 1.0) if calls_per_s >= 1 else (1, 1.0 / calls_per_s)
            self.throttler = Throttler(rate_limit=limit, period=period, retry_interval=0.005)

    async def try_take(self) -> bool:
        if self.throttler is None:
            return True
        try:
            await asyncio.wait_for(self.throttler.acquire(), timeout=0.002)
            return True
        except asyncio.TimeoutError:
            return False


class CircuitBreaker:
    """Opens after `failures` consecutive outages (connection failures); while open, calls are refused at
    once; after `open_s` one probe call is let through (half-open). Any answer from the selector closes it
    (a busy answer too: the selector is alive); an outage of the probe re-opens it; a probe that proves
    nothing (it timed out while connected, or was cancelled) gives its turn back to the next call."""

    def __init__(self, failures: int, open_s: float, clock: Callable[[], float] = time.monotonic):
        self.threshold, self.open_s, self.clock = failures, open_s, clock
        self.consecutive = 0
        self.opened_at: float | None = None
        self.probing = False
        self.openings = 0

    @property
    def state(self) -> BreakerState:
        if self.opened_at is None:
            return BreakerState.CLOSED
        return BreakerState.HALF_OPEN if self.probing else BreakerState.OPEN

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def retry_in_s(self) -> float:
        """Seconds until a probe may go (0 when closed or due)."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + self.open_s - self.clock())

    def try_acquire(self) -> Permit | None:
        """May an attempt go now? None: the breaker is open (or another call is the probe)."""
        if self.opened_at is None:
            return Permit.NORMAL
        if not self.probing and self.clock() - self.opened_at >= self.open_s:
            self.probing = True
            return Permit.PROBE
        return None

    def success(self) -> None:
        """The selector answered (a reply, or an error status it sent): it is up."""
        self.consecutive, self.opened_at, self.probing = 0, None, False

    def outage(self, permit: Permit) -> None:
        """An attempt could not reach the selector."""
        self.consecutive += 1
        if permit is Permit.PROBE:
            self.opened_at, self.probing = self.clock(), False
            self.openings += 1
        elif self.opened_at is None and self.consecutive >= self.threshold:
            self.opened_at = self.clock()
            self.openings += 1

    def inconclusive(self, permit: Permit) -> None:
        """An attempt proved neither way; a probe's turn passes to the next call."""
        if permit is Permit.PROBE and self.probing:
            self.probing = False


@dataclasses.dataclass
class ClientCounters:
    """What the client saw, for the worker to report (all monotonically increasing)."""

    calls: int = 0  # select / decode calls of the decode loop
    attempts: int = 0  # RPC attempts (a call may resend its step)
    busy_retries: int = 0  # attempts answered busy (RESOURCE_EXHAUSTED, ABORTED, a capped slow attempt), then resent
    resource_exhausted: int = 0  # RESOURCE_EXHAUSTED answers (the selector's back-pressure)
    quota_refusals: int = 0  # ... of them because this worker was over a selector.quota.* quota
    busy_past_deadline: int = 0  # calls that ended in SelectorBusy
    outage_failures: int = 0  # attempts that could not reach the selector
    breaker_rejections: int = 0  # calls refused at once by an open breaker (SelectorDown)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def auth_refusal(address: str, code: grpc.StatusCode, details: str | None) -> str:
    """What to say when the selector at `address` refused the worker's credentials (names what to check)."""
    return (f"selector at {address} refused the worker's credentials ({code.name}: {details}); "
            "worker.selector_auth_token must be one of the selector's selector.auth_tokens")


class SelectorClient:
    def __init__(self, address: str, application: str = "", select_timeout_s: float = 120.0,
                 breaker_failures: int = 3, breaker_open_s: float = 10.0, calls_per_s: float = 0.0,
                 rng: random.Random | None = None, auth_token: SecretStr | None = None,
                 tls: ClientTlsSettings | None = None, worker_id: str | None = None,
                 interceptors: Sequence[grpc.aio.ClientInterceptor] = ()):
        self.address = address
        self.application = application
        self.worker_id = worker_id or default_worker_id()  # who this worker is to the selector's quotas
        # the metadata entry that presents the worker's bearer token (kept as built, never logged)
        self._authorization = bearer_metadata(auth_token) if auth_token is not None else None
        self.tls = tls or ClientTlsSettings()
        # the channel's interceptors: s2t.tracing's when tracing is on (a CLIENT span per attempt, traceparent sent)
        self.interceptors = tuple(interceptors)
        self.select_timeout_s = select_timeout_s  # cap on one attempt; the request's deadline usually ends it first
        self.breaker = CircuitBreaker(breaker_failures, breaker_open_s)
        self.budget = CallBudget(calls_per_s)
        self.counters = ClientCounters()
        self.rng = rng or random.Random()
        self._busy = False  # the last answer was back-pressure / a slow attempt, and no reply came since
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.SelectorServiceStub | None = None
        # Called after every Select / Decode attempt with (RPC name, None or the failure's status, seconds): the
        # worker's metrics hook (s2t_worker_selector_rpc_seconds).
        self.on_attempt: Callable[[str, grpc.StatusCode | None, float], None] | None = None

    @classmethod
    def from_settings(cls, ws: WorkerSettings,
                      interceptors: Sequence[grpc.aio.ClientInterceptor] = ()) -> "SelectorClient":
        """The client the worker's settings describe: address, deadlines, breaker, budget, credentials; its
        channel goes through `interceptors`."""
        return cls(ws.selector_address, ws.selector_application, ws.select_timeout_ms / 1000, ws.breaker_failures,
                   ws.breaker_open_s, ws.selector_calls_per_s, auth_token=ws.selector_auth_token,
                   tls=ws.selector_tls, worker_id=ws.worker_id, interceptors=interceptors)

    def problem(self, error: grpc.aio.AioRpcError) -> str:
        """Why a call the worker needs (e.g. GetSelectorInfo at start-up) failed, in the words a degraded
        request reports."""
        if error.code() in AUTH_CODES:
            return auth_refusal(self.address, error.code(), error.details())
        return f"selector at {self.address} unreachable: {error.code().name}"

    @property
    def state(self) -> SelectorState:
        if self.breaker.is_open:
            return SelectorState.DOWN
        return SelectorState.BUSY if self._busy else SelectorState.UP

    def _ensure(self) -> pb_grpc.SelectorServiceStub:
        if self._stub is None:
            # The client resends itself (same step, idempotent at the selector); grpc's own retries would not
            # tell busy from down.
            self._channel = open_channel(self.address, client_channel_options(32 << 20) + [("grpc.enable_retries", 0)],
                                         self.tls, "worker.selector_tls", self.interceptors)
            self._stub = pb_grpc.SelectorServiceStub(self._channel)
        return self._stub

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel, self._stub = None, None

    def _metadata(self, session_id: str = "", request_id: str = "") -> list[tuple[str, str]]:
        md = [self._authorization] if self._authorization is not None else []
        md.append((WORKER_ID, self.worker_id))
        if self.application:
            md.append(("application", self.application))
        if session_id:
            md.append(("session_id", session_id))
        if request_id:
            md.append(("request_id", request_id))
        return md

    async def info(self, timeout_s: float = 30.0) -> pb.GetSelectorInfoResponse:
        return await self._ensure().GetSelectorInfo(pb.GetSelectorInfoRequest(), timeout=timeout_s,
                                                    metadata=self._metadata())

    async def close_session(self, session_id: str) -> None:
        try:
            await self._ensure().CloseSession(pb.CloseSessionRequest(session_id=session_id), timeout=2.0,
                                              metadata=self._metadata(session_id))
        except grpc.aio.AioRpcError:
            pass  # the selector evicts idle sessions on its own

    async def select(self, request: pb.SelectRequest, deadline: float) -> pb.SelectResponse:
        return await self._call(self._ensure().Select, request, deadline)

    async def decode(self, request: pb.DecodeRequest, deadline: float) -> pb.DecodeResponse:
        return await self._call(self._ensure().Decode, request, deadline)

    def _connected(self) -> bool:
        """Whether the channel holds a connection; a timed-out attempt on a channel that does not was a
        connection failure (a silently unreachable host), not a slow selector."""
        if self._channel is None:
            return False
        return self._channel.get_state(try_to_connect=False) in (grpc.ChannelConnectivity.READY,
                                                                  grpc.ChannelConnectivity.IDLE)

    def _backoff_s(self, attempt: int) -> float:
        """Exponential backoff with equal jitter: half fixed, half random."""
        base = min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2 ** attempt)
        return base / 2 + self.rng.uniform(0, base / 2)

    def _busy_past_deadline(self, why: str, hint_s: float | None = None) -> SelectorBusy:
        self.counters.busy_past_deadline += 1
        return SelectorBusy(f"selector busy past the deadline ({why})", hint_s)

    async def _attempt(self, method, request, timeout: float):
        """One RPC attempt, reported to `on_attempt` (if set) with its outcome and duration; an attempt
        cancelled because the request went away reports CANCELLED."""
        started, code = time.monotonic(), grpc.StatusCode.CANCELLED
        try:
            reply = await method(request, timeout=timeout,
                                 metadata=self._metadata(request.session_id, request.request_id))
            code = None
            return reply
        except grpc.aio.AioRpcError as e:
            code = e.code()
            raise
        except Exception:
            code = grpc.StatusCode.UNKNOWN
            raise
        finally:
            if self.on_attempt is not None:
                self.on_attempt(type(request).__name__.removesuffix("Request"), code, time.monotonic() - started)

    async def _call(self, method, request, deadline: float):
        """Call until a reply, an error a resend cannot fix, an open breaker or the (monotonic) deadline,
        resending the same step."""
        self.counters.calls += 1
        waits = 0  # consecutive waits without a hint, for the backoff
        last_outage: str | None = None  # set while the latest problem was an outage
        last_busy = "no attempt before the deadline"
        while True:
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                if last_outage is not None:
                    raise SelectorDown(f"selector unreachable until the deadline ({last_outage})",
                                       self.breaker.retry_in_s())
                raise self._busy_past_deadline(last_busy)
            permit = self.breaker.try_acquire()
            if permit is None:
                self.counters.breaker_rejections += 1
                retry_in = self.breaker.retry_in_s()
                raise SelectorDown(f"circuit breaker open after {self.breaker.consecutive} consecutive connection "
                                   f"failures; next probe in {retry_in:.1f} s", retry_in)
            # One attempt lasts until the request's deadline (capped by select_timeout_s): a cancelled attempt
            # saves the selector nothing, it finishes the step anyway.
            timeout = min(self.select_timeout_s, remaining)
            capped = timeout < remaining
            self.counters.attempts += 1
            try:
                reply = await self._attempt(method, request, timeout)
            except grpc.aio.AioRpcError as e:
                code, details = e.code(), e.details()
                if code in OUTAGE_CODES:
                    self.breaker.outage(permit)
                    self.counters.outage_failures += 1
                    last_outage = f"{code.name}: {details}"
                elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    if not self._connected():  # the channel never got through: that is an outage
                        self.breaker.outage(permit)
                        self.counters.outage_failures += 1
                        last_outage = f"could not connect within {timeout:.1f} s"
                        if not capped:
                            continue  # the deadline has passed: the top of the loop says so
                    else:
                        self.breaker.inconclusive(permit)
                        self._busy, last_outage = True, None
                        if not capped:
                            raise self._busy_past_deadline(f"no answer within {timeout:.1f} s") from None
                        # The selector is still working on this step; the resend joins it (or gets its kept
                        # reply), so there is nothing to wait for.
                        self.counters.busy_retries += 1
                        last_busy = f"no answer to an attempt of {timeout:.1f} s"
                        continue
                elif code in BUSY_CODES and not _local_size_error(code, details):
                    self.breaker.success()  # it answered: alive, only busy
                    self._busy, last_outage = True, None
                    hint = retry_after_s(e) if code == grpc.StatusCode.RESOURCE_EXHAUSTED else None
                    self.counters.resource_exhausted += code == grpc.StatusCode.RESOURCE_EXHAUSTED
                    # over this worker's quota: busy like a full queue (the breaker stays closed), counted apart
                    self.counters.quota_refusals += (code == grpc.StatusCode.RESOURCE_EXHAUSTED
                                                     and quota_exceeded(e) is not None)
                    last_busy = f"{code.name}: {details}"
                    left = deadline - time.monotonic()
                    if hint is not None:
                        if hint >= left:  # the selector says it cannot take the step before the deadline
                            raise self._busy_past_deadline(
                                f"{last_busy}; the retry hint of {hint * 1000:.0f} ms is beyond the "
                                f"{max(left, 0) * 1000:.0f} ms left", hint) from None
                        wait = hint * (1 + self.rng.uniform(0, HINT_JITTER))
                    else:
                        wait = self._backoff_s(waits)
                        waits += 1
                    self.counters.busy_retries += 1
                    await asyncio.sleep(min(wait, left))
                    continue
                elif code == grpc.StatusCode.FAILED_PRECONDITION:
                    self.breaker.success()  # the selector is up; it just lacks our state
                    self._busy = False
                    raise SessionLost(details) from None
                elif code in AUTH_CODES:
                    self.breaker.success()  # it answered: up, only not for these credentials
                    self._busy = False
                    raise SelectorAuthRefused(auth_refusal(self.address, code, details)) from None
                else:
                    self.breaker.success()
                    self._busy = False
                    raise SelectorRefused(f"selector refused the request: {code.name}: {details}") from None
                # an outage: back off, then try again while the breaker and the deadline allow
                await asyncio.sleep(min(self._backoff_s(waits), max(0.0, deadline - time.monotonic())))
                waits += 1
                continue
            except BaseException:  # cancelled (the request went away): the attempt proved nothing
                self.breaker.inconclusive(permit)
                raise
            self.breaker.success()
            self._busy = False
            return reply


def _local_size_error(code: grpc.StatusCode, details: str | None) -> bool:
    """gRPC reports a message over the size limit as RESOURCE_EXHAUSTED too; resending cannot fix that."""
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (details or "")

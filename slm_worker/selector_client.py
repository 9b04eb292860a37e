"""The worker's side of the selector protocol: deadlines, retries, a circuit breaker and a call budget.

Every failure here is something the decode loop degrades around, never a client-visible error:
  SessionLost          the selector does not hold what the request builds on (FAILED_PRECONDITION): resync
  SelectorUnavailable  down, slow, overloaded, breaker open, or past the block's deadline: commit unverified
Retries resend the same (session_id, step), which the selector answers idempotently.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from asyncio_throttle import Throttler

from s2t.v1 import selector_pb2 as pb
from s2t.v1 import selector_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.ABORTED}


class SessionLost(Exception):
    """The selector lost the session or the prefix the request built on: resend the full context."""


class SelectorUnavailable(Exception):
    """The selector did not answer usefully in time."""


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
    """Opens after `failures` consecutive failed attempts; while open, calls fail at once; after `open_s` one
    probe call is let through (half-open) and its result closes or re-opens the breaker."""

    def __init__(self, failures: int, open_s: float):
        self.threshold, self.open_s = failures, open_s
        self.consecutive = 0
        self.opened_at: float | None = None
        self.probing = False

    def allow(self) -> bool:
        if self.opened_at is None:
            return True
        if not self.probing and time.monotonic() - self.opened_at >= self.open_s:
            self.probing = True
            return True
        return False

    def success(self) -> None:
        self.consecutive, self.opened_at, self.probing = 0, None, False

    def failure(self) -> None:
        self.consecutive += 1
        if self.probing or self.consecutive >= self.threshold:
            self.opened_at, self.probing = time.monotonic(), False

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None


class SelectorClient:
    def __init__(self, address: str, application: str = "", select_timeout_s: float = 10.0,
                 breaker_failures: int = 3, breaker_open_s: float = 10.0, calls_per_s: float = 0.0):
        self.address = address
        self.application = application
        self.select_timeout_s = select_timeout_s
        self.breaker = CircuitBreaker(breaker_failures, breaker_open_s)
        self.budget = CallBudget(calls_per_s)
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.SelectorServiceStub | None = None

    def _ensure(self) -> pb_grpc.SelectorServiceStub:
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(self.address, options=[
                ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.max_receive_message_length", 32 << 20), ("grpc.max_send_message_length", 32 << 20),
                ("grpc.enable_retries", 0)])
            self._stub = pb_grpc.SelectorServiceStub(self._channel)
        return self._stub

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel, self._stub = None, None

    def _metadata(self, session_id: str = "", request_id: str = "") -> list[tuple[str, str]]:
        md = []
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

    async def _call(self, method, request, deadline: float):
        """Call until success, a non-retryable error or the (monotonic) deadline, resending the same step."""
        backoff = 0.05
        last = "no attempt"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SelectorUnavailable(f"selector gave no answer in time ({last})")
            if not self.breaker.allow():
                raise SelectorUnavailable("selector circuit breaker open after repeated failures")
            try:
                reply = await method(request, timeout=min(self.select_timeout_s, remaining),
                                     metadata=self._metadata(request.session_id, request.request_id))
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if code == grpc.StatusCode.FAILED_PRECONDITION:
                    self.breaker.success()  # the selector is up; it just lacks our state
                    raise SessionLost(e.details()) from None
                if code not in RETRYABLE:
                    self.breaker.success()
                    raise SelectorUnavailable(f"selector refused the request: {code.name}: {e.details()}") from None
                self.breaker.failure()
                last = f"{code.name}: {e.details()}"
                await asyncio.sleep(min(backoff, max(0.0, deadline - time.monotonic())))
                backoff = min(backoff * 2, 1.0)
                continue
            self.breaker.success()
            return reply

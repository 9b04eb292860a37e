"""The worker's selector client: a busy selector is waited for and never taken for a dead one; only connection
failures open the breaker; the retry hint is honoured within the deadline; SelectorBusy vs SelectorDown.
And the selector's side of the contract: RESOURCE_EXHAUSTED with the hint when its queue bound is exceeded."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import grpc
import pytest

from llm_selector.core import SelectorCore, SelectorError
from s2t.runtime import Engine, load_model
from s2t.v1 import selector_pb2 as pb
from s2t.v1 import selector_pb2_grpc as sel_grpc
from servers import slow_compute
from slm_worker.selector_client import (BreakerState, CircuitBreaker, Permit, SelectorBusy, SelectorClient,
                                        SelectorDown, SelectorRefused, SelectorState, SelectorUnavailable,
                                        SessionLost, retry_after_s)

REQUEST = pb.SelectRequest(session_id="s", step=3)
RE = grpc.StatusCode.RESOURCE_EXHAUSTED


# -- the breaker alone, on a fake clock ----------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_only_on_consecutive_outages():
    clock = FakeClock()
    breaker = CircuitBreaker(failures=3, open_s=5.0, clock=clock)
    for _ in range(50):  # slow attempts prove nothing: they never count
        assert breaker.try_acquire() is Permit.NORMAL
        breaker.inconclusive(Permit.NORMAL)
    breaker.outage(Permit.NORMAL)
    breaker.outage(Permit.NORMAL)
    breaker.success()  # an answer in between resets the count
    breaker.outage(Permit.NORMAL)
    breaker.outage(Permit.NORMAL)
    assert breaker.state is BreakerState.CLOSED
    breaker.outage(Permit.NORMAL)
    assert breaker.state is BreakerState.OPEN and breaker.openings == 1
    assert breaker.try_acquire() is None
    assert breaker.retry_in_s() == pytest.approx(5.0)


def test_breaker_half_open_probe_then_close_or_reopen():
    clock = FakeClock()
    breaker = CircuitBreaker(failures=1, open_s=5.0, clock=clock)
    breaker.outage(Permit.NORMAL)
    clock.now += 4.9
    assert breaker.try_acquire() is None
    clock.now += 0.1
    assert breaker.try_acquire() is Permit.PROBE
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.try_acquire() is None, "one probe at a time"
    breaker.outage(Permit.PROBE)  # the probe failed: open for another open_s
    assert breaker.state is BreakerState.OPEN and breaker.openings == 2
    assert breaker.try_acquire() is None
    clock.now += 5.0
    probe = breaker.try_acquire()
    assert probe is Permit.PROBE
    breaker.inconclusive(probe)  # a probe that proved nothing (slow, cancelled) hands its turn on
    assert breaker.state is BreakerState.OPEN
    assert breaker.try_acquire() is Permit.PROBE
    breaker.success()
    assert breaker.state is BreakerState.CLOSED and breaker.consecutive == 0
    assert breaker.try_acquire() is Permit.NORMAL


def test_breaker_ignores_late_outages_of_calls_started_before_it_opened():
    clock = FakeClock()
    breaker = CircuitBreaker(failures=2, open_s=5.0, clock=clock)
    breaker.outage(Permit.NORMAL)
    breaker.outage(Permit.NORMAL)
    opened = breaker.opened_at
    clock.now += 3.0
    breaker.outage(Permit.NORMAL)  # an attempt that was in flight: the open period does not restart
    assert breaker.opened_at == opened and breaker.openings == 1


# -- the retry hint ------------------------------------------------------------------------------------------


def test_retry_hint_comes_from_trailing_metadata_or_the_message():
    md = grpc.aio.Metadata(("retry-after-ms", "250"))
    assert retry_after_s(grpc.aio.AioRpcError(RE, grpc.aio.Metadata(), md, "overloaded")) == 0.25
    in_message = grpc.aio.AioRpcError(RE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                      "selector overloaded: 9 requests; retry-after-ms=1200")
    assert retry_after_s(in_message) == 1.2
    # Ray Serve's own back-pressure has no hint
    assert retry_after_s(grpc.aio.AioRpcError(RE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                              "Request dropped due to backpressure")) is None


# -- the client against a scripted selector over real gRPC -----------------------------------------------------


class ScriptedSelector(sel_grpc.SelectorServiceServicer):
    """Answers Select calls from a script, one action per call (then "ok"), and records when each came."""

    def __init__(self, *script):
        self.script = list(script)
        self.arrivals: list[float] = []

    async def Select(self, request, context):
        self.arrivals.append(time.monotonic())
        action, *args = self.script.pop(0) if self.script else ("ok",)
        if action == "sleep":
            await asyncio.sleep(args[0])
        elif action == "abort":
            code, details, *md = args
            await context.abort(code, details, trailing_metadata=tuple(md))
        return pb.SelectResponse(session_id=request.session_id, step=request.step, session_length=7)


@contextlib.asynccontextmanager
async def serving(servicer, port: int = 0):
    server = grpc.aio.server()
    sel_grpc.add_SelectorServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(0)


def client_for(port: int, **kw) -> SelectorClient:
    return SelectorClient(f"127.0.0.1:{port}", rng=random.Random(0), **kw)


def overloaded(hint_ms: int, metadata: bool = True):
    md = [("retry-after-ms", str(hint_ms))] if metadata else []
    return ("abort", RE, f"selector overloaded; retry-after-ms={hint_ms}", *md)


async def test_resource_exhausted_waits_for_the_hint_and_never_opens_the_breaker():
    selector = ScriptedSelector(overloaded(120), overloaded(120, metadata=False), overloaded(120),
                                overloaded(120), overloaded(120))
    async with serving(selector) as port:
        client = client_for(port, breaker_failures=1)
        reply = await client.select(REQUEST, time.monotonic() + 10)
        await client.close()
    assert reply.step == 3 and reply.session_length == 7
    gaps = [b - a for a, b in zip(selector.arrivals, selector.arrivals[1:])]
    # the hint plus at most 25 % jitter (and some room for a loaded machine)
    assert len(gaps) == 5 and all(0.12 <= g < 0.12 * 1.25 + 0.25 for g in gaps), gaps
    c = client.counters
    assert c.resource_exhausted == 5 and c.busy_retries == 5 and c.outage_failures == 0
    assert client.breaker.state is BreakerState.CLOSED and client.breaker.openings == 0
    assert client.state is SelectorState.UP


async def test_a_hint_beyond_the_deadline_ends_the_call_busy_at_once():
    selector = ScriptedSelector(overloaded(120), overloaded(5000))
    async with serving(selector) as port:
        client = client_for(port, breaker_failures=1)
        started = time.monotonic()
        with pytest.raises(SelectorBusy) as e:
            await client.select(REQUEST, started + 2.0)
        took = time.monotonic() - started
        await client.close()
    assert "selector busy past the deadline" in str(e.value) and e.value.retry_after_s == 5.0
    assert 0.12 <= took < 1.5, "the second refusal's hint is past the deadline: no waiting for it"
    assert isinstance(e.value, SelectorUnavailable) and not isinstance(e.value, SelectorDown)
    assert client.state is SelectorState.BUSY and client.breaker.state is BreakerState.CLOSED
    assert client.counters.busy_past_deadline == 1


async def test_slow_selector_is_busy_past_the_deadline_never_down():
    selector = ScriptedSelector(*[("sleep", 1.0)] * 5)
    async with serving(selector) as port:
        client = client_for(port, breaker_failures=2)
        for _ in range(5):  # far more slow calls than breaker_failures
            started = time.monotonic()
            with pytest.raises(SelectorBusy) as e:
                await client.select(REQUEST, started + 0.15)
            assert time.monotonic() - started < 0.8, "not a wait for the selector's answer"
            assert "selector busy past the deadline" in str(e.value)
        assert len(selector.arrivals) == 5, "one attempt per call, lasting until the deadline"
        assert client.breaker.state is BreakerState.CLOSED and client.state is SelectorState.BUSY
        assert client.counters.outage_failures == 0
        assert (await client.select(REQUEST, time.monotonic() + 5)).step == 3
        assert client.state is SelectorState.UP
        await client.close()


async def test_an_attempt_cut_by_the_cap_is_resent_within_the_deadline():
    selector = ScriptedSelector(("sleep", 0.4))  # the resend is answered at once
    async with serving(selector) as port:
        client = client_for(port, select_timeout_s=0.1, breaker_failures=1)
        reply = await client.select(REQUEST, time.monotonic() + 5)
        await client.close()
    assert reply.step == 3 and len(selector.arrivals) == 2
    assert client.counters.busy_retries == 1 and client.breaker.state is BreakerState.CLOSED


async def test_unavailable_answers_are_retried_and_open_the_breaker_when_consecutive():
    unavailable = ("abort", grpc.StatusCode.UNAVAILABLE, "injected: restarting")
    async with serving(ScriptedSelector(unavailable, unavailable)) as port:
        client = client_for(port, breaker_failures=3)
        assert (await client.select(REQUEST, time.monotonic() + 5)).step == 3
        assert client.counters.outage_failures == 2 and client.breaker.state is BreakerState.CLOSED
        await client.close()
    async with serving(ScriptedSelector(unavailable, unavailable, unavailable)) as port:
        client = client_for(port, breaker_failures=2)
        with pytest.raises(SelectorDown):
            await client.select(REQUEST, time.monotonic() + 5)
        assert client.breaker.state is BreakerState.OPEN and client.state is SelectorState.DOWN
        assert client.counters.outage_failures == 2
        await client.close()


async def test_outage_opens_the_breaker_fails_fast_and_a_probe_closes_it_when_the_selector_is_back():
    async with serving(ScriptedSelector()) as port:
        pass  # a port that refuses connections now
    client = client_for(port, breaker_failures=3, breaker_open_s=0.3)
    started = time.monotonic()
    with pytest.raises(SelectorDown) as e:
        await client.select(REQUEST, started + 5)
    assert time.monotonic() - started < 1.0, "three quick connection failures, not a wait for the deadline"
    assert client.counters.outage_failures == 3 and client.state is SelectorState.DOWN
    assert "circuit breaker open" in str(e.value) and 0 < e.value.retry_in_s <= 0.3
    with pytest.raises(SelectorDown):  # refused without an attempt while open
        await client.select(REQUEST, time.monotonic() + 5)
    assert client.counters.breaker_rejections == 2 and client.counters.attempts == 3
    await asyncio.sleep(0.3)
    async with serving(ScriptedSelector(), port) as same_port:
        assert same_port == port
        # the channel may still be backing off its reconnection: the probe's UNAVAILABLE re-opens the breaker
        # for another breaker_open_s, so keep asking as the decode loop would
        deadline = time.monotonic() + 10
        while True:
            try:
                reply = await client.select(REQUEST, time.monotonic() + 2)
                break
            except SelectorDown as down:
                assert time.monotonic() < deadline
                await asyncio.sleep(max(down.retry_in_s, 0.05))
        assert reply.step == 3
        assert client.breaker.state is BreakerState.CLOSED and client.state is SelectorState.UP
    await client.close()


async def test_unreachable_until_the_deadline_is_down_not_busy():
    async with serving(ScriptedSelector()) as port:
        pass
    client = client_for(port, breaker_failures=1000)  # the breaker never opens: the deadline ends it
    with pytest.raises(SelectorDown) as e:
        await client.select(REQUEST, time.monotonic() + 0.4)
    assert "unreachable until the deadline" in str(e.value)
    assert client.counters.outage_failures >= 2 and client.counters.busy_past_deadline == 0
    await client.close()


async def test_session_lost_and_refusals_are_answers_not_outages():
    selector = ScriptedSelector(("abort", grpc.StatusCode.FAILED_PRECONDITION, "unknown session"),
                                ("abort", grpc.StatusCode.INTERNAL, "bug"),
                                ("abort", grpc.StatusCode.INVALID_ARGUMENT, "positions: empty"))
    async with serving(selector) as port:
        client = client_for(port, breaker_failures=1)
        with pytest.raises(SessionLost):
            await client.select(REQUEST, time.monotonic() + 5)
        for _ in range(2):
            with pytest.raises(SelectorRefused):
                await client.select(REQUEST, time.monotonic() + 5)
        await client.close()
    assert len(selector.arrivals) == 3, "no resends of answers a resend cannot change"
    assert client.breaker.state is BreakerState.CLOSED and client.counters.outage_failures == 0


async def test_a_cancelled_probe_hands_its_turn_on():
    async with serving(ScriptedSelector(("sleep", 5.0))) as port:
        client = client_for(port, breaker_failures=1, breaker_open_s=0.05)
        client.breaker.outage(Permit.NORMAL)  # as after an outage
        await asyncio.sleep(0.06)
        probe = asyncio.create_task(client.select(REQUEST, time.monotonic() + 10))
        await asyncio.sleep(0.2)
        assert client.breaker.state is BreakerState.HALF_OPEN
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe
        assert client.breaker.state is BreakerState.OPEN
        assert (await client.select(REQUEST, time.monotonic() + 5)).step == 3  # the next call probes
        assert client.breaker.state is BreakerState.CLOSED
        await client.close()


# -- the selector's back-pressure (SelectorCore directly) -------------------------------------------------------


@pytest.fixture
def make_core(make_settings, tiny_pair):
    engine = Engine(load_model(str(tiny_pair[1]), tiny_pair[1].parent, "native"))

    def make(**selector) -> SelectorCore:
        settings = make_settings(**{"selector.log_enabled": False, **{f"selector.{k}": v for k, v in selector.items()}})
        return SelectorCore(engine, settings.selector)

    return make


def select_request(session: str, step: int = 0, prefix: list[int] | None = None, new: list[int] | None = None):
    prefix, new = prefix or [], new or [5, 6, 7]
    n = len(prefix) + len(new)
    return pb.SelectRequest(session_id=session, step=step, prefix_length=len(prefix), token_ids=new,
                            positions=[pb.CandidatePosition(position=n, candidate_ids=[1, 2, 3])],
                            trigger=pb.SelectTriggerSpec(kind=pb.SELECT_TRIGGER_ALWAYS))


async def test_selector_answers_resource_exhausted_with_a_hint_beyond_its_queue_bound(make_core):
    core = make_core(max_queued_requests=2, max_batch_size=1)
    requests = [select_request(f"s{i}") for i in range(5)]
    outcomes = await asyncio.gather(*(core.handle(r, "select") for r in requests), return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, SelectorError)]
    assert [isinstance(o, pb.SelectResponse) for o in outcomes] == [True, True, False, False, False]
    assert core.counters["resource_exhausted"] == 3 and core.counters["queued_peak"] == 2
    for e in refused:
        assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.retry_after_ms >= 1
        assert f"retry-after-ms={e.retry_after_ms}" in e.message
        assert e.trailing_metadata() == (("retry-after-ms", str(e.retry_after_ms)),)
    # a refusal changes nothing: the resends of the same steps are admitted and answered like the others
    again = [await core.handle(r, "select") for r in requests[2:]]
    assert [a.selections[0].index for a in again] == [outcomes[0].selections[0].index] * 3
    assert all(a.session_length == 3 for a in again)


async def test_overload_answer_reaches_the_client_through_grpc_with_its_hint(make_core):
    """The plain grpc.aio servicer maps the overload to RESOURCE_EXHAUSTED with trailing `retry-after-ms`."""
    from llm_selector.grpc_server import SelectorServicer

    core = make_core(max_queued_requests=1, max_batch_size=1)
    slow_compute(core, 0.2)
    async with serving(SelectorServicer(core)) as port:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = sel_grpc.SelectorServiceStub(channel)
        calls = [asyncio.ensure_future(stub.Select(select_request(f"s{i}"), timeout=10)) for i in range(4)]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        await channel.close()
    errors = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert errors and all(e.code() == RE for e in errors)
    for e in errors:
        hint = dict(e.trailing_metadata())["retry-after-ms"]
        assert f"retry-after-ms={hint}" in e.details() and retry_after_s(e) == int(hint) / 1000


async def test_a_later_step_waits_for_the_resend_of_a_step_refused_for_overload(make_core):
    """Step 1 of a session whose step 0 was refused keeps waiting past step_gap_wait_s (for the hint), instead
    of giving step 0 up and failing on a prefix the selector does not hold."""
    core = make_core(max_queued_requests=1, max_batch_size=1, step_gap_wait_s=0.3)
    slow_compute(core, 0.8)
    await core.handle(select_request("warm"), "select")  # batch times are learned: the hint is ~0.8 s now
    running = asyncio.ensure_future(core.handle(select_request("x"), "select"))
    while core.counters["batches"] < 2:  # until x is on the engine
        await asyncio.sleep(0.005)
    queued = asyncio.ensure_future(core.handle(select_request("y"), "select"))
    await asyncio.sleep(0.01)  # y fills the queue
    with pytest.raises(SelectorError) as e:
        await core.handle(select_request("a", step=0), "select")
    assert e.value.code == RE and e.value.retry_after_ms >= 500
    later = asyncio.ensure_future(core.handle(select_request("a", step=1, prefix=[5, 6, 7], new=[8]), "select"))
    await running  # ~0.8 s after the refusal, well past step_gap_wait_s: y moves on to the engine
    first = await core.handle(select_request("a", step=0), "select")  # the resend
    second = await later
    await queued
    assert first.session_length == 3 and second.session_length == 4
    assert core.counters["failed_precondition"] == 0

"""Selector faults proven with real processes on loopback (issue #15): the selector as `s2t serve-selector
--no-ray`, the worker as `s2t serve-worker`, both on the tiny model pair, and eight GenerateStream requests
in flight while the selector is killed (SIGKILL), slowed down, or flaps.

What the in-process fault tests (tests/servers.py's FaultySelector) cannot show is shown here: a selector
process that dies without a word (connections reset, nothing drained), a selector that answers later than the
worker's deadline on a live connection, and a connection that is cut and refused again and again — with the
worker's real channel, reconnect backoff and circuit breaker in between. The slow and flapping selectors are
made by a TCP relay in this file between the two processes, so production code carries no fault knobs.

The worker's contract under every fault: no request fails; the client gets every committed token exactly once
(the deltas add up to the final text and ids); what was not verified is counted and named in
`degraded_reason`; and once the selector is back, new requests are verified by it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Awaitable, Callable

import grpc
import pytest

from s2t.v1 import generation_pb2 as gen_pb
from s2t.v1 import generation_pb2_grpc as gen_grpc
from test_local_mode import make_adapter

pytestmark = [pytest.mark.processes, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
STREAMS = 8
# Every wait on the processes ends after this (a hung process fails the test instead of hanging it); no
# assertion is about how long anything took.
WAIT_S = 120.0
# What the faults degrade (trigger `always`: every drafted position goes to the selector, so every block of a
# request depends on it). Blocks of 4 make several selector calls per request; 120 tokens (30 blocks) keep
# every stream of long_prompts running well past the moment all eight have received their first delta.
STREAM_OPTIONS = dict(mode=gen_pb.MODE_S2T, trigger=gen_pb.TRIGGER_ALWAYS, block_size=4, max_new_tokens=120)
PROBE_OPTIONS = dict(mode=gen_pb.MODE_S2T, trigger=gen_pb.TRIGGER_ALWAYS, block_size=4, max_new_tokens=8)
# The worker's breaker opens on the first connection failure and probes again after 0.2 s, so recovery after
# a fault takes about as long as the worker's gRPC channel needs to reconnect.
BREAKER = {"worker.breaker_failures": 1, "worker.breaker_open_s": 0.2}
# The slow-selector test: the requests' verify deadline (GenerationOptions.verify_deadline_ms, which defaults
# to the worker's worker.verify_deadline_ms), the relay's delay beyond it, and stream length (12 blocks).
SLOW_DEADLINE_MS = 1000
SLOW_DELAY_S = 2.0
SLOW_STREAM_OPTIONS = dict(STREAM_OPTIONS, max_new_tokens=48, verify_deadline_ms=SLOW_DEADLINE_MS)
# Rounds of the flapping selector: 250 ms reset and refused, 250 ms relayed.
FLAP_ROUNDS = 60


# -- the processes ------------------------------------------------------------------------------------------


def free_port() -> int:
    """A port nothing listens on now (the selector must get a fixed one: it is restarted on the same port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def set_flags(settings: dict[str, object]) -> list[str]:
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


def selector_args(tiny_pair, port: int) -> list[str]:
    return set_flags({"selector.model": tiny_pair[1], "selector.runtime.weight_formats": "native",
                      # one torch thread per process: the two processes share a small machine
                      "selector.runtime.threads": 1, "selector.grpc_port": port,
                      "selector.step_gap_wait_s": 0.5}) + ["serve-selector", "--no-ray"]


def worker_args(tiny_pair, selector_address: str, **settings: object) -> list[str]:
    return set_flags({"worker.model": tiny_pair[0], "worker.runtime.weight_formats": "native",
                      "worker.runtime.threads": 1, "worker.port": 0, "worker.selector_address": selector_address,
                      # random tiny models are unsure everywhere: without this every block is one position
                      "worker.draft_confidence": 0.0, **BREAKER, **settings}) + [
        "serve-worker", "--wait-for-selector", str(WAIT_S)]


class Processes:
    """The `s2t` processes of one test, each killed at the end whatever happened (none outlives the test)."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.started: list[asyncio.subprocess.Process] = []

    async def start(self, *args: str) -> tuple[asyncio.subprocess.Process, int]:
        """Run `s2t <args>` (cache and data under tmp_path); returns the process and the port it serves on,
        once it says so."""
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from s2t.cli import main; main()",
            "--set", f"cache_dir={self.tmp_path / 'cache'}", "--set", f"data_dir={self.tmp_path / 'data'}", *args,
            cwd=ROOT, stdout=asyncio.subprocess.PIPE)
        self.started.append(process)

        async def serving_port() -> int:
            while True:
                line = (await process.stdout.readline()).decode()
                assert line, f"s2t {' '.join(args[-3:])} exited before it served"
                found = re.search(r"serving gRPC on [\d.]+:(\d+)", line)
                if found:
                    return int(found.group(1))

        return process, await asyncio.wait_for(serving_port(), WAIT_S)

    @staticmethod
    async def kill(process: asyncio.subprocess.Process) -> None:
        """SIGKILL: the process gets no chance to drain, close connections or say goodbye."""
        if process.returncode is None:
            process.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(process.wait(), WAIT_S) == -signal.SIGKILL

    async def close(self) -> None:
        for process in self.started:
            if process.returncode is None:
                process.kill()
            await process.wait()


@contextlib.asynccontextmanager
async def processes(tmp_path: Path):
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        await procs.close()


# -- the client ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class StreamResult:
    """What one GenerateStream call received."""

    prompt: str
    deltas: list[gen_pb.TextDelta] = dataclasses.field(default_factory=list)
    final: gen_pb.GenerateResponse | None = None
    # set at the first delta (or when the call ends without one, so that nobody waits for it in vain)
    first_delta: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    running_at_fault: bool = False  # no final response yet when the fault began


async def receive(stub: gen_grpc.GenerationServiceStub, result: StreamResult, options: dict) -> None:
    """One stream to its end; a gRPC error propagates (a failed request fails the test)."""
    try:
        async for message in stub.GenerateStream(gen_pb.GenerateStreamRequest(
                prompt=result.prompt, options=gen_pb.GenerationOptions(**options))):
            if message.HasField("delta"):
                result.deltas.append(message.delta)
                result.first_delta.set()
            else:
                result.final = message.final
    finally:
        result.first_delta.set()


# Prompts whose verified completion runs to STREAM_OPTIONS' max_new_tokens (found once per session, see
# long_prompts): the tiny random models end some completions after a dozen tokens, and a stream that ends
# before the fault proves nothing about it.
_long_prompts: list[str] = []


async def long_prompts(stub: gen_grpc.GenerationServiceStub) -> list[str]:
    """STREAMS prompts whose completion, verified by the selector, ends by length, not by a stop token: their
    streams are still running when a fault comes after their first delta. Asks the worker (deterministic: the
    same prompts for every test of this session)."""
    if not _long_prompts:
        candidates = [f"Count from {i} to {i + 40}, one number per line." for i in range(2 * STREAMS)]
        replies = await asyncio.wait_for(asyncio.gather(*(stub.Generate(gen_pb.GenerateRequest(
            prompt=prompt, options=gen_pb.GenerationOptions(**STREAM_OPTIONS))) for prompt in candidates)), WAIT_S)
        for prompt, reply in zip(candidates, replies):
            assert_verified(reply.stats)  # also: the stack works before the fault
            if reply.finish_reason == gen_pb.FINISH_REASON_LENGTH:
                _long_prompts.append(prompt)
        assert len(_long_prompts) >= STREAMS, f"only {len(_long_prompts)} of {len(candidates)} prompts run long"
    return _long_prompts[:STREAMS]


async def streams_through(stub: gen_grpc.GenerationServiceStub,
                          fault: Callable[[list[StreamResult]], Awaitable[None]],
                          options: dict = STREAM_OPTIONS) -> list[StreamResult]:
    """Run STREAMS streams (of long_prompts); once each has received a delta (it is running and the selector
    has verified for it), run `fault(the streams' results so far)` while they continue; return them finished."""
    results = [StreamResult(prompt) for prompt in await long_prompts(stub)]
    tasks = [asyncio.create_task(receive(stub, result, options)) for result in results]
    try:
        await asyncio.wait_for(asyncio.gather(*(r.first_delta.wait() for r in results)), WAIT_S)
        for result in results:
            result.running_at_fault = result.final is None
        await asyncio.wait_for(fault(results), WAIT_S)
        await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return results


def assert_whole(result: StreamResult) -> gen_pb.GenerationStats:
    """The request finished normally and the client got every committed token exactly once."""
    final = result.final
    assert final is not None, "the stream ended without its final response"
    assert final.finish_reason in (gen_pb.FINISH_REASON_STOP, gen_pb.FINISH_REASON_LENGTH)
    st = final.stats
    assert "".join(d.text for d in result.deltas) == final.text
    assert [t for d in result.deltas for t in d.token_ids] == list(final.token_ids)
    assert len(final.token_ids) == st.completion_tokens > 0
    # each committed token counted once: verified, committed unverified, or decided locally
    assert st.verified_tokens + st.unverified_tokens + st.local_decisions == st.completion_tokens
    return st


async def verified_again(stub: gen_grpc.GenerationServiceStub) -> gen_pb.GenerationStats:
    """Send short s2t requests until one is verified by the selector from start to end (the worker's breaker
    and channel need a moment to notice that the selector is back); bounded by WAIT_S."""
    give_up = time.monotonic() + WAIT_S
    while True:
        reply = await stub.Generate(gen_pb.GenerateRequest(prompt="What is 2 + 3?",
                                                           options=gen_pb.GenerationOptions(**PROBE_OPTIONS)),
                                    timeout=WAIT_S)
        st = reply.stats
        if st.positions_checked > 0 and not st.degraded_reason:
            return st
        assert time.monotonic() < give_up, f"the selector never verified again; last: {st.degraded_reason}"
        await asyncio.sleep(0.2)


def assert_verified(st: gen_pb.GenerationStats) -> None:
    """Every token of the request came through the selector. (A failed call may still be counted in
    selector_failures: one for a block that a divergence before it made moot, whose drafts were sent again.)"""
    assert st.mode_used == gen_pb.MODE_S2T and st.selector_calls > 0 and st.positions_checked > 0
    assert st.verified_tokens == st.completion_tokens and st.unverified_tokens == 0
    assert st.degraded_reason == ""


# -- a TCP relay with faults --------------------------------------------------------------------------------


class Relay:
    """A TCP relay from a local port to the selector process, in this test's event loop, with two faults:

    slow      every chunk, in either direction, is forwarded `delay_s` after it arrived (in order: a chunk never
              overtakes an earlier one), so the selector answers late on a live connection;
    down      `go_down()` stops listening (connections are refused) and resets every relayed connection;
              `go_up()` listens on the same port again.
    """

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.port = 0
        self.delay_s = 0.0
        self.server: asyncio.Server | None = None
        self.connections: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.cut = 0  # relayed connections reset by go_down()

    async def go_up(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def go_down(self) -> None:
        self.server.close()
        for client, upstream in list(self.connections):
            client.transport.abort()  # RST: as if the selector's host went away
            upstream.transport.abort()
            self.cut += 1
        self.connections.clear()
        await self.server.wait_closed()

    async def close(self) -> None:
        if self.server is not None and self.server.is_serving():
            await self.go_down()

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:  # the selector is not up: the worker sees its connection closed
            client_writer.transport.abort()
            return
        pair = (client_writer, upstream_writer)
        self.connections.add(pair)
        try:
            await asyncio.gather(self._pipe(client_reader, upstream_writer),
                                 self._pipe(upstream_reader, client_writer))
        except (ConnectionError, OSError):
            pass
        finally:
            self.connections.discard(pair)
            for writer in pair:
                writer.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Forward reader -> writer, each chunk at its arrival time + delay_s (0: at once)."""
        loop = asyncio.get_running_loop()
        due: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def forward() -> None:
            while True:
                when, chunk = await due.get()
                if not chunk:
                    return
                if when > loop.time():
                    await asyncio.sleep(when - loop.time())
                writer.write(chunk)
                await writer.drain()

        forwarder = asyncio.create_task(forward())
        try:
            while chunk := await reader.read(65536):
                due.put_nowait((loop.time() + self.delay_s, chunk))
            due.put_nowait((loop.time(), b""))
            await forwarder
        finally:
            forwarder.cancel()
            await asyncio.gather(forwarder, return_exceptions=True)


@contextlib.asynccontextmanager
async def relay_to(upstream_port: int):
    relay = Relay(upstream_port)
    await relay.go_up()
    try:
        yield relay
    finally:
        await relay.close()


# -- the tests ----------------------------------------------------------------------------------------------


async def kill_selector_mid_stream(tiny_pair, procs: Processes, restart: bool, **worker_settings):
    """A selector and a worker; eight streams; SIGKILL to the selector once each stream has received a delta.
    Returns the streams' results, and with `restart` the stats of a request after a new selector process came
    up on the same port."""
    selector_port = free_port()
    (selector, _), (_, worker_port) = await asyncio.gather(
        procs.start(*selector_args(tiny_pair, selector_port)),
        procs.start(*worker_args(tiny_pair, f"127.0.0.1:{selector_port}", **worker_settings)))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{worker_port}") as channel:
        stub = gen_grpc.GenerationServiceStub(channel)
        results = await streams_through(stub, lambda _: procs.kill(selector))
        after = None
        if restart:
            await procs.start(*selector_args(tiny_pair, selector_port))
            after = await verified_again(stub)
    return results, after


async def test_selector_killed_mid_stream_degrades_every_stream_and_serves_again_after_a_restart(tiny_pair, tmp_path):
    """SIGKILL to the selector process while eight streams run: every stream completes with every token once,
    the tokens after the kill commit unverified and the stats say the selector was down; a new selector process
    on the same port verifies again (the breaker closes on its own)."""
    async with processes(tmp_path) as procs:
        results, after = await kill_selector_mid_stream(tiny_pair, procs, restart=True)
    for result in results:
        assert result.running_at_fault, "the kill landed after this stream had finished: make it longer"
        st = assert_whole(result)
        assert st.positions_checked > 0 and st.verified_tokens > 0, "verified until the kill"
        assert st.mode_used == gen_pb.MODE_S2T  # the selector answered for part of it
        assert st.unverified_tokens > 0 and st.selector_failures > 0
        reason = st.degraded_reason
        assert "committed unverified" in reason and "selector down" in reason, reason
    assert_verified(after)


async def test_selector_killed_mid_stream_with_an_adapter_continues_re_ranked_locally(tiny_pair, tmp_path):
    """The same kill with an S2T-Local adapter on the worker: the streams continue re-ranked by it, nothing
    commits unverified."""
    make_adapter(tiny_pair[0], tmp_path / "adapters" / "v1", "v1", seed=3)
    async with processes(tmp_path) as procs:
        results, _ = await kill_selector_mid_stream(tiny_pair, procs, restart=False,
                                                    **{"worker.adapter_dir": tmp_path / "adapters"})
    for result in results:
        assert result.running_at_fault, "the kill landed after this stream had finished: make it longer"
        st = assert_whole(result)
        assert st.positions_checked > 0 and st.reranked_positions > 0 and st.adapter_version == "v1"
        assert st.mode_used == gen_pb.MODE_S2T and st.unverified_tokens == 0
        assert "re-ranked locally" in st.degraded_reason, st.degraded_reason


@contextlib.asynccontextmanager
async def stack_behind_relay(tiny_pair, tmp_path, **worker_settings):
    """A selector process, a relay to it, and a worker process that reaches the selector through the relay;
    yields (relay, a stub of the worker)."""
    selector_port = free_port()
    async with processes(tmp_path) as procs, relay_to(selector_port) as relay:
        # started together: the worker retries GetSelectorInfo (through the relay) until the selector is up
        _, (_, worker_port) = await asyncio.gather(
            procs.start(*selector_args(tiny_pair, selector_port)),
            procs.start(*worker_args(tiny_pair, f"127.0.0.1:{relay.port}", **worker_settings)))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{worker_port}") as channel:
            yield relay, gen_grpc.GenerationServiceStub(channel)


async def test_a_selector_slower_than_the_deadline_commits_drafts_unverified_and_fails_nothing(tiny_pair, tmp_path):
    """Every byte between worker and selector delayed beyond the requests' verify deadline, on a live
    connection: the selector is slow, not down. The blocks after the delay began commit unverified as 'busy
    past the deadline' (the breaker stays closed: nothing says 'down'), every stream completes whole; once the
    delay is gone, requests are verified again.

    The short deadline is the requests' own (verify_deadline_ms), so that the requests before and after the
    fault keep the worker's default and are verified even on a loaded machine."""
    async with stack_behind_relay(tiny_pair, tmp_path) as (relay, stub):
        assert_verified(await verified_again(stub))  # the relay passes the protocol through untouched

        async def slow_down(_: list[StreamResult]) -> None:
            relay.delay_s = SLOW_DELAY_S

        results = await streams_through(stub, slow_down, SLOW_STREAM_OPTIONS)
        relay.delay_s = 0.0
        after = await verified_again(stub)
    for result in results:
        assert result.running_at_fault, "the delay began after this stream had finished: make it longer"
        st = assert_whole(result)
        assert st.unverified_tokens > 0 and st.selector_failures > 0
        assert "selector busy past the deadline" in st.degraded_reason, st.degraded_reason
        assert "selector down" not in st.degraded_reason, "a slow selector on a live connection is not down"
    assert_verified(after)


async def test_a_flapping_selector_fails_no_request_and_verifies_again_once_it_is_steady(tiny_pair, tmp_path):
    """The connection to the selector is reset and refused, then relayed again, every 250 ms while eight streams
    run: none fails, each gets every token once, the ones with blocks the outages left unverified say the
    selector was down; once the relay is steady, requests are verified again."""
    async with stack_behind_relay(tiny_pair, tmp_path) as (relay, stub):
        assert_verified(await verified_again(stub))

        async def flap(results: list[StreamResult]) -> None:
            # at least one cut (the streams are running: their selector calls are on the connection now), then
            # down/up until every stream has finished or FLAP_ROUNDS passed (the streams then finish on a steady relay)
            for _ in range(FLAP_ROUNDS):
                await relay.go_down()
                await asyncio.sleep(0.25)
                await relay.go_up()
                if all(r.final is not None for r in results):
                    return
                await asyncio.sleep(0.25)

        results = await streams_through(stub, flap)
        after = await verified_again(stub)
    assert relay.cut > 0, "the relay never cut a connection that carried selector calls"
    degraded = 0
    for result in results:
        assert result.running_at_fault, "the flapping began after this stream had finished: make it longer"
        st = assert_whole(result)
        if st.unverified_tokens:  # a block whose selector call an outage ended (one a cut hit, or refused)
            degraded += 1
            assert st.selector_failures > 0 and "selector down" in st.degraded_reason, st.degraded_reason
    assert degraded > 0, "no stream committed a block unverified although the connection was reset under them"
    assert_verified(after)

"""Running a selector (plain grpc.aio) and a worker in the test's event loop, with optional fault injection."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import grpc

from llm_selector.core import SelectorCore, SelectorError
from llm_selector.grpc_server import SelectorServicer
from s2t.v1 import generation_pb2 as gen_pb
from s2t.v1 import generation_pb2_grpc as gen_grpc
from s2t.v1 import selector_pb2_grpc as sel_grpc
from slm_worker.server import Worker, serve


class FaultySelector(SelectorServicer):
    """The real servicer with injected faults: random delays (which reorder concurrent requests), duplicated
    deliveries of a request, UNAVAILABLE answers, and a 'restart' that throws every session away."""

    def __init__(self, core: SelectorCore, seed: int = 0):
        super().__init__(core)
        self.rng = random.Random(seed)
        self.max_delay_s = 0.0
        self.duplicate_rate = 0.0
        self.unavailable_calls = 0  # the next N calls fail with UNAVAILABLE
        self.restart_after_calls: int | None = None
        self.calls = 0
        self.hold: asyncio.Event | None = None  # when set, Select waits for it (a stalled selector)
        self.intercept = None  # an async (request, context) -> None awaited first: a test's own fault

    async def Select(self, request, context):
        self.calls += 1
        if self.intercept is not None:
            await self.intercept(request, context)
        if self.restart_after_calls is not None and self.calls >= self.restart_after_calls:
            self.restart_after_calls = None
            for sid in list(self.core.sessions._sessions):
                self.core.sessions.remove(sid)
            self.unavailable_calls = max(self.unavailable_calls, 2)
        if self.unavailable_calls > 0:
            self.unavailable_calls -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "injected: selector restarting")
        if self.hold is not None:
            await self.hold.wait()
        if self.max_delay_s:
            await asyncio.sleep(self.rng.uniform(0, self.max_delay_s))
        if self.rng.random() < self.duplicate_rate:
            with contextlib.suppress(SelectorError):
                await self.core.handle(request, "select")  # the first delivery's reply is lost
        return await super().Select(request, context)

    # Decode calls get their own random delay (0: none), so llm-mode load tests can slow them too.
    max_decode_delay_s: float = 0.0

    async def Decode(self, request, context):
        if self.max_decode_delay_s:
            await asyncio.sleep(self.rng.uniform(0, self.max_decode_delay_s))
        return await super().Decode(request, context)


def slow_compute(core: SelectorCore, delay_s: float) -> None:
    """Make every batch of `core` take `delay_s` longer, on the engine's thread like the real compute: a slow
    selector, behind which requests queue up (unlike FaultySelector's delays, which come before the queue)."""
    for name in ("compute_select", "compute_decode"):
        compute = getattr(core, name)

        def slowed(tickets, compute=compute):
            time.sleep(delay_s)
            return compute(tickets)

        setattr(core, name, slowed)


class Stack:
    """A selector and a worker serving on loopback; `stub` talks to the worker."""

    def __init__(self, settings, faulty_seed: int | None = None):
        self.settings = settings
        self.faulty_seed = faulty_seed

    async def __aenter__(self):
        self.core = SelectorCore.from_settings(self.settings)
        self.servicer = FaultySelector(self.core, self.faulty_seed or 0)
        self.selector_server = grpc.aio.server()
        sel_grpc.add_SelectorServiceServicer_to_server(self.servicer, self.selector_server)
        self.selector_port = self.selector_server.add_insecure_port("127.0.0.1:0")
        await self.selector_server.start()
        self.settings.worker.selector_address = f"127.0.0.1:{self.selector_port}"
        self.worker = Worker(self.settings)
        await self.worker.start(wait_for_selector_s=10)
        self.server, self.port = await serve(self.worker, "127.0.0.1", 0)
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = gen_grpc.GenerationServiceStub(self.channel)
        return self

    async def __aexit__(self, *exc):
        await self.channel.close()
        await self.server.stop(0)
        await self.worker.stop()
        await self.selector_server.stop(0)
        self.core.close()

    async def stop_selector(self):
        await self.selector_server.stop(0)

    async def restart_selector(self):
        """A new selector process on the same port: same model, no sessions."""
        self.core = SelectorCore(self.core.engine, self.core.settings, self.core.log)
        self.servicer = FaultySelector(self.core)
        self.selector_server = grpc.aio.server()
        sel_grpc.add_SelectorServiceServicer_to_server(self.servicer, self.selector_server)
        self.selector_server.add_insecure_port(f"127.0.0.1:{self.selector_port}")
        await self.selector_server.start()

    async def generate(self, prompt="What is 2 + 3?", **options) -> gen_pb.GenerateResponse:
        return await self.stub.Generate(gen_pb.GenerateRequest(prompt=prompt,
                                                               options=gen_pb.GenerationOptions(**options)))

    async def stream(self, prompt="What is 2 + 3?", **options) -> tuple[list, gen_pb.GenerateResponse]:
        deltas, final = [], None
        async for msg in self.stub.GenerateStream(gen_pb.GenerateStreamRequest(
                prompt=prompt, options=gen_pb.GenerationOptions(**options))):
            if msg.HasField("delta"):
                deltas.append(msg.delta)
            else:
                final = msg.final
        return deltas, final


def gsm8k_train_available() -> bool:
    from s2t import gsm8k

    try:
        gsm8k.load("train", 0, 1)
        return True
    except FileNotFoundError:
        return False


async def plain_selector(settings) -> tuple[SelectorCore, grpc.aio.Server, int]:
    """The selector on a plain grpc.aio server in this event loop (no faults): (core, server, port)."""
    core = SelectorCore.from_settings(settings)
    server = grpc.aio.server()
    sel_grpc.add_SelectorServiceServicer_to_server(SelectorServicer(core), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return core, server, port

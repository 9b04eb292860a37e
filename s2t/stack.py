"""Everything on one machine: a selector and a worker in this process's control, composed from the roles.

Used by `s2t run`, `s2t collect`, the benchmark, the profile and the end-to-end test. With `ray=True` (the
default) the selector is the Ray Serve application that `deploy/serve_config.yaml` deploys (built by the same
`llm_selector.serve_app.build_app`), so they exercise the deployed path: client -> worker gRPC -> Ray Serve
gRPC proxy -> selector replica. With `ray=False` the selector is the plain grpc.aio server in this process
(its engine reachable as `stack.selector_core`, e.g. for profiling).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time

import grpc

from s2t.v1 import generation_pb2_grpc as gen_grpc

from .config import Settings

log = logging.getLogger("s2t")


class LocalStack:
    """`async with LocalStack(settings) as stack:` gives a serving worker at stack.address and stack.stub.

    The caller's settings are not changed: the stack works on a copy (`stack.settings`)."""

    def __init__(self, settings: Settings, fetch: bool = True, ray: bool = True,
                 say=lambda m: print(m, file=sys.stderr, flush=True)):
        self.settings = settings.model_copy(deep=True)
        self.fetch = fetch
        self.ray = ray
        self.say = say
        self.selector_core = None
        self._stop_selector = None

    async def __aenter__(self) -> "LocalStack":
        from slm_worker.server import Worker, serve

        s = self.settings
        t0 = time.monotonic()
        if self.fetch:
            from .model_store import REGISTRY, fetch_models

            fetch_models([m for m in dict.fromkeys((s.worker.model, s.selector.model)) if m in REGISTRY], s.cache_dir)
        self.say(f"[stack] starting the selector ({s.selector.model}) {'on Ray Serve' if self.ray else 'in process'} ...")
        s.worker.selector_address = await self._start_selector()
        try:
            self.say(f"[stack] starting the worker ({s.worker.model}) ...")
            self.worker = Worker(s)
            await self.worker.start(wait_for_selector_s=300)
            self.server, port = await serve(self.worker, s.worker.host, s.worker.port)
        except BaseException:
            await self._stop_selector()
            raise
        self.address = f"{s.worker.host}:{port}"
        self.channel = grpc.aio.insecure_channel(self.address)
        self.stub = gen_grpc.GenerationServiceStub(self.channel)
        self.startup_s = time.monotonic() - t0
        self.say(f"[stack] ready after {self.startup_s:.0f}s: worker {self.address}, selector {s.worker.selector_address}")
        return self

    async def _start_selector(self) -> str:
        if self.ray:
            from llm_selector import serve_app

            address = serve_app.start(self.settings)

            async def stop():
                serve_app.stop()

            self._stop_selector = stop
            return address
        from llm_selector.core import SelectorCore
        from llm_selector.grpc_server import serve

        from .tracing import TracedRole, build_tracer_provider, shutdown_tracer_provider

        core = SelectorCore.from_settings(self.settings)
        tracer_provider = build_tracer_provider(self.settings.tracing, TracedRole.SELECTOR)  # None: tracing off
        server, port = await serve(core, self.settings.selector.host, self.settings.selector.grpc_port,
                                   tracer_provider)
        self.selector_core = core

        async def stop():
            await server.stop(1)
            core.close()
            await asyncio.to_thread(shutdown_tracer_provider, tracer_provider)

        self._stop_selector = stop
        return f"{self.settings.selector.host}:{port}"

    async def __aexit__(self, *exc) -> None:
        with contextlib.suppress(Exception):
            await self.channel.close()
        try:
            await self.server.stop(grace=1)
            await self.worker.stop()
        finally:
            await self._stop_selector()

    def describe(self) -> dict:
        info = self.worker.selector_info
        return {"worker": self.worker.lm.describe(), "selector": {
            "model": info.model_name, "weight_formats": info.weight_formats, "cpu_capability": info.cpu_capability,
            "device": info.device}}

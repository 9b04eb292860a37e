"""Everything on one machine: the selector on a local Ray Serve and a worker in this process.

Used by `s2t run`, the benchmark and the end-to-end test, so all three exercise the deployed path: client
-> worker gRPC -> Ray Serve gRPC proxy -> selector replica.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time

import grpc

from s2t.v1 import generation_pb2_grpc as gen_grpc

from .config import Settings

log = logging.getLogger("s2t")


class LocalStack:
    """`async with LocalStack(settings) as stack:` gives a serving worker at stack.address and stack.stub."""

    def __init__(self, settings: Settings, fetch: bool = True, say=lambda m: print(m, file=sys.stderr, flush=True)):
        self.settings = settings
        self.fetch = fetch
        self.say = say

    async def __aenter__(self) -> "LocalStack":
        from llm_selector import serve_app

        from slm_worker.server import Worker, serve

        s = self.settings
        t0 = time.monotonic()
        if self.fetch:
            from .model_store import REGISTRY, fetch_models

            fetch_models([m for m in dict.fromkeys((s.worker.model, s.selector.model)) if m in REGISTRY], s.cache_dir)
        self.say(f"[stack] starting the selector ({s.selector.model}) on Ray Serve ...")
        s.worker.selector_address = serve_app.start(s)
        self._stop_selector = serve_app.stop
        try:
            self.say(f"[stack] starting the worker ({s.worker.model}) ...")
            self.worker = Worker(s)
            await self.worker.start(wait_for_selector_s=300)
            self.server, port = await serve(self.worker, s.worker.host, s.worker.port)
        except BaseException:
            serve_app.stop()
            raise
        self.address = f"{s.worker.host}:{port}"
        self.channel = grpc.aio.insecure_channel(self.address)
        self.stub = gen_grpc.GenerationServiceStub(self.channel)
        self.startup_s = time.monotonic() - t0
        self.say(f"[stack] ready after {self.startup_s:.0f}s: worker {self.address}, selector {s.worker.selector_address}")
        return self

    async def __aexit__(self, *exc) -> None:
        with contextlib.suppress(Exception):
            await self.channel.close()
        try:
            await self.server.stop(grace=1)
            await self.worker.stop()
        finally:
            self._stop_selector()

    def describe(self) -> dict:
        info = self.worker.selector_info
        return {"worker": self.worker.lm.describe(), "selector": {
            "model": info.model_name, "weight_formats": info.weight_formats, "cpu_capability": info.cpu_capability}}

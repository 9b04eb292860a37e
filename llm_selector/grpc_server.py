"""The selector on a plain grpc.aio server, without Ray: for one-box setups and for tests.

Same core, protocol and cross-session batching as the Ray Serve app; there is no routing because there is
one process.
"""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from s2t.v1 import selector_pb2 as pb
from s2t.v1 import selector_pb2_grpc as pb_grpc
from s2t.config import Settings

from .core import SelectorCore, SelectorError

log = logging.getLogger("s2t.selector")


class SelectorServicer(pb_grpc.SelectorServiceServicer):
    def __init__(self, core: SelectorCore):
        self.core = core

    async def _handle(self, request, context, kind):
        try:
            return await self.core.handle(request, kind)
        except SelectorError as e:
            # Overload (RESOURCE_EXHAUSTED) carries its retry hint as trailing metadata `retry-after-ms`
            # and in the message; every other SelectorError has no trailing metadata.
            await context.abort(e.code, e.message, trailing_metadata=e.trailing_metadata())

    async def Select(self, request, context):
        return await self._handle(request, context, "select")

    async def Decode(self, request, context):
        return await self._handle(request, context, "decode")

    async def CloseSession(self, request, context):
        return self.core.close_session(request.session_id)

    async def GetSelectorInfo(self, request, context):
        return self.core.info()


async def serve(core: SelectorCore, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 32 << 20)])
    pb_grpc.add_SelectorServiceServicer_to_server(SelectorServicer(core), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"cannot bind the selector to {host}:{port}")
    await server.start()
    for name in ("", pb.DESCRIPTOR.services_by_name["SelectorService"].full_name):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound


async def serve_forever(settings: Settings) -> None:
    core = SelectorCore.from_settings(settings)
    server, port = await serve(core, settings.selector.host, settings.selector.grpc_port)
    print(f"selector (no Ray) serving gRPC on {settings.selector.host}:{port}", flush=True)
    try:
        await server.wait_for_termination()
    finally:
        core.close()

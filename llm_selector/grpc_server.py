"""The selector on a plain grpc.aio server, without Ray: for one-box setups and for tests.

Same core, protocol and cross-session batching as the Ray Serve app; there is no routing because there is
one process. The same credentials too: the bearer tokens of `selector.auth_tokens` (checked by an interceptor
before any SelectorService method runs; health checks stay open for probes), and optionally TLS or mTLS
(`selector.tls`), which only this server can serve (Ray Serve's proxy listens in plaintext).

Tracing (`tracing.enabled`): a SERVER span per SelectorService call, the child of the worker's CLIENT span
whose traceparent the call carries; the tracing interceptor runs before the auth one, so refused calls have
spans too (status code UNAUTHENTICATED). The span gets the request's s2t.* attributes once it is parsed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from s2t.v1 import selector_pb2 as pb
from s2t.v1 import selector_pb2_grpc as pb_grpc
from s2t.config import SelectorSettings, Settings
from s2t.security import BearerTokens, add_port
from s2t.tracing import (TracedRole, annotate_current_span, build_tracer_provider, request_attributes,
                         server_interceptors, shutdown_tracer_provider)
from s2t.wire import WireError, parse, serve_until_signalled, server_options

from .core import SelectorCore, SelectorError
from .metrics import SelectorMethod, SelectorOutcome
from .quotas import worker_identity

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger("s2t.selector")

SERVICE = pb.DESCRIPTOR.services_by_name["SelectorService"].full_name
AUTH_HINT = "worker.selector_auth_token must be one of the selector's selector.auth_tokens"


def selector_tokens(settings: SelectorSettings) -> BearerTokens:
    """The tokens the selector accepts (empty: no authentication), for this server and the Serve app alike."""
    return BearerTokens.from_secrets(settings.auth_tokens, "selector", AUTH_HINT)


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Answers UNAUTHENTICATED to calls of `service` without an accepted bearer token, before the method runs;
    other services (health) pass."""

    def __init__(self, tokens: BearerTokens, service: str):
        self.tokens = tokens
        self.prefix = f"/{service}/"

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self.prefix):
            return handler
        refusal = self.tokens.refusal(handler_call_details.invocation_metadata)
        return handler if refusal is None else _refusing(handler, refusal)


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED with `message`."""

    async def refuse(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kwargs = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)
    return grpc.stream_stream_rpc_method_handler(refuse, **kwargs)


class SelectorServicer(pb_grpc.SelectorServiceServicer):
    def __init__(self, core: SelectorCore, traced: bool = False):
        self.core = core
        self.traced = traced  # the server traces its calls: the handlers add the s2t.* attributes to the span
        # The interceptor has let the call in; these tell which accepted token it carries (the worker's
        # identity for the quotas, quotas.worker_identity).
        self.tokens = selector_tokens(core.settings)

    async def _handle(self, request, context, kind):
        worker = worker_identity(context.invocation_metadata(), context.peer(), self.tokens)
        try:
            return await self.core.handle(request, kind, worker)
        except SelectorError as e:
            # Overload and quota refusals (RESOURCE_EXHAUSTED) carry their retry hint as trailing metadata
            # `retry-after-ms` and in the message (a quota refusal also `quota-exceeded`); every other
            # SelectorError has no trailing metadata.
            await context.abort(e.code, e.message, trailing_metadata=e.trailing_metadata())

    async def Select(self, request, context):
        return await self._handle(request, context, "select")

    async def Decode(self, request, context):
        return await self._handle(request, context, "decode")

    async def CloseSession(self, request, context):
        return self.core.close_session(request.session_id)

    async def GetSelectorInfo(self, request, context):
        return self.core.info()


def strict_handlers(servicer: SelectorServicer) -> grpc.GenericRpcHandler:
    """SelectorService's methods over the raw request bytes, parsed by s2t.wire.parse: undecodable bytes and a
    field with the wrong wire type are INVALID_ARGUMENT naming the field. grpc's generated deserializer would
    answer UNKNOWN to the first and serve the second with the field silently defaulted (a `step` sent as a
    string was served as step 0)."""

    def strict(method, request_cls, response_cls, metrics_method: SelectorMethod) -> grpc.RpcMethodHandler:
        async def handle(data: bytes, context):
            try:
                request = parse(request_cls, data)
            except WireError as e:
                servicer.core.metrics.request(metrics_method, SelectorOutcome.INVALID_ARGUMENT)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            if servicer.traced:
                annotate_current_span(request_attributes(request))
            return await method(request, context)

        # no request_deserializer: the handler gets the bytes
        return grpc.unary_unary_rpc_method_handler(handle, response_serializer=response_cls.SerializeToString)

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Select": strict(servicer.Select, pb.SelectRequest, pb.SelectResponse, SelectorMethod.SELECT),
        "Decode": strict(servicer.Decode, pb.DecodeRequest, pb.DecodeResponse, SelectorMethod.DECODE),
        "CloseSession": strict(servicer.CloseSession, pb.CloseSessionRequest, pb.CloseSessionResponse,
                               SelectorMethod.CLOSE_SESSION),
        "GetSelectorInfo": strict(servicer.GetSelectorInfo, pb.GetSelectorInfoRequest, pb.GetSelectorInfoResponse,
                                  SelectorMethod.INFO),
    })


async def serve(core: SelectorCore, host: str, port: int,
                tracer_provider: TracerProvider | None = None) -> tuple[grpc.aio.Server, int]:
    """Serve `core` on host:port with the credentials of its settings (auth_tokens, tls), tracing its calls
    with `tracer_provider` (None: untraced; the caller shuts it down); returns the server and the bound port."""
    tokens = selector_tokens(core.settings)
    # tracing first (outermost): a call the token check refuses is traced too
    interceptors = [*server_interceptors(tracer_provider),
                    *([BearerAuthInterceptor(tokens, SERVICE)] if tokens.enabled else [])]
    server = grpc.aio.server(options=server_options(32 << 20), interceptors=interceptors)
    server.add_generic_rpc_handlers((strict_handlers(SelectorServicer(core, traced=tracer_provider is not None)),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = add_port(server, f"{host}:{port}", core.settings.tls, "selector.tls")
    if bound == 0:
        raise RuntimeError(f"cannot bind the selector to {host}:{port}")
    await server.start()
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if core.settings.metrics_port is not None:  # stopped by core.close()
        metrics_port = core.metrics.serve_http(core.settings.metrics_host, core.settings.metrics_port)
        log.info("selector metrics on http://%s:%d/metrics", core.settings.metrics_host, metrics_port)
    return server, bound


async def serve_forever(settings: Settings) -> None:
    core = SelectorCore.from_settings(settings)
    tracer_provider = build_tracer_provider(settings.tracing, TracedRole.SELECTOR)  # None unless tracing.enabled
    try:
        server, port = await serve(core, settings.selector.host, settings.selector.grpc_port, tracer_provider)
        sel = settings.selector
        tls = ("mTLS" if sel.tls.client_ca_file else "TLS") if sel.tls.enabled else "plaintext"
        auth = f"{len(sel.auth_tokens)} bearer token(s)" if sel.auth_tokens else "no authentication"
        print(f"selector (no Ray) serving gRPC on {sel.host}:{port} ({tls}, {auth})", flush=True)
        await serve_until_signalled(server, sel.shutdown_grace_s)
    finally:
        core.close()  # closes the selection log's open segment, so readers see it
        # after the drain: the spans of the last calls are exported before the process ends
        await asyncio.to_thread(shutdown_tracer_provider, tracer_provider)

"""OpenTelemetry spans across client -> worker -> selector, opt-in (`tracing.enabled`, off by default).

What is traced when it is on:
  worker    a SERVER span per Generate / GenerateStream call (grpc.aio server interceptor; a client's
            `traceparent` makes it a child of the client's span), and a CLIENT span per selector RPC attempt
            (grpc.aio client interceptors, which also put `traceparent` into the call's metadata). The decode
            loop runs a request's selector calls in the request's own context (Sequence.trace_context), so they
            are children of its Generate span although they run in other tasks.
  selector  a SERVER span per SelectorService call: on the --no-ray server by the same server interceptor; on
            Ray Serve by `ServerSpans` around each replica method, from the `traceparent` the gRPC proxy
            passes through with the rest of the metadata (the proxy itself ends the HTTP/2 call, so no
            interceptor of ours sees it).
Health checks and reflection make no spans. Attributes are ids and sizes only (`s2t.session_id`,
`s2t.positions`, `s2t.num_candidates`, `s2t.mode`, ...): never token ids, text or metadata values, so the
`authorization` header can never reach a span.

Off, tracing costs nothing: `build_tracer_provider` returns None, the interceptor lists are empty, ServerSpans
opens no span, and OpenTelemetry is not even imported (every import of it here is inside a function that only
runs when tracing is on).

Providers are passed explicitly, never installed as the global one: a test process holds several (a worker's
and a selector's), and a Ray Serve replica must not take over whatever Ray's own tracing installs.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from typing import TYPE_CHECKING, Iterator, Mapping, Protocol, Sequence

import grpc

from .config import TracingExporter, TracingSettings
from .v1 import selector_pb2 as sel_pb

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter, SpanProcessor
    from opentelemetry.trace import Span
    from opentelemetry.util.types import AttributeValue

log = logging.getLogger("s2t.tracing")

# Only the project's own services are traced: a probe's health check every few seconds would otherwise be most
# of the spans.
TRACED_SERVICE_PREFIX = "s2t."
# The instrumentation scope of ServerSpans (the interceptors name their own: opentelemetry.instrumentation.grpc).
SCOPE = "s2t.tracing"

# Server spans are ERROR only for the codes that mean the server failed (OpenTelemetry's gRPC semantic
# conventions, and what the grpc.aio server interceptor does): a refusal the caller caused (INVALID_ARGUMENT,
# UNAUTHENTICATED, RESOURCE_EXHAUSTED, ...) leaves the status unset and is told by `rpc.grpc.status_code`. The
# Serve replica's spans follow the same rule, so both selector deployments report one outcome alike.
SERVER_ERROR_CODES = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED,
                                grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL,
                                grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS})


class TracedRole(enum.Enum):
    """The process a provider belongs to; appended to `tracing.service_name` as the service.name."""

    WORKER = "worker"
    SELECTOR = "selector"


def service_name(settings: TracingSettings, role: TracedRole) -> str:
    return f"{settings.service_name}-{role.value}"


def build_tracer_provider(settings: TracingSettings, role: TracedRole,
                          span_processor: SpanProcessor | None = None) -> TracerProvider | None:
    """The tracer provider of one process, or None when tracing is off.

    Resource service.name = <service_name>-<role>; sampler ParentBased(TraceIdRatioBased(sample_ratio)), so a
    call that arrives with a traceparent follows its caller's decision and a new trace is kept with
    probability sample_ratio; spans go through a BatchSpanProcessor to the exporter `settings.exporter` names.
    `span_processor` replaces that processor (tests: a SimpleSpanProcessor over an InMemorySpanExporter)."""
    if not settings.enabled:
        return None
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    from importlib.metadata import PackageNotFoundError, version

    try:
        s2t_version = version("s2t")
    except PackageNotFoundError:  # run from a source tree that was never installed
        s2t_version = "unknown"
    provider = TracerProvider(
        sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
        resource=Resource.create({SERVICE_NAME: service_name(settings, role), SERVICE_VERSION: s2t_version}))
    provider.add_span_processor(span_processor or BatchSpanProcessor(span_exporter(settings)))
    return provider


def span_exporter(settings: TracingSettings) -> SpanExporter:
    """The exporter `settings.exporter` names."""
    if settings.exporter is TracingExporter.OTLP:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        # http:// is plaintext, https:// TLS (the exporter reads the scheme); OTEL_EXPORTER_OTLP_HEADERS,
        # _CERTIFICATE and _TIMEOUT apply as OpenTelemetry documents them.
        return OTLPSpanExporter(endpoint=settings.otlp_endpoint)
    if settings.exporter is TracingExporter.CONSOLE:
        import os

        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        # one line per span, so log collectors keep each span whole
        return ConsoleSpanExporter(formatter=lambda span: span.to_json(indent=None) + os.linesep)
    if settings.exporter is TracingExporter.FILE:
        from .tracing_file import JsonLinesSpanExporter

        if settings.file_path is None:  # TracingSettings refuses this; a hand-built one may not have been checked
            raise ValueError("tracing exporter file needs tracing.file_path")
        return JsonLinesSpanExporter(settings.file_path)
    raise ValueError(f"unknown tracing exporter {settings.exporter!r}")


def shutdown_tracer_provider(provider: TracerProvider | None, timeout_s: float = 5.0) -> None:
    """Export what is still queued and release the exporter: at process shutdown, after the servers drained.
    The flush is bounded, so an unreachable collector cannot hold the shutdown up past `timeout_s` (plus the
    exporter's own shutdown). Blocking: call it off the event loop (asyncio.to_thread)."""
    if provider is None:
        return
    if not provider.force_flush(timeout_millis=int(timeout_s * 1000)):
        log.warning("tracing: spans still queued after %.0f s were dropped at shutdown", timeout_s)
    provider.shutdown()


# -- gRPC interceptors ---------------------------------------------------------------------------------------------


def _traced_service(details) -> bool:
    """Filter of the interceptors: the project's own services only (not health checks, not reflection)."""
    method = details.method.decode() if isinstance(details.method, bytes) else details.method
    return method.lstrip("/").startswith(TRACED_SERVICE_PREFIX)


def server_interceptors(provider: TracerProvider | None) -> list[grpc.aio.ServerInterceptor]:
    """The grpc.aio server interceptors that trace this server's calls; [] when tracing is off. They go first in
    the server's list (outermost), so a call an auth interceptor refuses still has its span."""
    if provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(tracer_provider=provider, filter_=_traced_service)]


def client_interceptors(provider: TracerProvider | None) -> list[grpc.aio.ClientInterceptor]:
    """The grpc.aio client interceptors of a channel: a CLIENT span per call, with the s2t.* attributes of
    the request (`request_attributes`), and its traceparent in the call's metadata; [] when tracing is off."""
    if provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    def request_hook(span: Span, request) -> None:
        span.set_attributes(request_attributes(request))

    return aio_client_interceptors(tracer_provider=provider, filter_=_traced_service, request_hook=request_hook)


# -- attributes ----------------------------------------------------------------------------------------------------


def request_attributes(request) -> dict[str, AttributeValue]:
    """The s2t.* span attributes of a SelectorService request: ids and sizes, never token ids (they are the
    text). {} for a request without any (GetSelectorInfo)."""
    if isinstance(request, sel_pb.SelectRequest):
        return {"s2t.session_id": request.session_id, "s2t.request_id": request.request_id,
                "s2t.step": request.step, "s2t.positions": len(request.positions),
                "s2t.num_candidates": max((len(p.candidate_ids) for p in request.positions), default=0)}
    if isinstance(request, sel_pb.DecodeRequest):
        return {"s2t.session_id": request.session_id, "s2t.request_id": request.request_id,
                "s2t.step": request.step, "s2t.max_tokens": request.max_tokens}
    if isinstance(request, sel_pb.CloseSessionRequest):
        return {"s2t.session_id": request.session_id}
    return {}


def annotate_current_span(attributes: Mapping[str, AttributeValue]) -> None:
    """Add `attributes` to the span current in this context (the call's SERVER span inside a traced handler);
    nothing when no span records. Callers call it only when tracing is on."""
    from opentelemetry import trace

    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(attributes)


# -- the Ray Serve replica's server spans --------------------------------------------------------------------------


class CallContext(Protocol):
    """What ServerSpans reads of a call: Ray Serve's RayServegRPCContext has all of it."""

    def invocation_metadata(self) -> Sequence[tuple[str, str | bytes]]: ...

    def code(self) -> grpc.StatusCode | None: ...

    def details(self) -> str | None: ...


def extract_context(metadata: Sequence[tuple[str, str | bytes]] | None):
    """The OpenTelemetry context a call's metadata carries (W3C `traceparent` / `tracestate`, read by the
    globally configured propagator, the one the client interceptors inject with): an empty context, i.e. a
    new root, when it carries none. Binary (-bin) entries are skipped; only text headers carry trace context."""
    from opentelemetry import propagate

    carrier = {key.lower(): value for key, value in metadata or () if isinstance(value, str)}
    return propagate.extract(carrier)


class ServerSpans:
    """SERVER spans for calls whose server the process does not own: the Ray Serve replica, behind Serve's gRPC
    proxy. `span(...)` opens one named like the grpc.aio server interceptor's (`/<service>/<method>`, same rpc.*
    attributes), as the child of the `traceparent` in the call's metadata, and sets rpc.grpc.status_code and
    the status from the code the call set on its context. Without a provider it is a no-op."""

    def __init__(self, provider: TracerProvider | None, service: str):
        self.service = service
        self._tracer = provider.get_tracer(SCOPE) if provider is not None else None

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def span(self, method: str, context: CallContext, request=None) -> contextlib.AbstractContextManager[Span | None]:
        """A context manager around one call of `method`; yields the span (None when tracing is off)."""
        if self._tracer is None:
            return contextlib.nullcontext()
        return self._span(method, context, request)

    @contextlib.contextmanager
    def _span(self, method: str, context: CallContext, request) -> Iterator[Span]:
        from opentelemetry.semconv._incubating.attributes.rpc_attributes import (
            RPC_GRPC_STATUS_CODE, RPC_METHOD, RPC_SERVICE, RPC_SYSTEM)
        from opentelemetry.trace import SpanKind, Status, StatusCode

        attributes: dict[str, AttributeValue] = {RPC_SYSTEM: "grpc", RPC_SERVICE: self.service, RPC_METHOD: method}
        attributes.update(request_attributes(request))
        # The error status is set below from the call's code; an exception escaping the method is recorded by
        # start_as_current_span (Serve answers it INTERNAL).
        with self._tracer.start_as_current_span(
                f"/{self.service}/{method}", context=extract_context(context.invocation_metadata()),
                kind=SpanKind.SERVER, attributes=attributes) as span:
            yield span
            code = context.code() or grpc.StatusCode.OK  # None: the method set none, the proxy answers OK
            span.set_attribute(RPC_GRPC_STATUS_CODE, code.value[0])
            if code in SERVER_ERROR_CODES:
                span.set_status(Status(StatusCode.ERROR, f"{code}:{context.details()}"))

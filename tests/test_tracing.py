"""OpenTelemetry tracing across client -> worker -> selector (issue #15): the settings, nothing at all when off,
one trace per request over real gRPC (worker server span -> worker client spans -> selector server spans), the
Ray Serve replica's spans from the traceparent its proxy passes on, and the JSON-lines file exporter.

Spans are collected with the SDK's InMemorySpanExporter behind a SimpleSpanProcessor (exported as each span
ends), given to build_tracer_provider as its span processor; the providers are passed to the servers, never
installed globally."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace import (NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags, format_span_id,
                                 format_trace_id, set_span_in_context)
from pydantic import SecretStr

from llm_selector.core import SelectorCore
from llm_selector.grpc_server import SERVICE as SELECTOR_SERVICE
from llm_selector.grpc_server import serve as serve_selector
from s2t.config import ConfigError, TracingExporter, TracingSettings, load_settings
from s2t.security import BearerTokens
from s2t.tracing import (ServerSpans, TracedRole, build_tracer_provider, client_interceptors, server_interceptors,
                         shutdown_tracer_provider)
from s2t.v1 import generation_pb2 as gen_pb
from s2t.v1 import generation_pb2_grpc as gen_grpc
from s2t.v1 import selector_pb2 as pb
from s2t.v1 import selector_pb2_grpc as sel_grpc
from slm_worker.server import Worker, serve as serve_worker

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "tokT-5e8a1c3f9b2d7e4a6c0f"  # the selector's bearer token: must never reach a span
# The trace context a client of the worker sends: W3C traceparent, sampled.
CLIENT_TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
CLIENT_SPAN_ID = 0x00F067AA0BA902B7
CLIENT_TRACEPARENT = f"00-{CLIENT_TRACE_ID:032x}-{CLIENT_SPAN_ID:016x}-01"

GENERATE = "/s2t.v1.GenerationService/Generate"
SELECT = f"/{SELECTOR_SERVICE}/Select"
CLOSE_SESSION = f"/{SELECTOR_SERVICE}/CloseSession"
GET_INFO = f"/{SELECTOR_SERVICE}/GetSelectorInfo"


def enabled(**fields) -> TracingSettings:
    return TracingSettings(enabled=True, **fields)


def collecting(role: TracedRole, settings: TracingSettings | None = None):
    """(provider, exporter): a provider of `role` whose spans land in the returned InMemorySpanExporter."""
    exporter = InMemorySpanExporter()
    provider = build_tracer_provider(settings or enabled(), role, SimpleSpanProcessor(exporter))
    return provider, exporter


def position_request(session: str, k: int = 3) -> pb.SelectRequest:
    return pb.SelectRequest(session_id=session, step=0, prefix_length=0, token_ids=[5, 6, 7], request_id="r-1",
                            positions=[pb.CandidatePosition(position=3, candidate_ids=list(range(1, k + 1)))],
                            trigger=pb.SelectTriggerSpec(kind=pb.SELECT_TRIGGER_ALWAYS))


# -- settings --------------------------------------------------------------------------------------------------------


def test_tracing_is_off_by_default_and_set_from_the_environment(monkeypatch):
    default = load_settings().tracing
    assert default == TracingSettings()
    assert (default.enabled, default.exporter, default.otlp_endpoint, default.service_name, default.sample_ratio,
            default.file_path) == (False, TracingExporter.OTLP, "http://localhost:4317", "s2t", 1.0, None)
    monkeypatch.setenv("S2T_TRACING__ENABLED", "true")
    monkeypatch.setenv("S2T_TRACING__EXPORTER", "console")
    monkeypatch.setenv("S2T_TRACING__SAMPLE_RATIO", "0.25")
    monkeypatch.setenv("S2T_TRACING__OTLP_ENDPOINT", "https://collector.example:4317")
    tracing = load_settings().tracing
    assert (tracing.enabled, tracing.exporter, tracing.sample_ratio, tracing.otlp_endpoint) == (
        True, TracingExporter.CONSOLE, 0.25, "https://collector.example:4317")


def test_bad_tracing_settings_are_one_line_config_errors_naming_the_key(monkeypatch, tmp_path):
    monkeypatch.setenv("S2T_TRACING__EXPORTER", "zipkin")
    with pytest.raises(ConfigError) as e:
        load_settings()
    assert str(e.value) == ("bad setting tracing.exporter = 'zipkin' (from environment variable "
                            "S2T_TRACING__EXPORTER): Input should be 'otlp', 'console' or 'file'")
    monkeypatch.delenv("S2T_TRACING__EXPORTER")
    with pytest.raises(ConfigError) as e:
        load_settings(**{"tracing.sample_ratio": 1.5})
    assert str(e.value) == ("bad setting tracing.sample_ratio = 1.5 (from --set tracing.sample_ratio): "
                            "Input should be less than or equal to 1")
    with pytest.raises(ConfigError) as e:
        load_settings(**{"tracing.otlp_endpoint": "collector:4317"})
    assert str(e.value) == ("bad setting tracing.otlp_endpoint = 'collector:4317' (from --set "
                            "tracing.otlp_endpoint): Value error, otlp_endpoint must be http://host:port "
                            "(plaintext) or https://host:port (TLS)")
    with pytest.raises(ConfigError, match=r"^bad setting tracing = .* \(from --set tracing.exporter\): "
                                          r"Value error, exporter file needs file_path$"):
        load_settings(**{"tracing.exporter": "file"})
    # a relative path is made absolute where the settings load, so another process (a Serve replica) agrees
    monkeypatch.chdir(tmp_path)
    assert load_settings(**{"tracing.exporter": "file", "tracing.file_path": "spans.jsonl"}).tracing.file_path == (
        tmp_path / "spans.jsonl")


# -- off: nothing ----------------------------------------------------------------------------------------------------


def test_tracing_off_builds_nothing_and_never_imports_opentelemetry():
    assert build_tracer_provider(TracingSettings(), TracedRole.WORKER) is None
    assert client_interceptors(None) == [] and server_interceptors(None) == []
    spans = ServerSpans(None, SELECTOR_SERVICE)
    assert not spans.enabled
    with spans.span("Select", context=None, request=position_request("s")) as span:  # reads nothing of the call
        assert span is None
    # A fresh interpreter running the worker's and the selector's modules with tracing off: no OpenTelemetry
    # module is ever loaded (this test process has loaded it, so the check needs its own interpreter).
    script = (
        "import sys\n"
        "import slm_worker.server, llm_selector.grpc_server, s2t.stack\n"
        "from s2t.config import load_settings\n"
        "from s2t.tracing import TracedRole, build_tracer_provider, client_interceptors, server_interceptors\n"
        "provider = build_tracer_provider(load_settings().tracing, TracedRole.WORKER)\n"
        "assert provider is None and client_interceptors(provider) == [] == server_interceptors(provider)\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("S2T_", "OTEL_"))}  # defaults: tracing off
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True,
                         timeout=300, env=env)
    assert out.stdout.strip() == "[]", out.stderr


async def test_a_worker_with_tracing_off_has_no_provider_and_a_plain_selector_channel(make_settings):
    worker = Worker(make_settings(**{"worker.selector_address": "127.0.0.1:1"}))
    try:
        assert worker.tracer_provider is None
        assert worker.selector.interceptors == ()
    finally:
        await worker.stop()


# -- the provider and the exporters ------------------------------------------------------------------------------------


def test_the_provider_names_the_role_and_samples_by_the_parent_then_the_ratio():
    provider = build_tracer_provider(enabled(exporter=TracingExporter.CONSOLE, service_name="edge",
                                             sample_ratio=0.25), TracedRole.SELECTOR)
    try:
        assert provider.resource.attributes["service.name"] == "edge-selector"

        def decide(trace_id: int, parent_sampled: bool | None = None) -> Decision:
            parent = None
            if parent_sampled is not None:  # a call that arrived with a traceparent
                flags = TraceFlags(TraceFlags.SAMPLED if parent_sampled else TraceFlags.DEFAULT)
                parent = set_span_in_context(NonRecordingSpan(SpanContext(trace_id, 1, True, flags)))
            return provider.sampler.should_sample(parent, trace_id, "call").decision

        # a new trace: kept when the low 64 bits of its id fall in the first quarter (sample_ratio 0.25)
        low, high = 1 << 64 | 1, (1 << 64) - 1
        assert decide(low) is Decision.RECORD_AND_SAMPLE and decide(high) is Decision.DROP
        # a continued trace: the caller's decision, whatever the ratio says
        assert decide(high, parent_sampled=True) is Decision.RECORD_AND_SAMPLE
        assert decide(low, parent_sampled=False) is Decision.DROP
    finally:
        shutdown_tracer_provider(provider)
    worker, _ = collecting(TracedRole.WORKER)
    assert worker.resource.attributes["service.name"] == "s2t-worker"


def test_the_file_exporter_appends_one_json_span_per_line_from_several_processes(tmp_path):
    path = tmp_path / "traces" / "spans.jsonl"  # the directory is made
    settings = enabled(exporter=TracingExporter.FILE, file_path=path)
    worker = build_tracer_provider(settings, TracedRole.WORKER)
    selector = build_tracer_provider(settings, TracedRole.SELECTOR)
    with worker.get_tracer("t").start_as_current_span("outer", attributes={"s2t.session_id": "s-1"}) as outer:
        with worker.get_tracer("t").start_as_current_span("inner"):
            pass
    with selector.get_tracer("t").start_as_current_span("other"):
        pass
    shutdown_tracer_provider(worker)  # the batch processor exports at shutdown at the latest
    shutdown_tracer_provider(selector)
    lines = path.read_text().splitlines()
    spans = {s["name"]: s for s in map(json.loads, lines)}
    assert len(lines) == 3 and set(spans) == {"outer", "inner", "other"}
    trace_id = f"0x{format_trace_id(outer.get_span_context().trace_id)}"
    assert spans["outer"]["context"]["trace_id"] == trace_id and spans["outer"]["parent_id"] is None
    assert spans["inner"]["parent_id"] == f"0x{format_span_id(outer.get_span_context().span_id)}"
    assert spans["inner"]["context"]["trace_id"] == trace_id
    assert spans["outer"]["attributes"] == {"s2t.session_id": "s-1"} and spans["outer"]["kind"] == "SpanKind.INTERNAL"
    assert spans["outer"]["resource"]["attributes"]["service.name"] == "s2t-worker"
    assert spans["other"]["resource"]["attributes"]["service.name"] == "s2t-selector"


# -- one trace over real gRPC: worker and --no-ray selector --------------------------------------------------------------


def by_name(exporter: InMemorySpanExporter, name: str, kind: SpanKind) -> list:
    return [s for s in exporter.get_finished_spans() if s.name == name and s.kind is kind]


async def once_there(read: Callable[[], list]) -> list:
    """`read()` once it holds a span, or what it holds after 20 s.

    A server span ends when its handler returns, which gRPC does not order before the caller receiving the
    reply or the status: a test that reads spans right after a call waits for them."""
    for _ in range(400):
        if spans := read():
            return spans
        await asyncio.sleep(0.05)
    return read()


async def test_a_request_is_one_trace_from_the_client_through_the_worker_to_the_selector(make_settings):
    settings = make_settings(**{"tracing.enabled": True, "selector.auth_tokens": [TOKEN],
                                "worker.selector_auth_token": TOKEN, "selector.log_enabled": False,
                                "worker.max_inflight_blocks": 1})  # no Select left in flight at the reply
    worker_provider, worker_spans = collecting(TracedRole.WORKER, settings.tracing)
    selector_provider, selector_spans = collecting(TracedRole.SELECTOR, settings.tracing)
    core = SelectorCore.from_settings(settings)
    selector_server, selector_port = await serve_selector(core, "127.0.0.1", 0, selector_provider)
    settings.worker.selector_address = f"127.0.0.1:{selector_port}"
    worker = Worker(settings, tracer_provider=worker_provider)
    await worker.start(wait_for_selector_s=10)
    worker_server, worker_port = await serve_worker(worker, "127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{worker_port}") as channel:
            reply = await gen_grpc.GenerationServiceStub(channel).Generate(gen_pb.GenerateRequest(
                prompt="What is 2 + 3?", options=gen_pb.GenerationOptions(
                    mode=gen_pb.MODE_S2T, max_new_tokens=8, block_size=4, num_candidates=4)),
                metadata=[("traceparent", CLIENT_TRACEPARENT)], timeout=60)
        assert reply.stats.mode_used == gen_pb.MODE_S2T and reply.stats.selector_calls >= 1
        # The session's CloseSession is sent after the reply, still in the request's trace: wait for its span.
        await once_there(lambda: by_name(selector_spans, CLOSE_SESSION, SpanKind.SERVER))

        # the worker's Generate span: the client's span is its parent
        [generate] = await once_there(lambda: by_name(worker_spans, GENERATE, SpanKind.SERVER))
        assert generate.context.trace_id == CLIENT_TRACE_ID
        assert generate.parent.span_id == CLIENT_SPAN_ID and generate.parent.is_remote
        assert generate.resource.attributes["service.name"] == "s2t-worker"
        session = generate.attributes["s2t.session_id"]
        assert dict(generate.attributes) == {
            "rpc.system": "grpc", "rpc.service": "s2t.v1.GenerationService", "rpc.method": "Generate",
            "rpc.grpc.status_code": 0, "net.peer.ip": "127.0.0.1", "net.peer.port": generate.attributes["net.peer.port"],
            "net.peer.name": "localhost", "rpc.user_agent": generate.attributes["rpc.user_agent"],
            "s2t.mode": "s2t", "s2t.mode_used": "s2t", "s2t.request_id": session.rsplit("-", 1)[0],
            "s2t.session_id": session, "s2t.num_candidates": 4, "s2t.max_new_tokens": 8,
            "s2t.completion_tokens": reply.stats.completion_tokens, "s2t.selector_calls": reply.stats.selector_calls,
            "s2t.degraded_reason": ""}

        # its Select calls: one CLIENT span per attempt (no retries here), children of the Generate span; the
        # first is the prompt's prefill (step 0, no positions)
        selects = by_name(worker_spans, SELECT, SpanKind.CLIENT)
        assert len(selects) == reply.stats.selector_calls
        [prefill] = [s for s in selects if s.attributes["s2t.positions"] == 0]
        assert prefill.attributes["s2t.step"] == 0 and prefill.attributes["s2t.num_candidates"] == 0
        for span in selects:
            assert span.context.trace_id == CLIENT_TRACE_ID and span.parent.span_id == generate.context.span_id
            assert span.attributes["s2t.session_id"] == session and span.attributes["rpc.grpc.status_code"] == 0
            if span is not prefill:
                assert span.attributes["s2t.num_candidates"] == 4 and span.attributes["s2t.positions"] >= 1
        assert sum(s.attributes["s2t.positions"] for s in selects) == reply.stats.positions_checked
        [close] = by_name(worker_spans, CLOSE_SESSION, SpanKind.CLIENT)
        assert close.parent.span_id == generate.context.span_id and close.attributes["s2t.session_id"] == session

        # the selector's side: a SERVER span per Select attempt, each the child of the worker's CLIENT span
        served = by_name(selector_spans, SELECT, SpanKind.SERVER)
        client_of = {s.context.span_id: s for s in selects}
        assert sorted(s.parent.span_id for s in served) == sorted(client_of)
        for span in served:
            client = client_of[span.parent.span_id]
            assert span.context.trace_id == CLIENT_TRACE_ID and span.parent.is_remote
            assert span.resource.attributes["service.name"] == "s2t-selector"
            assert {k: span.attributes[k] for k in ("s2t.session_id", "s2t.step", "s2t.positions",
                                                    "s2t.num_candidates")} == {
                k: client.attributes[k] for k in ("s2t.session_id", "s2t.step", "s2t.positions",
                                                  "s2t.num_candidates")}
        # every selector span (GetSelectorInfo at the worker's start, CloseSession too) has a worker CLIENT span
        # as its parent, in that span's trace
        worker_clients = {s.context.span_id: s for s in worker_spans.get_finished_spans() if s.kind is SpanKind.CLIENT}
        assert {s.name for s in selector_spans.get_finished_spans()} == {GET_INFO, SELECT, CLOSE_SESSION}
        for span in selector_spans.get_finished_spans():
            assert span.kind is SpanKind.SERVER
            parent = worker_clients[span.parent.span_id]
            assert parent.context.trace_id == span.context.trace_id and parent.name == span.name

        # the selector's health checks make no spans; a call its token check refuses does (tracing runs first)
        before = len(selector_spans.get_finished_spans())
        async with grpc.aio.insecure_channel(f"127.0.0.1:{selector_port}") as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await sel_grpc.SelectorServiceStub(channel).Select(position_request("refused"))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        [refused] = await once_there(lambda: selector_spans.get_finished_spans()[before:])
        assert refused.name == SELECT and refused.parent is None  # the caller sent no trace context
        assert refused.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
        assert refused.status.status_code is StatusCode.UNSET  # the caller's fault, not the server's

        # no span carries the bearer token or any other metadata value
        for span in (*worker_spans.get_finished_spans(), *selector_spans.get_finished_spans()):
            text = span.to_json()
            assert TOKEN not in text and "authorization" not in text.lower()

        # mode llm: its Decode calls run in a task of their own, in the request's trace too
        async with grpc.aio.insecure_channel(f"127.0.0.1:{worker_port}") as channel:
            reply = await gen_grpc.GenerationServiceStub(channel).Generate(gen_pb.GenerateRequest(
                prompt="hi", options=gen_pb.GenerationOptions(mode=gen_pb.MODE_LLM, max_new_tokens=4)), timeout=60)
        assert reply.stats.mode_used == gen_pb.MODE_LLM
        llm_generate = await once_there(
            lambda: [s for s in by_name(worker_spans, GENERATE, SpanKind.SERVER) if s is not generate])
        assert len(llm_generate) == 1 and llm_generate[0].attributes["s2t.mode"] == "llm"
        decodes = by_name(worker_spans, f"/{SELECTOR_SERVICE}/Decode", SpanKind.CLIENT)
        assert len(decodes) == reply.stats.selector_calls >= 1
        assert all(d.parent.span_id == llm_generate[0].context.span_id for d in decodes)
        assert {d.attributes["s2t.max_tokens"] for d in decodes} <= {1, 2, 3, 4}
    finally:
        await worker_server.stop(0)
        await worker.stop()
        await selector_server.stop(0)
        core.close()
    assert worker_provider.force_flush(), "the worker leaves a provider it was given to its owner"


async def test_a_request_without_trace_context_starts_a_trace_at_the_worker(make_settings):
    settings = make_settings(**{"tracing.enabled": True, "worker.selector_address": "127.0.0.1:1"})
    provider, spans = collecting(TracedRole.WORKER, settings.tracing)
    worker = Worker(settings, tracer_provider=provider)  # no selector: the request runs greedily
    await worker.start()
    server, port = await serve_worker(worker, "127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = gen_grpc.GenerationServiceStub(channel)
            reply = await stub.Generate(gen_pb.GenerateRequest(
                prompt="hi", options=gen_pb.GenerationOptions(mode=gen_pb.MODE_S2T, max_new_tokens=3)), timeout=60)
            with pytest.raises(grpc.aio.AioRpcError) as e:  # refused inside the call: still a span
                await stub.Generate(gen_pb.GenerateRequest(prompt=" "), timeout=60)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await server.stop(0)
        await worker.stop()
    ok, refused = by_name(spans, GENERATE, SpanKind.SERVER)
    assert ok.parent is None and ok.attributes["s2t.mode"] == "s2t" and ok.attributes["s2t.mode_used"] == "greedy"
    assert ok.attributes["s2t.degraded_reason"] == reply.stats.degraded_reason != ""
    assert refused.parent is None and refused.context.trace_id != ok.context.trace_id
    assert refused.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "s2t.session_id" not in refused.attributes  # refused before a sequence existed


# -- the Ray Serve replica's spans, without Ray -----------------------------------------------------------------------


class FakeServeContext:
    """What ServerSpans reads of Ray Serve's RayServegRPCContext, and what the replica sets on it."""

    def __init__(self, metadata):
        self.metadata = list(metadata)
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None

    def invocation_metadata(self):
        return self.metadata

    def peer(self):
        return "ipv4:10.0.0.7:4242"

    def code(self):
        return self._code

    def details(self):
        return self._details

    def set_code(self, code):
        self._code = code

    def set_details(self, details):
        self._details = details


def test_replica_spans_continue_the_trace_the_metadata_carries():
    provider, exporter = collecting(TracedRole.SELECTOR)
    spans = ServerSpans(provider, SELECTOR_SERVICE)
    metadata = [("authorization", f"Bearer {TOKEN}"), ("session_id", "s-9"),
                ("traceparent", CLIENT_TRACEPARENT), ("tracestate", "vendor=1"), ("trace-bin", b"\x00\x01")]
    with spans.span("Select", FakeServeContext(metadata), position_request("s-9", k=5)) as span:
        assert span.is_recording()
    [child] = exporter.get_finished_spans()
    assert child.name == SELECT and child.kind is SpanKind.SERVER
    assert child.context.trace_id == CLIENT_TRACE_ID
    assert child.parent.span_id == CLIENT_SPAN_ID and child.parent.is_remote
    assert child.context.trace_state.get("vendor") == "1"
    assert child.status.status_code is StatusCode.UNSET
    assert dict(child.attributes) == {
        "rpc.system": "grpc", "rpc.service": "s2t.v1.SelectorService", "rpc.method": "Select",
        "s2t.session_id": "s-9", "s2t.request_id": "r-1", "s2t.step": 0, "s2t.positions": 1,
        "s2t.num_candidates": 5, "rpc.grpc.status_code": 0}
    assert TOKEN not in child.to_json()

    # no traceparent: a new root
    with spans.span("GetSelectorInfo", FakeServeContext([("session_id", "s-9")]), pb.GetSelectorInfoRequest()):
        pass
    root = exporter.get_finished_spans()[-1]
    assert root.parent is None and root.context.trace_id != CLIENT_TRACE_ID
    assert root.name == GET_INFO and "s2t.session_id" not in root.attributes


def test_replica_span_status_follows_the_code_the_call_set():
    provider, exporter = collecting(TracedRole.SELECTOR)
    spans = ServerSpans(provider, SELECTOR_SERVICE)
    for code, details, status in ((grpc.StatusCode.INTERNAL, "engine failed", StatusCode.ERROR),
                                  (grpc.StatusCode.UNAVAILABLE, "closing", StatusCode.ERROR),
                                  # the caller's doing, not the server's: unset, told by the code attribute
                                  (grpc.StatusCode.RESOURCE_EXHAUSTED, "retry-after-ms=50", StatusCode.UNSET),
                                  (grpc.StatusCode.UNAUTHENTICATED, "authorization: ...", StatusCode.UNSET)):
        context = FakeServeContext([("traceparent", CLIENT_TRACEPARENT)])
        with spans.span("Select", context, position_request("s")):
            context.set_code(code)  # as SelectorDeployment._serve does
            context.set_details(details)
        span = exporter.get_finished_spans()[-1]
        assert span.attributes["rpc.grpc.status_code"] == code.value[0]
        assert span.status.status_code is status
        if status is StatusCode.ERROR:
            assert span.status.description == f"{code}:{details}"
    with pytest.raises(RuntimeError):  # an exception escaping the method: ERROR, with the exception recorded
        with spans.span("Decode", FakeServeContext([]), pb.DecodeRequest(session_id="d", max_tokens=4)):
            raise RuntimeError("boom")
    span = exporter.get_finished_spans()[-1]
    assert span.status.status_code is StatusCode.ERROR and span.events[0].name == "exception"
    assert span.attributes["s2t.max_tokens"] == 4


async def test_the_serve_deployment_runs_each_method_in_its_span(make_settings):
    """SelectorDeployment's methods, without Ray, on Serve's own RayServegRPCContext."""
    from ray.serve.grpc_util import RayServegRPCContext

    from llm_selector import serve_app

    from test_selector_auth import ProxyContext  # the servicer context the proxy hands Serve

    provider, exporter = collecting(TracedRole.SELECTOR)
    deployment = object.__new__(serve_app.SelectorDeployment.func_or_class)  # no replica: the core is ours
    deployment.tokens = BearerTokens.from_secrets([SecretStr(TOKEN)], "selector")
    deployment.core = SelectorCore.from_settings(make_settings(**{"selector.log_enabled": False}))
    deployment.spans = ServerSpans(provider, SELECTOR_SERVICE)
    try:
        ctx = RayServegRPCContext(ProxyContext([("authorization", f"Bearer {TOKEN}"),
                                                ("traceparent", CLIENT_TRACEPARENT)]))
        assert (await deployment.Select(position_request("d-s"), ctx)).session_length == 3
        refused = RayServegRPCContext(ProxyContext([("traceparent", CLIENT_TRACEPARENT)]))
        assert await deployment.CloseSession(pb.CloseSessionRequest(session_id="d-s"), refused) == (
            pb.CloseSessionResponse())
    finally:
        deployment.core.close()
    served, closed = exporter.get_finished_spans()
    assert served.name == SELECT and served.parent.span_id == CLIENT_SPAN_ID
    assert served.attributes["s2t.session_id"] == "d-s" and served.attributes["rpc.grpc.status_code"] == 0
    assert closed.name == CLOSE_SESSION and closed.parent.span_id == CLIENT_SPAN_ID
    assert closed.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
    # a replica built without tracing (the class default) opens no span
    assert not serve_app.SelectorDeployment.func_or_class.spans.enabled


# -- through a real Ray Serve gRPC proxy -------------------------------------------------------------------------------


@pytest.mark.ray
async def test_the_replica_span_is_the_child_of_the_workers_client_span_through_the_serve_proxy(tiny_pair, tmp_path):
    """worker -> Serve's gRPC proxy -> replica, with tracing on: the replica (another process) writes its spans
    with the file exporter; each of its Select spans has one of the worker's Select CLIENT spans as parent."""
    from test_ray_serve import free_port

    from llm_selector import serve_app

    path = tmp_path / "replica-spans.jsonl"
    settings = load_settings(**{
        "cache_dir": str(tmp_path / "cache"), "data_dir": str(tmp_path / "data"), "worker.model": str(tiny_pair[0]),
        "selector.model": str(tiny_pair[1]), "worker.runtime.weight_formats": "native",
        "selector.runtime.weight_formats": "native", "selector.grpc_port": free_port(),
        "selector.http_port": free_port(), "worker.port": 0, "worker.trigger": "always",
        "worker.max_inflight_blocks": 1, "worker.draft_confidence": 0.0, "selector.log_enabled": False,
        "tracing.enabled": True, "tracing.exporter": "file", "tracing.file_path": str(path)})
    worker_provider, worker_spans = collecting(TracedRole.WORKER, settings.tracing)
    settings.worker.selector_address = serve_app.start(settings)
    worker = server = None
    try:
        worker = Worker(settings, tracer_provider=worker_provider)
        await worker.start(wait_for_selector_s=60)
        server, port = await serve_worker(worker, "127.0.0.1", 0)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = await gen_grpc.GenerationServiceStub(channel).Generate(gen_pb.GenerateRequest(
                prompt="What is 2 + 3?", options=gen_pb.GenerationOptions(mode=gen_pb.MODE_S2T, max_new_tokens=8,
                                                                          block_size=4)),
                metadata=[("traceparent", CLIENT_TRACEPARENT)], timeout=120)
        assert reply.stats.mode_used == gen_pb.MODE_S2T
        [generate] = await once_there(lambda: by_name(worker_spans, GENERATE, SpanKind.SERVER))
        assert generate.context.trace_id == CLIENT_TRACE_ID
        selects = {f"0x{format_span_id(s.context.span_id)}": s for s in by_name(worker_spans, SELECT, SpanKind.CLIENT)}
        assert len(selects) == reply.stats.selector_calls >= 1

        # The replica's batch processor writes every few seconds: read the file until all its Select spans are in.
        def replica_selects() -> list[dict]:
            if not path.exists():
                return []
            whole_lines = path.read_text().split("\n")[:-1]  # a line still being appended is read next time
            spans = [json.loads(line) for line in whole_lines]
            return [s for s in spans if s["name"] == SELECT and s["kind"] == "SpanKind.SERVER"]

        deadline = time.monotonic() + 120
        while len(replica_selects()) < len(selects) and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        served = replica_selects()
        assert sorted(s["parent_id"] for s in served) == sorted(selects)
        for span in served:
            client = selects[span["parent_id"]]
            assert span["context"]["trace_id"] == f"0x{format_trace_id(CLIENT_TRACE_ID)}"
            assert span["resource"]["attributes"]["service.name"] == "s2t-selector"
            assert span["attributes"]["s2t.session_id"] == client.attributes["s2t.session_id"]
            assert span["attributes"]["s2t.positions"] == client.attributes["s2t.positions"]
            assert span["attributes"]["rpc.grpc.status_code"] == 0
            assert TOKEN not in json.dumps(span)
    finally:
        if server is not None:
            await server.stop(0)
        if worker is not None:
            await worker.stop()
        serve_app.stop()

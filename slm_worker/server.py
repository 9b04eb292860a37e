"""The worker process: the SLM, the decode loop, the selector client, and the client-facing gRPC server."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import re
import time
import uuid
from typing import TYPE_CHECKING, AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from s2t.v1 import generation_pb2 as gen_pb

from s2t.calibration import read_calibration
from s2t.config import Settings
from s2t.modes import Mode, TriggerKind
from s2t.prompts import chat_ids
from s2t.runtime import Engine, LoadedModel, load_with
from s2t.triggers import LocalTrigger, ThresholdTable
from s2t.security import BearerTokens, add_port
from s2t.tracing import (TracedRole, annotate_current_span, build_tracer_provider, client_interceptors,
                         server_interceptors, shutdown_tracer_provider)
from s2t.wire import WireError, parse, server_options

from .adapters import AdapterStore
from .loop import Event, Scheduler, Sequence
from .metrics import WorkerMetrics
from .sampling import pick_seed
from .selector_client import CallBudget, SelectorClient
from .sequence import DecodeOptions
from .verifiers import Fallback, LocalReranker, RemoteSelector, ScoringBatcher, Verifier

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger("s2t.worker")

SERVICE = gen_pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
ROLES = {"system", "user", "assistant"}
MAX_INFLIGHT_BLOCKS = 16
# request_id: at most this long; the selector allows as much for the session id made from it (<request_id>-<8 hex>)
MAX_ID_LEN = 128
# The request id travels to the selector as gRPC metadata (request_id, session_id): printable ASCII only, or
# every selector call of the request fails in the client ("Illegal header value") and the request degrades.
METADATA_SAFE = re.compile(r"[\x20-\x7e]*")


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


class Worker:
    """Owns the SLM engine, the scheduler, the selector connection and the S2T-Local adapters; turns requests
    into sequences, each with the verifier its mode needs."""

    def __init__(self, settings: Settings, lm: LoadedModel | None = None,
                 tracer_provider: TracerProvider | None = None):
        """`tracer_provider`: trace with this one (its owner shuts it down) instead of the one `settings.tracing`
        describes, which the worker builds and shuts down itself (None: tracing is off)."""
        self.settings = settings
        ws = settings.worker
        self.lm = lm or load_with(ws.model, settings.cache_dir, ws.runtime)
        self.engine = Engine(self.lm)
        self._owns_tracer_provider = tracer_provider is None
        self.tracer_provider = (tracer_provider if tracer_provider is not None
                                else build_tracer_provider(settings.tracing, TracedRole.WORKER))
        self.selector = SelectorClient.from_settings(ws, interceptors=client_interceptors(self.tracer_provider))
        self.scheduler = Scheduler(self.engine, ws.max_batch_size, CallBudget(ws.selector_calls_per_s))
        # The selector verifies only after its vocabulary matched the SLM's (check_selector).
        self.remote: RemoteSelector | None = None
        self.adapters = AdapterStore(self.engine, ws.adapter_dir, ws.adapter_poll_s)
        self.scoring = ScoringBatcher(self.engine, ws.max_batch_size)  # every request's local re-ranking
        self.selector_info = None
        self.selector_problem = "selector not contacted yet"
        calibration = read_calibration(settings.calibration_file()) or {}
        self.thresholds = {kind: ThresholdTable(calibration.get(kind) or getattr(ws.thresholds, kind), kind)
                           for kind in ("entropy", "margin")}
        self.active = 0
        self.admissions = CallBudget(ws.requests_per_s)
        self.client_tokens = BearerTokens.from_secrets([ws.auth_token] if ws.auth_token is not None else [], "worker",
                                                       "worker.auth_token")
        self._watch: asyncio.Task | None = None
        self.metrics = WorkerMetrics(active_requests=lambda: self.active,
                                     adapter_version=lambda: getattr(self.adapters.current(), "version", None))
        self.selector.on_attempt = self.metrics.selector_attempt
        self.scheduler.on_forward = self.metrics.forward_done

    async def start(self, wait_for_selector_s: float = 0.0) -> None:
        self.scheduler.start()
        await self.adapters.start()
        deadline = time.monotonic() + wait_for_selector_s
        while not await self.check_selector() and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        if self.selector_info is None:
            log.warning("%s; s2t and llm requests degrade to the SLM until it answers", self.selector_problem)
            self._watch = asyncio.create_task(self._watch_selector())
        ws = self.settings.worker
        if ws.metrics_port is not None:  # last: a start that fails leaves no endpoint behind
            port = self.metrics.serve_http(ws.metrics_host, ws.metrics_port)
            log.info("worker metrics on http://%s:%d/metrics", ws.metrics_host, port)

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        await self.scheduler.stop()
        await self.adapters.stop()
        await self.selector.close()
        await asyncio.to_thread(self.metrics.close)
        if self._owns_tracer_provider:  # last: the spans of everything above are exported before the process ends
            await asyncio.to_thread(shutdown_tracer_provider, self.tracer_provider)

    async def check_selector(self) -> bool:
        """Contact the selector and refuse a vocabulary different from the SLM's (candidate ids would lie)."""
        try:
            info = await self.selector.info(timeout_s=5.0)
        except grpc.aio.AioRpcError as e:
            self.selector_problem = self.selector.problem(e)
            return False
        if info.vocab_sha256 != self.lm.vocab_sha256:
            raise RuntimeError(
                f"the selector's model {info.model_name!r} has a different vocabulary (sha256 {info.vocab_sha256[:12]}…) "
                f"than the worker's {self.lm.name!r} ({self.lm.vocab_sha256[:12]}…): S2T needs one tokenizer for both")
        self.selector_info = info
        self.remote = RemoteSelector(self.selector, self.lm.name, self.lm.weights_sha256,
                                     prefill=self.settings.worker.selector_prefill and info.accepts_prefill)
        log.info("selector %s: model %s, weights %s", self.selector.address, info.model_name, info.weight_formats)
        return True

    async def _watch_selector(self) -> None:
        while self.selector_info is None:
            await asyncio.sleep(2.0)
            try:
                await self.check_selector()
            except RuntimeError as e:
                self.selector_problem = str(e)
                log.error("%s", e)
                return

    # -- requests -----------------------------------------------------------------------------------------

    async def admit(self, metadata) -> None:
        ws = self.settings.worker
        refusal = self.client_tokens.refusal(metadata)  # constant-time, never echoes the token
        if refusal is not None:
            raise RequestError(grpc.StatusCode.UNAUTHENTICATED, refusal)
        if self.active >= ws.max_concurrent_requests:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"worker at its limit of {ws.max_concurrent_requests} concurrent requests; retry later")
        if not await self.admissions.try_take():
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"worker rate limit of {ws.requests_per_s:g} requests/s reached; retry later")

    def prompt_ids(self, request) -> list[int]:
        ws = self.settings.worker
        which = request.WhichOneof("input")
        if which is None:
            raise _invalid("prompt: a prompt or a conversation is required")
        if which == "prompt":
            if not request.prompt.strip():
                raise _invalid("prompt: must not be empty")
            messages = [{"role": "system", "content": ws.system_prompt}, {"role": "user", "content": request.prompt}]
        else:
            msgs = request.conversation.messages
            if not msgs:
                raise _invalid("conversation.messages: at least one message is required")
            messages = []
            for i, m in enumerate(msgs):
                if m.role not in ROLES:
                    raise _invalid(f"conversation.messages[{i}].role: {m.role!r} is not one of {sorted(ROLES)}")
                if not m.content.strip():
                    raise _invalid(f"conversation.messages[{i}].content: must not be empty")
                messages.append({"role": m.role, "content": m.content})
        ids = chat_ids(self.lm.tokenizer, messages)
        if len(ids) > ws.max_prompt_tokens:
            raise _invalid(f"{which}: {len(ids)} tokens after the chat template, at most {ws.max_prompt_tokens}")
        return ids

    def options(self, request) -> tuple[DecodeOptions, int]:
        ws, o = self.settings.worker, request.options
        mode_requested = o.mode or Mode(ws.default_mode).proto
        try:
            mode = Mode.from_proto(mode_requested)
        except ValueError:
            raise _invalid(f"options.mode: unknown value {o.mode}") from None
        max_new = o.max_new_tokens or ws.max_new_tokens
        if max_new > ws.max_new_tokens_limit:
            raise _invalid(f"options.max_new_tokens: {max_new} exceeds the limit {ws.max_new_tokens_limit}")
        k = o.num_candidates or ws.num_candidates
        k_limit = self.selector_info.max_candidates if self.selector_info else 64
        if k > k_limit:
            raise _invalid(f"options.num_candidates: K = {k} exceeds the selector's max_candidates {k_limit}")
        try:
            trigger = TriggerKind.from_proto(o.trigger) if o.trigger else TriggerKind(ws.trigger)
        except ValueError:
            raise _invalid(f"options.trigger: unknown value {o.trigger}") from None
        if mode is Mode.S2T_LOCAL and trigger is TriggerKind.KL:
            trigger = TriggerKind.ENTROPY  # the KL oracle needs the large model; locally the calibrated entropy stands in
        rate = o.trigger_rate or ws.trigger_rate
        if math.isnan(rate) or not 0 < rate <= 1:
            raise _invalid(f"options.trigger_rate: {rate} must be in (0, 1]")
        local = None
        if trigger.llm_free:
            try:
                local = LocalTrigger(trigger.value, self.thresholds[trigger.value].threshold(rate), ws.warmup_steps)
            except ValueError as e:
                raise _invalid(f"options.trigger_rate: {e}") from None
        elif trigger is TriggerKind.KL and self.selector_info is not None:
            # The selector maps the rate through its KL calibration and refuses one outside it: refused here, like
            # an entropy or margin rate outside the worker's, rather than served unverified after every Select failed.
            try:
                ThresholdTable(dict(self.selector_info.kl_thresholds), "KL").threshold(rate)
            except ValueError as e:
                raise _invalid(f"options.trigger_rate: {e}") from None
        block = o.block_size or ws.block_size
        if block > ws.max_block_size:
            raise _invalid(f"options.block_size: {block} exceeds the limit {ws.max_block_size}")
        inflight = o.max_inflight_blocks or ws.max_inflight_blocks
        if o.max_inflight_blocks > MAX_INFLIGHT_BLOCKS:
            raise _invalid(f"options.max_inflight_blocks: {inflight} exceeds the limit {MAX_INFLIGHT_BLOCKS}")
        confidence = o.draft_confidence if o.HasField("draft_confidence") else ws.draft_confidence
        if math.isnan(confidence) or not 0 <= confidence < 1:
            raise _invalid(f"options.draft_confidence: {confidence} must be in [0, 1)")
        policy = o.verify_policy or (gen_pb.VERIFY_POLICY_WAIT if ws.verify_policy == "wait"
                                     else gen_pb.VERIFY_POLICY_COMMIT_AFTER_LAG)
        if policy not in (gen_pb.VERIFY_POLICY_WAIT, gen_pb.VERIFY_POLICY_COMMIT_AFTER_LAG):
            raise _invalid(f"options.verify_policy: unknown value {o.verify_policy}")
        # Both policies are one mechanism: how long a selector call may take before its drafts commit unverified.
        if policy == gen_pb.VERIFY_POLICY_WAIT:
            deadline_ms = o.verify_deadline_ms or ws.verify_deadline_ms
        else:
            deadline_ms = o.commit_lag_ms or ws.commit_lag_ms
        temperature, top_p, seed = self.sampling(o, mode)
        opts = DecodeOptions(mode=mode, max_new_tokens=max_new, num_candidates=k, trigger=trigger, trigger_rate=rate,
                             local_trigger=local, warmup_steps=ws.warmup_steps, block_size=block,
                             max_inflight_blocks=inflight, selector_deadline_s=deadline_ms / 1000,
                             decode_chunk=ws.decode_chunk, draft_confidence=confidence,
                             draft_when_unsure=(o.draft_when_unsure if o.HasField("draft_when_unsure")
                                                else ws.draft_when_unsure),
                             branch_when_unsure=(o.branch_when_unsure if o.HasField("branch_when_unsure")
                                                 else ws.branch_when_unsure), max_branches=ws.max_branches,
                             temperature=temperature, top_p=top_p, seed=seed)
        return opts, mode_requested

    @staticmethod
    def sampling(o: gen_pb.GenerationOptions, mode: Mode) -> tuple[float, float, int]:
        """(temperature, top_p, seed) of a request. Sampling is for mode greedy only: in the verified modes the
        SLM's draft is its top-1 by definition (the selector picks among its top-K), and llm is the large
        model's greedy baseline. A sampling request without a seed gets one the stats report (replayable)."""
        temperature, top_p = o.temperature, o.top_p
        if not (math.isfinite(temperature) and temperature >= 0):
            raise _invalid(f"options.temperature: {temperature} must be a finite number >= 0 (0 = greedy)")
        if math.isnan(top_p) or not 0 <= top_p <= 1:
            raise _invalid(f"options.top_p: {top_p} must be in [0, 1] (0 or 1 = off)")
        if temperature == 0:
            return 0.0, 0.0, 0  # greedy: top_p and seed have nothing to act on
        if mode is not Mode.GREEDY:
            raise _invalid(f"options.temperature: {temperature:g} > 0 samples, which only mode greedy does; "
                           f"mode {mode.value} decodes greedily (temperature 0)")
        return temperature, top_p, o.seed or pick_seed()

    def verifier_for(self, mode: Mode) -> tuple[Verifier | None, Mode, str]:
        """The verifier a request of `mode` gets now, the mode that will run, and why it differs (if it does)."""
        local = self.adapters.current()
        local_verifier = LocalReranker(self.engine, local, self.adapters, self.scoring) if local is not None else None
        if mode is Mode.TAKEOVER:  # only the selector's model has the top-1 it takes; no local stand-in
            if self.remote is not None:
                return self.remote, Mode.TAKEOVER, ""
            return None, Mode.GREEDY, self.selector_problem
        if mode is Mode.S2T:
            if self.remote is not None:
                return (Fallback(self.remote, local_verifier) if local_verifier else self.remote), Mode.S2T, ""
            if local_verifier is not None:
                return local_verifier, Mode.S2T_LOCAL, f"{self.selector_problem}; re-ranking locally"
            return None, Mode.GREEDY, self.selector_problem
        if mode is Mode.S2T_LOCAL:
            if local_verifier is not None:
                return local_verifier, Mode.S2T_LOCAL, ""
            return None, Mode.GREEDY, f"no S2T-Local adapter loaded ({self.adapters.problem})"
        if mode is Mode.LLM and self.remote is None:
            return None, Mode.LLM, self.selector_problem  # run_llm degrades to greedy with this reason
        return None, mode, ""

    def start_sequence(self, request) -> Sequence:
        if len(request.request_id) > MAX_ID_LEN:
            raise _invalid(f"request_id: {len(request.request_id)} characters, at most {MAX_ID_LEN}")
        if not METADATA_SAFE.fullmatch(request.request_id):
            raise _invalid("request_id: only printable ASCII characters (it is sent on as gRPC metadata)")
        prompt = self.prompt_ids(request)
        opts, mode_requested = self.options(request)
        request_id = request.request_id or uuid.uuid4().hex
        session_id = f"{request_id[:MAX_ID_LEN - 9]}-{uuid.uuid4().hex[:8]}"  # within the selector's limit too
        seq = Sequence(request_id, session_id, prompt, opts, self.engine,
                       self.lm.stop_ids, self.lm.tokenizer, mode_requested, odds=self.scheduler.odds)
        if self.tracer_provider is not None:
            # This runs in the call's context, its Generate span current: the decode loop runs the sequence's
            # selector calls in it (they run in tasks of their own), so they join the request's trace.
            seq.trace_context = contextvars.copy_context()
            annotate_current_span({"s2t.mode": opts.mode.value, "s2t.request_id": request_id,
                                   "s2t.session_id": session_id, "s2t.num_candidates": opts.num_candidates,
                                   "s2t.max_new_tokens": opts.max_new_tokens})
        verifier, running, why = self.verifier_for(opts.mode)
        seq.running = running
        seq.stats.mode_used = running.proto
        seq.stats.degraded_reason = why
        if verifier is not None:
            seq.verifier = verifier.open(seq)
        self.scheduler.submit(seq, self.selector if self.remote is not None else None)
        return seq

    async def run(self, request) -> AsyncIterator[Event]:
        """Stream a request's events; cancelling the iteration cancels the request."""
        seq = self.start_sequence(request)
        self.active += 1
        ids = {"request_id": seq.request_id, "session_id": seq.session_id}
        log.debug("request started", extra=ids)
        answered = False
        try:
            while True:
                event = await seq.events.get()
                if event.final is not None:  # counted before the client can see it, so a scrape after agrees
                    answered, st = True, event.final.stats
                    self.metrics.request_finished(st)
                    if self.tracer_provider is not None:  # on the Generate span: how it went
                        annotate_current_span({"s2t.mode_used": Mode.from_proto(st.mode_used).value,
                                               "s2t.completion_tokens": st.completion_tokens,
                                               "s2t.selector_calls": st.selector_calls,
                                               "s2t.degraded_reason": st.degraded_reason})
                    log.info("request finished: %d tokens in %.2f s, mode %s%s", st.completion_tokens, st.wall_s,
                             Mode.from_proto(st.mode_used).value,
                             f", degraded: {st.degraded_reason}" if st.degraded_reason else "", extra=ids)
                yield event
                if event.final is not None:
                    return
        finally:
            self.active -= 1
            if not answered:
                self.metrics.request_cancelled(seq.stats)
                log.info("request cancelled by the client", extra=ids)
            if not seq.done:
                seq.cancelled = True
                self.scheduler.wake()


class GenerationServicer:
    """grpc.aio handlers. Requests arrive as bytes so that undecodable or mistyped input is INVALID_ARGUMENT
    with the field named, rather than the INTERNAL grpc would answer."""

    def __init__(self, worker: Worker):
        self.worker = worker

    async def _start(self, cls, data: bytes, context) -> AsyncIterator[Event]:
        try:
            request = parse(cls, data)
            await self.worker.admit(context.invocation_metadata())
            return self.worker.run(request)
        except WireError as e:
            self.worker.metrics.request_refused(grpc.StatusCode.INVALID_ARGUMENT)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except RequestError as e:
            await self._refuse(e, context)

    async def _refuse(self, error: RequestError, context) -> None:
        self.worker.metrics.request_refused(error.code)
        await context.abort(error.code, error.message)

    async def Generate(self, data: bytes, context) -> gen_pb.GenerateResponse:
        events = await self._start(gen_pb.GenerateRequest, data, context)
        try:
            async for event in events:
                if event.final is not None:
                    return event.final
        except RequestError as e:
            await self._refuse(e, context)

    async def GenerateStream(self, data: bytes, context):
        events = await self._start(gen_pb.GenerateStreamRequest, data, context)
        try:
            async for event in events:
                if event.final is not None:
                    yield gen_pb.GenerateStreamResponse(final=event.final)
                elif event.text or event.token_ids:
                    yield gen_pb.GenerateStreamResponse(delta=gen_pb.TextDelta(text=event.text,
                                                                                token_ids=event.token_ids))
        except RequestError as e:
            await self._refuse(e, context)


def _handlers(servicer: GenerationServicer) -> grpc.GenericRpcHandler:
    raw = lambda b: b  # noqa: E731 - parsed (strictly) inside the handler
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Generate": grpc.unary_unary_rpc_method_handler(
            servicer.Generate, request_deserializer=raw, response_serializer=gen_pb.GenerateResponse.SerializeToString),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            servicer.GenerateStream, request_deserializer=raw,
            response_serializer=gen_pb.GenerateStreamResponse.SerializeToString),
    })


async def serve(worker: Worker, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """Start the worker's gRPC server (generation, health, reflection); returns it and the bound port. With
    tracing on, a SERVER span per Generate / GenerateStream call (the client's traceparent its parent); the
    bearer-token check runs inside the call (Worker.admit), so a refused call has its span too."""
    server = grpc.aio.server(options=server_options(16 << 20),  # keepalive policy: see s2t.wire
                             interceptors=server_interceptors(worker.tracer_provider))
    server.add_generic_rpc_handlers((_handlers(GenerationServicer(worker)),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
    bound = add_port(server, f"{host}:{port}", worker.settings.worker.tls, "worker.tls")  # TLS / mTLS if configured
    if bound == 0:
        raise RuntimeError(f"cannot bind the worker to {host}:{port}")
    await server.start()
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound

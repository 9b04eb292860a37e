"""The worker's Prometheus metrics (`s2t_worker_*`) and the `/metrics` HTTP endpoint that serves them.

A request is recorded once, from the stats of its final response (the same numbers the client gets), when the
worker hands that response out; a request whose client went away first counts as cancelled, and one refused
before it started (bad input, auth, admission limits) counts by its gRPC status. Selector RPC attempts are
timed where the selector client makes them (`SelectorClient.on_attempt`).

Every Worker owns a CollectorRegistry of its own rather than prometheus_client's global one: tests and tools
run several workers in one process, and the global registry refuses a second registration of a name.
"""

from __future__ import annotations

import enum
import re
from typing import Callable, Iterable

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import InfoMetricFamily, Metric

from s2t.metrics_http import MetricsEndpoint
from s2t.modes import Mode
from s2t.v1 import generation_pb2 as gen_pb

TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DURATION_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TOKENS_PER_S_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
RPC_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
FORWARD_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RequestOutcome(enum.Enum):
    """How a request that started ended (the `outcome` label of s2t_worker_requests_total)."""

    COMPLETED = "completed"  # finished (end of turn or length) with the verifier it asked for throughout
    DEGRADED = "degraded"  # finished, but (part of) it ran without that verifier: see s2t_worker_fallbacks_total
    CANCELLED = "cancelled"  # the client went away before the final response


class ForwardRow(enum.Enum):
    """What a row of the decode loop's SLM forward drafts for (the `row` label of s2t_worker_forward_rows_total)."""

    DRAFT = "draft"  # a request's next draft (its prompt, the first time)
    BRANCH = "branch"  # a branch's next draft (worker.branch_when_unsure): a continuation the verifier may pick


class FallbackReason(enum.Enum):
    """Why (part of) a request ran without the verifier its mode asked for: the `reason` label of
    s2t_worker_fallbacks_total, a small fixed set mapped from the free-text `degraded_reason` of the stats."""

    SELECTOR_UNCONNECTED = "selector_unconnected"  # the worker has not reached its selector since start-up
    SELECTOR_INCOMPATIBLE = "selector_incompatible"  # the selector's vocabulary differs: it is never used
    SELECTOR_AUTH = "selector_auth"  # the selector refused the worker's credentials (token or client certificate)
    SELECTOR_DOWN = "selector_down"  # an outage during the request: connection failures, or the breaker is open
    SELECTOR_BUSY = "selector_busy"  # the selector was up but busy or slow past the request's deadline
    SELECTOR_REFUSED = "selector_refused"  # the selector answered an error a resend cannot fix
    SESSION_LOST = "session_lost"  # the selector kept losing the request's session: a block committed unverified
    CALL_BUDGET = "call_budget"  # the worker's selector-call budget was spent: the SLM decided alone
    NO_ADAPTER = "no_adapter"  # s2t-local without an S2T-Local adapter loaded
    RERANKER_FAILED = "reranker_failed"  # the local re-ranker raised
    OTHER = "other"  # degraded for a reason none of the above recognises (an unexpected error)


# The phrases the worker's degradation paths write into degraded_reason (slm_worker/server.py verifier_for and
# check_selector, verifiers.py, sequence.py, loop.py run_llm, selector_client.py's exception messages). One
# degraded_reason can name several; each found counts once per request.
_REASON_PHRASES: tuple[tuple[FallbackReason, re.Pattern[str]], ...] = (
    (FallbackReason.SELECTOR_INCOMPATIBLE, re.compile(r"has a different vocabulary")),
    (FallbackReason.SELECTOR_AUTH, re.compile(r"refused the worker's credentials")),
    (FallbackReason.SELECTOR_UNCONNECTED,
     re.compile(r"selector not contacted yet|selector at \S+ unreachable|selector not connected")),
    (FallbackReason.SELECTOR_DOWN,
     re.compile(r"selector down|selector unreachable until the deadline|circuit breaker open")),
    (FallbackReason.SELECTOR_BUSY, re.compile(r"selector busy past the deadline")),
    (FallbackReason.SELECTOR_REFUSED, re.compile(r"selector refused the request")),
    (FallbackReason.SESSION_LOST, re.compile(r"kept losing the session")),
    (FallbackReason.NO_ADAPTER, re.compile(r"no S2T-Local adapter loaded")),
    (FallbackReason.RERANKER_FAILED, re.compile(r"local re-ranker failed")),
)


def fallback_reasons(stats: gen_pb.GenerationStats) -> set[FallbackReason]:
    """The reasons a finished request degraded; empty when it ran as asked."""
    reasons = {reason for reason, phrase in _REASON_PHRASES if phrase.search(stats.degraded_reason)}
    if stats.local_decisions:
        reasons.add(FallbackReason.CALL_BUDGET)  # over budget is not a degradation the stats explain in words
    if not reasons and (stats.degraded_reason or stats.mode_used != stats.mode_requested):
        reasons.add(FallbackReason.OTHER)
    return reasons


def _mode_label(proto_mode: int) -> str:
    try:
        return Mode.from_proto(proto_mode).value
    except ValueError:
        return "unspecified"


class _AdapterCollector:
    """s2t_worker_adapter_info{version}: the S2T-Local adapter new requests get, read at scrape time."""

    def __init__(self, adapter_version: Callable[[], str | None]):
        self.adapter_version = adapter_version

    def collect(self) -> Iterable[Metric]:
        version = self.adapter_version()
        family = InfoMetricFamily("s2t_worker_adapter", "the S2T-Local adapter loaded for new requests (absent: none)")
        if version is not None:
            family.add_metric([], {"version": version})
            yield family


class WorkerMetrics:
    """The worker's metrics on their own registry, and the HTTP server that exposes them.

    `active_requests` and `adapter_version` are read when Prometheus scrapes, on the HTTP server's thread: they
    must only read attributes (the worker's event loop owns the state)."""

    def __init__(self, active_requests: Callable[[], int], adapter_version: Callable[[], str | None]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("s2t_worker_requests", "requests that started, by mode asked for, mode that ran and "
                                "outcome", ("mode_requested", "mode_used", "outcome"), registry=r)
        self.refused = Counter("s2t_worker_requests_refused", "requests refused before they started, by gRPC status "
                               "(invalid_argument, unauthenticated, resource_exhausted)", ("code",), registry=r)
        self.completion_tokens = Counter("s2t_worker_completion_tokens", "tokens returned to clients, by the mode "
                                         "that ran", ("mode",), registry=r)
        self.positions_checked = Counter("s2t_worker_positions_checked", "drafted positions the selector checked",
                                         registry=r)
        self.reranked_positions = Counter("s2t_worker_reranked_positions", "drafted positions the local S2T-Local "
                                          "re-ranker checked", registry=r)
        self.picks_changed = Counter("s2t_worker_picks_changed", "positions where a verifier picked another "
                                     "candidate than the SLM's top-1", registry=r)
        self.rolled_back_tokens = Counter("s2t_worker_rolled_back_tokens", "drafted tokens thrown away after a "
                                          "divergence", registry=r)
        self.unverified_tokens = Counter("s2t_worker_unverified_tokens", "tokens committed without a verdict "
                                         "(the verifier failed or lagged past the deadline)", registry=r)
        self.resyncs = Counter("s2t_worker_resyncs", "times a request resent its full context because the selector "
                               "had lost its session", registry=r)
        self.fallbacks = Counter("s2t_worker_fallbacks", "finished requests that (partly) ran without the verifier "
                                 "they asked for, by reason (a request with several reasons counts under each)",
                                 ("reason",), registry=r)
        self.time_to_first_token = Histogram("s2t_worker_time_to_first_token_seconds", "from the request's start to "
                                             "its first committed token, by the mode that ran", ("mode",),
                                             buckets=TTFT_BUCKETS_S, registry=r)
        self.duration = Histogram("s2t_worker_request_duration_seconds", "wall time of finished requests, by the mode "
                                  "that ran", ("mode",), buckets=DURATION_BUCKETS_S, registry=r)
        self.tokens_per_second = Histogram("s2t_worker_tokens_per_second", "completion tokens per second of each "
                                           "finished request, by the mode that ran", ("mode",),
                                           buckets=TOKENS_PER_S_BUCKETS, registry=r)
        self.selector_rpc = Histogram("s2t_worker_selector_rpc_seconds", "selector RPC attempts (a call may resend its "
                                      "step), by RPC and outcome (ok or the gRPC status)", ("method", "outcome"),
                                      buckets=RPC_BUCKETS_S, registry=r)
        self.forward = Histogram("s2t_worker_forward_seconds", "the decode loop's SLM forwards, one a step for every "
                                 "request drafting then (and their branches): seconds on the engine's compute thread. "
                                 "_sum over wall time is how busy drafting keeps the worker's compute; with "
                                 "rolled_back_tokens_total, how much of it a verifier threw away",
                                 buckets=FORWARD_BUCKETS_S, registry=r)
        self.forward_rows = Counter("s2t_worker_forward_rows", "rows of those forwards, by what they draft for: a "
                                    "request's next draft, or a branch's", ("row",), registry=r)
        active = Gauge("s2t_worker_active_requests", "requests in flight (admitted, final response not yet sent)",
                       registry=r)
        active.set_function(lambda: float(active_requests()))
        r.register(_AdapterCollector(adapter_version))
        self._endpoint = MetricsEndpoint(self.registry, "worker")

    # -- recording (on the worker's event loop) -------------------------------------------------------------

    def request_finished(self, stats: gen_pb.GenerationStats) -> None:
        """A request's final response is going out: count it from its stats."""
        mode = _mode_label(stats.mode_used)
        reasons = fallback_reasons(stats)
        outcome = RequestOutcome.DEGRADED if reasons else RequestOutcome.COMPLETED
        self.requests.labels(_mode_label(stats.mode_requested), mode, outcome.value).inc()
        for reason in reasons:
            self.fallbacks.labels(reason.value).inc()
        self.completion_tokens.labels(mode).inc(stats.completion_tokens)
        self.positions_checked.inc(stats.positions_checked)
        self.reranked_positions.inc(stats.reranked_positions)
        self.picks_changed.inc(stats.picks_changed)
        self.rolled_back_tokens.inc(stats.rolled_back_tokens)
        self.unverified_tokens.inc(stats.unverified_tokens)
        self.resyncs.inc(stats.resyncs)
        self.duration.labels(mode).observe(stats.wall_s)
        if stats.completion_tokens:  # a request that produced nothing has no first token and no rate
            self.time_to_first_token.labels(mode).observe(stats.time_to_first_token_s)
            self.tokens_per_second.labels(mode).observe(stats.tokens_per_s)

    def forward_done(self, seconds: float, drafts: int, branches: int) -> None:
        """One SLM forward of the decode loop: `drafts` requests' rows and `branches` branch rows."""
        self.forward.observe(seconds)
        self.forward_rows.labels(ForwardRow.DRAFT.value).inc(drafts)
        if branches:
            self.forward_rows.labels(ForwardRow.BRANCH.value).inc(branches)

    def request_cancelled(self, stats: gen_pb.GenerationStats) -> None:
        """The client went away before the final response: only the count (its tokens never reached anyone)."""
        self.requests.labels(_mode_label(stats.mode_requested), _mode_label(stats.mode_used),
                             RequestOutcome.CANCELLED.value).inc()

    def request_refused(self, code: grpc.StatusCode) -> None:
        self.refused.labels(code.name.lower()).inc()

    def selector_attempt(self, method: str, code: grpc.StatusCode | None, seconds: float) -> None:
        """One selector RPC attempt ended: `code` None is a reply, else the status it failed with."""
        self.selector_rpc.labels(method, "ok" if code is None else code.name.lower()).observe(seconds)

    # -- the /metrics endpoint ------------------------------------------------------------------------------

    def serve_http(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (0: a free port); returns the bound port."""
        return self._endpoint.serve(host, port)

    @property
    def http_port(self) -> int | None:
        return self._endpoint.port

    def close(self) -> None:
        """Stop the endpoint. Idempotent."""
        self._endpoint.close()

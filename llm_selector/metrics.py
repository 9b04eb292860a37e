"""The selector's metrics (`s2t_selector_*`): one set of definitions, two backends chosen at construction.

  PrometheusBackend   prometheus_client on a registry of its own, served on /metrics by the plain grpc.aio
                      server (`selector.metrics_port`); also the default, so a SelectorCore built anywhere
                      (tests, profiling) records without any setup.
  RayServeBackend     ray.serve.metrics inside the Serve deployment: Ray's metrics agent exports them with its
                      `ray_` prefix and the deployment / replica / application tags. Imported lazily, so the
                      plain server and the tests never import Ray.

SelectorCore (core.py) calls the same `SelectorMetrics` methods either way, always on its event loop.
"""

from __future__ import annotations

import enum
from typing import Mapping, Protocol

import grpc

from s2t.metrics_http import MetricsEndpoint

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
FORWARD_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class SelectorMethod(enum.Enum):
    """The RPCs the selector answers (the `method` label)."""

    SELECT = "select"
    DECODE = "decode"
    CLOSE_SESSION = "close_session"
    INFO = "info"


class SelectorOutcome(enum.Enum):
    """How the selector answered a request (the `outcome` label)."""

    OK = "ok"
    INVALID_ARGUMENT = "invalid_argument"
    FAILED_PRECONDITION = "failed_precondition"  # the session or its prefix is not here: the worker resyncs
    RESOURCE_EXHAUSTED = "resource_exhausted"  # back-pressure: the batch queue is full
    CANCELLED = "cancelled"  # the caller went away before the answer
    ERROR = "error"  # any other status, or an unexpected exception

    @classmethod
    def of(cls, code: grpc.StatusCode) -> "SelectorOutcome":
        return _OUTCOME_OF_CODE.get(code, cls.ERROR)


class QuotaKind(enum.Enum):
    """The per-worker quotas (`selector.quota.<value>`, llm_selector/quotas.py): the `quota` label, bounded,
    where the worker's identity would not be."""

    POSITIONS_PER_S = "positions_per_s"
    MAX_SESSIONS = "max_sessions"
    MAX_KV_BYTES = "max_kv_bytes"

    @property
    def setting(self) -> str:
        return f"selector.quota.{self.value}"


_OUTCOME_OF_CODE = {grpc.StatusCode.INVALID_ARGUMENT: SelectorOutcome.INVALID_ARGUMENT,
                    grpc.StatusCode.FAILED_PRECONDITION: SelectorOutcome.FAILED_PRECONDITION,
                    grpc.StatusCode.RESOURCE_EXHAUSTED: SelectorOutcome.RESOURCE_EXHAUSTED,
                    grpc.StatusCode.CANCELLED: SelectorOutcome.CANCELLED}


# -- the backend seam: three instrument kinds, labels passed as a mapping ------------------------------------


class CounterInstrument(Protocol):
    def inc(self, amount: float, labels: Mapping[str, str]) -> None: ...


class GaugeInstrument(Protocol):
    def set(self, value: float, labels: Mapping[str, str]) -> None: ...


class HistogramInstrument(Protocol):
    def observe(self, value: float, labels: Mapping[str, str]) -> None: ...


class MetricsBackend(Protocol):
    """Makes instruments. Counter names are given without `_total`: both backends add it on export."""

    def counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> CounterInstrument: ...

    def gauge(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> GaugeInstrument: ...

    def histogram(self, name: str, doc: str, buckets: tuple[float, ...],
                  labels: tuple[str, ...] = ()) -> HistogramInstrument: ...


class _PromInstrument:
    """A prometheus_client metric behind the instrument protocols (labelled or not)."""

    def __init__(self, metric):
        self.metric = metric

    def _child(self, labels: Mapping[str, str]):
        return self.metric.labels(**labels) if labels else self.metric

    def inc(self, amount: float, labels: Mapping[str, str]) -> None:
        self._child(labels).inc(amount)

    def set(self, value: float, labels: Mapping[str, str]) -> None:
        self._child(labels).set(value)

    def observe(self, value: float, labels: Mapping[str, str]) -> None:
        self._child(labels).observe(value)


class PrometheusBackend:
    """prometheus_client metrics on a registry of their own (several selectors in one test process must not
    collide), and the /metrics HTTP server for them."""

    def __init__(self):
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry()
        self._endpoint = MetricsEndpoint(self.registry, "selector")

    def counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> CounterInstrument:
        from prometheus_client import Counter

        return _PromInstrument(Counter(name, doc, labels, registry=self.registry))

    def gauge(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> GaugeInstrument:
        from prometheus_client import Gauge

        return _PromInstrument(Gauge(name, doc, labels, registry=self.registry))

    def histogram(self, name: str, doc: str, buckets: tuple[float, ...],
                  labels: tuple[str, ...] = ()) -> HistogramInstrument:
        from prometheus_client import Histogram

        return _PromInstrument(Histogram(name, doc, labels, buckets=buckets, registry=self.registry))

    def serve_http(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (0: a free port); returns the bound port."""
        return self._endpoint.serve(host, port)

    @property
    def http_port(self) -> int | None:
        return self._endpoint.port

    def close(self) -> None:
        """Stop the endpoint. Idempotent."""
        self._endpoint.close()


class _RayInstrument:
    """A ray.serve.metrics metric behind the instrument protocols."""

    def __init__(self, metric):
        self.metric = metric

    def inc(self, amount: float, labels: Mapping[str, str]) -> None:
        if amount > 0:  # Ray refuses increments of 0
            self.metric.inc(amount, tags=dict(labels))

    def set(self, value: float, labels: Mapping[str, str]) -> None:
        self.metric.set(value, tags=dict(labels))

    def observe(self, value: float, labels: Mapping[str, str]) -> None:
        self.metric.observe(value, tags=dict(labels))


class RayServeBackend:
    """ray.serve.metrics instruments: construct inside a Serve replica (they add its deployment, replica and
    application tags)."""

    def __init__(self):
        from ray.serve import metrics  # lazily: only a Serve replica has (and needs) Ray

        self._ray = metrics

    def counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> CounterInstrument:
        return _RayInstrument(self._ray.Counter(name, description=doc, tag_keys=labels or None))

    def gauge(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> GaugeInstrument:
        return _RayInstrument(self._ray.Gauge(name, description=doc, tag_keys=labels or None))

    def histogram(self, name: str, doc: str, buckets: tuple[float, ...],
                  labels: tuple[str, ...] = ()) -> HistogramInstrument:
        return _RayInstrument(self._ray.Histogram(name, description=doc, boundaries=[float(b) for b in buckets],
                                                  tag_keys=labels or None))


# -- what the selector records ----------------------------------------------------------------------------


class SelectorMetrics:
    """The `s2t_selector_*` metrics, on either backend (default: a fresh PrometheusBackend)."""

    def __init__(self, backend: MetricsBackend | None = None):
        self.backend = backend if backend is not None else PrometheusBackend()
        b = self.backend
        self._requests = b.counter("s2t_selector_requests", "requests answered, by RPC and outcome",
                                   ("method", "outcome"))
        self._rejections = b.counter("s2t_selector_queue_rejections", "requests refused with RESOURCE_EXHAUSTED "
                                     "because max_queued_requests already waited for a batch (back-pressure)")
        self._quota_rejections = b.counter("s2t_selector_quota_rejections", "requests refused with "
                                           "RESOURCE_EXHAUSTED because their worker was over a selector.quota.* "
                                           "setting, by quota", ("quota",))
        self._quota_evictions = b.counter("s2t_selector_quota_evictions", "sessions evicted to bring their "
                                          "worker back within a selector.quota.* setting, by quota", ("quota",))
        self._replays = b.counter("s2t_selector_replays", "retried steps answered from the kept reply (no compute)")
        self._resyncs = b.counter("s2t_selector_resyncs", "full-context resends admitted (prefix_length 0 after "
                                  "step 0): a worker rebuilding a session the selector lost or never had")
        self._evictions = b.counter("s2t_selector_evictions", "sessions dropped for idle time, count or KV memory")
        self._sessions = b.gauge("s2t_selector_sessions", "sessions held")
        self._kv_bytes = b.gauge("s2t_selector_kv_bytes", "KV cache memory the sessions hold, in bytes")
        self._kv_budget_bytes = b.gauge("s2t_selector_kv_budget_bytes", "KV cache memory the sessions may hold "
                                        "(selector.kv_budget_mb), in bytes")
        self._weight_bytes = b.gauge("s2t_selector_weight_bytes", "the model's weights as held in memory, every "
                                     "weight format's copy included, in bytes")
        self._batch_size = b.histogram("s2t_selector_batch_size", "sessions per batched compute, by RPC",
                                       BATCH_SIZE_BUCKETS, ("method",))
        self._forward_s = b.histogram("s2t_selector_forward_seconds", "wall time of one batched compute, by RPC "
                                      "(select: one forward; decode: one per generated token)", FORWARD_BUCKETS_S,
                                      ("method",))
        self._positions = b.counter("s2t_selector_positions_scored", "candidate positions scored by Select")
        self._divergences = b.counter("s2t_selector_divergences", "Select replies that picked another candidate "
                                      "than the SLM's top-1 at a position the trigger fired on")
        self._evictions_seen = 0

    @classmethod
    def for_ray_serve(cls) -> "SelectorMetrics":
        """For the Serve deployment: call inside the replica."""
        return cls(RayServeBackend())

    def request(self, method: SelectorMethod, outcome: SelectorOutcome) -> None:
        self._requests.inc(1, {"method": method.value, "outcome": outcome.value})

    def queue_rejection(self) -> None:
        self._rejections.inc(1, {})

    def quota_rejection(self, quota: QuotaKind) -> None:
        self._quota_rejections.inc(1, {"quota": quota.value})

    def quota_evictions(self, quota: QuotaKind, sessions: int) -> None:
        self._quota_evictions.inc(sessions, {"quota": quota.value})

    def replay(self) -> None:
        self._replays.inc(1, {})

    def resync(self) -> None:
        self._resyncs.inc(1, {})

    def batch(self, method: SelectorMethod, size: int, seconds: float) -> None:
        labels = {"method": method.value}
        self._batch_size.observe(size, labels)
        self._forward_s.observe(seconds, labels)

    def selected(self, positions: int, diverged: int) -> None:
        """A Select batch's replies: positions scored, replies that diverged."""
        self._positions.inc(positions, {})
        self._divergences.inc(diverged, {})

    def memory_budget(self, weight_bytes: int, kv_budget_bytes: int) -> None:
        """What the process holds by design: its weights (fixed at load) and the KV budget (configured)."""
        self._weight_bytes.set(weight_bytes, {})
        self._kv_budget_bytes.set(kv_budget_bytes, {})

    def sessions(self, count: int, kv_bytes: int, evictions_so_far: int) -> None:
        """The session store now; `evictions_so_far` is its running total (the counter takes the increase)."""
        self._sessions.set(count, {})
        self._kv_bytes.set(kv_bytes, {})
        if evictions_so_far > self._evictions_seen:
            self._evictions.inc(evictions_so_far - self._evictions_seen, {})
            self._evictions_seen = evictions_so_far

    # -- the plain server's /metrics endpoint -------------------------------------------------------------

    def serve_http(self, host: str, port: int) -> int:
        if not isinstance(self.backend, PrometheusBackend):
            raise TypeError("only the prometheus_client backend serves /metrics itself (Ray exports its own)")
        return self.backend.serve_http(host, port)

    @property
    def http_port(self) -> int | None:
        return self.backend.http_port if isinstance(self.backend, PrometheusBackend) else None

    def close(self) -> None:
        if isinstance(self.backend, PrometheusBackend):
            self.backend.close()

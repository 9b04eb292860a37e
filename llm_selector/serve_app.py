"""The selector as a Ray Serve application behind Serve's gRPC proxy.

Method names equal the RPC names of s2t.v1.SelectorService (Ray routes by name). Concurrent Select calls
from different sessions are batched into one forward by SelectorCore.handle (which forms a batch when the
engine frees up; @serve.batch did not batch under load, see there); Decode calls likewise. Sessions are
routed to replicas by consistent hashing over the `session_id` gRPC metadata, so a session's cache is
usually warm; when it is not, the worker resyncs (correctness never depends on routing).

Authentication: the proxy passes the call's metadata through to the replica (RayServegRPCContext), so every
method checks the `authorization: Bearer <token>` entry against `selector.auth_tokens` as the --no-ray server
does, and answers UNAUTHENTICATED without running. The replica gets the tokens' SHA-256 digests only (the
settings it is bound with leave the secrets out), so no token value sits in Ray's stored deployment arguments.
TLS: Ray Serve's gRPC proxy listens in plaintext only (gRPCOptions has no TLS or channel options), so TLS is
terminated in front of the proxy (a load balancer, an ingress or a sidecar); `selector.tls` set here is an
error rather than a silently plaintext port. Nor can the proxy's HTTP/2 ping policy be set: it has grpc core's
defaults, which the clients' keepalive (s2t.wire) is chosen to satisfy.

Tracing (`tracing.enabled`): the proxy ends the worker's HTTP/2 call itself, so no server interceptor of ours
sees it; each method instead runs inside a SERVER span (s2t.tracing.ServerSpans) whose parent is the
`traceparent` the proxy passes through with the rest of the metadata — the worker's CLIENT span. The replica
builds its tracer provider from its settings and flushes it when Serve shuts it down (__del__).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import grpc
from ray import serve

from s2t.v1 import selector_pb2 as pb
from s2t.config import ConfigError, Settings
from s2t.security import BearerTokens
from s2t.tracing import ServerSpans, TracedRole, build_tracer_provider, shutdown_tracer_provider
from s2t.wire import WireError, check_wire_types

from .core import SelectorCore, SelectorError
from .grpc_server import AUTH_HINT, SERVICE, selector_tokens
from .metrics import SelectorMethod, SelectorMetrics, SelectorOutcome
from .quotas import worker_identity

log = logging.getLogger("s2t.selector")

SERVICER_FUNCTION = "s2t.v1.selector_pb2_grpc.add_SelectorServiceServicer_to_server"
CONSISTENT_HASH_ROUTER = "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"


# Settings the replica is bound without: the secrets (the selector's tokens travel as digests, see build_app).
SECRET_FIELDS = {"worker": {"auth_token", "selector_auth_token"}, "selector": {"auth_tokens"}}


@serve.deployment(name="Selector")
class SelectorDeployment:
    # A replica made without __init__ (tests build one around a core of their own) traces nothing.
    tracer_provider = None
    spans = ServerSpans(None, SERVICE)

    def __init__(self, settings: dict, token_digests: list[str] | None = None):
        self.settings = Settings.model_validate(settings)
        self.tokens = BearerTokens.from_hex(token_digests or (), "selector", AUTH_HINT)
        # None unless tracing.enabled; spans with service.name <tracing.service_name>-selector
        self.tracer_provider = build_tracer_provider(self.settings.tracing, TracedRole.SELECTOR)
        self.spans = ServerSpans(self.tracer_provider, SERVICE)
        # s2t_selector_* through Ray's metrics agent (tagged with this replica), not an HTTP server of our own
        self.core = SelectorCore.from_settings(self.settings, metrics=SelectorMetrics.for_ray_serve())

    async def Select(self, request: pb.SelectRequest, grpc_context) -> pb.SelectResponse:
        with self.spans.span("Select", grpc_context, request):
            return await self._serve(request, grpc_context, "select", pb.SelectResponse)

    async def Decode(self, request: pb.DecodeRequest, grpc_context) -> pb.DecodeResponse:
        with self.spans.span("Decode", grpc_context, request):
            return await self._serve(request, grpc_context, "decode", pb.DecodeResponse)

    async def CloseSession(self, request: pb.CloseSessionRequest, grpc_context) -> pb.CloseSessionResponse:
        with self.spans.span("CloseSession", grpc_context, request):
            if self._refused(grpc_context):
                return pb.CloseSessionResponse()
            return self.core.close_session(request.session_id)

    async def GetSelectorInfo(self, request: pb.GetSelectorInfoRequest, grpc_context) -> pb.GetSelectorInfoResponse:
        with self.spans.span("GetSelectorInfo", grpc_context, request):
            if self._refused(grpc_context):
                return pb.GetSelectorInfoResponse()
            return self.core.info()

    def _refused(self, grpc_context) -> bool:
        """Check the call's bearer token; a refused call gets UNAUTHENTICATED (the proxy copies code and details
        onto the real call, see _serve) and returns an empty reply without running."""
        refusal = self.tokens.refusal(grpc_context.invocation_metadata())
        if refusal is None:
            return False
        grpc_context.set_code(grpc.StatusCode.UNAUTHENTICATED)
        grpc_context.set_details(refusal)
        return True

    async def _serve(self, request, grpc_context, kind: str, empty):
        if self._refused(grpc_context):
            return empty()
        try:
            # The proxy parsed the bytes with protobuf's deserializer, which keeps a field of the wrong wire type
            # as an unknown field and leaves the declared one at its default: refuse it by name instead, as the
            # --no-ray server's parser does.
            check_wire_types(request)
        except WireError as e:
            self.core.metrics.request(SelectorMethod(kind), SelectorOutcome.INVALID_ARGUMENT)
            grpc_context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            grpc_context.set_details(str(e))
            return empty()
        # who called, for the per-worker quotas (the proxy passes the worker's metadata and peer through)
        worker = worker_identity(grpc_context.invocation_metadata(), grpc_context.peer(), self.tokens)
        try:
            return await self.core.handle(request, kind, worker)
        except SelectorError as e:
            # Expected failures carry their own status; Serve would turn a raised exception into INTERNAL.
            # Serve 2.60's proxy copies code, details and trailing metadata of this RayServegRPCContext onto
            # the real call (RayServegRPCContext._set_on_grpc_context), so an overload answer reaches the
            # client as RESOURCE_EXHAUSTED with `retry-after-ms` in the trailing metadata and in the message.
            grpc_context.set_code(e.code)
            grpc_context.set_details(e.message)
            if e.trailing_metadata():
                grpc_context.set_trailing_metadata(list(e.trailing_metadata()))
            return empty()

    def check_health(self) -> None:
        problem = self.core.problem()
        if problem is not None:
            raise RuntimeError(problem)

    def __del__(self):
        if getattr(self, "core", None) is not None:
            self.core.close()
        # Serve calls __del__ on a graceful shutdown: export the spans still queued (bounded; the provider's
        # atexit hook is the backstop for a replica that exits otherwise)
        shutdown_tracer_provider(self.tracer_provider)
        self.tracer_provider = None


def _refuse_tls(settings: Settings) -> None:
    """selector.tls cannot apply here: an error beats a port that silently serves plaintext."""
    if settings.selector.tls.enabled:
        raise ConfigError("bad setting selector.tls: Ray Serve's gRPC proxy cannot serve TLS; terminate TLS in "
                          "front of the proxy, or run the selector with --no-ray")


def _replica_gpus(settings: Settings) -> int:
    """GPUs each replica asks Ray for: one where the model runs on a GPU. Ray hides every GPU from an actor that
    asks for none (CUDA_VISIBLE_DEVICES is emptied), and shows a replica only the one it was given, as cuda:0,
    so a device index other than 0 would name a GPU the replica cannot see."""
    device = settings.selector.runtime.device
    if device == "cpu":
        return 0
    if device not in ("cuda", "cuda:0"):
        raise ConfigError(f"bad setting selector.runtime.device = {device!r}: under Ray Serve each replica is given "
                          "one GPU of its own, which it sees as 'cuda'; use 'cuda' (or run with --no-ray)")
    return 1


def build_app(settings: Settings):
    """The bound application; options come from the settings (a serve config file may override them).

    The replica is bound with the settings minus their secrets, plus the SHA-256 digests of
    `selector.auth_tokens`. `selector.tls` is refused: the proxy cannot serve TLS (see the module docstring)."""
    sel = settings.selector
    _refuse_tls(settings)
    gpus = _replica_gpus(settings)
    from ray.serve.config import RequestRouterConfig
    from ray.serve.schema import LoggingConfig

    deployment = SelectorDeployment.options(
        num_replicas=sel.num_replicas,
        max_ongoing_requests=sel.max_ongoing_requests,
        ray_actor_options={"num_cpus": sel.replica_num_cpus, "num_gpus": gpus},
        request_router_config=RequestRouterConfig(
            request_router_class=CONSISTENT_HASH_ROUTER,
            request_router_kwargs={"num_virtual_nodes": 100, "num_fallback_replicas": 0}),
        health_check_period_s=10,
        graceful_shutdown_timeout_s=30,
        # One access-log line per Select call would be a line per few tokens.
        logging_config=LoggingConfig(log_level="WARNING", enable_access_log=False),
    )
    return deployment.bind(settings.model_dump(mode="json", exclude=SECRET_FIELDS),
                           selector_tokens(sel).hex_digests())


def app_builder(args: dict):
    """Entry point for `serve run` / serve config files: `import_path: llm_selector.serve_app:app_builder`.

    `args` may name a config file (`config: path`); everything else comes from S2T_* environment variables.
    """
    from s2t.config import load_settings

    return build_app(load_settings(args.get("config") or os.environ.get("S2T_CONFIG")))


def start(settings: Settings, blocking: bool = False):
    """Start a local Ray instance, Serve with gRPC ingress, and the selector app; returns the gRPC address."""
    import ray
    from ray.serve.config import gRPCOptions, HTTPOptions
    from ray.serve.schema import LoggingConfig

    sel = settings.selector
    _refuse_tls(settings)  # before Ray starts, so a refused start leaves nothing running
    if not ray.is_initialized():
        start_local_ray()
    serve.start(http_options=HTTPOptions(host=sel.host, port=sel.http_port),
                grpc_options=gRPCOptions(port=sel.grpc_port, grpc_servicer_functions=[SERVICER_FUNCTION]),
                logging_config=LoggingConfig(log_level="WARNING", enable_access_log=False))
    serve.run(build_app(settings), name=sel.application, route_prefix=f"/{sel.application}", blocking=blocking)
    return f"{sel.host}:{sel.grpc_port}"


# Ray gives a new node's raylet a fixed 30 s to register with the GCS (ray/_private/node.py) and has no knob
# for it. It registers within ~1 s here (raylet.out), yet the wait ran out in 2 of 3 full test runs on fresh
# 2-core machines (cause not seen: the logs were gone), so a node that times out is torn down and started again
# rather than failing the selector, and the warning carries its raylet and GCS log tails.
RAY_START_ATTEMPTS = 3
NODE_STARTUP_TIMEOUT = "timed out during startup"


def start_local_ray(attempts: int = RAY_START_ATTEMPTS) -> None:
    """`ray.init` a new local node; a node that times out during startup is killed and started again."""
    import ray

    for attempt in range(1, attempts + 1):
        before = _descendant_pids()
        try:
            ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True,
                     runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1",
                                               "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}})
            return
        except Exception as exc:
            if NODE_STARTUP_TIMEOUT not in str(exc) or attempt == attempts:
                raise
            # A failed Node() is not ray's global node, so ray.shutdown() would not stop what it started.
            stopped = _kill_new_descendants(before)
            log.warning("Ray node start %d/%d timed out (%s); stopped its %d processes and starting again.\n%s",
                        attempt, attempts, exc, stopped, _ray_log_tails())


def _descendant_pids() -> set[int]:
    import psutil

    return {child.pid for child in psutil.Process().children(recursive=True)}


def _kill_new_descendants(before: set[int]) -> int:
    """Kill this process's descendants that were not there before; returns how many. Called during start-up,
    when the only processes this one starts are the Ray node's."""
    import psutil

    new = [child for child in psutil.Process().children(recursive=True) if child.pid not in before]
    for child in new:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(new, timeout=10)
    return len(new)


def _ray_log_tails(lines: int = 15) -> str:
    """The last lines of the newest session's raylet and GCS logs: why the node did not come up."""
    from ray._common.utils import get_default_ray_temp_dir

    logs = Path(get_default_ray_temp_dir()) / "session_latest" / "logs"
    tails = []
    for name in ("raylet.out", "raylet.err", "gcs_server.out", "gcs_server.err"):
        with contextlib.suppress(OSError):
            text = (logs / name).read_text(errors="replace").splitlines()[-lines:]
            tails.append(f"--- {logs / name} ---\n" + "\n".join(text))
    return "\n".join(tails) or f"(no Ray logs under {logs})"


def stop() -> None:
    import ray

    try:
        serve.shutdown()
    finally:
        if ray.is_initialized():
            ray.shutdown()

"""The one typed configuration of s2t: defaults here, then a YAML file, then S2T_* environment, then flags.

Nested fields use `__` in the environment: S2T_WORKER__PORT=50052, S2T_SELECTOR__MODEL=/path/to/model.
Unknown keys are errors everywhere, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import enum
import os
import re
from pathlib import Path
from urllib.parse import urlparse
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

from .model_store import default_cache_dir

ModeName = Literal["greedy", "s2t", "s2t-local", "llm", "takeover"]
TriggerName = Literal["always", "entropy", "margin", "kl"]
VerifyPolicyName = Literal["wait", "commit_after_lag"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RuntimeSettings(_Section):
    """How a process runs its model: threads and weight formats (see s2t/weight_formats.py)."""

    threads: int = Field(0, ge=0, description="torch threads; 0 = all cores")
    weight_formats: str = Field(
        "auto",
        description="'auto' (measure on this machine at start-up), one format for every row count "
        "('bf16', 'fp32', 'fp32_packed', 'int8', 'int8_avx2', 'int8_vnni', 'int8_amx', 'native', or the 4-bit "
        "'int4_vnni', which "
        "'auto' never picks), or five comma-separated formats for calls of "
        "1, 2-4, 5-8, 9-16 and more rows",
    )
    huge_pages: bool = Field(
        True,
        description="on the CPU: keep the formatted weights in one mapping that Linux is asked to back with 2 MB "
        "pages (madvise; a decode step streams every weight, and 4 KB pages cost a TLB miss each 4 KB); the same "
        "numbers either way, and a no-op where transparent huge pages are off",
    )
    device: str = Field(
        "cpu",
        description="where the model runs: 'cpu', or 'cuda' / 'cuda:N' (an NVIDIA GPU; the selector only). On a GPU "
        "weight_formats 'auto' and 'bf16' mean bf16 weights, 'fp32' float32, 'native' the checkpoint's dtype; the "
        "int8/int4 formats are CPU kernels",
    )

    cuda_graphs: bool = Field(
        True,
        description="on a GPU: keep up to min(max_sessions, kv_budget_mb / cuda_graph_max_len tokens' keys and "
        "values) sessions' caches in one preallocated pool and run their forwards of up to 16 new tokens each, "
        "up to 64 sessions at once, as replays of captured CUDA graphs (s2t/cuda_graphs.py); other forwards, "
        "and sessions past the pool, run as before",
    )
    cuda_graph_max_len: int = Field(2048, ge=16, description="on a GPU with cuda_graphs: the tokens of context a "
                                    "pooled session has room for; a longer one moves to a cache of its own")
    cuda_graph_warmup: bool = Field(True, description="on a GPU with cuda_graphs: capture every graph a batch of "
                                    "up to max_batch_size sessions can use at start-up, instead of on each "
                                    "shape's first use (which delays that batch by a capture)")

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", v):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', not {v!r}")
        return v


class TriggerThresholds(_Section):
    """LLM-free trigger thresholds by target rate; a calibration file beside the models overrides these."""

    # Defaults for the embedded pair: `s2t calibrate --problems 32 --max-new-tokens 384` (GSM8K train 0..31,
    # 9012 steps of the 0.5B's greedy trajectories). Other models need their own calibration.
    entropy: dict[float, float] = Field({
        0.01: 1.901, 0.02: 1.67, 0.05: 1.249, 0.1: 0.8754, 0.15: 0.6638, 0.2: 0.4834,
        0.3: 0.1589, 0.5: 0.01088
    }, description="entropy of the SLM top-64 above which it fires, by rate")
    margin: dict[float, float] = Field({
        0.01: 0.03525, 0.02: 0.07039, 0.05: 0.1955, 0.1: 0.4053, 0.15: 0.6208, 0.2: 0.7807,
        0.3: 0.9487, 0.5: 0.998
    }, description="SLM top-1 minus top-2 probability below which it fires, by rate")


# RFC 6750's b64token: what an `authorization: Bearer <token>` header can carry unchanged.
_BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


def _bearer_token(token: SecretStr) -> SecretStr:
    """A token must fit in the header as it is; the error never shows the value (it is a secret)."""
    if not _BEARER_TOKEN.fullmatch(token.get_secret_value()):
        raise ValueError("a bearer token must be non-empty and consist of letters, digits and -._~+/ "
                         "(then any '='), RFC 6750; the value is not shown")
    return token


class ServerTlsSettings(_Section):
    """TLS on a gRPC server face: plaintext unless cert_file is set; client_ca_file adds mTLS."""

    cert_file: Path | None = Field(None, description="PEM certificate chain; with key_file, the face serves TLS instead of plaintext")
    key_file: Path | None = Field(None, description="PEM private key of cert_file")
    client_ca_file: Path | None = Field(None, description="PEM CA bundle; if set, clients must present a certificate signed by it (mTLS)")

    @model_validator(mode="after")
    def _complete(self) -> "ServerTlsSettings":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file are set together")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("client_ca_file (mTLS) needs cert_file and key_file")
        return self

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


class SelectorTlsSettings(ServerTlsSettings):
    """The selector's TLS. Only the --no-ray server can serve it: Ray Serve's gRPC proxy listens in plaintext
    (serve.config.gRPCOptions has no TLS fields), so on Ray Serve TLS ends in front of the proxy (a TLS-
    terminating load balancer, ingress or sidecar) and these stay unset (the app refuses to start otherwise)."""

    cert_file: Path | None = Field(None, description="--no-ray server only: PEM certificate chain; with key_file, TLS instead of plaintext. Ray Serve's gRPC proxy cannot serve TLS: terminate it in front of the proxy")
    key_file: Path | None = Field(None, description="--no-ray server only: PEM private key of cert_file")
    client_ca_file: Path | None = Field(None, description="--no-ray server only: PEM CA bundle; if set, workers must present a certificate signed by it (mTLS)")


class ClientTlsSettings(_Section):
    """TLS of a gRPC client: plaintext unless enabled."""

    enabled: bool = Field(False, description="connect over TLS (the settings below need it)")
    ca_file: Path | None = Field(None, description="PEM CA bundle that signed the server's certificate; unset: the system's roots")
    cert_file: Path | None = Field(None, description="PEM client certificate chain, for a server that requires mTLS")
    key_file: Path | None = Field(None, description="PEM private key of cert_file")
    server_name: str | None = Field(None, description="name the server's certificate is checked against, when it is not the host of the address")

    @model_validator(mode="after")
    def _complete(self) -> "ClientTlsSettings":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file are set together")
        if not self.enabled and any(v is not None for v in (self.ca_file, self.cert_file, self.server_name)):
            raise ValueError("ca_file, cert_file, key_file and server_name need enabled: true")
        return self


# What a worker may call itself in the selector's `worker-id` metadata (s2t/security.py): a metadata value
# that logs and quota messages can show as it is, bounded like the selector's other ids.
WORKER_ID_PATTERN = re.compile(r"[A-Za-z0-9._:@/+-]{1,128}")


class WorkerSettings(_Section):
    model: str = Field("qwen2.5-coder-0.5b-instruct", description="registry name or transformers directory")
    host: str = Field("127.0.0.1", description="address the client gRPC server binds")
    port: int = Field(50051, ge=0, le=65535, description="client gRPC port (0: pick a free one)")
    runtime: RuntimeSettings = RuntimeSettings()
    selector_address: str = Field("127.0.0.1:9000", description="host:port of the selector's gRPC endpoint")
    selector_application: str = Field("s2t-selector", description="Ray Serve application name (gRPC metadata)")
    selector_auth_token: SecretStr | None = Field(None, description="sent as 'authorization: Bearer <token>' on every selector RPC; one of the selector's selector.auth_tokens")
    selector_tls: ClientTlsSettings = ClientTlsSettings()
    worker_id: str | None = Field(None, description="this worker's name to the selector, sent as 'worker-id' metadata on every selector RPC: the key of the selector's selector.quota.* when it has no auth_tokens (with them, the token is the key); None = <hostname>-<pid>; letters, digits and ._:@/+-, at most 128")
    default_mode: ModeName = Field("s2t", description="mode of requests that name none: greedy, s2t, s2t-local, llm, takeover")
    num_candidates: int = Field(8, ge=1, le=64, description="K: SLM candidates per position sent to the selector")
    trigger: TriggerName = Field("kl", description="when a disagreement is corrected: kl (selector-side, paper), entropy / margin (LLM-free, worker-side), always")
    trigger_rate: float = Field(0.10, gt=0, le=1, description="target share of steps the trigger fires on (tau); mapped through the calibrated thresholds")
    warmup_steps: int = Field(3, ge=0, description="generation steps that never trigger (paper default 3)")
    block_size: int = Field(8, ge=1, description="drafted positions per selector request")
    max_block_size: int = Field(32, ge=1, description="largest block_size a request may ask for")
    max_inflight_blocks: int = Field(2, ge=1, description="1 = wait for each block; more = keep drafting")
    draft_confidence: float = Field(0.7, ge=0, lt=1, description="draft past unverified positions only while the odds that the selector accepts them all (learned from its replies) are at least this; 0 = always draft to the lookahead")
    draft_when_unsure: bool = Field(False, description="when the odds fall below draft_confidence, keep drafting to the lookahead instead of pausing: the unsure block goes to the selector at once and the drafts after it are held back until its verdict, so the selector never scores drafts that a rejection throws away; for a worker whose selector runs on other compute, where its core would otherwise idle while it waits (modes s2t and takeover; the local re-ranker shares the worker's compute)")
    branch_when_unsure: bool = Field(False, description="with draft_when_unsure (modes s2t and takeover): while the blocks in flight are unsure, also draft the continuation after the selector's likeliest other pick (the SLM's second candidate at their likeliest divergence; max_branches of them), as an extra row of the same forwards (a few rows cost about one: the weights are read once), and continue from it when the selector picks that candidate instead of drafting again; the drafts are bit for bit what drafting after the verdict gives where the weight format is batch-invariant (int8_vnni)")
    max_branches: int = Field(1, ge=1, le=4, description="with branch_when_unsure: how many branches a sequence drafts at once, each one more row of its forwards: the verifier's likeliest other picks in flight (the odds that it diverges there, times the odds of that candidate's rank, both learned from its verdicts)")
    selector_prefill: bool = Field(True, description="send each s2t request's prompt to the selector as soon as the request starts (a Select without positions), so the selector computes it while the SLM drafts the first block; only to selectors that take prefills")
    verify_policy: VerifyPolicyName = Field("wait", description="when the selector is slow: wait (up to verify_deadline_ms) or commit_after_lag")
    verify_deadline_ms: int = Field(30_000, ge=1, description="wait policy: how long a block may stay unverified")
    commit_lag_ms: int = Field(2_000, ge=1, description="commit_after_lag policy: age at which drafts commit")
    select_timeout_ms: int = Field(120_000, ge=1, description="cap on one selector RPC attempt; an attempt lasts until the request's verify deadline unless this ends it first (a resend then joins the step the selector is still computing)")
    selector_calls_per_s: float = Field(0.0, ge=0, description="selector call budget (asyncio-throttle); 0 = none")
    breaker_failures: int = Field(3, ge=1, description="consecutive connection failures (UNAVAILABLE) that open the selector breaker; a busy or slow selector (RESOURCE_EXHAUSTED, a slow attempt) never counts")
    breaker_open_s: float = Field(10.0, gt=0, description="how long an open breaker skips the selector before one probe call")
    decode_chunk: int = Field(16, ge=1, description="llm mode: tokens per Decode call")
    max_new_tokens: int = Field(512, ge=1, description="default when a request sets none")
    max_new_tokens_limit: int = Field(4096, ge=1, description="largest max_new_tokens a request may ask for")
    max_prompt_tokens: int = Field(4096, ge=1, description="longer prompts are INVALID_ARGUMENT")
    max_batch_size: int = Field(64, ge=1, description="sequences per SLM forward")
    max_concurrent_requests: int = Field(256, ge=1, description="above this, RESOURCE_EXHAUSTED")
    requests_per_s: float = Field(0.0, ge=0, description="admission rate limit; 0 = none")
    auth_token: SecretStr | None = Field(None, description="if set, clients must send 'authorization: Bearer <token>'")
    tls: ServerTlsSettings = ServerTlsSettings()
    shutdown_grace_s: float = Field(25.0, ge=0, description="on SIGTERM / SIGINT: refuse new calls (health checks too), let running requests finish for up to this long, then cancel them; keep it below the orchestrator's kill deadline (Kubernetes: terminationGracePeriodSeconds, 30 s by default)")
    adapter_dir: Path | None = Field(None, description="S2T-Local adapters: an adapter directory, or a directory of them whose newest is loaded; watched, so a newer one is taken while serving")
    adapter_poll_s: float = Field(5.0, gt=0, description="how often adapter_dir is checked for a newer adapter")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Prometheus /metrics HTTP port (s2t_worker_*); None = no endpoint, 0 = pick a free one")
    metrics_host: str = Field("127.0.0.1", description="address the /metrics endpoint binds")
    thresholds: TriggerThresholds = TriggerThresholds()
    system_prompt: str = Field((
        "You are a helpful assistant. Please answer the math problem step by step, and put the final answer "
        "in the format \\boxed{answer}."
    ), description="system message of the chat template")

    @field_validator("selector_address")
    @classmethod
    def _has_port(cls, v: str) -> str:
        if ":" not in v:
            raise ValueError("selector_address must be host:port")
        return v

    @field_validator("selector_auth_token")
    @classmethod
    def _selector_token(cls, v: SecretStr | None) -> SecretStr | None:
        return None if v is None else _bearer_token(v)

    @field_validator("worker_id")
    @classmethod
    def _worker_id(cls, v: str | None) -> str | None:
        if v is not None and not WORKER_ID_PATTERN.fullmatch(v):
            raise ValueError("worker_id must be 1 to 128 letters, digits or ._:@/+-")
        return v

    @field_validator("runtime")
    @classmethod
    def _worker_on_cpu(cls, v: RuntimeSettings) -> RuntimeSettings:
        # The worker's draft steps, S2T-Local's tree scoring and its adapters' training are CPU code (kernels,
        # tensors built on the host); only the selector's forwards run on a GPU.
        if v.device != "cpu":
            raise ValueError(f"device {v.device!r}: the worker runs on the CPU only (selector.runtime.device may be a GPU)")
        return v


class QuotaSettings(_Section):
    """Per-worker quotas of one selector replica (llm_selector/quotas.py), so one worker cannot starve the
    others; None = unlimited. A worker is its bearer token when selector.auth_tokens is set, else the
    'worker-id' it sends (worker.worker_id), else its host. Over a quota the selector answers
    RESOURCE_EXHAUSTED with a retry-after-ms hint, which the worker treats as busy."""

    positions_per_s: float | None = Field(None, gt=0, description="positions a worker may have scored per second (Select: its positions; Decode: max_tokens), a token bucket checked when a request's turn comes")
    positions_burst: float | None = Field(None, gt=0, description="the bucket's size in positions (what an idle worker may send at once); None = 2 s worth of positions_per_s")
    max_sessions: int | None = Field(None, ge=1, description="sessions a worker may hold open; a new one beyond is refused until one closes or idles out (session_idle_ttl_s)")
    max_kv_bytes: int | None = Field(None, ge=1, description="KV cache bytes a worker's sessions may hold; after each batch the worker's own least recently used idle sessions are evicted down to it (never its most recent one, never another worker's)")

    @model_validator(mode="after")
    def _burst_needs_rate(self) -> "QuotaSettings":
        if self.positions_burst is not None and self.positions_per_s is None:
            raise ValueError("positions_burst needs positions_per_s")
        return self


class SelectorSettings(_Section):
    model: str = Field("qwen2.5-coder-1.5b-instruct", description="registry name or transformers directory")
    host: str = Field("127.0.0.1", description="address Ray Serve's proxies bind")
    grpc_port: int = Field(9000, ge=0, le=65535, description="selector gRPC port (Serve gRPC proxy or --no-ray server)")
    http_port: int = Field(8123, ge=0, le=65535, description="Ray Serve's HTTP proxy (required by Serve)")
    application: str = Field("s2t-selector", description="Ray Serve application name")
    auth_tokens: list[SecretStr] = Field(default_factory=list, description="bearer tokens accepted from workers ('authorization: Bearer <token>'), one per worker so each can be rotated or revoked; checked by the Ray Serve deployment and the --no-ray server alike; empty: no authentication. Environment: a JSON list")
    tls: SelectorTlsSettings = SelectorTlsSettings()
    shutdown_grace_s: float = Field(25.0, ge=0, description="--no-ray server, on SIGTERM / SIGINT: refuse new calls (health checks too), let running ones finish for up to this long, then close the selection log's open segment (Ray Serve replicas: the deployment's graceful_shutdown_timeout_s)")
    runtime: RuntimeSettings = RuntimeSettings()
    num_replicas: int = Field(1, ge=1, description="selector replicas (sessions are routed by id)")
    replica_num_cpus: float = Field(0.0, ge=0, description="Ray CPUs reserved per replica (0: don't reserve)")
    max_candidates: int = Field(16, ge=1, le=256, description="largest K accepted")
    max_positions: int = Field(64, ge=1, description="most positions in one Select")
    max_context_tokens: int = Field(8192, ge=1, description="longest session context")
    max_decode_tokens: int = Field(64, ge=1, description="most tokens one Decode call generates")
    max_sessions: int = Field(512, ge=1, description="session caches kept (LRU beyond)")
    session_idle_ttl_s: float = Field(600.0, gt=0, description="idle sessions are dropped after this")
    kv_budget_mb: int = Field(4096, ge=1, description="KV cache memory for all sessions; LRU beyond it")
    reply_cache_steps: int = Field(16, ge=1, description="replies kept per session for idempotent retries")
    step_gap_wait_s: float = Field(1.0, ge=0, description="how long a request waits for an earlier step")
    max_batch_size: int = Field(32, ge=1, description="sessions per LLM forward (requests that arrive while one runs join the next)")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="at most how long an idle selector waits, before a batch, for the sessions it served in its last busy spell to send their next requests (not at all once they have, or for other sessions)")
    max_queued_requests: int = Field(256, ge=1, description="per replica: requests waiting for a batch beyond which the selector answers RESOURCE_EXHAUSTED with a retry-after-ms hint (back-pressure)")
    max_ongoing_requests: int = Field(512, ge=1, description="per replica, Ray Serve back-pressure")
    quota: QuotaSettings = QuotaSettings()
    # Defaults for the embedded pair, from the same calibration run as TriggerThresholds.
    kl_thresholds: dict[float, float] = Field(
        default_factory=lambda: {
            0.01: 2.556, 0.02: 1.752, 0.05: 0.9762,
            0.1: 0.5128, 0.15: 0.2915, 0.2: 0.1638, 0.3: 0.04619, 0.5: 0.002485},
        description="KL trigger thresholds by rate; a calibration file overrides these")
    log_dir: Path | None = Field(None, description="selection log segments; default <data dir>/selection-logs")
    log_enabled: bool = Field(True, description="write the selection log")
    log_segment_records: int = Field(50_000, ge=1, description="records per log segment")
    log_segment_seconds: float = Field(300.0, gt=0, description="a segment closes after this long")
    log_fsync_every: int = Field(256, ge=1, description="records between fsyncs of the open segment")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="--no-ray server: Prometheus /metrics HTTP port (s2t_selector_*); None = no endpoint, 0 = pick a free one. On Ray Serve the metrics go through Ray's exporter instead")
    metrics_host: str = Field("127.0.0.1", description="--no-ray server: address the /metrics endpoint binds")

    @field_validator("auth_tokens")
    @classmethod
    def _tokens(cls, v: list[SecretStr]) -> list[SecretStr]:
        return [_bearer_token(t) for t in v]


class TracingExporter(enum.Enum):
    """Where a process sends its spans (s2t/tracing.py)."""

    OTLP = "otlp"  # OTLP over gRPC to tracing.otlp_endpoint (a collector, Jaeger, Tempo, ...)
    CONSOLE = "console"  # one JSON object per span on stdout
    FILE = "file"  # one JSON object per line, appended to tracing.file_path: spans without a collector


class TracingSettings(_Section):
    """OpenTelemetry spans across client -> worker -> selector (s2t/tracing.py). Off by default, and off it
    costs nothing: no provider, no interceptors, not even an import of OpenTelemetry."""

    enabled: bool = Field(False, description="record spans: the worker's Generate calls, its selector calls, and the selector's side of them (the --no-ray server and the Ray Serve replica alike)")
    exporter: TracingExporter = Field(TracingExporter.OTLP, description="where spans go: otlp (OTLP over gRPC to otlp_endpoint), console (JSON on stdout) or file (JSON lines appended to file_path)")
    otlp_endpoint: str = Field("http://localhost:4317", description="exporter otlp: the collector's gRPC endpoint; https:// connects over TLS. Headers (e.g. a collector token) come from OTEL_EXPORTER_OTLP_HEADERS")
    file_path: Path | None = Field(None, description="exporter file: the JSON-lines file (made absolute when the settings load, so a Ray Serve replica writes to the same path); several processes may share it")
    service_name: str = Field("s2t", min_length=1, description="service.name prefix; the role is appended (s2t-worker and s2t-selector by default)")
    sample_ratio: float = Field(1.0, ge=0, le=1, description="share of new traces recorded; a call that arrives with a traceparent follows its caller's decision (parent-based)")

    @field_validator("otlp_endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        url = urlparse(v)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise ValueError("otlp_endpoint must be http://host:port (plaintext) or https://host:port (TLS)")
        return v

    @field_validator("file_path")
    @classmethod
    def _absolute(cls, v: Path | None) -> Path | None:
        return None if v is None else v.expanduser().absolute()

    @model_validator(mode="after")
    def _file_needs_path(self) -> "TracingSettings":
        if self.exporter is TracingExporter.FILE and self.file_path is None:
            raise ValueError("exporter file needs file_path")
        return self


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "s2t"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="S2T_", env_nested_delimiter="__", extra="forbid",
                                      validate_assignment=True)

    cache_dir: Path = Field(default_factory=default_cache_dir, description="model cache (XDG_CACHE_HOME/s2t/models)")
    data_dir: Path = Field(default_factory=default_data_dir, description="logs and results (XDG_DATA_HOME/s2t)")
    worker: WorkerSettings = WorkerSettings()
    selector: SelectorSettings = SelectorSettings()
    tracing: TracingSettings = TracingSettings()

    # Set by load_settings(); pydantic-settings reads the YAML source from here.
    _yaml_file: ClassVar[Path | None] = None

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource):
        sources = [init_settings, env_settings]
        if cls._yaml_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=cls._yaml_file))
        return tuple(sources)

    def calibration_file(self) -> Path:
        return self.cache_dir / "calibration" / f"{_slug(self.worker.model)}__{_slug(self.selector.model)}.json"

    def selection_log_dir(self) -> Path:
        return self.selector.log_dir or self.data_dir / "selection-logs"


class ConfigError(ValueError):
    """A setting has a bad value: one line per problem, naming the key, the value and where it came from."""


def _source(key: str, overrides: dict[str, Any], config_file: Path | str | None) -> str:
    # A section's own check (e.g. worker.tls) blames the keys set below it, so a prefix match counts too.
    given = [k for k in overrides if k == key or k.startswith(key + ".")]
    if given:
        return ", ".join(f"--set {k}" for k in given)
    env = "S2T_" + key.upper().replace(".", "__")
    named = [k for k in os.environ if k == env or k.startswith(env + "__")]
    if named:
        return ", ".join(f"environment variable {k}" for k in named)
    if config_file:
        return f"config file {config_file}"
    return "defaults"


def _slug(spec: str) -> str:
    return Path(spec).name or spec


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Build the settings: flags (overrides) > S2T_* env > YAML (config_file or $S2T_CONFIG) > defaults."""
    path = config_file or os.environ.get("S2T_CONFIG")
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    Settings._yaml_file = Path(path) if path else None
    try:
        return Settings(**_nest(overrides))
    except ValidationError as e:  # one clear line per bad key instead of a traceback
        lines = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            value = err.get("input")
            shown = "***" if "token" in key or "secret" in key else repr(value)
            lines.append(f"bad setting {key} = {shown} (from {_source(key, overrides, path)}): {err['msg']}")
        raise ConfigError("\n".join(lines)) from None
    finally:
        Settings._yaml_file = None


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{'worker.port': 1} -> {'worker': {'port': 1}}; None values are dropped (flag not given)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if value is None:
            continue
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def reference_markdown() -> str:
    """The configuration reference in the README (tests/test_readme.py keeps the two equal)."""
    lines = ["| key (env: `S2T_` + upper case, `__` between levels) | default | meaning |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
                continue
            default = field.get_default(call_default_factory=True)
            if isinstance(default, Path):
                shown = "XDG default"
            elif isinstance(default, dict):
                shown = "calibrated table" if default else "{}"
            elif isinstance(default, enum.Enum):
                shown = f"`{default.value!r}`"
            elif isinstance(default, str) and len(default) > 40:
                shown = "see config.py"
            else:
                shown = f"`{default!r}`"
            lines.append(f"| `{prefix}{name}` | {shown} | {field.description or ''} |")

    walk(Settings, "")
    return "\n".join(lines) + "\n"

"""Per-worker quotas on the selector (llm_selector/quotas.py): the token bucket and who a worker is, exactly on
a fake clock; the core refusing (or evicting for) one worker while serving another; a worker over its quota
busy, not down, deciding its positions locally."""

from __future__ import annotations

import os
import time

import grpc
import pytest
from pydantic import SecretStr

from llm_selector.core import SelectorCore, SelectorError
from llm_selector.grpc_server import serve as serve_selector
from llm_selector.metrics import QuotaKind
from llm_selector.quotas import (BURST_SECONDS, LOCAL_CALLER, SESSION_QUOTA_RETRY_MS, IdentitySource, TokenBucket,
                                 WorkerIdentity, WorkerQuotas, peer_host, worker_identity)
from s2t.config import ConfigError, QuotaSettings
from s2t.runtime import Engine, load_model
from s2t.security import BearerTokens, default_worker_id
from s2t.stack import LocalStack
from s2t.v1 import generation_pb2 as gen_pb
from s2t.v1 import selector_pb2 as pb
from slm_worker.selector_client import BreakerState, SelectorBusy, SelectorClient, SelectorState

A = WorkerIdentity(IdentitySource.WORKER_ID, "A")
B = WorkerIdentity(IdentitySource.WORKER_ID, "B")
POSITIONS = QuotaKind.POSITIONS_PER_S.setting


class FakeClock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- the token bucket ------------------------------------------------------------------------------------------


def test_token_bucket_refills_at_its_rate_up_to_its_burst_and_lets_a_large_take_through_into_debt():
    bucket = TokenBucket(rate=2.0, burst=4.0, now=0.0)
    assert bucket.take(3, now=0.0) == 0.0 and bucket.level(0.0) == 1.0
    assert bucket.take(3, now=0.0) == 1.0  # (3 - 1) / 2 s; nothing taken
    assert bucket.take(3, now=0.5) == 0.5 and bucket.level(0.5) == 2.0
    assert bucket.take(3, now=1.0) == 0.0 and bucket.level(1.0) == 0.0
    assert bucket.level(100.0) == 4.0 and bucket.full(100.0)  # never above the burst
    # larger than the bucket: it needs a full bucket (not 10), then leaves the bucket 6 in debt
    assert bucket.take(10, now=3.0) == 0.0 and bucket.level(3.0) == -6.0
    assert bucket.take(1, now=5.0) == 1.5  # level -2 at 5 s: (1 - -2) / 2
    assert bucket.take(1, now=6.5) == 0.0 and bucket.level(6.5) == 0.0


def test_worker_quotas_keep_a_bucket_per_worker_and_count_refusals_per_worker():
    clock = FakeClock()
    quotas = WorkerQuotas(QuotaSettings(positions_per_s=2.0, positions_burst=4.0), clock=clock)
    assert quotas.charge_positions(A, 4) is None
    refusal = quotas.charge_positions(A, 2)
    assert (refusal.kind, refusal.worker, refusal.limit, refusal.retry_after_ms) == (QuotaKind.POSITIONS_PER_S, A,
                                                                                     2.0, 1000)
    assert quotas.charge_positions(B, 4) is None  # B has a bucket of its own
    clock.now += 1.0
    assert quotas.charge_positions(A, 2) is None
    assert quotas.refusals(A) == {QuotaKind.POSITIONS_PER_S: 1} and quotas.refusals(B) == {}
    # unset burst: BURST_SECONDS of the rate; unset rate: unlimited
    assert WorkerQuotas(QuotaSettings(positions_per_s=3.0)).burst == BURST_SECONDS * 3.0
    assert WorkerQuotas(QuotaSettings()).charge_positions(A, 10 ** 9) is None


def test_quota_settings_are_checked():
    with pytest.raises(ValueError, match="positions_burst needs positions_per_s"):
        QuotaSettings(positions_burst=4)
    with pytest.raises(ValueError):
        QuotaSettings(positions_per_s=0)


def test_worker_id_setting_is_checked_and_defaults_to_host_and_pid(make_settings):
    assert make_settings(**{"worker.worker_id": "gpu-7.example:w2"}).worker.worker_id == "gpu-7.example:w2"
    with pytest.raises(ConfigError, match="worker.worker_id"):
        make_settings(**{"worker.worker_id": "two words"})
    assert default_worker_id().endswith(f"-{os.getpid()}")


# -- who a worker is -------------------------------------------------------------------------------------------


def test_peer_host_drops_the_port():
    assert peer_host("ipv4:10.0.0.5:53211") == "10.0.0.5"
    assert peer_host("ipv6:[::1]:53211") == "[::1]"
    assert peer_host("ipv6:%5B::1%5D:53211") == "%5B::1%5D"
    assert peer_host("unix:/run/s2t.sock") == "unix:/run/s2t.sock"


def test_worker_identity_prefers_the_token_then_the_worker_id_then_the_peer():
    tokens = BearerTokens.from_secrets([SecretStr("tok-a"), SecretStr("tok-b")], "selector")
    with_token = [("authorization", "Bearer tok-b"), ("worker-id", "w1")]
    identity = worker_identity(with_token, "ipv4:10.0.0.5:1", tokens)
    assert identity == WorkerIdentity(IdentitySource.TOKEN, "1")
    assert "tok-b" not in str(identity) and "selector.auth_tokens[1]" in str(identity)
    assert tokens.accepted_index([("authorization", "Bearer tok-a")]) == 0
    assert tokens.accepted_index([("authorization", "Bearer other")]) is None
    # no tokens configured: the worker's own name, else its host
    assert worker_identity(with_token, "ipv4:10.0.0.5:1", BearerTokens([], "selector")) == \
        WorkerIdentity(IdentitySource.WORKER_ID, "w1")
    assert worker_identity([("worker-id", "w1")], "ipv4:10.0.0.5:1") == WorkerIdentity(IdentitySource.WORKER_ID, "w1")
    for bad in ("two words", "x" * 129, ""):  # not a valid worker-id: ignored
        assert worker_identity([("worker-id", bad)], "ipv4:10.0.0.5:1") == \
            WorkerIdentity(IdentitySource.PEER, "10.0.0.5")
    assert worker_identity([], None) == LOCAL_CALLER


# -- the core: one worker refused, the other served -------------------------------------------------------------


@pytest.fixture
def make_core(make_settings, tiny_pair):
    engine = Engine(load_model(str(tiny_pair[1]), tiny_pair[1].parent, "native"))

    def make(clock: FakeClock | None = None, **quota) -> SelectorCore:
        settings = make_settings(**{"selector.log_enabled": False,
                                    **{f"selector.quota.{k}": v for k, v in quota.items()}})
        core = SelectorCore(engine, settings.selector)
        if clock is not None:
            core.quotas = WorkerQuotas(settings.selector.quota, clock=clock)
        return core

    return make


def select(session: str, positions: int = 1, step: int = 0, prefix_length: int = 0) -> pb.SelectRequest:
    tokens = [5, 6, 7, 8]
    end = prefix_length + len(tokens)
    return pb.SelectRequest(
        session_id=session, step=step, prefix_length=prefix_length, token_ids=tokens,
        positions=[pb.CandidatePosition(position=p, candidate_ids=[1, 2, 3])
                   for p in range(end - positions + 1, end + 1)],
        trigger=pb.SelectTriggerSpec(kind=pb.SELECT_TRIGGER_ALWAYS))


def metric(core: SelectorCore, name: str, **labels) -> float:
    return core.metrics.backend.registry.get_sample_value(name, labels) or 0.0


async def test_a_worker_over_its_positions_quota_is_refused_with_a_hint_while_another_is_served(make_core):
    clock = FakeClock()
    core = make_core(clock, positions_per_s=1.0, positions_burst=2.0)
    first = await core.handle(select("a0", positions=2), "select", A)
    with pytest.raises(SelectorError) as refused:
        await core.handle(select("a1"), "select", A)
    e = refused.value
    assert (e.code, e.retry_after_ms, e.quota) == (grpc.StatusCode.RESOURCE_EXHAUSTED, 1000,
                                                   QuotaKind.POSITIONS_PER_S)
    assert e.trailing_metadata() == (("retry-after-ms", "1000"), ("quota-exceeded", POSITIONS))
    assert POSITIONS in e.message and "worker-id 'A'" in e.message and "retry-after-ms=1000" in e.message
    assert len((await core.handle(select("b0", positions=2), "select", B)).selections) == 2  # B is served
    assert await core.handle(select("a0", positions=2), "select", A) == first  # a replay costs nothing
    clock.now += 1.0  # the hint has passed: A's resend of the refused step is served
    assert len((await core.handle(select("a1"), "select", A)).selections) == 1
    assert core.counters["quota_rejections"] == 1 and core.counters["replayed"] == 1
    assert core.quotas.refusals(A) == {QuotaKind.POSITIONS_PER_S: 1} and core.quotas.refusals(B) == {}
    assert metric(core, "s2t_selector_quota_rejections_total", quota="positions_per_s") == 1
    assert metric(core, "s2t_selector_requests_total", method="select", outcome="resource_exhausted") == 1
    assert metric(core, "s2t_selector_requests_total", method="select", outcome="ok") == 4


async def test_decode_is_charged_its_max_tokens(make_core):
    clock = FakeClock()
    core = make_core(clock, positions_per_s=1.0, positions_burst=2.0)
    decode = pb.DecodeRequest(session_id="d", step=0, token_ids=[5, 6], max_tokens=3)
    await core.handle(decode, "decode", A)  # a full bucket lets 3 through: 1 in debt
    with pytest.raises(SelectorError) as refused:
        await core.handle(pb.DecodeRequest(session_id="e", step=0, token_ids=[5], max_tokens=1), "decode", A)
    assert refused.value.retry_after_ms == 2000  # (1 - -1) / 1 s


async def test_a_worker_at_its_sessions_quota_cannot_open_another_until_one_closes(make_core):
    core = make_core(max_sessions=2)
    await core.handle(select("a0"), "select", A)
    await core.handle(select("a1"), "select", A)
    with pytest.raises(SelectorError) as refused:
        await core.handle(select("a2"), "select", A)
    e = refused.value
    assert (e.code, e.retry_after_ms, e.quota) == (grpc.StatusCode.RESOURCE_EXHAUSTED, SESSION_QUOTA_RETRY_MS,
                                                   QuotaKind.MAX_SESSIONS)
    assert "selector.quota.max_sessions = 2 (it holds 2 sessions)" in e.message and "worker-id 'A'" in e.message
    assert "a2" not in core.sessions
    await core.handle(select("b0"), "select", B)  # B's sessions are its own
    await core.handle(select("a1", step=1, prefix_length=4), "select", A)  # A's open sessions go on
    core.close_session("a0")
    await core.handle(select("a2"), "select", A)
    assert [s.id for s in core.sessions] == ["b0", "a1", "a2"]
    assert core.quotas.refusals(A) == {QuotaKind.MAX_SESSIONS: 1}
    assert metric(core, "s2t_selector_quota_rejections_total", quota="max_sessions") == 1


async def test_a_worker_over_its_kv_quota_loses_its_own_least_recently_used_sessions(make_core):
    probe = make_core()
    await probe.handle(select("x"), "select")
    (session_bytes,) = [s.cache.nbytes for s in probe.sessions]  # every small session holds the same capacity
    core = make_core(max_kv_bytes=2 * session_bytes)
    await core.handle(select("b0"), "select", B)  # the oldest session of all, but B's
    await core.handle(select("a0"), "select", A)
    await core.handle(select("a1"), "select", A)
    assert core.counters["quota_evictions"] == 0  # A holds 2 sessions' worth: at the quota, not over it
    await core.handle(select("a2"), "select", A)
    assert [s.id for s in core.sessions] == ["b0", "a1", "a2"]  # A's oldest went, not B's
    assert core.counters["quota_evictions"] == 1 and core.sessions.evictions == 0
    assert metric(core, "s2t_selector_quota_evictions_total", quota="max_kv_bytes") == 1
    assert metric(core, "s2t_selector_kv_bytes") == 3 * session_bytes
    with pytest.raises(SelectorError) as lost:  # A comes back to the evicted session: it resyncs
        await core.handle(select("a0", step=1, prefix_length=4), "select", A)
    assert lost.value.code == grpc.StatusCode.FAILED_PRECONDITION

    # a single session over the quota stays (evicting the one in use would only cost a resend of it in full)
    small = make_core(max_kv_bytes=session_bytes // 2)
    await small.handle(select("a0"), "select", A)
    assert [s.id for s in small.sessions] == ["a0"]
    await small.handle(select("a1"), "select", A)
    assert [s.id for s in small.sessions] == ["a1"]


# -- over the wire: the identity, and the worker's side ---------------------------------------------------------


async def test_quotas_follow_the_bearer_token_and_the_client_treats_a_refusal_as_busy(make_settings, tiny_pair):
    settings = make_settings(**{"selector.log_enabled": False, "selector.auth_tokens": ["tok-a", "tok-b"],
                                "selector.quota.positions_per_s": 0.01, "selector.quota.positions_burst": 2})
    core = SelectorCore(Engine(load_model(str(tiny_pair[1]), tiny_pair[1].parent, "native")), settings.selector)
    server, port = await serve_selector(core, "127.0.0.1", 0)

    def client(token: str, worker_id: str) -> SelectorClient:
        return SelectorClient(f"127.0.0.1:{port}", auth_token=SecretStr(token), worker_id=worker_id)

    x, y, z = client("tok-b", "x"), client("tok-b", "y"), client("tok-a", "x")
    try:
        assert len((await x.select(select("x0", positions=2), deadline=_far())).selections) == 2
        with pytest.raises(SelectorBusy) as busy:  # another worker-id, the same token: the same quota
            await y.select(select("y0"), deadline=_far())
        assert "selector.auth_tokens[1]" in str(busy.value) and "tok-b" not in str(busy.value)
        # 1 position at 0.01/s (less what refilled since x's call): beyond the deadline, so no wait
        assert 99.0 < busy.value.retry_after_s <= 100.0
        assert (y.counters.resource_exhausted, y.counters.quota_refusals) == (1, 1)
        assert y.breaker.state is BreakerState.CLOSED and y.state is SelectorState.BUSY  # busy, not down
        assert len((await z.select(select("z0", positions=2), deadline=_far())).selections) == 2  # token 0
        assert core.quotas.refusals(WorkerIdentity(IdentitySource.TOKEN, "1")) == {QuotaKind.POSITIONS_PER_S: 1}
    finally:
        for c in (x, y, z):
            await c.close()
        await server.stop(0)
        core.close()


class FakeServeContext:
    """What a Ray Serve replica gets as grpc_context (RayServegRPCContext), without Ray."""

    def __init__(self, metadata: list[tuple[str, str]], peer: str):
        self.metadata, self._peer = metadata, peer
        self.code, self.details, self.trailing = grpc.StatusCode.OK, "", []

    def invocation_metadata(self):
        return self.metadata

    def peer(self) -> str:
        return self._peer

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details

    def set_trailing_metadata(self, metadata):
        self.trailing = metadata


async def test_the_serve_deployment_keys_quotas_on_the_same_identity(make_core):
    from llm_selector import serve_app  # imports Ray's modules; starts nothing

    deployment = object.__new__(serve_app.SelectorDeployment.func_or_class)  # no replica: no model loading
    deployment.tokens = BearerTokens.from_secrets([SecretStr("tok-a"), SecretStr("tok-b")], "selector")
    deployment.core = make_core(max_sessions=1)
    ok = FakeServeContext([("authorization", "Bearer tok-b"), ("worker-id", "x")], "ipv4:10.0.0.5:4000")
    assert len((await deployment.Select(select("s0"), ok)).selections) == 1 and ok.code == grpc.StatusCode.OK
    other_id = FakeServeContext([("authorization", "Bearer tok-b"), ("worker-id", "y")], "ipv4:10.0.0.6:4000")
    assert await deployment.Select(select("s1"), other_id) == pb.SelectResponse()  # the same token: 1 session held
    assert other_id.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "selector.auth_tokens[1]" in other_id.details
    assert other_id.trailing == [("retry-after-ms", str(SESSION_QUOTA_RETRY_MS)),
                                 ("quota-exceeded", QuotaKind.MAX_SESSIONS.setting)]
    token_a = FakeServeContext([("authorization", "Bearer tok-a")], "ipv4:10.0.0.6:4000")
    assert len((await deployment.Select(select("s2"), token_a)).selections) == 1
    deployment.core.close()  # idempotent: __del__ closes it again


def _far() -> float:
    return time.monotonic() + 30.0


async def test_a_worker_over_its_positions_quota_completes_deciding_positions_locally(make_settings):
    settings = make_settings(**{"selector.log_enabled": False, "worker.worker_id": "w-quota",
                                "worker.max_inflight_blocks": 1,
                                # 4 positions at once, then one every 100 s: the first block only
                                "selector.quota.positions_per_s": 0.01, "selector.quota.positions_burst": 4})
    async with LocalStack(settings, fetch=False, ray=False, say=lambda m: None) as stack:
        reply = await stack.stub.Generate(gen_pb.GenerateRequest(
            prompt="What is 2 + 3?", options=gen_pb.GenerationOptions(mode=gen_pb.MODE_S2T, max_new_tokens=16,
                                                                      block_size=4)))
        client, core = stack.worker.selector, stack.selector_core
        refused = core.quotas.refusals(WorkerIdentity(IdentitySource.WORKER_ID, "w-quota"))
        rejections = core.counters["quota_rejections"]
    st = reply.stats
    assert reply.finish_reason in (gen_pb.FINISH_REASON_LENGTH, gen_pb.FINISH_REASON_STOP)
    assert st.mode_used == gen_pb.MODE_S2T and st.verified_tokens > 0  # the first block was verified
    assert st.unverified_tokens > 0  # the rest decided by the SLM while over the quota, and counted
    assert st.verified_tokens + st.unverified_tokens + st.local_decisions == st.completion_tokens
    assert POSITIONS in st.degraded_reason and "worker-id 'w-quota'" in st.degraded_reason
    assert st.selector_failures == rejections == refused[QuotaKind.POSITIONS_PER_S] > 0
    assert client.counters.quota_refusals == rejections and client.counters.busy_past_deadline == rejections
    assert client.breaker.state is BreakerState.CLOSED

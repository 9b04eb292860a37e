"""Prometheus metrics of the worker (`s2t_worker_*`) and the selector (`s2t_selector_*`), scraped over HTTP from
an in-process stack on the tiny pair and compared exactly with the stats the clients got; the JSON log format."""

import asyncio
import io
import json
import logging
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from llm_selector.core import SelectorCore, SelectorError
from llm_selector.metrics import SelectorMetrics
from s2t.cli import JsonLogFormatter, log_handler
from s2t.runtime import Engine, load_model
from s2t.stack import LocalStack
from s2t.v1 import generation_pb2 as pb
from s2t.v1 import selector_pb2 as sel_pb
from servers import Stack
from slm_worker.metrics import FallbackReason, fallback_reasons

PROMPT = "What is 2 + 3?"

Samples = dict[tuple[str, frozenset], float]


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.headers.get_content_type() == "text/plain"
        return parse(reply.read().decode())


def value(samples: Samples, name: str, **labels) -> float:
    """A sample's value; a labelled series that was never touched does not exist, which reads as 0 here."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str) -> float:
    """The sum over every label set of `name` (which must exist)."""
    found = [v for (n, _), v in samples.items() if n == name]
    assert found, f"no samples of {name}"
    return sum(found)


async def settle(stack_worker, core: SelectorCore | None) -> None:
    """Wait until the worker has closed every selector session and released every request (both happen just
    after the responses went out)."""
    for _ in range(200):
        if stack_worker.active == 0 and (core is None or len(core.sessions) == 0):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the worker did not release its requests and sessions")


def metrics_settings(make_settings, **overrides):
    return make_settings(**{"worker.metrics_port": 0, "selector.metrics_port": 0, "selector.log_enabled": False,
                            # one block in flight: every block the selector scores is one the worker applies,
                            # so the two sides' position and divergence counts must agree exactly
                            "worker.max_inflight_blocks": 1, **overrides})


async def test_counters_equal_the_sums_of_the_responses_stats(make_settings):
    async with LocalStack(metrics_settings(make_settings), fetch=False, ray=False, say=lambda m: None) as stack:
        def ask(mode, **options):
            return stack.stub.Generate(pb.GenerateRequest(prompt=PROMPT, options=pb.GenerationOptions(
                mode=mode, **options)))

        greedy = await ask(pb.MODE_GREEDY, max_new_tokens=12)
        s2t = [await ask(pb.MODE_S2T, max_new_tokens=20, block_size=4),
               await ask(pb.MODE_S2T, max_new_tokens=16, block_size=3)]
        streamed = None
        async for msg in stack.stub.GenerateStream(pb.GenerateStreamRequest(
                prompt=PROMPT, options=pb.GenerationOptions(mode=pb.MODE_LLM, max_new_tokens=10))):
            if msg.HasField("final"):
                streamed = msg.final
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stack.stub.Generate(pb.GenerateRequest(prompt="  "))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        await settle(stack.worker, stack.selector_core)
        worker = await asyncio.to_thread(scrape, stack.worker.metrics.http_port)
        selector = await asyncio.to_thread(scrape, stack.selector_core.metrics.http_port)
        core_counters = dict(stack.selector_core.counters)

    llm = streamed
    finals = [greedy, *s2t, llm]
    assert all(f.stats.degraded_reason == "" for f in finals)
    assert sum(f.stats.picks_changed for f in s2t) > 0, "the tiny pair should disagree"
    # requests by mode and outcome; tokens by mode
    assert value(worker, "s2t_worker_requests_total", mode_requested="greedy", mode_used="greedy",
                 outcome="completed") == 1
    assert value(worker, "s2t_worker_requests_total", mode_requested="s2t", mode_used="s2t", outcome="completed") == 2
    assert value(worker, "s2t_worker_requests_total", mode_requested="llm", mode_used="llm", outcome="completed") == 1
    assert total(worker, "s2t_worker_requests_total") == 4
    assert value(worker, "s2t_worker_requests_refused_total", code="invalid_argument") == 1
    for mode, group in (("greedy", [greedy]), ("s2t", s2t), ("llm", [llm])):
        assert value(worker, "s2t_worker_completion_tokens_total", mode=mode) == sum(
            f.stats.completion_tokens for f in group)
        assert value(worker, "s2t_worker_request_duration_seconds_count", mode=mode) == len(group)
        assert value(worker, "s2t_worker_request_duration_seconds_sum", mode=mode) == pytest.approx(
            sum(f.stats.wall_s for f in group))
        assert value(worker, "s2t_worker_time_to_first_token_seconds_count", mode=mode) == len(group)
        assert value(worker, "s2t_worker_tokens_per_second_count", mode=mode) == len(group)
    # what the verifiers did
    for name, field in (("positions_checked", "positions_checked"), ("picks_changed", "picks_changed"),
                        ("rolled_back_tokens", "rolled_back_tokens"), ("unverified_tokens", "unverified_tokens"),
                        ("reranked_positions", "reranked_positions"), ("resyncs", "resyncs")):
        assert value(worker, f"s2t_worker_{name}_total") == sum(getattr(f.stats, field) for f in finals), name
    assert not any(n == "s2t_worker_fallbacks_total" for n, _ in worker)  # nothing degraded
    # selector RPC attempts, as the worker timed them: no faults, so one attempt per call
    select_calls, decode_calls = sum(f.stats.selector_calls for f in s2t), llm.stats.selector_calls
    assert select_calls > 0 and decode_calls > 0
    assert value(worker, "s2t_worker_selector_rpc_seconds_count", method="Select", outcome="ok") == select_calls
    assert value(worker, "s2t_worker_selector_rpc_seconds_count", method="Decode", outcome="ok") == decode_calls
    assert total(worker, "s2t_worker_selector_rpc_seconds_count") == select_calls + decode_calls
    assert value(worker, "s2t_worker_active_requests") == 0
    assert not any(n == "s2t_worker_adapter_info" for n, _ in worker)  # no adapter configured
    # the SLM's drafting forwards: one request at a time, so one row each, one per drafted token (llm mode's
    # tokens are the selector's); no branches without branch_when_unsure
    drafted = sum(f.stats.drafted_tokens for f in (greedy, *s2t))
    assert value(worker, "s2t_worker_forward_rows_total", row="draft") == drafted
    assert value(worker, "s2t_worker_forward_seconds_count") == drafted
    assert 0 < value(worker, "s2t_worker_forward_seconds_sum") < sum(f.stats.wall_s for f in (greedy, *s2t))
    assert value(worker, "s2t_worker_forward_rows_total", row="branch") == 0

    # the selector's side of the same traffic
    assert value(selector, "s2t_selector_requests_total", method="select", outcome="ok") == select_calls
    assert value(selector, "s2t_selector_requests_total", method="decode", outcome="ok") == decode_calls
    assert value(selector, "s2t_selector_requests_total", method="close_session", outcome="ok") == 3
    assert value(selector, "s2t_selector_requests_total", method="info", outcome="ok") == 1  # the worker's check
    assert value(selector, "s2t_selector_positions_scored_total") == sum(f.stats.positions_checked for f in s2t)
    assert value(selector, "s2t_selector_divergences_total") == sum(f.stats.picks_changed for f in s2t)
    batches = sum(value(selector, "s2t_selector_batch_size_count", method=m) for m in ("select", "decode"))
    sessions = sum(value(selector, "s2t_selector_batch_size_sum", method=m) for m in ("select", "decode"))
    assert (batches, sessions) == (core_counters["batches"], core_counters["batched_sessions"])
    assert batches == sum(value(selector, "s2t_selector_forward_seconds_count", method=m) for m in ("select", "decode"))
    assert value(selector, "s2t_selector_sessions") == 0 and value(selector, "s2t_selector_kv_bytes") == 0
    for name in ("evictions", "resyncs", "replays", "queue_rejections"):
        assert value(selector, f"s2t_selector_{name}_total") == 0, name


async def test_a_selector_down_request_counts_as_a_fallback_with_its_reason(make_settings):
    settings = metrics_settings(make_settings, **{"worker.breaker_failures": 1})
    async with Stack(settings) as stack:
        port = stack.worker.metrics.http_port
        await stack.generate(PROMPT, mode=pb.MODE_GREEDY, max_new_tokens=12)
        await stack.stop_selector()
        s2t = await stack.generate(PROMPT, mode=pb.MODE_S2T, max_new_tokens=12, block_size=4)
        llm = await stack.generate(PROMPT, mode=pb.MODE_LLM, max_new_tokens=12)
        await settle(stack.worker, None)
        worker = await asyncio.to_thread(scrape, port)
        attempts = stack.worker.selector.counters.attempts
    assert s2t.stats.mode_used == pb.MODE_GREEDY and llm.stats.mode_used == pb.MODE_GREEDY
    assert value(worker, "s2t_worker_fallbacks_total", reason="selector_down") == 2
    assert total(worker, "s2t_worker_fallbacks_total") == 2
    assert value(worker, "s2t_worker_requests_total", mode_requested="s2t", mode_used="greedy", outcome="degraded") == 1
    assert value(worker, "s2t_worker_requests_total", mode_requested="llm", mode_used="greedy", outcome="degraded") == 1
    assert value(worker, "s2t_worker_unverified_tokens_total") == s2t.stats.unverified_tokens + llm.stats.unverified_tokens
    # every attempt the client made was timed, and the outage shows as UNAVAILABLE attempts
    assert total(worker, "s2t_worker_selector_rpc_seconds_count") == attempts
    assert value(worker, "s2t_worker_selector_rpc_seconds_count", method="Select", outcome="unavailable") >= 1


async def test_a_cancelled_request_counts_once_as_cancelled(make_settings):
    async with Stack(metrics_settings(make_settings)) as stack:
        call = stack.stub.GenerateStream(pb.GenerateStreamRequest(
            prompt=PROMPT, options=pb.GenerationOptions(mode=pb.MODE_GREEDY, max_new_tokens=400)))
        async for msg in call:
            if msg.HasField("delta"):
                break
        call.cancel()
        await settle(stack.worker, None)
        worker = await asyncio.to_thread(scrape, stack.worker.metrics.http_port)
    assert value(worker, "s2t_worker_requests_total", mode_requested="greedy", mode_used="greedy",
                 outcome="cancelled") == 1
    assert total(worker, "s2t_worker_requests_total") == 1
    assert value(worker, "s2t_worker_completion_tokens_total", mode="greedy") == 0  # never delivered in full


async def test_adapter_version_and_the_local_fallback_are_visible(make_settings, tiny_pair, tmp_path):
    from test_local_mode import make_adapter

    make_adapter(tiny_pair[0], tmp_path / "adapters" / "v1", "v1", seed=3)
    settings = metrics_settings(make_settings, **{"worker.adapter_dir": str(tmp_path / "adapters"),
                                                  "worker.breaker_failures": 1})
    async with Stack(settings) as stack:
        local = await stack.generate(PROMPT, mode=pb.MODE_S2T_LOCAL, max_new_tokens=12, block_size=4)
        await stack.stop_selector()
        fallback = await stack.generate(PROMPT, mode=pb.MODE_S2T, max_new_tokens=12, block_size=4)
        await settle(stack.worker, None)
        worker = await asyncio.to_thread(scrape, stack.worker.metrics.http_port)
    assert fallback.stats.mode_used == pb.MODE_S2T_LOCAL and "re-ranked locally" in fallback.stats.degraded_reason
    assert value(worker, "s2t_worker_adapter_info", version="v1") == 1
    assert value(worker, "s2t_worker_requests_total", mode_requested="s2t-local", mode_used="s2t-local",
                 outcome="completed") == 1
    assert value(worker, "s2t_worker_requests_total", mode_requested="s2t", mode_used="s2t-local",
                 outcome="degraded") == 1
    assert value(worker, "s2t_worker_fallbacks_total", reason="selector_down") == 1
    assert value(worker, "s2t_worker_reranked_positions_total") == (local.stats.reranked_positions
                                                                    + fallback.stats.reranked_positions)


# -- the classification of degraded_reason ------------------------------------------------------------------


@pytest.mark.parametrize("reason, expected", [
    ("", set()),
    ("selector at 127.0.0.1:9 unreachable: UNAVAILABLE; committed unverified (20 tokens: no verifier available; "
     "the SLM continued alone)", {FallbackReason.SELECTOR_UNCONNECTED}),
    ("committed unverified (8 tokens: selector down (circuit breaker open after 1 consecutive connection failures; "
     "next probe in 9.9 s))", {FallbackReason.SELECTOR_DOWN}),
    ("selector unavailable (selector unreachable until the deadline (UNAVAILABLE: x)); the SLM continued greedily",
     {FallbackReason.SELECTOR_DOWN}),
    ("committed unverified (4 tokens: selector busy past the deadline (no answer within 0.1 s))",
     {FallbackReason.SELECTOR_BUSY}),
    ("committed unverified (4 tokens: selector refused the request: INTERNAL: boom)", {FallbackReason.SELECTOR_REFUSED}),
    ("committed unverified (4 tokens: selector kept losing the session)", {FallbackReason.SESSION_LOST}),
    ("no S2T-Local adapter loaded (worker.adapter_dir is not set); committed unverified (4 tokens: no verifier "
     "available; the SLM continued alone)", {FallbackReason.NO_ADAPTER}),
    ("re-ranked locally by adapter v1 (2 blocks: selector down (circuit breaker open)); committed unverified "
     "(4 tokens: local re-ranker failed: RuntimeError('x'))",
     {FallbackReason.SELECTOR_DOWN, FallbackReason.RERANKER_FAILED}),
    ("the selector's model 'big' has a different vocabulary (sha256 ab…) than the worker's 'small' (cd…): S2T "
     "needs one tokenizer for both", {FallbackReason.SELECTOR_INCOMPATIBLE}),
    ("committed unverified (4 tokens: selector at 127.0.0.1:9 refused the worker's credentials (UNAUTHENTICATED: "
     "no token); worker.selector_auth_token must be one of the selector's selector.auth_tokens)",
     {FallbackReason.SELECTOR_AUTH}),
    ("selector unavailable (something unexpected); the SLM continued greedily", {FallbackReason.OTHER}),
])
def test_degraded_reasons_map_to_a_small_set(reason, expected):
    stats = pb.GenerationStats(mode_requested=pb.MODE_S2T, mode_used=pb.MODE_GREEDY if reason else pb.MODE_S2T,
                               degraded_reason=reason)
    assert fallback_reasons(stats) == expected


def test_budget_decisions_count_as_a_call_budget_fallback():
    stats = pb.GenerationStats(mode_requested=pb.MODE_S2T, mode_used=pb.MODE_S2T, local_decisions=4)
    assert fallback_reasons(stats) == {FallbackReason.CALL_BUDGET}


# -- the selector's own cases, on SelectorCore directly -----------------------------------------------------


def select_request(session: str, step: int = 0, prefix_length: int = 0, token_ids=(5, 6, 7)):
    n = prefix_length + len(token_ids)
    return sel_pb.SelectRequest(session_id=session, step=step, prefix_length=prefix_length, token_ids=list(token_ids),
                                positions=[sel_pb.CandidatePosition(position=n, candidate_ids=[1, 2, 3])],
                                trigger=sel_pb.SelectTriggerSpec(kind=sel_pb.SELECT_TRIGGER_ALWAYS))


@pytest.fixture
def make_core(make_settings, tiny_pair):
    engine = Engine(load_model(str(tiny_pair[1]), tiny_pair[1].parent, "native"))

    def make(**selector) -> SelectorCore:
        settings = make_settings(**{"selector.log_enabled": False, **{f"selector.{k}": v for k, v in selector.items()}})
        return SelectorCore(engine, settings.selector)

    return make


def registry_samples(core: SelectorCore) -> Samples:
    return parse(generate_latest(core.metrics.backend.registry).decode())


async def test_selector_queue_rejections(make_core):
    core = make_core(max_queued_requests=2, max_batch_size=1)
    # 5 sessions at once: 2 wait for a batch, 3 are refused with RESOURCE_EXHAUSTED (back-pressure)
    outcomes = await asyncio.gather(*(core.handle(select_request(f"s{i}"), "select") for i in range(5)),
                                    return_exceptions=True)
    assert [isinstance(o, SelectorError) for o in outcomes] == [False, False, True, True, True]
    samples = registry_samples(core)
    assert value(samples, "s2t_selector_queue_rejections_total") == 3 == core.counters["resource_exhausted"]
    assert value(samples, "s2t_selector_requests_total", method="select", outcome="resource_exhausted") == 3
    assert value(samples, "s2t_selector_requests_total", method="select", outcome="ok") == 2


async def test_selector_evictions_resyncs_replays_and_refusals(make_core):
    core = make_core(max_sessions=2)
    for sid in ("s0", "s1", "s2"):  # a third session: the least recently used (s0) is evicted
        await core.handle(select_request(sid), "select")
    await core.handle(select_request("s2"), "select")  # the same step again: replayed from the kept reply
    await core.handle(select_request("s2", step=1), "select")  # a later step with the full context: a resync
    with pytest.raises(SelectorError):  # a session the selector does not hold: FAILED_PRECONDITION
        await core.handle(select_request("gone", step=3, prefix_length=3, token_ids=[8]), "select")
    with pytest.raises(SelectorError):  # no tokens: INVALID_ARGUMENT
        await core.handle(sel_pb.SelectRequest(session_id="x", trigger=select_request("x").trigger), "select")
    core.close_session("s2")
    samples = registry_samples(core)
    requests = {outcome: value(samples, "s2t_selector_requests_total", method="select", outcome=outcome)
                for outcome in ("ok", "resource_exhausted", "failed_precondition", "invalid_argument")}
    assert requests == {"ok": 5, "resource_exhausted": 0, "failed_precondition": 1, "invalid_argument": 1}
    assert value(samples, "s2t_selector_requests_total", method="close_session", outcome="ok") == 1
    assert value(samples, "s2t_selector_evictions_total") == 1 == core.sessions.evictions
    assert value(samples, "s2t_selector_replays_total") == 1
    assert value(samples, "s2t_selector_resyncs_total") == 1
    assert value(samples, "s2t_selector_positions_scored_total") == 4  # 4 computed requests of one position each
    assert value(samples, "s2t_selector_batch_size_count", method="select") == 4 == core.counters["batches"]
    assert value(samples, "s2t_selector_sessions") == len(core.sessions) == 1  # s1
    assert value(samples, "s2t_selector_kv_bytes") == core.sessions.kv_bytes() > 0
    assert value(samples, "s2t_selector_kv_budget_bytes") == core.settings.kv_budget_mb << 20
    assert value(samples, "s2t_selector_weight_bytes") == core.engine.lm.weight_bytes > 0
    core.close()


def test_the_selector_metrics_import_ray_only_for_the_ray_backend():
    code = ("import sys, llm_selector.metrics, llm_selector.core, llm_selector.grpc_server; "
            "llm_selector.metrics.SelectorMetrics(); print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_two_selectors_in_one_process_have_separate_registries():
    a, b = SelectorMetrics(), SelectorMetrics()
    a.queue_rejection()
    read = lambda m: value(parse(generate_latest(m.backend.registry).decode()), "s2t_selector_queue_rejections_total")  # noqa: E731
    assert (read(a), read(b)) == (1, 0)


# -- structured logs ------------------------------------------------------------------------------------------


def test_json_logs_are_one_object_per_line_with_the_ids_passed_as_extra(monkeypatch):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLogFormatter())
    logger = logging.getLogger("s2t.test-json")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    before = time.time()
    logger.info("request finished: %d tokens", 7, extra={"request_id": "r-1", "session_id": "r-1-ab"})
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    first, second = (json.loads(line) for line in lines)
    assert len(lines) == 2
    assert {k: first[k] for k in ("level", "logger", "message", "request_id", "session_id")} == {
        "level": "INFO", "logger": "s2t.test-json", "message": "request finished: 7 tokens", "request_id": "r-1",
        "session_id": "r-1-ab"}
    from datetime import datetime

    assert abs(datetime.fromisoformat(first["time"]).timestamp() - before) < 60  # a real UTC timestamp
    assert "request_id" not in second and second["level"] == "ERROR" and "ValueError: boom" in second["exception"]
    monkeypatch.setenv("S2T_LOG_FORMAT", "json")
    assert isinstance(log_handler().formatter, JsonLogFormatter)
    monkeypatch.setenv("S2T_LOG_FORMAT", "xml")
    with pytest.raises(SystemExit, match="S2T_LOG_FORMAT"):
        log_handler()


# -- Ray Serve: the same metrics through ray.serve.metrics (run by the lead; needs a local Ray) ----------------


@pytest.mark.ray
def test_the_serve_deployment_exports_selector_metrics_through_ray(tiny_pair, tmp_path):
    import socket

    import ray

    from llm_selector import serve_app
    from s2t.config import load_settings
    from s2t.v1 import selector_pb2_grpc as sel_grpc

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    settings = load_settings(**{
        "cache_dir": str(tmp_path / "cache"), "data_dir": str(tmp_path / "data"), "selector.model": str(tiny_pair[1]),
        "selector.runtime.weight_formats": "native", "selector.grpc_port": free_port(),
        "selector.http_port": free_port(), "selector.log_enabled": False})
    address = serve_app.start(settings)
    try:
        md = [("application", settings.selector.application), ("session_id", "ray-m")]
        with grpc.insecure_channel(address) as channel:
            stub = sel_grpc.SelectorServiceStub(channel)
            stub.Select(select_request("ray-m"), metadata=md, timeout=60)
            stub.CloseSession(sel_pb.CloseSessionRequest(session_id="ray-m"), metadata=md, timeout=60)
        port = ray._private.worker.global_worker.node.metrics_export_port
        wanted = ("ray_s2t_selector_requests_total", {"method": "select", "outcome": "ok"})
        found = None
        for _ in range(120):  # Ray's agent exports on its own period: wait for the first export that has it
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
                for family in text_string_to_metric_families(reply.read().decode()):
                    for s in family.samples:
                        if s.name == wanted[0] and all(s.labels.get(k) == v for k, v in wanted[1].items()):
                            found = s
            if found is not None:
                break
            time.sleep(1)
        assert found is not None, f"{wanted} never appeared on Ray's metrics endpoint (port {port})"
        assert found.value == 1 and found.labels.get("deployment") == "Selector"
    finally:
        serve_app.stop()

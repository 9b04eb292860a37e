"""Load on an overloaded selector (issue #11): many concurrent sessions against a slow selector with a small
queue bound. The selector answers RESOURCE_EXHAUSTED with a retry hint, the worker's client waits and resends,
and no session degrades: a busy selector is never taken for a dead one.

Latency percentiles are printed (`-s` shows them), not asserted: the machine's load decides them."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from conftest import reference_s2t
from s2t.v1 import generation_pb2 as pb
from servers import Stack, slow_compute
from slm_worker.selector_client import BreakerState

SESSIONS = 64
MAX_NEW_TOKENS = 16
PROMPTS = [f"What is {a} + {b}?" for a, b in ((2, 3), (7, 5), (11, 4), (6, 9), (13, 8), (3, 14), (10, 10), (1, 12))]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def expected_completions(stack, tiny_models, mode) -> dict[str, list[int]]:
    """What each prompt must produce without any load: the LLM alone (llm) or the every-step S2T loop (s2t)."""
    slm, llm = tiny_models
    stop_ids = list(stack.worker.lm.stop_ids)
    expected = {}
    for prompt in PROMPTS:
        ids = stack.worker.prompt_ids(pb.GenerateRequest(prompt=prompt))
        if mode == pb.MODE_LLM:
            expected[prompt] = llm.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                                            eos_token_id=stop_ids, pad_token_id=256)[0, len(ids):].tolist()
        else:
            expected[prompt] = reference_s2t(slm, llm, ids, MAX_NEW_TOKENS, 8, set(stop_ids))
    return expected


@pytest.mark.parametrize("mode", [pb.MODE_LLM, pb.MODE_S2T], ids=["llm", "s2t"])
async def test_overloaded_selector_degrades_no_session(make_settings, tiny_models, mode):
    # A queue of at most 8 requests, batches of 8, every batch 30 ms slower than its compute, and random
    # delays in front of the queue: 64 sessions at once overflow it many times over.
    settings = make_settings(**{"selector.max_batch_size": 8, "selector.max_queued_requests": 8,
                                "selector.log_enabled": False})
    async with Stack(settings, faulty_seed=11) as stack:
        stack.servicer.max_delay_s = 0.02
        stack.servicer.max_decode_delay_s = 0.02
        slow_compute(stack.core, 0.03)
        expected = expected_completions(stack, tiny_models, mode)

        async def one(i: int) -> tuple[str, pb.GenerateResponse, float]:
            prompt = PROMPTS[i % len(PROMPTS)]
            started = time.monotonic()
            final = await stack.generate(prompt, mode=mode, max_new_tokens=MAX_NEW_TOKENS)
            return prompt, final, time.monotonic() - started

        started = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(SESSIONS))), 300)
        wall = time.monotonic() - started
        client = stack.worker.selector
        selector_counters = dict(stack.core.counters)

    latencies = [took for _, _, took in results]
    name = pb.Mode.Name(mode)
    print(f"\n{name}: {SESSIONS} sessions in {wall:.2f} s; latency p50 {percentile(latencies, 0.5):.2f} s, "
          f"p99 {percentile(latencies, 0.99):.2f} s; selector: {selector_counters['resource_exhausted']} "
          f"RESOURCE_EXHAUSTED, queue peak {selector_counters['queued_peak']}, {selector_counters['batches']} "
          f"batches; client: {client.counters.as_dict()}")

    degraded = [(p, f.stats.degraded_reason) for p, f, _ in results if f.stats.degraded_reason]
    assert not degraded, degraded
    for prompt, final, _ in results:
        st = final.stats
        assert st.mode_used == mode and st.unverified_tokens == 0
        assert list(final.token_ids) == expected[prompt], prompt
    # back-pressure really happened, was honoured, and never opened the breaker
    assert selector_counters["resource_exhausted"] > 0
    assert selector_counters["queued_peak"] <= settings.selector.max_queued_requests
    assert client.counters.resource_exhausted > 0 and client.counters.busy_retries > 0
    assert client.counters.outage_failures == 0 and client.counters.busy_past_deadline == 0
    assert client.breaker.state is BreakerState.CLOSED and client.breaker.openings == 0

"""The worker end to end over real gRPC, against a real selector: exactness of greedy and of (speculative)
S2T against offline references, fault tolerance, and the client-facing error contract."""

import asyncio
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import reference_s2t
from s2t.v1 import generation_pb2 as pb
from servers import Stack, slow_compute
from slm_worker import loop
from slm_worker.proposer import DivergenceOdds
from slm_worker.verifiers import VerdictKind

PROMPT = "What is 2 + 3?"


def prompt_ids(stack, prompt=PROMPT):
    return stack.worker.prompt_ids(pb.GenerateRequest(prompt=prompt))


def assert_stream_is_committed_text(deltas, final):
    """Every streamed token is final: the stream concatenates to exactly the final completion."""
    assert [t for d in deltas for t in d.token_ids] == list(final.token_ids)
    assert "".join(d.text for d in deltas) == final.text


async def test_greedy_equals_model_generate(make_settings, tiny_models):
    slm, _ = tiny_models
    async with Stack(make_settings()) as stack:
        ids = prompt_ids(stack)
        expected = slm.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=40,
                                eos_token_id=list(stack.worker.lm.stop_ids), pad_token_id=256)[0, len(ids):].tolist()
        deltas, final = await stack.stream(PROMPT, mode=pb.MODE_GREEDY, max_new_tokens=40)
    assert list(final.token_ids) == expected
    assert_stream_is_committed_text(deltas, final)
    assert final.stats.mode_used == pb.MODE_GREEDY and final.stats.selector_calls == 0


@pytest.mark.parametrize("block_size", range(1, 17))
async def test_speculative_s2t_equals_every_step_loop(make_settings, tiny_models, block_size):
    slm, llm = tiny_models
    async with Stack(make_settings(**{"worker.max_inflight_blocks": 3})) as stack:
        ids = prompt_ids(stack)
        expected = reference_s2t(slm, llm, ids, 40, 8, set(stack.worker.lm.stop_ids))
        deltas, final = await stack.stream(PROMPT, mode=pb.MODE_S2T, max_new_tokens=40, block_size=block_size)
    assert list(final.token_ids) == expected
    assert_stream_is_committed_text(deltas, final)
    st = final.stats
    assert st.picks_changed > 0 and st.rolled_back_tokens > 0, "the tiny pair should disagree often"
    assert st.unverified_tokens == 0 and st.verified_tokens == st.completion_tokens


def recorded_selects(core) -> list:
    """Every Select request `core` computes, in order (wraps its compute like servers.slow_compute)."""
    seen, compute = [], core.compute_select

    def recording(tickets):
        seen.extend(t.request for t in tickets)
        return compute(tickets)

    core.compute_select = recording
    return seen


def hold_first_forward(stack, seconds: float = 0.5) -> None:
    """Make the worker's next SLM forward (a request's prompt) take `seconds` longer, on the engine's thread
    like the real one: whatever the prompt's prefill call does meanwhile is done before the first block."""
    engine = stack.worker.scheduler.engine
    forward = engine.forward

    def slow_first_forward(*args):
        engine.forward = forward
        time.sleep(seconds)
        return forward(*args)

    engine.forward = slow_first_forward


@pytest.mark.parametrize("prefill", [True, False])
async def test_the_prompt_goes_to_the_selector_ahead_of_the_first_block(make_settings, tiny_models, prefill):
    slm, llm = tiny_models
    async with Stack(make_settings(**{"worker.selector_prefill": prefill})) as stack:
        ids = prompt_ids(stack)
        expected = reference_s2t(slm, llm, ids, 24, 8, set(stack.worker.lm.stop_ids))
        seen = recorded_selects(stack.core)
        hold_first_forward(stack)  # the prefill is computed before the first block is sent, as a slow SLM has it
        final = await stack.generate(PROMPT, mode=pb.MODE_S2T, max_new_tokens=24, block_size=4)
    assert list(final.token_ids) == expected
    first, second = seen[:2]
    if prefill:  # the prompt but its last token, which the first block carries with the drafts it predicts
        assert (first.step, first.prefix_length, list(first.token_ids), len(first.positions)) == (0, 0, ids[:-1], 0)
        assert (second.step, second.prefix_length, second.token_ids[0]) == (1, len(ids) - 1, ids[-1])
    else:
        assert (first.step, first.prefix_length, list(first.token_ids[:len(ids)])) == (0, 0, ids)
        assert len(first.positions) > 0
    st = final.stats
    assert st.llm_forwards == len(seen) and st.resyncs == st.selector_failures == 0  # calls: more (voided blocks)
    assert st.positions_checked == sum(len(r.positions) for r in seen)


async def test_a_selector_without_prefills_gets_none(make_settings, tiny_models, monkeypatch):
    from llm_selector.core import SelectorCore

    info = SelectorCore.info
    monkeypatch.setattr(SelectorCore, "info", lambda self: (lambda r: (r.ClearField("accepts_prefill"), r)[1])(
        info(self)))  # a selector of an earlier build
    async with Stack(make_settings()) as stack:
        assert not stack.worker.selector_info.accepts_prefill
        seen = recorded_selects(stack.core)
        final = await stack.generate(PROMPT, mode=pb.MODE_S2T, max_new_tokens=16, block_size=4)
    assert final.stats.mode_used == pb.MODE_S2T and seen and all(r.positions for r in seen)


@pytest.mark.parametrize("first_block_waits", [False, True])
async def test_a_refused_prefill_costs_the_request_nothing(make_settings, tiny_models, first_block_waits):
    """The selector refuses the prefill: before the first block exists (the SLM's prompt forward held long
    enough), that block carries the prompt; after (the refusal held until the block has reached the selector,
    which does not know the session yet), the block is answered FAILED_PRECONDITION and goes out again with
    the full context. The text is the same either way."""
    slm, llm = tiny_models
    async with Stack(make_settings()) as stack:
        ids = prompt_ids(stack)
        expected = reference_s2t(slm, llm, ids, 24, 8, set(stack.worker.lm.stop_ids))
        block_arrived = asyncio.Event()

        async def refuse_prefills(request, context):
            if request.positions:
                block_arrived.set()
                return
            if first_block_waits:
                await block_arrived.wait()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "injected: positions: no prefills here")

        stack.servicer.intercept = refuse_prefills
        if not first_block_waits:  # the refusal is back before the first block is built
            hold_first_forward(stack)
        seen = recorded_selects(stack.core)
        final = await stack.generate(PROMPT, mode=pb.MODE_S2T, max_new_tokens=24, block_size=4)
    assert list(final.token_ids) == expected
    st = final.stats
    assert st.unverified_tokens == 0 and st.verified_tokens == st.completion_tokens
    assert st.selector_failures == 1 and st.resyncs == (1 if first_block_waits else 0)
    assert seen[0].prefix_length == 0 and list(seen[0].token_ids[:len(ids)]) == ids and seen[0].positions


@pytest.mark.parametrize("confidence", [0.3, 0.99])
async def test_worker_does_not_draft_past_an_unsure_draft(make_settings, tiny_models, confidence):
    """The tiny SLM is unsure everywhere: with a strict gate every block is one position and a divergence
    rolls back only the draft it replaces; with any gate the output is still the every-step loop's."""
    slm, llm = tiny_models
    settings = make_settings(**{"worker.max_inflight_blocks": 3, "worker.draft_confidence": confidence})
    async with Stack(settings) as stack:
        expected = reference_s2t(slm, llm, prompt_ids(stack), 40, 8, set(stack.worker.lm.stop_ids))
        deltas, final = await stack.stream(PROMPT, mode=pb.MODE_S2T, max_new_tokens=40, block_size=8)
        odds = stack.worker.scheduler.odds
    assert list(final.token_ids) == expected
    assert_stream_is_committed_text(deltas, final)
    st = final.stats
    if confidence == 0.99:  # one position per block, and the prompt's prefill
        assert st.positions_checked + 1 == st.llm_forwards == st.selector_calls
        assert st.rolled_back_tokens == st.picks_changed > 0
    else:  # the odds learn that this pair agrees more often than the prior says: blocks grow
        assert st.positions_checked > st.llm_forwards
    # every verdict was counted (positions after a divergence get none), every divergence as one
    cells = [c for per_bin in odds.counts.values() for c in per_bin]
    assert st.verified_tokens <= sum(c[1] for c in cells) <= st.positions_checked
    assert sum(c[0] for c in cells) == st.picks_changed


@pytest.mark.parametrize("by_request", [False, True])
async def test_drafting_on_while_unsure_holds_the_blocks_after_the_unsure_one(make_settings, tiny_models,
                                                                               by_request):
    """draft_when_unsure (the worker's setting, or a request's option over the setting's false) with a strict
    gate (the tiny SLM is unsure everywhere): the worker drafts on while the (slow) selector answers, yet the
    selector scores only blocks whose verdicts are used — each block goes out after the verdict before it —
    and the output is still the every-step loop's."""
    slm, llm = tiny_models
    settings = make_settings(**{"worker.max_inflight_blocks": 3, "worker.draft_confidence": 0.99,
                                "worker.draft_when_unsure": not by_request})
    async with Stack(settings) as stack:
        expected = reference_s2t(slm, llm, prompt_ids(stack), 40, 8, set(stack.worker.lm.stop_ids))
        seen = recorded_selects(stack.core)
        slow_compute(stack.core, 0.05)  # the worker drafts on meanwhile: it has its own core here
        option = {"draft_when_unsure": True} if by_request else {}
        deltas, final = await stack.stream(PROMPT, mode=pb.MODE_S2T, max_new_tokens=40, block_size=8, **option)
    assert list(final.token_ids) == expected
    assert_stream_is_committed_text(deltas, final)
    st = final.stats
    assert st.unverified_tokens == 0 and st.picks_changed > 0
    # none of the selector's forwards went to drafts a rejection threw away: every call's verdict was applied
    assert len(seen) == st.selector_calls == st.llm_forwards
    assert st.positions_checked == sum(len(r.positions) for r in seen)
    # drafting went on while the selector answered: drafts past a divergence were thrown away (with the gate
    # pausing they are not: see above), and blocks sent after an accepted one carry what was drafted meanwhile
    assert st.rolled_back_tokens > st.picks_changed
    assert max(len(r.positions) for r in seen) > 1


@pytest.mark.parametrize("mode, by_request, max_branches", [(pb.MODE_S2T, False, 1), (pb.MODE_TAKEOVER, True, 1),
                                                           (pb.MODE_S2T, False, 3)])
async def test_branches_drafted_while_unsure_are_adopted_and_change_no_token(make_settings, tiny_models, mode,
                                                                             by_request, max_branches):
    """branch_when_unsure (the worker's setting, or a request's option over the setting's false) with a strict gate (the tiny SLM is unsure everywhere) and a slow selector: while the
    blocks in flight are unsure the worker also drafts the continuation after the second candidate at their
    likeliest divergence; a verdict that picks it continues from those drafts. The tokens are the ones without
    branches (the every-step loop's, for s2t); takeover's LLM token may be none of the candidates, and then no
    branch matches."""
    slm, llm = tiny_models
    finals = []
    for branches in (False, True):
        settings = make_settings(**{"worker.max_inflight_blocks": 2, "worker.draft_confidence": 0.99,
                                    "worker.draft_when_unsure": True, "worker.max_branches": max_branches,
                                    "worker.branch_when_unsure": branches and not by_request})
        option = {"branch_when_unsure": True} if branches and by_request else {}
        async with Stack(settings) as stack:
            expected = reference_s2t(slm, llm, prompt_ids(stack), 40, 8, set(stack.worker.lm.stop_ids))
            slow_compute(stack.core, 0.05)
            deltas, final = await stack.stream(PROMPT, mode=mode, max_new_tokens=40, block_size=4, **option)
            assert all(not s.branches for s in stack.worker.scheduler.active)
            # every branch draft came from a branch row of a forward (a row whose branch a verdict dropped during
            # the forward drafts nothing)
            registry = stack.worker.metrics.registry
            branch_rows = registry.get_sample_value("s2t_worker_forward_rows_total", {"row": "branch"}) or 0
            assert branch_rows >= final.stats.branch_drafted_tokens and (branch_rows > 0) == branches
        assert_stream_is_committed_text(deltas, final)
        if mode == pb.MODE_S2T:
            assert list(final.token_ids) == expected
        finals.append(final)
    off, on = finals
    assert list(off.token_ids) == list(on.token_ids)
    assert off.stats.branch_drafted_tokens == off.stats.branches_adopted == 0
    st = on.stats
    assert st.unverified_tokens == 0 and st.picks_changed > 0 and st.branch_drafted_tokens > 0
    assert st.branches_adopted + st.branch_missed_position + st.branch_missed_candidate <= st.picks_changed
    assert off.stats.branch_missed_position == off.stats.branch_missed_candidate == 0
    if mode == pb.MODE_S2T:  # the tiny pair's changed picks are often the second candidate
        assert st.branches_adopted > 0
        # an adopted branch's drafts are not drafted again: fewer drafts, none of them past the length limit
        assert st.drafted_tokens < off.stats.drafted_tokens + st.branch_drafted_tokens


def test_pick_rank_odds_start_from_the_prior_and_learn():
    odds, key = DivergenceOdds(), ("selector", "kl", 0.1)
    assert odds.p_rank(key, 1) == pytest.approx(0.65) and odds.p_rank(key, 1) > odds.p_rank(key, 2) > 0
    assert odds.p_rank(key, 12) == 0  # past the prior's ranks: only what is seen
    for _ in range(40):
        odds.observe_pick(key, 2)
    assert odds.p_rank(key, 2) > 0.8 > odds.p_rank(key, 1)
    assert sum(odds.p_rank(key, r) for r in range(1, 8)) == pytest.approx(1.0)
    assert odds.p_rank(("selector", "always", 0.0), 1) == pytest.approx(0.65)  # another key keeps its own counts


def test_branch_points_are_the_likeliest_other_picks_in_flight():
    """Candidate r at position p ranks by P(all before p accepted) x P(diverge at p) x P(rank r); with one branch
    that is the second candidate at the likeliest divergence."""
    from types import SimpleNamespace

    from slm_worker.sequence import Sequence

    seq = Sequence.__new__(Sequence)
    seq.odds = DivergenceOdds()
    seq.opts = SimpleNamespace(num_candidates=3, trigger=None, trigger_rate=0.0, mode=None)
    seq.committed, seq.unsent, seq.prompt_len = 10, 13, 5
    seq.proposals = {10: SimpleNamespace(probs=[0.95, 0.04, 0.01], ids=[1, 2, 3]),  # a sure draft
                     11: SimpleNamespace(probs=[0.45, 0.4, 0.15], ids=[4, 5, 6]),  # the likeliest divergence
                     12: SimpleNamespace(probs=[0.55, 0.3, 0.15], ids=[7, 8, 9])}
    seq.needs_check = lambda pos: True
    seq.odds_key = lambda source=None: ("selector", "kl", 0.1)
    assert seq._branch_points(1, set()) == [(11, 1)]
    assert seq._branch_points(3, set()) == [(11, 1), (12, 1), (11, 2)]
    assert seq._branch_points(2, {(11, 5)}) == [(12, 1), (11, 2)]  # a branch already drafted is not made again


def test_divergence_odds_start_from_the_slm_doubt_and_learn():
    odds, key = DivergenceOdds(), ("selector", "always", 0.0)
    assert odds.p_diverge(key, 0.95) < odds.p_diverge(key, 0.55) < odds.p_diverge(key, 0.15)
    for _ in range(200):
        odds.observe(key, 0.35, diverged=False)
    assert odds.p_diverge(key, 0.35) < 0.02
    assert odds.p_diverge(("selector", "kl", 0.1), 0.35) == pytest.approx(0.65)  # another trigger keeps its own counts
    for _ in range(200):
        odds.observe(key, 0.97, diverged=True)
    assert odds.p_diverge(key, 0.97) > 0.95


async def test_non_speculative_s2t_waits_and_matches(make_settings, tiny_models):
    slm, llm = tiny_models
    async with Stack(make_settings(**{"worker.max_inflight_blocks": 1, "worker.block_size": 1})) as stack:
        expected = reference_s2t(slm, llm, prompt_ids(stack), 30, 4, set(stack.worker.lm.stop_ids))
        final = await stack.generate(PROMPT, mode=pb.MODE_S2T, max_new_tokens=30, num_candidates=4)
    assert list(final.token_ids) == expected
    assert final.stats.rolled_back_tokens == final.stats.picks_changed  # only the replaced draft itself


def entropy_top64(p_s):
    top = p_s.topk(64).values
    top = top / top.sum()
    return float(-(top * top.clamp_min(1e-30).log()).sum())


@pytest.mark.parametrize("block_size", [1, 4, 8])
async def test_s2t_with_entropy_trigger_equals_reference(make_settings, tiny_models, block_size):
    slm, llm = tiny_models
    threshold = 3.7  # about the median entropy of the tiny SLM: fires at roughly half the steps
    settings = make_settings(**{"worker.trigger": "entropy", "worker.thresholds.entropy": {0.1: threshold}})
    fires = lambda step, p_s, logp_l: step >= 3 and entropy_top64(p_s) > threshold  # noqa: E731
    async with Stack(settings) as stack:
        expected = reference_s2t(slm, llm, prompt_ids(stack), 40, 8, set(stack.worker.lm.stop_ids), fires)
        final = await stack.generate(PROMPT, mode=pb.MODE_S2T, max_new_tokens=40, block_size=block_size,
                                     trigger_rate=0.1)
    assert list(final.token_ids) == expected
    assert 0 < final.stats.triggered_positions < final.stats.drafted_tokens


def kl_fires(threshold: float):
    """The selector's KL trigger for reference loops: KL(SLM || LLM) on the SLM's top-64 above `threshold`, past
    3 warm-up steps."""
    def fires(step, p_s, logp_l):
        top = p_s.topk(64)
        q = top.values.float().double()  # the worker sends probabilities as float32
        q = q / q.sum()
        p = logp_l[top.indices].exp()
        p = p / p.sum()
        return step >= 3 and float((q * (q / p).log()).sum()) > threshold
    return fires


async def test_s2t_with_kl_trigger_equals_reference(make_settings, tiny_models):
    slm, llm = tiny_models
    threshold = 0.5

    fires = kl_fires(threshold)
    settings = make_settings(**{"worker.trigger": "kl", "selector.kl_thresholds": {0.1: threshold}})
    async with Stack(settings) as stack:
        expected = reference_s2t(slm, llm, prompt_ids(stack), 40, 8, set(stack.worker.lm.stop_ids), fires)
        final = await stack.generate(PROMPT, mode=pb.MODE_S2T, max_new_tokens=40, block_size=6, trigger_rate=0.1)
    assert list(final.token_ids) == expected
    assert final.stats.positions_checked > 0


async def test_delays_reordering_and_duplicates_do_not_change_the_output(make_settings, tiny_models):
    slm, llm = tiny_models
    async with Stack(make_settings(**{"worker.max_inflight_blocks": 4}), faulty_seed=7) as stack:
        stack.servicer.max_delay_s = 0.03
        stack.servicer.duplicate_rate = 0.3
        expected = reference_s2t(slm, llm, prompt_ids(stack), 40, 8, set(stack.worker.lm.stop_ids))
        deltas, final = await stack.stream(PROMPT, mode=pb.MODE_S2T, max_new_tokens=40, block_size=3)
        assert stack.core.counters["replayed"] > 0, "some duplicates should have been answered from the reply cache"
    assert list(final.token_ids) == expected
    assert_stream_is_committed_text(deltas, final)


async def test_selector_losing_state_mid_request_resyncs(make_settings, tiny_models):
    slm, llm = tiny_models
    async with Stack(make_settings(**{"worker.breaker_failures": 1000})) as stack:
        stack.servicer.restart_after_calls = 4
        expected = reference_s2t(slm, llm, prompt_ids(stack), 40, 8, set(stack.worker.lm.stop_ids))
        final = await stack.generate(PROMPT, mode=pb.MODE_S2T, max_new_tokens=40, block_size=4)
    assert list(final.token_ids) == expected
    assert final.stats.resyncs >= 1 and final.stats.unverified_tokens == 0


async def test_selector_process_restart_mid_request(make_settings, tiny_models):
    slm, llm = tiny_models
    async with Stack(make_settings(**{"worker.breaker_failures": 1000})) as stack:
        expected = reference_s2t(slm, llm, prompt_ids(stack), 60, 8, set(stack.worker.lm.stop_ids))
        task = asyncio.create_task(stack.generate(PROMPT, mode=pb.MODE_S2T, max_new_tokens=60, block_size=4))
        while stack.servicer.calls < 3:  # let the session get going, then stall and restart the selector
            await asyncio.sleep(0.001)
        stack.servicer.hold = asyncio.Event()
        await asyncio.sleep(0.1)
        await stack.stop_selector()
        await asyncio.sleep(0.3)
        await stack.restart_selector()
        final = await asyncio.wait_for(task, 60)
    assert list(final.token_ids) == expected
    assert final.stats.resyncs >= 1


async def test_rollback_leaves_caches_equal_to_a_fresh_prefill(make_settings, monkeypatch):
    checks = []
    original = loop.Sequence.apply_decision

    async with Stack(make_settings()) as stack:
        slm_engine, llm_engine = stack.worker.engine, stack.core.engine

        def fresh_keys(engine, tokens):
            cache = engine.new_cache()
            engine.forward([cache], [tokens], [[len(tokens) - 1]])
            return cache

        def same(a, b, n):
            return all(torch.allclose(x[:, :n], y[:, :n], atol=1e-10) for x, y in zip(a.keys + a.values, b.keys + b.values))

        def checked(self, block, verdict):
            original(self, block, verdict)
            if verdict.kind is VerdictKind.DIVERGED and not self.done:
                n = self.cache.length
                assert n == len(self.tokens) - 1  # everything but the selected token, which is fed next
                assert same(self.cache, fresh_keys(slm_engine, self.tokens[:n]), n)
                session = stack.core.sessions.get(self.session_id)
                # the selector cut its session back to the divergence, where the worker's next request builds on
                assert session.tokens == self.tokens[:len(session.tokens)] and len(session.tokens) == verdict.position
                assert same(session.cache, fresh_keys(llm_engine, session.tokens), len(session.tokens))
                checks.append(n)

        monkeypatch.setattr(loop.Sequence, "apply_decision", checked)
        await stack.generate(PROMPT, mode=pb.MODE_S2T, max_new_tokens=30, block_size=5)
    assert len(checks) >= 3


async def test_cancelled_stream_releases_everything(make_settings):
    async with Stack(make_settings()) as stack:
        stack.servicer.max_delay_s = 0.05
        call = stack.stub.GenerateStream(pb.GenerateStreamRequest(
            prompt=PROMPT, options=pb.GenerationOptions(mode=pb.MODE_S2T, max_new_tokens=500, block_size=2)))
        async for msg in call:
            if msg.HasField("delta"):
                break
        call.cancel()
        for _ in range(100):
            await asyncio.sleep(0.05)
            if not stack.worker.scheduler.active and len(stack.core.sessions) == 0:
                break
        assert not stack.worker.scheduler.active and stack.worker.active == 0
        assert len(stack.core.sessions) == 0  # the worker closed its session
        final = await stack.generate(PROMPT, mode=pb.MODE_GREEDY, max_new_tokens=5)
        assert final.stats.completion_tokens == 5


async def test_selector_down_degrades_to_greedy(make_settings):
    async with Stack(make_settings(**{"worker.breaker_failures": 1})) as stack:
        greedy = await stack.generate(PROMPT, mode=pb.MODE_GREEDY, max_new_tokens=20)
        await stack.stop_selector()
        final = await stack.generate(PROMPT, mode=pb.MODE_S2T, max_new_tokens=20, block_size=4)
        llm = await stack.generate(PROMPT, mode=pb.MODE_LLM, max_new_tokens=20)
    assert list(final.token_ids) == list(greedy.token_ids)
    assert final.stats.mode_used == pb.MODE_GREEDY and final.stats.unverified_tokens == 20
    assert "unverified" in final.stats.degraded_reason
    assert llm.stats.mode_used == pb.MODE_GREEDY and list(llm.token_ids) == list(greedy.token_ids)
    assert "selector unavailable" in llm.stats.degraded_reason


async def test_commit_after_lag_commits_unverified_while_the_selector_stalls(make_settings):
    async with Stack(make_settings()) as stack:
        greedy = await stack.generate(PROMPT, mode=pb.MODE_GREEDY, max_new_tokens=12)
        stack.servicer.hold = asyncio.Event()
        final = await stack.generate(PROMPT, mode=pb.MODE_S2T, max_new_tokens=12, block_size=4,
                                     verify_policy=pb.VERIFY_POLICY_COMMIT_AFTER_LAG, commit_lag_ms=100)
        stack.servicer.hold.set()
    assert list(final.token_ids) == list(greedy.token_ids)
    assert final.stats.unverified_tokens == 12 and final.stats.verified_tokens == 0


async def test_call_budget_decides_locally(make_settings):
    async with Stack(make_settings(**{"worker.selector_calls_per_s": 0.001})) as stack:
        seen = recorded_selects(stack.core)
        final = await stack.generate(PROMPT, mode=pb.MODE_S2T, max_new_tokens=24, block_size=4)
    assert final.stats.local_decisions > 0
    assert final.stats.selector_calls <= 2  # one call per 1000 s of budget (plus a resync at most)
    [prefill] = seen  # the prompt's prefill is a selector call too: it took the one call the budget allows
    assert not prefill.positions


def _raw(stack, method="Generate"):
    return stack.channel.unary_unary(f"/s2t.v1.GenerationService/{method}", request_serializer=lambda b: b,
                                     response_deserializer=pb.GenerateResponse.FromString)


BAD_REQUESTS = [
    ("prompt", pb.GenerateRequest()),
    ("prompt", pb.GenerateRequest(prompt="   ")),
    ("conversation.messages", pb.GenerateRequest(conversation=pb.Conversation())),
    ("conversation.messages[0].role", pb.GenerateRequest(conversation=pb.Conversation(
        messages=[pb.ChatMessage(role="robot", content="hi")]))),
    ("conversation.messages[1].content", pb.GenerateRequest(conversation=pb.Conversation(
        messages=[pb.ChatMessage(role="user", content="hi"), pb.ChatMessage(role="user", content="")]))),
    ("options.max_new_tokens", pb.GenerateRequest(prompt="x", options=pb.GenerationOptions(max_new_tokens=10 ** 6))),
    ("options.num_candidates", pb.GenerateRequest(prompt="x", options=pb.GenerationOptions(num_candidates=10 ** 4))),
    ("options.mode", pb.GenerateRequest(prompt="x", options=pb.GenerationOptions(mode=42))),
    ("options.trigger", pb.GenerateRequest(prompt="x", options=pb.GenerationOptions(trigger=42))),
    ("options.trigger_rate", pb.GenerateRequest(prompt="x", options=pb.GenerationOptions(trigger_rate=1.5))),
    ("options.trigger_rate", pb.GenerateRequest(prompt="x", options=pb.GenerationOptions(
        trigger=pb.TRIGGER_ENTROPY, trigger_rate=0.9))),
    ("options.block_size", pb.GenerateRequest(prompt="x", options=pb.GenerationOptions(block_size=10 ** 4))),
    ("options.verify_policy", pb.GenerateRequest(prompt="x", options=pb.GenerationOptions(verify_policy=9))),
    ("options.max_inflight_blocks", pb.GenerateRequest(prompt="x", options=pb.GenerationOptions(
        max_inflight_blocks=10 ** 6))),
    ("options.draft_confidence", pb.GenerateRequest(prompt="x", options=pb.GenerationOptions(draft_confidence=1.5))),
    ("request_id", pb.GenerateRequest(prompt="x", request_id="r" * 200)),
    ("prompt", pb.GenerateRequest(prompt="word " * 5000)),
]


@pytest.mark.parametrize("field,request_msg", BAD_REQUESTS, ids=[f"{i}-{f}" for i, (f, _) in enumerate(BAD_REQUESTS)])
async def test_bad_requests_get_invalid_argument_naming_the_field(make_settings, field, request_msg):
    async with Stack(make_settings()) as stack:
        for call in (stack.stub.Generate(request_msg),
                     stack.stub.GenerateStream(pb.GenerateStreamRequest.FromString(request_msg.SerializeToString()))):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                if isinstance(call, grpc.aio.UnaryStreamCall):
                    async for _ in call:
                        pass
                else:
                    await call
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert e.value.details().startswith(field), e.value.details()
        assert not stack.worker.scheduler.active and stack.worker.active == 0  # nothing left behind


async def test_wrong_wire_types_and_bad_bytes_are_invalid_argument(make_settings):
    async with Stack(make_settings()) as stack:
        options = bytes([0x12, 3]) + b"abc"  # max_new_tokens (varint) sent as a string
        wrong_type = bytes([0x0A, 2]) + b"hi" + bytes([0x1A, len(options)]) + options
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _raw(stack)(wrong_type)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "options.max_new_tokens" in e.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _raw(stack)(bytes([0x0A, 2, 0xFF, 0xFE]))  # prompt that is not UTF-8
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "GenerateRequest" in e.value.details()


async def test_auth_token_is_required_when_configured(make_settings):
    async with Stack(make_settings(**{"worker.auth_token": "s3cret"})) as stack:
        request = pb.GenerateRequest(prompt="x", options=pb.GenerationOptions(mode=pb.MODE_GREEDY, max_new_tokens=2))
        for metadata in (None, [("authorization", "Bearer nope")]):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stack.stub.Generate(request, metadata=metadata)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "authorization" in e.value.details()
        ok = await stack.stub.Generate(request, metadata=[("authorization", "Bearer s3cret")])
        assert ok.stats.completion_tokens == 2


async def test_admission_limits_answer_resource_exhausted(make_settings):
    async with Stack(make_settings(**{"worker.max_concurrent_requests": 1})) as stack:
        stack.servicer.hold = asyncio.Event()
        first = asyncio.create_task(stack.generate(PROMPT, mode=pb.MODE_S2T, max_new_tokens=8, block_size=4))
        await asyncio.sleep(0.2)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stack.generate(PROMPT, mode=pb.MODE_GREEDY, max_new_tokens=2)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        stack.servicer.hold.set()
        assert (await first).stats.completion_tokens == 8
    async with Stack(make_settings(**{"worker.requests_per_s": 1})) as stack:
        await stack.generate(PROMPT, mode=pb.MODE_GREEDY, max_new_tokens=1)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stack.generate(PROMPT, mode=pb.MODE_GREEDY, max_new_tokens=1)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in e.value.details()


async def test_health_and_reflection(make_settings):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with Stack(make_settings()) as stack:
        health = health_pb2_grpc.HealthStub(stack.channel)
        for service in ("", "s2t.v1.GenerationService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(stack.channel)
        async for resp in refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])):
            names = {s.name for s in resp.list_services_response.service}
            assert "s2t.v1.GenerationService" in names
            break


async def test_worker_refuses_a_selector_with_another_vocabulary(make_settings, tmp_path):
    from tiny import make_tiny_model_dir, make_tokenizer

    other = make_tiny_model_dir(tmp_path / "other", seed=3)
    tok = make_tokenizer()
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    with pytest.raises(RuntimeError, match="vocabulary"):
        async with Stack(make_settings(**{"selector.model": str(other)})):
            pass

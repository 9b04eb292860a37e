"""The selector's rule, session protocol and validation, against full recomputation with the tiny LLM."""

import asyncio
import random

import grpc
import pytest
import torch

from llm_selector.core import SelectorCore, SelectorError
from s2t.v1 import selector_pb2 as pb
from s2t.runtime import Engine, load_model
from s2t.triggers import kl_on_support

ALWAYS = pb.SelectTriggerSpec(kind=pb.SELECT_TRIGGER_ALWAYS)


@pytest.fixture
def core(make_settings, tiny_pair):
    settings = make_settings(**{"selector.log_enabled": False})
    return SelectorCore(Engine(load_model(str(tiny_pair[1]), tiny_pair[1].parent, "native")), settings.selector)


def llm_logp(llm, seq):
    with torch.no_grad():
        return torch.log_softmax(llm(torch.tensor([seq])).logits[0, -1], -1)


def expected_index(llm, context, candidates):
    return int(torch.argmax(llm_logp(llm, context)[torch.tensor(candidates)]))


def position(pos, candidates, **kw):
    return pb.CandidatePosition(position=pos, candidate_ids=candidates, **kw)


def run(core, req, kind="select"):
    return asyncio.run(core.handle(req, kind))


def test_pick_is_argmax_over_candidates_for_every_delta_size(core, tiny_models):
    _, llm = tiny_models
    rng = random.Random(1)
    seq = [rng.randrange(259) for _ in range(6)]
    length, step = 0, 0
    for delta_size in range(1, 7):
        new = [rng.randrange(259) for _ in range(delta_size)]
        seq = seq + new if length else seq
        delta = seq[length:]
        positions = []
        for pos in range(length + 1, len(seq) + 1):  # every position the delta lets the selector check
            cands = rng.sample(range(259), 5)
            positions.append(position(pos, cands))
        req = pb.SelectRequest(session_id="s", step=step, prefix_length=length, token_ids=delta, positions=positions,
                               trigger=pb.SelectTriggerSpec(kind=pb.SELECT_TRIGGER_WORKER))
        reply = run(core, req)
        assert reply.outcome == pb.SELECT_OUTCOME_ACCEPTED  # the worker trigger never fired
        assert [s.position for s in reply.selections] == [p.position for p in positions]
        for sel, p in zip(reply.selections, positions):
            assert sel.index == expected_index(llm, seq[:p.position], list(p.candidate_ids))
        assert reply.session_length == len(seq)
        length, step = len(seq), step + 1


def test_concurrent_sessions_share_one_batch_and_each_gets_its_own_pick(core, tiny_models):
    _, llm = tiny_models
    rng = random.Random(3)
    requests = []
    for i in range(6):
        context = [rng.randrange(259) for _ in range(4 + i)]  # ragged: every session a different length
        cands = rng.sample(range(259), 4)
        requests.append((context, cands, pb.SelectRequest(
            session_id=f"b{i}", step=0, prefix_length=0, token_ids=context,
            positions=[position(len(context), cands)], trigger=pb.SelectTriggerSpec(kind=pb.SELECT_TRIGGER_WORKER))))

    async def all_at_once():
        return await asyncio.gather(*[core.handle(r, "select") for _, _, r in requests])

    replies = asyncio.run(all_at_once())
    assert core.counters["batches"] == 1 and core.counters["batched_sessions"] == 6
    for (context, cands, _), reply in zip(requests, replies):
        assert reply.selections[0].index == expected_index(llm, context, cands)


def test_a_mixed_batch_answers_each_select_as_it_is_answered_alone(core, make_settings, tiny_pair):
    """The selector scores a batch's positions at once (one argmax, one KL over the KL requests' rows): a batch
    of Selects with every trigger kind, a takeover, ragged K and supports, several positions and a prefill gets,
    request by request, the reply each gets on a selector of its own."""
    rng = random.Random(5)

    def positions(start: int, n: int, k: int, support: int, probs: bool) -> list:
        out = []
        for j in range(n):
            ids = rng.sample(range(259), k + support)
            weights = [rng.random() for _ in ids]
            total = sum(weights)
            extra = dict(candidate_probs=[w / total for w in weights[:k]],
                         support_probs=[w / total for w in weights[k:]]) if probs else {}
            out.append(position(start + j, ids[:k], support_ids=ids[k:], worker_triggered=j % 2 == 1, **extra))
        return out

    kl = pb.SelectTriggerSpec(kind=pb.SELECT_TRIGGER_KL, kl_threshold=0.05)
    shapes = [  # (trigger, positions (count, K, support), probabilities, takeover)
        (kl, (3, 4, 6), True, False), (ALWAYS, (2, 3, 0), False, False), (kl, (1, 2, 9), True, False),
        (pb.SelectTriggerSpec(kind=pb.SELECT_TRIGGER_WORKER), (4, 5, 2), True, False), (None, None, False, False),
        (kl, (4, 8, 3), True, True), (ALWAYS, (1, 1, 0), False, True)]
    requests = []
    for i, (trigger, shape, probs, takeover) in enumerate(shapes):
        context = [rng.randrange(259) for _ in range(5 + i)]
        block = [rng.randrange(259) for _ in range(shape[0] if shape else 3)]
        requests.append(pb.SelectRequest(
            session_id=f"m{i}", step=0, prefix_length=0, token_ids=context + block, takeover=takeover,
            positions=positions(len(context), *shape, probs) if shape else [], trigger=trigger or ALWAYS))

    async def all_at_once(selector):
        return await asyncio.gather(*[selector.handle(r, "select") for r in requests])

    together = asyncio.run(all_at_once(core))
    assert core.counters["batches"] == 1 and core.counters["batched_sessions"] == len(requests)
    assert any(r.outcome == pb.SELECT_OUTCOME_DIVERGED for r in together)
    assert any(len(r.selections) > 1 for r in together)
    settings = make_settings(**{"selector.log_enabled": False})
    for request, reply in zip(requests, together):
        alone = SelectorCore(Engine(load_model(str(tiny_pair[1]), tiny_pair[1].parent, "native")), settings.selector)
        assert run(alone, request) == reply, request.session_id


def test_divergence_stops_the_reply_and_cuts_the_session(core, tiny_models):
    _, llm = tiny_models
    context = [10, 20, 30, 40]
    logp = llm_logp(llm, context)
    worst, best = int(torch.argmin(logp)), int(torch.argmax(logp))
    req = pb.SelectRequest(session_id="d", step=0, prefix_length=0, token_ids=context + [5, 6],
                           positions=[position(4, [worst, best]), position(5, [1, 2]), position(6, [3, 4])],
                           trigger=ALWAYS)
    reply = run(core, req)
    assert reply.outcome == pb.SELECT_OUTCOME_DIVERGED
    assert [(s.position, s.index, s.diverged) for s in reply.selections] == [(4, 1, True)]
    assert reply.session_length == 4
    session = core.sessions.get("d")
    assert session.tokens == context and session.cache.length == 4
    # the next request builds on the cut session and matches recomputation
    follow = pb.SelectRequest(session_id="d", step=1, prefix_length=4, token_ids=[best, 7],
                              positions=[position(6, [8, 9, 11])], trigger=ALWAYS)
    got = run(core, follow).selections[0].index
    assert got == expected_index(llm, context + [best, 7], [8, 9, 11])


def test_resync_and_eviction_recover_with_full_context(core, tiny_models):
    _, llm = tiny_models
    run(core, pb.SelectRequest(session_id="r", step=0, prefix_length=0, token_ids=[1, 2, 3],
                               positions=[position(3, [4, 5])], trigger=ALWAYS))
    core.sessions.remove("r")  # evicted, or the replica restarted
    with pytest.raises(SelectorError) as e:
        run(core, pb.SelectRequest(session_id="r", step=1, prefix_length=3, token_ids=[4],
                                   positions=[position(4, [6, 7])], trigger=ALWAYS))
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "session_id" in e.value.message
    reply = run(core, pb.SelectRequest(session_id="r", step=2, prefix_length=0, token_ids=[1, 2, 3, 4],
                                       positions=[position(4, [6, 7])], trigger=ALWAYS))
    assert reply.selections[0].index == expected_index(llm, [1, 2, 3, 4], [6, 7])
    # a full-context request on a live session restarts it (worker-side resync)
    reply = run(core, pb.SelectRequest(session_id="r", step=3, prefix_length=0, token_ids=[9, 9],
                                       positions=[position(2, [1, 2, 3])], trigger=ALWAYS))
    assert reply.selections[0].index == expected_index(llm, [9, 9], [1, 2, 3])
    assert core.sessions.get("r").tokens == [9, 9]


def test_lru_and_budget_eviction(make_settings, tiny_pair):
    settings = make_settings(**{"selector.max_sessions": 2, "selector.log_enabled": False})
    core = SelectorCore(Engine(load_model(str(tiny_pair[1]), tiny_pair[1].parent, "native")), settings.selector)
    for i in range(3):
        run(core, pb.SelectRequest(session_id=f"s{i}", step=0, prefix_length=0, token_ids=[1, 2],
                                   positions=[position(2, [3])], trigger=ALWAYS))
    assert "s0" not in core.sessions and "s1" in core.sessions and "s2" in core.sessions
    core.sessions.idle_ttl_s = 0.0
    core.sessions.evict(now=float("inf"))
    assert len(core.sessions) == 0


def test_retry_returns_the_same_reply_and_advances_once(core):
    req = pb.SelectRequest(session_id="i", step=0, prefix_length=0, token_ids=[1, 2, 3],
                           positions=[position(2, [4, 5, 6]), position(3, [7, 8])], trigger=ALWAYS)
    first = run(core, req)
    forwards = core.counters["forwards"]
    length = len(core.sessions.get("i").tokens)
    again = run(core, req)
    assert again == first
    assert core.counters["forwards"] == forwards and core.counters["replayed"] == 1
    assert len(core.sessions.get("i").tokens) == length and core.sessions.get("i").next_step == 1


def test_out_of_order_steps_are_applied_in_order(core, tiny_models):
    _, llm = tiny_models
    first = pb.SelectRequest(session_id="o", step=0, prefix_length=0, token_ids=[1, 2, 3],
                             positions=[position(3, [4])], trigger=ALWAYS)
    second = pb.SelectRequest(session_id="o", step=1, prefix_length=2, token_ids=[3, 4, 5],
                              positions=[position(5, [6, 7])], trigger=ALWAYS)
    run(core, first)

    async def both():
        third = pb.SelectRequest(session_id="o", step=2, prefix_length=5, token_ids=[6],
                                 positions=[position(6, [8, 9])], trigger=ALWAYS)
        t3 = asyncio.create_task(core.handle(third, "select"))
        await asyncio.sleep(0.05)  # step 2 arrives first and waits for step 1
        assert not t3.done()
        r2 = await core.handle(second, "select")
        return r2, await t3

    r2, r3 = asyncio.run(both())
    assert r2.selections[0].index == expected_index(llm, [1, 2, 3, 4, 5], [6, 7])
    assert r3.selections[0].index == expected_index(llm, [1, 2, 3, 4, 5, 6], [8, 9])


def test_a_prefill_extends_the_session_and_the_block_after_it_scores_as_on_the_full_context(core, tiny_models):
    _, llm = tiny_models
    assert core.info().accepts_prefill
    prompt, drafts = [11, 12, 13, 14, 15], [16, 17, 18]
    positions = [position(5, [16, 3, 4]), position(6, [17, 5]), position(7, [18, 6, 7])]
    reply = run(core, pb.SelectRequest(session_id="f", step=0, prefix_length=0, token_ids=prompt[:-1], trigger=ALWAYS))
    assert (reply.outcome, list(reply.selections), reply.session_length) == (pb.SELECT_OUTCOME_ACCEPTED, [], 4)
    assert core.sessions.get("f").tokens == prompt[:-1] and core.sessions.get("f").cache.length == 4
    block = pb.SelectRequest(session_id="f", step=1, prefix_length=4, token_ids=[prompt[-1]] + drafts[:-1],
                             positions=positions, trigger=ALWAYS)
    whole = pb.SelectRequest(session_id="w", step=0, prefix_length=0, token_ids=prompt + drafts[:-1],
                             positions=positions, trigger=ALWAYS)
    got, want = run(core, block), run(core, whole)
    assert [(s.position, s.index, s.diverged) for s in got.selections] == [
        (s.position, s.index, s.diverged) for s in want.selections]
    assert got.session_length == want.session_length
    sequence = prompt + drafts
    assert [s.index for s in got.selections] == [
        expected_index(llm, sequence[:p.position], list(p.candidate_ids)) for p in positions[:len(got.selections)]]


def test_missing_step_is_given_up_and_a_late_one_refused(core):
    run(core, pb.SelectRequest(session_id="g", step=0, prefix_length=0, token_ids=[1, 2],
                               positions=[position(2, [3])], trigger=ALWAYS))
    later = pb.SelectRequest(session_id="g", step=5, prefix_length=2, token_ids=[3],
                             positions=[position(3, [4])], trigger=ALWAYS)
    assert run(core, later).session_length == 3  # waited step_gap_wait_s for steps 1..4, then went ahead
    with pytest.raises(SelectorError) as e:
        run(core, pb.SelectRequest(session_id="g", step=2, prefix_length=2, token_ids=[3],
                                   positions=[position(3, [4])], trigger=ALWAYS))
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "step" in e.value.message


def test_prefix_beyond_the_session_is_refused_and_recorded(core):
    run(core, pb.SelectRequest(session_id="p", step=0, prefix_length=0, token_ids=[1, 2],
                               positions=[position(2, [3])], trigger=ALWAYS))
    bad = pb.SelectRequest(session_id="p", step=1, prefix_length=9, token_ids=[3],
                           positions=[position(10, [4])], trigger=ALWAYS)
    for _ in range(2):  # the retry gets the same answer
        with pytest.raises(SelectorError) as e:
            run(core, bad)
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "prefix_length" in e.value.message


def test_kl_trigger_uses_student_teacher_kl_on_the_support(core, tiny_models):
    _, llm = tiny_models
    context = [3, 1, 4, 1, 5]
    logp = llm_logp(llm, context)
    cands, support = [7, 8, 9], [10, 11]
    probs, sprobs = [0.5, 0.2, 0.1], [0.1, 0.05]
    kl = kl_on_support(cands + support, probs + sprobs, logp)
    # reference: renormalise both on the support and sum p_s log(p_s / p_l)
    p_s = torch.tensor(probs + sprobs, dtype=torch.float64)
    p_s = p_s / p_s.sum()
    p_l = logp[torch.tensor(cands + support)].exp()
    p_l = p_l / p_l.sum()
    assert kl == pytest.approx(float((p_s * (p_s / p_l).log()).sum()), rel=1e-9)
    for threshold, fires in ((kl * 0.5, True), (kl * 2, False)):
        sid = f"kl{fires}"
        reply = run(core, pb.SelectRequest(
            session_id=sid, step=0, prefix_length=0, token_ids=context,
            positions=[position(5, cands, candidate_probs=probs, support_ids=support, support_probs=sprobs)],
            trigger=pb.SelectTriggerSpec(kind=pb.SELECT_TRIGGER_KL, kl_threshold=threshold)))
        sel = reply.selections[0]
        assert sel.trigger_value == pytest.approx(kl, rel=1e-6)
        assert sel.diverged == (fires and sel.index != 0)


def test_kl_rate_maps_through_the_calibrated_table(make_settings, tiny_pair):
    settings = make_settings(**{"selector.log_enabled": False})
    core = SelectorCore(Engine(load_model(str(tiny_pair[1]), tiny_pair[1].parent, "native")), settings.selector,
                        kl_thresholds={0.1: 2.0, 0.2: 1.0})
    assert core._kl_threshold(0.15) == pytest.approx(1.5)
    with pytest.raises(SelectorError) as e:
        core._kl_threshold(0.5)
    assert "kl_rate" in e.value.message
    assert core.info().kl_thresholds == {"0.1": 2.0, "0.2": 1.0}


def test_decode_generates_greedily_and_keeps_the_session(core, tiny_models):
    _, llm = tiny_models
    req = pb.DecodeRequest(session_id="dec", step=0, prefix_length=0, token_ids=[1, 2, 3], max_tokens=5)
    reply = run(core, req, "decode")
    seq = [1, 2, 3]
    for _ in range(5):
        seq.append(int(torch.argmax(llm_logp(llm, seq))))
    assert list(reply.token_ids) == seq[3:]
    assert reply.session_length == len(seq) - 1


BAD = [
    ("session_id", lambda r: r.ClearField("session_id")),
    ("session_id", lambda r: setattr(r, "session_id", "x" * 200)),
    ("token_ids", lambda r: r.ClearField("token_ids")),
    ("token_ids[1]", lambda r: r.token_ids.__setitem__(1, 999_999)),
    ("token_ids", lambda r: r.token_ids.extend([1] * 9000)),
    ("positions", lambda r: r.positions.extend(position(4 + i, [1]) for i in range(64))),  # max_positions 64
    ("positions[0].candidate_ids", lambda r: r.positions[0].ClearField("candidate_ids")),
    ("positions[0].candidate_ids", lambda r: r.positions[0].candidate_ids.extend(range(20, 40))),
    ("positions[0].candidate_ids[0]", lambda r: r.positions[0].candidate_ids.__setitem__(0, -1)),
    ("positions[0].candidate_ids", lambda r: r.positions[0].candidate_ids.__setitem__(1, 4)),
    ("positions[0].candidate_probs", lambda r: r.positions[0].candidate_probs.extend([0.5])),
    ("positions[0].candidate_probs[0]", lambda r: r.positions[0].candidate_probs.extend([1.5, 0.1])),
    ("positions[0].candidate_probs[1]", lambda r: r.positions[0].candidate_probs.extend([0.5, float("nan")])),
    ("positions[0].support_probs[1]", lambda r: (r.positions[0].support_ids.extend([7, 8]),
                                                 r.positions[0].support_probs.extend([0.0, -float("inf")]))),
    ("positions[0].support_probs[0]", lambda r: (r.positions[0].support_ids.extend([7]),
                                                 r.positions[0].support_probs.extend([float("inf")]))),
    ("positions[0].support_ids[1]", lambda r: r.positions[0].support_ids.extend([7, 151_936])),
    ("positions[0].position", lambda r: setattr(r.positions[0], "position", 9)),
    ("positions[1].position", lambda r: r.positions.append(position(3, [1]))),
    ("trigger.kind", lambda r: r.trigger.ClearField("kind")),
    ("trigger.kl_rate", lambda r: setattr(r.trigger, "kind", pb.SELECT_TRIGGER_KL)),
]


@pytest.mark.parametrize("field,mutate", BAD, ids=[f"{i}-{f}" for i, (f, _) in enumerate(BAD)])
def test_bad_select_requests_name_the_field(core, field, mutate):
    req = pb.SelectRequest(session_id="bad", step=0, prefix_length=0, token_ids=[1, 2, 3],
                           positions=[position(3, [4, 5])], trigger=ALWAYS)
    mutate(req)
    assert_refused_naming(core, req, field)


def assert_refused_naming(core, req, field: str) -> None:
    """req is refused as INVALID_ARGUMENT, the message starting with the bad field's name, and its session was
    neither created nor lost."""
    with pytest.raises(SelectorError) as e:
        run(core, req)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.message.startswith(field), e.value.message
    assert req.session_id not in core.sessions


# A bad value past the first position: the selector checks a request's ids and probabilities all at once and
# walks the positions only to name the bad one.
LATER_BAD = [
    ("positions[2].support_ids[1]", lambda r: r.positions[2].support_ids.extend([10, 151_936])),
    ("positions[1].candidate_ids[0]", lambda r: r.positions[1].candidate_ids.__setitem__(0, -3)),
    ("positions[2].candidate_probs[1]", lambda r: r.positions[2].candidate_probs.__setitem__(1, 1.01)),
    ("positions[1].candidate_probs[0]", lambda r: r.positions[1].candidate_probs.__setitem__(0, float("nan"))),
]


@pytest.mark.parametrize("field,mutate", LATER_BAD, ids=[f"{i}-{f}" for i, (f, _) in enumerate(LATER_BAD)])
def test_bad_values_past_the_first_position_are_named(core, field, mutate):
    req = pb.SelectRequest(session_id="bad", step=0, prefix_length=0, token_ids=[1, 2, 3, 4],
                           positions=[position(2 + j, [4 + 2 * j, 5 + 2 * j], candidate_probs=[0.6, 0.3])
                                      for j in range(3)], trigger=ALWAYS)
    assert run(core, req).outcome in (pb.SELECT_OUTCOME_ACCEPTED, pb.SELECT_OUTCOME_DIVERGED)  # valid as built
    req.session_id = "bad2"  # a new session: the bad request must not create it
    mutate(req)
    assert_refused_naming(core, req, field)


def test_bad_decode_requests_name_the_field(core):
    for field, req in [("max_tokens", pb.DecodeRequest(session_id="d", token_ids=[1], max_tokens=0)),
                       ("max_tokens", pb.DecodeRequest(session_id="d", token_ids=[1], max_tokens=10_000)),
                       ("stop_ids[0]", pb.DecodeRequest(session_id="d", token_ids=[1], max_tokens=1,
                                                         stop_ids=[10 ** 6]))]:
        with pytest.raises(SelectorError) as e:
            run(core, req, "decode")
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.message.startswith(field)


def test_health_reports_a_dead_selection_log_writer(make_settings):
    """Ray Serve restarts a replica whose check_health raises: a selector that silently stopped logging must."""
    import threading

    core = SelectorCore.from_settings(make_settings())
    assert core.problem() is None
    alive = core.log._thread
    core.log._thread = threading.Thread(target=lambda: None)  # a writer thread that is not running
    assert "writer thread died" in core.problem()
    core.log._thread = alive
    core.close()
    assert core.problem() is None  # closed on purpose: not a fault


def test_an_idle_selector_waits_only_for_the_sessions_of_its_last_busy_spell(make_settings, tiny_pair):
    """batch_wait_timeout_s bounds how long an idle selector waits for the sessions it served in its last busy
    spell; it does not wait when they have all sent their next request, when one went away, or for a lone
    session. With a wait of 60 s, a request that waited it would not finish within the 30 s each round is
    given (a hang check, not a timing threshold: the rule decides between no wait and a minute)."""
    settings = make_settings(**{"selector.log_enabled": False, "selector.batch_wait_timeout_s": 60.0})
    core = SelectorCore(Engine(load_model(str(tiny_pair[1]), tiny_pair[1].parent, "native")), settings.selector)
    lengths: dict[str, int] = {}

    def select(sid: str, step: int) -> pb.SelectRequest:
        block = [(7 * step + len(sid)) % 250 + 1, 3]
        context = lengths.get(sid, 0)
        tokens = block if context else [1, 2, 3] + block
        return pb.SelectRequest(session_id=sid, step=step, prefix_length=context, token_ids=tokens,
                                positions=[position(context + len(tokens), [4, 5])], trigger=ALWAYS)

    async def send(sid: str, step: int, delay: float = 0.0):
        await asyncio.sleep(delay)
        reply = await core.handle(select(sid, step), "select")
        lengths[sid] = reply.session_length
        return reply

    def round_of(*sends) -> tuple[int, int]:
        """(batches, sessions batched) for these sends, all started at once."""
        batches, sessions = core.counters["batches"], core.counters["batched_sessions"]

        async def together():
            await asyncio.wait_for(asyncio.gather(*sends), timeout=30)

        asyncio.run(together())
        return core.counters["batches"] - batches, core.counters["batched_sessions"] - sessions

    # a lone session: the first request (no spell before) and the next ones go at once
    for step in range(3):
        assert round_of(send("lone", step)) == (1, 1)
    assert core.close_session("lone").existed
    # three sessions arriving together share a batch
    assert round_of(send("a", 0), send("b", 0), send("c", 0)) == (1, 3)
    # the selector waits for c (served in its last spell), which comes 0.3 s after a and b: still one batch
    assert round_of(send("a", 1), send("b", 1), send("c", 1, delay=0.3)) == (1, 3)
    # c went away: a and b do not wait for it
    assert core.close_session("c").existed
    assert round_of(send("a", 2), send("b", 2)) == (1, 2)
    # a newcomer does not make the selector wait; the spell's sessions come together again
    assert round_of(send("a", 3), send("b", 3), send("d", 0)) == (1, 3)

"""Mode takeover (the paper's upper reference for selection): where the trigger fires, the LLM's own
full-vocabulary top-1 replaces the SLM's token. Checked against full recomputation with the tiny pair, on the
selector's rule alone and end to end through the worker."""

import asyncio

import pytest
import torch

from s2t.modes import Mode
from s2t.selection_log import read_records
from s2t.v1 import generation_pb2 as gen_pb
from s2t.v1 import selector_pb2 as pb
from servers import Stack
from test_selector_core import core, llm_logp  # noqa: F401 - core is a fixture
from test_worker import kl_fires

PROMPT = "What is 2 + 3?"
ALWAYS = pb.SelectTriggerSpec(kind=pb.SELECT_TRIGGER_ALWAYS)


def reference_takeover(slm, llm, prompt: list[int], max_new: int, stop_ids, fires=lambda step, p_s, logp_l: True):
    """The offline takeover loop, by full recomputation: the SLM's top-1 at every step, replaced by the LLM's
    argmax over the whole vocabulary where `fires(step, slm_probs, llm_logprobs)`. Also returns at how many
    replaced steps the LLM's token was outside the SLM's top-8 (what s2t with K=8 could never pick)."""
    seq, outside = list(prompt), 0
    with torch.no_grad():
        for step in range(max_new):
            ids = torch.tensor([seq])
            p_s = torch.softmax(slm(ids).logits[0, -1], -1)
            logp_l = torch.log_softmax(llm(ids).logits[0, -1], -1)
            token = int(p_s.topk(1).indices[0])
            if fires(step, p_s, logp_l):
                top1 = int(torch.argmax(logp_l))
                outside += top1 not in p_s.topk(8).indices.tolist()
                token = top1
            seq.append(token)
            if token in stop_ids:
                break
    return seq[len(prompt):], outside


def prompt_ids(stack):
    return stack.worker.prompt_ids(gen_pb.GenerateRequest(prompt=PROMPT))


# ---- the selector's rule ---------------------------------------------------------------------------------

def test_takeover_diverges_on_the_llm_top1_even_when_it_is_no_candidate(core, tiny_models):
    _, llm = tiny_models
    context = [10, 20, 30, 40, 50]
    at4, at5 = llm_logp(llm, context[:4]), llm_logp(llm, context)
    top4, top5 = int(torch.argmax(at4)), int(torch.argmax(at5))
    worst4 = int(torch.argmin(at4))
    # position 4: the draft is the LLM's top-1 -> accepted, though candidate 1 is no better: index 0, token top4
    # position 5: the LLM's top-1 is no candidate, and the candidates' argmax is candidate 0 (what s2t would keep)
    others5 = [t for t in torch.argsort(at5, descending=True).tolist() if t != top5]
    cands5 = [others5[0], others5[-1]]
    req = pb.SelectRequest(session_id="t", step=0, prefix_length=0, token_ids=context + [7],
                           positions=[pb.CandidatePosition(position=4, candidate_ids=[top4, worst4]),
                                      pb.CandidatePosition(position=5, candidate_ids=cands5),
                                      pb.CandidatePosition(position=6, candidate_ids=[1, 2])],
                           trigger=ALWAYS, takeover=True)
    reply = asyncio.run(core.handle(req, "select"))
    assert reply.outcome == pb.SELECT_OUTCOME_DIVERGED
    assert [(s.position, s.index, s.diverged, s.token_id) for s in reply.selections] == [
        (4, 0, False, top4), (5, 0, True, top5)]
    assert reply.session_length == 5 and core.sessions.get("t").tokens == context  # cut back to the divergence
    # the same candidates without takeover: the argmax over them is the draft, nothing diverges, no token is sent
    plain = pb.SelectRequest(session_id="p", step=0, prefix_length=0, token_ids=context,
                             positions=[pb.CandidatePosition(position=5, candidate_ids=cands5)], trigger=ALWAYS)
    reply = asyncio.run(core.handle(plain, "select"))
    assert reply.outcome == pb.SELECT_OUTCOME_ACCEPTED
    assert [(s.index, s.diverged, s.token_id) for s in reply.selections] == [(0, False, 0)]


def test_takeover_respects_the_trigger(core, tiny_models):
    """A worker-triggered takeover only diverges where the worker's trigger fired."""
    _, llm = tiny_models
    context = [3, 1, 4, 1, 5]
    top = int(torch.argmax(llm_logp(llm, context)))
    draft = (top + 1) % 259
    quiet = pb.SelectRequest(session_id="q", step=0, prefix_length=0, token_ids=context,
                             positions=[pb.CandidatePosition(position=5, candidate_ids=[draft])],
                             trigger=pb.SelectTriggerSpec(kind=pb.SELECT_TRIGGER_WORKER), takeover=True)
    reply = asyncio.run(core.handle(quiet, "select"))
    assert reply.outcome == pb.SELECT_OUTCOME_ACCEPTED and reply.selections[0].token_id == top
    fired = pb.SelectRequest(session_id="f", step=0, prefix_length=0, token_ids=context,
                             positions=[pb.CandidatePosition(position=5, candidate_ids=[draft], worker_triggered=True)],
                             trigger=pb.SelectTriggerSpec(kind=pb.SELECT_TRIGGER_WORKER), takeover=True)
    reply = asyncio.run(core.handle(fired, "select"))
    assert reply.outcome == pb.SELECT_OUTCOME_DIVERGED and reply.selections[0].token_id == top


# ---- the worker, end to end ------------------------------------------------------------------------------

@pytest.mark.parametrize("block_size", [1, 4, 8])
async def test_takeover_with_trigger_always_equals_the_reference_loop(make_settings, tiny_models, block_size):
    slm, llm = tiny_models
    async with Stack(make_settings(**{"worker.max_inflight_blocks": 3})) as stack:
        expected, outside = reference_takeover(slm, llm, prompt_ids(stack), 40, set(stack.worker.lm.stop_ids))
        final = await stack.generate(PROMPT, mode=gen_pb.MODE_TAKEOVER, max_new_tokens=40, block_size=block_size)
        llm_alone = await stack.generate(PROMPT, mode=gen_pb.MODE_LLM, max_new_tokens=40)
        stack.core.close()  # closes the selection log's segment: readable below
        records = read_records(stack.settings.selection_log_dir())
    assert list(final.token_ids) == expected
    assert outside > 0, "the tiny pair should disagree beyond the SLM's top-K, or this test shows nothing s2t cannot"
    # trigger always: every token is the LLM's argmax, i.e. the LLM's greedy decoding
    assert list(llm_alone.token_ids) == expected
    st = final.stats
    assert st.mode_used == gen_pb.MODE_TAKEOVER and not st.degraded_reason
    assert st.picks_changed > 0 and st.unverified_tokens == 0 and st.verified_tokens == st.completion_tokens
    # the selection log says these were takeover requests, and its divergences are where the session was cut
    assert records and all(r.takeover for r in records)
    diverged = [p for r in records for p in r.positions if p.diverged and not p.after_divergence]
    assert diverged and all(p.llm_top1 != p.candidate_ids[0] for p in diverged)


async def test_takeover_with_kl_trigger_equals_the_reference_loop(make_settings, tiny_models):
    slm, llm = tiny_models
    threshold = 0.5

    fires = kl_fires(threshold)

    settings = make_settings(**{"worker.trigger": "kl", "selector.kl_thresholds": {0.1: threshold}})
    async with Stack(settings) as stack:
        expected, _ = reference_takeover(slm, llm, prompt_ids(stack), 40, set(stack.worker.lm.stop_ids), fires)
        always, _ = reference_takeover(slm, llm, prompt_ids(stack), 40, set(stack.worker.lm.stop_ids))
        final = await stack.generate(PROMPT, mode=gen_pb.MODE_TAKEOVER, max_new_tokens=40, block_size=8,
                                     trigger_rate=0.1)
    assert list(final.token_ids) == expected
    assert expected != always, "the KL trigger should leave some SLM tokens standing"
    assert final.stats.positions_checked > 0 and final.stats.picks_changed > 0


async def test_takeover_without_a_selector_degrades_to_greedy(make_settings):
    async with Stack(make_settings(**{"worker.breaker_failures": 1})) as stack:
        greedy = await stack.generate(PROMPT, mode=gen_pb.MODE_GREEDY, max_new_tokens=12)
        await stack.stop_selector()
        final = await stack.generate(PROMPT, mode=gen_pb.MODE_TAKEOVER, max_new_tokens=12, block_size=4)
    assert list(final.token_ids) == list(greedy.token_ids)
    assert final.stats.mode_requested == gen_pb.MODE_TAKEOVER and final.stats.mode_used == gen_pb.MODE_GREEDY
    assert final.stats.unverified_tokens == 12 and "unverified" in final.stats.degraded_reason


def test_takeover_is_a_verified_selector_mode():
    assert Mode("takeover") is Mode.TAKEOVER and Mode.from_proto(gen_pb.MODE_TAKEOVER) is Mode.TAKEOVER
    assert Mode.TAKEOVER.proto == gen_pb.MODE_TAKEOVER
    assert Mode.TAKEOVER.verified and Mode.TAKEOVER.selector_verified
    assert not Mode.S2T_LOCAL.selector_verified and not Mode.GREEDY.verified

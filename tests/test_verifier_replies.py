"""A selector reply the worker cannot apply (another build, a broken selector) degrades that block, never the
request: RemoteSelectorSession refuses a divergence at a position it did not ask about, an index outside the
candidates, or a takeover token outside the vocabulary."""

from types import SimpleNamespace

from s2t.v1 import generation_pb2 as gen_pb
from s2t.v1 import selector_pb2 as sel_pb
from slm_worker.verifiers import Block, RemoteSelector, VerdictKind


class ScriptedClient:
    def __init__(self, reply):
        self.reply = reply

    async def select(self, request, deadline):
        return self.reply


def request_for(takeover: bool = False) -> sel_pb.SelectRequest:
    return sel_pb.SelectRequest(session_id="s", positions=[
        sel_pb.CandidatePosition(position=p, candidate_ids=[1, 2, 3], candidate_probs=[0.5, 0.3, 0.2])
        for p in (5, 6)], takeover=takeover)


async def verdict_for(selection: sel_pb.Selection, takeover: bool = False):
    reply = sel_pb.SelectResponse(session_id="s", outcome=sel_pb.SELECT_OUTCOME_DIVERGED, selections=[selection],
                                  session_length=5)
    session = RemoteSelector(ScriptedClient(reply)).open(SimpleNamespace(session_id="s"))
    seq = SimpleNamespace(stats=gen_pb.GenerationStats(), opts=SimpleNamespace(selector_deadline_s=1.0),
                          engine=SimpleNamespace(vocab_size=100))
    verdict = await session._call(seq, Block(5, 7, [5, 6]), request_for(takeover))
    return verdict, seq.stats


async def test_a_divergence_the_worker_can_apply_is_taken():
    verdict, stats = await verdict_for(sel_pb.Selection(position=6, index=2, diverged=True))
    assert (verdict.kind, verdict.position, verdict.index) == (VerdictKind.DIVERGED, 6, 2)
    verdict, _ = await verdict_for(sel_pb.Selection(position=5, index=0, diverged=True, token_id=99), takeover=True)
    assert (verdict.kind, verdict.token) == (VerdictKind.DIVERGED, 99)


async def test_replies_that_cannot_be_applied_degrade_the_block_naming_why():
    cases = [(sel_pb.Selection(position=6, index=3, diverged=True), False, "index 3 outside the 3 candidates"),
             (sel_pb.Selection(position=9, index=1, diverged=True), False, "position 9, which the request did not"),
             (sel_pb.Selection(position=5, index=1, diverged=True, token_id=100), True,
              "token id 100 outside the 100-token vocabulary")]
    for selection, takeover, why in cases:
        verdict, stats = await verdict_for(selection, takeover)
        assert verdict.kind is VerdictKind.UNAVAILABLE and why in verdict.reason, verdict
        assert stats.selector_failures == 1

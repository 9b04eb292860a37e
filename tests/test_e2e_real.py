"""End to end on the real embedded pair: fetch (first run), Ray Serve selector, worker, one GSM8K question.

Slow (fetch ~4 min on a new machine, start-up ~2 min, generation ~1-2 min); deselect with -m "not real_models".
"""

import pytest

from s2t.v1 import generation_pb2 as pb
from s2t import gsm8k
from s2t.config import load_settings
from s2t.stack import LocalStack

pytestmark = [pytest.mark.real_models, pytest.mark.ray]


async def test_one_gsm8k_question_in_s2t_mode_on_the_real_models(tmp_path, monkeypatch):
    monkeypatch.setenv("S2T_DATA_DIR", str(tmp_path))  # selection logs of this test stay in its tmp dir
    settings = load_settings()
    problem = gsm8k.load("test", 0, 1)[0]
    async with LocalStack(settings) as stack:
        assert stack.worker.selector_info.vocab_sha256 == stack.worker.lm.vocab_sha256
        deltas, final = [], None
        async for msg in stack.stub.GenerateStream(pb.GenerateStreamRequest(
                prompt=problem["question"], options=pb.GenerationOptions(mode=pb.MODE_S2T, max_new_tokens=512))):
            if msg.HasField("delta"):
                deltas.append(msg.delta)
            else:
                final = msg.final
    st = final.stats
    assert final.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert "".join(d.text for d in deltas) == final.text and final.text.strip()
    assert st.mode_requested == pb.MODE_S2T and st.mode_used == pb.MODE_S2T, st.degraded_reason
    assert st.completion_tokens == len(final.token_ids) > 20
    assert st.positions_checked > 0 and st.llm_forwards > 0
    assert st.verified_tokens == st.completion_tokens and st.unverified_tokens == 0
    assert gsm8k.extract(final.text) is not None  # an answer was given; whether it is right is the benchmark's job

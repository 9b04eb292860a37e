"""Selection log: append-only segments, atomic close, crash recovery, and contexts reconstructed by replay."""

import json

import pytest

from s2t.selection_log import (CLOSED_SUFFIX, OPEN_SUFFIX, SelectionLog, closed_segments, read_segment,
                                         recover_open_segments, replay_contexts)
from s2t.v1 import generation_pb2 as pb
from servers import Stack


def test_segments_rotate_and_only_closed_ones_are_visible(tmp_path):
    log = SelectionLog(tmp_path, header={"selector_model": "m"}, segment_records=3, fsync_every=2)
    for i in range(7):
        log.write({"kind": "select", "i": i})
    closed = closed_segments(tmp_path)
    assert len(closed) == 2  # 3 + 3 records closed, 1 record in the open segment
    assert len(list(tmp_path.glob("*" + OPEN_SUFFIX))) == 1
    header, records = read_segment(closed[0])
    assert header["kind"] == "header" and header["selector_model"] == "m"
    assert [r["i"] for r in records] == [0, 1, 2]
    log.close()
    assert [r["i"] for seg in closed_segments(tmp_path) for r in read_segment(seg)[1]] == list(range(7))


def test_crash_leaves_at_most_the_torn_tail(tmp_path):
    log = SelectionLog(tmp_path, header={}, fsync_every=1)
    for i in range(3):
        log.write({"kind": "select", "i": i})
    path = next(tmp_path.glob("*" + OPEN_SUFFIX))
    with open(path, "a") as f:  # the process dies in the middle of a record
        f.write('{"kind": "select", "i": 3, "tok')
    log._file = None  # the writer is gone without closing
    recovered = recover_open_segments(tmp_path)
    assert len(recovered) == 1 and recovered[0].name.endswith(CLOSED_SUFFIX)
    assert [r["i"] for r in read_segment(recovered[0])[1]] == [0, 1, 2]
    assert not list(tmp_path.glob("*" + OPEN_SUFFIX))


def test_replay_reconstructs_contexts_and_drops_duplicates():
    records = [
        {"kind": "select", "session_id": "a", "step": 0, "prefix_length": 0, "token_ids": [1, 2, 3, 4],
         "outcome": "diverged", "positions": [{"position": 3}, {"position": 4}]},
        {"kind": "select", "session_id": "a", "step": 1, "prefix_length": 3, "token_ids": [9, 5],
         "outcome": "accepted", "positions": [{"position": 5}]},
        {"kind": "select", "session_id": "a", "step": 1, "prefix_length": 3, "token_ids": [9, 5],
         "outcome": "accepted", "positions": [{"position": 5}]},  # a retried request logged twice
    ]
    got = [(r["step"], p["position"], ctx) for r, p, ctx in replay_contexts(records)]
    assert got == [(0, 3, [1, 2, 3]), (0, 4, [1, 2, 3, 4]), (1, 5, [1, 2, 3, 9, 5])]


async def test_logged_contexts_are_what_the_worker_committed(make_settings):
    settings = make_settings(**{"selector.log_fsync_every": 1})
    async with Stack(settings) as stack:
        final = await stack.generate("Count to three", mode=pb.MODE_S2T, max_new_tokens=30, block_size=4)
        prompt = stack.worker.prompt_ids(pb.GenerateRequest(prompt="Count to three"))
        stack.core.log.close()
        log_dir = settings.selection_log_dir()
    text = prompt + list(final.token_ids)
    records = [r for seg in closed_segments(log_dir) for r in read_segment(seg)[1]]
    answered = list(replay_contexts(records))
    assert answered, "every computed Select is logged"
    for record, pos, context in answered:
        assert set(pos) >= {"candidate_ids", "slm_probs", "llm_probs", "llm_top1", "index", "diverged"}
        assert len(pos["llm_probs"]) == len(pos["candidate_ids"])
        if record["outcome"] == "accepted" or pos is not record["positions"][-1]:
            # an accepted position's context is a prefix of the committed text, unless a later block was voided
            continue
        assert context == text[:pos["position"]]  # a divergence is always committed
        assert text[pos["position"]] == pos["candidate_ids"][pos["index"]]
    header = read_segment(closed_segments(log_dir)[0])[0]
    assert header["selector_vocab_sha256"] == stack.core.engine.lm.vocab_sha256


def test_log_record_is_json_lines(tmp_path):
    log = SelectionLog(tmp_path, header={"x": 1})
    log.write({"kind": "select", "v": [1, 2]})
    log.close()
    lines = closed_segments(tmp_path)[0].read_text().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["header", "select"]
    with pytest.raises(ValueError):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"kind": "select"}\n')
        read_segment(bad)

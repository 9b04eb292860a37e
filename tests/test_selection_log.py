"""Selection log (schema 2): a non-blocking writer, atomic segment close, crash recovery that spares live
writers, versioned readers, and contexts reconstructed by replay, also after a divergence."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import s2t.selection_log as selection_log
from s2t.selection_log import (CLOSED_SUFFIX, OPEN_SUFFIX, SCHEMA_VERSION, ScoredPosition, SelectionLog,
                               SelectionLogError, SelectorIdentity, SelectRecord, closed_segments, read_records,
                               read_segment, recover_open_segments, replay_contexts, replay_sessions)
from s2t.v1 import selector_pb2 as sel_pb

ROOT = Path(__file__).resolve().parent.parent
SELECTOR = SelectorIdentity(model="llm", weights_sha256="w" * 64, vocab_sha256="v" * 64, weight_formats="native")


def scored(position: int, candidates=(7, 8), index: int = 0, diverged: bool = False, after: bool = False,
           llm=(0.5, 0.25)) -> ScoredPosition:
    """A scored position whose floats survive the log's 7-significant-digit rounding exactly."""
    return ScoredPosition(position=position, candidate_ids=list(candidates), slm_probs=[0.5, 0.125][:len(candidates)],
                          llm_probs=list(llm)[:len(candidates)], llm_top1=candidates[index], llm_top1_prob=0.5,
                          index=index, diverged=diverged, after_divergence=after, trigger_value=0.0,
                          worker_triggered=False, worker_trigger_value=0.0)


def record(step: int, session: str = "s", prefix: int | None = None, tokens=None, positions=None,
           outcome: str = "accepted", slm: str = "") -> SelectRecord:
    """Deterministic in its arguments (ts included), so a record read back can be compared exactly."""
    prefix = step if prefix is None else prefix
    tokens = [step % 250 + 1] if tokens is None else list(tokens)
    positions = [scored(prefix + len(tokens))] if positions is None else positions
    return SelectRecord(ts=1000.0 + step, session_id=session, step=step, request_id=f"r{step}", prefix_length=prefix,
                        token_ids=tokens, trigger="always", outcome=outcome, positions=positions,
                        slm_model="slm" if slm else "", slm_weights_sha256=slm)


def steps(records) -> list[int]:
    return [r.step for r in records]


def segment_records(path: Path) -> list[SelectRecord]:
    return list(read_segment(path)[1])


# -- writing -------------------------------------------------------------------------------------------------


def test_segments_rotate_and_only_closed_ones_are_visible(tmp_path):
    log = SelectionLog(tmp_path, SELECTOR, segment_records=3, fsync_every=2)
    for i in range(7):
        assert log.write(record(i))
    log.flush()
    closed = closed_segments(tmp_path)
    assert len(closed) == 2  # 3 + 3 records closed, 1 record in the open segment
    assert len(list(tmp_path.glob("*" + OPEN_SUFFIX))) == 1
    header, records = read_segment(closed[0])
    assert header.schema_version == SCHEMA_VERSION and header.selector == SELECTOR
    assert header.writer_id == log.writer_id and log.writer_id in closed[0].name
    assert [r.model_dump() for r in records] == [record(i).model_dump() for i in range(3)]
    log.close()
    assert steps(read_records(tmp_path)) == list(range(7))
    assert log.counters == {"written": 7, "dropped": 0, "segments": 3, "queued": 0}
    assert not log.write(record(7)) and log.dropped == 1  # a closed log drops, it does not raise


def test_an_idle_segment_closes_after_segment_seconds(tmp_path):
    log = SelectionLog(tmp_path, SELECTOR, segment_seconds=0.3)
    log.write(record(0))
    deadline = time.monotonic() + 10
    while not closed_segments(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert steps(read_records(tmp_path)) == [0]  # visible without close() or another write
    assert not list(tmp_path.glob("*" + OPEN_SUFFIX))
    log.close()


def test_write_never_waits_for_a_slow_disk_and_counts_drops(tmp_path, monkeypatch):
    gate = threading.Event()
    real_write_all = selection_log._write_all

    def stalled_write_all(fd, data):  # a disk that does not answer until the test says so
        gate.wait(30)
        real_write_all(fd, data)

    monkeypatch.setattr(selection_log, "_write_all", stalled_write_all)
    log = SelectionLog(tmp_path, SELECTOR, queue_records=4)
    try:
        assert log.write(record(0))
        deadline = time.monotonic() + 10
        while log._queue.qsize() and time.monotonic() < deadline:  # the writer took it and is stuck on disk
            time.sleep(0.01)
        t0 = time.perf_counter()
        accepted = [log.write(record(i)) for i in range(1, 8)]
        elapsed = time.perf_counter() - t0
        assert elapsed < 0.5, f"write() blocked for {elapsed:.2f}s on a stalled disk"
        assert accepted == [True] * 4 + [False] * 3  # four fit in the queue, the rest are dropped
        assert log.dropped == 3 and log.written == 0
    finally:
        gate.set()
    log.close()
    assert steps(read_records(tmp_path)) == [0, 1, 2, 3, 4]
    assert log.counters == {"written": 5, "dropped": 3, "segments": 1, "queued": 0}


def test_flush_waits_until_the_queue_is_on_disk(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    log = SelectionLog(tmp_path, SELECTOR, fsync_every=1000)
    for i in range(3):
        log.write(record(i))
    log.flush()
    (open_segment,) = tmp_path.glob("*" + OPEN_SUFFIX)
    lines = open_segment.read_bytes().splitlines()
    assert len(lines) == 4 and json.loads(lines[0])["kind"] == "header"
    assert synced and synced[-1] == log._fd  # the segment itself was fsync'd by the flush
    assert closed_segments(tmp_path) == []  # flushed, still open: readers do not see it yet
    log.close()
    assert steps(read_records(tmp_path)) == [0, 1, 2]


def test_closed_segments_are_json_lines(tmp_path):
    log = SelectionLog(tmp_path, SELECTOR)
    log.write(record(0))
    log.close()
    lines = closed_segments(tmp_path)[0].read_text().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["header", "select"]
    assert json.loads(lines[0])["schema"] == SCHEMA_VERSION


# -- crash recovery -------------------------------------------------------------------------------------------

# The victim: a writer in its own process, writing continuously (this module is light to import on purpose).
WRITER_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
from test_selection_log import SELECTOR, record
from s2t.selection_log import SelectionLog

log = SelectionLog(sys.argv[1], SELECTOR, segment_records=40, fsync_every=7, writer_id="victim")
step = 0
while True:
    if log._queue.qsize() < 100:  # no drops: every record queued reaches the file unless the process dies
        log.write(record(step))
        step += 1
    time.sleep(0.001)
"""


def open_segment_records(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n") - 1
    except FileNotFoundError:
        return -1


def test_kill_9_mid_segment_loses_nothing_closed_and_the_next_writer_recovers(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT.format(tests=str(ROOT / "tests")), str(tmp_path)],
                            env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait for 3 closed segments and one open 5..30 records deep
            opened = list(tmp_path.glob("*" + OPEN_SUFFIX))
            if len(closed_segments(tmp_path)) >= 3 and len(opened) == 1 and 5 <= open_segment_records(opened[0]) <= 30:
                break
            time.sleep(0.002)
        else:
            pytest.fail("the writer subprocess did not get going")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    (victim_open,) = tmp_path.glob("*" + OPEN_SUFFIX)
    closed_before = closed_segments(tmp_path)
    # Readers see only the closed segments: every record intact, in order, none from the open one.
    before = read_records(tmp_path)
    assert steps(before) == list(range(40 * len(closed_before)))
    assert [r.model_dump() for r in before] == [record(i).model_dump() for i in range(len(before))]
    # kill -9 cannot tear one write() of a regular file, a power loss can: add the torn tail it would leave.
    with open(victim_open, "ab") as f:
        f.write(b'{"kind":"select","ts":1.0,"session_id":"s","step":99')
    assert steps(read_records(tmp_path)) == steps(before)  # still invisible

    successor = SelectionLog(tmp_path, SELECTOR, segment_records=40, writer_id="successor")
    assert not list(tmp_path.glob("*" + OPEN_SUFFIX))  # the dead writer's segment was cut and closed
    recovered = [p for p in closed_segments(tmp_path) if p not in closed_before]
    assert len(recovered) == 1 and "victim" in recovered[0].name
    tail = segment_records(recovered[0])
    assert 5 <= len(tail) and steps(tail) == list(range(len(before), len(before) + len(tail)))
    n = len(before) + len(tail)
    assert [r.model_dump() for r in read_records(tmp_path)] == [record(i).model_dump() for i in range(n)]
    # The successor writes on in segments of its own.
    for i in range(n, n + 50):
        successor.write(record(i))
    successor.close()
    assert steps(read_records(tmp_path)) == list(range(n + 50))
    assert sum("successor" in p.name for p in closed_segments(tmp_path)) == 2


def write_dead_writer_segment(directory: Path, name: str, records: list[SelectRecord], torn: bytes) -> Path:
    """An open segment left behind by a dead writer: nobody holds its lock."""
    header = selection_log.SegmentHeader(segment=name, writer_id="dead", selector=SELECTOR, created=1.0)
    path = directory / f"{name}{OPEN_SUFFIX}"
    body = b"".join(r.model_dump_json().encode() + b"\n" for r in records)
    path.write_bytes(header.model_dump_json(by_alias=True).encode() + b"\n" + body + torn)
    return path


def test_a_new_writer_recovers_dead_writers_segments_and_leaves_live_ones_alone(tmp_path):
    live = SelectionLog(tmp_path, SELECTOR, writer_id="live")
    for i in range(3):
        live.write(record(i, session="live"))
    live.flush()
    (live_open,) = tmp_path.glob("*" + OPEN_SUFFIX)
    inode = live_open.stat().st_ino
    dead = write_dead_writer_segment(tmp_path, "seg-20240101T000000-dead-000001",
                                     [record(i, session="dead") for i in range(4)], b'{"kind":"sel')
    empty = write_dead_writer_segment(tmp_path, "seg-20240101T000000-dead-000002", [], b"")

    newcomer = SelectionLog(tmp_path, SELECTOR, writer_id="newcomer")
    assert live_open.exists() and live_open.stat().st_ino == inode  # the live writer's segment is untouched
    assert not dead.exists() and not empty.exists()  # the header-only one holds nothing: deleted
    assert steps(segment_records(dead.with_name(dead.name.removesuffix(OPEN_SUFFIX) + CLOSED_SUFFIX))) == [0, 1, 2, 3]
    assert recover_open_segments(tmp_path) == []  # the live one still is not up for recovery
    for i in range(3, 5):
        live.write(record(i, session="live"))
    live.close()
    newcomer.write(record(0, session="new"))
    newcomer.close()
    by_session = {}
    for r in read_records(tmp_path):
        by_session.setdefault(r.session_id, []).append(r.step)
    assert by_session == {"dead": [0, 1, 2, 3], "live": [0, 1, 2, 3, 4], "new": [0]}


# -- reading -------------------------------------------------------------------------------------------------


def test_readers_refuse_other_schema_versions_naming_file_and_versions(tmp_path):
    v1 = tmp_path / "seg-20240101T000000-old-000001.jsonl"
    v1.write_text(json.dumps({"kind": "header", "schema": 1, "selector_vocab_sha256": "v"}) + "\n"
                  + json.dumps({"kind": "select", "session_id": "s", "step": 0}) + "\n")
    with pytest.raises(SelectionLogError, match=r"seg-20240101T000000-old-000001\.jsonl: selection log schema "
                                                r"version 1; this reader supports version 2"):
        read_segment(v1)
    with pytest.raises(SelectionLogError, match="version 1"):
        read_records(tmp_path)
    v1.write_text(json.dumps({"kind": "header", "schema": 3}) + "\n")
    with pytest.raises(SelectionLogError, match="schema version 3; this reader supports version 2"):
        read_segment(v1)
    v1.write_text('{"kind": "select"}\n')
    with pytest.raises(SelectionLogError, match="not a selection log segment header"):
        read_segment(v1)


def test_a_malformed_record_is_reported_with_its_line(tmp_path):
    log = SelectionLog(tmp_path, SELECTOR)
    log.write(record(0))
    log.close()
    (segment,) = closed_segments(tmp_path)
    with open(segment, "a") as f:
        f.write(json.dumps({**record(1).model_dump(), "novel_field": 1}) + "\n")  # a newer schema's field
    with pytest.raises(SelectionLogError, match=rf"{segment.name}:3: malformed select record"):
        read_records(tmp_path)


def test_records_are_sorted_deduplicated_and_carry_the_slm_identity(tmp_path):
    first = SelectionLog(tmp_path, SELECTOR, writer_id="a")
    for r in [record(2, "b"), record(0, "b", slm="h1"), record(1, "a"), record(1, "b")]:
        first.write(r)
    first.close()
    second = SelectionLog(tmp_path, SELECTOR, writer_id="b")
    second.write(record(1, "b", tokens=[99]))  # (b, 1) computed again: the first record stays
    second.write(record(0, "a"))
    second.write(record(3, "b", prefix=0, slm="h2"))
    second.close()
    records = read_records(tmp_path)
    assert [(r.session_id, r.step) for r in records] == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("b", 2), ("b", 3)]
    assert records[3].token_ids == [2]  # the first (b, 1)
    # the SLM identity is carried forward within a session, and only there
    assert [r.slm_weights_sha256 for r in records] == ["", "", "h1", "h1", "h1", "h2"]
    assert records[3].source.startswith(str(closed_segments(tmp_path)[0]))


def test_replay_rebuilds_contexts_also_after_a_divergence():
    records = [
        # step 0 diverges at 3; positions 4 and 5 were scored on the drafts as sent (4 at index 3 rejected)
        record(0, "a", prefix=0, tokens=[1, 2, 3, 4, 5], outcome="diverged",
               positions=[scored(3, index=1, diverged=True), scored(4, after=True, diverged=True, index=1),
                          scored(5, after=True)]),
        record(1, "a", prefix=3, tokens=[9, 6], positions=[scored(4), scored(5)]),
        record(1, "a", prefix=3, tokens=[9, 6], positions=[scored(4), scored(5)]),  # a retry logged twice
    ]
    got = [(r.step, p.position, p.after_divergence, ctx) for r, p, ctx in replay_contexts(records)]
    assert got == [(0, 3, False, [1, 2, 3]), (0, 4, True, [1, 2, 3, 4]), (0, 5, True, [1, 2, 3, 4, 5]),
                   (1, 4, False, [1, 2, 3, 9]), (1, 5, False, [1, 2, 3, 9, 6])]
    assert records[0].divergence == 3 and records[1].divergence is None
    assert replay_sessions(records) == {"a": [1, 2, 3, 9, 6]}


def test_replay_skips_a_session_from_a_hole_in_its_steps_to_its_next_full_context():
    records = [
        record(0, prefix=0, tokens=[1, 2]),
        record(2, prefix=2, tokens=[3]),  # step 1 was lost: the selector's state is unknown from here
        record(3, prefix=3, tokens=[4]),
        record(4, prefix=0, tokens=[1, 2, 3, 4, 5]),  # a full-context resend makes it known again
        record(5, prefix=7, tokens=[6]),  # a prefix beyond the tokens held: unknown again
    ]
    got = [(r.step, ctx) for r, _p, ctx in replay_contexts(records)]
    assert got == [(0, [1, 2]), (4, [1, 2, 3, 4, 5])]
    assert replay_sessions(records) == {"s": [1, 2, 3, 4, 5]}


# -- the selector writes it --------------------------------------------------------------------------------


def test_the_selector_logs_every_position_of_a_diverged_block(tmp_path, make_settings, tiny_pair, tiny_models):
    import torch

    from llm_selector.core import SelectorCore
    from s2t.runtime import Engine, load_model

    _, llm = tiny_models
    lm = load_model(str(tiny_pair[1]), tiny_pair[1].parent, "native")
    log = SelectionLog(tmp_path, SelectorIdentity(model=lm.name, weights_sha256=lm.weights_sha256,
                                                  vocab_sha256=lm.vocab_sha256))
    core = SelectorCore(Engine(lm), make_settings().selector, log)

    def llm_probs(context):
        with torch.no_grad():
            return torch.softmax(llm(torch.tensor([context])).logits[0, -1].double(), -1)

    context = [10, 20, 30, 40]
    probs = llm_probs(context)
    worst, best = int(torch.argmin(probs)), int(torch.argmax(probs))
    tokens = context + [worst, 6, 7]  # the SLM drafted `worst` at position 4, then 6 and 7
    positions = [(4, [worst, best]), (5, [6, 1, 2]), (6, [7, 3]), (7, [8, 9])]
    request = sel_pb.SelectRequest(
        session_id="d", step=0, prefix_length=0, token_ids=tokens, request_id="req-0", slm_model="tiny-slm",
        slm_weights_sha256="s" * 64, trigger=sel_pb.SelectTriggerSpec(kind=sel_pb.SELECT_TRIGGER_ALWAYS),
        positions=[sel_pb.CandidatePosition(position=p, candidate_ids=c, candidate_probs=[0.5] + [0.25] * (len(c) - 1),
                                            worker_trigger_value=0.125) for p, c in positions])
    reply = asyncio.run(core.handle(request, "select"))
    assert [(s.position, s.index, s.diverged) for s in reply.selections] == [(4, 1, True)]  # the reply stops
    follow = sel_pb.SelectRequest(session_id="d", step=1, prefix_length=4, token_ids=[best, 5],
                                  positions=[sel_pb.CandidatePosition(position=6, candidate_ids=[5, 11])],
                                  trigger=sel_pb.SelectTriggerSpec(kind=sel_pb.SELECT_TRIGGER_ALWAYS))
    asyncio.run(core.handle(follow, "select"))
    log.close()

    header = read_segment(closed_segments(tmp_path)[0])[0]
    assert header.selector.weights_sha256 == lm.weights_sha256 and len(lm.weights_sha256) == 64
    first, second = read_records(tmp_path)
    assert (first.slm_model, first.slm_weights_sha256, first.request_id) == ("tiny-slm", "s" * 64, "req-0")
    assert (second.slm_model, second.slm_weights_sha256) == ("tiny-slm", "s" * 64)  # carried forward
    assert first.outcome == "diverged" and first.trigger == "always" and first.token_ids == tokens
    assert [p.position for p in first.positions] == [4, 5, 6, 7]  # all four, not only up to the divergence
    assert [p.after_divergence for p in first.positions] == [False, True, True, True]
    for p, (position, cands) in zip(first.positions, positions):
        reference = llm_probs(tokens[:position])  # scored on the tokens as sent, the rejected draft included
        assert p.candidate_ids == cands
        assert p.llm_probs == pytest.approx(reference[cands].tolist(), rel=1e-6)
        assert p.index == int(torch.argmax(reference[cands]))
        assert p.llm_top1 == int(torch.argmax(reference))
        assert p.llm_top1_prob == pytest.approx(float(reference.max()), rel=1e-6)
        assert p.slm_probs == [0.5] + [0.25] * (len(cands) - 1) and p.worker_trigger_value == 0.125
    contexts = [(r.step, p.position, ctx) for r, p, ctx in replay_contexts([first, second])]
    assert contexts == [(0, 4, context), (0, 5, context + [worst]), (0, 6, context + [worst, 6]),
                        (0, 7, context + [worst, 6, 7]), (1, 6, context + [best, 5])]


async def test_logged_contexts_are_what_the_worker_committed(make_settings):
    from s2t.v1 import generation_pb2 as pb
    from servers import Stack

    settings = make_settings(**{"selector.log_fsync_every": 1})
    async with Stack(settings) as stack:
        final = await stack.generate("Count to three", mode=pb.MODE_S2T, max_new_tokens=30, block_size=4)
        prompt = stack.worker.prompt_ids(pb.GenerateRequest(prompt="Count to three"))
        stack.core.log.close()
        log_dir = settings.selection_log_dir()
    text = prompt + list(final.token_ids)
    records = read_records(log_dir)
    answered = list(replay_contexts(records))
    assert answered, "every computed Select is logged"
    for record_, pos, context in answered:
        assert len(pos.llm_probs) == len(pos.candidate_ids)
        if pos.position != record_.divergence:
            # an accepted position's context is a prefix of the committed text, unless a later block was voided
            continue
        assert context == text[:pos.position]  # a divergence is always committed
        assert text[pos.position] == pos.candidate_ids[pos.index]
    header = read_segment(closed_segments(log_dir)[0])[0]
    assert header.selector.vocab_sha256 == stack.core.engine.lm.vocab_sha256
    assert header.selector.weights_sha256 == stack.core.engine.lm.weights_sha256

"""distill.groups: selection logs (schema 2) become training groups; logs of another vocabulary or another SLM,
and logs of another schema version, are refused."""

import dataclasses
import json
import math

import pytest

from distill.groups import (DistillError, Group, LabelBy, candidate_entropy, read_groups, sessions, split_held_out,
                            top_positions, write_groups)
from s2t.selection_log import ScoredPosition, SelectionLog, SelectorIdentity, SelectRecord, closed_segments

SLM = "a" * 64


def position(pos, llm, index, diverged=False, after=False, top1=12):
    return ScoredPosition(position=pos, candidate_ids=[11, 12, 13], slm_probs=[0.5, 0.25, 0.125], llm_probs=llm,
                          llm_top1=top1, llm_top1_prob=0.5, index=index, diverged=diverged, after_divergence=after,
                          trigger_value=0.75, worker_triggered=False, worker_trigger_value=0.0)


def write_log(directory, vocab="v1", slm=SLM):
    log = SelectionLog(directory, SelectorIdentity(model="llm", weights_sha256="w", vocab_sha256=vocab))
    # step 0: diverges at 7 (the draft 7 is rejected for candidate 12); 8 was scored after it, on the draft
    log.write(SelectRecord(
        ts=1.0, session_id="s", step=0, prefix_length=0, token_ids=list(range(1, 9)), trigger="always",
        outcome="diverged", slm_model="tiny-slm", slm_weights_sha256=slm, positions=[
            position(6, [0.5, 0.25, 0.25], 0),
            position(7, [0.125, 0.375, 0.125], 1, diverged=True),
            position(8, [0.25, 0.25, 0.5], 2, diverged=True, after=True, top1=99)]))
    # step 1: builds on the cut session with the LLM's pick; the worker did not resend its SLM identity
    log.write(SelectRecord(
        ts=2.0, session_id="s", step=1, prefix_length=7, token_ids=[12, 30], trigger="always", outcome="accepted",
        positions=[position(8, [0.25, 0.5, 0.25], 1)]))
    log.close()


def test_groups_carry_context_teacher_target_and_divergence_flags(tmp_path):
    write_log(tmp_path)
    groups = list(read_groups(tmp_path, vocab_sha256="v1", slm_weights_sha256=SLM, context_tail=4))
    assert [(g.step, g.position, g.context) for g in groups] == [
        (0, 6, [3, 4, 5, 6]), (0, 7, [4, 5, 6, 7]), (0, 8, [5, 6, 7, 8]), (1, 8, [4, 5, 6, 7, 12][-4:])]
    first_divergence = groups[1]
    assert first_divergence.teacher_probs == pytest.approx([0.2, 0.6, 0.2]) and first_divergence.target == 1
    assert first_divergence.llm_top1 == 12 and first_divergence.llm_top1_in_candidates
    assert first_divergence.diverged and not first_divergence.after_divergence
    rollout = groups[2]  # after the divergence: an SLM rollout the LLM labelled, kept and flagged
    assert rollout.after_divergence and rollout.target == 2 and not rollout.llm_top1_in_candidates
    assert rollout.trigger_value == 0.75 and rollout.slm_probs == [0.5, 0.25, 0.125]
    # the session's sequence is 1..7 + [12, 30]; contexts that are prefixes of it can be packed together
    assert sessions(tmp_path) == {"s": [1, 2, 3, 4, 5, 6, 7, 12, 30]}
    assert [g.in_session_sequence for g in groups] == [True, True, False, True]
    assert [g.step for g in read_groups(tmp_path, include_after_divergence=False)] == [0, 0, 1]
    summary = write_groups(read_groups(tmp_path), tmp_path / "groups.jsonl")
    assert summary == {"groups": 4, "diverged": 1, "after_divergence": 1, "llm_top1_in_candidates": 0.75}
    written = [json.loads(line) for line in (tmp_path / "groups.jsonl").read_text().splitlines()]
    assert written[2]["after_divergence"] is True and written[0]["context"] == list(range(1, 7))


def test_logs_of_another_vocabulary_are_refused(tmp_path):
    write_log(tmp_path, vocab="other")
    with pytest.raises(DistillError, match="vocabulary other, not v1; refusing"):
        list(read_groups(tmp_path, vocab_sha256="v1"))


def test_records_of_another_slm_are_refused_naming_both_hashes_and_the_segment(tmp_path):
    write_log(tmp_path, slm="b" * 64)
    segment = closed_segments(tmp_path)[0]
    with pytest.raises(DistillError) as e:
        list(read_groups(tmp_path, vocab_sha256="v1", slm_weights_sha256=SLM))
    assert str(segment) in str(e.value) and "b" * 64 in str(e.value) and SLM in str(e.value)
    assert len(list(read_groups(tmp_path))) == 4  # without a hash to check, the log is read


def test_records_that_do_not_name_their_slm_are_refused_when_a_hash_is_required(tmp_path):
    write_log(tmp_path, slm="")
    with pytest.raises(DistillError, match="the worker sent no slm_weights_sha256"):
        sessions(tmp_path, slm_weights_sha256=SLM)


def test_logs_of_another_schema_version_are_refused(tmp_path):
    (tmp_path / "seg-20240101T000000-old-000001.jsonl").write_text(
        json.dumps({"kind": "header", "schema": 1, "selector_vocab_sha256": "v1"}) + "\n")
    with pytest.raises(DistillError, match="schema version 1; this reader supports version 2"):
        list(read_groups(tmp_path, vocab_sha256="v1"))


def _group(trigger_value: float, slm_probs: list[float]) -> Group:
    return Group(session_id="s", step=0, position=1, context=[0], candidate_ids=list(range(len(slm_probs))),
                 slm_probs=slm_probs, teacher_probs=[1.0 / max(1, len(slm_probs))] * len(slm_probs), target=0, llm_top1=0,
                 llm_top1_prob=0.5, llm_top1_in_candidates=True, diverged=False, after_divergence=False,
                 trigger_value=trigger_value, in_session_sequence=True)


def test_candidate_entropy_renormalises_the_logged_probabilities():
    assert candidate_entropy(_group(0.0, [0.25, 0.25])) == pytest.approx(math.log(2))
    assert candidate_entropy(_group(0.0, [0.9, 0.0])) == 0.0
    assert candidate_entropy(_group(0.0, [])) == 0.0


def test_top_positions_ranks_by_kl_or_by_entropy():
    # high KL but a confident SLM; low KL and an unsure SLM; neither
    confident, unsure, plain = _group(5.0, [0.98, 0.01, 0.01]), _group(0.1, [0.4, 0.3, 0.3]), _group(0.0, [0.9, 0.05, 0.05])
    groups = [confident, unsure, plain]
    assert top_positions(groups, 1 / 3, LabelBy.KL) == [confident]
    assert top_positions(groups, 1 / 3, LabelBy.ENTROPY) == [unsure]
    assert top_positions(groups, 1.0, LabelBy.ENTROPY) == groups  # tau 1: every position, in order
    with pytest.raises(ValueError, match="tau"):
        top_positions(groups, 0.0)


def test_held_out_split_is_by_session_and_stable():
    groups = [dataclasses.replace(_group(0.0, [0.5, 0.5]), session_id=f"session-{i % 200}", step=i) for i in range(1000)]
    train, held = split_held_out(groups, 0.10)
    assert len(train) + len(held) == 1000
    assert not {g.session_id for g in train} & {g.session_id for g in held}  # no rollout on both sides
    assert 5 <= len({g.session_id for g in held}) <= 40  # ~10 % of 200 sessions
    assert split_held_out(list(reversed(groups)), 0.10)[1] == list(reversed(held))  # depends on the ids only
    assert split_held_out(groups, 0.0) == (groups, [])

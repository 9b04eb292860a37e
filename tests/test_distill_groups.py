"""distill.groups: selection logs become training groups; logs of another vocabulary are refused."""

import pytest

from distill.groups import DistillError, read_groups, write_groups
from s2t.selection_log import SelectionLog


def write_log(directory, vocab="v1"):
    log = SelectionLog(directory, header={"selector_vocab_sha256": vocab})
    log.write({"kind": "select", "session_id": "s", "step": 0, "prefix_length": 0, "token_ids": list(range(1, 9)),
               "outcome": "diverged", "positions": [
                   {"position": 7, "candidate_ids": [11, 12, 13], "slm_probs": [0.5, 0.3, 0.2],
                    "llm_probs": [0.1, 0.3, 0.1], "llm_top1": 12, "index": 1, "diverged": True,
                    "trigger_value": 0.7}]})
    log.close()


def test_groups_carry_context_tail_and_teacher_target(tmp_path):
    write_log(tmp_path)
    (g,) = read_groups(tmp_path, vocab_sha256="v1", context_tail=4)
    assert g.context == [4, 5, 6, 7] and g.position == 7
    assert g.teacher_probs == pytest.approx([0.2, 0.6, 0.2]) and g.target == 1
    assert g.llm_top1_in_candidates and g.diverged
    summary = write_groups(read_groups(tmp_path), tmp_path / "groups.jsonl")
    assert summary == {"groups": 1, "diverged": 1, "llm_top1_in_candidates": 1.0}


def test_logs_of_another_vocabulary_are_refused(tmp_path):
    write_log(tmp_path, vocab="other")
    with pytest.raises(DistillError, match="refusing"):
        list(read_groups(tmp_path, vocab_sha256="v1"))

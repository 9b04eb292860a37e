"""Training groups for S2T-Local, read from the selector's closed log segments.

A group is one position the selector answered: the context before it (its last `context_tail` tokens, 511
as in the paper), the SLM's K candidates, and the teacher distribution over them (the LLM's probabilities
renormalised on the candidates); the training target is the teacher's argmax. Segments written for another
vocabulary are refused: candidate ids would name other tokens.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterator

from s2t.selection_log import closed_segments, read_segment, replay_contexts


class DistillError(RuntimeError):
    pass


@dataclasses.dataclass
class Group:
    session_id: str
    step: int
    position: int
    context: list[int]
    candidate_ids: list[int]
    slm_probs: list[float]
    teacher_probs: list[float]  # renormalised over the candidates
    target: int  # index of the teacher's most probable candidate
    llm_top1_in_candidates: bool
    diverged: bool
    trigger_value: float


def read_groups(log_dir: Path, vocab_sha256: str | None = None, context_tail: int = 511) -> Iterator[Group]:
    """Groups from every closed segment under log_dir. Sessions may span segments, so all records are read
    before replaying (memory grows with the log; shard by directory for very large logs)."""
    records = []
    for segment in closed_segments(Path(log_dir)):
        header, body = read_segment(segment)
        got = header.get("selector_vocab_sha256")
        if vocab_sha256 is not None and got != vocab_sha256:
            raise DistillError(f"{segment} was written by a selector with vocabulary {got}, not {vocab_sha256}; "
                               "refusing to mix tokenizers")
        records.extend(body)
    for record, pos, context in replay_contexts(records):
        llm = pos["llm_probs"]
        total = sum(llm)
        teacher = [p / total for p in llm] if total > 0 else [1.0 / len(llm)] * len(llm)
        yield Group(session_id=record["session_id"], step=record["step"], position=pos["position"],
                    context=context[-context_tail:], candidate_ids=pos["candidate_ids"], slm_probs=pos["slm_probs"],
                    teacher_probs=teacher, target=max(range(len(teacher)), key=teacher.__getitem__),
                    llm_top1_in_candidates=pos["llm_top1"] in pos["candidate_ids"], diverged=pos["diverged"],
                    trigger_value=pos["trigger_value"])


def write_groups(groups, path: Path) -> dict:
    """Write groups as JSON lines; returns counts for a summary."""
    n = diverged = hit = 0
    with open(path, "w") as f:
        for g in groups:
            f.write(json.dumps(dataclasses.asdict(g)) + "\n")
            n += 1
            diverged += g.diverged
            hit += g.llm_top1_in_candidates
    return {"groups": n, "diverged": diverged, "llm_top1_in_candidates": hit / n if n else 0.0}

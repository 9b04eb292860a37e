"""Training groups for S2T-Local, read from the selector's closed log segments (schema version 2).

A group is one position the selector scored: the context before it (its last `context_tail` tokens, 511 as
in the paper), the SLM's K candidates, and the teacher distribution over them (the LLM's probabilities
renormalised on the candidates); the training target is the teacher's argmax.

Positions after a request's first divergence are groups too (`after_divergence`), unless
`include_after_divergence=False`: the selector scored them in the same forward, on a context that holds the
SLM's rejected draft at the divergence. That context is an SLM rollout the LLM labelled exactly, which is
what the re-ranker learns from; it is not the committed text, so such groups never share a session
sequence (`in_session_sequence` is False) and a trainer can weigh or filter them by the flag.

Refused, with DistillError: segments written by a selector of another vocabulary (candidate ids would name
other tokens), and records drafted by another SLM than the one being trained (its candidates and
probabilities are another model's). Schema versions other than 2 are refused by the reader.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import zlib
from pathlib import Path
from typing import Iterator

from s2t.selection_log import (SegmentHeader, SelectionLogError, SelectRecord, read_records, replay_contexts,
                               replay_sessions)


class DistillError(RuntimeError):
    pass


@dataclasses.dataclass
class Group:
    session_id: str
    step: int
    position: int  # absolute index of the chosen token; the full context is the session's tokens before it
    context: list[int]  # the last context_tail tokens before the position
    candidate_ids: list[int]
    slm_probs: list[float]  # the SLM's probabilities of the candidates (empty if the worker sent none)
    teacher_probs: list[float]  # the LLM's, renormalised over the candidates
    target: int  # index of the teacher's most probable candidate
    llm_top1: int  # the LLM's most probable token over the whole vocabulary
    llm_top1_prob: float
    llm_top1_in_candidates: bool
    diverged: bool
    after_divergence: bool  # scored on a context holding a rejected draft (see the module docstring)
    trigger_value: float
    # The full context is sessions(log_dir)[session_id][:position]: groups of one session that have this set
    # can be packed into one forward over that sequence.
    in_session_sequence: bool


def _read(log_dir: Path, vocab_sha256: str | None, slm_weights_sha256: str | None) -> list[SelectRecord]:
    """The log's records, with the vocabulary and the SLM identity checked."""

    def check_header(segment: Path, header: SegmentHeader) -> None:
        got = header.selector.vocab_sha256
        if vocab_sha256 is not None and got != vocab_sha256:
            raise DistillError(f"{segment} was written by a selector with vocabulary {got}, not {vocab_sha256}; "
                               "refusing to mix tokenizers")

    try:
        records = read_records(Path(log_dir), check_header)
    except SelectionLogError as e:
        raise DistillError(str(e)) from None
    if slm_weights_sha256 is not None:
        for r in records:  # SLM identities are already carried forward within each session
            if r.slm_weights_sha256 != slm_weights_sha256:
                segment = r.source.rpartition(":")[0]
                got = (f"SLM {r.slm_model or '(unnamed)'} with weights {r.slm_weights_sha256}" if r.slm_weights_sha256
                       else "an SLM it does not name (the worker sent no slm_weights_sha256)")
                raise DistillError(
                    f"{segment}: session {r.session_id!r} step {r.step} was drafted by {got}, not by the SLM being "
                    f"trained (weights {slm_weights_sha256}); refusing to learn from another model's proposals")
    return records


def read_groups(log_dir: Path, vocab_sha256: str | None = None, slm_weights_sha256: str | None = None,
                context_tail: int = 511, include_after_divergence: bool = True) -> Iterator[Group]:
    """Groups from every closed segment under log_dir, by session and step.

    vocab_sha256: refuse segments of a selector with another vocabulary. slm_weights_sha256: refuse records
    drafted by another SLM (or by one that did not say). None skips a check. Sessions may span segments, so
    all records are read before replaying (memory grows with the log; shard by directory for very large
    logs). Raises DistillError.
    """
    records = _read(log_dir, vocab_sha256, slm_weights_sha256)
    sequences = replay_sessions(records)
    for record, pos, context in replay_contexts(records):
        if pos.after_divergence and not include_after_divergence:
            continue
        llm = pos.llm_probs
        total = sum(llm)
        teacher = [p / total for p in llm] if total > 0 else [1.0 / len(llm)] * len(llm)
        sequence = sequences.get(record.session_id, ())
        yield Group(session_id=record.session_id, step=record.step, position=pos.position,
                    context=context[-context_tail:] if context_tail > 0 else [],
                    candidate_ids=pos.candidate_ids, slm_probs=pos.slm_probs,
                    teacher_probs=teacher, target=max(range(len(teacher)), key=teacher.__getitem__),
                    llm_top1=pos.llm_top1, llm_top1_prob=pos.llm_top1_prob,
                    llm_top1_in_candidates=pos.llm_top1 in pos.candidate_ids, diverged=pos.diverged,
                    after_divergence=pos.after_divergence, trigger_value=pos.trigger_value,
                    in_session_sequence=len(sequence) >= pos.position and sequence[:pos.position] == context)


class LabelBy(enum.Enum):
    """Which logged positions become training groups (the top tau of them by this statistic)."""

    KL = "kl"  # the paper's: where the SLM and the LLM disagree most (the selector's KL trigger value)
    # where the worker's LLM-free entropy trigger would fire, i.e. the positions S2T-Local re-ranks at serving
    # time: a re-ranker trained there learns how often to keep the SLM's top-1 at exactly those positions
    ENTROPY = "entropy"


def candidate_entropy(group: Group) -> float:
    """Entropy (nats) of the SLM's probabilities over the group's candidates, renormalised: the log keeps K
    probabilities, not the top-64 the worker's trigger reads, so this ranks positions like the trigger does
    without reproducing its values."""
    total = sum(group.slm_probs)
    if total <= 0:
        return 0.0
    return -sum(p / total * math.log(p / total) for p in group.slm_probs if p > 0)


def top_positions(groups: list[Group], tau: float, by: LabelBy = LabelBy.KL) -> list[Group]:
    """The groups at the top `tau` share of positions by `by` (all of them for tau >= 1), in their order.
    Ties at the cut are kept, so slightly more than tau may pass."""
    if tau >= 1 or not groups:
        return list(groups)
    if not 0 < tau:
        raise ValueError(f"tau must lie in (0, 1]; got {tau}")
    value = (lambda g: g.trigger_value) if by is LabelBy.KL else candidate_entropy
    values = sorted(value(g) for g in groups)
    cut = values[min(len(values) - 1, int(len(values) * (1 - tau)))]
    return [g for g in groups if value(g) >= cut]


def split_held_out(groups: list[Group], share: float) -> tuple[list[Group], list[Group]]:
    """(training, held-out) groups, held out by session (never a position of a training rollout) and stably
    across runs and machines: a session is held out when crc32(session id) falls in the first `share` of
    its range."""
    held = {g.session_id for g in groups if zlib.crc32(g.session_id.encode()) % 1000 < share * 1000}
    return [g for g in groups if g.session_id not in held], [g for g in groups if g.session_id in held]


def sessions(log_dir: Path, vocab_sha256: str | None = None, slm_weights_sha256: str | None = None
             ) -> dict[str, list[int]]:
    """Each session's token sequence (the selector's last known state of it), for prefix-shared packing:
    a group with `in_session_sequence` has the full context sessions(...)[group.session_id][:group.position].
    Same checks as read_groups."""
    return replay_sessions(_read(log_dir, vocab_sha256, slm_weights_sha256))


def write_groups(groups, path: Path) -> dict:
    """Write groups as JSON lines; returns counts for a summary."""
    n = diverged = hit = after = 0
    with open(path, "w") as f:
        for g in groups:
            f.write(json.dumps(dataclasses.asdict(g)) + "\n")
            n += 1
            diverged += g.diverged and not g.after_divergence
            hit += g.llm_top1_in_candidates
            after += g.after_divergence
    return {"groups": n, "diverged": diverged, "after_divergence": after,
            "llm_top1_in_candidates": hit / n if n else 0.0}

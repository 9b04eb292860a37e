"""Prefix-shared packing of S2T-Local training groups into rows: one forward scores many groups.

The paper's layout runs one row `context[-511:] + [candidate]` per candidate: K x 512 tokens per group. Here
a row is one stretch of a session's tokens followed by the candidates of every group whose position falls in
it; each candidate sits at its group's position and attends to the row's tokens before it and to itself only
(s2t.rerank.tree_inputs), exactly what the serving scorer sees through Engine.forward_tree. A group then
costs its K candidate tokens plus its share of the row's tokens.

Rows are built per session, in position order, from the groups' own contexts: a group joins the open row when
its context agrees with the row's tokens where they overlap and continues them without a gap (contexts that
hold a rejected draft after a divergence disagree with the committed text, so they start their own row).
Every candidate sees at least min(min_context, its logged context) tokens and at most `row_tokens`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence


@dataclasses.dataclass
class Branch:
    """One group inside a row: its candidates sit at row index `pos` and see tokens[:pos]."""

    pos: int
    candidate_ids: list[int]
    teacher_probs: list[float]
    target: int
    group_index: int  # index of the group in the list given to pack_groups
    slm_probs: list[float] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Row:
    session_id: str
    start: int  # absolute session position of tokens[0]
    tokens: list[int]
    branches: list[Branch]

    @property
    def candidate_count(self) -> int:
        return sum(len(b.candidate_ids) for b in self.branches)

    @property
    def query_tokens(self) -> int:
        """Tokens in the row's forward: its context tokens plus every candidate."""
        return len(self.tokens) + self.candidate_count


def _field(group: Any, name: str, default: Any = None) -> Any:
    """Groups come as distill.groups.Group objects or as their JSON-lines dicts (write_groups)."""
    if isinstance(group, Mapping):
        return group.get(name, default)
    return getattr(group, name, default)


def pack_groups(groups: Sequence[Any], sessions: Mapping[str, Sequence[int]] | None = None, row_tokens: int = 512,
                min_context: int = 256, max_row_candidates: int = 256) -> tuple[list[Row], dict]:
    """Pack groups into rows; returns (rows, stats).

    sessions: optional full session sequences (distill.groups.sessions); a group marked in_session_sequence
    then has its whole prefix as context instead of its logged tail. Groups with fewer than 2 candidates or a
    uniform teacher distribution (the teacher gave the candidates no mass: nothing to learn) are dropped and
    counted. stats also gives the token count of the paper's one-row-per-candidate layout for comparison.
    """
    if min_context < 1 or row_tokens < min_context:
        raise ValueError(f"need 1 <= min_context ({min_context}) <= row_tokens ({row_tokens})")
    stats = {"groups": len(groups), "packed_groups": 0, "dropped_single_candidate": 0, "dropped_uniform_teacher": 0,
             "rows": 0, "context_tokens": 0, "candidate_tokens": 0, "paper_layout_tokens": 0, "max_candidates": 0}
    by_session: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        cands = list(_field(g, "candidate_ids"))
        probs = list(_field(g, "teacher_probs"))
        if len(cands) < 2:
            stats["dropped_single_candidate"] += 1
            continue
        if max(probs) - min(probs) <= 1e-12:
            stats["dropped_uniform_teacher"] += 1
            continue
        by_session.setdefault(str(_field(g, "session_id")), []).append(i)
    rows: list[Row] = []
    for sid, members in by_session.items():
        members.sort(key=lambda i: (int(_field(groups[i], "position")), i))
        row: Row | None = None
        for i in members:
            g = groups[i]
            position = int(_field(g, "position"))
            context = list(_field(g, "context"))
            if sessions is not None and _field(g, "in_session_sequence", False) and sid in sessions:
                full = sessions[sid]
                if len(full) >= position:
                    context = list(full[:position])
            ctx_start = position - len(context)
            k = len(_field(g, "candidate_ids"))
            if row is None or not _fits(row, position, context, ctx_start, k, row_tokens, min_context,
                                        max_row_candidates):
                start = position - min(len(context), min_context)
                row = Row(session_id=sid, start=start, tokens=context[start - ctx_start:], branches=[])
                rows.append(row)
            end = row.start + len(row.tokens)
            if position > end:  # continue the row's tokens with this group's context (no gap: checked)
                row.tokens.extend(context[end - ctx_start:])
            probs = [float(p) for p in _field(g, "teacher_probs")]
            row.branches.append(Branch(pos=position - row.start, candidate_ids=[int(c) for c in _field(g, "candidate_ids")],
                                       teacher_probs=probs, target=int(_field(g, "target")), group_index=i,
                                       slm_probs=[float(p) for p in (_field(g, "slm_probs") or [])]))
            stats["packed_groups"] += 1
            stats["paper_layout_tokens"] += k * (min(len(context), 511) + 1)
            stats["max_candidates"] = max(stats["max_candidates"], k)
    for row in rows:
        # trim tokens no candidate reads: the last branch decides where the row ends
        row.tokens = row.tokens[:max(b.pos for b in row.branches)]
        stats["context_tokens"] += len(row.tokens)
        stats["candidate_tokens"] += row.candidate_count
    stats["rows"] = len(rows)
    return rows, stats


def _fits(row: Row, position: int, context: list[int], ctx_start: int, k: int, row_tokens: int, min_context: int,
          max_row_candidates: int) -> bool:
    """Can a group at `position` with `context` (covering [ctx_start, position)) join the row?"""
    end = row.start + len(row.tokens)
    if position - row.start > row_tokens or row.candidate_count + k > max_row_candidates:
        return False
    if position - row.start < min(min_context, len(context)):  # it would see too little of its context
        return False
    if ctx_start > min(end, position):  # a gap between the row's tokens and this context
        return False
    lo, hi = max(row.start, ctx_start), min(end, position)
    return row.tokens[lo - row.start:hi - row.start] == context[lo - ctx_start:hi - ctx_start]


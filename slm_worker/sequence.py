"""One generation request's state: its tokens (committed, then drafted), blocks awaiting verdicts, and the text
streamed so far. Touched only by the decode loop (slm_worker/loop.py), so it needs no lock."""

from __future__ import annotations

import asyncio
import collections
import contextvars
import dataclasses
import enum
import time

from s2t.modes import Mode, TriggerKind
from s2t.runtime import KVCache
from s2t.triggers import LocalTrigger, Proposal
from s2t.v1 import generation_pb2 as gen_pb

from .proposer import DivergenceOdds
from .sampling import Sampler
from .verifiers import Block, Verdict, VerdictKind, VerdictSource, VerifierSession

MAX_RESYNCS = 2  # per block start; after that the block is committed unverified


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """Per-request settings, resolved from the request and the worker's configuration by the server."""

    mode: Mode
    max_new_tokens: int
    num_candidates: int  # K
    trigger: TriggerKind
    trigger_rate: float  # tau: the share of positions the trigger is calibrated to fire at
    local_trigger: LocalTrigger | None  # the entropy / margin trigger, evaluated by the worker
    warmup_steps: int  # generation steps that never trigger
    block_size: int  # drafted positions per verification
    max_inflight_blocks: int  # blocks awaiting a verdict at once; 1 = wait for each
    selector_deadline_s: float  # how long one selector call may take before its drafts commit unverified
    decode_chunk: int  # llm mode: tokens per Decode call
    draft_confidence: float  # draft past unverified positions only while P(all accepted) >= this
    # Below draft_confidence: False = pause drafting until a verdict; True = draft on, send the unsure block at
    # once and hold the blocks after it until its verdict (Sequence.holding).
    draft_when_unsure: bool = False
    # With draft_when_unsure: while the blocks in flight are unsure, draft the continuations after the verifier's
    # likeliest other picks beside the drafts (Branch), at most max_branches at once; one the verdict picks is adopted.
    branch_when_unsure: bool = False
    max_branches: int = 1
    # Sampling (mode greedy only): temperature 0 is the argmax; top_p 0 or 1 is off; seed is the one resolved by
    # the server (never 0 when temperature > 0: the worker picks one for a request that leaves it unset).
    temperature: float = 0.0
    top_p: float = 0.0
    seed: int = 0

    @property
    def sampling(self) -> bool:
        return self.temperature > 0


class Commit(enum.Enum):
    VERIFIED = "verified"  # a verifier answered for these tokens (or the mode needs none)
    UNVERIFIED = "unverified"  # the verifier could not answer in time
    BUDGET = "budget"  # the worker's selector-call budget was spent: the SLM decided alone


class Event:
    """What a client stream receives: committed text, then the final response."""

    __slots__ = ("text", "token_ids", "final")

    def __init__(self, text: str = "", token_ids: list[int] | None = None,
                 final: gen_pb.GenerateResponse | None = None):
        self.text, self.token_ids, self.final = text, token_ids or [], final


class TextStream:
    """Incremental detokenisation: each commit decodes only a short window, not the whole completion.

    Decodes ids[prefix:] and compares it with ids[prefix:read] (the text already emitted from that window), as
    vLLM and TGI do, so byte-level pieces that combine across token boundaries come out right. A window that
    ends in an incomplete UTF-8 character is held back (with its ids) until the character completes.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the decoding window
        self.read = 0  # ids[:read] have been emitted as text
        self.text = ""  # everything emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, new_ids: list[int]) -> tuple[str, list[int]] | None:
        """Add committed ids; returns (new text, the ids it completes) or None while a character is partial."""
        self.ids.extend(new_ids)
        window = self._decode(self.ids[self.prefix:])
        if window.endswith("\ufffd"):
            return None
        emitted = self._decode(self.ids[self.prefix:self.read])
        ids = self.ids[self.read:]
        text = window[len(emitted):] if window.startswith(emitted) else window
        self.prefix, self.read = self.read, len(self.ids)
        self.text += text
        return text, ids

    def flush(self) -> tuple[str, list[int]]:
        """At the end: whatever is still held back (a character that never completed decodes as U+FFFD)."""
        ids = self.ids[self.read:]
        if not ids:
            return "", []
        window = self._decode(self.ids[self.prefix:])
        emitted = self._decode(self.ids[self.prefix:self.read])
        text = window[len(emitted):] if window.startswith(emitted) else window
        self.prefix = self.read = len(self.ids)
        self.text += text
        return text, ids


@dataclasses.dataclass(eq=False)
class Branch:
    """A contingency: how the sequence goes on if its verifier picks `tokens[0]` at `position` instead of the draft
    (the candidate of that rank there).

    Invariants: tokens[i] sits at position + i; proposals[i] is the SLM's proposal at position + 1 + i, so
    tokens[i + 1] == proposals[i].token and len(proposals) == len(tokens) - 1. `cache` holds the sequence's
    tokens[:position] followed by tokens[:cache.length - position]; the next forward feeds the rest.
    """

    position: int
    tokens: list[int]
    cache: KVCache  # forked from the sequence's cache at `position`
    proposals: list[Proposal] = dataclasses.field(default_factory=list)

    def feed(self) -> list[int]:
        return self.tokens[self.cache.length - self.position:]


class Sequence:
    """One request: what the SLM drafted, what the verifier has settled, what the client has received.

    Cursor invariants (positions index `tokens`, prompt included):
      prompt_len <= committed <= len(tokens); tokens[:committed] are final, tokens[committed:] are drafts.
      In verified modes, `blocks` tile [committed, unsent) in order: blocks[0].start == committed when any
        exist; tokens[unsent:] are drafts not yet in a block. A verdict is applied only at the head block.
      `proposals` holds what the SLM proposed at every drafted (uncommitted) position.
      The SLM cache holds tokens[:len(tokens) - 1] or all of them: the newest token is fed at the next forward.
      `branches` (branch_when_unsure, see Branch), at most opts.max_branches, each sit at a drafted position
        >= committed with a token that is not the draft there, no two on the same (position, token); a branch is
        dropped when a verdict passes or reaches its position.
    """

    def __init__(self, request_id: str, session_id: str, prompt_ids: list[int], opts: DecodeOptions, engine,
                 stop_ids: tuple[int, ...], tokenizer, mode_requested: int, odds: DivergenceOdds):
        self.request_id, self.session_id, self.opts = request_id, session_id, opts
        self.running = opts.mode  # the algorithm running now: llm falls back to greedy when the selector fails
        self.engine = engine
        self.odds = odds
        self.cache = engine.new_cache() if opts.mode is not Mode.LLM else None
        self.verifier: VerifierSession | None = None
        self.stop_ids = set(stop_ids)
        self.tokens = list(prompt_ids)
        self.prompt_len = len(prompt_ids)
        self.committed = self.prompt_len
        self.unsent = self.prompt_len
        self.proposals: dict[int, Proposal] = {}
        self.blocks: collections.deque[Block] = collections.deque()
        self.branches: list[Branch] = []
        self.resyncs_at: collections.Counter[int] = collections.Counter()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.text = TextStream(tokenizer)
        self.done = False
        self.cancelled = False
        self.finish_reason = gen_pb.FINISH_REASON_UNSPECIFIED
        self.stats = gen_pb.GenerationStats(mode_requested=mode_requested, mode_used=opts.mode.proto,
                                            prompt_tokens=self.prompt_len, seed=opts.seed if opts.sampling else 0)
        # Its own generator: the sampled tokens depend on the seed and this request's logits only (sampling.py).
        self.sampler = Sampler(opts.temperature, opts.top_p, opts.seed) if opts.sampling else None
        self.started = time.monotonic()
        self.first_commit: float | None = None
        self.unverified_reasons: collections.Counter[str] = collections.Counter()
        self.fallback_reasons: collections.Counter[str] = collections.Counter()
        # With tracing on, the context of the request's call (its Generate span current): the scheduler runs
        # this sequence's verifier calls in a copy of it, so its selector spans join the request's trace.
        self.trace_context: contextvars.Context | None = None

    # -- drafting -----------------------------------------------------------------------------------------

    def drafting_stopped(self) -> bool:
        """No more drafts until a verdict: done, at the length limit, or an end of turn is pending."""
        generated = len(self.tokens) - self.prompt_len
        return (self.done or self.cancelled or generated >= self.opts.max_new_tokens
                or (generated > 0 and self.tokens[-1] in self.stop_ids))

    def wants_forward(self) -> bool:
        lookahead = self.opts.block_size * self.opts.max_inflight_blocks
        return (not self.drafting_stopped() and len(self.tokens) - self.committed < lookahead
                and (self.drafts_when_unsure or not self.unsure()))

    def odds_key(self, source: VerdictSource = VerdictSource.SELECTOR) -> tuple:
        rate = self.opts.trigger_rate if self.opts.trigger is not TriggerKind.ALWAYS else 0.0
        if self.opts.mode is Mode.TAKEOVER:  # diverges on any disagreement with the LLM's top-1: odds of its own
            return (source.value, Mode.TAKEOVER.value, self.opts.trigger.value, rate)
        return (source.value, self.opts.trigger.value, rate)

    def p_accepted(self, start: int, end: int) -> float:
        """The odds (DivergenceOdds) that the verifier accepts every checked draft in tokens[start:end]."""
        accepted = 1.0
        key = self.odds_key(VerdictSource.SELECTOR if self.running.selector_verified else VerdictSource.RERANKER)
        for pos in range(start, end):
            if self.needs_check(pos):
                accepted *= 1.0 - self.odds.p_diverge(key, self.proposals[pos].probs[0])
        return accepted

    def unsure(self) -> bool:
        """The unverified drafts are unlikely to all be accepted: send what is drafted and (unless
        draft_when_unsure) wait for the verdict before drafting on."""
        if not self.running.verified or self.opts.draft_confidence <= 0:
            return False
        return self.p_accepted(self.committed, len(self.tokens)) < self.opts.draft_confidence

    @property
    def drafts_when_unsure(self) -> bool:
        """draft_when_unsure applies to the selector's modes: the local re-ranker scores on the worker's own
        compute thread, so drafting on would only queue behind it."""
        return self.opts.draft_when_unsure and self.running.selector_verified

    def holding(self) -> bool:
        """draft_when_unsure: the blocks in flight are unlikely to all be accepted, so the drafts after them
        stay here until their verdicts: a rejection then throws them away without the verifier having scored
        them (on a selector that is busy, scoring them would delay the verdict the worker waits for)."""
        return (self.drafts_when_unsure and self.opts.draft_confidence > 0 and self.unsent > self.committed
                and self.p_accepted(self.committed, self.unsent) < self.opts.draft_confidence)

    def feed(self) -> list[int]:
        """Tokens the SLM cache lacks: the whole prompt at first, then the last token."""
        return self.tokens[self.cache.length:]

    def add_proposal(self, proposal: Proposal, token: int | None = None) -> None:
        """Draft the next position: the proposal's top-1, or `token` when the request samples (mode greedy)."""
        pos = len(self.tokens)
        self._record_draft(pos, proposal)
        self.tokens.append(proposal.token if token is None else token)
        if not self.running.verified:  # no verifier: the draft is final (unverified unless greedy was asked for)
            if self.opts.mode is Mode.GREEDY:
                self.commit(pos + 1, Commit.VERIFIED)
            else:
                self.commit(pos + 1, Commit.UNVERIFIED, reason="no verifier available; the SLM continued alone")

    def _record_draft(self, pos: int, proposal: Proposal) -> None:
        trig = self.opts.local_trigger
        proposal.triggered = trig is not None and trig.fires(proposal, pos - self.prompt_len)
        self.stats.triggered_positions += proposal.triggered
        self.proposals[pos] = proposal
        self.stats.drafted_tokens += 1

    # -- the branch ---------------------------------------------------------------------------------------

    def branch_rows(self) -> list[Branch]:
        """The branches that want a forward now; made while the blocks in flight are unsure (holding), up to
        opts.max_branches at once.

        Each goes on from one of the verifier's likeliest other picks in flight: candidate r at position p, with the
        odds P(every checked draft before p accepted) x P(diverge at p) (DivergenceOdds) x P(the changed pick is the
        candidate of rank r) (DivergenceOdds.p_rank), both learned from the verdicts. With one branch that is the second
        candidate at the likeliest divergence: where the selector's pick is not the SLM's top-1, it is the second
        65 % of the time (bench/label_stats.py). A branch drafts as far past its point as the sequence may draft
        past its committed tokens."""
        if not (self.opts.branch_when_unsure and self.drafts_when_unsure) or self.done or self.cancelled:
            return []
        if len(self.branches) < self.opts.max_branches and self.holding():
            taken = {(b.position, b.tokens[0]) for b in self.branches}
            room = self.opts.block_size * self.opts.max_inflight_blocks + 1
            for pos, rank in self._branch_points(self.opts.max_branches - len(self.branches), taken):
                self.branches.append(Branch(pos, [self.proposals[pos].ids[rank]], self.cache.fork(pos, room)))
        lookahead = self.opts.block_size * self.opts.max_inflight_blocks
        return [b for b in self.branches
                if not (len(b.tokens) >= lookahead or b.tokens[-1] in self.stop_ids
                        or b.position + len(b.tokens) >= self.prompt_len + self.opts.max_new_tokens)]

    def _branch_points(self, n: int, taken: set[tuple[int, int]]) -> list[tuple[int, int]]:
        """The n likeliest (position, candidate rank) picks in flight other than the drafts, skipping `taken`."""
        key, accepted, odds = self.odds_key(), 1.0, []
        rank_odds = [0.0] + [self.odds.p_rank(key, rank) for rank in range(1, self.opts.num_candidates)]
        for pos in range(self.committed, self.unsent):
            if not self.needs_check(pos):
                continue
            d = self.odds.p_diverge(key, self.proposals[pos].probs[0])
            ids = self.proposals[pos].ids
            for rank in range(1, min(self.opts.num_candidates, len(ids))):
                if (pos, ids[rank]) not in taken:
                    odds.append((accepted * d * rank_odds[rank], pos, rank))
            accepted *= 1.0 - d
        odds.sort(key=lambda o: -o[0])  # stable: ties go to the earlier position, then the higher candidate
        return [(pos, rank) for _, pos, rank in odds[:n]]

    def add_branch_proposal(self, branch: Branch, proposal: Proposal) -> None:
        branch.proposals.append(proposal)
        branch.tokens.append(proposal.token)
        self.stats.branch_drafted_tokens += 1

    def take_branch(self, position: int, token: int) -> Branch | None:
        """The branch for `token` at `position` (the verifier's changed pick), if there is one; every branch is
        dropped either way, and a changed pick that branches were drafted for but missed is counted by why."""
        branches, self.branches = self.branches, []
        if not branches:
            return None
        if (branch := next((b for b in branches if b.position == position and b.tokens[0] == token), None)):
            return branch
        if any(b.position == position for b in branches):
            self.stats.branch_missed_candidate += 1
        else:
            self.stats.branch_missed_position += 1
        return None

    # -- blocks -------------------------------------------------------------------------------------------

    def next_block(self) -> Block | None:
        """Close a block from the unsent drafts when it is full, drafting has stopped or the drafts are unsure;
        none while holding (draft_when_unsure: the blocks in flight are unsure)."""
        pending = len(self.tokens) - self.unsent
        if self.done or not self.running.verified or pending <= 0 or self.holding():
            return None
        if pending < self.opts.block_size and not self.drafting_stopped() and not self.unsure():
            return None  # a block closes early when drafting pauses, so the verdict it waits for comes
        start, end = self.unsent, min(len(self.tokens), self.unsent + self.opts.block_size)
        self.unsent = end
        block = Block(start, end, [p for p in range(start, end) if self.needs_check(p)])
        if not block.checked:
            block.verdict = Verdict(VerdictKind.SKIPPED)
        self.blocks.append(block)
        return block

    def needs_check(self, pos: int) -> bool:
        if self.opts.trigger is TriggerKind.ALWAYS:
            return True
        if self.opts.trigger is TriggerKind.KL:  # the selector computes it: every position past the warm-up
            return pos - self.prompt_len >= self.opts.warmup_steps
        return self.proposals[pos].triggered

    def settle(self) -> None:
        """Apply the verdicts of the blocks at the head of the queue, in position order."""
        while self.blocks and self.blocks[0].verdict is not None and not self.done:
            block = self.blocks.popleft()
            self.apply(block, block.verdict)
            if self.verifier is not None:
                self.verifier.settled(self, block, block.verdict)

    def apply(self, block: Block, verdict: Verdict) -> None:
        kind = verdict.kind
        if kind is VerdictKind.SKIPPED:
            self.commit(block.end, Commit.VERIFIED)
        elif kind is VerdictKind.OVER_BUDGET:
            self.commit(block.end, Commit.BUDGET)
        elif kind is VerdictKind.SESSION_LOST:
            self.resync(block)
        elif kind is VerdictKind.UNAVAILABLE:
            self.requeue_after(block.end)
            self.commit(block.end, Commit.UNVERIFIED, reason=verdict.reason)
        else:
            self.apply_decision(block, verdict)

    def apply_decision(self, block: Block, verdict: Verdict) -> None:
        """ACCEPTED or DIVERGED: count what was checked, learn the odds, commit, roll back on divergence."""
        st = self.stats
        if verdict.source is VerdictSource.SELECTOR:
            st.positions_checked += len(block.checked)
            st.llm_forwards += verdict.llm_forwards
        else:
            st.reranked_positions += verdict.checked
            st.adapter_version = verdict.adapter_version
        q = verdict.position if verdict.kind is VerdictKind.DIVERGED else block.end
        for pos in block.checked:
            if pos <= q:  # positions after a divergence got no verdict
                self.odds.observe(self.odds_key(verdict.source), self.proposals[pos].probs[0], pos == q)
        if verdict.kind is VerdictKind.ACCEPTED:
            self.commit(block.end, Commit.VERIFIED)
            return
        # takeover: the LLM's own top-1, which need not be among the candidates
        chosen = verdict.token if verdict.token is not None else self.proposals[q].ids[verdict.index]
        if verdict.token is None:
            self.odds.observe_pick(self.odds_key(verdict.source), verdict.index)
        branch = self.take_branch(q, chosen)
        self.commit(q, Commit.VERIFIED)
        self.rollback(q)
        self.tokens.append(chosen)
        self.unsent = q + 1
        st.picks_changed += 1
        self.commit(q + 1, Commit.VERIFIED)
        if branch is not None and not self.done:
            # drafted beside the rolled-back drafts: its drafts and cache become the sequence's own
            self.cache = branch.cache
            for pos, proposal in enumerate(branch.proposals, start=q + 1):
                self._record_draft(pos, proposal)
                self.tokens.append(proposal.token)
            st.branches_adopted += 1

    def rollback(self, pos: int) -> None:
        """Forget every draft at or after `pos`: tokens, proposals, queued blocks and the SLM cache."""
        self.stats.rolled_back_tokens += len(self.tokens) - pos
        self.branches = [b for b in self.branches if b.position < pos]
        self.requeue_after(pos)
        del self.tokens[pos:]
        for p in [p for p in self.proposals if p >= pos]:
            del self.proposals[p]
        self.cache.crop(pos)
        self.unsent = pos

    def requeue_after(self, pos: int) -> None:
        """Drop queued blocks past `pos` (their verdicts are ignored); their drafts will be sent again."""
        while self.blocks and self.blocks[-1].end > pos:
            self.blocks.pop()
        self.unsent = min(self.unsent, pos)

    def resync(self, block: Block) -> None:
        """The selector lost our session: send this block and all after it again, with the full context."""
        self.stats.resyncs += 1
        self.resyncs_at[block.start] += 1
        self.requeue_after(block.start)
        if self.resyncs_at[block.start] > MAX_RESYNCS:
            self.requeue_after(block.end)
            self.unsent = block.end
            self.commit(block.end, Commit.UNVERIFIED, reason="selector kept losing the session")

    def note_fallback(self, why: str) -> None:
        """A block went to the local re-ranker because the selector is down."""
        self.fallback_reasons[why] += 1

    # -- committing ---------------------------------------------------------------------------------------

    def append_committed(self, token_ids: list[int]) -> None:
        """llm mode: tokens the selector's model generated are final as they arrive."""
        self.tokens.extend(token_ids)
        self.stats.drafted_tokens += len(token_ids)
        self.commit(len(self.tokens), Commit.VERIFIED)

    def commit(self, upto: int, how: Commit, reason: str = "") -> None:
        upto = min(upto, len(self.tokens), self.prompt_len + self.opts.max_new_tokens)
        if upto <= self.committed or self.done:
            return
        new = self.tokens[self.committed:upto]
        stop = next((i for i, t in enumerate(new) if t in self.stop_ids), None)
        if stop is not None:  # an end of turn ends the completion
            new, upto = new[:stop + 1], self.committed + stop + 1
            self.finish_reason = gen_pb.FINISH_REASON_STOP
        elif upto == self.prompt_len + self.opts.max_new_tokens:
            self.finish_reason = gen_pb.FINISH_REASON_LENGTH
        if how is Commit.VERIFIED:
            self.stats.verified_tokens += len(new)
        elif how is Commit.UNVERIFIED:
            self.stats.unverified_tokens += len(new)
            self.unverified_reasons[reason] += len(new)
        else:
            self.stats.local_decisions += len(new)
        self.committed = upto
        for p in [p for p in self.proposals if p < upto]:
            del self.proposals[p]
        self.branches = [b for b in self.branches if b.position >= upto]  # a verdict passed the others' positions
        if self.first_commit is None:
            self.first_commit = time.monotonic()
        piece = self.text.push(new)
        if piece is not None:
            self.events.put_nowait(Event(*piece))
        if self.finish_reason:
            self.finish()

    def finish(self, reason: int | None = None) -> None:
        if self.done:
            return
        self.done = True
        self.branches = []
        if reason is not None:
            self.finish_reason = reason
        del self.tokens[self.committed:]
        completion = self.tokens[self.prompt_len:]
        st = self.stats
        st.completion_tokens = len(completion)
        st.wall_s = time.monotonic() - self.started
        st.tokens_per_s = len(completion) / st.wall_s if st.wall_s > 0 else 0.0
        st.time_to_first_token_s = (self.first_commit - self.started) if self.first_commit else 0.0
        self._describe_what_ran(completion)
        text, ids = self.text.flush()
        if text or ids:
            self.events.put_nowait(Event(text, ids))
        self.events.put_nowait(Event(final=gen_pb.GenerateResponse(
            request_id=self.request_id, text=self.text.text, token_ids=completion, finish_reason=self.finish_reason,
            stats=st)))

    def _describe_what_ran(self, completion: list[int]) -> None:
        """mode_used and degraded_reason: which verifier actually answered, and why not the requested one."""
        st = self.stats
        if self.opts.mode.verified and completion:
            by_selector, by_reranker = st.positions_checked > 0, st.reranked_positions > 0
            if self.opts.mode is Mode.S2T and not by_selector and by_reranker:
                st.mode_used = Mode.S2T_LOCAL.proto
            elif not by_selector and not by_reranker and (st.unverified_tokens + st.local_decisions):
                st.mode_used = Mode.GREEDY.proto  # no verifier ever answered: this was the SLM alone
        notes = []
        if self.fallback_reasons:
            why = "; ".join(f"{n} blocks: {r}" for r, n in self.fallback_reasons.most_common(2))
            notes.append(f"re-ranked locally by adapter {st.adapter_version or '?'} ({why})")
        if self.unverified_reasons:
            reasons = "; ".join(f"{n} tokens: {r}" for r, n in self.unverified_reasons.most_common(3))
            notes.append(f"committed unverified ({reasons})")
        if notes:
            st.degraded_reason = "; ".join(([st.degraded_reason] if st.degraded_reason else []) + notes)

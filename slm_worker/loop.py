"""The worker's decode loop: draft with the SLM, let the selector verify blocks, commit, stream.

One loop serves every mode:
  greedy  each drafted token is committed at once;
  s2t     drafted positions are grouped into blocks of `block_size`. A block whose positions need a check
          (all of them for the `always`/`kl` triggers, the triggered ones for `entropy`/`margin`) goes to
          the selector while the SLM keeps drafting, up to `max_inflight_blocks` blocks ahead, and only
          while the unverified drafts are likely to be accepted (`draft_confidence`, odds learned from the
          replies): a draft past a likely rejection is wasted work that slows the verification on shared
          cores. Blocks settle in order: accepted -> committed; diverged at q -> commit up to q, take the
          selector's candidate at q, roll the SLM's cache back to q, drop every later draft and queued
          block. With block_size 1 and one block in flight this is the classic, non-speculative S2T step;
  llm     the selector's model generates (Decode calls); the SLM is not used.
Only committed tokens reach the client. A selector that fails, lags past the request's deadline or has
no budget left never fails a request: the block is committed unverified (or decided locally) and counted.

Sequence state is touched only by the loop; the SLM forward runs in a thread meanwhile and selector calls
merely record their outcome on their block, so nothing needs a lock.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time

from s2t.v1 import generation_pb2 as gen_pb
from s2t.v1 import selector_pb2 as sel_pb

from s2t.runtime import Engine
from .selector_client import SelectorClient, SelectorUnavailable, SessionLost
from s2t.triggers import LocalTrigger, Proposal, propose

log = logging.getLogger(__name__)

MODES = {"greedy": gen_pb.MODE_GREEDY, "s2t": gen_pb.MODE_S2T, "llm": gen_pb.MODE_LLM}
MAX_RESYNCS = 2  # per block start; after that the block is committed unverified


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """Per-request settings, resolved and validated by the server."""

    mode: str  # greedy | s2t | llm
    max_new_tokens: int
    num_candidates: int = 8
    trigger: str = "always"  # always | entropy | margin | kl
    local_trigger: LocalTrigger | None = None  # for entropy / margin
    kl_rate: float = 0.1
    warmup_steps: int = 3
    block_size: int = 8
    max_inflight_blocks: int = 2
    block_deadline_s: float = 30.0  # wait: the verify deadline; commit_after_lag: the lag
    decode_chunk: int = 16
    draft_confidence: float = 0.0  # draft past unverified positions only while P(all accepted) >= this


class DivergenceOdds:
    """How likely the selector is to reject a drafted position, learned from its replies.

    The SLM's own top-1 probability predicts a rejection well (selection logs of the embedded pair, `always`
    trigger: 1.4 % of positions with top-1 >= 0.8 diverge, 44-62 % of those below 0.6), but how often a
    disagreement becomes a divergence depends on the trigger and its rate. So the worker counts, per
    trigger and rate and per tenth of top-1 probability, the checked positions it saw accepted and
    diverged, starting from the prior P(diverge) = 1 - top-1 worth `prior_weight` observations.
    """

    BINS = 10

    def __init__(self, prior_weight: float = 4.0):
        self.prior_weight = prior_weight
        self.counts: dict[tuple, list[list[int]]] = {}  # key -> per bin [diverged, seen]

    def _bin(self, top1: float) -> int:
        return min(max(int(top1 * self.BINS), 0), self.BINS - 1)

    def p_diverge(self, key: tuple, top1: float) -> float:
        b = self._bin(top1)
        diverged, seen = self.counts[key][b] if key in self.counts else (0, 0)
        prior = 1.0 - (b + 0.5) / self.BINS
        return (diverged + self.prior_weight * prior) / (seen + self.prior_weight)

    def observe(self, key: tuple, top1: float, diverged: bool) -> None:
        cell = self.counts.setdefault(key, [[0, 0] for _ in range(self.BINS)])[self._bin(top1)]
        cell[0] += diverged
        cell[1] += 1


@dataclasses.dataclass(eq=False)
class Block:
    """Drafted positions [start, end), verified (or settled locally) together."""

    start: int
    end: int
    checked: list[int]  # positions the selector is asked about
    outcome: object = None  # SelectResponse | "skipped" | "local" | SessionLost | SelectorUnavailable


class Event:
    """What a client stream receives: committed text, then the final response."""

    __slots__ = ("text", "token_ids", "final")

    def __init__(self, text: str = "", token_ids: list[int] | None = None,
                 final: gen_pb.GenerateResponse | None = None):
        self.text, self.token_ids, self.final = text, token_ids or [], final


class Sequence:
    """One generation request: its tokens (committed, then drafted), its SLM cache and its blocks."""

    def __init__(self, request_id: str, session_id: str, prompt_ids: list[int], opts: DecodeOptions, engine: Engine,
                 stop_ids: tuple[int, ...], tokenizer, mode_requested: int, odds: DivergenceOdds | None = None):
        self.request_id, self.session_id, self.opts = request_id, session_id, opts
        self.odds = odds or DivergenceOdds()
        self.odds_key = (opts.trigger, opts.kl_rate if opts.trigger != "always" else 0.0)
        self.cache = engine.new_cache() if opts.mode != "llm" else None
        self.stop_ids = set(stop_ids)
        self.tokenizer = tokenizer
        self.tokens = list(prompt_ids)
        self.prompt_len = len(prompt_ids)
        self.committed = self.prompt_len  # tokens[:committed] are final
        self.proposals: dict[int, Proposal] = {}  # drafted position -> what the SLM proposed there
        self.blocks: collections.deque[Block] = collections.deque()  # sent or settled, in position order
        self.unsent = self.prompt_len  # first drafted position not yet in a block
        self.chain = 0  # selector length the next request builds on (0: send the full context)
        self.confirmed = 0  # selector length reported by the last reply
        self.next_step = 0
        self.resyncs_at: collections.Counter[int] = collections.Counter()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.done = False
        self.cancelled = False
        self.finish_reason = gen_pb.FINISH_REASON_UNSPECIFIED
        self.stats = gen_pb.GenerationStats(mode_requested=mode_requested, mode_used=MODES[opts.mode],
                                            prompt_tokens=self.prompt_len)
        self.started = time.monotonic()
        self.first_commit: float | None = None
        self.emitted_text = ""  # text streamed so far
        self.unstreamed: list[int] = []  # committed ids not streamed yet (an incomplete UTF-8 character)
        self.unverified_reasons: collections.Counter[str] = collections.Counter()

    # -- drafting -----------------------------------------------------------------------------------------

    def drafting_stopped(self) -> bool:
        """No more drafts until a verdict: done, at the length limit, or an end of turn is pending."""
        generated = len(self.tokens) - self.prompt_len
        return (self.done or self.cancelled or generated >= self.opts.max_new_tokens
                or (generated > 0 and self.tokens[-1] in self.stop_ids))

    def wants_forward(self) -> bool:
        lookahead = self.opts.block_size * self.opts.max_inflight_blocks
        return (not self.drafting_stopped() and len(self.tokens) - self.committed < lookahead
                and not self.unsure())

    def unsure(self) -> bool:
        """The unverified drafts are unlikely to all be accepted: wait for their verdict before drafting on."""
        if self.opts.mode != "s2t" or self.opts.draft_confidence <= 0:
            return False
        accepted = 1.0
        for pos in range(self.committed, len(self.tokens)):
            if self.needs_check(pos):
                accepted *= 1.0 - self.odds.p_diverge(self.odds_key, self.proposals[pos].probs[0])
        return accepted < self.opts.draft_confidence

    def feed(self) -> list[int]:
        """Tokens the SLM cache lacks: the whole prompt at first, then the last token."""
        return self.tokens[self.cache.length:]

    def add_proposal(self, proposal: Proposal) -> None:
        pos = len(self.tokens)
        trig = self.opts.local_trigger
        proposal.triggered = trig is not None and trig.fires(proposal, pos - self.prompt_len)
        self.stats.triggered_positions += proposal.triggered
        self.proposals[pos] = proposal
        self.tokens.append(proposal.token)
        self.stats.drafted_tokens += 1
        if self.opts.mode == "greedy":
            self.commit(pos + 1, "verified")

    # -- blocks -------------------------------------------------------------------------------------------

    def next_block(self) -> Block | None:
        """Close a block from the unsent drafts when it is full or drafting has stopped."""
        pending = len(self.tokens) - self.unsent
        if self.done or self.opts.mode != "s2t" or pending <= 0:
            return None
        if pending < self.opts.block_size and not self.drafting_stopped() and not self.unsure():
            return None  # a block closes early when drafting pauses, so the verdict it waits for comes
        start, end = self.unsent, min(len(self.tokens), self.unsent + self.opts.block_size)
        self.unsent = end
        block = Block(start, end, [p for p in range(start, end) if self.needs_check(p)])
        if not block.checked:
            block.outcome = "skipped"
        self.blocks.append(block)
        return block

    def needs_check(self, pos: int) -> bool:
        if self.opts.trigger == "always":
            return True
        if self.opts.trigger == "kl":
            return pos - self.prompt_len >= self.opts.warmup_steps
        return self.proposals[pos].triggered

    def request_for(self, block: Block) -> sel_pb.SelectRequest:
        """The Select request for a block, chained on the selector length the previous block leaves."""
        prefix, step = self.chain, self.next_step
        self.next_step += 1
        self.chain = block.end - 1  # the block's last draft is only a candidate; it goes out with the next block
        k, kl = self.opts.num_candidates, self.opts.trigger == "kl"
        value = self.opts.local_trigger.value if self.opts.local_trigger else (lambda p: 0.0)
        positions = [sel_pb.CandidatePosition(
            position=p, candidate_ids=prop.ids[:k], candidate_probs=prop.probs[:k],
            support_ids=prop.ids[k:] if kl else [], support_probs=prop.probs[k:] if kl else [],
            worker_triggered=prop.triggered, worker_trigger_value=value(prop))
            for p in block.checked for prop in (self.proposals[p],)]
        if self.opts.trigger == "always":
            trigger = sel_pb.SelectTriggerSpec(kind=sel_pb.SELECT_TRIGGER_ALWAYS)
        elif kl:
            trigger = sel_pb.SelectTriggerSpec(kind=sel_pb.SELECT_TRIGGER_KL, kl_rate=self.opts.kl_rate)
        else:
            trigger = sel_pb.SelectTriggerSpec(kind=sel_pb.SELECT_TRIGGER_WORKER)
        return sel_pb.SelectRequest(session_id=self.session_id, step=step, prefix_length=prefix,
                                    token_ids=self.tokens[prefix:block.end - 1], positions=positions,
                                    trigger=trigger, request_id=self.request_id)

    def settle(self) -> None:
        """Apply the outcomes of the blocks at the head of the queue, in position order."""
        while self.blocks and self.blocks[0].outcome is not None and not self.done:
            block = self.blocks.popleft()
            outcome = block.outcome
            if outcome == "skipped":
                self.commit(block.end, "verified")
            elif outcome == "local":
                self.commit(block.end, "local")
            elif isinstance(outcome, SessionLost):
                self.resync(block)
            elif isinstance(outcome, SelectorUnavailable):
                self.requeue_after(block.end)
                self.chain = self.confirmed  # the selector holds at least that much of what we hold
                self.commit(block.end, "unverified", reason=str(outcome))
            else:
                self.apply_reply(block, outcome)

    def apply_reply(self, block: Block, reply: sel_pb.SelectResponse) -> None:
        self.stats.positions_checked += len(block.checked)
        self.stats.llm_forwards += 1
        self.confirmed = reply.session_length
        q = reply.selections[-1].position if reply.outcome == sel_pb.SELECT_OUTCOME_DIVERGED else block.end
        for pos in block.checked:
            if pos <= q:  # positions after a divergence got no verdict
                self.odds.observe(self.odds_key, self.proposals[pos].probs[0], pos == q)
        if reply.outcome != sel_pb.SELECT_OUTCOME_DIVERGED:
            self.commit(block.end, "verified")
            return
        sel = reply.selections[-1]
        chosen = self.proposals[q].ids[sel.index]
        self.commit(q, "verified")
        self.rollback(q)
        self.tokens.append(chosen)
        self.chain = q
        self.unsent = q + 1
        self.stats.picks_changed += 1
        self.commit(q + 1, "verified")

    def rollback(self, pos: int) -> None:
        """Forget every draft at or after `pos`: tokens, proposals, queued blocks and the SLM cache."""
        self.stats.rolled_back_tokens += len(self.tokens) - pos
        self.requeue_after(pos)
        del self.tokens[pos:]
        for p in [p for p in self.proposals if p >= pos]:
            del self.proposals[p]
        self.cache.crop(pos)
        self.unsent = pos

    def requeue_after(self, pos: int) -> None:
        """Drop queued blocks past `pos` (their replies are ignored); their drafts will be sent again."""
        while self.blocks and self.blocks[-1].end > pos:
            self.blocks.pop()
        self.unsent = min(self.unsent, pos)

    def resync(self, block: Block) -> None:
        """The selector lost our session: send this block and all after it again, with the full context."""
        self.stats.resyncs += 1
        self.resyncs_at[block.start] += 1
        self.requeue_after(block.start)
        self.chain = self.confirmed = 0
        if self.resyncs_at[block.start] > MAX_RESYNCS:
            self.requeue_after(block.end)
            self.unsent = block.end
            self.commit(block.end, "unverified", reason="selector kept losing the session")

    # -- committing ---------------------------------------------------------------------------------------

    def append_committed(self, token_ids: list[int]) -> None:
        """llm mode: tokens the selector's model generated are final as they arrive."""
        self.tokens.extend(token_ids)
        self.stats.drafted_tokens += len(token_ids)
        self.commit(len(self.tokens), "verified")

    def commit(self, upto: int, how: str, reason: str = "") -> None:
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
        if how == "verified":
            self.stats.verified_tokens += len(new)
        elif how == "unverified":
            self.stats.unverified_tokens += len(new)
            self.unverified_reasons[reason] += len(new)
        else:
            self.stats.local_decisions += len(new)
        self.committed = upto
        for p in [p for p in self.proposals if p < upto]:
            del self.proposals[p]
        if self.first_commit is None:
            self.first_commit = time.monotonic()
        self.unstreamed.extend(new)
        text = self.tokenizer.decode(self.tokens[self.prompt_len:upto], skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # hold back a partial UTF-8 character (and its ids) until it completes
            self.events.put_nowait(Event(text[len(self.emitted_text):], self.unstreamed))
            self.emitted_text, self.unstreamed = text, []
        if self.finish_reason:
            self.finish()

    def finish(self, reason: int | None = None) -> None:
        if self.done:
            return
        self.done = True
        if reason is not None:
            self.finish_reason = reason
        del self.tokens[self.committed:]
        completion = self.tokens[self.prompt_len:]
        st = self.stats
        st.completion_tokens = len(completion)
        st.wall_s = time.monotonic() - self.started
        st.tokens_per_s = len(completion) / st.wall_s if st.wall_s > 0 else 0.0
        st.time_to_first_token_s = (self.first_commit - self.started) if self.first_commit else 0.0
        if self.opts.mode == "s2t" and completion and st.positions_checked == 0 and (
                st.unverified_tokens + st.local_decisions):
            st.mode_used = gen_pb.MODE_GREEDY  # the selector never answered: this was the SLM alone
        if self.unverified_reasons:
            reasons = "; ".join(f"{n} tokens: {r}" for r, n in self.unverified_reasons.most_common(3))
            st.degraded_reason = (st.degraded_reason + "; " if st.degraded_reason else "") + \
                f"committed unverified ({reasons})"
        text = self.tokenizer.decode(completion, skip_special_tokens=True)
        if text != self.emitted_text or self.unstreamed:  # a held-back partial character
            self.events.put_nowait(Event(text[len(self.emitted_text):], self.unstreamed))
            self.emitted_text, self.unstreamed = text, []
        self.events.put_nowait(Event(final=gen_pb.GenerateResponse(
            request_id=self.request_id, text=text, token_ids=completion, finish_reason=self.finish_reason, stats=st)))


class Scheduler:
    """Runs every active sequence: batched SLM forwards, selector calls, settling, and the llm mode."""

    def __init__(self, engine: Engine, selector: SelectorClient | None, max_batch_size: int = 64):
        self.engine = engine
        self.selector = selector
        self.max_batch_size = max_batch_size
        self.odds = DivergenceOdds()  # shared by this worker's sequences: they learn from each other's replies
        self.active: list[Sequence] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._calls: set[asyncio.Task] = set()
        self._rr = 0  # round-robin offset when more sequences want a forward than fit in a batch

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="s2t-decode-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for t in list(self._calls):
            t.cancel()
        await asyncio.gather(*self._calls, return_exceptions=True)

    def submit(self, seq: Sequence) -> None:
        if seq.opts.mode == "llm":
            self._spawn(self._run_llm(seq))
        else:
            self.active.append(seq)
            self.wake()

    def wake(self) -> None:
        self._wake.set()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)
        return task

    async def _loop(self) -> None:
        while True:
            try:
                await self._iteration()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("decode loop iteration failed; finishing its sequences")
                for seq in self.active:
                    seq.finish()
                self.active = []

    async def _iteration(self) -> None:
        for seq in self.active:
            seq.settle()
            while (block := seq.next_block()) is not None:
                if block.outcome is not None:
                    continue
                if self.selector is None:
                    block.outcome = SelectorUnavailable("no selector configured")
                elif not await self.selector.budget.try_take():
                    block.outcome = "local"  # over the call budget: the SLM's drafts stand
                else:
                    self._spawn(self._verify(seq, block, seq.request_for(block)))
            seq.settle()
        for seq in [s for s in self.active if s.done or s.cancelled]:
            self.active.remove(seq)
            if seq.cancelled:
                seq.finish()
            if seq.next_step and self.selector is not None:
                self._spawn(self.selector.close_session(seq.session_id))
        ready = [s for s in self.active if s.wants_forward()]
        if not ready:
            self._wake.clear()
            await self._wake.wait()
            return
        if len(ready) > self.max_batch_size:
            self._rr = (self._rr + self.max_batch_size) % len(ready)
            ready = (ready[self._rr:] + ready[:self._rr])[:self.max_batch_size]
        feeds = [s.feed() for s in ready]
        logits = await asyncio.get_running_loop().run_in_executor(
            self.engine.executor, self.engine.forward, [s.cache for s in ready], feeds, [[len(f) - 1] for f in feeds])
        for seq, lg in zip(ready, logits):
            if not seq.cancelled:
                seq.add_proposal(propose(lg)[0])

    async def _verify(self, seq: Sequence, block: Block, request: sel_pb.SelectRequest) -> None:
        """One block's selector call; records the outcome for the loop to apply."""
        try:
            deadline = time.monotonic() + seq.opts.block_deadline_s
            seq.stats.selector_calls += 1
            seq.stats.selector_bytes_sent += request.ByteSize()
            reply = await self.selector.select(request, deadline)
            seq.stats.selector_bytes_received += reply.ByteSize()
            block.outcome = reply
        except (SessionLost, SelectorUnavailable) as e:
            seq.stats.selector_failures += isinstance(e, SelectorUnavailable)
            block.outcome = e
        except Exception as e:  # a bug must not hang the request: degrade it instead
            log.exception("selector call failed")
            block.outcome = SelectorUnavailable(f"selector call failed: {e!r}")
        finally:
            self.wake()

    async def _run_llm(self, seq: Sequence) -> None:
        """llm mode: the selector's model decodes in chunks; if the selector fails, the SLM takes over."""
        opts = seq.opts
        try:
            while not seq.done and not seq.cancelled:
                want = min(opts.decode_chunk, opts.max_new_tokens - (len(seq.tokens) - seq.prompt_len))
                request = sel_pb.DecodeRequest(session_id=seq.session_id, step=seq.next_step,
                                               prefix_length=seq.chain, token_ids=seq.tokens[seq.chain:],
                                               max_tokens=want, stop_ids=sorted(seq.stop_ids),
                                               request_id=seq.request_id)
                seq.next_step += 1
                if self.selector is None:
                    raise SelectorUnavailable("no selector configured")
                seq.stats.selector_calls += 1
                seq.stats.selector_bytes_sent += request.ByteSize()
                try:
                    reply = await self.selector.decode(request, time.monotonic() + opts.block_deadline_s)
                except SessionLost:
                    seq.stats.resyncs += 1
                    seq.chain = 0
                    continue
                seq.stats.selector_bytes_received += reply.ByteSize()
                seq.stats.llm_forwards += len(reply.token_ids)
                seq.chain = reply.session_length
                seq.append_committed(list(reply.token_ids))
            if seq.cancelled:
                seq.finish()
        except (SelectorUnavailable, Exception) as e:
            if not isinstance(e, SelectorUnavailable):
                log.exception("llm mode failed")
            seq.stats.selector_failures += 1
            seq.stats.degraded_reason = f"selector unavailable ({e}); the SLM continued greedily"
            self._continue_greedy(seq)
        finally:
            if seq.next_step and self.selector is not None:
                await self.selector.close_session(seq.session_id)

    def _continue_greedy(self, seq: Sequence) -> None:
        seq.opts = dataclasses.replace(seq.opts, mode="greedy")
        seq.stats.mode_used = gen_pb.MODE_GREEDY
        seq.cache = self.engine.new_cache()
        self.active.append(seq)
        self.wake()

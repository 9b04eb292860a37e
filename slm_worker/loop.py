"""The worker's decode loop: draft with the SLM, let a verifier settle blocks of drafts, commit, stream.

Every active request is a `Sequence`; one `Scheduler` iteration, for all of them at once:

  1. settle    apply the verdicts that arrived, in position order: accepted -> commit the block; diverged at
               q -> commit up to q, take the verifier's candidate at q, roll the SLM cache back to q, drop
               every later draft and queued block;
  2. send      close blocks of `block_size` drafted positions and hand each to the sequence's verifier (the
               remote selector, the local re-ranker, or the selector with the re-ranker as its fallback);
               verification runs concurrently and only records its verdict on the block;
  3. retire    finished and cancelled sequences leave, releasing what their verifier holds;
  4. draft     one batched SLM forward over every sequence that may draft further: up to
               `max_inflight_blocks` blocks ahead, and only while the unverified drafts are likely to be
               accepted (`draft_confidence`; see proposer.py) unless `draft_when_unsure`, which drafts on
               and holds the blocks after an unsure one until its verdict. Its top-1 is the next draft, its
               top-K the candidates a verifier may pick from. With `branch_when_unsure`, a sequence that
               holds also drafts branches (the continuations after the verifier's likeliest other picks,
               up to `max_branches`) as extra rows of a small forward, adopted in step 1 when the verdict
               picks one.

Mode greedy has no verifier: each draft commits at once (with temperature > 0 the draft is sampled, see
sampling.py). Mode takeover runs like s2t, except that the selector's verdict may carry a token of its own (the
LLM's top-1) instead of an index into the candidates. With block_size 1 and one block in flight, mode s2t
is the classic, non-speculative S2T step. Mode llm is a different algorithm — the selector's model
generates — and has its own small runner (`run_llm`). Only committed tokens reach the client. A verifier that
fails, lags past the request's deadline or is over budget never fails a request: the block commits unverified
(or as decided locally) and the stats say so.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from typing import Callable

from s2t.modes import Mode
from s2t.runtime import Engine
from s2t.triggers import propose
from s2t.v1 import generation_pb2 as gen_pb
from s2t.v1 import selector_pb2 as sel_pb

from .proposer import DivergenceOdds
from .selector_client import CallBudget, SelectorClient, SelectorUnavailable, SessionLost
from .sequence import Event, Sequence
from .verifiers import Block, Verdict, VerdictKind

log = logging.getLogger(__name__)

# Branch rows (branch_when_unsure) join a forward only while it holds at most one sequence's draft row and, in all,
# no more rows than one sequence and its branches (1 + worker.max_branches). A second row costs ~4 % of a one-row
# step of the 0.5B (bench/results/batched-decode-compiled.md: 28.7 against 27.6 ms); beside many sessions' rows
# they would slow each of them by more than they can save.
BRANCH_FORWARD_SEQUENCES = 1

__all__ = ["Event", "Scheduler", "Sequence", "run_llm"]


class Scheduler:
    """Runs every active sequence: batched SLM forwards, verifications, settling; and llm-mode runners."""

    def __init__(self, engine: Engine, max_batch_size: int = 64, call_budget: CallBudget | None = None):
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.call_budget = call_budget  # limits selector calls (not local re-ranking)
        self.odds = DivergenceOdds()  # shared by this worker's sequences: they learn from each other's verdicts
        self.active: list[Sequence] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._rr = 0  # round-robin offset when more sequences want a forward than fit in a batch
        # Told of every drafting forward: (seconds on the compute thread, request rows, branch rows). The worker's
        # metrics (s2t_worker_forward_*): how busy drafting keeps its compute.
        self.on_forward: Callable[[float, int, int], None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="s2t-decode-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def submit(self, seq: Sequence, selector: SelectorClient | None = None) -> None:
        """Start a sequence: llm mode runs on `selector`; every other mode joins the loop, its verifier's
        prefill of the prompt (if it has one) sent off first."""
        if seq.running is Mode.LLM:
            self.spawn(run_llm(seq, selector, self))
        else:
            budget = self.call_budget.try_take if self.call_budget is not None else None
            if seq.verifier is not None and (prefill := seq.verifier.prefill(seq, budget)) is not None:
                self.spawn(prefill, seq.trace_context)
            self.active.append(seq)
            self.wake()

    def wake(self) -> None:
        self._wake.set()

    def spawn(self, coro, context: contextvars.Context | None = None) -> asyncio.Task:
        """Run `coro` as a task of the loop's; in a copy of `context` when given (a sequence's trace_context,
        so its selector calls join its request's trace), else in a copy of the current context."""
        task = asyncio.create_task(coro, context=context.copy() if context is not None else None)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
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
        # 1-2. settle what arrived, then send the blocks that are ready (settling again: a block may need none)
        for seq in self.active:
            seq.settle()
            while (block := seq.next_block()) is not None:
                if block.verdict is None:
                    await self._send(seq, block)
            seq.settle()
        # 3. retire finished and cancelled sequences
        for seq in [s for s in self.active if s.done or s.cancelled]:
            self.active.remove(seq)
            if seq.cancelled:
                seq.finish()
            if seq.verifier is not None:
                self.spawn(seq.verifier.close(), seq.trace_context)
        # 4. draft: one batched SLM forward over the sequences that may draft further
        ready = [s for s in self.active if s.wants_forward()]
        if len(ready) > self.max_batch_size:
            self._rr = (self._rr + self.max_batch_size) % len(ready)
            ready = (ready[self._rr:] + ready[:self._rr])[:self.max_batch_size]
        #    branch rows join only a forward that stays this small: it reads the weights once, so a few more rows
        #    cost little, where rows beside many sequences' would slow every one of them. Asked only while they
        #    can fit: a branch forks its request's KV cache, which a busy worker should not pay for.
        branches = []
        if len(ready) <= BRANCH_FORWARD_SEQUENCES:
            rows = 1 + max((s.opts.max_branches for s in self.active), default=0)
            for seq in self.active:
                branches += [(seq, branch) for branch in seq.branch_rows()]
                if len(ready) + len(branches) > rows:
                    branches = []
                    break
        if not ready and not branches:
            self._wake.clear()
            await self._wake.wait()
            return
        feeds = [s.feed() for s in ready] + [b.feed() for _, b in branches]
        caches = [s.cache for s in ready] + [b.cache for _, b in branches]
        logits, seconds = await asyncio.get_running_loop().run_in_executor(
            self.engine.executor, self._timed_forward, caches, feeds)
        if self.on_forward is not None:
            self.on_forward(seconds, len(ready), len(branches))
        for seq, lg in zip(ready, logits):
            if not seq.cancelled:
                # a sampling request draws from its own generator and its own logits row: batching cannot change it
                seq.add_proposal(propose(lg)[0], seq.sampler.sample(lg[0]) if seq.sampler is not None else None)
        for (seq, branch), lg in zip(branches, logits[len(ready):]):
            if any(b is branch for b in seq.branches):  # not dropped meanwhile (a finish; verdicts come in step 1)
                seq.add_branch_proposal(branch, propose(lg)[0])

    def _timed_forward(self, caches: list, feeds: list[list[int]]) -> tuple[list, float]:
        """The drafting forward (each row's logits at its last fed token), and its seconds, on the compute thread:
        timed there, so a busy event loop does not count as compute."""
        started = time.perf_counter()
        logits = self.engine.forward(caches, feeds, [[len(f) - 1] for f in feeds])
        return logits, time.perf_counter() - started

    async def _send(self, seq: Sequence, block: Block) -> None:
        """Hand a block to the sequence's verifier; the verdict lands on the block when it comes."""
        if seq.running.selector_verified and self.call_budget is not None and not await self.call_budget.try_take():
            block.verdict = Verdict(VerdictKind.OVER_BUDGET)  # the SLM's drafts stand, counted as local decisions
            return
        self.spawn(self._record(block, seq.verifier.send(seq, block)), seq.trace_context)

    async def _record(self, block: Block, verdict) -> None:
        try:
            block.verdict = await verdict
        finally:
            self.wake()


async def run_llm(seq: Sequence, selector: SelectorClient | None, scheduler: Scheduler) -> None:
    """Mode llm: the selector's model generates in chunks (Decode calls). If the selector fails, the SLM
    continues greedily from what was committed, and the stats say so."""
    opts = seq.opts
    chain, step = 0, 0  # selector length the next call builds on; the session's next step
    try:
        while not seq.done and not seq.cancelled:
            if selector is None:
                raise SelectorUnavailable("selector not connected")
            want = min(opts.decode_chunk, opts.max_new_tokens - (len(seq.tokens) - seq.prompt_len))
            request = sel_pb.DecodeRequest(session_id=seq.session_id, step=step, prefix_length=chain,
                                           token_ids=seq.tokens[chain:], max_tokens=want,
                                           stop_ids=sorted(seq.stop_ids), request_id=seq.request_id)
            step += 1
            seq.stats.selector_calls += 1
            seq.stats.selector_bytes_sent += request.ByteSize()
            try:
                reply = await selector.decode(request, time.monotonic() + opts.selector_deadline_s)
            except SessionLost:
                seq.stats.resyncs += 1
                chain = 0
                continue
            seq.stats.selector_bytes_received += reply.ByteSize()
            seq.stats.llm_forwards += len(reply.token_ids)
            chain = reply.session_length
            seq.append_committed(list(reply.token_ids))
        if seq.cancelled:
            seq.finish()
    except Exception as e:
        if not isinstance(e, SelectorUnavailable):
            log.exception("llm mode failed")
        seq.stats.selector_failures += 1
        seq.stats.degraded_reason = f"selector unavailable ({seq.stats.degraded_reason or e}); the SLM continued greedily"
        continue_greedily(seq, scheduler)
    finally:
        if step and selector is not None:
            await selector.close_session(seq.session_id)


def continue_greedily(seq: Sequence, scheduler: Scheduler) -> None:
    """An llm-mode sequence whose selector failed: the SLM takes over from the committed tokens."""
    seq.running = Mode.GREEDY
    seq.stats.mode_used = gen_pb.MODE_GREEDY
    seq.cache = scheduler.engine.new_cache()
    scheduler.active.append(seq)
    scheduler.wake()

"""Verifiers: who decides whether a block of drafted positions stands. The seam of the decode loop.

The loop drafts with the SLM and hands blocks of drafted positions to a `VerifierSession` (one per request);
each block comes back as a typed `Verdict`. Like transformers' `CandidateGenerator` or vLLM's
proposer/scorer split, new ways of verifying never touch the loop:

  RemoteSelector   the selector's large model over gRPC (mode s2t): delta tokens + top-K sets out, an index back
  LocalReranker    the worker's own S2T-Local adapter (mode s2t-local): scores the top-K sets itself, no calls
  Fallback         s2t with an adapter loaded: the selector while it is reachable, the re-ranker during an outage

The rule is the same everywhere (the paper's): at each checked position the candidate with the highest score
wins, ties to the SLM's higher rank; the first checked position whose winner is not the SLM's top-1 is a
divergence, and the block stops there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import time
from typing import TYPE_CHECKING, Awaitable, Callable, Protocol

import torch

from s2t.modes import Mode, TriggerKind
from s2t.runtime import TreeJob
from s2t.v1 import selector_pb2 as sel_pb

from .selector_client import SelectorClient, SelectorDown, SelectorState, SelectorUnavailable, SessionLost

if TYPE_CHECKING:
    from s2t.rerank import Reranker
    from s2t.runtime import Engine

    from .sequence import Sequence

log = logging.getLogger(__name__)


class VerdictKind(enum.Enum):
    ACCEPTED = "accepted"  # every drafted token of the block stands
    DIVERGED = "diverged"  # take candidate `index` at `position`, drop every later draft
    SKIPPED = "skipped"  # no position of the block needed a check: the drafts stand unverified by design
    SESSION_LOST = "session_lost"  # the selector lost what the request built on: send again with full context
    UNAVAILABLE = "unavailable"  # no usable answer in time: the drafts commit unverified (reason says why)
    OVER_BUDGET = "over_budget"  # the worker's selector-call budget is spent: the drafts stand as decided locally


class VerdictSource(enum.Enum):
    SELECTOR = "selector"
    RERANKER = "reranker"
    NONE = "none"


@dataclasses.dataclass(frozen=True)
class Verdict:
    kind: VerdictKind
    source: VerdictSource = VerdictSource.NONE
    position: int = -1  # DIVERGED: where
    index: int = 0  # DIVERGED: which candidate
    checked: int = 0  # positions the verifier scored to reach this verdict
    llm_forwards: int = 0
    reason: str = ""  # UNAVAILABLE: why, for the stats
    adapter_version: str = ""  # RERANKER: which adapter scored
    reply: sel_pb.SelectResponse | None = None  # SELECTOR: the reply, for its per-position verdicts
    outage: bool = False  # UNAVAILABLE because the selector is down (not merely busy past the deadline)
    token: int | None = None  # DIVERGED in mode takeover: the LLM's own top-1, taken instead of candidate `index`


@dataclasses.dataclass(eq=False)
class Block:
    """Drafted positions [start, end) of one sequence, verified together.

    `checked` are the positions the verifier is asked about (all of them for the always/kl triggers, the
    triggered ones for entropy/margin); `verdict` is set once, by the verification task, and applied by the
    loop in position order.
    """

    start: int
    end: int
    checked: list[int]
    verdict: Verdict | None = None


class VerifierSession(Protocol):
    """One request's connection to its verifier."""

    def send(self, seq: "Sequence", block: Block) -> Awaitable[Verdict]:
        """Start verifying `block` (called in block order). Whatever the verdict depends on is captured before
        this returns; the awaitable resolves to the verdict and never raises."""

    def settled(self, seq: "Sequence", block: Block, verdict: Verdict) -> None:
        """The loop applied `verdict` to the sequence (in block order)."""

    def prefill(self, seq: "Sequence", may_call: Callable[[], Awaitable[bool]] | None = None
                ) -> Awaitable[None] | None:
        """The request starts (called once, before its first block): work the verifier can do on the prompt
        while the SLM drafts, or None. A selector call is made only if `may_call()` (the worker's call budget)
        says so. The awaitable never raises; a prefill that fails costs nothing but its time (the first block
        then carries the prompt itself)."""

    async def close(self) -> None:
        """The request is over: release what the verifier holds for it."""


class Verifier(Protocol):
    def open(self, seq: "Sequence") -> VerifierSession:
        ...


# -- the remote selector ------------------------------------------------------------------------------------


class RemoteSelector:
    """Mode s2t: the selector's large model verifies blocks over gRPC (SelectorService.Select)."""

    def __init__(self, client: SelectorClient, slm_model: str = "", slm_weights_sha256: str = "",
                 prefill: bool = False):
        self.client = client
        self.slm_model, self.slm_weights_sha256 = slm_model, slm_weights_sha256
        # Send each request's prompt ahead of its first block (the selector said it takes prefills, and the
        # worker's selector_prefill setting is on).
        self.sends_prefills = prefill

    def open(self, seq: "Sequence") -> "RemoteSelectorSession":
        return RemoteSelectorSession(self, seq.session_id)


class RemoteSelectorSession:
    """The selector protocol's cursor for one session.

    Invariants (positions index the sequence's tokens, prompt included):
      confirmed <= chain: `confirmed` is the session length the selector reported in the last reply the loop
        applied; everything before it the selector holds and the worker has committed.
      `chain` is the length the next request builds on (its prefix_length): the previous request's end minus
        its last draft, which is only a candidate there and goes out as a token with the next request.
        0 means "send the full context" (a new or lost session). After the prompt's prefill (step 0) it is
        prompt_len - 1, and back at 0 if the prefill failed before the first block was built on it.
      `next_step` counts requests, the prefill included; (session_id, step) is the selector's idempotency key.
    """

    def __init__(self, verifier: RemoteSelector, session_id: str):
        self.verifier = verifier
        self.client = verifier.client
        self.session_id = session_id
        self.chain = 0
        self.confirmed = 0
        self.next_step = 0
        self.prefilled: asyncio.Event | None = None  # set once the prompt's prefill call is over (if one went out)

    def request(self, seq: "Sequence", block: Block) -> sel_pb.SelectRequest:
        """The Select request for `block`, chained on what the previous request leaves; advances the cursor."""
        opts = seq.opts
        k, kl = opts.num_candidates, opts.trigger is TriggerKind.KL
        value = opts.local_trigger.value if opts.local_trigger else (lambda p: 0.0)
        positions = [sel_pb.CandidatePosition(
            position=p, candidate_ids=prop.ids[:k], candidate_probs=prop.probs[:k],
            support_ids=prop.ids[k:] if kl else [], support_probs=prop.probs[k:] if kl else [],
            worker_triggered=prop.triggered, worker_trigger_value=value(prop))
            for p in block.checked for prop in (seq.proposals[p],)]
        return self._next_request(seq, block.end - 1, positions)

    def _next_request(self, seq: "Sequence", end: int, positions: list[sel_pb.CandidatePosition]
                      ) -> sel_pb.SelectRequest:
        """The next Select request: the tokens from the chain to `end` and `positions`; advances the cursor."""
        opts = seq.opts
        prefix, step = self.chain, self.next_step
        self.next_step += 1
        self.chain = end
        if opts.trigger is TriggerKind.ALWAYS:
            trigger = sel_pb.SelectTriggerSpec(kind=sel_pb.SELECT_TRIGGER_ALWAYS)
        elif opts.trigger is TriggerKind.KL:
            trigger = sel_pb.SelectTriggerSpec(kind=sel_pb.SELECT_TRIGGER_KL, kl_rate=opts.trigger_rate)
        else:
            trigger = sel_pb.SelectTriggerSpec(kind=sel_pb.SELECT_TRIGGER_WORKER)
        request = sel_pb.SelectRequest(session_id=self.session_id, step=step, prefix_length=prefix,
                                       token_ids=seq.tokens[prefix:end], positions=positions,
                                       trigger=trigger, request_id=seq.request_id,
                                       takeover=opts.mode is Mode.TAKEOVER)  # decide by the LLM's own top-1
        if self.verifier.slm_model:
            request.slm_model = self.verifier.slm_model
            request.slm_weights_sha256 = self.verifier.slm_weights_sha256
        return request

    def prefill(self, seq: "Sequence", may_call: Callable[[], Awaitable[bool]] | None = None
                ) -> Awaitable[None] | None:
        """Send the prompt at once, as a Select without positions, so that the selector computes its cache of
        it while the SLM prefills and drafts the first block, instead of after that block arrives; the first
        block then carries only its drafts. The prompt's last token stays for the first block: the selector
        reads the first draft's prediction from it, so every position stays checkable."""
        if not self.verifier.sends_prefills or self.next_step or seq.prompt_len < 2:
            return None
        self.prefilled = asyncio.Event()
        return self._prefill(seq, self._next_request(seq, seq.prompt_len - 1, []), may_call)

    async def _prefill(self, seq: "Sequence", request: sel_pb.SelectRequest,
                       may_call: Callable[[], Awaitable[bool]] | None) -> None:
        try:
            if may_call is None or await may_call():
                await self._call_prefill(seq, request)
            else:
                self._prefill_not_taken()
        finally:
            self.prefilled.set()

    async def _call_prefill(self, seq: "Sequence", request: sel_pb.SelectRequest) -> None:
        stats = seq.stats
        try:
            await self._counted_select(seq, request)
            stats.llm_forwards += 1
            return
        except SessionLost:
            pass
        except SelectorUnavailable as e:
            stats.selector_failures += 1
            log.debug("prefill not taken: %s", e, extra={"session_id": self.session_id})
        except Exception:  # a bug must not hang or fail the request: the first block carries the prompt instead
            log.exception("selector prefill failed")
            stats.selector_failures += 1
        self._prefill_not_taken()

    def _prefill_not_taken(self) -> None:
        if self.next_step == 1:  # no block was built on the prefill yet: the first one sends the full context
            self.chain = 0
        # else a block already went out on it: the selector answers it FAILED_PRECONDITION and the loop resends
        # it with the full context (SESSION_LOST), as for any session the selector lost

    def send(self, seq: "Sequence", block: Block) -> Awaitable[Verdict]:
        return self._call(seq, block, self.request(seq, block))

    async def _counted_select(self, seq: "Sequence", request: sel_pb.SelectRequest) -> sel_pb.SelectResponse:
        """One Select call within the request's deadline, counted in its stats (calls, bytes both ways); raises
        what the client raises."""
        stats = seq.stats
        stats.selector_calls += 1
        stats.selector_bytes_sent += request.ByteSize()
        reply = await self.client.select(request, time.monotonic() + seq.opts.selector_deadline_s)
        stats.selector_bytes_received += reply.ByteSize()
        return reply

    async def _call(self, seq: "Sequence", block: Block, request: sel_pb.SelectRequest) -> Verdict:
        stats = seq.stats
        try:
            reply = await self._counted_select(seq, request)
        except SessionLost:
            return Verdict(VerdictKind.SESSION_LOST, VerdictSource.SELECTOR)
        except SelectorUnavailable as e:
            stats.selector_failures += 1
            down = isinstance(e, SelectorDown)
            return Verdict(VerdictKind.UNAVAILABLE, reason=f"selector down ({e})" if down else str(e), outage=down)
        except Exception as e:  # a bug must not hang the request: degrade it instead
            log.exception("selector call failed")
            stats.selector_failures += 1
            return Verdict(VerdictKind.UNAVAILABLE, reason=f"selector call failed: {e!r}")
        if reply.outcome == sel_pb.SELECT_OUTCOME_DIVERGED:
            problem = _bad_divergence(reply, request, block, seq.engine.vocab_size)
            if problem:  # a selector of another build or a broken one: degrade this block, never the request
                stats.selector_failures += 1
                return Verdict(VerdictKind.UNAVAILABLE, reason=f"selector reply refused: {problem}")
            sel = reply.selections[-1]
            return Verdict(VerdictKind.DIVERGED, VerdictSource.SELECTOR, position=sel.position, index=sel.index,
                           checked=len(block.checked), llm_forwards=1, reply=reply,
                           token=sel.token_id if request.takeover else None)
        return Verdict(VerdictKind.ACCEPTED, VerdictSource.SELECTOR, checked=len(block.checked), llm_forwards=1,
                       reply=reply)

    def settled(self, seq: "Sequence", block: Block, verdict: Verdict) -> None:
        if verdict.reply is not None:
            self.confirmed = verdict.reply.session_length
            if verdict.kind is VerdictKind.DIVERGED:
                self.chain = verdict.position  # the selector cut its session back to the divergence
        elif verdict.kind is VerdictKind.SESSION_LOST:
            self.chain = self.confirmed = 0  # this block and all after it go out again with the full context
        else:  # settled without the selector (unavailable, or re-ranked locally): it holds at least `confirmed`
            self.chain = self.confirmed

    async def close(self) -> None:
        if self.prefilled is not None:  # a prefill still on its way would open the session again after this
            await self.prefilled.wait()
        if self.next_step:
            await self.client.close_session(self.session_id)


def _bad_divergence(reply: sel_pb.SelectResponse, request: sel_pb.SelectRequest, block: Block,
                    vocab_size: int) -> str:
    """Why a DIVERGED reply cannot be applied ('' if it can): its last selection must name a position the
    request asked about, an index among that position's candidates, and (takeover) a token of the vocabulary."""
    if not reply.selections:
        return "a divergence without selections"
    sel = reply.selections[-1]
    asked = {p.position: len(p.candidate_ids) for p in request.positions}
    if sel.position not in asked or not block.start <= sel.position < block.end:
        return f"divergence at position {sel.position}, which the request did not ask about"
    if not 0 <= sel.index < asked[sel.position]:
        return f"index {sel.index} outside the {asked[sel.position]} candidates at position {sel.position}"
    if request.takeover and not 0 <= sel.token_id < vocab_size:
        return f"token id {sel.token_id} outside the {vocab_size}-token vocabulary"
    return ""


# -- the local re-ranker ------------------------------------------------------------------------------------


class LocalReranker:
    """Mode s2t-local: the worker's S2T-Local adapter scores the candidates itself (no large-model calls).

    Proposals come from the base SLM (adapter off): scoring with the adapter while also generating with it
    hurts (the "Proposal-Preserving Selection" follow-up study of S2T-Local). The scorer — SLM + adapter — keeps
    its own KV cache per request, extended lazily at each verified block by the tokens since the last one, and
    scores every candidate of the block in that same forward (each candidate attends to its prefix only).
    Below the adapter's first layer the scorer is the base SLM, so when the drafting cache is tapped there
    (Engine.set_tap) the scorer starts at that layer and reuses the drafting cache beneath it. The forwards of
    all sessions go through one `ScoringBatcher`.
    """

    def __init__(self, engine: "Engine", reranker: "Reranker", holders=None, batcher: "ScoringBatcher | None" = None):
        self.engine = engine
        self.reranker = reranker
        self.holders = holders  # AdapterStore: keeps the version installed while a request uses it
        self.batcher = batcher or ScoringBatcher(engine)

    def open(self, seq: "Sequence") -> "LocalRerankerSession":
        if self.holders is not None:
            self.holders.hold(self.reranker.version)
        tap = seq.cache.tap_layer if seq.cache is not None else None
        split = tap if tap is not None and 0 < tap <= self.reranker.first_layer else 0
        return LocalRerankerSession(self.engine, self.reranker, self.holders, self.batcher, split)


class StaleBlock(Exception):
    """The sequence rolled back below the block before it was scored: its verdict would be ignored."""


class LocalRerankerSession:
    """The scorer's cache for one request.

    Invariants: `cached` is the list of token ids whose keys/values `cache` holds (computed with the adapter
    on, for layers [split, N)), always a prefix of some state of the sequence. Each verification first cuts the
    cache back to the longest common prefix with the block's tokens (drafts rolled back since are dropped
    there), then extends it; so rollbacks need no bookkeeping. One verification of a session runs at a time;
    `cache` and `cached` are touched only on the engine's thread. With split > 0, the sequence's drafting
    cache supplies the layers below `split` and the new tokens' hidden states (its tap); scoring checks, on
    the engine's thread, that it still holds the block's tokens.
    """

    def __init__(self, engine: "Engine", reranker: "Reranker", holders=None, batcher: "ScoringBatcher | None" = None,
                 split: int = 0):
        self.engine = engine
        self.reranker = reranker
        self.holders = holders
        self.batcher = batcher or ScoringBatcher(engine)
        self.split = split
        self.cache = engine.new_cache(first_layer=split)
        self.cached: list[int] = []
        self._lock = asyncio.Lock()

    def send(self, seq: "Sequence", block: Block) -> Awaitable[Verdict]:
        k = seq.opts.num_candidates
        # Per checked position, the candidates that can still outrank the SLM's top-1 under the adapter's SLM
        # prior (Reranker.contenders); a position where none can is decided without a forward.
        branches, slm_probs, picks = [], [], []
        for p in block.checked:
            ids, probs = seq.proposals[p].ids[:k], seq.proposals[p].probs[:k]
            keep = self.reranker.contenders(probs)
            if len(keep) > 1:
                branches.append((p, [ids[i] for i in keep]))
                slm_probs.append([probs[i] for i in keep])  # the adapter's SLM prior (s2t.rerank.with_prior)
                picks.append(keep)
        # everything the last scored position is predicted from
        tokens = seq.tokens[:branches[-1][0]] if branches else []
        return self._verify(seq, tokens, branches, slm_probs, picks, list(block.checked))

    async def _verify(self, seq: "Sequence", tokens: list[int], branches: list[tuple[int, list[int]]],
                      slm_probs: list[list[float]], picks: list[list[int]], checked: list[int]) -> Verdict:
        version = self.reranker.version
        if not branches:
            return Verdict(VerdictKind.ACCEPTED, VerdictSource.RERANKER, checked=len(checked), adapter_version=version)
        try:
            async with self._lock:
                scores = await self.batcher.score(lambda: self._prepare(seq, tokens, branches, slm_probs))
        except StaleBlock as e:
            return Verdict(VerdictKind.UNAVAILABLE, reason=str(e))
        except Exception as e:
            log.exception("local re-ranking failed")
            return Verdict(VerdictKind.UNAVAILABLE, reason=f"local re-ranker failed: {e!r}")
        for (pos, _), s, keep in zip(branches, scores, picks):
            index = keep[int(torch.argmax(s))]  # first maximum: ties go to the SLM's higher rank
            if index != 0:
                return Verdict(VerdictKind.DIVERGED, VerdictSource.RERANKER, position=pos, index=index,
                               checked=sum(1 for p in checked if p <= pos), adapter_version=version)
        return Verdict(VerdictKind.ACCEPTED, VerdictSource.RERANKER, checked=len(checked), adapter_version=version)

    def _prepare(self, seq: "Sequence", tokens: list[int], branches: list[tuple[int, list[int]]],
                 slm_probs: list[list[float]]) -> tuple[TreeJob, str, Callable[[list[torch.Tensor]], list[torch.Tensor]]]:
        """On the engine's thread: sync the scorer cache with `tokens`; the job, its adapter, and what turns
        the job's hidden states into scores."""
        if self.cache is None:
            raise StaleBlock("the request ended before its block was scored")
        base, base_length = None, 0
        if self.split:
            base, base_length = seq.cache, seq.cache.length
            if base_length < len(tokens) or seq.tokens[:len(tokens)] != tokens:
                raise StaleBlock("rolled back before scoring")
        common = 0
        for a, b in zip(self.cached, tokens):
            if a != b:
                break
            common += 1
        self.cache.crop(common)
        del self.cached[common:]
        delta = tokens[common:]

        def finish(hidden: list[torch.Tensor]) -> list[torch.Tensor]:
            self.cached.extend(delta)
            return [self.reranker.scores(h, p) for h, p in zip(hidden, slm_probs)]

        return TreeJob(self.cache, delta, branches, base=base, base_length=base_length), self.reranker.version, finish

    def settled(self, seq: "Sequence", block: Block, verdict: Verdict) -> None:
        pass

    def prefill(self, seq: "Sequence", may_call: Callable[[], Awaitable[bool]] | None = None
                ) -> Awaitable[None] | None:
        return None  # the scorer's cache grows at the first verified block, from the drafting cache's tap

    async def close(self) -> None:
        async with self._lock:  # not while a scoring of this session is queued or running
            if self.cache is not None and self.holders is not None:
                self.holders.release(self.reranker.version)
            self.cache = None
            self.cached = []


class ScoringBatcher:
    """The local re-ranker's forwards of every session on one worker, batched like the decode loop's drafting:
    requests that arrive while a batch runs on the engine's thread go together into the next one, one pass
    over the weights for all of them (grouped by adapter version: a forward has one adapter active)."""

    def __init__(self, engine: "Engine", max_jobs: int = 64):
        self.engine = engine
        self.max_jobs = max_jobs
        self._queue: list[tuple[Callable, asyncio.Future]] = []
        self._runner: asyncio.Task | None = None
        self.batches = 0  # scoring forwards run
        self.jobs = 0  # session verifications they served

    async def score(self, prepare: Callable) -> list[torch.Tensor]:
        """`prepare()` runs on the engine's thread right before the forward and returns (TreeJob, adapter,
        finish); the result is finish(the job's hidden states), or the exception either raised."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append((prepare, future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._drain(), name="s2t-local-scoring")
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            batch, self._queue = self._queue[:self.max_jobs], self._queue[self.max_jobs:]
            try:
                outcomes = await loop.run_in_executor(self.engine.executor, self._run, [p for p, _ in batch])
            except BaseException as e:  # cancelled: fail what this batch waited for, then stop
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e if isinstance(e, Exception) else RuntimeError("scoring cancelled"))
                raise
            for (_, future), (ok, value) in zip(batch, outcomes):
                if not future.done():
                    future.set_result(value) if ok else future.set_exception(value)

    def _run(self, prepares: list[Callable]) -> list[tuple[bool, object]]:
        outcomes: list[tuple[bool, object]] = [(False, RuntimeError("not scored"))] * len(prepares)
        groups: dict[str, list[tuple[int, TreeJob, Callable]]] = {}
        for i, prepare in enumerate(prepares):
            try:
                job, adapter, finish = prepare()
            except Exception as e:
                outcomes[i] = (False, e)
                continue
            groups.setdefault(adapter, []).append((i, job, finish))
        for adapter, items in groups.items():
            try:
                hidden = self.engine.score_trees([job for _, job, _ in items], adapter)
                self.batches += 1
                self.jobs += len(items)
            except Exception as e:
                for i, _, _ in items:
                    outcomes[i] = (False, e)
                continue
            for (i, _, finish), h in zip(items, hidden):
                try:
                    outcomes[i] = (True, finish(h))
                except Exception as e:
                    outcomes[i] = (False, e)
        return outcomes


# -- both: the selector while it is reachable, the re-ranker during an outage -------------------------------


class Fallback:
    """Mode s2t with an adapter loaded: an outage of the selector (not mere slowness, which the selector
    client waits out within the request's deadline) moves the request's blocks to the local re-ranker; the
    next block after the selector is back goes to the selector again."""

    def __init__(self, primary: RemoteSelector, local: LocalReranker):
        self.primary, self.local = primary, local

    def open(self, seq: "Sequence") -> "FallbackSession":
        return FallbackSession(self.primary.open(seq), self.local.open(seq), self.primary.client)


class FallbackSession:
    def __init__(self, remote: RemoteSelectorSession, local: LocalRerankerSession, client: SelectorClient):
        self.remote, self.local, self.client = remote, local, client

    def send(self, seq: "Sequence", block: Block) -> Awaitable[Verdict]:
        if self.client.state is SelectorState.DOWN:
            return self._local(seq, block, "selector down (circuit breaker open)")
        return self._remote_then_local(seq, block, self.remote.send(seq, block))

    async def _remote_then_local(self, seq: "Sequence", block: Block, remote: Awaitable[Verdict]) -> Verdict:
        verdict = await remote
        if verdict.outage:
            return await self._local(seq, block, verdict.reason)
        return verdict

    async def _local(self, seq: "Sequence", block: Block, why: str) -> Verdict:
        seq.note_fallback(why)
        return await self.local.send(seq, block)

    def settled(self, seq: "Sequence", block: Block, verdict: Verdict) -> None:
        self.remote.settled(seq, block, verdict)

    def prefill(self, seq: "Sequence", may_call: Callable[[], Awaitable[bool]] | None = None
                ) -> Awaitable[None] | None:
        return self.remote.prefill(seq, may_call) if self.client.state is not SelectorState.DOWN else None

    async def close(self) -> None:
        await self.local.close()
        await self.remote.close()

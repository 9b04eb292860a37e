"""The selector's logic, independent of the transport (Ray Serve gRPC proxy or a plain grpc.aio server).

A request goes through `admit` (validation, step ordering, idempotent replay) and then a batched compute
(`compute_select` / `compute_decode`, synchronous torch, run off the event loop) and `release`, which
records the reply for retries and lets the session's next step in. Beyond `max_queued_requests` requests
waiting for a batch, `admit` refuses with RESOURCE_EXHAUSTED and a retry hint (back-pressure, never INTERNAL).
A request over its worker's quotas (`selector.quota.*`, quotas.py; the transports pass who the worker is) is
refused the same way, and a worker over its KV quota loses its own least recently used sessions after a batch.

The selection rule is the paper's: the index of the candidate with the highest LLM probability, ties to
the lower index (the SLM's higher rank). A position diverges when that index is not 0 and the trigger
fires; the reply stops at the first divergence and the session is cut back to it, so the selector's
cache never keeps a rejected token. A takeover request (the paper's upper reference) diverges instead where
the trigger fires and the LLM's full-vocabulary top-1 is not the SLM's draft, and names that top-1
(Selection.token_id), which the worker takes there. A Select without positions is a prefill: it only extends
the session (the worker sends the prompt ahead of its first block), and is logged like any other request, so
the log's records still replay each session's tokens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import time
import weakref

import grpc
import torch

from s2t.v1 import selector_pb2 as pb
from s2t.config import SelectorSettings
from s2t.cuda_graphs import KVPool
from s2t.runtime import Engine
from s2t.triggers import GatheredLogProbs, ThresholdTable, VocabLogProbs, kl_on_support_rows, padded_rows

from s2t.selection_log import ScoredPosition, SelectionLog, SelectorIdentity, SelectRecord
from .metrics import QuotaKind, SelectorMethod, SelectorMetrics, SelectorOutcome
from .quotas import LOCAL_CALLER, QuotaRefusal, WorkerIdentity, WorkerQuotas
from .sessions import Session, SessionStore

log = logging.getLogger(__name__)

MAX_ID_LEN = 128

# SelectRecord.trigger names (the log's vocabulary is independent of the wire enum's spelling).
_LOG_TRIGGER = {pb.SELECT_TRIGGER_ALWAYS: "always", pb.SELECT_TRIGGER_WORKER: "worker", pb.SELECT_TRIGGER_KL: "kl"}
# Batch time assumed before this replica has timed one of its own (a retry hint needs some estimate).
DEFAULT_BATCH_S = 0.05
BATCH_TIME_SMOOTHING = 0.3  # weight of the newest batch in the moving average of batch times
RETRY_AFTER_KEY = "retry-after-ms"  # trailing metadata of an overload answer; the message repeats the number
QUOTA_KEY = "quota-exceeded"  # trailing metadata of a quota refusal: the setting (the message names it too)


class SelectorError(Exception):
    """An expected failure with the gRPC status it maps to (and, for overload, when to try again)."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_ms: int | None = None,
                 quota: QuotaKind | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms
        self.quota = quota  # the worker's quota that refused the request, if one did

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """What the transports send as trailing metadata: the retry hint of an overload or quota answer, and
        which quota refused."""
        hint = () if self.retry_after_ms is None else ((RETRY_AFTER_KEY, str(self.retry_after_ms)),)
        return hint + (() if self.quota is None else ((QUOTA_KEY, self.quota.setting),))


def invalid(message: str) -> SelectorError:
    return SelectorError(grpc.StatusCode.INVALID_ARGUMENT, message)


def stale(message: str) -> SelectorError:
    return SelectorError(grpc.StatusCode.FAILED_PRECONDITION, message)


@dataclasses.dataclass
class SelectRows:
    """A Select's positions as Python lists, read once from the request by validate_select and used by the
    compute: ids[j] is position j's candidates, then its KL support; probs[j] the SLM's probabilities of them
    as sent (empty where the request has none: only the KL trigger needs them)."""

    ids: list[list[int]]
    probs: list[list[float]]
    candidates: list[int]  # K per position: ids[j][:candidates[j]] are position j's candidates


@dataclasses.dataclass
class Ticket:
    """An admitted request: its session is reserved (busy) until `release`."""

    session: Session
    request: object
    kind: str  # "select" or "decode"
    rows: SelectRows | None = None  # a Select's positions as validate_select read them
    admitted: float = dataclasses.field(default_factory=time.monotonic)


def _picks_and_kl(rows: list[SelectRows], kl: list[bool], tables: list[torch.Tensor | None]
                  ) -> list[tuple[list[int], list[float]]]:
    """Per request, per position: the argmax of the LLM's log-probabilities over its candidates (the first
    maximum: ties go to the SLM's higher rank) and, where kl[i] (the KL trigger), KL(p_S || p_L) on its
    candidates + support (kl_on_support_rows; other requests get no values). tables[i] [positions, width] holds
    request i's positions' candidates, then their support (None: a request without positions).

    The batch's positions are scored at once, one argmax and one KL over all of them: per request, a 64-session
    batch's scoring was ~0.2 ms a Select of small tensor operations on the host."""
    sizes = [len(r.ids) for r in rows]
    present = [t for t in tables if t is not None]
    if not present:
        return [([], []) for _ in rows]
    width = max(t.shape[1] for t in present)
    table = torch.cat([t if t.shape[1] == width else
                       torch.nn.functional.pad(t, (0, width - t.shape[1]), value=float("-inf")) for t in present])
    counts = [k for r in rows for k in r.candidates]
    candidates = table[:, :max(counts)]
    if min(counts) != max(counts):  # a position with fewer candidates: its support's columns are not picks
        columns = torch.arange(candidates.shape[1])[None, :]
        candidates = candidates.masked_fill(columns >= torch.tensor(counts)[:, None], float("-inf"))
    picks = candidates.argmax(dim=1).tolist()
    starts = [0, *itertools.accumulate(sizes)]  # request i's rows of `table`: starts[i]:starts[i + 1]
    with_kl = [i for i in range(len(rows)) if sizes[i] and kl[i]]
    values: dict[int, list[float]] = {}
    if with_kl:
        student, _ = padded_rows([p for i in with_kl for p in rows[i].probs], torch.float64)
        student = torch.nn.functional.pad(student, (0, width - student.shape[1]))  # probability 0: off the support
        at = [row for i in with_kl for row in range(starts[i], starts[i + 1])]
        teacher = table if len(at) == table.shape[0] else table[torch.tensor(at)]
        divergences = kl_on_support_rows(student, teacher).tolist()  # with_kl's rows, in order
        done = 0
        for i in with_kl:
            values[i] = divergences[done:done + sizes[i]]
            done += sizes[i]
    return [(picks[starts[i]:starts[i + 1]], values.get(i, [])) for i in range(len(rows))]


def _probabilities(values) -> bool:
    """Every value is in [0, 1] (none NaN): min, max and sum in C over a repeated field instead of a Python loop.
    A NaN makes the sum NaN (min and max may skip it); an infinity is out of range either way."""
    total = sum(values)
    return total == total and min(values) >= 0.0 and max(values) <= 1.0


class SelectorCore:
    def __init__(self, engine: Engine, settings: SelectorSettings, selection_log: SelectionLog | None = None,
                 kl_thresholds: dict[float, float] | None = None, model_name: str | None = None,
                 metrics: SelectorMetrics | None = None):
        self.engine = engine
        # s2t_selector_* metrics; the default (prometheus_client, a registry of its own) records without setup.
        self.metrics = metrics if metrics is not None else SelectorMetrics()
        self.settings = settings
        self.log = selection_log
        self.vocab_size = engine.vocab_size
        self.model_name = model_name or engine.lm.name
        self.kl = ThresholdTable(kl_thresholds if kl_thresholds is not None else settings.kl_thresholds, "KL")
        self.sessions = SessionStore(engine, settings.max_sessions, settings.session_idle_ttl_s,
                                     settings.kv_budget_mb << 20)
        # Read the Selects' log-probabilities where the logits are (engine.forward_logprobs) rather than copying
        # [rows, vocab] logits to the host: on a GPU. (On the CPU they are there already.)
        self.read_on_device = engine.device.type != "cpu"
        runtime = settings.runtime
        if engine.device.type == "cuda" and runtime.cuda_graphs and engine.fast_decode and engine.kv_pool is None:
            # The pool holds the budget's keys/values up front (as many sessions as fit at cuda_graph_max_len
            # tokens each), so a pooled session costs its slot in the store's accounting (PooledKVCache.nbytes).
            slot = KVPool.slot_size(engine.num_layers, engine.num_kv_heads, engine.head_dim, engine.kv_dtype,
                                    runtime.cuda_graph_max_len)
            slots = min(settings.max_sessions, self.sessions.kv_budget_bytes // slot)
            if slots >= 1:
                engine.use_kv_pool(slots, runtime.cuda_graph_max_len, capture=True)
                log.info("CUDA graphs over a KV pool of %d sessions × %d tokens (%.2f GiB)", slots,
                         runtime.cuda_graph_max_len, engine.kv_pool.nbytes / 2**30)
                if runtime.cuda_graph_warmup:
                    started = time.monotonic()
                    count = engine.graphed.capture_all(settings.max_batch_size)
                    log.info("captured %d CUDA graphs in %.1f s", count, time.monotonic() - started)
            else:
                log.warning("no CUDA graphs: selector.kv_budget_mb does not hold one session of "
                            "runtime.cuda_graph_max_len = %d tokens", runtime.cuda_graph_max_len)
        self.quotas = WorkerQuotas(settings.quota)
        self.metrics.memory_budget(engine.lm.weight_bytes, self.sessions.kv_budget_bytes)
        self.counters = {"select": 0, "decode": 0, "replayed": 0, "failed_precondition": 0, "positions": 0,
                         "diverged": 0, "forwards": 0, "batches": 0, "batched_sessions": 0,
                         "resource_exhausted": 0, "queued_peak": 0, "quota_rejections": 0, "quota_evictions": 0}
        self._pending: dict[str, list[tuple[Ticket, asyncio.Future]]] = {"select": [], "decode": []}
        self._draining = False
        # Sessions served since the selector was last idle (the burst), and those of the burst before it: an idle
        # selector waits for the latter's next requests, at most batch_wait_timeout_s (_wait_for_burst). The
        # arrival event exists while it waits (created there: asyncio primitives bind to one event loop).
        self._burst: set[str] = set()
        self._previous_burst: set[str] = set()
        self._arrival: asyncio.Event | None = None
        # Moving average of batch wall times by kind, and the batch on the engine now (kind, start): the
        # retry hint of an overload answer is estimated from them.
        self._batch_s: dict[str, float | None] = {"select": None, "decode": None}
        self._running: tuple[str, float] | None = None
        # Sessions whose step was refused for overload -> until when its resend is expected: later steps of
        # the session wait for it that long instead of giving it up after step_gap_wait_s.
        self._resend_expected: weakref.WeakKeyDictionary[Session, float] = weakref.WeakKeyDictionary()

    @classmethod
    def from_settings(cls, settings, metrics: SelectorMetrics | None = None) -> "SelectorCore":
        """Load the selector model, its KL calibration and the selection log as configured."""
        from s2t.calibration import read_calibration
        from s2t.runtime import load_with

        sel = settings.selector
        lm = load_with(sel.model, settings.cache_dir, sel.runtime)
        calibration = read_calibration(settings.calibration_file()) or {}
        selection_log = None
        if sel.log_enabled:
            selection_log = SelectionLog(
                settings.selection_log_dir(),
                SelectorIdentity(model=lm.name, weights_sha256=lm.weights_sha256, vocab_sha256=lm.vocab_sha256,
                                 weight_formats=lm.plan.describe()),
                segment_records=sel.log_segment_records, segment_seconds=sel.log_segment_seconds,
                fsync_every=sel.log_fsync_every)
        log.info("selector ready: %s", lm.describe())
        return cls(Engine(lm), sel, selection_log, kl_thresholds=calibration.get("kl"), metrics=metrics)

    # -- info ---------------------------------------------------------------------------------------------

    def info(self) -> pb.GetSelectorInfoResponse:
        self.metrics.request(SelectorMethod.INFO, SelectorOutcome.OK)
        s = self.settings
        return pb.GetSelectorInfoResponse(
            model_name=self.model_name, vocab_size=self.vocab_size, vocab_sha256=self.engine.lm.vocab_sha256,
            max_candidates=s.max_candidates, max_positions=s.max_positions, max_context_tokens=s.max_context_tokens,
            max_decode_tokens=s.max_decode_tokens,
            kl_thresholds=self.kl.as_dict(),
            weight_formats=self.engine.lm.plan.describe(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
            accepts_prefill=True, device=str(self.engine.device))

    def problem(self) -> str | None:
        """Why this selector should not serve, or None: Ray Serve restarts a replica whose check_health raises."""
        if self.log is not None and not self.log.healthy:
            return "the selection log's writer thread died: selections are no longer logged"
        return None

    def close(self) -> None:
        """Shut down: close the selection log's open segment, so readers see it, and the metrics endpoint.
        Idempotent."""
        if self.log is not None:
            self.log.close()
        self.metrics.close()

    def close_session(self, session_id: str) -> pb.CloseSessionResponse:
        existed = self.sessions.remove(session_id)
        log.debug("session closed (existed: %s)", existed, extra={"session_id": session_id})
        self.metrics.request(SelectorMethod.CLOSE_SESSION, SelectorOutcome.OK)
        self._observe_sessions()
        return pb.CloseSessionResponse(existed=existed)

    def _observe_sessions(self) -> None:
        """Sessions, their KV memory and the evictions so far into the metrics (after each batch and close)."""
        self.metrics.sessions(len(self.sessions), self.sessions.kv_bytes(), self.sessions.evictions)

    # -- validation ---------------------------------------------------------------------------------------

    def _check_common(self, req) -> None:
        if not req.session_id:
            raise invalid("session_id: must not be empty")
        if len(req.session_id) > MAX_ID_LEN:
            raise invalid(f"session_id: {len(req.session_id)} characters, at most {MAX_ID_LEN}")
        if len(req.request_id) > MAX_ID_LEN:
            raise invalid(f"request_id: {len(req.request_id)} characters, at most {MAX_ID_LEN}")
        if len(req.token_ids) == 0:
            raise invalid("token_ids: at least one token is required")
        total = req.prefix_length + len(req.token_ids)
        if total > self.settings.max_context_tokens:
            raise invalid(f"token_ids: prefix_length {req.prefix_length} + {len(req.token_ids)} tokens exceeds "
                          f"max_context_tokens {self.settings.max_context_tokens}")
        self._check_ids("token_ids", req.token_ids)

    def _check_ids(self, field: str, ids) -> None:
        # min/max run in C over the repeated field; a Select carries ~600 ids (K + support, 8 positions)
        if ids and not (min(ids) >= 0 and max(ids) < self.vocab_size):
            for i, t in enumerate(ids):
                if not 0 <= t < self.vocab_size:
                    raise invalid(f"{field}[{i}]: {t} is outside the vocabulary [0, {self.vocab_size})")

    def validate_select(self, req: pb.SelectRequest) -> SelectRows:
        """Raises SelectorError naming the first bad field; returns the positions' ids and probabilities as read."""
        self._check_common(req)
        for name in ("slm_model", "slm_weights_sha256"):  # logged with every record: keep them bounded
            if len(getattr(req, name)) > MAX_ID_LEN:
                raise invalid(f"{name}: {len(getattr(req, name))} characters, at most {MAX_ID_LEN}")
        s = self.settings
        n = len(req.positions)
        if n > s.max_positions:
            raise invalid(f"positions: {n} positions, at most {s.max_positions}")
        kind = req.trigger.kind
        if kind not in (pb.SELECT_TRIGGER_ALWAYS, pb.SELECT_TRIGGER_WORKER, pb.SELECT_TRIGGER_KL):
            raise invalid("trigger.kind: must be SELECT_TRIGGER_ALWAYS, SELECT_TRIGGER_WORKER or SELECT_TRIGGER_KL")
        if kind == pb.SELECT_TRIGGER_KL:
            if not req.trigger.kl_threshold >= 0:  # NaN too: nothing exceeds it, the trigger would never fire
                raise invalid(f"trigger.kl_threshold: {req.trigger.kl_threshold:g} must be > 0")
            if req.trigger.kl_threshold == 0:
                if not 0 < req.trigger.kl_rate <= 1:
                    raise invalid(f"trigger.kl_rate: {req.trigger.kl_rate:g} must be in (0, 1] "
                                  "when trigger.kl_threshold is not set")
                self._kl_threshold(req.trigger.kl_rate)
        lo, hi = req.prefix_length + 1, req.prefix_length + len(req.token_ids)
        prev = 0
        ids: list[list[int]] = []  # per position: its candidates, then its support
        probs: list[list[float]] = []  # their probabilities as sent (either part may be absent)
        ks: list[int] = []  # K per position
        for j, pos in enumerate(req.positions):
            # each repeated field read once (a upb container per access): ~8 positions × 72 ids per Select
            position, candidates, support = pos.position, list(pos.candidate_ids), list(pos.support_ids)
            candidate_probs, support_probs = list(pos.candidate_probs), list(pos.support_probs)
            if not lo <= position <= hi:
                raise invalid(f"positions[{j}].position: {position} is outside [{lo}, {hi}] "
                              "(prefix_length + 1 .. prefix_length + len(token_ids))")
            if position <= prev:
                raise invalid(f"positions[{j}].position: positions must be strictly increasing ({position} after "
                              f"{prev})")
            prev = position
            k = len(candidates)
            if k == 0:
                raise invalid(f"positions[{j}].candidate_ids: K = 0, at least one candidate is required")
            if k > s.max_candidates:
                raise invalid(f"positions[{j}].candidate_ids: K = {k} exceeds max_candidates {s.max_candidates}")
            row = candidates + support
            if len(set(row)) != len(row):
                raise invalid(f"positions[{j}].candidate_ids: ids must be distinct (across candidate_ids and "
                              "support_ids)")
            for name, n, given in (("candidate", k, candidate_probs), ("support", len(support), support_probs)):
                if given and len(given) != n:
                    raise invalid(f"positions[{j}].{name}_probs: {len(given)} probabilities for {n} {name}_ids")
            if kind == pb.SELECT_TRIGGER_KL and not candidate_probs:
                raise invalid(f"positions[{j}].candidate_probs: SELECT_TRIGGER_KL needs the SLM's probabilities")
            # The KL statistic pairs every id with its probability: without them the batch's compute would fail
            # and take every session batched with this one down with it.
            if kind == pb.SELECT_TRIGGER_KL and support and not support_probs:
                raise invalid(f"positions[{j}].support_probs: SELECT_TRIGGER_KL needs the SLM's probabilities of "
                              "support_ids")
            ids.append(row)
            probs.append(candidate_probs + support_probs)
            ks.append(k)
        # The values, all positions at once (min/max/sum in C); walked one by one only to name a bad one.
        every_id = list(itertools.chain.from_iterable(ids))
        if every_id and not (min(every_id) >= 0 and max(every_id) < self.vocab_size):
            for j, pos in enumerate(req.positions):
                self._check_ids(f"positions[{j}].candidate_ids", pos.candidate_ids)
                self._check_ids(f"positions[{j}].support_ids", pos.support_ids)
        every_prob = list(itertools.chain.from_iterable(probs))
        if every_prob and not _probabilities(every_prob):
            for j, pos in enumerate(req.positions):
                for name, given in (("candidate", pos.candidate_probs), ("support", pos.support_probs)):
                    for i, p in enumerate(given):
                        if not 0.0 <= p <= 1.0:  # also rejects NaN
                            raise invalid(f"positions[{j}].{name}_probs[{i}]: {p} is not a probability in [0, 1]")
        return SelectRows(ids, probs, ks)

    def validate_decode(self, req: pb.DecodeRequest) -> None:
        self._check_common(req)
        if not 1 <= req.max_tokens <= self.settings.max_decode_tokens:
            raise invalid(f"max_tokens: {req.max_tokens} is outside [1, {self.settings.max_decode_tokens}]")
        self._check_ids("stop_ids", req.stop_ids)
        if req.prefix_length + len(req.token_ids) + req.max_tokens > self.settings.max_context_tokens:
            raise invalid(f"max_tokens: the session would exceed max_context_tokens {self.settings.max_context_tokens}")

    def _kl_threshold(self, rate: float) -> float:
        try:
            return self.kl.threshold(rate)
        except ValueError as e:
            raise invalid(f"trigger.kl_rate: {e}; send trigger.kl_threshold instead") from None

    # -- ordering -----------------------------------------------------------------------------------------

    async def admit(self, req, kind: str, worker: WorkerIdentity = LOCAL_CALLER) -> Ticket | object:
        """Validate and wait for the request's turn in its session. Returns a Ticket, or the recorded reply of
        an identical earlier request (idempotent retry); raises SelectorError.

        Back-pressure: a request whose turn has come is refused with RESOURCE_EXHAUSTED and a retry hint when
        `max_queued_requests` requests already wait for a batch, or when it is over `worker`'s quotas (a new
        session beyond max_sessions, positions beyond positions_per_s). The refusal changes nothing in the
        session (the resend of the same step is admitted like the first delivery), and replays of kept replies
        are never refused: they cost no compute."""
        rows = self.validate_select(req) if kind == "select" else self.validate_decode(req)
        sid, step = req.session_id, req.step
        session = self.sessions.get(sid)
        if session is None:
            if req.prefix_length != 0:
                self.counters["failed_precondition"] += 1
                raise stale(f"session_id: unknown session {sid!r}; resend the full context with prefix_length 0")
            self._check_session_quota(worker)
            session = self._open_session(sid, worker)
            session.next_step = step
            log.debug("session opened at step %d", step, extra={"session_id": sid, "request_id": req.request_id})
        async with session.changed:
            deadline = time.monotonic() + self.settings.step_gap_wait_s
            while True:
                replay = self._replay(session, step)
                if replay is not None:
                    return replay
                if session.busy:  # another step (or this one, retried) is computing: wait for it
                    await session.changed.wait()
                    continue
                if step < session.next_step:
                    raise stale(f"step: {step} is older than the session's next step {session.next_step} and its "
                                "reply is no longer kept (or it was superseded); resend the full context")
                # An earlier step refused for overload is coming back after its retry hint: wait for it too.
                timeout = max(deadline, self._resend_expected.get(session, 0.0)) - time.monotonic()
                if step > session.next_step and req.prefix_length != 0 and timeout > 0:
                    # An earlier step may still be on its way (requests can overtake each other); after the wait
                    # the missing steps are given up, and a late one is refused as superseded.
                    try:
                        await asyncio.wait_for(session.changed.wait(), timeout=timeout)
                    except asyncio.TimeoutError:
                        pass
                    continue
                break
            if self.queued() >= self.settings.max_queued_requests:
                raise self._overloaded(session)
            self._resend_expected.pop(session, None)
            reopen = self.sessions.get(sid) is not session  # evicted while waiting
            if reopen and req.prefix_length != 0:
                raise stale(f"session_id: session {sid!r} was evicted; resend the full context")
            if reopen:
                self._check_session_quota(worker)
            # the positions this request has scored (Decode: the tokens it may generate), once it will compute
            refusal = self.quotas.charge_positions(worker, len(req.positions) if kind == "select" else req.max_tokens)
            if refusal is not None:
                raise self._quota_refused(refusal)
            if reopen:
                session = self._open_session(sid, worker)
            session.next_step = step + 1
            if req.prefix_length == 0 and session.tokens:
                self.sessions.reset(session)
            if req.prefix_length > len(session.tokens):
                err = stale(f"prefix_length: {req.prefix_length} is beyond the {len(session.tokens)} tokens the "
                            f"selector holds for session {sid!r}; resend from at most that length")
                session.remember(step, err, self.settings.reply_cache_steps)
                self.counters["failed_precondition"] += 1
                session.changed.notify_all()
                raise err
            session.busy = True
            return Ticket(session, req, kind, rows)

    # -- back-pressure ------------------------------------------------------------------------------------

    def queued(self) -> int:
        """Admitted requests waiting for a batch (the one on the engine is not counted)."""
        return len(self._pending["select"]) + len(self._pending["decode"])

    def _batch_estimate(self, kind: str | None = None) -> float:
        """Expected wall time of one batch of `kind` (None: the slower kind), from recent batches."""
        known = [t for t in self._batch_s.values() if t is not None]
        own = self._batch_s.get(kind) if kind is not None else None
        return own if own is not None else max(known, default=DEFAULT_BATCH_S)

    def retry_after_ms(self) -> int:
        """When the queue will likely have room again. Room opens at batch boundaries (the next batch leaves
        the queue as the running one ends): the rest of the running batch, plus one batch time for every
        further `max_batch_size` requests beyond the bound. The client adds jitter; a request refused again
        gets a fresh estimate."""
        s = self.settings
        if self._running is not None:
            kind, started = self._running
            estimate = self._batch_estimate(kind)
            # a batch past its estimate ends any moment: still do not invite an immediate storm of resends
            first = max(estimate - (time.monotonic() - started), 0.1 * estimate, s.batch_wait_timeout_s)
        else:
            first = max(s.batch_wait_timeout_s, 0.1 * self._batch_estimate())
        beyond = self.queued() + 1 - s.max_queued_requests
        later_batches = max(0, math.ceil(beyond / s.max_batch_size) - 1)
        return max(1, math.ceil((first + later_batches * self._batch_estimate()) * 1000))

    def _overloaded(self, session: Session) -> SelectorError:
        retry_ms = self.retry_after_ms()
        self.counters["resource_exhausted"] += 1
        self.metrics.queue_rejection()
        self._resend_expected[session] = time.monotonic() + retry_ms / 1000 + self.settings.step_gap_wait_s
        return SelectorError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"selector overloaded: {self.queued()} requests are waiting for a batch (max_queued_requests "
            f"{self.settings.max_queued_requests}); resend the same step after the hint: {RETRY_AFTER_KEY}={retry_ms}",
            retry_after_ms=retry_ms)

    # -- per-worker quotas (quotas.py) ----------------------------------------------------------------------

    def _check_session_quota(self, worker: WorkerIdentity) -> None:
        refusal = self.quotas.check_new_session(worker, self.sessions)
        if refusal is not None:
            raise self._quota_refused(refusal)

    def _open_session(self, session_id: str, worker: WorkerIdentity) -> Session:
        session = self.sessions.create(session_id)
        self.quotas.opened(session, worker)
        return session

    def _quota_refused(self, refusal: QuotaRefusal) -> SelectorError:
        """RESOURCE_EXHAUSTED for a request over its worker's quota. The message names the setting and the
        worker (a token identity is the token's index, never the token); like an overload refusal it changes
        nothing in the session. Unlike one, the session's later steps do not wait past step_gap_wait_s for the
        refused step's resend: a worker over its quota often gives the step up (a hint beyond its deadline)
        and decides its positions locally, and its next steps should be answered (served or refused) soon,
        not stall until their own deadline. A resend that comes after a later step was served is superseded
        (FAILED_PRECONDITION: the worker resyncs)."""
        self.counters["quota_rejections"] += 1
        self.metrics.quota_rejection(refusal.kind)
        # one INFO line per worker and quota, then DEBUG: a worker over its quota is refused every block
        first = self.quotas.refusals(refusal.worker).get(refusal.kind) == 1
        message = (f"selector quota: {refusal.worker} is over {refusal.kind.setting} = {refusal.limit:g} "
                   f"({refusal.detail}); resend the same step after the hint: {RETRY_AFTER_KEY}="
                   f"{refusal.retry_after_ms}")
        log.log(logging.INFO if first else logging.DEBUG, "%s", message)
        return SelectorError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, retry_after_ms=refusal.retry_after_ms,
                             quota=refusal.kind)

    def _enforce_kv_quota(self) -> None:
        """After a batch (sessions grew): evict sessions of workers over selector.quota.max_kv_bytes (their own
        least recently used idle ones, quotas.WorkerQuotas.kv_evictions); they resync when they come back."""
        evict = self.quotas.kv_evictions(self.sessions)
        for session in evict:
            self.sessions.remove(session.id)
            log.debug("session evicted for %s's %s", self.quotas.owner(session), QuotaKind.MAX_KV_BYTES.setting,
                      extra={"session_id": session.id})
        if evict:
            self.counters["quota_evictions"] += len(evict)
            self.metrics.quota_evictions(QuotaKind.MAX_KV_BYTES, len(evict))

    def _replay(self, session: Session, step: int):
        if step in session.replies:
            self.counters["replayed"] += 1
            self.metrics.replay()
            reply = session.replies[step]
            if isinstance(reply, SelectorError):
                raise reply
            return reply
        return None

    async def release(self, ticket: Ticket, reply) -> None:
        s = ticket.session
        async with s.changed:
            s.busy = False
            s.remember(ticket.request.step, reply, self.settings.reply_cache_steps)
            s.changed.notify_all()

    # -- compute (synchronous; call off the event loop) ---------------------------------------------------

    def compute_select(self, tickets: list[Ticket]) -> list[pb.SelectResponse]:
        for t in tickets:
            if t.request.prefix_length < len(t.session.tokens):
                t.session.crop(t.request.prefix_length)
        caches = [t.session.cache for t in tickets]
        tokens = [list(t.request.token_ids) for t in tickets]
        want = [[p.position - t.request.prefix_length - 1 for p in t.request.positions] for t in tickets]
        # what each position is read at: its candidates, then its KL support (as validate_select read them)
        ids = [t.rows.ids for t in tickets]
        if not self.read_on_device:
            logps = [VocabLogProbs(lg) for lg in self.engine.forward(caches, tokens, want)]
        else:  # read on the GPU, where the logits are (the top-1 too)
            logps = self.engine.forward_logprobs(caches, tokens, want, ids)
        self.counters["forwards"] += 1
        # per request [positions, width]: position j's candidates, then its support; -inf padded
        tables = [lp.table(list(range(len(i))), i) if i else None for lp, i in zip(logps, ids)]
        kl = [t.request.trigger.kind == pb.SELECT_TRIGGER_KL for t in tickets]
        scores = _picks_and_kl([t.rows for t in tickets], kl, tables)  # the whole batch's positions at once
        return [self._select_one(t, lp, table, picks, values)
                for t, lp, table, (picks, values) in zip(tickets, logps, tables, scores)]

    def _select_one(self, ticket: Ticket, logp: VocabLogProbs | GatheredLogProbs, table: torch.Tensor | None,
                    picks: list[int], values: list[float]) -> pb.SelectResponse:
        """The reply to one Select from its positions' picks and KL values (_picks_and_kl) and the
        log-probabilities read at them (`table`: position j's candidates, then its KL support; the top-1)."""
        req, session = ticket.request, ticket.session
        session.tokens.extend(req.token_ids)
        trigger = req.trigger
        threshold = 0.0
        if trigger.kind == pb.SELECT_TRIGGER_KL:
            threshold = trigger.kl_threshold or self._kl_threshold(trigger.kl_rate)
        selections = []
        scored: list[tuple[int, int, bool, float, bool]] = []  # for the log: (j, index, diverged, value, after)
        outcome = pb.SELECT_OUTCOME_ACCEPTED
        for j, pos in enumerate(req.positions):
            after = outcome == pb.SELECT_OUTCOME_DIVERGED
            if after and self.log is None:
                break  # the reply stops at the first divergence; only the log wants the positions after it
            index = picks[j]
            # takeover: the LLM's own full-vocabulary top-1 decides, whether or not it is a candidate
            top1 = logp.top1(j) if req.takeover else -1
            if trigger.kind == pb.SELECT_TRIGGER_ALWAYS:
                fired, value = True, 0.0
            elif trigger.kind == pb.SELECT_TRIGGER_WORKER:
                fired, value = pos.worker_triggered, 0.0
            else:
                value = values[j]
                fired = value > threshold
            diverged = fired and (top1 != pos.candidate_ids[0] if req.takeover else index != 0)
            if self.log is not None:
                scored.append((j, index, diverged, value, after))
            if after:
                continue  # scored in the same forward on the drafted tokens: logged, not answered
            selections.append(pb.Selection(position=pos.position, index=index, diverged=diverged, trigger_value=value,
                                           token_id=top1 if req.takeover else 0))
            if diverged:
                outcome = pb.SELECT_OUTCOME_DIVERGED
                session.crop(pos.position)
        self.counters["select"] += 1
        self.counters["positions"] += len(req.positions)
        self.counters["diverged"] += outcome == pb.SELECT_OUTCOME_DIVERGED
        if self.log is not None:
            self._log_select(req, logp, table, threshold, outcome, scored)
        return pb.SelectResponse(session_id=req.session_id, step=req.step, outcome=outcome, selections=selections,
                                 session_length=len(session.tokens))

    def _log_select(self, req: pb.SelectRequest, logp: VocabLogProbs | GatheredLogProbs, table: torch.Tensor | None,
                    threshold: float, outcome: int, scored: list[tuple[int, int, bool, float, bool]]) -> None:
        """Queue the request's record for the selection log: every position scored, also those after the
        first divergence. Never fails the request: the log is a by-product of serving."""
        try:
            positions = []
            for j, index, diverged, value, after in scored:
                pos = req.positions[j]
                top1 = logp.top1(j)
                positions.append(ScoredPosition(
                    position=pos.position, candidate_ids=list(pos.candidate_ids),
                    slm_probs=list(pos.candidate_probs), llm_probs=table[j, :len(pos.candidate_ids)].exp().tolist(),
                    llm_top1=top1, llm_top1_prob=float(logp.at(j, [top1]).exp()), index=index, diverged=diverged,
                    after_divergence=after, trigger_value=value, worker_triggered=pos.worker_triggered,
                    worker_trigger_value=pos.worker_trigger_value))
            self.log.write(SelectRecord(
                ts=time.time(), session_id=req.session_id, step=req.step, request_id=req.request_id,
                slm_model=req.slm_model, slm_weights_sha256=req.slm_weights_sha256,
                prefix_length=req.prefix_length, token_ids=list(req.token_ids),
                trigger=_LOG_TRIGGER[req.trigger.kind], trigger_threshold=threshold, kl_rate=req.trigger.kl_rate,
                takeover=req.takeover, outcome="diverged" if outcome == pb.SELECT_OUTCOME_DIVERGED else "accepted",
                positions=positions))
        except Exception:
            log.exception("selection log: could not record session %r step %d", req.session_id, req.step)

    def compute_decode(self, tickets: list[Ticket]) -> list[pb.DecodeResponse]:
        """Greedy generation for several sessions at once: one forward per generated token."""
        for t in tickets:
            if t.request.prefix_length < len(t.session.tokens):
                t.session.crop(t.request.prefix_length)
        feed = [list(t.request.token_ids) for t in tickets]
        outputs: list[list[int]] = [[] for _ in tickets]
        active = list(range(len(tickets)))
        while active:
            logits = self.engine.forward([tickets[i].session.cache for i in active], [feed[i] for i in active],
                                         [[len(feed[i]) - 1] for i in active])
            self.counters["forwards"] += 1
            still = []
            for i, lg in zip(active, logits):
                tickets[i].session.tokens.extend(feed[i])
                token = int(torch.argmax(lg[0]))
                outputs[i].append(token)
                req = tickets[i].request
                if token not in req.stop_ids and len(outputs[i]) < req.max_tokens:
                    feed[i] = [token]
                    still.append(i)
            active = still
        self.counters["decode"] += len(tickets)
        return [pb.DecodeResponse(session_id=t.request.session_id, step=t.request.step, token_ids=out,
                                  session_length=len(t.session.tokens)) for t, out in zip(tickets, outputs)]

    # -- one request end to end, batched across sessions ---------------------------------------------------

    async def handle(self, req, kind: str, worker: WorkerIdentity = LOCAL_CALLER):
        """admit -> (batched) compute -> release for one request of `worker` (quotas.worker_identity: the
        transports say who called). Returns the reply; raises SelectorError."""
        outcome = SelectorOutcome.CANCELLED  # unless it ends otherwise: a caller that went away
        try:
            reply = await self._handle(req, kind, worker)
            outcome = SelectorOutcome.OK
            return reply
        except SelectorError as e:
            outcome = SelectorOutcome.of(e.code)
            raise
        except Exception:
            outcome = SelectorOutcome.ERROR
            raise
        finally:
            self.metrics.request(SelectorMethod(kind), outcome)

    async def _handle(self, req, kind: str, worker: WorkerIdentity):
        admitted = await self.admit(req, kind, worker)
        if not isinstance(admitted, Ticket):
            return admitted
        if req.prefix_length == 0 and req.step > 0:  # a session's later step with the full context: a resync
            self.metrics.resync()
        future = asyncio.get_running_loop().create_future()
        self._pending[kind].append((admitted, future))
        if self._arrival is not None:
            self._arrival.set()
        self.counters["queued_peak"] = max(self.counters["queued_peak"], self.queued())
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().create_task(self._drain())
        reply = await asyncio.shield(future)  # a cancelled caller must not drop its session's release
        if isinstance(reply, SelectorError):
            raise reply
        return reply

    async def _drain(self) -> None:
        """Run pending requests as batches, one at a time on the engine's compute thread.

        A batch is formed when the engine is free, so every request that arrived during the previous batch
        joins the next one. (Ray Serve 2.60's @serve.batch forms its batch within batch_wait_timeout_s and
        only then waits for the running one: under load every batch held a single session, measured with
        py-spy on the GSM8K benchmark.)"""
        try:
            await self._wait_for_burst()
            while self._pending["select"] or self._pending["decode"]:
                for kind in ("select", "decode"):
                    queue = self._pending[kind]
                    batch, self._pending[kind] = queue[:self.settings.max_batch_size], queue[self.settings.max_batch_size:]
                    if batch:
                        await self._run_batch(kind, batch)
        finally:
            self._draining = False
            self._previous_burst, self._burst = self._burst, set()

    async def _wait_for_burst(self) -> None:
        """Before the first batch after an idle spell: let the sessions of the previous burst (those served
        since the selector was idle before) send their next requests, so that workers advancing together share
        one batch; but wait at most batch_wait_timeout_s, not at all once they all have (or a batch is full),
        and never for a session outside that burst or one that went away. A lone worker's requests thus do not
        wait (a fixed wait was 5 ms of a one-session round's ~13 on a GPU)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.batch_wait_timeout_s
        while True:
            pending = [t.session.id for queue in self._pending.values() for t, _ in queue]
            if len(pending) >= self.settings.max_batch_size:
                return
            arrived = set(pending)
            if all(sid in arrived or sid not in self.sessions for sid in self._previous_burst):
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._arrival = asyncio.Event()
            try:
                await asyncio.wait_for(self._arrival.wait(), remaining)
            except asyncio.TimeoutError:
                return
            finally:
                self._arrival = None

    async def _run_batch(self, kind: str, batch: list[tuple[Ticket, asyncio.Future]]) -> None:
        tickets = [t for t, _ in batch]
        self._burst.update(t.session.id for t in tickets)
        if len(self._burst) > self.settings.max_sessions:  # busy for long: only open sessions can be waited for
            self._burst = {sid for sid in self._burst if sid in self.sessions}
        compute = self.compute_select if kind == "select" else self.compute_decode
        self.counters["batches"] += 1
        self.counters["batched_sessions"] += len(tickets)
        started = time.monotonic()
        self._running = (kind, started)
        try:
            replies = await asyncio.get_running_loop().run_in_executor(self.engine.executor, compute, tickets)
            took = time.monotonic() - started
            previous = self._batch_s[kind]
            self._batch_s[kind] = took if previous is None else \
                (1 - BATCH_TIME_SMOOTHING) * previous + BATCH_TIME_SMOOTHING * took
        except Exception:
            took = None
            log.exception("selector compute failed for %d sessions", len(tickets))
            lost = stale("session_id: the selector lost this session; resend the full context")
            for t in tickets:  # their caches may be half-updated: drop them so the workers resync
                self.sessions.remove(t.session.id)
            replies = [lost] * len(tickets)
        finally:
            self._running = None
        # Recorded before the callers get their replies (a scrape after a reply sees its batch), outside the try
        # (the instruments' labels are fixed at construction, so recording cannot fail like a compute).
        if took is not None:
            method = SelectorMethod(kind)
            self.metrics.batch(method, len(tickets), took)
            if method is SelectorMethod.SELECT:
                self.metrics.selected(sum(len(t.request.positions) for t in tickets),
                                      sum(r.outcome == pb.SELECT_OUTCOME_DIVERGED for r in replies))
        for (ticket, future), reply in zip(batch, replies):
            try:
                await self.release(ticket, reply)
            finally:  # a failing release (log I/O) must not leave the caller waiting forever
                if not future.done():
                    future.set_result(reply)
        self._enforce_kv_quota()
        self._observe_sessions()

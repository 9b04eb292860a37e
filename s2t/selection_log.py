"""Append-only selection log: the data distill learns from.

Schema (version 2, `SCHEMA_VERSION`), JSON lines, one segment per file:

- line 1, `SegmentHeader`: the schema version, the segment's name, the writer's id, the selector's model
  (name, sha256 of its weight files, sha256 of its vocabulary, weight formats) and the creation time.
- every further line, `SelectRecord`: one Select request the selector computed — session, step, request id,
  the worker's SLM (name and weights sha256, as the worker sent them), prefix_length and the token ids the
  request added (a delta: a session's context is stored once and rebuilt by `replay_contexts`), the trigger
  and its threshold, the outcome, and one `ScoredPosition` per position the selector scored: candidates,
  the SLM's and the LLM's probabilities of them, the LLM's full-vocabulary top-1, the chosen index, the
  trigger statistic and the worker's trigger; `takeover`, present (and true) only for a takeover request,
  says its divergences took the LLM's top-1 instead of a candidate. Every position of the request is logged,
  also those after the first divergence (`after_divergence`): the selector scored them in the same forward,
  on the drafted tokens as sent, which makes them labelled positions of an SLM rollout. The reply to the
  worker stops at the first divergence; the log does not.

Readers accept only the versions in `SUPPORTED_SCHEMA_VERSIONS`. Version-1 logs (before the SLM identity
and the after-divergence positions) are refused, not converted: they do not say which SLM drafted them, so
they cannot be trusted as training data for a particular SLM. Move them aside to read a directory.

Writing (`SelectionLog`) never blocks the selector: `write` puts the record on a bounded queue and returns;
a background thread serialises, appends, fsyncs every `fsync_every` records, rotates segments by records
and by age, and closes a segment by fsync + atomic rename of `<name>.jsonl.open` to `<name>.jsonl` (+
directory fsync). When the queue is full the record is dropped and counted (`dropped`); readers notice the
hole in the session's steps and skip to the session's next full-context request.

Readers only open closed segments, so they never see a torn record. A writer holds an exclusive flock on
its open segment for as long as it writes it; a crash (even kill -9) releases the lock. A writer starting
in a directory recovers only open segments whose lock it can take — those of dead writers: each is cut
back to its last complete record and closed. Several live writers can share a directory: segment names
carry the writer's id and a sequence number.
"""

from __future__ import annotations

import atexit
import dataclasses
import errno
import fcntl
import json
import logging
import os
import queue
import re
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Annotated, Callable, Iterable, Iterator, Literal

from pydantic import (BaseModel, ConfigDict, Field, PlainSerializer, PrivateAttr, SerializerFunctionWrapHandler,
                      ValidationError, model_serializer)

from s2t.model_store import fsync_dir

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
SUPPORTED_SCHEMA_VERSIONS = (2,)

PREFIX = "seg-"
OPEN_SUFFIX = ".jsonl.open"
CLOSED_SUFFIX = ".jsonl"
# A new segment is created under a hidden name, locked, and only then renamed to its .open name: recovery
# globs .open names, so it can never take a live writer's fresh segment for a dead one's.
CREATING_SUFFIX = ".jsonl.creating"
STALE_CREATING_S = 60.0  # a .creating file older than this belongs to a writer that died while creating it


class SelectionLogError(ValueError):
    """A segment that cannot be read: unsupported schema version, not a segment, or a malformed record."""


def _significant(x: float) -> float:
    """7 significant digits: below float32's resolution (what the wire carries), a third of the JSON size."""
    return float(f"{x:.7g}")


Prob = Annotated[float, PlainSerializer(_significant, return_type=float)]


class _Strict(BaseModel):
    # A field this version does not know is a newer schema: refuse rather than silently drop it.
    model_config = ConfigDict(extra="forbid")


class SelectorIdentity(_Strict):
    """The selector model that labelled a segment's records."""

    model: str
    weights_sha256: str  # s2t.vocab.weights_sha256 of its weight files
    vocab_sha256: str  # s2t.vocab.vocab_hash: candidate ids mean the same tokens only under equal hashes
    weight_formats: str = ""  # how its linear layers were computed (int8 rows shift probabilities slightly)


class SegmentHeader(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    kind: Literal["header"] = "header"
    schema_version: int = Field(SCHEMA_VERSION, alias="schema")  # "schema", as version 1 called it
    segment: str
    writer_id: str
    selector: SelectorIdentity
    created: float  # unix time


class ScoredPosition(_Strict):
    """One position the selector scored. Its context is the session's tokens before `position`."""

    position: int  # absolute index in the session of the token being chosen
    candidate_ids: list[int]  # the SLM's top-K, best first; candidate_ids[0] is the SLM's draft
    slm_probs: list[Prob]  # the SLM's probability of each candidate; empty when the worker sent none
    llm_probs: list[Prob]  # the LLM's full-vocabulary probability of each candidate (not renormalised)
    llm_top1: int  # the LLM's most probable token over the whole vocabulary
    llm_top1_prob: Prob
    index: int  # the selection: argmax of llm_probs, ties to the lower index
    # index != 0 and the trigger fired (after the divergence: would have diverged); in a takeover record:
    # llm_top1 != candidate_ids[0] and the trigger fired (the session then continues with llm_top1)
    diverged: bool
    after_divergence: bool = False  # after the request's first divergence: not in the reply
    trigger_value: Prob  # the KL statistic for the KL trigger, else 0
    worker_triggered: bool
    worker_trigger_value: Prob


class SelectRecord(_Strict):
    """One Select request the selector computed."""

    kind: Literal["select"] = "select"
    ts: float  # unix time the selector computed it
    session_id: str
    step: int
    request_id: str = ""
    slm_model: str = ""  # the worker's SLM as sent; carried forward within a session by `read_records`
    slm_weights_sha256: str = ""
    prefix_length: int  # the session's tokens the request builds on; 0 = full context in token_ids
    token_ids: list[int]  # the session's tokens at prefix_length .. prefix_length + len - 1
    trigger: Literal["always", "worker", "kl"]
    trigger_threshold: float = 0.0  # the KL threshold applied (nats), for trigger "kl"
    kl_rate: float = 0.0  # the rate the worker asked for, for trigger "kl" without an explicit threshold
    outcome: Literal["accepted", "diverged"]
    positions: list[ScoredPosition]
    # The request was a takeover (SelectRequest.takeover, the worker's mode takeover): its divergences took the
    # LLM's own top-1 rather than a candidate. Written only when true (see _omit_false_takeover).
    takeover: bool = False

    _source: str = PrivateAttr("")

    @model_serializer(mode="wrap")
    def _omit_false_takeover(self, handler: SerializerFunctionWrapHandler) -> dict:
        """Leave `takeover` out unless it is true: a log without takeover requests stays exactly what schema 2
        always wrote (readable by every schema-2 reader), and a reader that predates the field refuses a takeover
        record as a field it does not know, rather than read its divergences as candidate picks."""
        data = handler(self)
        if not self.takeover:
            data.pop("takeover", None)
        return data

    @property
    def source(self) -> str:
        """'<segment path>:<line>' for records read from a segment (for error messages), else ''."""
        return self._source

    @property
    def divergence(self) -> int | None:
        """The position of the request's first divergence, where the selector cut the session; None if none."""
        for p in self.positions:
            if p.diverged and not p.after_divergence:
                return p.position
        return None


# ---------------------------------------------------------------------------------------------------------
# writing


@dataclasses.dataclass
class _Barrier:
    """Queued by flush/close: the writer thread sets `done` once every record queued before it is fsync'd."""

    close: bool
    done: threading.Event = dataclasses.field(default_factory=threading.Event)


def default_writer_id() -> str:
    """host-pid-random: unique among the writers of a directory, also two in one process."""
    host = re.sub(r"[^A-Za-z0-9_.]+", "_", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class SelectionLog:
    """Non-blocking writer of selection log segments (see the module docstring).

    `write` never blocks and never raises for I/O: it enqueues or drops. `written`, `dropped` and `segments`
    count records appended to a segment file, records lost (queue full, log closed, I/O error) and segments
    closed by this writer. `queue_records` bounds the memory a stalled disk can cost: records are a few KB
    (a full-context one holds the whole prompt), so the default holds tens of MB and many seconds of a busy
    selector's requests.
    """

    def __init__(self, directory: Path, selector: SelectorIdentity, *, segment_records: int = 50_000,
                 segment_seconds: float = 300.0, fsync_every: int = 256, queue_records: int = 16_384,
                 writer_id: str | None = None):
        if writer_id is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,80}", writer_id):
            raise ValueError(f"writer_id {writer_id!r}: 1..80 of A-Z a-z 0-9 _ . - (it is part of file names)")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.selector = selector
        self.segment_records = segment_records
        self.segment_seconds = segment_seconds
        self.fsync_every = fsync_every
        self.writer_id = writer_id or default_writer_id()
        self.written = 0
        self.dropped = 0
        self.segments = 0
        recover_open_segments(self.directory)
        self._queue: queue.Queue[SelectRecord | _Barrier] = queue.Queue(maxsize=queue_records)
        self._lock = threading.Lock()  # orders "closed?" checks and puts against close()
        self._drop_lock = threading.Lock()
        self._closed = False
        # Writer-thread state: the open segment.
        self._fd: int | None = None
        self._open_path: Path | None = None
        self._size = 0  # bytes of complete records (and the header) in the open segment
        self._records = 0
        self._unsynced = 0
        self._opened_at = 0.0
        self._seq = 0
        self._thread = threading.Thread(target=self._run, name=f"selection-log-{self.writer_id}", daemon=True)
        self._thread.start()
        # The thread is a daemon (a forgotten close must not hang the interpreter); closing at exit writes
        # out what is queued.
        atexit.register(self.close)

    @property
    def counters(self) -> dict[str, int]:
        return {"written": self.written, "dropped": self.dropped, "segments": self.segments,
                "queued": self._queue.qsize()}

    def write(self, record: SelectRecord) -> bool:
        """Queue a record for the writer thread; False (and counted in `dropped`) if it was dropped."""
        with self._lock:
            closed = self._closed
            if not closed:
                try:
                    self._queue.put_nowait(record)
                    return True
                except queue.Full:
                    pass
        self._drop(1, "the log is closed" if closed else "the queue is full (the disk is slower than the selector)")
        return False

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every record written before this call is in the open segment and fsync'd."""
        with self._lock:
            if self._closed:
                return
            barrier = _Barrier(close=False)
        self._queue.put(barrier)  # may wait for room: flush is not on the reply path
        self._await(barrier, timeout)

    @property
    def healthy(self) -> bool:
        """The writer thread is running (or the log was closed on purpose)."""
        return self._closed or self._thread.is_alive()

    def close(self, timeout: float | None = None) -> None:
        """Write out the queue, close the open segment (visible to readers from then on), stop the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True  # from here on `write` drops: nothing can be queued behind the barrier
        atexit.unregister(self.close)
        barrier = _Barrier(close=True)
        self._queue.put(barrier)
        self._await(barrier, timeout)
        self._thread.join(timeout)

    def _await(self, barrier: _Barrier, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not barrier.done.wait(0.2):
            if not self._thread.is_alive():
                if self._closed and not barrier.close:
                    return  # a flush that raced with close: close wrote everything out
                raise RuntimeError(f"selection log writer {self.writer_id} has stopped")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"selection log writer {self.writer_id}: not drained within {timeout}s")

    def _drop(self, n: int, why: str) -> None:
        with self._drop_lock:  # callers: `write` (any thread) and the writer thread
            self.dropped += n
            total = self.dropped
        if total == n or total % 1000 < n:  # the first drop, then every thousandth
            log.warning("selection log %s: dropped %d record(s) so far (%s)", self.directory, total, why)

    # -- the writer thread ----------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            timeout = None
            if self._fd is not None:
                timeout = max(0.0, self._opened_at + self.segment_seconds - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:  # the open segment is old and nothing arrives: close it so readers see it
                self._guarded(self._close_segment)
                continue
            if isinstance(item, _Barrier):
                try:
                    if item.close:
                        self._guarded(self._close_segment)
                    elif self._fd is not None:
                        self._guarded(self._sync)
                finally:
                    item.done.set()
                if item.close:
                    self._release_stragglers()
                    return
                continue
            self._append(item)

    def _release_stragglers(self) -> None:
        """After the close barrier: a flush that raced with close queued its barrier behind it; let it go.
        (No record can be behind it: `write` stops queueing before close queues its barrier.)"""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Barrier):
                item.done.set()
            else:
                self._drop(1, "the log is closed")

    def _guarded(self, action: Callable[[], None]) -> None:
        """Run a file operation; on failure give the open segment up (its complete records are kept)."""
        try:
            action()
        except Exception:
            log.exception("selection log %s: writing segment %s failed", self.directory, self._open_path)
            self._abandon()

    def _append(self, record: SelectRecord) -> None:
        try:
            line = record.model_dump_json().encode("utf-8") + b"\n"
        except Exception:
            log.exception("selection log: record of session %r step %s does not serialise", record.session_id,
                          record.step)
            self._drop(1, "a record did not serialise")
            return
        try:
            if self._fd is None:
                self._open()
            _write_all(self._fd, line)
        except Exception:
            log.exception("selection log %s: appending to %s failed", self.directory, self._open_path)
            self._drop(1, "an I/O error")
            self._abandon()
            return
        self._size += len(line)
        self._records += 1
        self._unsynced += 1
        self.written += 1
        if self._unsynced >= self.fsync_every:
            self._guarded(self._sync)
        if self._fd is not None and (self._records >= self.segment_records
                                     or time.monotonic() - self._opened_at >= self.segment_seconds):
            self._guarded(self._close_segment)

    def _open(self) -> None:
        self._seq += 1
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        name = f"{PREFIX}{stamp}-{self.writer_id}-{self._seq:06d}"
        creating = self.directory / f".{name}{CREATING_SUFFIX}"
        path = self.directory / f"{name}{OPEN_SUFFIX}"
        fd = os.open(creating, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held until the segment is closed or we die
            os.rename(creating, path)  # the lock is on the file, not the name: it stays held
            header = SegmentHeader(segment=name, writer_id=self.writer_id, selector=self.selector, created=time.time())
            data = header.model_dump_json(by_alias=True).encode("utf-8") + b"\n"
            _write_all(fd, data)
            os.fsync(fd)
            fsync_dir(self.directory)  # the name must survive a power loss as long as its synced records do
        except BaseException:
            os.close(fd)
            for leftover in (creating, path):
                leftover.unlink(missing_ok=True)
            raise
        self._fd, self._open_path = fd, path
        self._size, self._records, self._unsynced = len(data), 0, 0
        self._opened_at = time.monotonic()

    def _sync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            self._unsynced = 0

    def _close_segment(self) -> None:
        if self._fd is None:
            return
        os.fsync(self._fd)
        final = _closed_name(self._open_path)
        os.rename(self._open_path, final)
        fsync_dir(self.directory)
        os.close(self._fd)  # releases the lock only now: recovery never sees this segment unlocked and open
        self._fd, self._open_path = None, None
        self.segments += 1

    def _abandon(self) -> None:
        """After an I/O error: cut the open segment back to its complete records and close it if it can be;
        else leave it to the recovery of the next writer (our lock goes with the descriptor)."""
        if self._fd is None:
            return
        fd, path = self._fd, self._open_path
        self._fd, self._open_path = None, None
        try:
            os.ftruncate(fd, self._size)
            os.fsync(fd)
            if self._records:
                os.rename(path, _closed_name(path))
                self.segments += 1
            else:
                path.unlink()
            fsync_dir(self.directory)
        except Exception:
            log.exception("selection log %s: could not close %s after an error; the next writer will recover it",
                          self.directory, path)
        finally:
            os.close(fd)


def _closed_name(open_path: Path) -> Path:
    return open_path.with_name(open_path.name.removesuffix(OPEN_SUFFIX) + CLOSED_SUFFIX)


# ---------------------------------------------------------------------------------------------------------
# recovery


def _complete_prefix(data: bytes) -> bytes:
    """The longest prefix of whole, parseable lines. A line can be complete but garbage when the machine lost
    power before an fsync (zeros, stale blocks): only parseable lines at the end are kept."""
    lines = data[: data.rfind(b"\n") + 1].splitlines(keepends=True)
    while lines:
        try:
            json.loads(lines[-1])
            break
        except ValueError:
            lines.pop()
    return b"".join(lines)


def recover_open_segments(directory: Path) -> list[Path]:
    """Close the open segments of dead writers: cut each to its last complete record and rename it closed.

    A segment whose flock is held belongs to a live writer and is left alone. Segments holding no record
    (a header at most) are deleted. Returns the segments closed.
    """
    directory = Path(directory)
    closed = []
    changed = False
    for path in sorted(directory.glob(f"{PREFIX}*{OPEN_SUFFIX}")):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:  # closed by its writer since the glob
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    continue  # a live writer's segment
                raise
            try:
                if os.stat(path).st_ino != os.fstat(fd).st_ino:
                    continue  # renamed (closed) and replaced between our open and our lock
            except FileNotFoundError:
                continue  # its writer closed it between our open and our lock
            with open(fd, "rb", closefd=False) as f:
                data = f.read()
            keep = _complete_prefix(data)
            if keep.count(b"\n") < 2:  # no record after the header
                path.unlink()
                changed = True
                continue
            os.ftruncate(fd, len(keep))
            os.fsync(fd)
            final = _closed_name(path)
            os.rename(path, final)
            changed = True
            closed.append(final)
            log.warning("selection log: recovered %s from a dead writer (%d of %d bytes kept)", final.name,
                        len(keep), len(data))
        finally:
            os.close(fd)
    now = time.time()
    for path in directory.glob(f".{PREFIX}*{CREATING_SUFFIX}"):
        try:
            if now - path.stat().st_mtime > STALE_CREATING_S:
                path.unlink()
                changed = True
        except FileNotFoundError:
            pass
    if changed:
        fsync_dir(directory)
    return closed


# ---------------------------------------------------------------------------------------------------------
# reading


def closed_segments(directory: Path) -> list[Path]:
    """Closed segments under directory (recursively), in name order: by creation time, then writer."""
    return sorted(Path(directory).rglob(f"{PREFIX}*{CLOSED_SUFFIX}"))


def read_segment(path: Path) -> tuple[SegmentHeader, Iterator[SelectRecord]]:
    """The segment's header and an iterator over its records; SelectionLogError for an unsupported schema
    version, a file that is not a segment, or a malformed record (with its line number)."""
    path = Path(path)
    f = open(path, encoding="utf-8")
    try:
        first = f.readline()
        try:
            raw = json.loads(first)
        except ValueError:
            raw = None
        if not isinstance(raw, dict) or raw.get("kind") != "header":
            raise SelectionLogError(f"{path}: the first line is not a selection log segment header")
        version = raw.get("schema")
        if version not in SUPPORTED_SCHEMA_VERSIONS:
            supported = ", ".join(str(v) for v in SUPPORTED_SCHEMA_VERSIONS)
            hint = (" Version-1 logs name no SLM and keep no positions after a divergence; they are not read "
                    "as training data. Move them out of the log directory." if version == 1 else "")
            raise SelectionLogError(f"{path}: selection log schema version {version!r}; this reader supports "
                                    f"version {supported}.{hint}")
        try:
            header = SegmentHeader.model_validate(raw)
        except ValidationError as e:
            raise SelectionLogError(f"{path}: malformed segment header: {e}") from None
    except BaseException:
        f.close()
        raise

    def records() -> Iterator[SelectRecord]:
        with f:
            for lineno, line in enumerate(f, start=2):
                try:
                    record = SelectRecord.model_validate_json(line)
                except ValidationError as e:
                    raise SelectionLogError(f"{path}:{lineno}: malformed select record: {e}") from None
                record._source = f"{path}:{lineno}"
                yield record

    return header, records()


def read_records(directory: Path, check_header: Callable[[Path, SegmentHeader], None] | None = None
                 ) -> list[SelectRecord]:
    """Every record of the closed segments under directory, sorted by (session_id, step).

    `check_header(path, header)` runs before a segment's records are read and may raise to refuse it. A
    (session_id, step) logged twice (a request computed again, e.g. by a restarted selector) keeps its first
    record. A record without the SLM's identity takes the one its session last sent (workers may send it
    only with full-context requests).
    """
    seen: dict[tuple[str, int], SelectRecord] = {}
    for segment in closed_segments(directory):
        header, body = read_segment(segment)
        if check_header is not None:
            check_header(segment, header)
        for record in body:
            seen.setdefault((record.session_id, record.step), record)
    records = sorted(seen.values(), key=lambda r: (r.session_id, r.step))
    identity: tuple[str, str] | None = None
    session = None
    for record in records:
        if record.session_id != session:
            session, identity = record.session_id, None
        if record.slm_weights_sha256:
            identity = (record.slm_model, record.slm_weights_sha256)
        elif identity is not None:
            record.slm_model, record.slm_weights_sha256 = identity
    return records


def _sessions(records: Iterable[SelectRecord]) -> dict[str, list[SelectRecord]]:
    """Records by session in step order, (session_id, step) duplicates dropped (the first one stays)."""
    by_session: dict[str, dict[int, SelectRecord]] = {}
    for r in records:
        by_session.setdefault(r.session_id, {}).setdefault(r.step, r)
    return {sid: [steps[s] for s in sorted(steps)] for sid, steps in by_session.items()}


def _replay_session(records: list[SelectRecord]) -> Iterator[tuple[SelectRecord, list[int] | None]]:
    """Walk one session's records (step order) and yield each with the session's tokens as the selector
    held them when it scored it (the live list, valid until the next item), or None where they are unknown.

    The selector's state is a function of the records it computed: tokens[:prefix_length] + token_ids, cut
    at the divergence. Replay is exact while no computed record is missing. Steps go up by one per request,
    so a hole in the steps (a dropped record, or a request the selector never saw) makes the context unknown
    until the session's next full-context request (prefix_length 0); so does a prefix beyond the tokens held.
    """
    tokens: list[int] | None = None
    previous_step: int | None = None
    for r in records:
        contiguous = previous_step is not None and r.step == previous_step + 1
        previous_step = r.step
        if r.prefix_length == 0:
            tokens = []
        elif tokens is None or not contiguous or r.prefix_length > len(tokens):
            tokens = None
            yield r, None
            continue
        del tokens[r.prefix_length:]
        tokens.extend(r.token_ids)
        yield r, tokens
        cut = r.divergence
        if cut is not None:
            del tokens[cut:]  # the selector cut its session here; later positions saw the rejected draft


def replay_contexts(records: Iterable[SelectRecord]) -> Iterator[tuple[SelectRecord, ScoredPosition, list[int]]]:
    """Replay select records (any order, several sessions) and yield (record, position, context) for every
    scored position whose context is known; context is the session's token ids before the position.

    Positions after a divergence (`after_divergence`) get the context the selector scored them on: the
    request's tokens as sent, with the rejected draft at the divergence. Duplicate (session_id, step) records
    are dropped (the first stays).
    """
    for session_records in _sessions(records).values():
        for record, tokens in _replay_session(session_records):
            if tokens is None:
                continue
            for pos in record.positions:
                yield record, pos, tokens[: pos.position]


def replay_sessions(records: Iterable[SelectRecord]) -> dict[str, list[int]]:
    """Each session's token sequence as the selector last knew it: its last known state, cut at a final
    divergence. Contexts that are prefixes of it can share one forward (prefix-shared packing)."""
    out: dict[str, list[int]] = {}
    for sid, session_records in _sessions(records).items():
        last: list[int] | None = None
        for _record, tokens in _replay_session(session_records):
            if tokens is not None:
                last = tokens  # the live list: after the loop it holds the final state, cut included
        if last is not None:
            out[sid] = list(last)
    return out

"""Append-only selection log: the data distill learns from.

One record per Select request the selector computed (JSON lines): the session, the step, the delta of
token ids the request added, and for every position the selector answered the candidates, the SLM's
and the LLM's probabilities of them, the LLM's full-vocabulary top-1, the chosen index and the trigger.
Contexts are reconstructed by replaying a session's records in step order (`replay_contexts`).

Segments are written as `<name>.jsonl.open`, fsync'd every `fsync_every` records, and closed by fsync +
atomic rename to `<name>.jsonl` (+ directory fsync). Readers only ever open closed segments, so they never
see a torn record. A crash loses at most the open segment's unsynced tail: on start-up, a leftover
`.open` segment is cut back to its last complete line and closed.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

from s2t.model_store import fsync_dir

PREFIX = "seg-"
OPEN_SUFFIX = ".jsonl.open"
CLOSED_SUFFIX = ".jsonl"
SCHEMA_VERSION = 1


class SelectionLog:
    def __init__(self, directory: Path, header: dict, segment_records: int = 50_000, segment_seconds: float = 300.0,
                 fsync_every: int = 256, writer_id: str | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.header = {"kind": "header", "schema": SCHEMA_VERSION, **header}
        self.segment_records = segment_records
        self.segment_seconds = segment_seconds
        self.fsync_every = fsync_every
        self.writer_id = writer_id or f"{socket.gethostname()}-{os.getpid()}"
        self._lock = threading.Lock()
        self._file = None
        self._path: Path | None = None
        self._records = 0
        self._unsynced = 0
        self._opened_at = 0.0
        self._seq = 0
        recover_open_segments(self.directory)

    def write(self, record: dict) -> None:
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self._lock:
            if self._file is None:
                self._open()
            self._file.write(line)
            self._records += 1
            self._unsynced += 1
            if self._unsynced >= self.fsync_every:
                self._sync()
            if self._records >= self.segment_records or time.time() - self._opened_at >= self.segment_seconds:
                self._close()

    def flush(self) -> None:
        """fsync the open segment (records written so far survive a crash)."""
        with self._lock:
            if self._file is not None:
                self._sync()

    def close(self) -> None:
        """Close the open segment, making it visible to readers."""
        with self._lock:
            if self._file is not None:
                self._close()

    def _open(self) -> None:
        self._seq += 1
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        name = f"{PREFIX}{stamp}-{self.writer_id}-{self._seq:06d}"
        self._path = self.directory / (name + OPEN_SUFFIX)
        self._file = open(self._path, "w", encoding="utf-8")
        self._file.write(json.dumps({**self.header, "segment": name, "created": time.time()}) + "\n")
        self._records = 0
        self._unsynced = 0
        self._opened_at = time.time()

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._unsynced = 0

    def _close(self) -> None:
        self._sync()
        self._file.close()
        final = self._path.with_name(self._path.name.removesuffix(OPEN_SUFFIX) + CLOSED_SUFFIX)
        os.replace(self._path, final)
        fsync_dir(self.directory)
        self._file, self._path = None, None


def recover_open_segments(directory: Path) -> list[Path]:
    """Cut leftover open segments (from a crashed writer) to their last complete record and close them."""
    closed = []
    for path in sorted(Path(directory).glob(PREFIX + "*" + OPEN_SUFFIX)):
        data = path.read_bytes()
        keep = data[: data.rfind(b"\n") + 1]
        lines = keep.splitlines(keepends=True)
        while lines:  # a line can be complete but, written without fsync, garbage; keep only parseable ones
            try:
                json.loads(lines[-1])
                break
            except ValueError:
                lines.pop()
        keep = b"".join(lines)
        if not keep:
            path.unlink()
            continue
        with open(path, "r+b") as f:
            f.truncate(len(keep))
            f.flush()
            os.fsync(f.fileno())
        final = path.with_name(path.name.removesuffix(OPEN_SUFFIX) + CLOSED_SUFFIX)
        os.replace(path, final)
        closed.append(final)
    if closed:
        fsync_dir(Path(directory))
    return closed


def closed_segments(directory: Path) -> list[Path]:
    return sorted(Path(directory).rglob(PREFIX + "*" + CLOSED_SUFFIX))


def read_segment(path: Path) -> tuple[dict, Iterator[dict]]:
    """The segment's header and an iterator over its records."""
    f = open(path, encoding="utf-8")
    header = json.loads(f.readline())
    if header.get("kind") != "header":
        f.close()
        raise ValueError(f"{path}: first line is not a segment header")

    def records() -> Iterator[dict]:
        with f:
            for line in f:
                yield json.loads(line)

    return header, records()


def replay_contexts(records: list[dict]) -> Iterator[tuple[dict, dict, list[int]]]:
    """Replay select records (any order, several sessions) and yield (record, position, context) for every
    answered position, where context is the token ids before that position.

    Duplicate (session, step) records, e.g. from a retried request logged twice, are dropped.
    """
    by_session: dict[str, dict[int, dict]] = {}
    for r in records:
        if r.get("kind") == "select":
            by_session.setdefault(r["session_id"], {}).setdefault(r["step"], r)
    for steps in by_session.values():
        tokens: list[int] = []
        for step in sorted(steps):
            r = steps[step]
            prefix = r["prefix_length"]
            if prefix > len(tokens):
                tokens = None  # a gap in this session's log (records lost or never written); skip until a restart
            if tokens is None:
                if prefix != 0:
                    continue
                tokens = []
            del tokens[prefix:]
            tokens.extend(r["token_ids"])
            for pos in r["positions"]:
                yield r, pos, tokens[: pos["position"]]
            if r["outcome"] == "diverged":
                del tokens[r["positions"][-1]["position"]:]

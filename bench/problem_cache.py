"""Per-problem benchmark results kept across runs, keyed by what determines them.

An accuracy row is a configuration (models and their weight hashes, weight formats, the mode and its
options, prompt, token cap, dataset split) run on a list of problems. Each problem's result depends only on
that configuration and the problem, so it is stored once per configuration and reused by every later run
that asks for the same configuration: a rerun computes only the problems (or configurations) that changed,
and a killed run resumes where it stopped, because each result is appended and fsync'd as it completes.

The code commit is deliberately not part of the key: the point is to reuse results across commits, most of
which do not touch generation. Commits that do change the tokens are caught by the canaries: every run
recomputes a few cached problems and fails loudly if they differ (bench/run_bench.py).

Layout: <root>/<label>-<key>.jsonl, one file per configuration. Line 1 is a header with the full key
dictionary (so a file says what it holds); every further line is {"idx", "problem_sha256", "result"}. The
last record of a problem wins. Only whole lines are ever appended, so a kill can only leave a partial last
line, which the next open cuts off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.cache")

CACHE_FORMAT = 1  # bump when the record layout changes: old files are then simply not found
DEFAULT_ROOT = Path(__file__).resolve().parent / "cache"


def canonical_json(value: Any) -> str:
    """One spelling per value: sorted keys, no spaces, UTF-8 kept; tuples become lists."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def digest(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()


def problem_digest(problem: Mapping[str, Any]) -> str:
    """Identity of a problem's content (question and gold answer): an index alone would silently reuse results
    if the dataset file changed."""
    return digest({"question": problem["question"], "gold": problem["gold"]})


class CacheFileMismatch(RuntimeError):
    """A cache file's header names another configuration than its file name says."""


class ProblemCache:
    """Results of one row configuration, one per problem index.

    `row_key` is the JSON-able dictionary of everything that determines a problem's result besides the
    problem itself; its sha256 names the file. `label` (e.g. the mode) only makes file names readable."""

    def __init__(self, root: Path, row_key: Mapping[str, Any], label: str = ""):
        self.root = Path(root)
        self.row_key: dict = json.loads(canonical_json(dict(row_key)))  # normalised: what the header stores
        self.key = digest({"cache_format": CACHE_FORMAT, "row": self.row_key})
        safe_label = re.sub(r"[^A-Za-z0-9._-]+", "_", label)[:48]
        self.path = self.root / (f"{safe_label}-{self.key[:32]}.jsonl" if safe_label else f"{self.key[:32]}.jsonl")
        self._records: dict[int, dict] = {}  # idx -> {"problem_sha256", "result"}
        self.dropped_partial_line = False
        self._load()

    def _header(self) -> dict:
        return {"cache_format": CACHE_FORMAT, "key": self.key, "row": self.row_key}

    def _load(self) -> None:
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            # A run killed mid-append left half a record: cut it off so the next append starts a fresh line.
            keep = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())
            data = data[:keep]
            self.dropped_partial_line = True
            log.warning("%s: dropped a partial last record (a run was killed while writing it)", self.path)
        lines = data.decode("utf-8").splitlines()
        if not lines:
            return
        header = json.loads(lines[0])
        if header.get("key") != self.key:
            raise CacheFileMismatch(f"{self.path}: its header names configuration {header.get('key')!r}, "
                                    f"expected {self.key!r}; move the file away")
        for number, line in enumerate(lines[1:], start=2):
            try:
                record = json.loads(line)
                self._records[int(record["idx"])] = {"problem_sha256": record.get("problem_sha256", ""),
                                                     "result": record["result"]}
            except (ValueError, KeyError, TypeError) as e:
                # Whole lines are appended atomically, so this means the file was edited by hand: say so, go on.
                log.warning("%s:%d: unreadable record skipped (%s)", self.path, number, e)

    def __len__(self) -> int:
        return len(self._records)

    def indices(self) -> list[int]:
        return sorted(self._records)

    def get(self, idx: int, problem_sha256: str | None = None) -> dict | None:
        """The stored result of problem `idx`, or None; None too when `problem_sha256` is given and the stored
        result was computed for different problem content."""
        record = self._records.get(int(idx))
        if record is None or (problem_sha256 is not None and record["problem_sha256"] != problem_sha256):
            return None
        return json.loads(json.dumps(record["result"]))  # a copy: callers may annotate it

    def missing(self, indices: Iterable[int], digests: Mapping[int, str] | None = None) -> list[int]:
        """The indices (in the given order) without a usable stored result."""
        digests = digests or {}
        return [i for i in indices if self.get(i, digests.get(i)) is None]

    def put(self, idx: int, result: Mapping[str, Any], problem_sha256: str = "") -> None:
        """Append one result and fsync it before returning, so a kill right after loses nothing."""
        record = {"idx": int(idx), "problem_sha256": problem_sha256, "result": dict(result)}
        line = canonical_json(record) + "\n"
        new_file = not self.path.is_file() or self.path.stat().st_size == 0
        if new_file:
            self.root.mkdir(parents=True, exist_ok=True)
            line = canonical_json(self._header()) + "\n" + line
        # One write() of whole lines on an O_APPEND descriptor: concurrent writers cannot interleave within a line.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            pending = memoryview(line.encode("utf-8"))
            while pending:  # a regular file takes it in one call; loop in case a signal cut it short
                pending = pending[os.write(fd, pending):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if new_file:  # make the new directory entry durable too
            dir_fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self._records[int(idx)] = {"problem_sha256": problem_sha256, "result": json.loads(canonical_json(dict(result)))}

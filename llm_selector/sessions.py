"""Per-session LLM state on the selector: a loseable cache, bounded by count, idle time and KV memory."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from typing import Iterator

from s2t.runtime import Engine, KVCache


@dataclasses.dataclass(eq=False)
class Session:
    id: str
    cache: KVCache
    # Token ids whose keys/values the cache holds (len(tokens) == cache.length).
    tokens: list[int] = dataclasses.field(default_factory=list)
    # The step the session expects next; requests are applied in step order.
    next_step: int = 0
    # Replies (or errors) of recent steps, for idempotent retries.
    replies: collections.OrderedDict = dataclasses.field(default_factory=collections.OrderedDict)
    busy: bool = False
    last_used: float = dataclasses.field(default_factory=time.monotonic)
    changed: asyncio.Condition = dataclasses.field(default_factory=asyncio.Condition)

    def crop(self, length: int) -> None:
        del self.tokens[length:]
        self.cache.crop(length)

    def remember(self, step: int, reply, keep: int) -> None:
        self.replies[step] = reply
        while len(self.replies) > keep:
            self.replies.popitem(last=False)


class SessionStore:
    """Sessions in LRU order. Eviction drops idle sessions past the TTL, then the least recently used ones
    while the count or the KV memory is over budget; a busy session is never evicted."""

    def __init__(self, engine: Engine, max_sessions: int, idle_ttl_s: float, kv_budget_bytes: int):
        self.engine = engine
        self.max_sessions = max_sessions
        self.idle_ttl_s = idle_ttl_s
        self.kv_budget_bytes = kv_budget_bytes
        self._sessions: collections.OrderedDict[str, Session] = collections.OrderedDict()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def __iter__(self) -> Iterator[Session]:
        """The sessions, least recently used first (a snapshot: the caller may remove sessions meanwhile)."""
        return iter(list(self._sessions.values()))

    def get(self, session_id: str) -> Session | None:
        s = self._sessions.get(session_id)
        if s is not None:
            s.last_used = time.monotonic()
            self._sessions.move_to_end(session_id)
        return s

    def create(self, session_id: str) -> Session:
        s = Session(id=session_id, cache=self.engine.new_cache())
        self._sessions[session_id] = s
        self.evict()
        return s

    def reset(self, session: Session) -> None:
        """Drop a session's state for a full-context restart (the Session object and its ordering stay)."""
        session.crop(0)
        session.cache = None  # its KV pool slot, if it had one, is free for the new cache (PooledKVCache)
        session.cache = self.engine.new_cache()

    def remove(self, session_id: str) -> bool:
        return self._sessions.pop(session_id, None) is not None

    def kv_bytes(self) -> int:
        return sum(s.cache.nbytes for s in self._sessions.values())

    def evict(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for sid, s in list(self._sessions.items()):
            if not s.busy and now - s.last_used > self.idle_ttl_s:
                del self._sessions[sid]
                self.evictions += 1
        total = self.kv_bytes()
        for sid, s in list(self._sessions.items()):  # oldest first
            if len(self._sessions) <= self.max_sessions and total <= self.kv_budget_bytes:
                break
            if s.busy or len(self._sessions) == 1:
                continue
            total -= s.cache.nbytes
            del self._sessions[sid]
            self.evictions += 1

"""S2T-Local adapters on a serving worker: load the newest from a watched directory, swap without a restart.

A request takes the adapter that is current when it starts and keeps it to its end (its LocalReranker holds
that version); a newer adapter only serves requests that start after it loaded. An old version leaves the
model when no request holds it any more. An adapter whose base-model hash or score bins do not match the
worker's SLM is refused with a message naming both (s2t.rerank.AdapterMismatch), and the current one stays.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from pathlib import Path

from s2t.runtime import Engine

log = logging.getLogger("s2t.worker.adapters")

MANIFEST = "s2t-adapter.json"


def newest_adapter(directory: Path) -> Path | None:
    """`directory` itself if it is an adapter, else its newest adapter subdirectory (by manifest time)."""
    directory = Path(directory)
    if (directory / MANIFEST).is_file():
        return directory
    found = [d for d in directory.iterdir() if (d / MANIFEST).is_file()] if directory.is_dir() else []
    return max(found, key=lambda d: ((d / MANIFEST).stat().st_mtime, d.name), default=None)


class AdapterStore:
    def __init__(self, engine: Engine, directory: Path | None, poll_s: float = 5.0):
        self.engine = engine
        self.directory = Path(directory) if directory else None
        self.poll_s = poll_s
        self._current = None  # s2t.rerank.Reranker
        self._installed: dict[str, object] = {}  # version -> Reranker installed on the model
        self._holders: collections.Counter[str] = collections.Counter()  # version -> requests using it
        self._seen: tuple | None = None  # (path, manifest mtime) last tried, loaded or refused
        self.problem = "worker.adapter_dir is not set" if directory is None else "no adapter loaded yet"
        self.loads = 0
        self._task: asyncio.Task | None = None

    def current(self):
        return self._current

    async def start(self) -> None:
        if self.directory is None:
            return
        await self.check()
        self._task = asyncio.create_task(self._watch(), name="s2t-adapter-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.check()
            except Exception:  # a broken adapter must not stop the watch
                log.exception("checking %s for adapters failed", self.directory)

    async def check(self) -> bool:
        """Load the newest adapter under the directory if it is not the one tried last; True if one loaded."""
        path = newest_adapter(self.directory)
        if path is None:
            if self._current is None:
                self.problem = f"no adapter ({MANIFEST}) under {self.directory}"
            return False
        seen = (str(path), (path / MANIFEST).stat().st_mtime)
        if seen == self._seen:
            return False
        self._seen = seen
        try:
            await self.load(path)
        except Exception as e:
            self.problem = f"adapter {path} refused: {e}"
            log.error("%s; keeping %s", self.problem, self._current.version if self._current else "no adapter")
            return False
        return True

    async def load(self, path: Path):
        """Load and install one adapter directory, then make it current for new requests."""
        from s2t.rerank import AdapterMismatch, install, load_adapter, reserved_bin_ids

        loop = asyncio.get_running_loop()
        lm = self.engine.lm
        reranker = await loop.run_in_executor(None, load_adapter, Path(path), lm.weights_sha256)
        # Its score bins must be this model's reserved rows (rows no token is assigned to).
        expected = reserved_bin_ids(lm.tokenizer, lm.vocab_size, len(reranker.bin_ids))
        if reranker.bin_ids != expected:
            raise AdapterMismatch(f"adapter {reranker.version} at {path} scores with bins {reranker.bin_ids}, but "
                                  f"{lm.name}'s reserved bin rows are {expected}")
        if reranker.version in self._installed:  # the same version again (e.g. re-exported): nothing to do
            self._current = self._installed[reranker.version]
            return self._current
        # Installing changes the model's modules: do it on the compute thread, between forwards.
        await loop.run_in_executor(self.engine.executor, install, lm.model, reranker)
        # Below its first adapted layer the scorer is the base SLM: tap the drafting caches there, so that
        # local scoring starts at that layer instead of recomputing the ones beneath (Engine.score_trees).
        tap, first = self.engine.tap_layer, reranker.first_layer
        if self.engine.can_split and first > 0 and (tap is None or first < tap):
            await loop.run_in_executor(self.engine.executor, self.engine.set_tap, first)
        self._installed[reranker.version] = reranker
        previous, self._current = self._current, reranker
        self.loads += 1
        self.problem = ""
        log.warning("S2T-Local adapter %s loaded from %s%s", reranker.version, path,
                    f" (replacing {previous.version})" if previous else "")
        await self._retire()
        return reranker

    def hold(self, version: str) -> None:
        self._holders[version] += 1

    def release(self, version: str) -> None:
        self._holders[version] -= 1
        if self._holders[version] <= 0:
            del self._holders[version]
            if self._current is None or version != self._current.version:
                asyncio.get_running_loop().create_task(self._retire())

    async def _retire(self) -> None:
        """Uninstall versions that are neither current nor held by a request."""
        from s2t.rerank import uninstall

        for version in [v for v in self._installed if v != getattr(self._current, "version", None)
                        and self._holders[v] <= 0]:
            del self._installed[version]
            await asyncio.get_running_loop().run_in_executor(self.engine.executor, uninstall, self.engine.lm.model,
                                                             version)

    def describe(self) -> dict:
        cur = self._current
        return {"current": cur.version if cur else None, "path": str(cur.path) if cur else None,
                "installed": sorted(self._installed), "problem": self.problem,
                "manifest": json.loads(json.dumps(cur.manifest)) if cur else None}

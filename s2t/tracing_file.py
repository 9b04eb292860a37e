"""The `file` span exporter (`tracing.exporter: file`): spans as JSON lines, for operators without a collector.

One line per finished span: the SDK's own JSON of it (`ReadableSpan.to_json`: name, context with trace_id and
span_id, kind, parent_id, start and end times, status, attributes, events, links, resource), compact. `jq`
reads it as it is, and so does tests/test_tracing.py to follow a trace across processes. Imported only when
this exporter is chosen (s2t/tracing.py keeps OpenTelemetry out of a process that does not trace).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

log = logging.getLogger("s2t.tracing")


class JsonLinesSpanExporter(SpanExporter):
    """Appends spans to `path` (its directory is made if missing), one compact JSON object per line.

    Each batch goes out in write(2) calls on an O_APPEND descriptor, unbuffered: several processes (the
    replicas of one host, a worker beside its selector) can share one file without their lines interleaving,
    and nothing is held in a buffer a crash would lose."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()  # the batch processor's thread exports; shutdown may come from another

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        data = "".join(span.to_json(indent=None) + "\n" for span in spans).encode()
        with self._lock:
            if self._fd is None:
                return SpanExportResult.FAILURE  # shut down
            try:
                view = memoryview(data)
                while view:  # a regular file takes it in one write unless the disk fills up
                    view = view[os.write(self._fd, view):]
            except OSError as e:
                log.warning("tracing: cannot append spans to %s (%s)", self.path, e.strerror)
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # every export is written through

"""Where a verdict's time goes: the Select calls of a traced run, by how many positions they scored.

With `tracing.exporter: file` on both processes (one JSON-lines file, s2t/tracing_file.py), every Select call
has a client span in the worker and a server span in the selector, joined by the client span's id. This reads
such a file and prints, per bucket of scored positions: the calls, the selector's time per call (its server
span: admission, the forward, the reply) and what the worker saw on top of it (the gRPC round trip). Only
calls whose both spans are in the file count; a session's prefill (0 positions) is a bucket of its own.

    taskset -c 1 s2t --set tracing.enabled=true --set tracing.exporter=file --set tracing.file_path=/tmp/s.jsonl \\
        --set selector.runtime.threads=1 serve-selector --no-ray &
    taskset -c 0 s2t --set tracing.enabled=true ... --set worker.runtime.threads=1 serve-worker &
    s2t generate --mode s2t "..."          # the requests to look at
    python bench/trace_selects.py /tmp/s.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

SELECT = "/s2t.v1.SelectorService/Select"
BUCKETS = ((0, 0), (1, 1), (2, 3), (4, 5), (6, 8), (9, 12), (13, 16), (17, 32), (33, 10**9))


def _seconds(stamp: str) -> float:
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def select_calls(lines) -> list[dict]:
    """One record per Select call with both spans: positions, server seconds, client seconds."""
    client, server = {}, {}
    for line in lines:
        if not line.strip():
            continue
        span = json.loads(line)
        if span.get("name") != SELECT:
            continue
        if span.get("kind") == "SpanKind.CLIENT":
            client[span["context"]["span_id"]] = span
        elif span.get("kind") == "SpanKind.SERVER" and span.get("parent_id"):
            server[span["parent_id"]] = span
    calls = []
    for span_id, c in client.items():
        s = server.get(span_id)
        if s is None:
            continue
        calls.append({"positions": int(c["attributes"].get("s2t.positions", 0)),
                      "client_s": _seconds(c["end_time"]) - _seconds(c["start_time"]),
                      "server_s": _seconds(s["end_time"]) - _seconds(s["start_time"])})
    return calls


def by_positions(calls: list[dict]) -> list[dict]:
    rows = []
    for lo, hi in BUCKETS:
        group = [c for c in calls if lo <= c["positions"] <= hi]
        if not group:
            continue
        label = str(lo) if lo == hi else (f"{lo}+" if hi >= 10**9 else f"{lo}–{hi}")
        rows.append({"positions": label, "calls": len(group),
                     "server_ms": 1000 * statistics.median(c["server_s"] for c in group),
                     "round_trip_ms": 1000 * statistics.median(c["client_s"] - c["server_s"] for c in group)})
    return rows


def markdown(rows: list[dict], path: str) -> str:
    out = [f"Select calls in `{path}` (medians per bucket)", "",
           "| positions scored | calls | selector's time per call, ms | the worker's round trip on top, ms |",
           "|---|---|---|---|"]
    out += [f"| {r['positions']} | {r['calls']} | {r['server_ms']:.0f} | {r['round_trip_ms']:.1f} |" for r in rows]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spans", type=Path, help="the JSON-lines file both processes traced to")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    with args.spans.open() as f:
        rows = by_positions(select_calls(f))
    if not rows:
        sys.exit(f"no Select call with both spans in {args.spans}: was tracing on in both processes?")
    print(markdown(rows, str(args.spans)))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()

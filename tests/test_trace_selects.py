"""bench/trace_selects.py: Select calls joined across the worker's and the selector's spans, by positions scored."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import trace_selects  # noqa: E402


def span(kind, span_id, parent, start, end, positions=None, name=trace_selects.SELECT):
    attributes = {} if positions is None else {"s2t.positions": positions}
    return json.dumps({"name": name, "kind": kind, "context": {"span_id": span_id}, "parent_id": parent,
                       "start_time": f"2026-12-04T03:00:{start:09.6f}Z", "end_time": f"2026-12-04T03:00:{end:09.6f}Z",
                       "attributes": attributes})


def test_calls_pair_by_the_client_span_and_bucket_by_positions():
    lines = [span("SpanKind.CLIENT", "c1", None, 1.0, 1.160, 4), span("SpanKind.SERVER", "s1", "c1", 1.002, 1.152),
             span("SpanKind.CLIENT", "c2", None, 2.0, 2.120, 1), span("SpanKind.SERVER", "s2", "c2", 2.003, 2.118),
             span("SpanKind.CLIENT", "c3", None, 3.0, 3.2, 5),  # its server span is not in the file: not counted
             span("SpanKind.CLIENT", "c4", None, 4.0, 4.1, 0, name="/s2t.v1.SelectorService/CloseSession"), ""]
    calls = trace_selects.select_calls(lines)
    assert sorted(c["positions"] for c in calls) == [1, 4]
    rows = trace_selects.by_positions(calls)
    assert [(r["positions"], r["calls"]) for r in rows] == [("1", 1), ("4–5", 1)]
    ms = pytest.approx  # the stamps are microseconds: a hundredth of a millisecond is exact enough
    assert rows[0]["server_ms"] == ms(115, abs=0.01) and rows[0]["round_trip_ms"] == ms(5, abs=0.01)
    assert rows[1]["server_ms"] == ms(150, abs=0.01) and rows[1]["round_trip_ms"] == ms(10, abs=0.01)
    assert "| 4–5 | 1 | 150 | 10.0 |" in trace_selects.markdown(rows, "f")


def test_a_file_without_both_spans_is_refused(tmp_path):
    path = tmp_path / "spans.jsonl"
    path.write_text(span("SpanKind.CLIENT", "c1", None, 1.0, 1.1, 4) + "\n")
    with pytest.raises(SystemExit):
        trace_selects.main([str(path)])

"""bench/format_agreement.py (issue #14): teacher-forced top-1 agreement and KL of weight formats, on a tiny
model: a format against itself changes nothing, a lossy one is measured, and cached answers are read."""

import json
import sys
from pathlib import Path

from tiny import make_tiny_model_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import format_agreement  # noqa: E402


def test_a_format_against_itself_and_against_a_lossy_one(tmp_path):
    model = make_tiny_model_dir(tmp_path / "tiny", seed=3)
    out = tmp_path / "results"
    format_agreement.main(["--models", str(model), "--formats", "fp32,fp32,bf16", "--problems", "2",
                           "--max-answer-tokens", "24", "--threads", "1", "--results-dir", str(out),
                           "--name", "t"])
    payload = json.loads((out / "t.json").read_text())
    same, lossy = payload["rows"]
    assert (same["format"], lossy["format"]) == ("fp32", "bf16") and same["reference"] == "fp32"
    assert same["positions"] == lossy["positions"] > 2
    assert same["top1_changed"] == 0 and abs(same["kl_nats_per_position"]) < 1e-9
    assert lossy["kl_nats_per_position"] > 0
    lo, hi = lossy["top1_changed_ci95"]
    assert lo <= lossy["top1_changed_rate"] <= hi
    assert "| `fp32` | `bf16` | 2 |" in (out / "t.md").read_text()


def test_answers_come_from_a_cache_file_where_it_has_them(tmp_path):
    cache = tmp_path / "greedy.jsonl"
    cache.write_text(json.dumps({"cache_format": 1}) + "\n"
                     + json.dumps({"idx": 1, "result": {"text": "cached answer"}}) + "\n")
    items = format_agreement.answers(2, cache)
    assert [p["idx"] for p, _ in items] == [0, 1]
    assert items[1][1] == "cached answer" and items[0][1] == items[0][0]["solution"]  # gold where not cached

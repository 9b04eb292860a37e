"""bench/distill_fit_check.py: the report of finished fit checks (the runs themselves need real logs)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import distill_fit_check  # noqa: E402


def _summary(lr: float, after: float, **config) -> dict:
    return {"steps": 12, "wall_s": 30.0, "config": dict({"epochs": 6, "lr": lr, "lora_layers": 6, "rank": 16}, **config),
            "metrics": {"groups": 40, "agreement_at_1": after, "slm_top1_agreement": 0.45},
            "curves": {"bin_peak": [0.07, 0.2]},
            "eval_curve": [{"step": 0, "agreement_at_1": 0.45}, {"step": 6, "agreement_at_1": after + 0.05},
                           {"step": 12, "agreement_at_1": after}]}


def test_report_tabulates_before_after_and_best(tmp_path, monkeypatch):
    monkeypatch.setattr(distill_fit_check, "RESULTS", tmp_path / "results")
    for name, summary in (("saturated", _summary(1e-3, 0.5)),  # a summary from before the bin settings existed
                          ("noised", _summary(3e-4, 0.6, bin_lr=1e-5, bin_init_std=0.003))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
    js, md = distill_fit_check.report([str(tmp_path / "saturated"), str(tmp_path / "noised")], "fit", "cmd")
    rows = json.loads(js.read_text())["rows"]
    assert [(r["fit_before"], r["fit_after"], r["fit_best"]) for r in rows] == [(0.45, 0.5, 0.55), (0.45, 0.6, 0.65)]
    assert rows[0]["bin_lr"] is None and rows[0]["bin_init_std"] == 0.0 and rows[1]["bin_peak_last_step"] == 0.2
    text = md.read_text()
    assert "| `saturated` | 40 | 6 (12) | 0.001 | 0.001 | 0 | 0.450 | 0.450 | 0.500 | 0.550 | 30 |" in text
    assert "| `noised` | 40 | 6 (12) | 0.0003 | 1e-05 | 0.003 |" in text and "`cmd`" in text

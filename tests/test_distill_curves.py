"""bench/distill_curves.py: the training-curve report of an `s2t distill` summary."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import distill_curves  # noqa: E402


def _summary() -> dict:
    steps = list(range(1, 7))
    return {"adapter": "/x/adapter", "steps": 6, "total_steps": 6, "stopped": "done", "wall_s": 12.0,
            "peak_rss_mb": 2048.0, "prior_weight": 0.9, "config": {"epochs": 2, "lr": 1e-4, "rank": 16},
            "curves": {"step": steps, "hit1": [0.0, 0.5, 0.5, 1.0, 1.0, 1.0],
                       "selection": [3.0, 2.0, 2.0, 1.0, 1.0, 1.0], "teacher_kl": [1.0] * 6},
            "eval_curve": [{"step": 0, "agreement_at_1": 0.5, "spearman": 0.1},
                           {"step": 3, "agreement_at_1": 0.6, "spearman": None},
                           {"step": 6, "agreement_at_1": 0.7, "spearman": 0.3}],
            "metrics": {"groups": 10, "agreement_at_1": 0.7, "spearman": 0.3, "slm_top1_agreement": 0.55}}


def test_moving_average_is_trailing_and_starts_at_the_first_step():
    assert distill_curves.moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert distill_curves.moving_average([], 3) == []


def test_epoch_means_and_held_out_points():
    summary = _summary()
    assert distill_curves.epoch_means(summary) == [
        {"epoch": 1, "steps": 3, "train_hit1": 1 / 3, "train_selection_loss": 7 / 3, "bin_peak": None},
        {"epoch": 2, "steps": 3, "train_hit1": 1.0, "train_selection_loss": 1.0, "bin_peak": None}]
    assert [p["step"] for p in distill_curves.held_out_points(summary)] == [0, 3, 6]
    md = distill_curves.markdown(summary, "s2t distill --eval-every 3")
    assert "| 3 | 0.600 | - |" in md and "0.550" in md and "`s2t distill --eval-every 3`" in md
    assert "LoRA rank 16 on all layers" in md
    # a newer summary has the bin-peak curve: per epoch, where a saturated bin softmax would show
    summary["curves"]["bin_peak"] = [0.0625, 0.1, 0.1, 0.9, 1.0, 0.98]
    assert [r["bin_peak"] for r in distill_curves.epoch_means(summary)] == pytest.approx([0.0875, 0.96])
    assert "| 2 | 3 | 1.000 | 1.0000 | 0.960 |" in distill_curves.markdown(summary, "x")


def test_the_label_says_what_was_trained():
    assert distill_curves.adapter_label({"rank": 64, "lora_layers": 6}) == "LoRA rank 64 on top 6 layers"
    assert distill_curves.adapter_label({"rank": 16, "lora_layers": 6, "lora_trainable": False}).startswith(
        "LoRA frozen at zero (top 6 layers)")
    assert distill_curves.adapter_label({"rank": 16, "lora_layers": 6, "lr": 3e-4, "bin_lr": 1e-5, "bin_init_std": 0.003}
                                        ) == "LoRA rank 16 on top 6 layers, bins lr 1e-05 init noise 0.003"


def test_plot_writes_a_png(tmp_path):
    out = distill_curves.plot(_summary(), tmp_path / "c.png", window=2)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

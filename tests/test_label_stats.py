"""bench/label_stats.py: disagreement rates and coverage of the KL- and entropy-ranked position sets."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import label_stats  # noqa: E402
from distill.groups import Group  # noqa: E402


def _group(session: str, kl: float, slm_probs: list[float], target: int) -> Group:
    k = len(slm_probs)
    return Group(session_id=session, step=0, position=1, context=[], candidate_ids=list(range(k)), slm_probs=slm_probs,
                 teacher_probs=[1.0 / k] * k, target=target, llm_top1=target, llm_top1_prob=0.5,
                 llm_top1_in_candidates=True, diverged=False, after_divergence=False, trigger_value=kl,
                 in_session_sequence=True)


def test_rates_coverage_and_overlap():
    groups = [_group("a", 5.0, [0.98, 0.01, 0.01], 1),  # high KL, confident SLM, LLM disagrees
              _group("a", 0.1, [0.4, 0.3, 0.3], 0),  # unsure SLM, LLM agrees
              _group("b", 0.2, [0.5, 0.4, 0.1], 2),  # somewhat unsure, LLM disagrees
              _group("b", 0.0, [0.9, 0.05, 0.05], 0)]
    stats = label_stats.label_stats(groups, taus=(0.25, 0.5))
    assert stats["positions"] == 4 and stats["sessions"] == 2
    assert stats["llm_disagrees_all"] == pytest.approx(0.5)
    rows = {(r["by"], r["tau"]): r for r in stats["by_tau"]}
    assert rows["kl", 0.25]["positions"] == 1 and rows["kl", 0.25]["llm_disagrees"] == 1.0
    assert rows["kl", 0.25]["captures"] == pytest.approx(0.5)
    assert rows["entropy", 0.25]["llm_disagrees"] == 0.0  # the unsure position is one the LLM agrees with
    assert rows["kl", 0.25]["overlap_with_other"] == 0.0
    # top half: kl picks the first and third, entropy the second and third
    assert rows["kl", 0.5]["captures"] == 1.0 and rows["entropy", 0.5]["captures"] == pytest.approx(0.5)
    assert rows["entropy", 0.5]["overlap_with_other"] == pytest.approx(0.5)
    assert "| kl | 25% | 1 | 100.0% |" in label_stats.markdown(stats, "cmd")
    # the ceiling: at the first position the LLM's choice is log(0.98 / 0.01) = 4.6 nats below the SLM's top-1,
    # so bins in [0, 1] can lift it only when w < 1 / 4.6; at the third it is log(0.5 / 0.1) = 1.6 nats below
    assert rows["kl", 0.25]["ceiling_at_prior_weight"] == {"1": 0.0, "0.65": 0.0, "0.4": 0.0, "0.2": 1.0}
    assert rows["kl", 0.5]["ceiling_at_prior_weight"]["0.4"] == pytest.approx(0.5)
    # entropy's top half: the second position (the SLM's top-1 is the LLM's choice) and the third
    assert rows["entropy", 0.5]["ceiling_at_prior_weight"]["0.65"] == pytest.approx(0.5)  # 0.65 x 1.61 > 1
    assert rows["entropy", 0.5]["ceiling_at_prior_weight"]["0.4"] == 1.0
    # where the disagreements go: kl's top half holds picks of the 2nd candidate (index 1) and the 3rd (index 2)
    assert rows["kl", 0.5]["disagreements_within_next"] == {"1": 0.5, "2": 1.0, "3": 1.0}
    assert rows["entropy", 0.25]["disagreements_within_next"] == {"1": 0.0, "2": 0.0, "3": 0.0}  # none there


def test_which_candidate_the_llm_picks_by_the_slm_share():
    groups = [_group("a", 0.0, [0.5, 0.45, 0.05], 1),  # the second holds 90 % of the rest: picked
              _group("a", 0.0, [0.5, 0.4, 0.1], 2),  # 80 %: the third picked
              _group("b", 0.0, [0.5, 0.42, 0.08], 1),  # 84 %: picked
              _group("b", 0.0, [0.9, 0.05, 0.05], 0)]  # no disagreement: not counted
    cal = label_stats.label_stats(groups, taus=(0.5,))["pick_calibration"]
    assert cal["picks"] == 3
    assert [(b["share_from"], b["picks"], b["picked_second"]) for b in cal["second_by_share"]] == [
        (0.8, 2, pytest.approx(0.5)), (0.9, 1, 1.0)]
    assert cal["loglik_per_pick"]["slm_share"] == pytest.approx(math.log(0.9 * 0.2 * 0.84) / 3)
    assert cal["loglik_per_pick"]["rank_share"] == pytest.approx(math.log((2 / 3) ** 2 * (1 / 3)) / 3)
    assert "| 0.8–0.9 | 2 | 50.0% |" in label_stats.markdown(label_stats.label_stats(groups, taus=(0.5,)), "cmd")


def test_no_positions_is_an_error():
    with pytest.raises(ValueError, match="no logged positions"):
        label_stats.label_stats([])

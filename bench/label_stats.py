"""What the selection logs say about where S2T-Local can help (issue #13: "if accuracy does not move, report
what the logs show").

    python bench/label_stats.py LOG_DIR [--name selection-logs]

Reads every closed segment under LOG_DIR (a label-only collection labels every position, so the logs hold
the LLM's verdict at all of them) and, for the two ways of choosing positions, ranks them and reports at
each share tau:
  - `kl`: the selector's KL statistic, which the paper labels training groups by (needs the LLM);
  - `entropy`: the entropy of the SLM's logged candidate probabilities, which ranks positions as the
    worker's LLM-free trigger does, i.e. where `s2t-local` re-ranks at serving time;
how often the LLM's choice among the candidates differs from the SLM's top-1 there (the share a perfect
re-ranker would flip), what share of all such disagreements the set captures, and how much the two sets
overlap. Writes bench/results/<name>.{json,md}.

And, per set, the ceiling of S2T-Local's score family there: with score = expected bin value (in [0, 1]) +
w · log p_SLM (s2t.rerank.with_prior), the LLM's choice c can be ranked first only where
w · (log p_SLM(the SLM's top-1) - log p_SLM(c)) < 1 (s2t.rerank.contenders, the worker's pruning rule), so
the share of positions where that holds (or where the SLM's top-1 already is the LLM's choice) bounds
agreement@1 for a given learned w, whatever the bins learn.

And, per set, where the LLM's choice falls when it is not the SLM's top-1: the share of those disagreements
that pick one of the SLM's next 1, 2 or 3 candidates: how much a worker that drafted ahead on the SLM's next
candidates at that position would have prepared (issue #14's split shape; see the README).

And, over every logged disagreement, how well the SLM's own probabilities predict which candidate the LLM
picks: per tenth of the second candidate's share of the other candidates' probability (q), how often the pick is
the second; and the mean log-likelihood per pick of q against one share per candidate rank (the rank's share of
all disagreements, whatever the probabilities, as the worker's DivergenceOdds.p_rank ranks its branches).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from distill.groups import LabelBy, candidate_entropy, read_groups, top_positions  # noqa: E402
from s2t.rerank import contenders  # noqa: E402

TAUS = (0.01, 0.05, 0.10, 0.20)
PRIOR_WEIGHTS = (1.0, 0.65, 0.4, 0.2)
BRANCHES = (1, 2, 3)
BINS = 10  # tenths of the second candidate's share q (pick_calibration)


def reachable(group, prior_weight: float) -> bool:
    """Whether some bin scores in [0, 1] rank the LLM's choice first under score = bins + w log p_SLM: it is
    one of the candidates the serving scorer would score (no probabilities: no prior, the bins alone decide)."""
    return not group.slm_probs or group.target in contenders(group.slm_probs, prior_weight)


def candidate_share(probs: list[float], rank: int) -> float:
    """q: the SLM's probability of its candidate of `rank` (1 = its second) over that of all its candidates but the
    first (`probs`: the candidates' probabilities, best first)."""
    rest = sum(probs[1:])
    return probs[rank] / rest if rest > 0 else 1.0 / max(len(probs) - 1, 1)


def pick_calibration(groups: list) -> dict:
    """Where the LLM's choice is not the SLM's top-1: per tenth of the second candidate's share q, the picks,
    the share that picked the second and the mean q; and the log-likelihood per pick of q and of rank shares."""
    picks = [g for g in groups if g.target != 0 and len(g.slm_probs) > 1]
    if not picks:
        return {"picks": 0}
    ranks = collections.Counter(g.target for g in picks)
    bins = [[0, 0, 0.0] for _ in range(BINS)]  # [picks, picked the second, sum of q]
    ll_share = ll_rank = 0.0
    for g in picks:
        q = candidate_share(g.slm_probs, 1)
        cell = bins[min(int(q * BINS), BINS - 1)]
        cell[0] += 1
        cell[1] += g.target == 1
        cell[2] += q
        ll_share += math.log(max(candidate_share(g.slm_probs, g.target), 1e-9))
        ll_rank += math.log(ranks[g.target] / len(picks))
    return {"picks": len(picks),
            "second_by_share": [{"share_from": b / BINS, "picks": n, "picked_second": k / n,
                                 "mean_share": t / n} for b, (n, k, t) in enumerate(bins) if n],
            "loglik_per_pick": {"slm_share": ll_share / len(picks), "rank_share": ll_rank / len(picks)}}


def label_stats(groups: list, taus=TAUS) -> dict:
    """The statistics of the module docstring for `groups` (distill.groups.Group, every logged position)."""
    n = len(groups)
    if not n:
        raise ValueError("no logged positions")
    disagree = [g.target != 0 for g in groups]
    total_disagreements = sum(disagree)
    rows = []
    for tau in taus:
        chosen = {}
        for by in LabelBy:
            picked = top_positions(groups, tau, by)
            ids = {id(g) for g in picked}
            chosen[by] = ids
            hits = sum(g.target != 0 for g in picked)
            covered = {f"{b}": sum(0 < g.target <= b for g in picked) / hits if hits else 0.0 for b in BRANCHES}
            rows.append({"by": by.value, "tau": tau, "positions": len(picked),
                         "llm_disagrees": hits / len(picked) if picked else 0.0,
                         "captures": hits / total_disagreements if total_disagreements else 0.0,
                         "ceiling_at_prior_weight": {f"{w:g}": sum(reachable(g, w) for g in picked) / len(picked)
                                                     if picked else 0.0 for w in PRIOR_WEIGHTS},
                         "disagreements_within_next": covered})
        overlap = len(chosen[LabelBy.KL] & chosen[LabelBy.ENTROPY]) / max(1, len(chosen[LabelBy.KL]))
        for r in rows[-2:]:
            r["overlap_with_other"] = overlap
    targets = collections.Counter(g.target for g in groups)
    return {
        "positions": n,
        "sessions": len({g.session_id for g in groups}),
        "llm_disagrees_all": total_disagreements / n,
        "llm_top1_in_candidates": sum(g.llm_top1_in_candidates for g in groups) / n,
        "target_index": {str(k): targets[k] / n for k in sorted(targets)[:8]},
        "mean_candidate_entropy": sum(candidate_entropy(g) for g in groups) / n,
        "by_tau": rows,
        "pick_calibration": pick_calibration(groups),
    }


def markdown(stats: dict, command: str) -> str:
    lines = [f"# selection-log label statistics\n\nCommand: `{command}`  \n",
             f"{stats['positions']:,} logged positions of {stats['sessions']} sessions; the LLM's choice among the "
             f"candidates differs from the SLM's top-1 at {stats['llm_disagrees_all']:.1%} of them; the LLM's own "
             f"top-1 is among the candidates at {stats['llm_top1_in_candidates']:.2%}.\n\n",
             "| positions ranked by | top tau | positions | LLM disagrees with the SLM's top-1 | share of all "
             "disagreements | overlap of the kl and entropy sets | "
             + " | ".join(f"agreement@1 ceiling, w = {w:g}" for w in PRIOR_WEIGHTS) + " | "
             + "LLM's pick among the next 1 / 2 / 3 candidates |\n"
             + "|---" * (7 + len(PRIOR_WEIGHTS)) + "|\n"]
    for r in stats["by_tau"]:
        lines.append(f"| {r['by']} | {r['tau']:.0%} | {r['positions']:,} | {r['llm_disagrees']:.1%} | "
                     f"{r['captures']:.1%} | {r['overlap_with_other']:.1%} | "
                     + " | ".join(f"{r['ceiling_at_prior_weight'][f'{w:g}']:.1%}" for w in PRIOR_WEIGHTS) + " | "
                     + " / ".join(f"{r['disagreements_within_next'][f'{b}']:.1%}" for b in BRANCHES) + " |\n")
    lines.append("\nCeiling: the share of the set's positions where bin scores in [0, 1] can rank the LLM's choice "
                 "first under score = bins + w · log p_SLM (S2T-Local's score with the learned SLM-prior weight w).\n")
    lines.append("\nNext candidates: of the set's positions where the LLM's choice is not the SLM's top-1, the share "
                 "where it is the SLM's 2nd (1), 2nd or 3rd (2), 2nd to 4th (3) candidate.\n")
    lines.append("\nThe LLM's choice by candidate index (share of all positions): "
                 + ", ".join(f"{k}: {v:.2%}" for k, v in stats["target_index"].items()) + ".\n")
    cal = stats["pick_calibration"]
    if cal["picks"]:
        ll = cal["loglik_per_pick"]
        lines.append(f"\nWhich candidate, over the {cal['picks']:,} disagreements: by the second candidate's share q "
                     "of the other candidates' SLM probability, how often the LLM picked the second. Log-likelihood "
                     f"per pick: {ll['slm_share']:.3f} nats predicting each candidate by its share, {ll['rank_share']:.3f} "
                     "by its rank's share of all disagreements.\n\n| q | picks | picked the second | mean q |\n"
                     "|---|---|---|---|\n")
        for b in cal["second_by_share"]:
            lines.append(f"| {b['share_from']:.1f}–{b['share_from'] + 0.1:.1f} | {b['picks']:,} | "
                         f"{b['picked_second']:.1%} | {b['mean_share']:.3f} |\n")
    return "".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log_dir", type=Path)
    ap.add_argument("--name", default="selection-logs")
    args = ap.parse_args()
    groups = list(read_groups(args.log_dir, context_tail=0))
    stats = label_stats(groups)
    command = "python bench/label_stats.py " + " ".join(sys.argv[1:])
    payload = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
               "log_dir": str(args.log_dir), **stats}
    out = BENCH / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(payload, indent=1))
    (out / f"{args.name}.md").write_text(markdown(stats, command))
    print(markdown(stats, command))


if __name__ == "__main__":
    main()

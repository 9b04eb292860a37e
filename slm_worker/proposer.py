"""The drafting policy: how far the SLM drafts ahead of its verifier.

Drafting past a likely rejection is wasted work, and on shared cores it also slows the verification that
would reject it. So a sequence keeps drafting past unverified positions only while the estimated chance that
the verifier accepts all of them stays at or above `draft_confidence` (Sequence.unsure); that chance comes from
`DivergenceOdds`, learned from the verdicts.

When the selector runs on compute of its own, the worker's core idles while it waits, so drafting on costs
nothing there; what costs is the selector scoring drafts that a rejection throws away, which delays the
verdict the worker waits for. `draft_when_unsure` is that policy: the unsure block goes out at once, drafting
goes on, and the blocks after it are held back until its verdict (Sequence.holding).
"""

from __future__ import annotations

import collections

# P(a changed pick is the candidate of rank r), r = 1, 2, ...: the prior before a key's first verdicts. Where the
# selector's pick is not the SLM's top-1 it is the second 65 % of the time (bench/label_stats.py); the rest falls
# off with the rank (a guess the verdicts soon replace).
RANK_PRIOR = (0.65, 0.17, 0.08, 0.05, 0.03, 0.01, 0.01)


class DivergenceOdds:
    """How likely a verifier is to reject a drafted position, learned from its verdicts.

    The SLM's own top-1 probability predicts a rejection well (selection logs of the embedded pair, `always`
    trigger: 1.4 % of positions with top-1 >= 0.8 diverge, 44-62 % of those below 0.6), but how often a
    disagreement becomes a divergence depends on the verifier, the trigger and its rate. So the worker counts,
    per such key and per tenth of top-1 probability, the checked positions it saw accepted and diverged,
    starting from the prior P(diverge) = 1 - top-1 worth `prior_weight` observations. It also counts which
    candidate the verifier picked where it diverged (p_rank), for the branches (Sequence.branch_rows).
    """

    BINS = 10

    def __init__(self, prior_weight: float = 4.0):
        self.prior_weight = prior_weight
        self.counts: dict[tuple, list[list[int]]] = {}  # key -> per bin [diverged, seen]
        self.picks: dict[tuple, collections.Counter[int]] = {}  # key -> changed picks per candidate rank

    def _bin(self, top1: float) -> int:
        return min(max(int(top1 * self.BINS), 0), self.BINS - 1)

    def p_diverge(self, key: tuple, top1: float) -> float:
        b = self._bin(top1)
        diverged, seen = self.counts[key][b] if key in self.counts else (0, 0)
        prior = 1.0 - (b + 0.5) / self.BINS
        return (diverged + self.prior_weight * prior) / (seen + self.prior_weight)

    def observe(self, key: tuple, top1: float, diverged: bool) -> None:
        cell = self.counts.setdefault(key, [[0, 0] for _ in range(self.BINS)])[self._bin(top1)]
        cell[0] += diverged
        cell[1] += 1

    def p_rank(self, key: tuple, rank: int) -> float:
        """P(a changed pick is the candidate of `rank` (1 = the SLM's second)), from RANK_PRIOR worth
        `prior_weight` picks and the picks seen under `key`."""
        picks = self.picks.get(key) or collections.Counter()
        prior = RANK_PRIOR[rank - 1] if rank <= len(RANK_PRIOR) else 0.0
        return (picks[rank] + self.prior_weight * prior) / (picks.total() + self.prior_weight)

    def observe_pick(self, key: tuple, rank: int) -> None:
        self.picks.setdefault(key, collections.Counter())[rank] += 1

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


class DivergenceOdds:
    """How likely a verifier is to reject a drafted position, learned from its verdicts.

    The SLM's own top-1 probability predicts a rejection well (selection logs of the embedded pair, `always`
    trigger: 1.4 % of positions with top-1 >= 0.8 diverge, 44-62 % of those below 0.6), but how often a
    disagreement becomes a divergence depends on the verifier, the trigger and its rate. So the worker counts,
    per such key and per tenth of top-1 probability, the checked positions it saw accepted and diverged,
    starting from the prior P(diverge) = 1 - top-1 worth `prior_weight` observations.

    It learns the same way which candidate the verifier picks where it diverges (p_pick), for the branches
    (Sequence.branch_rows). The prior there is the SLM's own share of the other candidates, q_r = p_r / (p_1 +
    ... + p_{K-1}): in the embedded pair's selection logs (3,556 picks other than the SLM's top-1, K = 8;
    bench/results/pick-shares-1205) the pick was the second candidate 45 / 32 / 39 / 64 / 70 / 77 / 89 / 99 % of
    the time where its q fell in 0.2-0.3 / 0.3-0.4 / ... / 0.9-1.0, and q predicted the picks better than one
    share per rank, whatever the probabilities (log-likelihood -0.81 against -0.99 nats per pick). Near q's
    middle it is off by up to 13 points, so the picks are counted per tenth of q, like top-1 above.
    """

    BINS = 10

    def __init__(self, prior_weight: float = 4.0):
        self.prior_weight = prior_weight
        self.counts: dict[tuple, list[list[int]]] = {}  # key -> per bin [diverged, seen]
        self.picks: dict[tuple, list[list[int]]] = {}  # key -> per tenth of q [picked, seen]

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

    @staticmethod
    def candidate_share(probs: list[float], rank: int) -> float:
        """q: the SLM's probability of its candidate of `rank` (1 = its second) over that of all its candidates but
        the first (`probs`: the K candidates' probabilities, best first)."""
        rest = sum(probs[1:])
        return probs[rank] / rest if rest > 0 else 1.0 / max(len(probs) - 1, 1)

    def p_pick(self, key: tuple, probs: list[float], rank: int) -> float:
        """P(the verifier's changed pick at a position is the candidate of `rank`), given the position's K
        candidate probabilities `probs`: q (candidate_share) worth `prior_weight` picks, and the picks seen under
        `key` at that tenth of q."""
        q = self.candidate_share(probs, rank)
        picked, seen = self.picks[key][self._bin(q)] if key in self.picks else (0, 0)
        return (picked + self.prior_weight * q) / (seen + self.prior_weight)

    def observe_pick(self, key: tuple, probs: list[float], index: int) -> None:
        """The verifier changed the pick at a position with K candidate probabilities `probs` to candidate
        `index`: every other candidate was one it might have picked."""
        cells = self.picks.setdefault(key, [[0, 0] for _ in range(self.BINS)])
        for rank in range(1, len(probs)):
            cell = cells[self._bin(self.candidate_share(probs, rank))]
            cell[0] += rank == index
            cell[1] += 1

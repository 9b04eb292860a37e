"""Statistics of the benchmark's accuracy rows: exact where the sizes allow, with the method named.

- `wilson`: the Wilson score interval of one accuracy (good coverage at small n and near 0 or 1, unlike
  the Wald interval p ± z·sqrt(p(1-p)/n)).
- `mcnemar`: two modes run on the same problems give paired outcomes. Only the discordant problems (one
  mode right, the other wrong) carry information about which is better, so the test is the exact binomial
  test on them (exact McNemar: under "equal accuracy" each discordant problem is a fair coin). The
  difference of the two accuracies comes with Tango's asymptotic score interval for paired proportions
  (Tango 1998, Stat. Med. 17:891; recommended for paired differences by Fagerland, Lydersen & Laake,
  "Statistical Analysis of Contingency Tables", ch. 8), the inversion of the score test used below.
- `within_margin`: "is A within m points of B?" is an equivalence question. It is answered yes only when
  the whole 95% interval of A-B lies inside ±m, which is the two one-sided score tests (TOST) at 2.5% each;
  no when the interval lies entirely outside; and plainly "undecided" otherwise, with a rough count of the
  problems that would be needed. The one-sided p-values come from the same score statistic as the
  interval, so the verdict and its p-values never disagree.

No scipy: binomial tails are sums of `math.comb` in integers; the normal CDF is `math.erfc`.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Sequence

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: two-sided 95% intervals


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of k successes in n trials; (0, 0) when n is 0.

    z defaults to 1.96 (not Z95) so that the accuracy intervals of earlier result files stay reproducible."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def exact_mcnemar_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: 2·P(X <= min(b, c)) for X ~ Binomial(b + c, 1/2), capped at 1.

    Computed in integers (sum of binomial coefficients over 2^n), so it is exact up to the final division."""
    if only_a < 0 or only_b < 0:
        raise ValueError(f"discordant counts must be >= 0, got {only_a} and {only_b}")
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2**n)


@dataclasses.dataclass(frozen=True)
class PairedCounts:
    """The paired 2x2 table of two modes on the same problems."""

    both: int  # both right
    only_a: int  # A right, B wrong (McNemar's b)
    only_b: int  # A wrong, B right (McNemar's c)
    neither: int

    @property
    def n(self) -> int:
        return self.both + self.only_a + self.only_b + self.neither

    @property
    def accuracy_a(self) -> float:
        return (self.both + self.only_a) / self.n if self.n else 0.0

    @property
    def accuracy_b(self) -> float:
        return (self.both + self.only_b) / self.n if self.n else 0.0

    @property
    def difference(self) -> float:
        """accuracy(A) - accuracy(B) = (b - c) / n."""
        return (self.only_a - self.only_b) / self.n if self.n else 0.0


def paired_counts(a: Sequence[bool], b: Sequence[bool]) -> PairedCounts:
    """Tabulate paired outcomes: a[i] and b[i] are the two modes' correctness on problem i."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need equal lengths, got {len(a)} and {len(b)}")
    pairs = [(bool(x), bool(y)) for x, y in zip(a, b)]
    return PairedCounts(both=pairs.count((True, True)), only_a=pairs.count((True, False)),
                        only_b=pairs.count((False, True)), neither=pairs.count((False, False)))


def tango_statistic(counts: PairedCounts, delta0: float) -> float:
    """Tango's score statistic for H0: accuracy(A) - accuracy(B) = delta0.

    T = (b - c - n·delta0) / sqrt(n·(2·q + delta0·(1 - delta0))), with q the maximum-likelihood estimate of
    P(A wrong, B right) under H0 (the root of a quadratic). T decreases in delta0; large T is evidence that
    the difference is above delta0."""
    b, c, n = counts.only_a, counts.only_b, counts.n
    if n == 0:
        raise ValueError("no paired outcomes")
    qa = 2.0 * n
    qb = -b - c + (2.0 * n - b + c) * delta0
    qc = -c * delta0 * (1.0 - delta0)
    q = (math.sqrt(max(0.0, qb * qb - 4.0 * qa * qc)) - qb) / (2.0 * qa)
    numerator = b - c - n * delta0
    variance = n * (2.0 * q + delta0 * (1.0 - delta0))
    if variance <= 0.0:  # only at delta0 = 0 with no discordant pairs: no evidence either way
        return 0.0 if numerator == 0 else math.copysign(math.inf, numerator)
    return numerator / math.sqrt(variance)


def tango_interval(counts: PairedCounts, z: float = Z95) -> tuple[float, float]:
    """Tango's score interval for accuracy(A) - accuracy(B): the delta0 whose two-sided test is not rejected.

    Each limit is found by bisection on the monotone statistic (to 1e-12), within [-1, 1]."""
    est = counts.difference

    def root(target: float) -> float:
        lo, hi = -1.0 + 1e-12, 1.0 - 1e-12
        if tango_statistic(counts, lo) <= target:
            return -1.0
        if tango_statistic(counts, hi) >= target:
            return 1.0
        for _ in range(200):
            mid = (lo + hi) / 2
            if tango_statistic(counts, mid) > target:
                lo = mid
            else:
                hi = mid
            if hi - lo < 1e-12:
                break
        return (lo + hi) / 2

    lower = -1.0 if est == -1.0 else root(z)
    upper = 1.0 if est == 1.0 else root(-z)
    return (lower, upper)


@dataclasses.dataclass(frozen=True)
class PairedComparison:
    """Mode A against mode B on the same n problems."""

    n: int
    both: int
    only_a: int  # problems A got right and B wrong
    only_b: int  # problems B got right and A wrong
    neither: int
    accuracy_a: float
    accuracy_b: float
    difference: float  # accuracy_a - accuracy_b
    difference_ci95: tuple[float, float]
    mcnemar_p: float  # exact two-sided McNemar: H0 "equal accuracy"
    ci_method: str = "tango-score"
    test_method: str = "exact-mcnemar"

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["difference_ci95"] = list(self.difference_ci95)
        return d


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> PairedComparison:
    """Compare two modes' paired outcomes: exact McNemar p-value and the difference with its 95% interval."""
    counts = paired_counts(a, b)
    if counts.n == 0:
        raise ValueError("no paired outcomes to compare")
    return PairedComparison(n=counts.n, both=counts.both, only_a=counts.only_a, only_b=counts.only_b,
                            neither=counts.neither, accuracy_a=counts.accuracy_a, accuracy_b=counts.accuracy_b,
                            difference=counts.difference, difference_ci95=tango_interval(counts),
                            mcnemar_p=exact_mcnemar_p(counts.only_a, counts.only_b))


class Verdict(enum.Enum):
    """Whether A is within ±margin of B, from the 95% interval of A - B."""

    WITHIN = "within"  # the whole interval lies inside [-margin, +margin]
    WORSE = "worse"  # the whole interval lies below -margin
    BETTER = "better"  # the whole interval lies above +margin
    UNDECIDED = "undecided"  # the interval crosses -margin or +margin: more problems are needed


@dataclasses.dataclass(frozen=True)
class MarginAnswer:
    """The answer to "is A within `margin` of B?" on paired outcomes (margin as a fraction: 0.01 = 1 point)."""

    margin: float
    comparison: PairedComparison
    verdict: Verdict
    non_inferior: bool  # the interval's lower end is above -margin: A is not worse by more than the margin
    p_noninferiority: float  # one-sided score test of H0: A - B <= -margin
    p_nonsuperiority: float  # one-sided score test of H0: A - B >= +margin
    p_equivalence: float  # TOST: the larger of the two; WITHIN  <=>  p_equivalence <= 0.025
    problems_needed: int | None  # rough (Wald) n at which the interval would fit inside ±margin; None: never
    explanation: str

    def as_dict(self) -> dict:
        return {"margin": self.margin, **self.comparison.as_dict(), "verdict": self.verdict.value,
                "non_inferior": self.non_inferior, "p_noninferiority": self.p_noninferiority,
                "p_nonsuperiority": self.p_nonsuperiority, "p_equivalence": self.p_equivalence,
                "problems_needed": self.problems_needed, "explanation": self.explanation}


def problems_needed(counts: PairedCounts, margin: float, z: float = Z95) -> int | None:
    """Roughly how many problems would make the 95% interval of A - B fit inside ±margin.

    With discordant problems observed: if the observed difference and discordance rate held, the Wald
    half-width z·sqrt((d_rate - diff²) / n) must shrink below margin - |diff| (a rough guide, not a power
    calculation). With none observed: the least n at which "no problem solved by only one of them" would
    itself show equivalence; the score interval is then ±z²/(n + z²), inside ±margin from n > z²(1 - m)/m
    (381 problems for one point). None when |diff| >= margin: no n shows equivalence if that difference held."""
    slack = margin - abs(counts.difference)
    if slack <= 0:
        return None
    if counts.only_a + counts.only_b == 0:
        return math.floor(z * z * (1 - margin) / margin) + 1
    discordant_rate = (counts.only_a + counts.only_b) / counts.n
    variance = max(discordant_rate - counts.difference ** 2, 1e-12)
    return math.ceil(z * z * variance / (slack * slack))


def _points(x: float) -> str:
    return f"{100 * x:+.1f}"


def within_margin(a: Sequence[bool], b: Sequence[bool], margin: float = 0.01,
                  names: tuple[str, str] = ("A", "B")) -> MarginAnswer:
    """Is A within ±margin of B? Decided by the 95% score interval of A - B (see the module docstring)."""
    if not 0 < margin < 1:
        raise ValueError(f"margin is a fraction in (0, 1), got {margin}")
    comparison = mcnemar(a, b)
    counts = paired_counts(a, b)
    lo, hi = comparison.difference_ci95
    p_low = 1.0 - normal_cdf(tango_statistic(counts, -margin))
    p_high = normal_cdf(tango_statistic(counts, margin))
    if lo > -margin and hi < margin:
        verdict = Verdict.WITHIN
    elif hi < -margin:
        verdict = Verdict.WORSE
    elif lo > margin:
        verdict = Verdict.BETTER
    else:
        verdict = Verdict.UNDECIDED
    needed = problems_needed(counts, margin)
    a_name, b_name = names
    m = f"{100 * margin:g} point" + ("" if 100 * margin == 1 else "s")
    interval = (f"95% interval of {a_name} - {b_name}: [{_points(lo)}, {_points(hi)}] points "
                f"(observed {_points(comparison.difference)}; solved by {a_name} alone: {counts.only_a}, "
                f"by {b_name} alone: {counts.only_b}; exact McNemar p = {comparison.mcnemar_p:.3g})")
    if verdict is Verdict.WITHIN:
        text = f"yes: {a_name} is within ±{m} of {b_name} (equivalence p = {max(p_low, p_high):.3g}); {interval}"
    elif verdict is Verdict.WORSE:
        text = f"no: {a_name} is worse than {b_name} by more than {m}; {interval}"
    elif verdict is Verdict.BETTER:
        text = f"no: {a_name} is better than {b_name} by more than {m}; {interval}"
    else:
        if needed is None:
            more = (f"the observed difference itself lies outside ±{m}, so more problems would more likely "
                    f"show that it is not within the margin")
        elif counts.only_a + counts.only_b == 0:
            more = f"even if they kept agreeing on every problem, at least {needed} problems would be needed"
        else:
            more = f"roughly {needed} problems would be needed at the observed discordance"
        text = (f"undecided: n = {counts.n} is too small to tell whether {a_name} is within ±{m} of "
                f"{b_name}; {interval}; {more}")
        if lo > -margin:
            text += f". It is, however, not worse by more than {m} (non-inferiority p = {p_low:.3g})"
    return MarginAnswer(margin=margin, comparison=comparison, verdict=verdict, non_inferior=lo > -margin,
                        p_noninferiority=p_low, p_nonsuperiority=p_high, p_equivalence=max(p_low, p_high),
                        problems_needed=needed, explanation=text)

"""Sampling the SLM's next token (mode greedy with temperature > 0): temperature, top-p, a per-request seed.

A request that samples owns one `Sampler`, seeded once with the request's seed. Each drafted token takes
exactly one uniform draw from that request's own `torch.Generator`, applied to that request's own logits
row, so the tokens depend only on the seed and the logits: not on which other requests shared the batched
forward, nor on the order the scheduler visits them. Replaying a request with the seed its stats report gives
the same tokens.

The distribution is the usual one (transformers' TemperatureLogitsWarper then TopPLogitsWarper): probabilities
p = softmax(logits / temperature); with 0 < top_p < 1 only the most probable tokens are kept, in decreasing
order (ties: the lower id first), up to and including the first whose cumulative probability reaches top_p;
then renormalised. The draw is by inversion (one uniform, the first token whose cumulative probability exceeds
it), in float64, so it consumes the generator the same way on every platform and dtype.
"""

from __future__ import annotations

import math
import secrets

import torch

SEED_LIMIT = 2**64  # seeds are uint64 on the wire; torch.Generator.manual_seed takes [0, 2**64)


def pick_seed() -> int:
    """A fresh non-zero seed, for requests that leave the seed at 0 (reported back so the run can be replayed)."""
    return secrets.randbelow(SEED_LIMIT - 1) + 1


# How many of the most probable tokens `nucleus` looks at before it falls back to sorting the whole vocabulary.
# At the temperatures and top-p people sample math with (0.7, 0.8) the nucleus is a handful of tokens, and a
# stable sort of 151,936 float64 probabilities per drafted token (~20 ms on 2 cores) made a batch of 64 sampled
# sequences spend seconds per step outside the forward.
NUCLEUS_PROBE = 256


def _kept_prefix(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Which of the tokens, in decreasing order, the nucleus keeps: those whose predecessors' mass is below
    top_p (a prefix; the most probable token always)."""
    before = torch.cumsum(sorted_probs, 0) - sorted_probs  # mass of the tokens ranked above each one
    keep = before < top_p
    keep[0] = True
    return keep


def _nucleus_ids(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The ids of the top-p nucleus of `probs`, in the order of the stable decreasing sort (ties: lower id first).

    Looks at the NUCLEUS_PROBE most probable tokens first. Their stable order is the whole vocabulary's for every
    token strictly more probable than the smallest probed value v (the probe holds all of those; of the tokens
    equal to v it may hold any). So when the kept prefix ends before the first probed token equal to v, it is
    exactly the full sort's; otherwise (a nucleus of more than the probe, or ties at its edge) sort everything."""
    probe = min(NUCLEUS_PROBE, probs.shape[0])
    if probe < probs.shape[0]:
        values, ids = torch.topk(probs, probe)
        by_id = torch.argsort(ids)  # stable order of the probe: ids ascending, then a stable sort by value
        ids, values = ids[by_id], values[by_id]
        order = torch.sort(values, descending=True, stable=True).indices
        ids, values = ids[order], values[order]
        keep = _kept_prefix(values, top_p)
        kept = int(keep.sum())
        if kept < probe and bool(values[kept - 1] > values[-1]):
            return ids[:kept]
    sorted_probs, order = torch.sort(probs, descending=True, stable=True)
    return order[_kept_prefix(sorted_probs, top_p)]


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """`probs` [vocab] truncated to its top-p nucleus and renormalised (unchanged when top_p is 0 or >= 1).

    The nucleus is the shortest prefix of the tokens sorted by decreasing probability (stable: ties keep the
    lower id first) whose mass reaches top_p; it always holds the most probable token, so a tiny top_p is the
    argmax."""
    if not 0 < top_p < 1:
        return probs
    ids = _nucleus_ids(probs, top_p)
    kept = torch.zeros_like(probs)
    kept[ids] = probs[ids]
    return kept / kept.sum()


def distribution(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The float64 distribution a Sampler draws from for one logits row [vocab]."""
    if not temperature > 0:
        raise ValueError(f"temperature {temperature} must be > 0 to sample")
    row = logits.detach().to(torch.float64)
    # Subtract the maximum before dividing: a tiny temperature then sends the others to -inf (probability 0),
    # never the maximum to +inf (NaN).
    probs = torch.softmax((row - row.max()) / temperature, dim=-1)
    return nucleus(probs, top_p)


class Sampler:
    """One request's sampler: its temperature, top-p and its own generator (see the module docstring)."""

    def __init__(self, temperature: float, top_p: float, seed: int):
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature {temperature} must be a finite number > 0")
        if not 0 <= top_p <= 1:
            raise ValueError(f"top_p {top_p} must be in [0, 1]")
        if not 0 <= seed < SEED_LIMIT:
            raise ValueError(f"seed {seed} must be in [0, 2**64)")
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)

    def sample(self, logits: torch.Tensor) -> int:
        """The next token for one logits row [vocab]; advances this request's generator by one draw."""
        probs = distribution(logits, self.temperature, self.top_p)
        cdf = torch.cumsum(probs, 0)
        u = float(torch.rand((), generator=self.generator, dtype=torch.float64)) * float(cdf[-1])
        # The first token whose cumulative probability exceeds u; tokens of probability 0 never have a
        # cumulative jump, so they are never drawn (clamped for u at the very top of the rounding range).
        index = int(torch.searchsorted(cdf, torch.tensor([u], dtype=torch.float64), right=True)[0])
        index = min(index, probs.shape[0] - 1)
        while probs[index] == 0:  # only reachable through rounding at the top: step back to a real token
            index -= 1
        return index

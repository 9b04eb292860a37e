"""Majority voting over sampled solutions (the benchmark's `maj8` row, issue #16's self-consistency baseline).

A majority-vote row sends k sampled requests per problem (mode greedy with a temperature, one seed per sample),
extracts each sample's answer with the GSM8K extraction every row uses (s2t.gsm8k.extract), and scores the
problem twice:

- accuracy (maj@k): the answer given by the most samples is the row's answer; samples without an extractable
  answer abstain; a tie goes to the answer that appeared first among the samples (the lowest sample number
  that gave it); with no answer at all the problem counts as wrong;
- pass@k: whether any sample's answer is correct (an upper bound for any way of picking one sample).

Seeds depend only on the problem index and the sample number (`sample_seed`), so a rerun, a resumed run or a
single problem recomputed as a canary draws the same samples, and the seeds stored with each sample replay it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

# How sample_seed derives a seed; part of a majority row's cache key, so changing the rule invalidates results.
SEED_RULE = "uint64 big-endian of sha256('gsm8k-maj/<problem idx>/<sample>')[:8]; 0 -> 1"
# Per-request statistics of a sample that add up over a problem's samples.
SUMMED_STATS = ("tokens", "wall_s", "positions_checked", "picks_changed", "llm_forwards", "bytes_sent",
                "bytes_received", "unverified_tokens", "rolled_back_tokens", "drafted_tokens", "resyncs",
                "triggered_positions")


def sample_seed(problem_idx: int, sample: int) -> int:
    """The seed of sample `sample` (0-based) of problem `problem_idx`: a fixed hash of the two numbers, never 0
    (seed 0 would ask the worker to pick one)."""
    digest = hashlib.sha256(f"gsm8k-maj/{problem_idx}/{sample}".encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") or 1


@dataclasses.dataclass(frozen=True)
class MajorityVote:
    answer: float | None  # the winning answer; None when no sample had an extractable answer
    votes: int  # how many samples gave it
    first_sample: int | None  # the lowest sample number that gave it (its correctness is the problem's)
    tally: tuple[tuple[float, int], ...]  # every answer with its votes, in order of first appearance


def majority_vote(answers: Sequence[float | None]) -> MajorityVote:
    """A true majority (plurality) vote over the samples' extracted answers, one vote per sample.

    Samples without an answer (None) abstain. Equal answers are equal numbers (the extraction returns floats:
    "18", "18.00" and "$18" are one answer). Ties between answers with the most votes go to the answer that
    appeared first among the samples, i.e. whose first vote has the lowest sample number."""
    votes: dict[float, int] = {}
    first: dict[float, int] = {}
    for k, answer in enumerate(answers):
        if answer is None:
            continue
        votes[answer] = votes.get(answer, 0) + 1
        first.setdefault(answer, k)
    if not votes:
        return MajorityVote(answer=None, votes=0, first_sample=None, tally=())
    # dicts keep insertion order, i.e. first appearance; max() returns the first of equal maxima
    winner = max(votes, key=votes.__getitem__)
    return MajorityVote(answer=winner, votes=votes[winner], first_sample=first[winner], tally=tuple(votes.items()))


def combine_samples(problem: dict, samples: Sequence[dict], latency_s: float) -> dict:
    """One problem's result record from its samples' records (bench.run_bench.generate_one, in sample order):
    the majority answer and its correctness, pass@k, the vote tally, summed statistics, and every sample (with
    its seed) under "samples". The record has the fields the accuracy runner, the cache and the summaries read
    from any row's result (idx, tokens, correct, pred, gold, mode_used, degraded, text, latency_s)."""
    vote = majority_vote([s["pred"] for s in samples])
    correct = vote.first_sample is not None and bool(samples[vote.first_sample]["correct"])
    modes = sorted({s["mode_used"] for s in samples})
    record = {"idx": problem["idx"], "gold": problem["gold"], "pred": vote.answer, "correct": correct,
              "any_correct": any(bool(s["correct"]) for s in samples), "majority_votes": vote.votes,
              "votes": [[answer, n] for answer, n in vote.tally],
              "mode_used": modes[0] if len(modes) == 1 else "+".join(modes),
              "degraded": "; ".join(f"sample {k}: {s['degraded']}" for k, s in enumerate(samples) if s.get("degraded")),
              # the text behind the majority answer, for reading the details
              "text": samples[vote.first_sample]["text"] if vote.first_sample is not None else "",
              "latency_s": round(latency_s, 3)}
    for key in SUMMED_STATS:
        record[key] = sum(s.get(key, 0) for s in samples)
    record["samples"] = [{k: v for k, v in s.items() if k not in ("idx", "gold")} for s in samples]
    return record

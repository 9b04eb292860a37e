"""bench/: the statistics (exact values), the per-problem cache, the cached accuracy runner and the plots.

Model-free except the row-loop tests (`test_bench_rows_reuse_the_cache_on_a_rerun`,
`test_baseline_rows_on_the_tiny_pair_and_their_rerun`), which run the benchmark on the tiny random model pair
in-process. Issue #16's baselines (maj8's majority vote and seeds, the takeover row) are tested at the end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import plots  # noqa: E402
import problem_cache  # noqa: E402
import run_bench  # noqa: E402
import stats  # noqa: E402
from problem_cache import CacheFileMismatch, ProblemCache, problem_digest  # noqa: E402
from s2t.v1 import generation_pb2 as pb  # noqa: E402


# ---- statistics ------------------------------------------------------------------------------------------

def test_wilson_by_hand_and_reexported():
    # 7/10, z = 1.96: centre (0.7 + 0.19208) / 1.38416, half-width 1.96·sqrt(0.021 + 0.009604) / 1.38416
    lo, hi = stats.wilson(7, 10)
    #   = 0.644492 ∓ 0.247719, the textbook (0.3968, 0.8922)
    assert (round(lo, 4), round(hi, 4)) == (0.3968, 0.8922)
    assert stats.wilson(0, 0) == (0.0, 0.0)
    assert stats.wilson(0, 5)[0] == 0.0 and stats.wilson(5, 5)[1] == 1.0
    assert run_bench.wilson is stats.wilson


def test_exact_mcnemar_p_is_the_binomial_tail():
    # b=1, c=5: 2·(C(6,0) + C(6,1)) / 2^6 = 14/64
    assert stats.exact_mcnemar_p(1, 5) == 14 / 64
    assert stats.exact_mcnemar_p(5, 1) == 14 / 64
    assert stats.exact_mcnemar_p(0, 4) == 2 / 16
    assert stats.exact_mcnemar_p(3, 3) == 1.0  # the doubled tail exceeds 1: capped
    assert stats.exact_mcnemar_p(0, 0) == 1.0
    # b=6, c=16: 2·(1 + 22 + 231 + 1540 + 7315 + 26334 + 74613) / 2^22 = 2·110056 / 4194304
    assert stats.exact_mcnemar_p(6, 16) == 2 * 110056 / 2**22 == pytest.approx(0.052479, abs=1e-6)
    # large n stays exact (integer sums, one division): symmetric counts give 1, far-apart ones ~0
    assert stats.exact_mcnemar_p(600, 600) == 1.0
    assert 0 < stats.exact_mcnemar_p(100, 300) < 1e-20
    with pytest.raises(ValueError):
        stats.exact_mcnemar_p(-1, 2)


def test_tango_interval_matches_published_values_and_inverts_the_test():
    # Fagerland, Lydersen & Laake, ch. 8 (Cavo et al. 2012): [[59, 6], [16, 80]] -> -0.0621 (-0.1240 to -0.0054)
    cavo = stats.PairedCounts(both=59, only_a=6, only_b=16, neither=80)
    lo, hi = stats.tango_interval(cavo)
    assert cavo.difference == pytest.approx(-0.0621, abs=5e-5)
    assert (round(lo, 4), round(hi, 4)) == (-0.1240, -0.0054)
    # each limit is where the score statistic equals ∓z
    assert stats.tango_statistic(cavo, lo) == pytest.approx(stats.Z95, abs=1e-6)
    assert stats.tango_statistic(cavo, hi) == pytest.approx(-stats.Z95, abs=1e-6)
    # the same book's boundary case: 3 discordant pairs all one way -> (-0.1230, 1), and its mirror
    assert tuple(round(x, 4) for x in stats.tango_interval(stats.PairedCounts(0, 3, 0, 0))) == (-0.1230, 1.0)
    assert tuple(round(x, 4) for x in stats.tango_interval(stats.PairedCounts(0, 0, 3, 0))) == (-1.0, 0.1230)
    # no discordant pair in n: T(d) = -sqrt(n·d / (1 - d)) for d > 0, so the limit is z² / (n + z²)
    z2 = stats.Z95 ** 2
    lo, hi = stats.tango_interval(stats.PairedCounts(50, 0, 0, 50))
    assert hi == pytest.approx(z2 / (100 + z2), abs=1e-9) and lo == pytest.approx(-hi, abs=1e-9)


def test_mcnemar_on_outcome_lists():
    a = [True] * 59 + [True] * 6 + [False] * 16 + [False] * 80
    b = [True] * 59 + [False] * 6 + [True] * 16 + [False] * 80
    result = stats.mcnemar(a, b)
    assert (result.n, result.both, result.only_a, result.only_b, result.neither) == (161, 59, 6, 16, 80)
    assert result.accuracy_a == 65 / 161 and result.accuracy_b == 75 / 161
    assert result.mcnemar_p == 2 * 110056 / 2**22
    assert result.as_dict()["difference_ci95"] == list(result.difference_ci95)
    with pytest.raises(ValueError):
        stats.mcnemar([True], [True, False])
    with pytest.raises(ValueError):
        stats.mcnemar([], [])


def _paired(both: int, only_a: int, only_b: int, neither: int) -> tuple[list[bool], list[bool]]:
    a = [True] * both + [True] * only_a + [False] * only_b + [False] * neither
    b = [True] * both + [False] * only_a + [True] * only_b + [False] * neither
    return a, b


def test_within_margin_verdicts():
    within = stats.within_margin(*_paired(1200, 10, 10, 780), margin=0.01)
    assert within.verdict is stats.Verdict.WITHIN and within.non_inferior
    assert within.p_equivalence < 0.025 and within.explanation.startswith("yes")
    lo, hi = within.comparison.difference_ci95
    assert -0.01 < lo < 0 < hi < 0.01

    worse = stats.within_margin(*_paired(500, 10, 100, 390), margin=0.01, names=("s2t", "llm"))
    assert worse.verdict is stats.Verdict.WORSE and not worse.non_inferior
    assert worse.explanation.startswith("no: s2t is worse than llm by more than 1 point")
    assert worse.problems_needed is None  # the observed -9 points is outside ±1 at any n

    better = stats.within_margin(*_paired(500, 100, 10, 390), margin=0.01)
    assert better.verdict is stats.Verdict.BETTER and better.non_inferior


def test_within_margin_says_plainly_when_n_is_too_small():
    answer = stats.within_margin(*_paired(58, 1, 1, 40), margin=0.01, names=("s2t-local", "llm"))
    assert answer.verdict is stats.Verdict.UNDECIDED
    assert "n = 100 is too small to tell whether s2t-local is within ±1 point of llm" in answer.explanation
    # Wald: z²·(2/100 - 0²) / 0.01² = 768.3 -> 769 problems
    assert answer.problems_needed == math.ceil(stats.Z95 ** 2 * 0.02 / 0.01 ** 2) == 769
    assert "roughly 769 problems" in answer.explanation
    # no discordant problem at all: the score interval is ±z²/(n + z²), inside ±1 point from n = 381 on
    agreeing = stats.within_margin([True] * 3, [True] * 3, margin=0.01)
    assert agreeing.problems_needed == 381 and "at least 381 problems" in agreeing.explanation
    assert stats.tango_interval(stats.PairedCounts(190, 0, 0, 191))[1] < 0.01
    assert stats.tango_interval(stats.PairedCounts(190, 0, 0, 190))[1] > 0.01
    assert stats.within_margin(*_paired(190, 0, 0, 191), margin=0.01).verdict is stats.Verdict.WITHIN
    # the two one-sided p-values come from the same statistic as the interval: both above 2.5% here
    assert answer.p_noninferiority > 0.025 and answer.p_nonsuperiority > 0.025
    assert answer.p_equivalence == max(answer.p_noninferiority, answer.p_nonsuperiority)
    assert answer.as_dict()["verdict"] == "undecided"
    with pytest.raises(ValueError):
        stats.within_margin([True], [True], margin=1.5)


# ---- the per-problem cache -------------------------------------------------------------------------------

ROW_KEY = {"mode": "greedy", "slm": {"weights_sha256": "ab" * 32}, "max_new_tokens": 512}


def _result(idx: int, text: str = "x", tokens: int = 3) -> dict:
    return {"idx": idx, "text": text, "tokens": tokens, "correct": idx % 2 == 0, "token_ids": list(range(tokens))}


def test_cache_put_get_missing_and_resume(tmp_path):
    cache = ProblemCache(tmp_path, ROW_KEY, label="greedy")
    assert cache.path.parent == tmp_path and cache.path.name.startswith("greedy-") and len(cache) == 0
    assert cache.missing([0, 1, 2]) == [0, 1, 2]
    cache.put(1, _result(1), "d1")
    cache.put(2, _result(2), "d2")
    assert cache.get(1) == _result(1) and cache.get(0) is None
    assert cache.missing([0, 1, 2, 3]) == [0, 3]
    # a result computed for other problem content does not count
    assert cache.get(1, "d1") == _result(1) and cache.get(1, "other") is None
    assert cache.missing([1, 2], {1: "other", 2: "d2"}) == [1]
    # a new process (a resumed run) reads what was appended; the header line names the configuration
    reopened = ProblemCache(tmp_path, ROW_KEY, label="greedy")
    assert reopened.indices() == [1, 2] and reopened.get(2) == _result(2)
    header, *records = [json.loads(line) for line in cache.path.read_text().splitlines()]
    assert header == {"cache_format": problem_cache.CACHE_FORMAT, "key": cache.key, "row": ROW_KEY}
    assert [r["idx"] for r in records] == [1, 2]
    # the last record of a problem wins
    reopened.put(1, _result(1, text="newer"), "d1")
    assert ProblemCache(tmp_path, ROW_KEY, label="greedy").get(1)["text"] == "newer"


def test_cache_drops_a_partial_last_line_left_by_a_kill(tmp_path):
    cache = ProblemCache(tmp_path, ROW_KEY)
    cache.put(0, _result(0))
    with open(cache.path, "a") as f:
        f.write('{"idx": 1, "problem_sha256": "", "resu')  # killed mid-append
    resumed = ProblemCache(tmp_path, ROW_KEY)
    assert resumed.dropped_partial_line and resumed.indices() == [0]
    resumed.put(1, _result(1))
    assert ProblemCache(tmp_path, ROW_KEY).indices() == [0, 1]
    assert all(json.loads(line) for line in cache.path.read_text().splitlines())


def test_cache_refuses_a_file_whose_header_names_another_configuration(tmp_path):
    cache = ProblemCache(tmp_path, ROW_KEY)
    cache.put(0, _result(0))
    other = ProblemCache(tmp_path, {**ROW_KEY, "max_new_tokens": 256})
    other.path.write_text(cache.path.read_text())  # e.g. copied by hand
    with pytest.raises(CacheFileMismatch):
        ProblemCache(tmp_path, {**ROW_KEY, "max_new_tokens": 256})


def test_problem_digest_follows_the_content():
    p = {"idx": 3, "question": "What is 2+2?", "gold": "4"}
    assert problem_digest(p) == problem_digest({**p, "idx": 4})
    assert problem_digest(p) != problem_digest({**p, "question": "What is 2+3?"})
    assert problem_digest(p) != problem_digest({**p, "gold": "5"})


IDENTITY = {
    "slm": {"model": "slm", "weights_sha256": "s" * 64, "vocab_sha256": "v" * 64, "weight_formats": "1-∞ rows: bf16",
            "compute_dtype": "bfloat16"},
    "llm": {"model": "llm", "vocab_sha256": "v" * 64, "weight_formats": "1-∞ rows: bf16", "weights_sha256": "l" * 64},
    "prompt": {"system_prompt": "Reason step by step.", "chat_template_sha256": "t" * 64},
    "worker": {"num_candidates": 8, "trigger": "kl", "trigger_rate": 0.1, "warmup_steps": 3, "block_size": 8,
               "max_inflight_blocks": 2, "draft_confidence": 0.7, "decode_chunk": 16},
    "thresholds": {"entropy": {"0.1": 0.8754}, "margin": {"0.1": 0.4053}, "kl": {"0.1": 0.5128}},
    "adapter": {"version": "s2t-0123456789abcdef", "files_sha256": "a" * 64},
}


def _key(row_name: str, identity=IDENTITY, max_new: int = 512, row=None) -> str:
    return problem_cache.digest(run_bench.row_cache_key(identity, row or run_bench.ROWS[row_name], max_new))


def _changed(path: tuple[str, str], value) -> dict:
    section, field = path
    return {**IDENTITY, section: {**IDENTITY[section], field: value}}


@pytest.mark.parametrize("row_name, path, value", [
    ("s2t-local", ("slm", "weights_sha256"), "S" * 64),
    ("s2t-local", ("slm", "weight_formats"), "1-∞ rows: int8"),
    ("s2t-local", ("adapter", "version"), "s2t-fedcba9876543210"),
    ("s2t-local", ("adapter", "files_sha256"), "b" * 64),
    ("s2t-local", ("thresholds", "entropy"), {"0.1": 0.9}),
    ("s2t-local", ("prompt", "system_prompt"), "Think."),
    ("s2t-local", ("prompt", "chat_template_sha256"), "u" * 64),
    ("s2t-local", ("worker", "warmup_steps"), 0),
    ("s2t-spec-tau10-b8", ("llm", "weights_sha256"), "L" * 64),
    ("s2t-spec-tau10-b8", ("llm", "weight_formats"), "1-∞ rows: fp32"),
    ("s2t-spec-tau10-b8", ("worker", "num_candidates"), 16),  # the row leaves K to the worker's default
    ("s2t-spec-tau10-b8", ("thresholds", "kl"), {"0.1": 0.6}),
    ("greedy", ("slm", "weights_sha256"), "S" * 64),
    ("llm", ("llm", "weights_sha256"), "L" * 64),
    ("llm", ("slm", "vocab_sha256"), "w" * 64),  # the worker tokenizes the prompt with the SLM's tokenizer
])
def test_cache_key_changes_with_every_determinant(row_name, path, value):
    assert _key(row_name, _changed(path, value)) != _key(row_name)


@pytest.mark.parametrize("row_name, path, value", [
    ("greedy", ("llm", "weights_sha256"), "L" * 64),  # greedy never calls the LLM
    ("greedy", ("adapter", "version"), "s2t-other"),
    ("greedy", ("worker", "num_candidates"), 16),
    ("llm", ("slm", "weights_sha256"), "S" * 64),  # the LLM generates alone
    ("s2t-local", ("llm", "weights_sha256"), "L" * 64),  # S2T-Local makes no LLM call
    ("s2t-spec-tau10-b8", ("adapter", "version"), "s2t-other"),
    ("s2t-spec-always-b8", ("thresholds", "kl"), {"0.1": 0.6}),  # the always trigger reads no threshold
])
def test_cache_key_ignores_what_cannot_change_the_result(row_name, path, value):
    assert _key(row_name, _changed(path, value)) == _key(row_name)


def test_cache_key_follows_the_row_options_and_token_cap():
    base = run_bench.ROWS["s2t-spec-tau10-b8"]
    keys = {_key("", row=row) for row in (
        base, run_bench.ROWS["s2t-spec-tau10-b4"], run_bench.ROWS["s2t-spec-tau10-b8-i1"],
        run_bench.ROWS["s2t-spec-tau1-b8"], run_bench.ROWS["s2t-spec-always-b8"],
        run_bench.ROWS["s2t-spec-tau10-b8-k4"],
        run_bench.ROWS["s2t-local"], run_bench.ROWS["greedy"], run_bench.ROWS["llm"])}
    assert len(keys) == 9
    assert _key("s2t-spec-tau10-b8", max_new=256) != _key("s2t-spec-tau10-b8")
    # K=8 said explicitly is the worker's default K=8: the same configuration
    assert _key("", row=run_bench.Row("x", "s2t", "kl", 0.10, 8, 2, 8)) == _key("s2t-spec-tau10-b8")
    # the code commit is not part of the key
    assert "commit" not in json.dumps(run_bench.row_cache_key(IDENTITY, base, 512))


# ---- the cached accuracy runner, on a fake stack ---------------------------------------------------------

class FakeStub:
    """Stands in for the worker's Generation stub: canned answers by question, every call recorded."""

    def __init__(self, answers: dict[str, tuple[str, list[int]]]):
        self.answers = answers
        self.calls: list[str] = []
        self.fail_on: str | None = None
        self.degrade: set[str] = set()

    async def Generate(self, request):
        self.calls.append(request.prompt)
        await asyncio.sleep(0)
        if request.prompt == self.fail_on:
            await asyncio.sleep(0.01)  # the others finish first
            raise RuntimeError("worker went away")
        text, ids = self.answers[request.prompt]
        degraded = request.prompt in self.degrade
        stats_msg = pb.GenerationStats(mode_requested=request.options.mode,
                                       mode_used=pb.MODE_GREEDY if degraded else request.options.mode,
                                       degraded_reason="selector down" if degraded else "",
                                       completion_tokens=len(ids), positions_checked=len(ids), triggered_positions=1)
        return pb.GenerateResponse(text=text, token_ids=ids, stats=stats_msg)


class FakeStack:
    def __init__(self, answers):
        self.stub = FakeStub(answers)


def _problems(n: int) -> list[dict]:
    return [{"idx": i, "question": f"q{i}", "gold": str(i)} for i in range(n)]


def _answers(n: int) -> dict[str, tuple[str, list[int]]]:
    # problems with an even index are answered right
    return {f"q{i}": (f"so \\boxed{{{i if i % 2 == 0 else i + 100}}}", [i, i + 1, i + 2]) for i in range(n)}


ROW = run_bench.ROWS["s2t-spec-tau10-b8"]


async def test_runner_computes_only_missing_problems_and_rechecks_canaries(tmp_path):
    stack = FakeStack(_answers(8))
    cache = ProblemCache(tmp_path, {"row": "test"})
    first = await run_bench.run_accuracy_row(stack, ROW, _problems(5), 64, cache, canaries=2, progress=False)
    assert sorted(stack.stub.calls) == ["q0", "q1", "q2", "q3", "q4"]
    assert (first.computed, first.reused, first.canaries) == (5, 0, [])
    assert cache.indices() == [0, 1, 2, 3, 4]
    assert cache.get(3)["token_ids"] == [3, 4, 5]  # token ids are kept in the cache ...
    assert all("token_ids" not in r for r in first.results)  # ... not in the details

    stack.stub.calls.clear()
    second = await run_bench.run_accuracy_row(stack, ROW, _problems(8), 64, cache, canaries=2, progress=False)
    # the three new problems, plus canaries 0 and 4 (first and last cached)
    assert sorted(stack.stub.calls) == ["q0", "q4", "q5", "q6", "q7"]
    assert (second.computed, second.reused) == (3, 5)
    assert [c["idx"] for c in second.canaries] == [0, 4] and all(c["matched"] for c in second.canaries)
    assert [r["idx"] for r in second.results] == list(range(8))
    assert [r["from_cache"] for r in second.results] == [True] * 5 + [False] * 3
    assert second.fresh_tokens == 5 * 3
    # the row is summarised over every requested problem, cached and new
    summary = run_bench.summarize(ROW, "accuracy", second.results, second.wall)
    assert (summary["n"], summary["correct"]) == (8, 4)
    assert second.cache_summary()["canaries_matched"] == 2


async def test_runner_fails_loudly_when_a_canary_differs(tmp_path):
    answers = _answers(4)
    stack = FakeStack(answers)
    cache = ProblemCache(tmp_path, {"row": "test"})
    await run_bench.run_accuracy_row(stack, ROW, _problems(4), 64, cache, canaries=2, progress=False)
    answers["q3"] = ("so \\boxed{3}", [3, 4, 9, 9])  # problem 3 now differs from token 2 on, and is right
    with pytest.raises(run_bench.CanaryMismatch) as failure:
        await run_bench.run_accuracy_row(stack, ROW, _problems(4), 64, cache, canaries=2, progress=False)
    bad = [r for r in failure.value.reports if not r["matched"]]
    assert [(r["idx"], r["first_difference"], r["cached_correct"], r["fresh_correct"]) for r in bad] == [
        (3, 2, False, True)]
    assert bad[0]["cached_ids_there"] == [5] and bad[0]["fresh_ids_there"] == [9, 9]
    assert "problem 3: first token_ids difference at position 2" in str(failure.value)
    # with --allow-canary-drift the drift is reported and the cached result stands
    run = await run_bench.run_accuracy_row(stack, ROW, _problems(4), 64, cache, canaries=2, allow_drift=True,
                                           progress=False)
    assert [c["matched"] for c in run.canaries] == [True, False]
    assert run.results[3]["correct"] is False and run.results[3]["from_cache"]
    assert cache.get(3)["token_ids"] == [3, 4, 5]  # canaries never overwrite the cache


async def test_runner_keeps_finished_results_when_killed_and_resumes(tmp_path):
    stack = FakeStack(_answers(6))
    stack.stub.fail_on = "q2"
    cache = ProblemCache(tmp_path, {"row": "test"})
    with pytest.raises(RuntimeError, match="worker went away"):
        await run_bench.run_accuracy_row(stack, ROW, _problems(6), 64, cache, canaries=2, progress=False)
    assert ProblemCache(tmp_path, {"row": "test"}).indices() == [0, 1, 3, 4, 5]  # each written as it completed
    stack.stub.fail_on = None
    stack.stub.calls.clear()
    resumed = await run_bench.run_accuracy_row(stack, ROW, _problems(6), 64,
                                               ProblemCache(tmp_path, {"row": "test"}), canaries=0, progress=False)
    assert stack.stub.calls == ["q2"] and resumed.computed == 1 and resumed.reused == 5


async def test_runner_does_not_cache_degraded_results(tmp_path):
    stack = FakeStack(_answers(3))
    stack.stub.degrade = {"q1"}
    cache = ProblemCache(tmp_path, {"row": "test"})
    run = await run_bench.run_accuracy_row(stack, ROW, _problems(3), 64, cache, canaries=2, progress=False)
    assert run.results[1]["mode_used"] == "MODE_GREEDY" and run.results[1]["degraded"] == "selector down"
    assert cache.indices() == [0, 2]


async def test_runner_without_a_cache_computes_everything(tmp_path):
    stack = FakeStack(_answers(3))
    run = await run_bench.run_accuracy_row(stack, ROW, _problems(3), 64, None, canaries=2, progress=False)
    assert sorted(stack.stub.calls) == ["q0", "q1", "q2"] and run.canaries == [] and run.cache_path is None


def test_pick_canaries_spreads_over_the_cached_problems():
    assert run_bench.pick_canaries([3, 5, 8, 13, 21], 2) == [3, 21]
    assert run_bench.pick_canaries([3, 5, 8, 13, 21], 3) == [3, 8, 21]
    assert run_bench.pick_canaries([3, 5], 4) == [3, 5]
    assert run_bench.pick_canaries([3, 5], 0) == [] and run_bench.pick_canaries([], 2) == []


# ---- paired comparisons in the output --------------------------------------------------------------------

def _row(mode: str, **kw) -> dict:
    return {"mode": mode, "kind": "accuracy", **kw}


def test_paired_comparisons_pair_rows_on_the_same_problems():
    details = [
        {"mode": "llm", "kind": "accuracy", "results": [{"idx": i, "correct": i < 60} for i in range(100)]},
        {"mode": "s2t-local", "kind": "accuracy", "results": [{"idx": i, "correct": i < 58 or i == 99}
                                                                for i in range(100)]},
        {"mode": "greedy", "kind": "accuracy", "results": [{"idx": i, "correct": i < 40} for i in range(100)]},
        {"mode": "other", "kind": "accuracy", "results": [{"idx": i, "correct": True} for i in range(50)]},
        {"mode": "greedy", "kind": "speed", "results": [{"idx": 0, "correct": False}]},
    ]
    rows = [_row("llm"), _row("s2t-local"), _row("greedy"), _row("other"), {"mode": "greedy", "kind": "speed"}]
    paired = run_bench.paired_comparisons(rows, details, margin=0.01)
    assert [(p["a"], p["b"]) for p in paired] == [("s2t-local", "llm"), ("greedy", "llm"), ("s2t-local", "greedy")]
    s2t_vs_llm = paired[0]
    assert s2t_vs_llm["highlight"] and not paired[1]["highlight"]
    assert (s2t_vs_llm["n"], s2t_vs_llm["only_a"], s2t_vs_llm["only_b"]) == (100, 1, 2)
    assert s2t_vs_llm["mcnemar_p"] == 1.0 and s2t_vs_llm["verdict"] == "undecided"
    assert paired[1]["mcnemar_p"] == 2 / 2**20 and paired[1]["verdict"] == "worse"
    md = run_bench.paired_table(paired)
    assert "| **s2t-local** | **llm** | 100 | 59.0% | 60.0% | -1.0 (" in md
    assert "**s2t-local vs llm, within ±1 point?** undecided: n = 100 is too small" in md


# ---- plots -----------------------------------------------------------------------------------------------

def _fake_results() -> dict:
    def acc(mode, request_mode, accuracy, n=100, **kw):
        lo, hi = stats.wilson(round(accuracy * n), n)
        return {"mode": mode, "kind": "accuracy", "request_mode": request_mode, "n": n, "accuracy": accuracy,
                "accuracy_ci95": [lo, hi], "llm_positions_per_token": 0.0, "triggered_per_token": 0.0, **kw}

    rows = [acc("greedy", "greedy", 0.40), acc("llm", "llm", 0.60), acc("maj8", "maj8", 0.50),
            {"mode": "greedy", "kind": "speed", "n": 3, "accuracy": 0.0, "accuracy_ci95": [0, 0]}]
    for tau, a, share in ((5, 0.45, 0.05), (10, 0.50, 0.11), (20, 0.52, 0.19)):
        rows.append(acc(f"s2t-local-tau{tau}", "s2t-local", a, trigger="entropy", trigger_rate=tau / 100,
                        block_size=8, triggered_per_token=share, num_candidates=8))
    for k, a in ((2, 0.50), (4, 0.55), (8, 0.57), (16, 0.58)):
        rows.append(acc("s2t-spec-tau10-b8" + ("" if k == 8 else f"-k{k}"), "s2t", a, trigger="kl", trigger_rate=0.1,
                        block_size=8, max_inflight_blocks=2, llm_positions_per_token=1.1, num_candidates=k))
    return {"rows": rows, "settings": {"worker": {"num_candidates": 8}}}


def test_plot_series_from_a_results_file():
    payload = _fake_results()
    tau = plots.tau_sweep_series(payload)
    local = next(points for label, points in tau.items() if label.startswith("s2t-local (re-ranker)"))
    assert [(p.row, p.x) for p in local] == [("s2t-local-tau5", 0.05), ("s2t-local-tau10", 0.11),
                                            ("s2t-local-tau20", 0.19)]
    # the K sweep's rows at other K than the default stay out of the tau picture
    assert [[(p.row, p.x) for p in points] for label, points in tau.items() if label.startswith("s2t (LLM)")] == [
        [("s2t-spec-tau10-b8", 0.1)]]  # the KL trigger's calibrated rate, not the 1.1 positions the LLM scored
    always = {**payload["rows"][-2], "mode": "s2t-spec-always-b8", "trigger": "always", "trigger_rate": 0.0}
    swept = plots.tau_sweep_series({"rows": payload["rows"] + [always], "settings": payload["settings"]})
    assert [[(p.row, p.x) for p in points] for label, points in swept.items() if label.startswith("s2t (LLM)")] == [
        [("s2t-spec-tau10-b8", 0.1), ("s2t-spec-always-b8", 1.0)]]  # every-step selection: the sweep's tau = 1
    ks = plots.k_sweep_series(payload)
    assert list(ks) == ["s2t, tau=0.1, kl trigger, block 8 x2 in flight"]
    assert [(p.row, p.x) for p in ks["s2t, tau=0.1, kl trigger, block 8 x2 in flight"]] == [
        ("s2t-spec-tau10-b8-k2", 2), ("s2t-spec-tau10-b8-k4", 4), ("s2t-spec-tau10-b8", 8),
        ("s2t-spec-tau10-b8-k16", 16)]
    assert set(plots.baselines(payload)) == {"greedy", "llm", "maj8"}
    # older files without request_mode: recognised by the row name
    assert plots.request_mode({"mode": "s2t-local-tau5"}) == "s2t-local"
    assert plots.request_mode({"mode": "s2t-entropy10"}) == "s2t"


def test_plots_are_written_next_to_the_results(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(_fake_results()))
    written = plots.write_plots(path)
    assert written == [tmp_path / "run.tau.png", tmp_path / "run.k.png"]
    for png in written:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    # nothing to sweep: no pictures, no error
    only_baselines = {"rows": _fake_results()["rows"][:3]}
    assert plots.write_plots(tmp_path / "none.json", only_baselines) == []
    assert not (tmp_path / "none.tau.png").exists()


# ---- the row loop ----------------------------------------------------------------------------------------

def _payload() -> dict:
    return {"command": "test", "date": "today", "commit": "abc", "settings": {}, "paired_margin": 0.01,
            "machine": {"cpu": "test", "cores": 2, "cpu_capability": "test"}, "rows": [], "details": [], "notes": []}


async def test_a_canary_mismatch_stops_the_run_and_is_recorded(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from s2t import stack as stack_module

    answers = _answers(3)
    fake = FakeStack(answers)
    fake.startup_s, fake.describe = 0.0, lambda: {}
    fake.settings = SimpleNamespace(worker=SimpleNamespace(num_candidates=8))

    class FakeLocalStack:
        def __init__(self, settings):
            pass

        async def __aenter__(self):
            return fake

        async def __aexit__(self, *exc):
            return None

    monkeypatch.setattr(stack_module, "LocalStack", FakeLocalStack)
    monkeypatch.setattr(run_bench, "stack_identity", lambda stack: IDENTITY)
    monkeypatch.setattr(run_bench, "RESULTS", tmp_path / "results")
    options = run_bench.CacheOptions(enabled=True, root=tmp_path / "problem-cache", canaries=1)
    rows = [run_bench.ROWS["greedy"]]
    await run_bench.run_stack_rows(None, rows, _problems(3), [], 16, 64, _payload(), "first", cache_options=options)
    answers["q0"] = ("so \\boxed{7}", [0, 1])
    failed = _payload()
    with pytest.raises(run_bench.CanaryMismatch):
        await run_bench.run_stack_rows(None, rows, _problems(3), [], 16, 64, failed, "second", cache_options=options)
    written = json.loads((tmp_path / "results" / "second.json").read_text())
    assert written["rows"] == []  # a row whose cache no longer reproduces is not reported
    assert [(f["mode"], [c["idx"] for c in f["canaries"]]) for f in written["canary_failures"]] == [("greedy", [0])]
    assert "greedy: stopped, canaries differ from the cache" in written["notes"][0]
    # accepted drift: the row is reported from the cache, the drift noted
    drifted = _payload()
    await run_bench.run_stack_rows(None, rows, _problems(3), [], 16, 64, drifted, "third",
                                   cache_options=dataclasses.replace(options, allow_drift=True))
    assert drifted["rows"][0]["cache"]["canaries_matched"] == 0 and drifted["rows"][0]["accuracy"] == 2 / 3
    assert "canaries drifted" in drifted["notes"][0]


# ---- the row loop end to end, on the tiny model pair in-process ------------------------------------------

async def test_bench_rows_reuse_the_cache_on_a_rerun(make_settings, tmp_path, monkeypatch):
    from s2t import stack as stack_module

    real_stack = stack_module.LocalStack
    monkeypatch.setattr(stack_module, "LocalStack",
                        lambda settings: real_stack(settings, fetch=False, ray=False, say=lambda m: None))
    monkeypatch.setattr(run_bench, "RESULTS", tmp_path / "results")
    settings = make_settings()
    rows = [run_bench.ROWS["greedy"], run_bench.ROWS["llm"], run_bench.ROWS["s2t-spec-always-b8"]]
    problems = [{"idx": i, "question": f"What is {i} plus {i}?", "gold": str(2 * i)} for i in range(3)]
    options = run_bench.CacheOptions(enabled=True, root=tmp_path / "problem-cache", canaries=2)

    first = _payload()
    await run_bench.run_stack_rows(settings, rows, problems, [], 16, 6, first, "first", cache_options=options)
    assert [r["cache"]["computed"] for r in first["rows"]] == [3, 3, 3]
    identity = first["cache"]["identity"]
    assert identity["slm"]["weights_sha256"] and identity["llm"]["weights_sha256"] != identity["slm"]["weights_sha256"]
    assert identity["adapter"] is None

    second = _payload()
    # what the first run computed, and when, stays with the rows that are all cached now
    first_written = json.loads((tmp_path / "results" / "first.json").read_text())
    options = dataclasses.replace(options, previous=run_bench.last_computations(first_written))
    await run_bench.run_stack_rows(settings, rows, problems, [], 16, 6, second, "second", cache_options=options)
    assert [r["last_computed"]["computed"] for r in second["rows"]] == [3, 3, 3]
    assert [r["last_computed"]["wall_s"] for r in second["rows"]] == [r["wall_s"] for r in first["rows"]]
    assert {r["last_computed"]["date"] for r in second["rows"]} == {first_written["date"]}
    # and through any number of all-cached reruns
    assert run_bench.last_computations(json.loads((tmp_path / "results" / "second.json").read_text())) == \
        run_bench.last_computations(first_written)
    caches = [r["cache"] for r in second["rows"]]
    assert [(c["computed"], c["reused"], c["canaries_matched"], len(c["canaries"])) for c in caches] == [
        (0, 3, 2, 2)] * 3
    assert [r["accuracy"] for r in second["rows"]] == [r["accuracy"] for r in first["rows"]]
    written = json.loads((tmp_path / "results" / "second.json").read_text())
    assert [(p["a"], p["b"]) for p in written["paired"]] == [("greedy", "llm"), ("greedy", "s2t-spec-always-b8"),
                                                             ("s2t-spec-always-b8", "llm")]
    assert [p["highlight"] for p in written["paired"]] == [False, False, True]
    assert "## Paired comparisons" in (tmp_path / "results" / "second.md").read_text()


# ---- issue #16's baselines: maj8 (majority vote over sampled requests) and takeover ----------------------

import majority  # noqa: E402


def test_majority_vote_is_a_plurality_with_ties_to_the_first_answer():
    vote = majority.majority_vote([3.0, 5.0, 5.0, None, 3.0, 5.0, 7.0, None])
    assert (vote.answer, vote.votes, vote.first_sample) == (5.0, 3, 1)
    assert vote.tally == ((3.0, 2), (5.0, 3), (7.0, 1))
    # a tie (2 - 2 - 1): the answer whose first vote came first wins, whichever sample voted last
    tie = majority.majority_vote([None, 9.0, 4.0, 4.0, 9.0, 1.0])
    assert (tie.answer, tie.votes, tie.first_sample) == (9.0, 2, 1)
    assert majority.majority_vote([4.0, 9.0, 9.0, 4.0]).answer == 4.0
    # no majority of the samples is needed: the most frequent answer wins (self-consistency's maj@k)
    assert majority.majority_vote([1.0, 2.0, 3.0, 3.0, 4.0, 5.0, 6.0, 7.0]).answer == 3.0
    # samples without an answer abstain; none at all: no answer
    assert majority.majority_vote([None, None, 2.0]).answer == 2.0
    nothing = majority.majority_vote([None] * 8)
    assert (nothing.answer, nothing.votes, nothing.first_sample, nothing.tally) == (None, 0, None, ())


def test_majority_vote_counts_equal_numbers_as_one_answer():
    from s2t import gsm8k

    texts = ["so \\boxed{18}", "It is $18.00", "\\boxed{1,800}", "18.0 dollars", "\\boxed{1800}", "\\boxed{1800}"]
    vote = majority.majority_vote([gsm8k.extract(t) for t in texts])
    assert (vote.answer, vote.votes) == (18.0, 3)  # 3 - 3: 18 came first


def test_sample_seeds_depend_only_on_problem_and_sample():
    seeds = {(i, k): majority.sample_seed(i, k) for i in range(200) for k in range(8)}
    assert len(set(seeds.values())) == len(seeds)
    assert all(0 < s < 2**64 for s in seeds.values())
    assert majority.sample_seed(17, 3) == majority.sample_seed(17, 3) == seeds[17, 3]
    # pinned: a change of the rule must also change SEED_RULE (it is part of the cache key)
    assert majority.sample_seed(0, 0) == int.from_bytes(__import__("hashlib").sha256(b"gsm8k-maj/0/0").digest()[:8],
                                                        "big")


def _sample(pred, correct, tokens=10, text=None, mode="MODE_GREEDY", degraded=""):
    return {"idx": 4, "gold": "18", "pred": pred, "correct": correct, "tokens": tokens, "mode_used": mode,
            "degraded": degraded, "text": text or f"answer {pred}", "token_ids": [1] * tokens, "wall_s": 0.5,
            "unverified_tokens": 0, "seed": 11}


def test_combine_samples_scores_the_majority_and_pass_at_k():
    problem = {"idx": 4, "question": "q", "gold": "18"}
    samples = [_sample(17.0, False, text="first 17"), _sample(18.0, True), _sample(17.0, False, text="second 17"),
               _sample(None, False)]
    record = majority.combine_samples(problem, samples, 1.23456)
    assert (record["pred"], record["correct"], record["any_correct"], record["majority_votes"]) == (
        17.0, False, True, 2)
    assert record["votes"] == [[17.0, 2], [18.0, 1]] and record["text"] == "first 17"
    assert record["tokens"] == 40 and record["wall_s"] == 2.0 and record["latency_s"] == 1.235
    assert record["mode_used"] == "MODE_GREEDY" and record["degraded"] == ""
    assert [s["pred"] for s in record["samples"]] == [17.0, 18.0, 17.0, None]
    assert all("idx" not in s and "gold" not in s and s["seed"] == 11 for s in record["samples"])
    # a degraded sample marks the problem (so it is not cached); mixed modes are named
    mixed = majority.combine_samples(problem, [_sample(18.0, True), _sample(18.0, True, mode="MODE_S2T",
                                                                             degraded="slow")], 0.1)
    assert mixed["correct"] and mixed["mode_used"] == "MODE_GREEDY+MODE_S2T" and mixed["degraded"] == "sample 1: slow"
    assert not majority.combine_samples(problem, [_sample(None, False)] * 2, 0.1)["correct"]


def test_baseline_rows_and_their_requests():
    maj8, takeover = run_bench.ROWS["maj8"], run_bench.ROWS["takeover"]
    assert (maj8.samples, maj8.temperature, maj8.top_p) == (8, 0.7, 0.8)
    assert maj8.options() == dict(mode=pb.MODE_GREEDY, trigger=0, trigger_rate=0.0, block_size=0, num_candidates=0,
                                  temperature=0.7, top_p=0.8)
    assert takeover.options() == dict(mode=pb.MODE_TAKEOVER, trigger=pb.TRIGGER_KL, trigger_rate=0.1, block_size=8,
                                      num_candidates=0)
    spec = run_bench.ROWS["s2t-spec-tau10-b8"]
    assert (takeover.trigger, takeover.rate, takeover.block_size, takeover.inflight) == (
        spec.trigger, spec.rate, spec.block_size, spec.inflight)
    with pytest.raises(ValueError, match="temperature"):
        run_bench.Row("bad", "maj8", samples=8)


@pytest.mark.parametrize("row_name, path, value", [
    ("maj8", ("slm", "weights_sha256"), "S" * 64),
    ("maj8", ("prompt", "system_prompt"), "Think."),
    ("takeover", ("llm", "weights_sha256"), "L" * 64),
    ("takeover", ("slm", "weights_sha256"), "S" * 64),
    ("takeover", ("thresholds", "kl"), {"0.1": 0.6}),
])
def test_baseline_cache_keys_change_with_their_determinants(row_name, path, value):
    assert _key(row_name, _changed(path, value)) != _key(row_name)


def test_baseline_cache_keys_hold_their_own_options():
    maj8 = run_bench.ROWS["maj8"]
    key = run_bench.row_cache_key(IDENTITY, maj8, 512)
    assert key["mode"] == "greedy" and "llm" not in key  # the SLM alone: an LLM change keeps maj8's results
    assert key["sampling"]["seeds_of_problem_0"] == [majority.sample_seed(0, k) for k in range(8)]
    assert key["sampling"]["seed_rule"] == majority.SEED_RULE
    assert _key("maj8", _changed(("llm", "weights_sha256"), "L" * 64)) == _key("maj8")
    keys = {_key("", row=row) for row in (
        maj8, dataclasses.replace(maj8, temperature=0.6), dataclasses.replace(maj8, top_p=0.9),
        dataclasses.replace(maj8, samples=4), run_bench.ROWS["greedy"], run_bench.ROWS["takeover"],
        run_bench.ROWS["s2t-spec-tau10-b8"])}
    assert len(keys) == 7
    # the greedy row's key is unchanged by sampling support (its cached results stay valid)
    assert "sampling" not in run_bench.row_cache_key(IDENTITY, run_bench.ROWS["greedy"], 512)
    assert _key("takeover", _changed(("adapter", "version"), "s2t-other")) == _key("takeover")


class SeededStub:
    """Answers by (question, seed): `answers[question][seed]`; every request recorded."""

    def __init__(self, answers: dict[str, dict[int, tuple[str, list[int]]]]):
        self.answers = answers
        self.requests: list = []

    async def Generate(self, request):
        self.requests.append(request)
        await asyncio.sleep(0)
        text, ids = self.answers[request.prompt][request.options.seed]
        stats_msg = pb.GenerationStats(mode_requested=request.options.mode, mode_used=request.options.mode,
                                       completion_tokens=len(ids), seed=request.options.seed)
        return pb.GenerateResponse(text=text, token_ids=ids, stats=stats_msg)


def _maj_answers(n: int, wrong_votes: dict[int, int]) -> dict:
    """Problem i (gold i): wrong_votes.get(i, 0) of the 8 samples answer i + 100, the others i; sample k's ids
    are [i, k]."""
    out = {}
    for i in range(n):
        per_seed = {}
        for k in range(8):
            answer = i + 100 if k < wrong_votes.get(i, 0) else i
            per_seed[majority.sample_seed(i, k)] = (f"so \\boxed{{{answer}}}", [i, k])
        out[f"q{i}"] = per_seed
    return out


async def test_majority_row_runs_eight_seeded_samples_per_problem_and_caches_them(tmp_path):
    # problem 0: all right; 1: 3 of 8 wrong (majority right); 2: 5 wrong (majority wrong, pass@8 right);
    # 3: 4 - 4, the wrong answer first (tie -> wrong); 4: all wrong
    answers = _maj_answers(5, {1: 3, 2: 5, 3: 4, 4: 8})
    stack = FakeStack({})
    stack.stub = SeededStub(answers)
    row = run_bench.ROWS["maj8"]
    cache = ProblemCache(tmp_path, {"row": "maj8"})
    run = await run_bench.run_accuracy_row(stack, row, _problems(5), 64, cache, canaries=2, progress=False)
    sent = stack.stub.requests
    assert len(sent) == 40
    assert sorted((r.prompt, r.options.seed) for r in sent) == sorted(
        (f"q{i}", majority.sample_seed(i, k)) for i in range(5) for k in range(8))
    assert {(r.options.mode, round(r.options.temperature, 6), round(r.options.top_p, 6)) for r in sent} == {
        (pb.MODE_GREEDY, 0.7, 0.8)}
    assert [r["correct"] for r in run.results] == [True, True, False, False, False]
    assert [r["any_correct"] for r in run.results] == [True, True, True, True, False]
    assert [r["pred"] for r in run.results] == [0.0, 1.0, 102.0, 103.0, 104.0]
    assert all("token_ids" not in s for r in run.results for s in r["samples"])  # not in the details ...
    assert cache.get(2)["samples"][5]["token_ids"] == [2, 5]  # ... but in the cache, per sample
    assert [s["seed"] for s in cache.get(3)["samples"]] == [majority.sample_seed(3, k) for k in range(8)]
    summary = run_bench.summarize(row, "accuracy", run.results, run.wall, {"samples": 8})
    summary.update(run_bench.pass_at_k(row, run.results))
    assert (summary["mode"], summary["kind"], summary["request_mode"]) == ("maj8", "accuracy", "maj8")
    assert (summary["correct"], summary["accuracy"]) == (2, 0.4)
    assert (summary["pass_at_8"], summary["pass_at_8_correct"]) == (0.8, 4)
    assert summary["pass_at_8_ci95"] == [round(x, 4) for x in stats.wilson(4, 5)]
    assert summary["tokens"] == 5 * 8 * 2

    # a rerun computes nothing but the canaries (all 8 samples of each), which match
    stack.stub.requests.clear()
    again = await run_bench.run_accuracy_row(stack, row, _problems(5), 64, cache, canaries=2, progress=False)
    assert sorted({r.prompt for r in stack.stub.requests}) == ["q0", "q4"] and len(stack.stub.requests) == 16
    assert (again.computed, again.reused) == (0, 5) and all(c["matched"] for c in again.canaries)
    # one sample of a canary changes: the mismatch names the sample and where its tokens part
    answers["q4"][majority.sample_seed(4, 6)] = ("so \\boxed{104}", [4, 6, 9])
    with pytest.raises(run_bench.CanaryMismatch) as failure:
        await run_bench.run_accuracy_row(stack, row, _problems(5), 64, cache, canaries=2, progress=False)
    bad = [r for r in failure.value.reports if not r["matched"]]
    assert [(r["idx"], r["compared"], r["first_difference"], r["sample"]["first_difference"]) for r in bad] == [
        (4, "samples", 6, 2)]


async def test_majority_row_keeps_within_the_workers_request_limit(tmp_path):
    from types import SimpleNamespace

    answers = _maj_answers(6, {})
    stack = FakeStack({})
    stack.stub = SeededStub(answers)
    stack.settings = SimpleNamespace(worker=SimpleNamespace(max_concurrent_requests=5))
    in_flight, peak = 0, 0
    original = stack.stub.Generate

    async def counted(request):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            await asyncio.sleep(0.001)
            return await original(request)
        finally:
            in_flight -= 1

    stack.stub.Generate = counted
    run = await run_bench.run_accuracy_row(stack, run_bench.ROWS["maj8"], _problems(6), 64, None, progress=False)
    assert len(stack.stub.requests) == 48 and peak == 5 and all(r["correct"] for r in run.results)


async def test_baseline_rows_on_the_tiny_pair_and_their_rerun(make_settings, tmp_path, monkeypatch):
    """maj8 and takeover through the real row loop (worker, selector, cache) on the tiny models: the result rows,
    and a rerun that takes every problem from the cache with its canaries recomputed token-exact (sampling is
    reproducible by seed)."""
    from s2t import stack as stack_module

    real_stack = stack_module.LocalStack
    monkeypatch.setattr(stack_module, "LocalStack",
                        lambda settings: real_stack(settings, fetch=False, ray=False, say=lambda m: None))
    monkeypatch.setattr(run_bench, "RESULTS", tmp_path / "results")
    settings = make_settings(**{"selector.kl_thresholds": {0.1: 0.5}})
    rows = [run_bench.ROWS["greedy"], run_bench.ROWS["maj8"], run_bench.ROWS["takeover"]]
    problems = [{"idx": i, "question": f"What is {i} plus {i}?", "gold": str(2 * i)} for i in range(2)]
    options = run_bench.CacheOptions(enabled=True, root=tmp_path / "problem-cache", canaries=1)

    first = _payload()
    await run_bench.run_stack_rows(settings, rows, problems, [], 16, 6, first, "first", cache_options=options)
    greedy, maj8, takeover = first["rows"]
    assert (maj8["mode"], maj8["kind"], maj8["request_mode"], maj8["n"]) == ("maj8", "accuracy", "maj8", 2)
    assert (maj8["samples"], maj8["temperature"], maj8["top_p"]) == (8, 0.7, 0.8)
    assert maj8["pass_at_8"] >= maj8["accuracy"] and maj8["modes_used"] == ["MODE_GREEDY"]
    assert maj8["tokens"] == 2 * 8 * 6  # every sample runs to the 6-token cap (the tiny model never stops)
    details = next(d for d in first["details"] if d["mode"] == "maj8")["results"]
    for result in details:
        seeds = [s["seed"] for s in result["samples"]]
        assert seeds == [majority.sample_seed(result["idx"], k) for k in range(8)]
    assert len({s["text"] for r in details for s in r["samples"]}) > 2, "different seeds should sample differently"
    assert (takeover["mode"], takeover["request_mode"], takeover["modes_used"]) == ("takeover", "takeover",
                                                                                   ["MODE_TAKEOVER"])
    assert takeover["llm_positions_per_token"] > 0 and takeover["unverified_tokens"] == 0
    assert set(plots.baselines(first)) == {"greedy", "maj8"}

    second = _payload()
    await run_bench.run_stack_rows(settings, rows, problems, [], 16, 6, second, "second", cache_options=options)
    assert [(r["cache"]["computed"], r["cache"]["reused"], r["cache"]["canaries_matched"]) for r in second["rows"]] == [
        (0, 2, 1)] * 3
    assert [r["accuracy"] for r in second["rows"]] == [r["accuracy"] for r in first["rows"]]
    assert second["rows"][1]["pass_at_8"] == maj8["pass_at_8"]


def test_paper_preset_is_the_default_and_pins_its_weight_formats():
    """Issue #16's table: the baselines, the default s2t, every-step selection and both sweeps, on pinned formats
    (the cache key includes them: unpinned, a rerun on another start-up would recompute everything)."""
    paper, full = run_bench.PRESETS["paper"], run_bench.PRESETS["full"]
    assert (paper["accuracy_n"], full["accuracy_n"]) == (100, 1319)
    assert paper["rows"] == full["rows"] and all(r in run_bench.ROWS for r in paper["rows"])
    assert {"greedy", "maj8", "takeover", "llm", "s2t-spec-tau10-b8", "s2t-spec-always-b8"} <= set(paper["rows"])
    tau = sorted(run_bench.ROWS[r].rate for r in paper["rows"]
                 if r.startswith("s2t-spec-tau") and not run_bench.ROWS[r].k)
    assert tau == [0.01, 0.05, 0.10, 0.20]
    assert sorted(run_bench.ROWS[r].k or 8 for r in paper["rows"] if r.startswith("s2t-spec-tau10-b8")) == [2, 4, 8, 16]
    pinned = run_bench.PINNED_WEIGHT_FORMATS
    assert run_bench.preset_settings(paper, []) == [f"worker.runtime.weight_formats={pinned}",
                                                    f"selector.runtime.weight_formats={pinned}"]


def test_command_line_settings_override_the_presets_by_key():
    preset = {"settings": ["worker.runtime.weight_formats=int8", "selector.runtime.weight_formats=int8"]}
    merged = run_bench.preset_settings(preset, ["worker.runtime.weight_formats=auto", "worker.block_size=4"])
    assert merged == ["selector.runtime.weight_formats=int8", "worker.runtime.weight_formats=auto",
                      "worker.block_size=4"]
    assert run_bench.preset_settings({}, ["a=1"]) == ["a=1"]


def test_compare_runs_pairs_the_same_row_across_two_files(tmp_path):
    """compare_runs --paired: each accuracy row of the second file against the same mode in the first, on the
    problems both hold (a row only one file has, and speed rows, are left out)."""
    import json

    import compare_runs

    def run(name, correct_by_mode):
        details = [{"mode": m, "kind": "accuracy", "results": [{"idx": i, "correct": c} for i, c in enumerate(cs)]}
                   for m, cs in correct_by_mode.items()]
        details.append({"mode": "greedy", "kind": "speed", "results": [{"idx": 0, "correct": True}]})
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"details": details}))
        return path

    a = run("before", {"greedy": [True, False, False, True], "llm": [True, True]})
    b = run("after", {"greedy": [True, True, False, True, True], "maj8": [True]})
    (row,) = compare_runs.paired(a, b)
    assert (row["a"], row["b"], row["n"]) == ("greedy (after)", "greedy (before)", 4)
    assert (row["only_a"], row["only_b"]) == (1, 0) and row["difference"] == 0.25


def test_a_drafting_row_sends_its_confidence_and_keys_it():
    """The split shape's dc0 row: draft_confidence goes out as a request option and into the key; a row that
    keeps the worker's default sends none and keeps the key it always had."""
    dc0, default = run_bench.ROWS["s2t-spec-tau10-b8-dc0"], run_bench.ROWS["s2t-spec-tau10-b8"]
    assert dc0.options()["draft_confidence"] == 0.0 and "draft_confidence" not in default.options()
    assert _key("s2t-spec-tau10-b8-dc0") != _key("s2t-spec-tau10-b8")
    assert _key("s2t-spec-tau10-b8-dc0") == _key("s2t-spec-tau10-b8", _changed(("worker", "draft_confidence"), 0.0))


def test_a_row_drafting_when_unsure_sends_it_and_keys_it():
    dwu, default = run_bench.ROWS["s2t-spec-tau10-b8-dwu"], run_bench.ROWS["s2t-spec-tau10-b8"]
    assert dwu.options()["draft_when_unsure"] is True and "draft_when_unsure" not in default.options()
    assert _key("s2t-spec-tau10-b8-dwu") != _key("s2t-spec-tau10-b8")
    assert _key("s2t-spec-tau10-b8-dwu") == _key("s2t-spec-tau10-b8", _changed(("worker", "draft_when_unsure"), True))
    assert _key("s2t-spec-tau10-b8") == _key("s2t-spec-tau10-b8", _changed(("worker", "draft_when_unsure"), False))
    # the row is what deploy/worker.yaml runs
    import yaml

    deployment = next(d for d in yaml.safe_load_all((Path(__file__).resolve().parent.parent / "deploy" /
                                                     "worker.yaml").read_text()) if d and d["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for c in deployment["spec"]["template"]["spec"]["containers"] for e in c["env"]}
    b16 = run_bench.ROWS["s2t-spec-tau10-b16-dwu-br"].options()
    assert (b16["block_size"], b16["draft_when_unsure"], b16["branch_when_unsure"]) == (16, True, True)
    assert (int(env["S2T_WORKER__BLOCK_SIZE"]), env["S2T_WORKER__DRAFT_WHEN_UNSURE"],
            env["S2T_WORKER__BRANCH_WHEN_UNSURE"]) == (16, "true", "true")
    # branches are keyed only when on (drafting when unsure is their condition)
    assert _key("s2t-spec-tau10-b16-dwu-br") != _key("s2t-spec-tau10-b16-dwu")
    assert _key("s2t-spec-tau10-b16-dwu-br") == _key("s2t-spec-tau10-b16-dwu",
                                                     _changed(("worker", "branch_when_unsure"), True))


def test_the_pin_follows_the_cpu(monkeypatch):
    import s2t.kernels as kernels

    monkeypatch.setattr(kernels, "cpu_has_avx512_vnni", lambda: True)
    assert run_bench.pinned_weight_formats() == "int8_vnni"
    monkeypatch.setattr(kernels, "cpu_has_avx512_vnni", lambda: False)
    assert run_bench.pinned_weight_formats() == run_bench.PORTABLE_WEIGHT_FORMATS
    assert run_bench.PORTABLE_WEIGHT_FORMATS == "int8,int8,int8,fp32_packed,fp32_packed"


def _result_row(mode, kind, accuracy=0.5, tokens_per_s=0.0):
    return {"mode": mode, "kind": kind, "dataset": "gsm8k", "n": 100, "accuracy": accuracy,
            "accuracy_ci95": [0.4, 0.6], "tokens_per_s": tokens_per_s, "wall_s": 1.0,
            "llm_positions_per_token": 1.0, "changed_per_token": 0.0, "llm_forwards_per_token": 0.2,
            "bytes_per_token": 1.0, "unverified_tokens": 0}


def test_per_mode_lines_merge_speculation_shapes_but_keep_k_apart():
    """Block size and blocks in flight never change the tokens, so their rows share a line; K does, so
    `-k4` is a line of its own (it once took the K = 8 row's accuracy line over)."""
    row = _result_row
    lines = {line["mode"]: line for line in run_bench.best_per_mode([
        row("s2t-spec-tau10-b8", "accuracy", 0.59), row("s2t-spec-tau10-b8-k4", "accuracy", 0.55),
        row("s2t-spec-tau10-b4-i1", "speed", tokens_per_s=7.0), row("s2t-spec-tau10-b16", "speed", tokens_per_s=9.0),
        row("s2t-spec-tau10-b8-dc0", "speed", tokens_per_s=8.0)])}
    assert sorted(lines) == ["s2t-spec-tau10", "s2t-spec-tau10-dc0", "s2t-spec-tau10-k4"]
    assert lines["s2t-spec-tau10"]["accuracy"] == 0.59
    assert lines["s2t-spec-tau10"]["speed_config"] == "s2t-spec-tau10-b16"
    assert lines["s2t-spec-tau10-k4"]["accuracy"] == 0.55


def test_render_rewrites_the_tables_from_the_rows(tmp_path):
    """--render runs nothing: the derived summary is recomputed from the rows (a stale one in the file is
    replaced), the markdown rewritten, the rows kept as they were."""
    rows = [_result_row("s2t-spec-tau10-b8", "accuracy", 0.59), _result_row("s2t-spec-tau10-b8-k4", "accuracy", 0.55)]
    payload = {**_payload(), "rows": rows, "details": [],
               "summary": [{"mode": "s2t-spec-tau10", "stale": True}]}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(payload))
    run_bench.render(path)
    again = json.loads(path.read_text())
    assert again["rows"] == rows
    assert [line["mode"] for line in again["summary"]] == ["s2t-spec-tau10", "s2t-spec-tau10-k4"]
    md = (tmp_path / "run.md").read_text()
    assert "| s2t-spec-tau10 | 59.0% (n=100" in md and "| s2t-spec-tau10-k4 | 55.0% (n=100" in md
    assert run_bench.RESULTS == run_bench.BENCH / "results"  # the module's own results dir is left alone

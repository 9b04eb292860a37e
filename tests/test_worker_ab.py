"""bench/worker_ab.py's pairing: the ABBA order and the paired ratio (the servers it starts are split_cores')."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import worker_ab  # noqa: E402
from split_cores import WorkerBusy  # noqa: E402


def test_abba_puts_each_side_first_equally_often_and_cancels_a_linear_drift():
    order = worker_ab.abba(8)
    assert order[:4] == [("a", "b"), ("b", "a"), ("b", "a"), ("a", "b")]
    slots = {"a": [], "b": []}  # the request's index in the whole run: a drift linear in it
    for i, pair in enumerate(order):
        for j, side in enumerate(pair):
            slots[side].append(2 * i + j)
    assert sum(slots["a"]) == sum(slots["b"])


def test_the_paired_ratio_is_the_geometric_mean_of_b_over_a_with_a_t_interval():
    a, b = [10.0, 20.0, 40.0], [11.0, 22.0, 44.0]  # B 10 % slower on every problem, whatever its length
    p = worker_ab.paired_ratio(a, b)
    assert p["n"] == 3 and p["geomean"] == pytest.approx(1.1)
    assert p["ci95"] == pytest.approx([1.1, 1.1])  # no spread
    p = worker_ab.paired_ratio([10.0, 10.0, 10.0, 10.0], [9.0, 11.0, 9.5, 10.5])
    lo, hi = p["ci95"]
    assert lo < p["geomean"] < hi and lo < 1 < hi
    assert p["geomean"] == pytest.approx(math.exp(sum(math.log(x / 10) for x in (9, 11, 9.5, 10.5)) / 4))


def test_a_run_without_a_difference_or_with_one_problem_is_refused():
    with pytest.raises(SystemExit):
        worker_ab.parse_args(["--problems", "4"])  # A and B would be the same workers
    with pytest.raises(SystemExit):
        worker_ab.parse_args(["--problems", "1", "--set-b", "worker.selector_prefill=false"])
    args = worker_ab.parse_args(["--set-b", "worker.selector_prefill=false", "--set", "worker.block_size=4"])
    assert (args.set_a, args.set_b, args.set, args.shape) == ([], ["worker.selector_prefill=false"],
                                                              ["worker.block_size=4"], "split")


def test_the_table_shows_both_workers_and_the_paired_ratio():
    results = {side: [{"tokens": 128, "latency_s": t, "llm_forwards": 30, "resyncs": 0, "rolled_back_tokens": 5,
                       "picks_changed": 4, "branches_adopted": 1 if side == "b" else 0,
                       "branch_drafted_tokens": 9 if side == "b" else 0,
                       "branch_missed_position": 1 if side == "b" else 0, "branch_missed_candidate": 0,
                       "mode_used": "MODE_S2T", "text": "x"}
                      for t in times]
               for side, times in (("a", [16.0, 18.0]), ("b", [17.0, 18.5]))}
    payload = {"name": "t", "command": "python bench/worker_ab.py", "date": "d", "commit": "c",
               "machine": {"cpu": "cpu"}, "mode": "s2t", "shape": "split", "problems": 2, "max_new_tokens": 128,
               "rows": [worker_ab.side_row(s, [] if s == "a" else ["worker.selector_prefill=false"], results[s],
                                           WorkerBusy(17.0, 320.0, 300.0, 20.0) if s == "b" else
                                           WorkerBusy(30.0, 256.0, 256.0, 0.0))
                        for s in ("a", "b")],
               "paired": worker_ab.paired_ratio([16.0, 18.0], [17.0, 18.5]), "same_text": 2,
               "paired_same_text": worker_ab.paired_ratio([16.0, 18.0], [17.0, 18.5]), "notes": ["n"]}
    md = worker_ab.markdown(payload)
    assert "| A | as set for both | 7.53 |" in md and "| B | worker.selector_prefill=false | 7.21 |" in md
    # rolled back; branches adopted / changed picks (missed at another position, another candidate; branch drafts)
    assert "| 10 | 0 / 8 (0, 0; 0) |" in md and "| 10 | 2 / 8 (2, 0; 18) |" in md
    # the SLM's forwards per token and its drafting share of the time, from the worker's metrics
    assert "| 0.234 | 1.000 (88%) | 0 |" in md and "| 0.234 | 1.250 (48%) | 0 |" in md
    assert "geometric mean **1.045**" in md and "identical outputs on 2 of 2 problems" in md
    assert "Over those" not in md  # every problem had the same tokens: one ratio
    payload["same_text"], payload["paired_same_text"] = 1, worker_ab.paired_ratio([16.0], [17.0])
    assert "identical outputs on 1 of 2 problems" in worker_ab.markdown(payload)
    assert "Over those 1 alone (the same tokens on both sides): **1.062**." in worker_ab.markdown(payload)


def test_worker_a_may_run_another_revisions_code(tmp_path, monkeypatch):
    """--a-rev: A's worker runs that commit's tracked files, exported once to a directory of their own, with
    a torch extension directory of their own (its kernels are built from its sources, not loaded from ours)."""
    with pytest.raises(SystemExit):
        worker_ab.parse_args(["--a-rev", "no-such-revision"])
    args = worker_ab.parse_args(["--a-rev", "HEAD"])  # enough to compare: nothing else differs
    head = subprocess.run(["git", "-C", str(worker_ab.ROOT), "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
    assert args.a_rev_commit == head
    assert worker_ab.side_label(args, "a") == [f"code of {head[:12]}"]
    assert worker_ab.side_label(args, "b") == ["this tree's code"]
    monkeypatch.setenv("HOME", str(tmp_path))
    tree, env = worker_ab.checkout(head)
    assert tree.is_relative_to(tmp_path) and Path(env["TORCH_EXTENSIONS_DIR"]).is_relative_to(tmp_path)
    tracked = subprocess.run(["git", "-C", str(worker_ab.ROOT), "show", f"{head}:slm_worker/loop.py"], check=True,
                             capture_output=True).stdout
    assert (tree / "slm_worker" / "loop.py").read_bytes() == tracked
    (tree / "slm_worker" / "loop.py").write_text("kept")  # exported once: the next run reuses the directory
    assert worker_ab.checkout(head)[0] == tree and (tree / "slm_worker" / "loop.py").read_text() == "kept"

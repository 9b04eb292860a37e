"""bench/split_cores.py: worker and selector as separate processes, pinned to a core each (split) and unpinned
(shared), on the tiny random model pair; and its pieces (the Prometheus parsing, the t interval, the shape plan,
the ratios) on exact values.

The end-to-end tests start real `s2t serve-selector --no-ray` / `s2t serve-worker` processes, like
tests/test_process_faults.py; nothing in them is about how long anything took.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import native_ref  # noqa: E402
import split_cores  # noqa: E402
from split_cores import SelectorBusy, Shape, WorkerBusy  # noqa: E402

from s2t.modes import Mode  # noqa: E402

# A selector's /metrics after a few Select and Decode batches (as prometheus_client writes it), with a metric
# whose name starts the same way, which must not be counted.
EXPOSITION = """\
# HELP s2t_selector_forward_seconds wall time of one batched compute, by RPC
# TYPE s2t_selector_forward_seconds histogram
s2t_selector_forward_seconds_bucket{le="0.005",method="select"} 0.0
s2t_selector_forward_seconds_bucket{le="+Inf",method="select"} 3.0
s2t_selector_forward_seconds_count{method="select"} 3.0
s2t_selector_forward_seconds_sum{method="select"} 0.75
s2t_selector_forward_seconds_bucket{le="0.005",method="decode"} 1.0
s2t_selector_forward_seconds_bucket{le="+Inf",method="decode"} 16.0
s2t_selector_forward_seconds_count{method="decode"} 16.0
s2t_selector_forward_seconds_sum{method="decode"} 2.5
# HELP s2t_selector_forward_seconds_created wall time of one batched compute, by RPC
# TYPE s2t_selector_forward_seconds_created gauge
s2t_selector_forward_seconds_created{method="select"} 1.7e+09
s2t_selector_forward_seconds_created{method="decode"} 1.7e+09
# HELP s2t_selector_forward_seconds_extra_sum not the histogram
# TYPE s2t_selector_forward_seconds_extra_sum gauge
s2t_selector_forward_seconds_extra_sum 99.0
# HELP s2t_selector_sessions sessions held
# TYPE s2t_selector_sessions gauge
s2t_selector_sessions 2.0
"""

# What a selector that has computed nothing yet exposes: the histogram has no labelled children.
EMPTY_EXPOSITION = """\
# HELP s2t_selector_forward_seconds wall time of one batched compute, by RPC
# TYPE s2t_selector_forward_seconds histogram
# HELP s2t_selector_sessions sessions held
# TYPE s2t_selector_sessions gauge
s2t_selector_sessions 0.0
"""


# ---- the pieces --------------------------------------------------------------------------------------------


def test_prometheus_samples_are_summed_over_labels_and_split_by_method():
    assert split_cores.sample_total(EXPOSITION, "s2t_selector_forward_seconds_sum") == 3.25
    assert split_cores.sample_total(EXPOSITION, "s2t_selector_forward_seconds_count") == 19.0
    assert split_cores.sample_total(EXPOSITION, "s2t_selector_sessions") == 2.0
    assert split_cores.sample_total(EXPOSITION, "s2t_selector_nothing") == 0.0
    assert split_cores.samples_by_label(EXPOSITION, "s2t_selector_forward_seconds_sum", "method") == {
        "select": 0.75, "decode": 2.5}
    busy = SelectorBusy.parse(EXPOSITION)
    assert busy == SelectorBusy(3.25, 19.0, {"select": 0.75, "decode": 2.5})
    empty = SelectorBusy.parse(EMPTY_EXPOSITION)
    assert empty == SelectorBusy(0.0, 0.0, {})
    assert busy.since(empty) == busy
    later = SelectorBusy(4.0, 21.0, {"select": 1.5, "decode": 2.5})
    assert later.since(busy) == SelectorBusy(0.75, 2.0, {"decode": 0.0, "select": 0.75})


def test_t_quantiles_and_interval_match_the_tables():
    # the 97.5 % quantiles of Student's t (any table): df 1, 2, 3, 4, 10, 30
    for df, quantile in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (10, 2.2281), (30, 2.0423)):
        assert round(split_cores.t_quantile_975(df), 4) == quantile
    assert split_cores.t_two_sided_coverage(0.0, 5) == 0.0
    # df 2 in closed form: P(|T| < t) = t / sqrt(2 + t^2)
    assert split_cores.t_two_sided_coverage(1.5, 2) == pytest.approx(1.5 / math.sqrt(2 + 1.5 ** 2), rel=1e-12)
    # [1, 2, 3]: mean 2, sd 1, half-width 4.3027 / sqrt(3)
    lo, hi = split_cores.t_interval([1.0, 2.0, 3.0])
    half = split_cores.t_quantile_975(2) / math.sqrt(3)
    assert (lo, hi) == pytest.approx((2 - half, 2 + half), rel=1e-12)
    assert split_cores.t_interval([5.0]) is None
    assert split_cores.t_interval([4.0, 4.0]) == (4.0, 4.0)
    with pytest.raises(ValueError):
        split_cores.t_two_sided_coverage(1.0, 0)


def test_the_split_shape_is_skipped_with_a_note_without_taskset_or_a_second_cpu():
    both = [Shape.SPLIT, Shape.SHARED]
    plans, notes = split_cores.plan_shapes(both, [0, 1], have_taskset=True)
    assert [(p.shape, p.worker_cpus, p.selector_cpus, p.threads) for p in plans] == [
        (Shape.SPLIT, (0,), (1,), 1), (Shape.SHARED, None, None, 2)] and notes == []
    assert [p.row_name(Mode.S2T) for p in plans] == ["split-s2t", "s2t"]
    plans, notes = split_cores.plan_shapes(both, [3], have_taskset=True)
    assert [(p.shape, p.threads) for p in plans] == [(Shape.SHARED, 1)]
    assert notes == ["split shape skipped: it needs 2 usable CPUs, this process may use 1 ([3])"]
    plans, notes = split_cores.plan_shapes(both, [0, 1, 2, 3], have_taskset=False)
    assert [(p.shape, p.threads) for p in plans] == [(Shape.SHARED, 4)]
    assert notes == ["split shape skipped: `taskset` (util-linux) is not installed"]
    plans, _ = split_cores.plan_shapes([Shape.SHARED, Shape.SPLIT], [2, 5, 7], have_taskset=True)
    assert [(p.shape, p.worker_cpus, p.selector_cpus) for p in plans] == [
        (Shape.SHARED, None, None), (Shape.SPLIT, (2,), (5,))]


def test_ratios_come_from_the_rows_and_leave_out_what_is_missing():
    rows = [{"kind": "speed", "shape": "split", "request_mode": "greedy", "tokens_per_s": 10.0},
            {"kind": "speed", "shape": "split", "request_mode": "llm", "tokens_per_s": 2.0},
            {"kind": "speed", "shape": "split", "request_mode": "s2t", "tokens_per_s": 5.0},
            {"kind": "speed", "shape": "shared", "request_mode": "greedy", "tokens_per_s": 8.0},
            {"kind": "speed", "shape": "shared", "request_mode": "s2t", "tokens_per_s": 0.0}]
    assert split_cores.ratios(rows) == {
        "split": {"s2t/greedy": 0.5, "s2t/llm": 2.5, "llm/greedy": 0.2},
        "shared": {"s2t/greedy": 0.0},  # no llm row: neither llm ratio
        "split/shared": {"greedy": 1.25},  # shared s2t is 0 tok/s: no ratio over it
    }
    assert split_cores.ratios([]) == {}


def test_memory_summary_reports_the_selector_where_it_is_largest_against_its_budget():
    by_shape = {"split": {"worker_peak_rss_gb": 2.5, "selector_peak_rss_gb": 3.4, "selector_weights_gb": 1.7,
                          "selector_kv_budget_gb": 4.0},
                "shared": {"worker_peak_rss_gb": 3.6, "selector_peak_rss_gb": 11.0, "selector_weights_gb": 9.3,
                           "selector_kv_budget_gb": 4.0}}
    top = split_cores.memory_summary(by_shape)
    assert top["shape"] == "shared" and top["worker"] == 3.6 and top["selector"] == 11.0
    assert (top["selector_weights"], top["selector_kv_budget"]) == (9.3, 4.0)
    assert top["selector_vs_weights_and_kv_budget"] == round(11.0 / 13.3, 3)
    # a shape stopped before its peak was read: the other one reports, and no ratio without the gauges
    top = split_cores.memory_summary({"split": {"worker_peak_rss_gb": 2.0, "selector_peak_rss_gb": 3.0},
                                      "shared": {}})
    assert top["shape"] == "split" and top["selector_weights"] is None
    assert "selector_vs_weights_and_kv_budget" not in top
    assert split_cores.memory_summary({}) == {"by_shape": {}}


def test_peak_rss_is_read_from_proc():
    status = Path(f"/proc/{os.getpid()}/status").read_text()
    kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
    # the high-water mark only grows between the two reads
    assert split_cores.peak_rss_bytes(os.getpid()) >= kb * 1024 > 0


# ---- end to end --------------------------------------------------------------------------------------------


def tiny_settings(tiny_pair, tmp_path: Path, selector_model: Path | str | None = None) -> list[str]:
    """--set values for both processes: the tiny pair, their native float64 weights, cache and data in tmp."""
    return [arg for s in (f"cache_dir={tmp_path / 'cache'}", f"data_dir={tmp_path / 'data'}",
                          f"worker.model={tiny_pair[0]}", f"selector.model={selector_model or tiny_pair[1]}",
                          "worker.runtime.weight_formats=native", "selector.runtime.weight_formats=native")
            for arg in ("--set", s)]


def assert_gone(pid: int) -> None:
    """The process has exited and was reaped (no zombie left under its pid)."""
    assert not Path(f"/proc/{pid}").exists(), f"process {pid} still exists"


@pytest.mark.processes
@pytest.mark.timeout(300)
def test_both_shapes_end_to_end_on_the_tiny_pair(tiny_pair, tmp_path):
    cpus = sorted(os.sched_getaffinity(0))
    plans, _ = split_cores.plan_shapes([Shape.SPLIT, Shape.SHARED], cpus, shutil.which("taskset") is not None)
    shapes = [p.shape.value for p in plans]
    payload = split_cores.main(["--name", "split-test", "--problems", "2", "--max-new", "8", "--stream-gib", "0.02",
                                "--s2t-variants", "s2t-spec-tau1-b4-i3",
                                "--results-dir", str(tmp_path / "results"), *tiny_settings(tiny_pair, tmp_path)])

    expected = [name for p in plans for name in [*map(p.row_name, split_cores.ROW_MODES),
                                                 p.variant_name("s2t-spec-tau1-b4-i3")]]
    # the tiny selector's parameters as loaded by the servers ('native': float64), every one a weight it holds
    from transformers import AutoModelForCausalLM

    selector_bytes = AutoModelForCausalLM.from_pretrained(str(tiny_pair[1])).num_parameters() * 8
    rows = {r["mode"]: r for r in payload["rows"]}
    assert [r["mode"] for r in payload["rows"]] == expected
    if "split" in shapes:
        assert expected == ["split-greedy", "split-llm", "split-s2t", "split-s2t-spec-tau1-b4-i3",
                            "greedy", "llm", "s2t", "s2t-spec-tau1-b4-i3"]
    for plan in plans:  # a variant runs with its own options and is set against its shape's greedy
        variant, greedy = rows[plan.variant_name("s2t-spec-tau1-b4-i3")], rows[plan.row_name(Mode.GREEDY)]
        assert variant["variant"] == "s2t-spec-tau1-b4-i3" and variant["modes_used"] == ["MODE_S2T"]
        assert (variant["trigger"], variant["trigger_rate"], variant["block_size"],
                variant["max_inflight_blocks"]) == ("kl", 0.01, 4, 3)
        assert variant["vs_greedy"] == variant["tokens_per_s"] / greedy["tokens_per_s"]
        assert variant["selector_busy_s"] > 0
    for plan in plans:
        greedy, llm, s2t = (rows[plan.row_name(m)] for m in split_cores.ROW_MODES)
        for row, mode in ((greedy, "greedy"), (llm, "llm"), (s2t, "s2t")):
            assert row["kind"] == "speed" and row["shape"] == plan.shape.value and row["request_mode"] == mode
            assert row["n"] == 2 and 0 < row["tokens"] <= 16 and row["max_new_tokens"] == 8
            assert row["modes_used"] == [f"MODE_{mode.upper()}"]
            assert row["selector_busy_s_per_token"] == row["selector_busy_s"] / row["tokens"]
            assert (row["selector_busy_share"] > 0) is (row["selector_busy_s"] > 0)
            per_problem = row["tokens_per_s_per_problem"]
            lo, hi = per_problem["ci95"]
            assert lo <= per_problem["mean"] <= hi and per_problem["method"].startswith("Student t")
            assert ("note" in row) is (plan.shape is Shape.SHARED)
        # greedy never reaches the selector; llm and s2t keep it busy (the scrape sees it)
        assert greedy["llm_forwards_per_token"] == 0 and greedy["selector_busy_s"] == 0
        assert greedy["selector_forwards"] == 0
        assert llm["llm_forwards_per_token"] > 0 and llm["selector_busy_s"] > 0
        assert set(llm["selector_busy_s_by_method"]) == {"decode"}
        assert s2t["selector_busy_s"] > 0 and s2t["selector_busy_s_by_method"]["select"] > 0
        assert s2t["llm_positions_per_token"] > 0
        assert s2t["trigger"] == "kl" and s2t["block_size"] == 8  # the worker's defaults, reported
        # the worker's drafting forwards: one a committed token for greedy, at least that for s2t, none for llm
        assert greedy["worker_forwards"] == greedy["worker_draft_rows"] == greedy["tokens"]
        assert greedy["worker_forwards_per_token"] == 1 and 0 < greedy["worker_busy_share"] < 1
        assert llm["worker_forwards"] == llm["worker_busy_s"] == 0
        # (a forward that was in flight when a request finished drafts for nobody: at most one a request)
        assert s2t["drafted_tokens"] <= s2t["worker_draft_rows"] == s2t["worker_forwards"] <= s2t["drafted_tokens"] + 2
        assert s2t["worker_busy_s"] > 0 and s2t["worker_branch_rows"] == 0
        # the ratios are the rows' tokens/s
        tps = {m.value: rows[plan.row_name(m)]["tokens_per_s"] for m in split_cores.ROW_MODES}
        assert payload["ratios"][plan.shape.value] == {"s2t/greedy": tps["s2t"] / tps["greedy"],
                                                       "s2t/llm": tps["s2t"] / tps["llm"],
                                                       "llm/greedy": tps["llm"] / tps["greedy"]}
        # batch-1 weight bytes: the tiny models' float64 matrices as loaded (native), and the GB/s they imply
        for row, model in ((greedy, tiny_pair[0]), (llm, tiny_pair[1])):
            config = json.loads((model / "config.json").read_text())
            assert row["weight_bytes_per_token"] == native_ref.engine_bytes_per_token(config, "native")
            assert row["weight_gb_per_s"] == round(row["weight_bytes_per_token"] * row["tokens_per_s"] / 1e9, 2)
        assert "weight_bytes_per_token" not in s2t
        read = payload["stream_read"][plan.shape.value]
        assert read["threads"] == plan.threads and read["gb_per_s"] > 0
        # both processes measured, and what was measured is the server itself, pinned as planned
        memory = payload["memory"]["by_shape"][plan.shape.value]
        assert memory["worker_peak_rss_gb"] > 0 and memory["selector_peak_rss_gb"] > 0
        # the selector's own gauges: its float64 tiny model's parameters as loaded ('native'), the default budget
        assert memory["selector_weights_gb"] == round(selector_bytes / split_cores.GIB, 3)
        assert memory["selector_kv_budget_gb"] == round((4096 << 20) / split_cores.GIB, 3)
        for role in ("worker", "selector"):
            process = payload["processes"][plan.shape.value][role]
            assert process["execs_the_server"] and process["argv0"] == sys.executable
            pinned = plan.cpus(split_cores.Role(role))
            assert process["affinity"] == (list(pinned) if pinned else cpus)
            assert process["stopped"] == "SIGTERM, exit code 0"
            assert_gone(process["pid"])
    if "split" in shapes:
        assert payload["ratios"]["split/shared"] == {
            m.value: rows[f"split-{m.value}"]["tokens_per_s"] / rows[m.value]["tokens_per_s"]
            for m in split_cores.ROW_MODES}
    assert payload["selector_weight_files_gb"] > 0
    # issue #14's top-level keys, from the shape where the selector is largest against its budget
    top = payload["memory"]
    assert top == split_cores.memory_summary(top["by_shape"])
    assert {"worker", "selector", "selector_weights", "selector_kv_budget"} <= set(top)
    # no --llama-cpp given: the native rows are the engine alone, per shape and role, pinned as the servers were
    assert payload["reference_ratios"] == {}
    engine = {r["mode"]: r for r in payload["native_rows"]}
    assert list(engine) == [f"{'split-' if p.shape is Shape.SPLIT else ''}engine-{size}"
                            for p in plans for size in ("0.5b", "1.5b")]
    for plan in plans:
        prefix = "split-" if plan.shape is Shape.SPLIT else ""
        for size, role, mode in (("0.5b", "worker", split_cores.Mode.GREEDY), ("1.5b", "selector", split_cores.Mode.LLM)):
            alone, served = engine[f"{prefix}engine-{size}"], rows[plan.row_name(mode)]
            assert alone["kind"] == "engine" and alone["role"] == role and alone["threads"] == plan.threads
            pinned = plan.cpus(split_cores.Role(role))
            assert alone["cpus"] == (list(pinned) if pinned else "all") and alone["n"] == 2
            assert alone["tokens_per_s"] == alone["tokens"] / alone["seconds"] > 0
            served_counts = [r["tokens"] for r in next(d["results"] for d in payload["details"]
                                                       if d["mode"] == served["mode"])]
            # the tiny pair's float64 weights decode the same tokens with or without the server around them
            assert alone["tokens_per_problem"] == served_counts
            ratio = payload["serving_ratios"][plan.shape.value][f"{mode.value}/engine-{size}"]
            assert ratio == {"ratio": served["tokens_per_s"] / alone["tokens_per_s"], "same_token_counts": 2,
                             "problems": 2}
    # the files: the JSON is the payload, the markdown starts with the command
    written = json.loads((tmp_path / "results" / "split-test.json").read_text())
    assert written["rows"] == payload["rows"] and written["ratios"] == payload["ratios"]
    md = (tmp_path / "results" / "split-test.md").read_text()
    assert md.startswith("# split-test\n\nCommand: `python bench/split_cores.py --name split-test")
    assert all(f"| {name} |" in md for name in expected)
    assert "| s2t-spec-tau1-b4-i3/greedy |" in md
    assert "| greedy/engine-0.5b |" in md and "| llm/engine-1.5b |" in md


@pytest.mark.processes
@pytest.mark.timeout(300)
def test_a_selector_that_cannot_start_stops_both_processes_and_leaves_a_results_file(tiny_pair, tmp_path):
    """The selector's model does not exist: the run fails with the selector's exit, the worker (waiting for it)
    is stopped too, and the results file says why."""
    with pytest.raises(RuntimeError, match="the selector exited with code 1 before it served"):
        split_cores.main(["--name", "broken", "--problems", "1", "--max-new", "4", "--shapes", "shared", "--no-engine",
                          "--results-dir", str(tmp_path / "results"),
                          *tiny_settings(tiny_pair, tmp_path, selector_model=tmp_path / "no-such-model")])
    written = json.loads((tmp_path / "results" / "broken.json").read_text())
    assert written["rows"] == [] and written["shapes"] == ["shared"]
    assert any(n.startswith("stopped early: RuntimeError('the selector exited") for n in written["notes"])
    processes = written["processes"]["shared"]
    assert processes["selector"]["stopped"] == "exited before the stop"
    assert processes["worker"]["stopped"].startswith(("SIGTERM", "SIGKILL"))
    for role in ("worker", "selector"):
        assert_gone(processes[role]["pid"])


def test_reference_ratios_set_our_rows_against_llama_cpp_per_shape():
    rows = [{"shape": "split", "request_mode": "greedy", "tokens_per_s": 10.0},
            {"shape": "split", "request_mode": "llm", "tokens_per_s": 4.0},
            {"shape": "shared", "request_mode": "greedy", "tokens_per_s": 15.0}]
    native = [{"kind": "llama.cpp", "shape": "split", "mode": "split-llama.cpp-0.5b", "tokens_per_s": 20.0},
              {"kind": "llama.cpp", "shape": "split", "mode": "split-llama.cpp-1.5b", "tokens_per_s": 8.0},
              {"kind": "llama.cpp", "shape": "shared", "mode": "llama.cpp-0.5b", "tokens_per_s": 30.0},
              {"kind": "llama.cpp-spec", "shape": "shared", "mode": "llama.cpp-spec-d8", "tokens_per_s": 14.0}]
    got = split_cores.reference_ratios({"rows": rows, "native_rows": native})
    # the shared llm row is missing, so its ratio is left out
    assert got == {"split": {"greedy/llama.cpp-0.5b": 0.5, "llm/llama.cpp-1.5b": 0.5},
                   "shared": {"greedy/llama.cpp-0.5b": 0.5}}


def test_the_per_problem_interval_holds_the_mean_when_every_problem_ran_at_the_same_speed():
    """Two problems of 8 tokens in 0.039 s each: the t interval is [mean, mean]; rounded to 4 decimals it must
    still hold the mean (to nearest, 205.1282 < 205.12820512...)."""
    plan = split_cores.ShapePlan(Shape.SHARED, None, None, 2)
    results = [{"idx": i, "tokens": 8, "correct": False, "latency_s": 0.039, "mode_used": "MODE_GREEDY",
                "degraded": ""} for i in range(2)]
    row = split_cores.speed_row(plan, Mode.GREEDY, results, 0.078, SelectorBusy(0.0, 0.0, {}),
                                WorkerBusy(0.07, 16.0, 16.0, 0.0), 8, {})
    per_problem = row["tokens_per_s_per_problem"]
    lo, hi = per_problem["ci95"]
    assert lo <= per_problem["mean"] <= hi


def test_paired_tools_plan_their_one_shape_as_the_preset_and_start_the_same_servers(monkeypatch):
    monkeypatch.setattr(split_cores.os, "sched_getaffinity", lambda pid: {3})
    with pytest.raises(SystemExit, match="worker_ab: split shape skipped: it needs 2 usable CPUs"):
        split_cores.single_shape(split_cores.Shape.SPLIT, "worker_ab")
    assert split_cores.single_shape(split_cores.Shape.SHARED, "t").threads == 1
    selector = split_cores.selector_command(["selector.max_batch_size=4"], 1, 5000)
    assert selector[:2] == ["--set", "selector.max_batch_size=4"] and selector[-2:] == ["serve-selector", "--no-ray"]
    assert "selector.grpc_port=5000" in selector and not any("metrics_port" in a for a in selector)
    assert "selector.metrics_port=5001" in split_cores.selector_command([], 1, 5000, 5001)
    worker = split_cores.worker_command(["worker.block_size=4", "worker.block_size=16"], 2, 5000)
    assert worker[:4] == ["--set", "worker.block_size=4", "--set", "worker.block_size=16"]  # the later one wins
    assert "worker.selector_address=127.0.0.1:5000" in worker and "worker.runtime.threads=2" in worker
    assert worker[-3:-1] == ["serve-worker", "--wait-for-selector"]
    assert not any("metrics_port" in a for a in worker)
    assert "worker.metrics_port=5002" in split_cores.worker_command([], 1, 5000, 5002)

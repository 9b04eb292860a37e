"""GSM8K benchmark of the S2T service on the embedded models, every mode side by side in one run.

    python bench/run_bench.py               # issue #16's table (preset `paper`): baselines, s2t, sweeps, n = 100
    python bench/run_bench.py full          # the same on all 1,319 GSM8K test problems
    python bench/run_bench.py foundation    # issue: greedy, llm, s2t with the LLM-free trigger at ~10 % / ~20 %
    python bench/run_bench.py speculation   # issue: greedy, llm, hf-assisted, speculative s2t (tau 1 %, 10 %, always)
    python bench/run_bench.py speculation-small --name speculation   # the same at the sizes that fit 60 min here
    python bench/run_bench.py custom --rows greedy,s2t-spec-always-b8 --accuracy-n 5 --speed-n 2
    python bench/run_bench.py custom --name baselines --rows greedy,llm,maj8,takeover,s2t-spec-tau10-b8 \
        --accuracy-n 100 --speed-n 0   # issue #16's baselines: maj8 (majority of 8 samples), takeover
    python bench/run_bench.py --render bench/results/paper.json   # redraw a results file's tables (runs nothing)

Rows `maj8` (bench/majority.py: 8 sampled greedy-mode requests per problem at temperature 0.7, top-p 0.8, seeds
from the problem index and sample number; accuracy is the majority vote, `pass_at_8` any sample correct) and
`takeover` (the LLM's own top-1 replaces the SLM's token where the KL trigger fires, tau 10 %, blocks of 8) are
the references S2T is read against: what sampling more from the SLM gives, and what selecting only among the
SLM's top-K gives up.

Accuracy runs send every problem at once (concurrent sessions: the worker batches their SLM steps, the
selector batches their Select calls); speed runs send one problem at a time (batch-1 tokens/s, the
latency a single user sees). Everything goes through the deployed path: gRPC client -> worker -> Ray
Serve gRPC proxy -> selector replica, all on this machine. HF assisted generation runs in-process with
transformers' `assistant_model=`, on the same weight formats, in a separate process (memory).

Accuracy results are cached per problem under bench/cache/ (bench/problem_cache.py), keyed by what determines
them (model and weight hashes, weight formats, mode options, prompt, token cap): a rerun computes only the
problems whose configuration changed and resumes after a kill; each run recomputes --canaries cached problems
and stops with an error if they differ (--allow-canary-drift records the drift and goes on; --no-cache
computes everything). Canaries are token-exact only at the concurrency the cached results had: sessions share
forwards by arrival time and the weight format follows the row count, so a near-tie can flip (greedy cached at
100 concurrent problems drifted on 2 of 2 canaries recomputed 2 at a time, at tokens 123 and 250, both still
wrong); a rerun at another size needs --allow-canary-drift, and its results record the drift. Accuracy rows on the same problems are compared pairwise (exact McNemar, Tango interval
of the difference, "within --margin points?"; bench/stats.py), and the tau and K sweeps are drawn as PNGs
next to the results (bench/plots.py).

Writes bench/results/<name>.json and <name>.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:  # bench/'s own modules, also when the tests import this file
    sys.path.insert(0, str(BENCH))

import stats  # noqa: E402
from majority import SEED_RULE, combine_samples, sample_seed  # noqa: E402
from problem_cache import DEFAULT_ROOT as CACHE_ROOT, ProblemCache, problem_digest  # noqa: E402
from stats import wilson  # noqa: E402,F401 - re-exported: wilson lived here before bench/stats.py

RESULTS = BENCH / "results"


@dataclasses.dataclass(frozen=True)
class Row:
    """One configuration: a mode name as reported, and the request/worker options that produce it."""

    name: str
    # greedy | llm | s2t | s2t-local | takeover | hf-assisted, or maj8: a majority vote over `samples` sampled
    # requests of mode greedy per problem (bench/majority.py)
    mode: str
    trigger: str = ""
    rate: float = 0.0
    block_size: int = 0
    inflight: int = 0
    k: int = 0  # candidates per position (num_candidates); 0 = the worker's default
    samples: int = 0  # > 0: sampled requests per problem, scored by majority vote (and pass@samples)
    temperature: float = 0.0  # of every sampled request
    top_p: float = 0.0
    confidence: float | None = None  # draft_confidence; None = the worker's default
    draft_when_unsure: bool | None = None  # None = the worker's default
    branch_when_unsure: bool | None = None  # None = the worker's default

    def __post_init__(self):
        if self.samples and not self.temperature > 0:
            raise ValueError(f"row {self.name}: {self.samples} samples per problem need a temperature > 0")

    @property
    def request_mode(self):
        """The s2t.modes.Mode its requests ask for: a majority-vote row samples in mode greedy."""
        from s2t.modes import Mode

        return Mode.GREEDY if self.samples else Mode(self.mode)

    def options(self):
        from s2t.modes import TriggerKind

        sampling = dict(temperature=self.temperature, top_p=self.top_p) if self.samples else {}
        drafting = {} if self.confidence is None else {"draft_confidence": self.confidence}
        if self.draft_when_unsure is not None:
            drafting["draft_when_unsure"] = self.draft_when_unsure
        if self.branch_when_unsure is not None:
            drafting["branch_when_unsure"] = self.branch_when_unsure
        return dict(mode=self.request_mode.proto, trigger=TriggerKind(self.trigger).proto if self.trigger else 0,
                    trigger_rate=self.rate, block_size=self.block_size, num_candidates=self.k, **sampling,
                    **drafting)


def s2t_row(name, trigger, rate, block, inflight):
    return Row(name, "s2t", trigger, rate, block, inflight)


ROWS = {
    "greedy": Row("greedy", "greedy"),
    "llm": Row("llm", "llm"),
    "hf-assisted": Row("hf-assisted", "hf-assisted"),
    # LLM-free trigger, classic S2T: ask at a triggered step and wait (block 1, one in flight)
    "s2t-entropy10": s2t_row("s2t-entropy10", "entropy", 0.10, 1, 1),
    "s2t-entropy20": s2t_row("s2t-entropy20", "entropy", 0.20, 1, 1),
    # the same triggers with block speculation
    "s2t-entropy10-spec": s2t_row("s2t-entropy10-spec", "entropy", 0.10, 8, 2),
    "s2t-entropy20-spec": s2t_row("s2t-entropy20-spec", "entropy", 0.20, 8, 2),
    # S2T-Local: the worker's adapter re-ranks at entropy-triggered positions (needs worker.adapter_dir);
    # one block in flight, since scoring and drafting share the worker's compute thread
    "s2t-local": Row("s2t-local", "s2t-local", "entropy", 0.10, 8, 1),
    "s2t-local-tau1": Row("s2t-local-tau1", "s2t-local", "entropy", 0.01, 8, 1),  # the paper's inference tau
    "s2t-local-tau5": Row("s2t-local-tau5", "s2t-local", "entropy", 0.05, 8, 1),
    "s2t-local-tau20": Row("s2t-local-tau20", "s2t-local", "entropy", 0.20, 8, 1),
    # K, the paper's other knob: re-rank among 16 candidates (the collection's K) instead of the worker's 8
    "s2t-local-k16": Row("s2t-local-k16", "s2t-local", "entropy", 0.10, 8, 1, 16),
    # issue #16's baselines. maj8: self-consistency of the SLM alone, 8 samples at temperature 0.7, top-p 0.8,
    # majority vote (and pass@8). takeover: the upper reference for selection, the LLM's own top-1 where the
    # trigger fires, configured like the default speculative s2t (s2t-spec-tau10-b8).
    "maj8": Row("maj8", "maj8", samples=8, temperature=0.7, top_p=0.8),
    "takeover": Row("takeover", "takeover", "kl", 0.10, 8, 2),
}
for _block in (2, 4, 8, 16):
    for _tag, _trigger, _rate in (("tau1", "kl", 0.01), ("tau10", "kl", 0.10), ("always", "always", 0.0)):
        for _inflight in (1, 2, 3):
            _name = f"s2t-spec-{_tag}-b{_block}" + ("" if _inflight == 2 else f"-i{_inflight}")
            ROWS[_name] = s2t_row(_name, _trigger, _rate, _block, _inflight)
# issue #16's K sweep: the default speculative s2t at other K (K=8 is the worker default, i.e. s2t-spec-tau10-b8)
for _k in (2, 4, 16):
    ROWS[f"s2t-spec-tau10-b8-k{_k}"] = Row(f"s2t-spec-tau10-b8-k{_k}", "s2t", "kl", 0.10, 8, 2, _k)
# the default speculative s2t drafting to the lookahead whatever the odds (issue #14's split shape, where the
# worker's core would otherwise idle while it waits)
ROWS["s2t-spec-tau10-b8-dc0"] = Row("s2t-spec-tau10-b8-dc0", "s2t", "kl", 0.10, 8, 2, confidence=0.0)
# the LLM-free entropy trigger drafting on past its triggered positions whatever the odds: in the split shape the
# worker's core idles while it waits, and a triggered position diverges ~40 % of the time, which the gate's
# default 0.7 always refuses. Blocks of 8 (2 in flight), and blocks of 1 (16 in flight): a triggered draft is
# sent the moment it is drafted instead of when its block of 8 fills.
ROWS["s2t-entropy10-spec-dc0"] = Row("s2t-entropy10-spec-dc0", "s2t", "entropy", 0.10, 8, 2, confidence=0.0)
ROWS["s2t-entropy10-b1-i16-dc0"] = Row("s2t-entropy10-b1-i16-dc0", "s2t", "entropy", 0.10, 1, 16, confidence=0.0)
ROWS["s2t-entropy10-b1-i8-dc0"] = Row("s2t-entropy10-b1-i8-dc0", "s2t", "entropy", 0.10, 1, 8, confidence=0.0)
# the default speculative s2t and the gated entropy row drafting on past an unsure block while holding the
# blocks after it until its verdict (worker.draft_when_unsure; issue #14's split shape)
ROWS["s2t-spec-tau10-b8-dwu"] = Row("s2t-spec-tau10-b8-dwu", "s2t", "kl", 0.10, 8, 2, draft_when_unsure=True)
ROWS["s2t-entropy10-spec-dwu"] = Row("s2t-entropy10-spec-dwu", "s2t", "entropy", 0.10, 8, 2,
                                     draft_when_unsure=True)
# and with blocks of 16 (2 in flight): what deploy/worker.yaml runs (paired A/Bs on the split shape, drafting when
# unsure: blocks of 16 took 0.894x the time of blocks of 8, blocks of 32 1.082x that of 16)
ROWS["s2t-spec-tau10-b16-dwu"] = Row("s2t-spec-tau10-b16-dwu", "s2t", "kl", 0.10, 16, 2, draft_when_unsure=True)
# ... with the second candidate's continuation drafted beside, as deploy/worker.yaml now runs (worker.branch_when_unsure;
# paired A/Bs against s2t-spec-tau10-b16-dwu: 0.855x the time on the split shape, 0.973x on shared cores)
ROWS["s2t-spec-tau10-b16-dwu-br"] = Row("s2t-spec-tau10-b16-dwu-br", "s2t", "kl", 0.10, 16, 2, draft_when_unsure=True,
                                        branch_when_unsure=True)
# ... at tau 5 %: the paper's table put tau 5 % level with `llm` (56/100 each) at 0.031 changed picks per token
# against 0.048 at 10 %, and on the split shape every changed pick throws away what the worker drafted meanwhile
ROWS["s2t-spec-tau5-b16-dwu-br"] = Row("s2t-spec-tau5-b16-dwu-br", "s2t", "kl", 0.05, 16, 2, draft_when_unsure=True,
                                       branch_when_unsure=True)
# and its tau sweep, tau in {1, 5, 10, 20} %, at the default block size (tau 1 % and 10 % are in the grid above)
for _rate in (0.05, 0.20):
    _name = f"s2t-spec-tau{round(_rate * 100)}-b8"
    ROWS[_name] = s2t_row(_name, "kl", _rate, 8, 2)

# Accuracy rows pin the weight formats (row-count buckets 1, 2-4, 5-8, 9-16, 17+): with `auto` the formats are
# measured at start-up, can differ between starts, and are part of the per-problem cache key, so a rerun would
# miss the cache. The pin depends on the CPU: with AVX-512 VNNI, int8_vnni at every row count (the fastest format
# there at every batch size, bench/results/batched-decode-vnni.md, and batch-invariant per linear layer); else
# the portable plan, int8 weights up to 8 rows and packed fp32 above (what the AVX2 machine's rows ran with).
PORTABLE_WEIGHT_FORMATS = "int8,int8,int8,fp32_packed,fp32_packed"


def pinned_weight_formats() -> str:
    from s2t.kernels import cpu_has_avx512_vnni

    return "int8_vnni" if cpu_has_avx512_vnni() else PORTABLE_WEIGHT_FORMATS


PINNED_WEIGHT_FORMATS = pinned_weight_formats()
_PINNED = [f"worker.runtime.weight_formats={PINNED_WEIGHT_FORMATS}",
           f"selector.runtime.weight_formats={PINNED_WEIGHT_FORMATS}"]
# issue #16's table: the paper's baselines, the default s2t (tau 10 %, blocks of 8, K = 8), every-step
# selection, and the tau and K sweeps; `s2t-local` joins when worker.adapter_dir is set
_PAPER_ROWS = ["greedy", "maj8", "takeover", "llm", "s2t-spec-tau10-b8", "s2t-spec-always-b8",
               "s2t-spec-tau1-b8", "s2t-spec-tau5-b8", "s2t-spec-tau20-b8",
               "s2t-spec-tau10-b8-k2", "s2t-spec-tau10-b8-k4", "s2t-spec-tau10-b8-k16"]

_SPEC_ROWS = [f"s2t-spec-{t}-b{b}" for t in ("tau1", "tau10", "always") for b in (4, 8, 16)]
PRESETS = {
    # the default: issue #16's table on the first 100 GSM8K test problems, accuracy only (speed has its presets)
    "paper": dict(rows=_PAPER_ROWS, accuracy_n=100, speed_n=0, speed_max_new=128, settings=_PINNED,
                  rows_with_adapter=["s2t-local"]),
    # the same on all 1,319 test problems (days on the 2-core CPU machine; sized for a GPU machine)
    "full": dict(rows=_PAPER_ROWS, accuracy_n=1319, speed_n=0, speed_max_new=128, settings=_PINNED,
                 rows_with_adapter=["s2t-local"]),
    # the issues' full sizes; each finishes in its time box only on a faster machine than the 2-core AVX2 one
    "foundation": dict(rows=["greedy", "llm", "s2t-entropy10", "s2t-entropy20", "s2t-entropy10-spec",
                             "s2t-entropy20-spec"], accuracy_n=50, speed_n=10, speed_max_new=128),
    "speculation": dict(rows=["greedy", "llm", "hf-assisted"] + _SPEC_ROWS, accuracy_n=100, speed_n=10,
                        speed_max_new=128),
    # both issues' tables from one run on a 2-core machine (shared greedy/llm rows, one start-up): smaller n,
    # accuracy only for one block size per trigger (speed for every block size)
    "both-small": dict(rows=["greedy", "llm", "hf-assisted", "s2t-spec-always-b8", "s2t-spec-tau1-b8",
                             "s2t-spec-tau10-b8", "s2t-entropy10", "s2t-entropy20"]
                       + [r for r in _SPEC_ROWS if not r.endswith("-b8")]
                       + ["s2t-spec-tau1-b8-i1", "s2t-spec-always-b8-i1"],
                       accuracy_rows=["greedy", "llm", "s2t-entropy10", "s2t-entropy20", "s2t-spec-tau1-b8",
                                      "s2t-spec-tau10-b8", "s2t-spec-always-b8"],
                       accuracy_n=12, speed_n=2, speed_max_new=96,
                       files={"foundation": ["greedy", "llm", "s2t-entropy10", "s2t-entropy20"],
                              "speculation": ["greedy", "llm", "hf-assisted"] + _SPEC_ROWS
                              + ["s2t-spec-tau1-b8-i1", "s2t-spec-always-b8-i1"]}),
    # issue #4's table alone on a 2-core machine: llm beside speculative s2t at blocks of 4 and 8, accuracy for
    # blocks of 8 (block size never changes the tokens), hf-assisted speed
    # issue #13: the adapter beside greedy, the default speculative s2t and llm (run with
    # --set worker.adapter_dir=DIR and --extra-rows for the collection and training summaries)
    "s2t-local": dict(rows=["greedy", "s2t-local", "s2t-spec-tau10-b8", "llm"],
                      accuracy_rows=["greedy", "s2t-local", "s2t-spec-tau10-b8", "llm"],
                      speed_rows=["greedy", "s2t-local"], accuracy_n=100, speed_n=3, speed_max_new=128),
    "speculation-small": dict(rows=["llm", "hf-assisted"] + [r for r in _SPEC_ROWS if not r.endswith("-b16")],
                              accuracy_rows=["llm", "s2t-spec-always-b8", "s2t-spec-tau10-b8", "s2t-spec-tau1-b8"],
                              accuracy_n=12, speed_n=2, speed_max_new=96),
}


def preset_settings(preset: dict, command_line: list[str]) -> list[str]:
    """The preset's `KEY=VALUE` settings followed by the command line's, a key set on both only once, with the
    command line's value (so `--set worker.runtime.weight_formats=auto` unpins a preset's formats)."""
    given = {s.split("=", 1)[0] for s in command_line}
    return [s for s in preset.get("settings", []) if s.split("=", 1)[0] not in given] + list(command_line)


def load_row(row: Row, results: list[dict], wall: float, max_new: int) -> dict:
    """Issue #11's load row: every request sent at once; how many degraded, and the latency percentiles."""
    lat = sorted(r["latency_s"] for r in results)
    pct = lambda q: lat[min(len(lat) - 1, math.ceil(q * len(lat)) - 1)]  # noqa: E731 - nearest-rank percentile
    return {"mode": row.name, "kind": "load", "concurrency": len(results), "n": len(results),
            "degraded": sum(1 for r in results if r["degraded"] or r["unverified_tokens"]),
            "p50_s": pct(0.50), "p99_s": pct(0.99), "wall_s": round(wall, 1), "max_new_tokens": max_new,
            "tokens_per_s": sum(r["tokens"] for r in results) / wall if wall else 0.0,
            "modes_used": sorted({r["mode_used"] for r in results})}


def pass_at_k(row: Row, results: list[dict]) -> dict:
    """A majority row's pass@k (k = row.samples: any sample correct), with its Wilson interval, as
    {"pass_at_8": ..., "pass_at_8_ci95": [...], "pass_at_8_correct": ...} for k = 8."""
    n, solved = len(results), sum(bool(r["any_correct"]) for r in results)
    lo, hi = wilson(solved, n)
    name = f"pass_at_{row.samples}"
    return {name: solved / n if n else 0.0, f"{name}_ci95": [round(lo, 4), round(hi, 4)], f"{name}_correct": solved}


def summarize(row: Row, kind: str, results: list[dict], wall: float, extra: dict | None = None) -> dict:
    n = len(results)
    tokens = sum(r["tokens"] for r in results)
    correct = sum(r["correct"] for r in results)
    lo, hi = wilson(correct, n)
    stat = lambda k: sum(r.get(k, 0) for r in results)  # noqa: E731
    out = {"mode": row.name, "kind": kind, "request_mode": row.mode, "dataset": "gsm8k-test", "n": n,
           "first_problem": results[0]["idx"] if results else None,
           "accuracy": correct / n if n else 0.0, "accuracy_ci95": [round(lo, 4), round(hi, 4)], "correct": correct,
           "tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": tokens / wall if wall else 0.0,
           "llm_positions_per_token": stat("positions_checked") / tokens if tokens else 0.0,
           "changed_per_token": stat("picks_changed") / tokens if tokens else 0.0,
           # positions the worker's LLM-free trigger fired at: what the local re-ranker scores in s2t-local
           "triggered_per_token": stat("triggered_positions") / tokens if tokens else 0.0,
           "llm_forwards_per_token": stat("llm_forwards") / tokens if tokens else 0.0,
           "bytes_per_token": (stat("bytes_sent") + stat("bytes_received")) / tokens if tokens else 0.0,
           "unverified_tokens": stat("unverified_tokens"), "rolled_back_tokens": stat("rolled_back_tokens"),
           "drafted_tokens": stat("drafted_tokens"), "resyncs": stat("resyncs"),
           "trigger": row.trigger, "trigger_rate": row.rate, "block_size": row.block_size,
           "max_inflight_blocks": row.inflight,
           "modes_used": sorted({r["mode_used"] for r in results})}
    out.update(extra or {})
    return out


async def generate_one(stack, row: Row, p: dict, max_new: int, concurrent: bool, seed: int = 0,
                       gate: asyncio.Semaphore | None = None) -> dict:
    """One request for a problem through the service (a sampled one with `seed`); the result record of the
    details and of the problem cache. `gate` bounds the requests in flight (see request_gate)."""
    from s2t.v1 import generation_pb2 as pb
    from s2t import gsm8k

    # Concurrent accuracy runs queue every session's prefill on one selector: its first replies take
    # minutes on 2 cores, so they wait (verify policy `wait`) instead of degrading after the 30 s default.
    deadline = dict(verify_deadline_ms=900_000) if concurrent else {}
    sampled = dict(seed=seed) if row.samples else {}
    async with gate if gate is not None else contextlib.nullcontext():
        sent = time.monotonic()
        r = await stack.stub.Generate(pb.GenerateRequest(
            prompt=p["question"], options=pb.GenerationOptions(max_new_tokens=max_new, **deadline, **row.options(),
                                                               max_inflight_blocks=row.inflight or 0, **sampled)))
    st = r.stats
    return {"idx": p["idx"], "tokens": st.completion_tokens, "correct": gsm8k.is_correct(r.text, p["gold"]),
            "pred": gsm8k.extract(r.text), "gold": p["gold"], "wall_s": st.wall_s,
            "positions_checked": st.positions_checked, "picks_changed": st.picks_changed,
            "llm_forwards": st.llm_forwards, "bytes_sent": st.selector_bytes_sent,
            "bytes_received": st.selector_bytes_received, "unverified_tokens": st.unverified_tokens,
            "rolled_back_tokens": st.rolled_back_tokens, "drafted_tokens": st.drafted_tokens,
            "resyncs": st.resyncs, "triggered_positions": st.triggered_positions,
            "branch_drafted_tokens": st.branch_drafted_tokens, "branches_adopted": st.branches_adopted,
            "branch_missed_position": st.branch_missed_position,
            "branch_missed_candidate": st.branch_missed_candidate,
            "mode_used": pb.Mode.Name(st.mode_used), "text": r.text,
            "degraded": st.degraded_reason, "latency_s": round(time.monotonic() - sent, 3),
            "token_ids": list(r.token_ids), **({"seed": st.seed} if row.samples else {})}


async def solve_one(stack, row: Row, p: dict, max_new: int, concurrent: bool,
                    gate: asyncio.Semaphore | None = None, on_request=None) -> dict:
    """One problem's result record: one request, or for a majority-vote row `row.samples` sampled requests
    (sent together, seeds from majority.sample_seed) combined by majority.combine_samples. `on_request()` is
    called as each request completes (a progress bar that moves before all of a problem's samples are in)."""
    async def one(seed: int = 0) -> dict:
        result = await generate_one(stack, row, p, max_new, concurrent, seed, gate)
        if on_request is not None:
            on_request()
        return result

    if not row.samples:
        return await one()
    sent = time.monotonic()
    samples = await asyncio.gather(*[one(sample_seed(p["idx"], k)) for k in range(row.samples)])
    return combine_samples(p, samples, time.monotonic() - sent)


def request_gate(stack) -> asyncio.Semaphore | None:
    """A bound on the requests one row keeps in flight: the worker's max_concurrent_requests, which an accuracy
    run of a majority-vote row (problems x samples at once) would exceed and be refused (RESOURCE_EXHAUSTED).
    None for a stack that does not say (the tests' fakes)."""
    settings = getattr(stack, "settings", None)
    limit = getattr(getattr(settings, "worker", None), "max_concurrent_requests", None)
    return asyncio.Semaphore(limit) if isinstance(limit, int) and limit > 0 else None


def _without_token_ids(result: dict) -> dict:
    """The details in the results JSON leave the token ids out (they stay in the cache): 100 problems x 4 rows
    of a few hundred ids each would dwarf everything else in the file. Also a majority row's samples'."""
    out = {k: v for k, v in result.items() if k != "token_ids"}
    if "samples" in out:
        out["samples"] = [_without_token_ids(s) for s in out["samples"]]
    return out


async def run_service_row(stack, row: Row, problems: list[dict], max_new: int, concurrent: bool) -> tuple[list, float]:
    """Speed runs (one at a time) and load runs (all at once); never cached: they measure time."""
    t0 = time.monotonic()
    if concurrent:
        gate = request_gate(stack)
        results = list(await asyncio.gather(*[solve_one(stack, row, p, max_new, True, gate) for p in problems]))
    else:
        results = [await solve_one(stack, row, p, max_new, False) for p in problems]
    return [_without_token_ids(r) for r in results], time.monotonic() - t0


# ---- accuracy rows: cached per problem, with canaries ----------------------------------------------------

def stack_identity(stack) -> dict:
    """What the running stack contributes to the cache key of an accuracy row: model names and weight hashes
    as loaded, the weight formats and compute dtype actually in use ('auto' resolved), the prompt (system
    prompt and the chat template's hash), the worker's defaults for options a row leaves unset, the trigger
    thresholds in force, and the S2T-Local adapter loaded (version and a hash of its files)."""
    from s2t.model_store import resolve_model
    from s2t.vocab import hash_weight_files, weights_sha256

    worker, settings = stack.worker, stack.settings
    lm, info, ws = worker.lm, worker.selector_info, settings.worker
    adapter = worker.adapters.current()
    template = getattr(lm.tokenizer, "chat_template", None) or ""
    return {
        "slm": {"model": lm.name, "weights_sha256": lm.weights_sha256, "vocab_sha256": lm.vocab_sha256,
                "weight_formats": lm.plan.describe(),
                "compute_dtype": str(lm.compute_dtype).removeprefix("torch.")},
        # the selector reports its name and formats; its weights hash is read where it loaded them (the manifest
        # caches it, so this costs nothing after the selector's own start)
        "llm": {"model": info.model_name, "vocab_sha256": info.vocab_sha256, "weight_formats": info.weight_formats,
                "weights_sha256": weights_sha256(resolve_model(settings.selector.model, settings.cache_dir))},
        "prompt": {"system_prompt": ws.system_prompt,
                   "chat_template_sha256": hashlib.sha256(str(template).encode("utf-8")).hexdigest()},
        "worker": {"num_candidates": ws.num_candidates, "trigger": ws.trigger, "trigger_rate": ws.trigger_rate,
                   "warmup_steps": ws.warmup_steps, "block_size": ws.block_size,
                   "max_inflight_blocks": ws.max_inflight_blocks, "draft_confidence": ws.draft_confidence,
                   "draft_when_unsure": ws.draft_when_unsure, "branch_when_unsure": ws.branch_when_unsure,
                   "decode_chunk": ws.decode_chunk},
        "thresholds": {"entropy": worker.thresholds["entropy"].as_dict(),
                       "margin": worker.thresholds["margin"].as_dict(),
                       "kl": {str(k): float(v) for k, v in sorted(info.kl_thresholds.items())}},
        "adapter": None if adapter is None else {"version": adapter.version,
                                                 "files_sha256": hash_weight_files(adapter.path)},
    }


def row_cache_key(identity: dict, row: Row, max_new: int, split: str = "test") -> dict:
    """Everything that determines one problem's result in this row, and nothing else (so that, e.g., a greedy
    row is reused when only the LLM changed). The commit is not part of it: the canaries catch code changes."""
    from s2t.modes import Mode, TriggerKind

    mode, defaults = row.request_mode, identity["worker"]
    key: dict = {"dataset": {"name": "gsm8k", "split": split}, "mode": mode.value, "max_new_tokens": max_new,
                 "prompt": identity["prompt"]}
    if row.samples:  # a majority-vote row: what is sampled, with which seeds, and how the samples are scored
        key["sampling"] = {"temperature": row.temperature, "top_p": row.top_p, "samples": row.samples,
                           "seed_rule": SEED_RULE,
                           "seeds_of_problem_0": [sample_seed(0, k) for k in range(row.samples)],
                           "aggregate": "majority vote, ties to the first sample's answer; pass@samples"}
    if mode is Mode.LLM:
        # the LLM generates alone; the worker still applies the chat template with the SLM's tokenizer
        key["llm"] = identity["llm"]
        key["tokenizer_vocab_sha256"] = identity["slm"]["vocab_sha256"]
        key["decode_chunk"] = defaults["decode_chunk"]
        return key
    key["slm"] = identity["slm"]
    if not mode.verified:
        return key
    trigger = TriggerKind(row.trigger or defaults["trigger"])
    if mode is Mode.S2T_LOCAL and trigger is TriggerKind.KL:
        trigger = TriggerKind.ENTROPY  # what the worker does: the KL oracle needs the LLM
    key["generation"] = {"trigger": trigger.value, "trigger_rate": row.rate or defaults["trigger_rate"],
                         "num_candidates": row.k or defaults["num_candidates"],
                         "block_size": row.block_size or defaults["block_size"],
                         "max_inflight_blocks": row.inflight or defaults["max_inflight_blocks"],
                         "warmup_steps": defaults["warmup_steps"],
                         "draft_confidence": defaults["draft_confidence"] if row.confidence is None else row.confidence}
    # keyed only when on, so the rows cached before the setting existed keep their keys
    if defaults.get("draft_when_unsure", False) if row.draft_when_unsure is None else row.draft_when_unsure:
        key["generation"]["draft_when_unsure"] = True
        # a branch's drafts come from two-row forwards: the same tokens only where that format is batch-invariant
        if defaults.get("branch_when_unsure", False) if row.branch_when_unsure is None else row.branch_when_unsure:
            key["generation"]["branch_when_unsure"] = True
    if trigger is not TriggerKind.ALWAYS:
        key["thresholds"] = identity["thresholds"][trigger.value]
    if mode.selector_verified:  # s2t, takeover
        key["llm"] = identity["llm"]
    else:
        key["adapter"] = identity["adapter"]
    return key


def reusable(result: dict, row: Row) -> bool:
    """Only results produced as configured are cached: a degraded request (selector timeout, no adapter,
    unverified tokens) says something about that run, not about the configuration."""
    from s2t.v1 import generation_pb2 as gen_pb

    return (result["mode_used"] == gen_pb.Mode.Name(row.request_mode.proto) and not result.get("degraded")
            and not result.get("unverified_tokens"))


def pick_canaries(cached: list[int], n: int) -> list[int]:
    """n of the cached problem indices, spread evenly over them (the first and the last for n = 2)."""
    if n <= 0 or not cached:
        return []
    if n >= len(cached):
        return list(cached)
    if n == 1:
        return [cached[0]]
    return sorted({cached[round(i * (len(cached) - 1) / (n - 1))] for i in range(n)})


def compare_canary(idx: int, cached: dict, fresh: dict) -> dict:
    """Does a recomputed problem reproduce its cached result? By token ids where both have them, else by text;
    the correctness must agree too. Says where the outputs part. A majority row's problem is compared sample by
    sample: `first_difference` is then the first sample that differs, `sample` its own report."""
    if "samples" in cached and "samples" in fresh:
        reports = [compare_canary(idx, c, f) for c, f in zip(cached["samples"], fresh["samples"])]
        first = next((k for k, r in enumerate(reports) if not r["matched"]), None)
        if first is None and len(cached["samples"]) != len(fresh["samples"]):
            first = min(len(cached["samples"]), len(fresh["samples"]))
        report = {"idx": idx, "matched": first is None and bool(cached["correct"]) == bool(fresh["correct"]),
                  "compared": "samples", "first_difference": first, "cached_tokens": cached["tokens"],
                  "fresh_tokens": fresh["tokens"], "cached_correct": bool(cached["correct"]),
                  "fresh_correct": bool(fresh["correct"]), "fresh_mode_used": fresh["mode_used"],
                  "fresh_degraded": fresh.get("degraded", "")}
        if first is not None and first < len(reports):
            report["sample"] = reports[first]
        return report
    if cached.get("token_ids") is not None and fresh.get("token_ids") is not None:
        basis, old, new = "token_ids", cached["token_ids"], fresh["token_ids"]
    else:
        basis, old, new = "text", cached["text"], fresh["text"]
    first = next((i for i, (x, y) in enumerate(zip(old, new)) if x != y), None)
    if first is None and len(old) != len(new):
        first = min(len(old), len(new))
    c = next((i for i, (x, y) in enumerate(zip(cached["text"], fresh["text"])) if x != y),
             None if len(cached["text"]) == len(fresh["text"]) else min(len(cached["text"]), len(fresh["text"])))
    report = {"idx": idx, "matched": first is None and bool(cached["correct"]) == bool(fresh["correct"]),
              "compared": basis, "first_difference": first, "cached_tokens": cached["tokens"],
              "fresh_tokens": fresh["tokens"], "cached_correct": bool(cached["correct"]),
              "fresh_correct": bool(fresh["correct"]), "fresh_mode_used": fresh["mode_used"],
              "fresh_degraded": fresh.get("degraded", "")}
    if first is not None and basis == "token_ids":
        report.update(cached_ids_there=old[first:first + 8], fresh_ids_there=new[first:first + 8])
    if c is not None:
        lo = max(0, c - 40)
        report.update(first_text_difference=c, cached_text_there=cached["text"][lo:c + 40],
                      fresh_text_there=fresh["text"][lo:c + 40])
    return report


class CanaryMismatch(RuntimeError):
    """Recomputed cached problems came out differently: the cache no longer describes this code and these
    models (or batching changed a near-tie). Rerun with --no-cache, clear the row's cache file, or accept the
    drift with --allow-canary-drift."""

    def __init__(self, row_name: str, reports: list[dict], cache_path: Path | None):
        self.row_name, self.reports, self.cache_path = row_name, reports, cache_path
        bad = [r for r in reports if not r["matched"]]
        parts = [f"problem {r['idx']}: first {r['compared']} difference at position {r['first_difference']}"
                 f" (cached correct={r['cached_correct']}, fresh correct={r['fresh_correct']})" for r in bad]
        super().__init__(f"{row_name}: {len(bad)} of {len(reports)} canaries differ from the cache {cache_path}: "
                         + "; ".join(parts))


@dataclasses.dataclass
class AccuracyRun:
    results: list[dict]  # one per requested problem, in order; cached ones marked from_cache
    wall: float  # this run's time for the problems it computed (and the canaries)
    computed: int  # problems computed in this run (canaries not counted)
    reused: int  # problems taken from the cache
    fresh_tokens: int  # tokens generated in this run, canaries included: tokens/s is fresh_tokens / wall
    canaries: list[dict]  # compare_canary reports
    cache_path: Path | None

    def cache_summary(self) -> dict:
        return {"file": str(self.cache_path) if self.cache_path else None, "computed": self.computed,
                "reused": self.reused, "canaries": self.canaries,
                "canaries_matched": sum(1 for c in self.canaries if c["matched"])}


async def run_accuracy_row(stack, row: Row, problems: list[dict], max_new: int, cache: ProblemCache | None,
                           canaries: int = 2, allow_drift: bool = False, progress: bool = True) -> AccuracyRun:
    """An accuracy row: the problems the cache lacks, plus `canaries` cached ones, all sent at once.

    Each result is written to the cache as it completes, so a killed run loses only the problems still in
    flight. Raises CanaryMismatch if a canary differs from its cached result, unless allow_drift (the reports
    then say where). The results cover every requested problem (cached and new), in the requested order."""
    from tqdm import tqdm

    digests = {p["idx"]: problem_digest(p) for p in problems}
    missing = set(cache.missing([p["idx"] for p in problems], digests)) if cache is not None else {
        p["idx"] for p in problems}
    cached = [p["idx"] for p in problems if p["idx"] not in missing]
    canary_idx = set(pick_canaries(cached, canaries))
    jobs = [(p, False) for p in problems if p["idx"] in missing] + [(p, True) for p in problems
                                                                    if p["idx"] in canary_idx]

    gate = request_gate(stack)

    # the bar counts requests: a majority row's problem is `samples` of them, and all of them are in flight
    # together, so counting problems would leave the bar (and its ETA) at 0 until the first wave of samples ends
    per_problem = row.samples or 1
    bar = tqdm(total=len(jobs) * per_problem, desc=f"[bench] {row.name}", unit="request", file=sys.stderr,
               dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0, disable=not progress or not jobs)

    async def job(p: dict, is_canary: bool) -> tuple[dict, bool, dict]:
        return p, is_canary, await solve_one(stack, row, p, max_new, True, gate, lambda: bar.update(1))

    fresh: dict[int, dict] = {}
    canary_fresh: dict[int, dict] = {}
    bar.set_postfix(cached=len(cached), canaries=len(canary_idx), refresh=False)
    t0 = time.monotonic()
    tasks = [asyncio.ensure_future(job(p, is_canary)) for p, is_canary in jobs]
    try:
        for next_done in asyncio.as_completed(tasks):
            p, is_canary, result = await next_done
            if is_canary:
                canary_fresh[p["idx"]] = result
            else:
                fresh[p["idx"]] = result
                if cache is not None and reusable(result, row):
                    cache.put(p["idx"], result, digests[p["idx"]])
            bar.set_postfix(cached=len(cached), canaries=len(canary_idx), problems_done=len(fresh) + len(canary_fresh),
                            refresh=False)
    finally:
        # on an error (or a cancel) the finished results are already in the cache; stop the others
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        bar.close()
    wall = time.monotonic() - t0

    results = []
    for p in problems:
        if p["idx"] in fresh:
            results.append({**_without_token_ids(fresh[p["idx"]]), "from_cache": False})
        else:
            results.append({**_without_token_ids(cache.get(p["idx"], digests[p["idx"]])), "from_cache": True})
    reports = [compare_canary(i, cache.get(i, digests[i]), canary_fresh[i]) for i in sorted(canary_idx)]
    for r in reports:
        if not r["matched"]:
            print(f"[bench] CANARY MISMATCH {row.name} problem {r['idx']}: first {r['compared']} difference at "
                  f"position {r['first_difference']}; cached {r.get('cached_ids_there')} correct={r['cached_correct']}"
                  f" vs fresh {r.get('fresh_ids_there')} correct={r['fresh_correct']}; cached text "
                  f"{r.get('cached_text_there')!r} vs fresh {r.get('fresh_text_there')!r}", file=sys.stderr, flush=True)
    run = AccuracyRun(results=results, wall=wall, computed=len(fresh), reused=len(problems) - len(fresh),
                      fresh_tokens=sum(r["tokens"] for r in [*fresh.values(), *canary_fresh.values()]),
                      canaries=reports, cache_path=cache.path if cache is not None else None)
    if not allow_drift and any(not r["matched"] for r in reports):
        raise CanaryMismatch(row.name, reports, run.cache_path)
    return run


@dataclasses.dataclass(frozen=True)
class CacheOptions:
    enabled: bool = True
    root: Path = CACHE_ROOT
    canaries: int = 2
    allow_drift: bool = False
    # (row name, cache file) -> when and at what cost the row's problems were last computed, from the results
    # file this run replaces (last_computations): a row that is all cached now keeps that record
    previous: Mapping = dataclasses.field(default_factory=dict)


def last_computations(payload: Mapping) -> dict:
    """(row name, cache file) -> {computed, wall_s, tokens_per_s, date, commit} of the run that last computed
    each accuracy row's problems: the row itself if it computed any, else the record it carried."""
    out = {}
    for r in payload.get("rows", []):
        cache = r.get("cache") or {}
        if r.get("kind") != "accuracy" or not cache.get("file"):
            continue
        if cache.get("computed"):
            out[(r["mode"], cache["file"])] = {"computed": cache["computed"], "wall_s": r["wall_s"],
                                               "tokens_per_s": r["tokens_per_s"], "date": payload.get("date"),
                                               "commit": payload.get("commit")}
        elif r.get("last_computed"):
            out[(r["mode"], cache["file"])] = r["last_computed"]
    return out


# ---- paired comparisons ----------------------------------------------------------------------------------

def paired_comparisons(rows: list[dict], details: list[dict], margin: float = 0.01) -> list[dict]:
    """Every pair of accuracy rows run on the same problems: exact McNemar, the difference with its 95% score
    interval, and whether A is within ±margin of B. With llm in a pair it is B (A - llm); otherwise the rows'
    order. `highlight`: an S2T row (any s2t-* mode) against llm, the issue's question."""
    outcomes = {d["mode"]: {r["idx"]: bool(r["correct"]) for r in d["results"]}
                for d in details if d.get("kind") == "accuracy"}
    names = [r["mode"] for r in rows if r.get("kind") == "accuracy" and outcomes.get(r["mode"])]
    out = []
    for first, second in itertools.combinations(dict.fromkeys(names), 2):
        a, b = (second, first) if first == "llm" else (first, second)
        if set(outcomes[a]) != set(outcomes[b]):
            continue  # different problem lists: not paired
        idxs = sorted(outcomes[a])
        answer = stats.within_margin([outcomes[a][i] for i in idxs], [outcomes[b][i] for i in idxs], margin, (a, b))
        out.append({"a": a, "b": b, "problem_range": [idxs[0], idxs[-1]], **answer.as_dict(),
                    "highlight": a.startswith("s2t") and b == "llm"})
    return out


def paired_table(paired: list[dict]) -> str:
    if not paired:
        return ""
    m = f"{100 * paired[0]['margin']:g} point" + ("" if 100 * paired[0]["margin"] == 1 else "s")
    head = (f"| A | B | n | A accuracy | B accuracy | A - B, points (95% CI) | solved by A alone / B alone | "
            f"exact McNemar p | A within ±{m} of B? |\n|---|---|---|---|---|---|---|---|---|\n")
    body = ""
    for p in paired:
        bold = "**" if p["highlight"] else ""
        lo, hi = p["difference_ci95"]
        body += (f"| {bold}{p['a']}{bold} | {bold}{p['b']}{bold} | {p['n']} | {p['accuracy_a']:.1%} | "
                 f"{p['accuracy_b']:.1%} | {100 * p['difference']:+.1f} ({100 * lo:+.1f} to {100 * hi:+.1f}) | "
                 f"{p['only_a']} / {p['only_b']} | {p['mcnemar_p']:.3g} | {bold}{p['verdict']}{bold} |\n")
    notes = "".join(f"\n**{p['a']} vs {p['b']}, within ±{m}?** {p['explanation']}\n"
                    for p in paired if p["highlight"])
    return (head + body + notes + "\nDifference interval: Tango's score interval for paired proportions; "
            f"'within' means the whole interval lies inside ±{m} (two one-sided score tests at 2.5%); "
            "'undecided' means it crosses a margin: more problems are needed.\n")


def run_hf_assisted(problems: list[dict], max_new: int, settings) -> tuple[list, float, dict]:
    """transformers' assisted generation: the 1.5B verifies, the 0.5B drafts (batch 1 only)."""
    import torch

    from s2t import gsm8k
    from s2t.runtime import load_model
    from s2t.prompts import chat_prompt_ids

    slm = load_model(settings.worker.model, settings.cache_dir, settings.worker.runtime.weight_formats)
    llm = load_model(settings.selector.model, settings.cache_dir, settings.selector.runtime.weight_formats)
    tok = llm.tokenizer
    results, wall = [], 0.0
    for p in problems:
        ids = torch.tensor([chat_prompt_ids(tok, settings.worker.system_prompt, p["question"])])
        t0 = time.monotonic()
        with torch.inference_mode():
            out = llm.model.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=slm.model,
                                     do_sample=False, max_new_tokens=max_new, eos_token_id=list(llm.stop_ids),
                                     pad_token_id=tok.pad_token_id)
        dt = time.monotonic() - t0
        wall += dt
        gen = out[0, ids.shape[1]:].tolist()
        text = tok.decode(gen, skip_special_tokens=True)
        results.append({"idx": p["idx"], "tokens": len(gen), "correct": gsm8k.is_correct(text, p["gold"]),
                        "pred": gsm8k.extract(text), "gold": p["gold"], "wall_s": dt, "mode_used": "hf-assisted",
                        "text": text})
    return results, wall, {"weight_formats": {"slm": slm.plan.describe(), "llm": llm.plan.describe()}}


def machine() -> dict:
    import torch
    import transformers

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return ""


def commit_of(rev: str) -> str:
    """The full hash of the commit git revision `rev` names here (bench/kernel_ab.py's base, bench/worker_ab.py's
    --a-rev); ValueError saying why where it names none."""
    found = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], capture_output=True,
                           text=True, cwd=Path(__file__).parent)
    if found.returncode:
        raise ValueError(f"{rev!r} is not a commit in this repository")
    return found.stdout.strip()


def table(rows: list[dict]) -> str:
    head = ("| mode | kind | n | accuracy (95% CI) | tokens/s | wall s | LLM positions/token | changed/token | "
            "LLM forwards/token | bytes/token | unverified |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    def acc(r):  # speed runs stop at a small token cap, so their accuracy says nothing
        if r["kind"] == "speed":
            return "–"
        return f"{r['accuracy']:.1%} ({r['accuracy_ci95'][0]:.0%}–{r['accuracy_ci95'][1]:.0%})"

    other = [r for r in rows if r["kind"] not in ("accuracy", "speed")]
    rows = [r for r in rows if r["kind"] in ("accuracy", "speed")]
    body = "".join(
        f"| {r['mode']} | {r['kind']} | {r['n']} | {acc(r)} | {r['tokens_per_s']:.2f} | {r['wall_s']:.0f} | "
        f"{r['llm_positions_per_token']:.3f} | {r['changed_per_token']:.3f} | {r['llm_forwards_per_token']:.3f} | "
        f"{r['bytes_per_token']:.0f} | {r['unverified_tokens']} |\n" for r in rows)
    extra = "".join(f"\n- {r['mode']} ({r['kind']}): `{json.dumps(r)}`" for r in other)
    return head + body + (("\nOther stages of this run:" + extra + "\n") if extra else "")


# the part of a speculative row's name that names its block size and blocks in flight (`-b8`, `-b4-i1`)
_SPECULATION_SHAPE = re.compile(r"-b\d+(?:-i\d+)?(?=-|$)")


def best_per_mode(rows: list[dict]) -> list[dict]:
    """One line per reported mode: accuracy from its accuracy run, speed from its fastest speed run.

    Speculative rows that differ only in block size / blocks in flight never change the emitted tokens
    (tests/test_worker.py), so `s2t-spec-tau1-b8` accuracy holds for `s2t-spec-tau1-b4` too. Every other
    part of a row's name (K, the trigger rate) stays in the line's name: `s2t-spec-tau10-b8-k4` selects among
    other candidates than `s2t-spec-tau10-b8` and is a line of its own."""
    out = {}
    for r in [r for r in rows if r["kind"] in ("accuracy", "speed")]:
        mode = _SPECULATION_SHAPE.sub("", r["mode"]) if r["mode"].startswith("s2t-spec-") else r["mode"]
        line = out.setdefault(mode, {"mode": mode, "dataset": r["dataset"], "n": 0, "accuracy": None,
                                     "accuracy_ci95": None, "tokens_per_s": 0.0, "speed_config": None})
        if r["kind"] == "accuracy":
            line.update(n=r["n"], accuracy=r["accuracy"], accuracy_ci95=r["accuracy_ci95"],
                        accuracy_wall_s=r["wall_s"], accuracy_tokens_per_s=r["tokens_per_s"])
        elif r["tokens_per_s"] > line["tokens_per_s"]:
            line.update(tokens_per_s=r["tokens_per_s"], wall_s=r["wall_s"], speed_config=r["mode"],
                        speed_n=r["n"], **{k: r[k] for k in ("llm_positions_per_token", "changed_per_token",
                                                              "llm_forwards_per_token", "bytes_per_token")})
    return list(out.values())


def summary_table(lines: list[dict]) -> str:
    head = ("| mode | accuracy (n, 95% CI) | batch-1 tokens/s | fastest config | LLM forwards/token | "
            "LLM positions/token | changed/token | bytes/token |\n|---|---|---|---|---|---|---|---|\n")
    fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    return head + "".join(
        f"| {r['mode']} | " + ("–" if r["accuracy"] is None else
                               f"{r['accuracy']:.1%} (n={r['n']}, {r['accuracy_ci95'][0]:.0%}–"
                               f"{r['accuracy_ci95'][1]:.0%})")
        + f" | {fmt(r['tokens_per_s'] if r['speed_config'] else None, '.2f')} | {r['speed_config'] or '–'} | {fmt(r.get('llm_forwards_per_token'), '.3f')} | "
        f"{fmt(r.get('llm_positions_per_token'), '.3f')} | {fmt(r.get('changed_per_token'), '.3f')} | "
        f"{fmt(r.get('bytes_per_token'), '.0f')} |\n" for r in lines)


def draw_plots(json_path: Path, payload: dict) -> list[Path]:
    """The tau and K pictures next to the results file. A plotting failure costs the pictures, never the run:
    they can be drawn later with `python bench/plots.py FILE.json`."""
    try:
        import plots

        return plots.write_plots(json_path, payload)
    except ImportError as e:
        print(f"[bench] no plots: {e} (pip install matplotlib, or the dev extras)", file=sys.stderr, flush=True)
    except Exception as e:  # noqa: BLE001 - see the docstring
        print(f"[bench] plotting {json_path.name} failed: {e!r}; results are written", file=sys.stderr, flush=True)
    return []


def command_line(script: str, argv_shown: list[str]) -> str:
    """`python <script> <args>`, after the S2T_* environment variables set (they change what the engine does);
    as `env K=V python ...`, so it still runs after a prefix such as `taskset -c 1`."""
    env = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("S2T_")]
    return " ".join([*(["env", *env] if env else []), f"python {script}", *argv_shown])


def results_header(name: str, script: str, argv_shown: list[str]) -> dict:
    """What every results file starts with: its name, the command that made it (command_line), when, at which
    commit, where."""
    return {"name": name, "command": command_line(script, argv_shown),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": git_commit(), "machine": machine()}


def write_results(results_dir: Path, payload: dict, markdown: str) -> None:
    """<results_dir>/<payload name>.json (the payload) and .md (its table)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{payload['name']}.json").write_text(json.dumps(payload, indent=1))
    (results_dir / f"{payload['name']}.md").write_text(markdown)


def write(name: str, payload: dict, split: dict[str, list[str]] | None = None) -> None:
    """Write <name>.json/.md, and for a preset with per-issue files, one table per issue from the same run."""
    for file_name, keep in (split or {}).items():
        rows_kept = [r for r in payload["rows"] if r["mode"] in keep]
        write(file_name, {**payload, "rows": rows_kept, "summary": best_per_mode(rows_kept),
                          "details": [d for d in payload["details"] if d["mode"] in keep]})
    if "summary" not in payload and any(r["kind"] == "accuracy" for r in payload["rows"]):
        payload = {**payload, "summary": best_per_mode(payload["rows"])}
    payload = {**payload, "paired": paired_comparisons(payload["rows"], payload["details"],
                                                       payload.get("paired_margin", 0.01))}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1))
    images = draw_plots(RESULTS / f"{name}.json", payload)
    md = [f"# {name}\n", f"Command: `{payload['command']}`  \n", f"Date: {payload['date']}; commit {payload['commit']}  \n",
          f"Machine: {payload['machine']['cpu']} ({payload['machine']['cores']} cores, "
          f"torch CPU capability {payload['machine']['cpu_capability']})  \n",
          f"Weight formats: {json.dumps(payload.get('weight_formats', {}))}  \n",
          f"Settings: {json.dumps(payload['settings'])}\n\n"]
    if payload.get("summary"):
        md += ["## Per mode (accuracy run + fastest speed run)\n\n", summary_table(payload["summary"]),
               "\n## Every run\n\n"]
    md.append(table(payload["rows"]))
    if payload["paired"]:
        md += ["\n## Paired comparisons (same problems)\n\n", paired_table(payload["paired"])]
    if images:
        md += ["\n## Plots\n\n"] + [f"![{p.stem}]({p.name})\n" for p in images]
    if payload.get("notes"):
        md.append("\n" + "\n".join(f"- {n}" for n in payload["notes"]) + "\n")
    (RESULTS / f"{name}.md").write_text("".join(md))
    # issue #16: the README's table follows the paper preset's results file (not a results dir a test redirected)
    if name == "paper" and RESULTS == BENCH / "results":
        try:
            import readme_section

            readme_section.update_readme(RESULTS / f"{name}.json", PRESETS["paper"]["rows"])
        except Exception as e:  # noqa: BLE001 - the README is a copy; never lose a run over it
            print(f"[bench] README not regenerated: {e!r} (python bench/readme_section.py)", file=sys.stderr,
                  flush=True)


async def run_stack_rows(settings, rows: list[Row], acc_problems, speed_problems, speed_max_new, acc_max_new,
                         payload, name, accuracy_rows=None, split=None, speed_rows=None,
                         load_problems=(), load_rows=(), load_max_new=64,
                         cache_options: CacheOptions = CacheOptions(enabled=False)) -> None:
    from s2t.stack import LocalStack
    from s2t.v1 import generation_pb2 as gen_pb

    async with LocalStack(settings) as stack:
        payload["weight_formats"] = stack.describe()
        payload["startup_s"] = round(stack.startup_s, 1)
        identity = None
        if cache_options.enabled and acc_problems:
            identity = stack_identity(stack)
            payload["cache"] = {"dir": str(cache_options.root), "canaries": cache_options.canaries,
                                "allow_canary_drift": cache_options.allow_drift, "identity": identity}
        for row in [r for r in rows if r.name in load_rows] if load_problems else []:
            print(f"[bench] {row.name} load: {len(load_problems)} requests at once ...", file=sys.stderr, flush=True)
            results, wall = await run_service_row(stack, row, load_problems, load_max_new, True)
            payload["rows"].append(load_row(row, results, wall, load_max_new))
            payload["details"].append({"mode": row.name, "kind": "load", "results": results})
            print(f"[bench]   {json.dumps(payload['rows'][-1])}", file=sys.stderr, flush=True)
            write(name, payload, split)
        for row in rows:
            for kind, problems, max_new, concurrent in (("accuracy", acc_problems, acc_max_new, True),
                                                        ("speed", speed_problems, speed_max_new, False)):
                if not problems or (kind == "accuracy" and accuracy_rows is not None
                                    and row.name not in accuracy_rows) or (
                        kind == "speed" and speed_rows is not None and row.name not in speed_rows):
                    continue
                print(f"[bench] {row.name} {kind}: {len(problems)} problems ...", file=sys.stderr, flush=True)
                extra = {"max_new_tokens": max_new}
                if row.samples:
                    extra.update(samples=row.samples, temperature=row.temperature, top_p=row.top_p)
                if row.request_mode.verified:
                    extra["num_candidates"] = row.k or stack.settings.worker.num_candidates
                run = None
                if kind == "accuracy":
                    cache = None
                    if identity is not None:
                        cache = ProblemCache(cache_options.root, row_cache_key(identity, row, max_new), row.mode)
                        missing = cache.missing([p["idx"] for p in problems], {p["idx"]: problem_digest(p)
                                                                               for p in problems})
                        print(f"[bench]   cache {cache.path}: {len(problems) - len(missing)} of {len(problems)} "
                              f"problems cached", file=sys.stderr, flush=True)
                    try:
                        run = await run_accuracy_row(stack, row, problems, max_new, cache, cache_options.canaries,
                                                     cache_options.allow_drift)
                    except CanaryMismatch as e:
                        payload.setdefault("canary_failures", []).append(
                            {"mode": row.name, "cache_file": str(e.cache_path), "canaries": e.reports})
                        payload["notes"].append(f"{row.name}: stopped, canaries differ from the cache: {e}")
                        write(name, payload, split)
                        raise
                    results, wall = run.results, run.wall
                    if cache is not None:
                        extra["cache"] = run.cache_summary()
                else:
                    results, wall = await run_service_row(stack, row, problems, max_new, concurrent)
                summary = summarize(row, kind, results, wall, extra)
                if row.samples:
                    summary.update(pass_at_k(row, results))
                if run is not None:  # time covers only what this run computed: tokens/s over those tokens
                    summary["tokens_per_s"] = run.fresh_tokens / wall if wall else 0.0
                    last = cache_options.previous.get((row.name, str(run.cache_path)))
                    if run.computed == 0 and last:
                        summary["last_computed"] = last
                payload["rows"].append(summary)
                payload["details"].append({"mode": row.name, "kind": kind, "results": results})
                cached_note = (f", {run.reused} cached + {run.computed} computed, canaries "
                               f"{sum(c['matched'] for c in run.canaries)}/{len(run.canaries)} matched"
                               if run is not None and identity is not None else "")
                print(f"[bench]   accuracy {summary['accuracy']:.3f}, {summary['tokens_per_s']:.2f} tok/s, "
                      f"{wall:.0f}s, modes used {summary['modes_used']}{cached_note}", file=sys.stderr, flush=True)
                if run is not None and any(not c["matched"] for c in run.canaries):
                    payload["notes"].append(f"{row.name}: canaries drifted from the cache (--allow-canary-drift); "
                                            f"the row uses the cached results, see rows[].cache.canaries")
                if summary["modes_used"] != [gen_pb.Mode.Name(row.request_mode.proto)]:
                    payload["notes"].append(f"{row.name} {kind}: some requests degraded (modes used "
                                            f"{summary['modes_used']}); see details")
                write(name, payload, split)


def render(path: Path) -> None:
    """Rewrite a results file's tables from its rows: the summary and the paired comparisons are derived, so they
    are recomputed; the rows, details and records stay as the run wrote them."""
    global RESULTS
    payload = json.loads(path.read_text())
    if any(r["kind"] == "accuracy" for r in payload["rows"]):
        payload["summary"] = best_per_mode(payload["rows"])
    before, RESULTS = RESULTS, path.resolve().parent
    try:
        write(path.stem, payload)
    finally:
        RESULTS = before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", nargs="?", default="paper", choices=[*PRESETS, "custom"],
                    help="which table (default: paper, issue #16's rows at n = 100)")
    ap.add_argument("--name", help="results file name (default: the preset)")
    ap.add_argument("--rows", help="comma-separated row names (custom); known: " + ", ".join(ROWS))
    ap.add_argument("--accuracy-n", type=int)
    ap.add_argument("--speed-n", type=int)
    ap.add_argument("--speed-max-new", type=int, help="token cap of the speed runs")
    ap.add_argument("--max-new", type=int, default=512, help="token cap of the accuracy runs")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="settings override (repeatable)")
    ap.add_argument("--load", type=int, default=0, metavar="N",
                    help="load runs: N requests at once (GSM8K test 0..N-1) per row in --load-rows")
    ap.add_argument("--load-rows", default="llm,s2t-spec-tau10-b8", help="rows of the load runs")
    ap.add_argument("--load-max-new", type=int, default=64)
    ap.add_argument("--extra-rows", nargs="*", default=[], metavar="JSON",
                    help="JSON files of rows to add (s2t collect / s2t distill summaries)")
    ap.add_argument("--no-cache", action="store_true",
                    help="compute every accuracy problem; neither read nor write the per-problem cache")
    ap.add_argument("--cache-dir", type=Path, default=CACHE_ROOT, help="per-problem cache (default: bench/cache)")
    ap.add_argument("--canaries", type=int, default=2, metavar="N",
                    help="cached problems recomputed per accuracy row and compared with the cache (default 2)")
    ap.add_argument("--allow-canary-drift", action="store_true",
                    help="on a canary mismatch, record it and go on instead of stopping")
    ap.add_argument("--previous-results", nargs="+", type=Path, default=[], metavar="FILE",
                    help="results files (e.g. an earlier run under another --name) whose records of when and at what "
                         "cost a row's cached problems were computed carry over to rows this run finds all cached; "
                         "the results file this run replaces always counts (and wins)")
    ap.add_argument("--margin", type=float, default=1.0, metavar="POINTS",
                    help="paired comparisons answer 'is A within this many accuracy points of B' (default 1)")
    ap.add_argument("--render", type=Path, metavar="FILE.json",
                    help="run nothing: rewrite FILE's markdown, plots and (for paper.json) the README block from its "
                         "rows, e.g. after a change to how the tables are drawn")
    ap.add_argument("--hf-assisted-worker", help=argparse.SUPPRESS)  # internal: run hf-assisted in a subprocess
    args = ap.parse_args()
    if args.render:
        render(args.render)
        return
    if not 0 < args.margin < 100:
        ap.error(f"--margin is in accuracy points, in (0, 100); got {args.margin}")
    if args.canaries < 0:
        ap.error(f"--canaries must be >= 0; got {args.canaries}")

    import yaml

    from s2t import gsm8k
    from s2t.config import load_settings

    preset = PRESETS.get(args.preset, {"rows": [], "accuracy_n": 0, "speed_n": 0, "speed_max_new": 128})
    row_names = args.rows.split(",") if args.rows else preset["rows"]
    load_rows = args.load_rows.split(",") if args.load else []
    rows = [ROWS[r] for r in dict.fromkeys(row_names + load_rows)]
    acc_n = preset["accuracy_n"] if args.accuracy_n is None else args.accuracy_n
    speed_n = preset["speed_n"] if args.speed_n is None else args.speed_n
    speed_max_new = args.speed_max_new or preset["speed_max_new"]
    # the preset's settings first, the command line's --set over them (same key: the command line wins)
    args.set = preset_settings(preset, args.set)
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    settings = load_settings(**overrides)
    if settings.worker.adapter_dir and not args.rows:
        rows += [ROWS[r] for r in preset.get("rows_with_adapter", []) if ROWS[r] not in rows]

    if args.hf_assisted_worker:  # child process: HF assisted generation only
        problems = gsm8k.load("test", 0, speed_n)
        results, wall, extra = run_hf_assisted(problems, speed_max_new, settings)
        Path(args.hf_assisted_worker).write_text(json.dumps({"results": results, "wall": wall, "extra": extra}))
        return

    name = args.name or args.preset
    split = preset.get("files")
    acc_problems = gsm8k.load("test", 0, acc_n) if acc_n else []
    speed_problems = gsm8k.load("test", 0, speed_n) if speed_n else []
    payload = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": git_commit(), "machine": machine(),
               "settings": {"worker": {k: getattr(settings.worker, k) for k in ("model", "num_candidates",
                                                                                  "max_batch_size", "warmup_steps",
                                                                                  "draft_confidence")},
                            "selector": {k: getattr(settings.selector, k) for k in ("model", "max_batch_size")},
                            "accuracy_max_new_tokens": args.max_new, "speed_max_new_tokens": speed_max_new},
               "paired_margin": args.margin / 100, "rows": [], "details": [], "notes": []}
    previous = {}
    for path in [*args.previous_results, RESULTS / f"{name}.json"]:
        if path.is_file():
            previous.update(last_computations(json.loads(path.read_text())))
    cache_options = CacheOptions(enabled=not args.no_cache, root=args.cache_dir, canaries=args.canaries,
                                 allow_drift=args.allow_canary_drift, previous=previous)
    t0 = time.monotonic()
    if any(r.mode == "hf-assisted" for r in rows) and speed_problems:
        print(f"[bench] hf-assisted speed: {len(speed_problems)} problems ...", file=sys.stderr, flush=True)
        out = Path(RESULTS / f".{name}.hf.json")
        RESULTS.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, __file__, "custom", "--speed-n", str(speed_n), "--speed-max-new", str(speed_max_new),
               "--hf-assisted-worker", str(out)] + [f"--set={s}" for s in args.set]
        subprocess.run(cmd, check=True)
        hf = json.loads(out.read_text())
        out.unlink()
        payload["rows"].append(summarize(ROWS["hf-assisted"], "speed", hf["results"], hf["wall"],
                                         {"max_new_tokens": speed_max_new, **hf["extra"]}))
        payload["details"].append({"mode": "hf-assisted", "kind": "speed", "results": hf["results"]})
        payload["notes"].append("hf-assisted runs batch 1 only (transformers' assisted generation does not batch), "
                                "so its accuracy is over the speed problems, with the speed runs' token cap.")
        write(name, payload, split)
    service_rows = [r for r in rows if r.mode != "hf-assisted"]
    if service_rows:
        asyncio.run(run_stack_rows(settings, service_rows, acc_problems, speed_problems, speed_max_new, args.max_new,
                                   payload, name, preset.get("accuracy_rows"), split, preset.get("speed_rows"),
                                   gsm8k.load("test", 0, args.load) if args.load else (), load_rows,
                                   args.load_max_new, cache_options))
    for path in args.extra_rows:  # e.g. the collection and training summaries of the same run
        payload["rows"].append(json.loads(Path(path).read_text()))
    payload["total_wall_s"] = round(time.monotonic() - t0, 1)
    write(name, payload, split)
    print(table(payload["rows"]))


if __name__ == "__main__":
    main()

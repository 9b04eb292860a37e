"""The selector on compute of its own (issue #14, item 3): worker and selector as two processes, each pinned to a
core of its own, beside the same two processes sharing every core, in one run.

    python bench/split_cores.py                                  # 3 GSM8K test problems, 128 tokens, both shapes
    python bench/split_cores.py --name split-cores --problems 3 --max-new 128 --shapes split,shared \
        --set selector.runtime.weight_formats=int8,int8,int8,fp32_packed,fp32_packed

Shapes (each with its own pair of processes, started, measured and stopped before the next):

  split   `s2t serve-selector --no-ray` under `taskset -c <second CPU>` with selector.runtime.threads=1, and
          `s2t serve-worker` under `taskset -c <first CPU>` with worker.runtime.threads=1: on a 2-core machine the
          closest it gets to the selector on a host of its own (no core is shared; memory bandwidth and caches
          still are). Rows `split-greedy`, `split-llm`, `split-s2t`.
  shared  the same two processes unpinned, each with as many torch threads as the machine has cores: both
          compete for every core, the shape of everything on one host. Rows `greedy`, `llm`, `s2t`. The selector
          here is the --no-ray server, not run_bench's Ray Serve deployment (which adds its proxy hop).

With --s2t-variants ROWS (run_bench rows, e.g. s2t-spec-tau10-b16-i3,s2t-entropy10-spec) each shape also runs
those s2t configurations, each request carrying the row's own trigger, rate, block size and blocks in flight;
each such row reports `vs_greedy` (its tokens/s ÷ the shape's greedy) and stays out of `ratios`.

Every row is batch 1 (one request at a time, the latency a single user sees) over the first --problems GSM8K test
problems, capped at --max-new tokens: mode greedy (the SLM alone), llm (the selector's model alone), s2t (the
worker's default configuration: no trigger or block-size overrides). Requests go through the worker's Generation
gRPC service exactly as run_bench's speed rows send them (run_bench.run_service_row), so the rows' fields mean the
same; to those each row adds:

  - tokens_per_s_per_problem: the mean of the per-problem tokens/s (tokens / the client's latency) with a 95 %
    Student t interval (n - 1 degrees of freedom; exact t quantiles for integer df, no scipy). The row's
    `tokens_per_s` is run_bench's: all tokens / the row's wall time (a ratio of sums, not this mean).
  - selector busy time, scraped from the selector's Prometheus endpoint (selector.metrics_port) before and after
    the row: Δ s2t_selector_forward_seconds_sum (every batched compute, Select and Decode) per committed token, and
    as a share of the row's wall time. The scrape after a row waits until the forward count has stopped moving,
    so a speculative block the selector was still computing when the last reply came is counted in its row.
  - the worker's drafting, scraped from its Prometheus endpoint (worker.metrics_port) the same way: its SLM
    forwards per committed token (what the edge pays per token: 1 for greedy, more where drafts are rolled back)
    and Δ s2t_worker_forward_seconds_sum as a share of the row's wall time (near 1: drafting keeps the worker's
    compute busy, and what s2t loses against greedy is the drafts a verdict threw away, not waiting).

`ratios` compares tokens/s within each shape (s2t ÷ greedy, s2t ÷ llm, llm ÷ greedy) and each mode across shapes
(split ÷ shared). `memory.by_shape` holds each process's peak RSS (VmHWM of /proc/<pid>/status, read just before
it is stopped; taskset execs the command, so the pid is the server's own, which `processes` verifies from its
/proc/<pid>/cmdline) and, from the selector's gauges, its weights as held in memory (every weight format's copy)
and its KV budget; `memory` itself has issue #14's keys (`worker`, `selector`, `selector_weights`,
`selector_kv_budget`, GB = 2^30 bytes) for the shape where the selector is largest against weights + KV budget.
`selector_weight_files_gb` is the size of its weight files as stored. Without `taskset` or with fewer than
two usable CPUs the split shape is skipped with a note.

Before the shapes, with no server up: a streaming read of memory per shape (torch summing a 1 GiB buffer with the
shape's threads; the box's practical bandwidth) and, given --llama-cpp DIR, llama.cpp on the same pinned GGUF files
(bench/native_ref.py): `llama.cpp-0.5b` / `llama.cpp-1.5b` (llama-bench tg<max-new>, batch 1, every core) and
`split-llama.cpp-0.5b` / `split-llama.cpp-1.5b` (one thread on the worker's / selector's core), and
`llama.cpp-spec-d<N>` (llama-speculative-simple, 0.5B drafting up to N tokens for the 1.5B, greedy, on problem 0).
`reference_ratios` sets our greedy and llm rows against them (issue #14's target: at least 1), and every batch-1
row carries the weight bytes it reads per token and the GB/s that implies. Then (unless --no-engine) the engine
alone on the same problems, pinned and threaded as the shape's server will be (bench/engine_decode.py: the role's
model and runtime settings, `Engine.forward` per token, no server): `[split-]engine-0.5b` / `[split-]engine-1.5b`;
`serving_ratios` sets greedy and llm against them (issue #14: the serving path may cost at most 10 %).

Results are written after every row to <results dir>/<name>.json and .md (default bench/results/), so a crash
leaves the finished rows. --set KEY=VALUE goes to both processes (the shape's threads, ports and metrics port are
set by this script and win).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import enum
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import time
import types
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:  # bench/'s own modules, also when the tests import this file
    sys.path.insert(0, str(BENCH))

import native_ref  # noqa: E402
import run_bench  # noqa: E402
from run_bench import Row, command_line, git_commit, machine  # noqa: E402

from s2t.modes import Mode  # noqa: E402

ROOT = BENCH.parent
# How long a process may take to load its model and serve (the real pair with `auto` weight formats measures
# them at start-up, on one core in the split shape), and how long it may drain after SIGTERM before SIGKILL
# (idle servers exit at once; the servers' own default shutdown grace is 25 s).
START_TIMEOUT_S = 900.0
STOP_GRACE_S = 30.0
# The selector's histogram of batched computes (llm_selector/metrics.py): `_sum` is its busy time.
FORWARD_SECONDS = "s2t_selector_forward_seconds"
# The worker's histogram of drafting forwards and the rows they fed (slm_worker/metrics.py): `_sum` is how busy
# drafting kept its compute.
WORKER_FORWARD_SECONDS = "s2t_worker_forward_seconds"
WORKER_FORWARD_ROWS = "s2t_worker_forward_rows_total"
# The scrape after a row: the forward count must stay put for this long (longer than one forward of the real
# selector on 2 cores), checked at most SETTLE_TRIES times.
SETTLE_S = 1.0
SETTLE_TRIES = 10
GIB = 1 << 30
SHARED_NOTE = ("the shared shape here is the --no-ray selector (a plain grpc.aio server in its own process); "
               "the Ray Serve path is run_bench's")


class Shape(enum.Enum):
    """Where the two processes run."""

    SPLIT = "split"  # each pinned to a core of its own, one thread each
    SHARED = "shared"  # both unpinned, every core's worth of threads each


class Role(enum.Enum):
    """The two server processes of a shape."""

    WORKER = "worker"
    SELECTOR = "selector"


# The rows of every shape, in the order they run: greedy first, so that no selector work of an earlier row can
# land in the row that must show none.
ROW_MODES = (Mode.GREEDY, Mode.LLM, Mode.S2T)


@dataclasses.dataclass(frozen=True)
class ShapePlan:
    """One shape as it will run: the CPUs each process is pinned to (None: unpinned) and its torch threads."""

    shape: Shape
    worker_cpus: tuple[int, ...] | None
    selector_cpus: tuple[int, ...] | None
    threads: int

    def row_name(self, mode: Mode) -> str:
        return f"split-{mode.value}" if self.shape is Shape.SPLIT else mode.value

    def variant_name(self, row: str) -> str:
        return f"split-{row}" if self.shape is Shape.SPLIT else row

    def cpus(self, role: Role) -> tuple[int, ...] | None:
        return self.worker_cpus if role is Role.WORKER else self.selector_cpus


def plan_shapes(shapes: list[Shape], cpus: list[int], have_taskset: bool) -> tuple[list[ShapePlan], list[str]]:
    """The runnable shapes, in the order asked, and a note for each skipped one. The split shape needs `taskset`
    and two usable CPUs (the worker gets the first, the selector the second); the shared shape gives each process
    as many threads as there are usable CPUs."""
    plans, notes = [], []
    for shape in shapes:
        if shape is Shape.SHARED:
            plans.append(ShapePlan(shape, None, None, max(1, len(cpus))))
        elif not have_taskset:
            notes.append("split shape skipped: `taskset` (util-linux) is not installed")
        elif len(cpus) < 2:
            notes.append(f"split shape skipped: it needs 2 usable CPUs, this process may use {len(cpus)} ({cpus})")
        else:
            plans.append(ShapePlan(shape, (cpus[0],), (cpus[1],), 1))
    return plans, notes


def single_shape(shape: Shape, tool: str) -> ShapePlan:
    """The one shape a paired tool (worker_ab, llama_paired) runs in, planned as the preset plans it; the tool
    exits with plan_shapes' reason when this box cannot run it."""
    plans, notes = plan_shapes([shape], sorted(os.sched_getaffinity(0)), shutil.which("taskset") is not None)
    if not plans:
        raise SystemExit(f"{tool}: {notes[0]}")
    return plans[0]


def selector_command(user_settings: list[str], threads: int, grpc_port: int, metrics_port: int | None = None
                     ) -> list[str]:
    """`s2t` arguments of a --no-ray selector with the user's --set overrides, `threads` torch threads, on
    `grpc_port` (and a /metrics endpoint on `metrics_port`)."""
    own = {"selector.runtime.threads": threads, "selector.grpc_port": grpc_port}
    if metrics_port is not None:
        own["selector.metrics_port"] = metrics_port
    return [arg for s in user_settings for arg in ("--set", s)] + set_flags(own) + ["serve-selector", "--no-ray"]


def worker_command(user_settings: list[str], threads: int, selector_port: int, metrics_port: int | None = None
                   ) -> list[str]:
    """`s2t` arguments of a worker on a free port with the user's --set overrides (the worker's own last, so they
    win), `threads` torch threads, talking to the selector on `selector_port` (and a /metrics endpoint on
    `metrics_port`)."""
    own = {"worker.runtime.threads": threads, "worker.port": 0, "worker.selector_address": f"127.0.0.1:{selector_port}"}
    if metrics_port is not None:
        own["worker.metrics_port"] = metrics_port
    return [arg for s in user_settings for arg in ("--set", s)] + set_flags(own) + [
        "serve-worker", "--wait-for-selector", str(START_TIMEOUT_S)]


# ---- statistics and parsing --------------------------------------------------------------------------------


def t_two_sided_coverage(t: float, df: int) -> float:
    """P(|T| < t) for Student's T with integer df >= 1, exactly: Abramowitz & Stegun 26.7.3 (odd df) and 26.7.4
    (even df), finite series in θ = atan(t / sqrt(df))."""
    if df < 1:
        raise ValueError(f"Student's t needs df >= 1, got {df}")
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2 == 0:  # sin θ · (1 + 1/2 c² + 1·3/(2·4) c⁴ + ... up to c^(df-2))
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= (2 * k - 1) / (2 * k) * c2
            total += term
        return math.sin(theta) * total
    if df == 1:
        return 2 * theta / math.pi
    # (2/π)·(θ + sin θ · (cos θ + 2/3 cos³θ + 2·4/(3·5) cos⁵θ + ... up to cos^(df-2) θ))
    term = math.cos(theta)
    total = term
    for k in range(1, (df - 1) // 2):
        term *= (2 * k) / (2 * k + 1) * c2
        total += term
    return 2 / math.pi * (theta + math.sin(theta) * total)


def t_quantile_975(df: int) -> float:
    """The 97.5 % quantile of Student's t with df degrees of freedom (the half-width factor of a two-sided 95 %
    interval), by bisection on the exact coverage to 1e-12."""
    lo, hi = 0.0, 1e6
    while hi - lo > 1e-12 * max(1.0, hi):
        mid = (lo + hi) / 2
        if t_two_sided_coverage(mid, df) < 0.95:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def t_interval(values: list[float]) -> tuple[float, float] | None:
    """The 95 % Student t interval of the mean of `values`; None for fewer than two (no spread to go on)."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return (mean - half, mean + half)


def sample_total(exposition: str, sample_name: str) -> float:
    """The sum over every label set of the samples named `sample_name` (e.g. `s2t_selector_forward_seconds_sum`)
    in a Prometheus text exposition; 0 when there is none (a histogram without observations has no labelled
    children yet)."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(sample.value for family in text_string_to_metric_families(exposition)
               for sample in family.samples if sample.name == sample_name)


def samples_by_label(exposition: str, sample_name: str, label: str) -> dict[str, float]:
    """The samples named `sample_name`, summed per value of `label` (e.g. per `method`)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == sample_name and label in sample.labels:
                out[sample.labels[label]] = out.get(sample.labels[label], 0.0) + sample.value
    return out


@dataclasses.dataclass(frozen=True)
class SelectorBusy:
    """The selector's forward histogram at one moment: busy seconds and batched computes, in all and by RPC."""

    seconds: float
    forwards: float
    seconds_by_method: dict[str, float]

    @classmethod
    def parse(cls, exposition: str) -> "SelectorBusy":
        return cls(sample_total(exposition, f"{FORWARD_SECONDS}_sum"),
                   sample_total(exposition, f"{FORWARD_SECONDS}_count"),
                   samples_by_label(exposition, f"{FORWARD_SECONDS}_sum", "method"))

    def since(self, before: "SelectorBusy") -> "SelectorBusy":
        methods = set(self.seconds_by_method) | set(before.seconds_by_method)
        return SelectorBusy(self.seconds - before.seconds, self.forwards - before.forwards,
                            {m: self.seconds_by_method.get(m, 0.0) - before.seconds_by_method.get(m, 0.0)
                             for m in sorted(methods)})


@dataclasses.dataclass(frozen=True)
class WorkerBusy:
    """The worker's drafting forwards at one moment: their seconds on its compute thread, their count, and the
    rows they fed (requests' drafts, branches')."""

    seconds: float
    forwards: float
    draft_rows: float
    branch_rows: float

    @classmethod
    def parse(cls, exposition: str) -> "WorkerBusy":
        rows = samples_by_label(exposition, WORKER_FORWARD_ROWS, "row")
        return cls(sample_total(exposition, f"{WORKER_FORWARD_SECONDS}_sum"),
                   sample_total(exposition, f"{WORKER_FORWARD_SECONDS}_count"),
                   rows.get("draft", 0.0), rows.get("branch", 0.0))

    def since(self, before: "WorkerBusy") -> "WorkerBusy":
        return WorkerBusy(self.seconds - before.seconds, self.forwards - before.forwards,
                          self.draft_rows - before.draft_rows, self.branch_rows - before.branch_rows)


def exposition(metrics_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as reply:
        return reply.read().decode("utf-8")


def scrape(metrics_port: int) -> SelectorBusy:
    return SelectorBusy.parse(exposition(metrics_port))


def selector_budget_gb(text: str) -> dict[str, float]:
    """What the selector holds by design, from its gauges: its weights in memory (every format copy) and its
    configured KV budget, in GB (2^30 bytes)."""
    return {"selector_weights_gb": round(sample_total(text, "s2t_selector_weight_bytes") / GIB, 3),
            "selector_kv_budget_gb": round(sample_total(text, "s2t_selector_kv_budget_bytes") / GIB, 3)}


def memory_summary(by_shape: dict[str, dict]) -> dict:
    """The top-level memory record (issue #14's keys, GB = 2^30 bytes) from the per-shape peaks and budgets: the
    shape where the selector's peak RSS is largest against its weights + KV budget (the issue's bound: 1.3x),
    and the worker's largest peak."""
    def ratio(m: dict) -> float | None:
        budget = m.get("selector_weights_gb", 0) + m.get("selector_kv_budget_gb", 0)
        return m["selector_peak_rss_gb"] / budget if budget and "selector_peak_rss_gb" in m else None

    shapes = {shape: m for shape, m in by_shape.items() if "selector_peak_rss_gb" in m}
    out: dict = {"by_shape": by_shape}
    workers = [m["worker_peak_rss_gb"] for m in by_shape.values() if "worker_peak_rss_gb" in m]
    if workers:
        out["worker"] = max(workers)
    if shapes:
        shape = max(shapes, key=lambda k: (ratio(shapes[k]) or 0, shapes[k]["selector_peak_rss_gb"]))
        m = shapes[shape]
        out.update(shape=shape, selector=m["selector_peak_rss_gb"], selector_weights=m.get("selector_weights_gb"),
                   selector_kv_budget=m.get("selector_kv_budget_gb"))
        if ratio(m) is not None:
            out["selector_vs_weights_and_kv_budget"] = round(ratio(m), 3)
    return out


async def settled_scrape(metrics_port: int) -> SelectorBusy:
    """A scrape once the selector's forward count has not moved for SETTLE_S (at most SETTLE_TRIES checks):
    work it was still doing for the row's last request belongs to that row."""
    last = await asyncio.to_thread(scrape, metrics_port)
    for _ in range(SETTLE_TRIES):
        await asyncio.sleep(SETTLE_S)
        now = await asyncio.to_thread(scrape, metrics_port)
        if now.forwards == last.forwards:
            return now
        last = now
    return last


# ---- the processes -----------------------------------------------------------------------------------------


def free_port() -> int:
    """A port nothing listens on now (the selector's ports are fixed before it starts: the worker needs its
    address, this script its metrics port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def set_flags(settings: dict[str, object]) -> list[str]:
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


def peak_rss_bytes(pid: int) -> int:
    """VmHWM (the resident set's high-water mark) of a live process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            value, unit = line.split()[1:3]
            if unit != "kB":
                raise ValueError(f"/proc/{pid}/status: VmHWM in {unit!r}, expected kB")
            return int(value) * 1024
    raise ValueError(f"/proc/{pid}/status has no VmHWM line")


_SERVING = re.compile(r"serving gRPC on \S+:(\d+)")


@dataclasses.dataclass
class ServerProcess:
    """One `s2t serve-*` process, optionally under `taskset -c CPUS` (which sets the affinity and execs the
    server, so the pid stays the server's own)."""

    role: Role
    process: asyncio.subprocess.Process
    cpus: tuple[int, ...] | None
    port: int = 0
    forward_output: asyncio.Task | None = None

    @classmethod
    async def spawn(cls, role: Role, cli_args: list[str], cpus: tuple[int, ...] | None, tree: Path = ROOT,
                    env: dict[str, str] | None = None) -> "ServerProcess":
        """`tree`: the source tree whose code it runs (its working directory, first on the import path); `env`:
        variables set on top of ours."""
        pin = ["taskset", "-c", ",".join(map(str, cpus))] if cpus else []
        process = await asyncio.create_subprocess_exec(
            *pin, sys.executable, "-c", "from s2t.cli import main; main()", *cli_args,
            cwd=tree, stdout=asyncio.subprocess.PIPE, env={**os.environ, **(env or {})})
        return cls(role, process, cpus)

    async def serving(self, timeout_s: float = START_TIMEOUT_S) -> int:
        """Wait for the line that says the server listens; its port. Afterwards its stdout goes on to ours
        (stderr, where its logs go, is ours from the start), so a full pipe never blocks it."""

        async def port() -> int:
            while True:
                line = (await self.process.stdout.readline()).decode()
                if not line:
                    code = await self.process.wait()
                    raise RuntimeError(f"the {self.role.value} exited with code {code} before it served "
                                       f"(its log is above)")
                found = _SERVING.search(line)
                if found:
                    return int(found.group(1))

        self.port = await asyncio.wait_for(port(), timeout_s)
        self.forward_output = asyncio.create_task(self._forward_output())
        return self.port

    async def _forward_output(self) -> None:
        while line := await self.process.stdout.readline():
            print(f"[{self.role.value}] {line.decode().rstrip()}", file=sys.stderr, flush=True)

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    def describe(self) -> dict:
        """What the process is, read from /proc: its command (the server's own, not taskset's: the pid whose
        VmHWM is read is the server) and the CPUs it may run on."""
        argv = Path(f"/proc/{self.process.pid}/cmdline").read_bytes().split(b"\0")
        return {"pid": self.process.pid, "argv0": argv[0].decode(),
                "execs_the_server": argv[0].decode() == sys.executable and b"from s2t.cli import main; main()" in argv,
                "pinned_to": list(self.cpus) if self.cpus else None,
                "affinity": sorted(os.sched_getaffinity(self.process.pid))}

    async def stop(self, grace_s: float = STOP_GRACE_S) -> str:
        """SIGTERM (the servers drain and exit), SIGKILL after grace_s; how it ended."""
        how = "exited before the stop"
        if self.alive:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), grace_s)
                how = f"SIGTERM, exit code {self.process.returncode}"
            except asyncio.TimeoutError:
                self.process.kill()
                await self.process.wait()
                how = f"SIGKILL after {grace_s:.0f} s without exiting on SIGTERM"
        if self.forward_output is not None:
            await self.forward_output  # EOF: the process is gone
        return how


def selector_weight_files_bytes(settings) -> int | None:
    """The selector model's weight files as stored (*.safetensors / *.bin); None if the model cannot be found
    here. In memory the weight formats decide (int8 halves bf16, fp32 doubles it): this is the stored size."""
    from s2t.model_store import ModelStoreError, resolve_model

    try:
        path = resolve_model(settings.selector.model, settings.cache_dir)
    except ModelStoreError:
        return None
    files = [f for pattern in ("*.safetensors", "*.bin") for f in path.glob(pattern)]
    return sum(f.stat().st_size for f in files) or None


async def selector_description(port: int) -> dict:
    """The selector's own account of its model and weight formats (GetSelectorInfo), best effort: with
    selector.auth_tokens set it refuses this script, which sends none."""
    import grpc

    from s2t.v1 import selector_pb2 as sel_pb
    from s2t.v1 import selector_pb2_grpc as sel_grpc

    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            info = await sel_grpc.SelectorServiceStub(channel).GetSelectorInfo(sel_pb.GetSelectorInfoRequest(),
                                                                               timeout=30)
    except grpc.RpcError as e:
        return {"error": f"GetSelectorInfo: {e.code().name}"}
    return {"model": info.model_name, "weight_formats": info.weight_formats, "cpu_capability": info.cpu_capability}


# ---- the rows ----------------------------------------------------------------------------------------------


def per_problem_speed(per_problem: list[float], method: str) -> dict:
    """The mean of per-problem tokens/s with its 95 % t interval, rounded outward: an interval of equal
    per-problem speeds is [mean, mean], and rounding it to nearest could leave the mean just outside."""
    interval = t_interval(per_problem)
    return {"mean": sum(per_problem) / len(per_problem) if per_problem else 0.0,
            "ci95": None if interval is None else [math.floor(interval[0] * 1e4) / 1e4,
                                                   math.ceil(interval[1] * 1e4) / 1e4],
            "method": method}


def speed_row(plan: ShapePlan, mode: Mode, results: list[dict], wall: float, busy: SelectorBusy,
              worker: WorkerBusy, max_new: int, worker_defaults: dict, variant: Row | None = None) -> dict:
    """run_bench's speed row (same fields, same meaning), with this benchmark's shape, per-problem interval,
    selector busy time and the worker's drafting forwards. `variant`: an s2t row of run_bench.ROWS sent with
    its own options (--s2t-variants) instead of the worker's defaults."""
    row = variant or Row(plan.row_name(mode), mode.value)
    out = run_bench.summarize(row, "speed", results, wall, {"max_new_tokens": max_new})
    tokens = out["tokens"]
    out.update(
        shape=plan.shape.value,
        tokens_per_s_per_problem=per_problem_speed(
            [r["tokens"] / r["latency_s"] for r in results if r["latency_s"] > 0],
            "Student t interval (n - 1 df) of the mean of per-problem tokens / client latency"),
        selector_busy_s=busy.seconds, selector_forwards=int(busy.forwards),
        selector_busy_s_by_method=busy.seconds_by_method,
        selector_busy_s_per_token=busy.seconds / tokens if tokens else 0.0,
        selector_busy_share=busy.seconds / wall if wall else 0.0,
        worker_threads=plan.threads, selector_threads=plan.threads,
        worker_cpus=list(plan.worker_cpus) if plan.worker_cpus else "all",
        selector_cpus=list(plan.selector_cpus) if plan.selector_cpus else "all",
        # llm mode drafts nothing: its SLM forwards are none
        worker_busy_s=worker.seconds, worker_forwards=int(worker.forwards),
        worker_draft_rows=int(worker.draft_rows), worker_branch_rows=int(worker.branch_rows),
        worker_forwards_per_token=worker.forwards / tokens if tokens else 0.0,
        worker_busy_share=worker.seconds / wall if wall else 0.0)
    if variant is not None:
        out.update(variant=variant.name.removeprefix("split-"), options="the row's own (run_bench.ROWS)",
                   num_candidates=variant.k or worker_defaults["num_candidates"])
    elif mode is Mode.S2T:  # the request leaves every option to the worker: say what its defaults were
        out.update(trigger=worker_defaults["trigger"], trigger_rate=worker_defaults["trigger_rate"],
                   block_size=worker_defaults["block_size"],
                   max_inflight_blocks=worker_defaults["max_inflight_blocks"],
                   num_candidates=worker_defaults["num_candidates"], options="the worker's defaults")
    if plan.shape is Shape.SHARED:
        out["note"] = SHARED_NOTE
    return out


def ratios(rows: list[dict]) -> dict:
    """tokens/s ratios: within each shape s2t ÷ greedy, s2t ÷ llm, llm ÷ greedy; across shapes split ÷ shared per
    mode. A ratio whose rows are missing (or whose denominator is 0) is left out."""
    speed = {(r["shape"], r["request_mode"]): r["tokens_per_s"] for r in rows
             if r.get("kind") == "speed" and not r.get("variant")}

    def ratio(a, b) -> float | None:
        return speed[a] / speed[b] if a in speed and b in speed and speed[b] else None

    out: dict = {}
    for shape in Shape:
        within = {f"{a.value}/{b.value}": ratio((shape.value, a.value), (shape.value, b.value))
                  for a, b in ((Mode.S2T, Mode.GREEDY), (Mode.S2T, Mode.LLM), (Mode.LLM, Mode.GREEDY))}
        if any(v is not None for v in within.values()):
            out[shape.value] = {k: v for k, v in within.items() if v is not None}
    across = {mode.value: ratio((Shape.SPLIT.value, mode.value), (Shape.SHARED.value, mode.value))
              for mode in ROW_MODES}
    if any(v is not None for v in across.values()):
        out["split/shared"] = {k: v for k, v in across.items() if v is not None}
    return out


# ---- a shape -----------------------------------------------------------------------------------------------


async def run_shape(plan: ShapePlan, user_settings: list[str], settings, problems: list[dict], max_new: int,
                    payload: dict, write_results, worker_defaults: dict, variants: tuple[str, ...] = ()) -> None:
    """Start the shape's selector and worker, run its rows, read their peak RSS, stop them (whatever happened).
    Every finished row is in `payload` and written before the next starts."""
    import grpc

    from s2t.v1 import generation_pb2 as gen_pb
    from s2t.v1 import generation_pb2_grpc as gen_grpc

    selector_port, metrics_port, worker_metrics_port = free_port(), free_port(), free_port()
    selector_args = selector_command(user_settings, plan.threads, selector_port, metrics_port)
    worker_args = worker_command(user_settings, plan.threads, selector_port, worker_metrics_port)
    servers: dict[Role, ServerProcess] = {}
    shape_processes = payload["processes"].setdefault(plan.shape.value, {})
    by_shape = payload["memory"].setdefault("by_shape", {})
    memory = by_shape.setdefault(plan.shape.value, {})
    try:
        print(f"[split-cores] {plan.shape.value}: starting the selector (CPUs {plan.selector_cpus or 'all'}) and the "
              f"worker (CPUs {plan.worker_cpus or 'all'}), {plan.threads} thread(s) each ...", file=sys.stderr,
              flush=True)
        t0 = time.monotonic()
        for role, args in ((Role.SELECTOR, selector_args), (Role.WORKER, worker_args)):
            servers[role] = await ServerProcess.spawn(role, args, plan.cpus(role))
            shape_processes[role.value] = {"pid": servers[role].process.pid}
        # together: the worker retries the selector's GetSelectorInfo until the selector serves
        waits = [asyncio.ensure_future(server.serving()) for server in servers.values()]
        try:
            await asyncio.gather(*waits)
        finally:  # one failed: the other's wait ends here too (its process is stopped below)
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        payload["startup_s"][plan.shape.value] = round(time.monotonic() - t0, 1)
        for role, server in servers.items():
            shape_processes[role.value].update(server.describe())
        shape_processes["selector_info"] = info = await selector_description(selector_port)
        memory.update(selector_budget_gb(await asyncio.to_thread(exposition, metrics_port)))
        # batch-1 weight bytes per token: the worker's 1-row format as configured, the selector's as it reports
        bytes_per_token = {Mode.GREEDY: engine_bytes(settings, Role.WORKER, settings.worker.runtime.weight_formats),
                           Mode.LLM: engine_bytes(settings, Role.SELECTOR, info.get("weight_formats", ""))}
        write_results()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{servers[Role.WORKER].port}") as channel:
            client = types.SimpleNamespace(stub=gen_grpc.GenerationServiceStub(channel))  # what run_bench sends to
            runs = [(mode, None) for mode in ROW_MODES] + [(Mode.S2T, run_bench.ROWS[v]) for v in variants]
            for mode, variant in runs:
                name = plan.row_name(mode) if variant is None else plan.variant_name(variant.name)
                request = Row(name, mode.value) if variant is None else dataclasses.replace(variant, name=name)
                print(f"[split-cores] {name}: {len(problems)} problems, one at a time ...", file=sys.stderr, flush=True)
                before = await asyncio.to_thread(scrape, metrics_port)
                worker_before = WorkerBusy.parse(await asyncio.to_thread(exposition, worker_metrics_port))
                results, wall = await run_bench.run_service_row(client, request, problems, max_new, False)
                busy = (await settled_scrape(metrics_port)).since(before)
                drafting = WorkerBusy.parse(await asyncio.to_thread(exposition, worker_metrics_port)).since(
                    worker_before)
                row = speed_row(plan, mode, results, wall, busy, drafting, max_new, worker_defaults,
                                None if variant is None else request)
                if variant is not None:
                    greedy = next((r["tokens_per_s"] for r in payload["rows"] if r["shape"] == plan.shape.value
                                   and r["request_mode"] == Mode.GREEDY.value and not r.get("variant")), None)
                    if greedy:
                        row["vs_greedy"] = row["tokens_per_s"] / greedy
                add_bandwidth(row, bytes_per_token.get(mode))
                payload["rows"].append(row)
                payload["details"].append({"mode": name, "shape": plan.shape.value, "kind": "speed",
                                           "results": results})
                payload["ratios"] = ratios(payload["rows"])
                payload["reference_ratios"] = reference_ratios(payload)
                payload["serving_ratios"] = serving_ratios(payload)
                if row["modes_used"] != [gen_pb.Mode.Name(mode.proto)]:
                    payload["notes"].append(f"{name}: some requests degraded (modes used {row['modes_used']}); "
                                            f"see details")
                print(f"[split-cores]   {row['tokens_per_s']:.2f} tok/s, {row['tokens']} tokens in {wall:.1f} s, "
                      f"selector busy {row['selector_busy_share']:.0%} of it, the worker's drafting "
                      f"{row['worker_busy_share']:.0%}", file=sys.stderr, flush=True)
                write_results()
    finally:
        for role, server in servers.items():
            if server.alive:  # VmHWM just before the stop: the whole run's peak
                with contextlib.suppress(OSError):  # it died just now: no peak to report
                    memory[f"{role.value}_peak_rss_gb"] = round(peak_rss_bytes(server.process.pid) / GIB, 3)
        payload["memory"] = memory_summary(by_shape)
        # the worker first: it closes its selector sessions while the selector still serves
        for role, server in reversed(servers.items()):
            shape_processes.setdefault(role.value, {})["stopped"] = await server.stop()
        write_results()


# ---- what the box could do otherwise ---------------------------------------------------------------------


def model_config(settings, role: Role) -> dict | None:
    """The config.json of a role's model (for its bytes per token); None where it cannot be found here."""
    from s2t.model_store import ModelStoreError, resolve_model

    model = settings.worker.model if role is Role.WORKER else settings.selector.model
    try:
        return json.loads((resolve_model(model, settings.cache_dir) / "config.json").read_text())
    except (ModelStoreError, OSError):
        return None


def add_bandwidth(row: dict, bytes_per_token: int | None) -> None:
    """A batch-1 row's weight bytes read per token and the GB/s its tokens/s implies."""
    if bytes_per_token is None:
        return
    row["weight_bytes_per_token"] = bytes_per_token
    row["weight_gb_per_s"] = round(bytes_per_token * row["tokens_per_s"] / native_ref.GB, 2)


def engine_bytes(settings, role: Role, weight_formats: str) -> int | None:
    """Weight bytes per batch-1 decode step of a role's model in the project's engine; None if its 1-row format
    is not known (`auto` plans are measured by the process itself) or its config is not here."""
    fmt = native_ref.one_row_format(weight_formats)
    config = model_config(settings, role)
    if (fmt != "native" and fmt not in native_ref.FORMAT_ELEMENT_BYTES) or config is None:
        return None
    return native_ref.engine_bytes_per_token(config, fmt)


def run_native_rows(plans: list[ShapePlan], llama_dir: Path | None, settings, problems: list[dict], max_new: int,
                    draft_maxes: list[int], stream_gib: float, payload: dict, write_results) -> None:
    """The box's streaming-read bandwidth per shape and, given a llama.cpp build, llama.cpp's batch-1 decode of
    both GGUF files per shape and its own speculative decoding (shared shape): rows named like ours."""
    for plan in plans:
        cpus = plan.worker_cpus  # split: one core (each process gets one); shared: every core
        read = native_ref.stream_read(plan.threads, cpus, stream_gib)
        payload["stream_read"][plan.shape.value] = read
        print(f"[split-cores] {plan.shape.value}: streaming read {read['gb_per_s']} GB/s with {plan.threads} "
              f"thread(s)", file=sys.stderr, flush=True)
        write_results()
    if llama_dir is None:
        return
    from transformers import AutoTokenizer

    from s2t.model_store import fetch_gguf, resolve_model
    from s2t.prompts import chat_prompt_ids

    ggufs = {role: fetch_gguf(settings.worker.model if role is Role.WORKER else settings.selector.model,
                              settings.cache_dir) for role in Role}
    label = {Role.WORKER: "0.5b", Role.SELECTOR: "1.5b"}  # the embedded pair; the model names are in the row
    for plan in plans:
        prefix = "split-" if plan.shape is Shape.SPLIT else ""
        for role in Role:
            name = f"{prefix}llama.cpp-{label[role]}"
            print(f"[split-cores] {name}: llama-bench tg{max_new} ...", file=sys.stderr, flush=True)
            r = native_ref.llama_bench(llama_dir, ggufs[role], plan.threads, plan.cpus(role), max_new)
            row = {"mode": name, "kind": "llama.cpp", "shape": plan.shape.value, "gguf": ggufs[role].name,
                   "cpus": list(plan.cpus(role)) if plan.cpus(role) else "all", **r}
            add_bandwidth(row, ggufs[role].stat().st_size)
            payload["native_rows"].append(row)
            write_results()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(settings.worker.model, settings.cache_dir))
    prompt = tokenizer.decode(chat_prompt_ids(tokenizer, settings.worker.system_prompt, problems[0]["question"]))
    shared = next((p for p in plans if p.shape is Shape.SHARED), None)
    for draft_max in draft_maxes if shared else []:
        name = f"llama.cpp-spec-d{draft_max}"
        print(f"[split-cores] {name}: llama-speculative-simple on problem 0 ...", file=sys.stderr, flush=True)
        r = native_ref.llama_speculative_or_error(llama_dir, ggufs[Role.SELECTOR], ggufs[Role.WORKER], prompt,
                                                  shared.threads, max_new, draft_max)
        if "first_attempt_error" in r:
            payload["notes"].append(f"{name}: llama-speculative-simple failed with repacked weights"
                                    + ("" if "error" in r else "; the row is its run with --no-repack"))
        payload["native_rows"].append({"mode": name, "kind": "llama.cpp-spec", "shape": shared.shape.value,
                                       "cpus": "all", **r})
        write_results()


def run_engine_rows(plans: list[ShapePlan], user_settings: list[str], settings, problems: int, max_new: int,
                    payload: dict, write_results) -> None:
    """The engine alone on each role's batch-1 work (bench/engine_decode.py), pinned and threaded as the shape's
    server would be, before any server starts: rows `[split-]engine-0.5b` (the worker's model, its settings) and
    `[split-]engine-1.5b` (the selector's). `serving_ratios` sets greedy and llm against them."""
    label = {Role.WORKER: "0.5b", Role.SELECTOR: "1.5b"}
    for plan in plans:
        prefix = "split-" if plan.shape is Shape.SPLIT else ""
        for role in Role:
            name = f"{prefix}engine-{label[role]}"
            print(f"[split-cores] {name}: Engine.forward alone, {problems} problems ...", file=sys.stderr, flush=True)
            flags = [arg for s in user_settings for arg in ("--set", s)] + set_flags(
                {f"{role.value}.runtime.threads": plan.threads})
            pin = ["taskset", "-c", ",".join(map(str, plan.cpus(role)))] if plan.cpus(role) else []
            cmd = [*pin, sys.executable, str(BENCH / "engine_decode.py"), "--role", role.value,
                   "--problems", str(problems), "--max-new", str(max_new), *flags]
            stdout, _, peak, _ = native_ref.run_measured(cmd, timeout_s=3600)
            got = json.loads(stdout.strip().splitlines()[-1])
            results = got["results"]
            tokens, seconds = sum(r["tokens"] for r in results), sum(r["seconds"] for r in results)
            row = {"mode": name, "kind": "engine", "shape": plan.shape.value, "role": role.value,
                   "model": got["model"], "plan": got["plan"], "threads": got["threads"],
                   "cpus": list(plan.cpus(role)) if plan.cpus(role) else "all", "n": len(results),
                   "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds if seconds else 0.0,
                   "tokens_per_s_per_problem": per_problem_speed(
                       [r["tokens"] / r["seconds"] for r in results if r["seconds"] > 0],
                       "Student t interval (n - 1 df) of the mean of per-problem tokens / engine seconds"),
                   "tokens_per_problem": [r["tokens"] for r in results], "peak_rss_gb": round(peak / GIB, 3),
                   "command": " ".join(cmd[len(pin):])}
            config = model_config(settings, role)
            if config is not None:
                add_bandwidth(row, native_ref.engine_bytes_per_token(config, native_ref.one_row_format(got["plan"])))
            payload["native_rows"].append(row)
            write_results()


def serving_ratios(payload: dict) -> dict:
    """What the serving path keeps of the engine's speed, per shape: greedy ÷ engine-0.5b and llm ÷ engine-1.5b
    (tokens/s; the issue's target: at least 1 / 1.1), and on how many problems the two generated as many
    tokens (a different count means different tokens: with `auto` formats each process times its own plan)."""
    ours = {(r["shape"], r["request_mode"]): r for r in payload["rows"] if not r.get("variant")}
    engine = {(r["shape"], r["role"]): r for r in payload["native_rows"] if r["kind"] == "engine"}
    details = {(d["shape"], d["mode"]): d["results"] for d in payload["details"]}
    out: dict = {}
    for shape in Shape:
        for mode, role, label in ((Mode.GREEDY, Role.WORKER, "0.5b"), (Mode.LLM, Role.SELECTOR, "1.5b")):
            served, alone = ours.get((shape.value, mode.value)), engine.get((shape.value, role.value))
            if not served or not alone or not alone["tokens_per_s"]:
                continue
            counts = [r["tokens"] for r in details.get((shape.value, served["mode"]), [])]
            out.setdefault(shape.value, {})[f"{mode.value}/engine-{label}"] = {
                "ratio": served["tokens_per_s"] / alone["tokens_per_s"],
                "same_token_counts": sum(a == b for a, b in zip(counts, alone["tokens_per_problem"])),
                "problems": len(counts)}
    return out


def reference_ratios(payload: dict) -> dict:
    """Our batch-1 rows against llama.cpp's on the same GGUF files, per shape: greedy ÷ llama.cpp-0.5b and
    llm ÷ llama.cpp-1.5b (the issue's target: at least 1)."""
    ours = {(r["shape"], r["request_mode"]): r["tokens_per_s"] for r in payload["rows"] if not r.get("variant")}
    ref = {(r["shape"], r["mode"].removeprefix("split-")): r["tokens_per_s"] for r in payload["native_rows"]
           if r["kind"] == "llama.cpp"}
    out: dict = {}
    for shape in Shape:
        pairs = {"greedy/llama.cpp-0.5b": ((shape.value, "greedy"), (shape.value, "llama.cpp-0.5b")),
                 "llm/llama.cpp-1.5b": ((shape.value, "llm"), (shape.value, "llama.cpp-1.5b"))}
        got = {k: ours[a] / ref[b] for k, (a, b) in pairs.items() if a in ours and ref.get(b)}
        if got:
            out[shape.value] = got
    return out


# ---- the results files -------------------------------------------------------------------------------------


def markdown(payload: dict) -> str:
    m = payload["machine"]
    md = [f"# {payload['name']}\n\n", f"Command: `{payload['command']}`  \n",
          f"Date: {payload['date']}; commit {payload['commit']}  \n",
          f"Machine: {m['cpu']} ({m['cores']} cores, torch CPU capability {m['cpu_capability']})  \n",
          f"Settings (both processes): {json.dumps(payload['settings'])}  \n",
          f"Problems: GSM8K test 0..{payload['problems'] - 1}, batch 1, at most {payload['max_new_tokens']} "
          f"tokens each\n\n",
          "| row | shape | CPUs worker / selector | n | tokens | wall s | tokens/s | per-problem tok/s (95% t CI) | "
          "LLM forwards/token | selector busy s/token | selector busy share | SLM forwards/token | worker drafting "
          "share | rolled back | changed/token |\n",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"]
    for r in payload["rows"]:
        pp = r["tokens_per_s_per_problem"]
        ci = "–" if pp["ci95"] is None else f"{pp['ci95'][0]:.2f}–{pp['ci95'][1]:.2f}"
        md.append(f"| {r['mode']} | {r['shape']} | {r['worker_cpus']} / {r['selector_cpus']} | {r['n']} | "
                  f"{r['tokens']} | {r['wall_s']:.1f} | {r['tokens_per_s']:.2f} | {pp['mean']:.2f} ({ci}) | "
                  f"{r['llm_forwards_per_token']:.3f} | {r['selector_busy_s_per_token']:.4f} | "
                  f"{r['selector_busy_share']:.1%} | {r['worker_forwards_per_token']:.3f} | "
                  f"{r['worker_busy_share']:.1%} | {r['rolled_back_tokens']} | "
                  f"{r['changed_per_token']:.3f} |\n")
    if payload.get("stream_read") or payload.get("native_rows"):
        md += ["\n## The same box otherwise: streaming read, the engine alone, and llama.cpp on the same GGUF "
               "files\n\n",
               "| row | shape | CPUs | threads | tokens/s | weight bytes/token | weight GB/s | peak RSS GB |\n",
               "|---|---|---|---|---|---|---|---|\n"]
        for shape, r in payload.get("stream_read", {}).items():
            md.append(f"| streaming read ({r['method']}) | {shape} | {r['cpus']} | {r['threads']} | – | – | "
                      f"{r['gb_per_s']:.2f} | – |\n")
        for r in payload.get("native_rows", []):
            if "error" in r:
                md.append(f"| {r['mode']} | {r['shape']} | {r['cpus']} | – | failed (see the JSON) | – | – | – |\n")
                continue
            tps = f"{r['tokens_per_s']:.2f}" + (f" ± {r['tokens_per_s_sd']:.2f} sd" if "tokens_per_s_sd" in r else "")
            if r["kind"] == "engine" and r["tokens_per_s_per_problem"]["ci95"]:
                lo, hi = r["tokens_per_s_per_problem"]["ci95"]
                tps += f" (per problem {lo:.2f}–{hi:.2f})"
            if r.get("accept_percent") is not None:
                tps += f" (accept {r['accept_percent']:.1f} %)"
            md.append(f"| {r['mode']} | {r['shape']} | {r['cpus']} | {r['threads']} | {tps} | "
                      f"{r.get('weight_bytes_per_token', '–')} | {r.get('weight_gb_per_s', '–')} | "
                      f"{r.get('peak_rss_gb', '–')} |\n")
        ours = [r for r in payload["rows"] if "weight_gb_per_s" in r]
        if ours:
            md += ["\nOur batch-1 rows, same measure: "] + [
                f"{r['mode']} {r['weight_bytes_per_token']} bytes/token, {r['weight_gb_per_s']} GB/s; " for r in ours]
            md.append("\n")
        md += [f"\n`{r['mode']}`: `{r['command']}`  \n" for r in payload.get("native_rows", []) if "command" in r]
    if payload.get("reference_ratios"):
        md += ["\n## Against llama.cpp (tokens/s, same shape, same run)\n\n",
               "| shape | ratio | value |\n|---|---|---|\n"]
        md += [f"| {shape} | {name} | {value:.3f} |\n" for shape, values in payload["reference_ratios"].items()
               for name, value in values.items()]
    if payload.get("serving_ratios"):
        md += ["\n## The serving path against the engine alone (tokens/s, same shape, same run)\n\n",
               "| shape | ratio | value | problems with as many tokens |\n|---|---|---|---|\n"]
        md += [f"| {shape} | {name} | {v['ratio']:.3f} | {v['same_token_counts']}/{v['problems']} |\n"
               for shape, values in payload["serving_ratios"].items() for name, v in values.items()]
    if payload.get("ratios"):
        md += ["\n## Ratios (tokens/s)\n\n", "| shape | ratio | value |\n|---|---|---|\n"]
        md += [f"| {shape} | {name} | {value:.3f} |\n" for shape, values in payload["ratios"].items()
               for name, value in values.items()]
        md += [f"| {r['shape']} | {r['variant']}/greedy | {r['vs_greedy']:.3f} |\n" for r in payload["rows"]
               if r.get("variant") and r.get("vs_greedy") is not None]
    if payload.get("memory", {}).get("by_shape"):
        md += ["\n## Memory (GB = 2^30 bytes)\n\n",
               "Peak RSS per process; the selector's weights as held (every weight format's copy) and its KV budget "
               "(selector.kv_budget_mb), from its gauges; issue #14's bound: selector ≤ 1.3 × (weights + KV "
               "budget).\n\n",
               "| shape | worker peak | selector peak | selector weights | selector KV budget | selector ÷ (weights + "
               "KV budget) |\n|---|---|---|---|---|---|\n"]
        for shape, v in payload["memory"]["by_shape"].items():
            budget = v.get("selector_weights_gb", 0) + v.get("selector_kv_budget_gb", 0)
            share = f"{v['selector_peak_rss_gb'] / budget:.2f}" if budget and "selector_peak_rss_gb" in v else "–"
            md.append(f"| {shape} | {v.get('worker_peak_rss_gb', '–')} | {v.get('selector_peak_rss_gb', '–')} | "
                      f"{v.get('selector_weights_gb', '–')} | {v.get('selector_kv_budget_gb', '–')} | {share} |\n")
        if payload.get("selector_weight_files_gb") is not None:
            md.append(f"\nSelector weight files as stored: {payload['selector_weight_files_gb']} GB\n")
    if payload.get("notes"):
        md.append("\n" + "\n".join(f"- {n}" for n in payload["notes"]) + "\n")
    return "".join(md)


def write(results_dir: Path, payload: dict) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{payload['name']}.json").write_text(json.dumps(payload, indent=1))
    (results_dir / f"{payload['name']}.md").write_text(markdown(payload))


# ---- main --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="split-cores", help="results file name (default: split-cores)")
    ap.add_argument("--problems", type=int, default=3, help="GSM8K test problems 0..N-1 per row (default 3)")
    ap.add_argument("--max-new", type=int, default=128, help="token cap of every request (default 128)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="settings override for both processes (repeatable)")
    ap.add_argument("--shapes", default="split,shared", help="comma-separated, in order: split, shared")
    ap.add_argument("--llama-cpp", type=Path, default=None, metavar="DIR",
                    help="a llama.cpp build (the folder with llama-bench and llama-speculative-simple): adds its "
                         "rows on the same GGUF files, in this run (bench/build_llama_cpp.sh builds one)")
    ap.add_argument("--llama-spec-draft", default="4,8,16",
                    help="llama-speculative-simple's --spec-draft-n-max values, comma-separated (default 4,8,16)")
    ap.add_argument("--stream-gib", type=float, default=1.0,
                    help="size of the streaming-read measurement's buffer in GiB (default 1; far above any cache)")
    ap.add_argument("--results-dir", type=Path, default=run_bench.RESULTS,
                    help="where <name>.json and .md go (default: bench/results)")
    ap.add_argument("--no-engine", dest="engine", action="store_false",
                    help="skip the engine-alone rows (bench/engine_decode.py) that the serving ratios compare with")
    ap.add_argument("--s2t-variants", default="", metavar="ROWS",
                    help="comma-separated s2t rows of run_bench (e.g. s2t-spec-tau10-b16-i3,s2t-entropy10-spec) "
                         "run in every shape after the default rows, each with its own trigger, block size and "
                         "blocks in flight; each reports its tokens/s against the shape's greedy (vs_greedy)")
    args = ap.parse_args(argv)
    args.s2t_variants = tuple(v.strip() for v in args.s2t_variants.split(",") if v.strip())
    for v in args.s2t_variants:
        if v not in run_bench.ROWS or run_bench.ROWS[v].mode != Mode.S2T.value:
            ap.error(f"--s2t-variants: {v!r} is not an s2t row of bench/run_bench.py; known: "
                     + ", ".join(n for n, r in run_bench.ROWS.items() if r.mode == Mode.S2T.value))
    if args.problems < 1 or args.max_new < 1:
        ap.error("--problems and --max-new must be >= 1")
    try:
        args.shapes = [Shape(s.strip()) for s in args.shapes.split(",") if s.strip()]
    except ValueError as e:
        ap.error(f"--shapes: {e}; known: {', '.join(s.value for s in Shape)}")
    try:
        args.llama_spec_draft = [int(d) for d in args.llama_spec_draft.split(",") if d.strip()]
    except ValueError:
        ap.error(f"--llama-spec-draft: expected comma-separated integers, got {args.llama_spec_draft!r}")
    if args.llama_cpp is not None:
        try:
            args.llama_cpp = native_ref.find_llama_cpp(args.llama_cpp)
        except FileNotFoundError as e:
            ap.error(f"--llama-cpp: {e}")
    for s in args.set:
        if "=" not in s:
            ap.error(f"--set expects KEY=VALUE, got {s!r}")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the payload it wrote."""
    import yaml

    from s2t import gsm8k
    from s2t.config import load_settings

    args = parse_args(argv)
    # the processes read the same --set values (and S2T_* environment); parsed here for what the rows report
    settings = load_settings(**{k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)})
    ws = settings.worker
    worker_defaults = {k: getattr(ws, k) for k in ("trigger", "trigger_rate", "block_size", "max_inflight_blocks",
                                                   "num_candidates")}
    cpus = sorted(os.sched_getaffinity(0))
    plans, skipped = plan_shapes(args.shapes, cpus, shutil.which("taskset") is not None)
    for note in skipped:
        print(f"[split-cores] {note}", file=sys.stderr, flush=True)
    weight_bytes = selector_weight_files_bytes(settings)
    argv_shown = sys.argv[1:] if argv is None else argv
    payload = {"name": args.name,
               "command": command_line(Path(__file__).relative_to(ROOT).as_posix(), argv_shown),
               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": git_commit(), "machine": machine(),
               "settings": {"overrides": args.set, "worker": {"model": ws.model, **worker_defaults},
                            "selector": {"model": settings.selector.model}},
               "problems": args.problems, "max_new_tokens": args.max_new, "usable_cpus": cpus,
               "shapes": [p.shape.value for p in plans], "rows": [], "ratios": {}, "memory": {},
               "selector_weight_files_gb": None if weight_bytes is None else round(weight_bytes / GIB, 3),
               "processes": {}, "startup_s": {}, "details": [], "stream_read": {}, "native_rows": [],
               "reference_ratios": {}, "serving_ratios": {},
               "notes": skipped + ["batch 1: one request at a time; tokens_per_s = all tokens / the row's wall time; "
                                   "tokens_per_s_per_problem.ci95 is a Student t interval of the per-problem mean",
                                   "selector busy = Δ s2t_selector_forward_seconds_sum (Select and Decode) over the "
                                   "row, from the selector's /metrics",
                                   "SLM forwards/token and worker drafting share = Δ s2t_worker_forward_seconds "
                                   "(_count per committed token, _sum over the row's wall time), from the worker's "
                                   "/metrics: 1 forward a token for greedy, more where a verdict threw drafts away",
                                   "peak RSS = VmHWM of /proc/<pid>/status just before the process was stopped "
                                   "(GB = 2^30 bytes); selector_weight_files_gb is the stored size, not the "
                                   "in-memory one",
                                   SHARED_NOTE,
                                   "weight bytes/token: what one batch-1 decode step reads of the weights (llama.cpp: "
                                   "the GGUF file; ours: every linear layer in its 1-row format, see "
                                   "bench/native_ref.py); GB/s = that × tokens/s; the KV cache is left out"]}
    problems = gsm8k.load("test", 0, args.problems)
    results_dir = args.results_dir
    t0 = time.monotonic()
    try:
        # first, with no server up: the box's streaming read and llama.cpp on the same GGUF files
        run_native_rows(plans, args.llama_cpp, settings, problems, args.max_new, args.llama_spec_draft,
                        args.stream_gib, payload,
                        lambda: write(results_dir, payload))
        if args.engine:
            run_engine_rows(plans, args.set, settings, args.problems, args.max_new, payload,
                            lambda: write(results_dir, payload))
        for plan in plans:
            asyncio.run(run_shape(plan, args.set, settings, problems, args.max_new, payload,
                                  lambda: write(results_dir, payload), worker_defaults, args.s2t_variants))
    except BaseException as e:
        payload["notes"].append(f"stopped early: {e!r}; the rows above finished")
        raise
    finally:
        payload["total_wall_s"] = round(time.monotonic() - t0, 1)
        write(results_dir, payload)
    print(markdown(payload))
    return payload


if __name__ == "__main__":
    main()

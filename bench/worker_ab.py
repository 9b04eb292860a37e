"""Two workers that differ in their settings, against one selector, each problem sent to both back to back
(issue #14): an A/B that this box's drift cannot fake.

Two whole benchmark runs back to back see this machine drift 5-20 % between them, more than many changes are
worth. Here both workers run at once on the same core(s) (a worker waiting for requests costs no CPU), beside
one selector, and every problem goes to A and to B one after the other, in ABBA order across problems, so
slow spells fall on both. Each request is batch 1, mode s2t unless --mode says otherwise. B's time over A's
on the same problem is paired; the row reports their geometric mean with a 95 % t interval (of the logs), and
both workers' own rows (tokens/s, LLM forwards, resyncs). Outputs are identical on both sides when the
settings do not change the algorithm (e.g. worker.selector_prefill), which the results check per problem.

    python bench/worker_ab.py --name prefill-ab --problems 8 --max-new 128 --set-b worker.selector_prefill=false

Or A/B a code change: `--a-rev REV` runs worker A on git revision REV's code (its tracked files, exported once
to ~/.cache/s2t/worker-ab/<commit>/, with a torch extension directory of its own for its kernels' builds), and
worker B (and the selector) on this tree's, uncommitted changes included.

The interval is over problems, within one pair of worker processes: three A/A runs of the same code (one with
--a-rev) gave 0.979x, 0.995x and 1.002x (bench/results/aa-ab-split, aa-same-tree-split, aa-arev-split), so read a
paired ratio within +-2 % as no difference.

Shapes: `split` (default) pins the selector to the second usable CPU and both workers to the first, one thread
each, as bench/split_cores.py does; `shared` leaves every CPU to all three with one thread per CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import run_bench  # noqa: E402
from run_bench import Row, commit_of, git_commit, machine, write_results  # noqa: E402
from split_cores import (Role, ServerProcess, Shape, WorkerBusy, exposition, free_port,  # noqa: E402
                         per_problem_speed, selector_command, single_shape, t_interval, worker_command)

from s2t.modes import Mode  # noqa: E402

SIDES = ("a", "b")


def checkout(commit: str) -> tuple[Path, dict[str, str]]:
    """The tracked files of `commit` (a full hash), exported (git archive) to a directory kept for the next run,
    and the environment a process running them needs: a torch extension directory of their own, so their kernels
    are built from their sources and never replace the .so files this tree's processes have loaded."""
    base = Path.home() / ".cache" / "s2t" / "worker-ab" / commit[:12]
    tree, done = base / "tree", base / "tree.complete"
    if not done.exists():
        shutil.rmtree(tree, ignore_errors=True)
        tree.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        done.touch()
    return tree, {"TORCH_EXTENSIONS_DIR": str(base / "torch-extensions")}


def abba(n: int) -> list[tuple[str, str]]:
    """The order of the two sides for problems 0..n-1: AB, BA, BA, AB, AB, BA, ... (ABBA blocks), so a drift
    that is linear over any four consecutive requests falls equally on both sides."""
    return [("a", "b") if i % 4 in (0, 3) else ("b", "a") for i in range(n)]


def paired_ratio(a_times: list[float], b_times: list[float]) -> dict:
    """B's time over A's per problem: geometric mean and the 95 % t interval of the mean log, exponentiated."""
    logs = [math.log(b / a) for a, b in zip(a_times, b_times)]
    interval = t_interval(logs)
    return {"n": len(logs), "geomean": math.exp(sum(logs) / len(logs)),
            "ci95": None if interval is None else [math.exp(interval[0]), math.exp(interval[1])],
            "per_problem": [round(math.exp(v), 4) for v in logs]}


def side_row(side: str, overrides: list[str], results: list[dict], drafting: WorkerBusy) -> dict:
    """A side's totals; `drafting`: its worker's drafting forwards over the timed requests (split_cores.WorkerBusy),
    which only that side's requests run on."""
    tokens = sum(r["tokens"] for r in results)
    wall = sum(r["latency_s"] for r in results)
    per_problem = [r["tokens"] / r["latency_s"] for r in results]
    return {"side": side, "overrides": overrides, "n": len(results), "tokens": tokens,
            "slm_forwards_per_token": drafting.forwards / tokens, "branch_rows": int(drafting.branch_rows),
            "drafting_share": drafting.seconds / wall,
            "latency_s": round(wall, 2), "tokens_per_s": tokens / wall,
            "tokens_per_s_per_problem": per_problem_speed(per_problem, "tokens / the client's latency"),
            "llm_forwards_per_token": sum(r["llm_forwards"] for r in results) / tokens,
            "resyncs": sum(r["resyncs"] for r in results),
            "rolled_back_tokens": sum(r["rolled_back_tokens"] for r in results),
            "picks_changed": sum(r["picks_changed"] for r in results),
            "branches_adopted": sum(r.get("branches_adopted", 0) for r in results),
            "branch_drafted_tokens": sum(r.get("branch_drafted_tokens", 0) for r in results),
            "branch_missed_position": sum(r.get("branch_missed_position", 0) for r in results),
            "branch_missed_candidate": sum(r.get("branch_missed_candidate", 0) for r in results),
            "modes_used": sorted({r["mode_used"] for r in results})}


def markdown(payload: dict) -> str:
    out = [f"# {payload['name']}", "", f"`{payload['command']}`", "",
           f"{payload['date']} · commit {payload['commit']} · {payload['machine'].get('cpu', '')}", "",
           f"Mode {payload['mode']}, {payload['problems']} problems × {payload['max_new_tokens']} new tokens, batch 1, "
           f"shape {payload['shape']}; each problem to both workers back to back (ABBA order).", "",
           "| worker | settings | tokens/s | per-problem tokens/s (95% t) | LLM forwards / token | SLM forwards / token "
           "(drafting share of the time) | resyncs | rolled back "
           "| branches adopted / changed picks (missed: at another position, another candidate; branch drafts) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for row in payload["rows"]:
        pp = row["tokens_per_s_per_problem"]
        ci = f"{pp['mean']:.2f} ({pp['ci95'][0]:.2f}–{pp['ci95'][1]:.2f})" if pp["ci95"] else f"{pp['mean']:.2f}"
        out.append(f"| {row['side'].upper()} | {' '.join(row['overrides']) or 'as set for both'} | "
                   f"{row['tokens_per_s']:.2f} | {ci} | {row['llm_forwards_per_token']:.3f} | "
                   f"{row['slm_forwards_per_token']:.3f} ({row['drafting_share']:.0%}) | "
                   f"{row['resyncs']} | "
                   f"{row['rolled_back_tokens']} | {row.get('branches_adopted', 0)} / {row.get('picks_changed', '–')} "
                   f"({row.get('branch_missed_position', 0)}, {row.get('branch_missed_candidate', 0)}; "
                   f"{row.get('branch_drafted_tokens', 0)}) |")
    def ratio(p: dict) -> str:
        return f"**{p['geomean']:.3f}**" + (f" (95% t: {p['ci95'][0]:.3f}–{p['ci95'][1]:.3f})" if p["ci95"] else "")

    p = payload.get("paired")
    if p:
        out += ["", f"Paired, B's time ÷ A's on the same problem: geometric mean {ratio(p)}, "
                    f"n = {p['n']}; identical outputs on {payload['same_text']} of {p['n']} problems."]
        q = payload.get("paired_same_text")
        if q and q["n"] < p["n"]:
            out.append(f"Over those {q['n']} alone (the same tokens on both sides): {ratio(q)}.")
    out += [""] + [f"- {n}" for n in payload["notes"]]
    return "\n".join(out) + "\n"


async def run(args, payload: dict, write) -> None:
    import grpc

    from s2t import gsm8k
    from s2t.v1 import generation_pb2_grpc as gen_grpc

    plan = single_shape(Shape(args.shape), "worker_ab")
    selector_port = free_port()
    selector_args = selector_command(args.set, plan.threads, selector_port)
    metrics_ports = {side: free_port() for side in SIDES}
    servers: dict[str, ServerProcess] = {}
    problems = gsm8k.load("test", 0, args.problems)
    trees = {"a": checkout(args.a_rev_commit) if args.a_rev else (ROOT, {}), "b": (ROOT, {})}
    try:
        servers["selector"] = await ServerProcess.spawn(Role.SELECTOR, selector_args, plan.cpus(Role.SELECTOR))
        for side in SIDES:
            worker_args = worker_command(args.set + getattr(args, f"set_{side}"), plan.threads, selector_port,
                                         metrics_ports[side])
            tree, env = trees[side]
            servers[side] = await ServerProcess.spawn(Role.WORKER, worker_args, plan.cpus(Role.WORKER), tree, env)
        await asyncio.gather(*(server.serving() for server in servers.values()))
        row = Row(f"ab-{args.mode}", args.mode)
        results: dict[str, list[dict]] = {side: [] for side in SIDES}
        channels = {side: grpc.aio.insecure_channel(f"127.0.0.1:{servers[side].port}") for side in SIDES}
        try:
            clients = {side: types.SimpleNamespace(stub=gen_grpc.GenerationServiceStub(channels[side]))
                       for side in SIDES}
            # one request on each side first, not timed: both workers' first request pays one-off costs
            for side in SIDES:
                await run_bench.run_service_row(clients[side], row, problems[:1], 8, False)

            async def drafting_now(side: str) -> WorkerBusy:
                return WorkerBusy.parse(await asyncio.to_thread(exposition, metrics_ports[side]))

            drafting_before = {side: await drafting_now(side) for side in SIDES}
            for problem, order in zip(problems, abba(len(problems))):
                for side in order:
                    [result], _ = await run_bench.run_service_row(clients[side], row, [problem], args.max_new, False)
                    results[side].append(result)
                    print(f"[worker-ab] problem {problem['idx']} {side.upper()}: {result['tokens']} tokens in "
                          f"{result['latency_s']:.2f} s", file=sys.stderr, flush=True)
                drafted = {side: (await drafting_now(side)).since(drafting_before[side]) for side in SIDES}
                payload["rows"] = [side_row(side, side_label(args, side), results[side], drafted[side])
                                   for side in SIDES]
                pairs = list(zip(results["a"], results["b"]))
                payload["paired"] = paired_ratio([a["latency_s"] for a, _ in pairs], [b["latency_s"] for _, b in pairs])
                same = [(a, b) for a, b in pairs if a["text"] == b["text"]]
                payload["same_text"] = len(same)
                payload["paired_same_text"] = (paired_ratio([a["latency_s"] for a, _ in same],
                                                            [b["latency_s"] for _, b in same]) if len(same) > 1 else None)
                payload["details"] = results
                write()
        finally:
            for channel in channels.values():
                await channel.close()
    finally:
        for name in (*SIDES, "selector"):  # the workers first: they close their sessions while the selector serves
            if name in servers:
                payload["processes"][name] = await servers[name].stop()
        write()


def side_label(args: argparse.Namespace, side: str) -> list[str]:
    """What sets a side apart: its own settings, and for A the revision whose code it runs (--a-rev)."""
    code = {"a": [f"code of {args.a_rev_commit[:12]}"], "b": ["this tree's code"]} if args.a_rev else {}
    return code.get(side, []) + getattr(args, f"set_{side}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="worker-ab")
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--mode", default=Mode.S2T.value, choices=[m.value for m in Mode if m is not Mode.LLM])
    ap.add_argument("--shape", default="split", choices=["split", "shared"])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="for all three processes")
    ap.add_argument("--set-a", action="append", default=[], metavar="KEY=VALUE", help="worker A only")
    ap.add_argument("--set-b", action="append", default=[], metavar="KEY=VALUE", help="worker B only")
    ap.add_argument("--a-rev", metavar="REV", help="worker A runs git revision REV's code (B this tree's)")
    ap.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    if args.problems < 2 or args.max_new < 1:
        ap.error("--problems must be >= 2 (a paired interval needs two) and --max-new >= 1")
    if not (args.set_a or args.set_b or args.a_rev):
        ap.error("give worker A or B a setting of its own (--set-a / --set-b) or A another revision's code "
                 "(--a-rev): otherwise there is nothing to compare")
    args.a_rev_commit = None
    if args.a_rev:
        try:
            args.a_rev_commit = commit_of(args.a_rev)
        except ValueError as e:
            ap.error(f"--a-rev: {e}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    payload = {"name": args.name,
               "command": run_bench.command_line(Path(__file__).relative_to(ROOT).as_posix(),
                                                 sys.argv[1:] if argv is None else argv),
               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": git_commit(), "machine": machine(),
               "mode": args.mode, "shape": args.shape, "problems": args.problems, "max_new_tokens": args.max_new,
               "settings": {"both": args.set, "a": args.set_a, "b": args.set_b}, "a_rev": args.a_rev_commit,
               "rows": [], "paired": None, "same_text": 0, "paired_same_text": None, "details": {}, "processes": {},
               "notes": ["latency_s: the client's time from sending a request to its final reply",
                         "paired: exp(mean of log(B time / A time)) over problems, with a 95 % Student t interval "
                         "of that mean log",
                         "one untimed 8-token request on each side first (one-off costs of a worker's first request)",
                         "outputs may differ where a setting changes how the selector's forwards are cut into rows "
                         "(each row count has its own weight format and kernel, so near-ties can flip); "
                         "paired_same_text compares only the problems with the same tokens on both sides"]}

    def write() -> None:
        write_results(args.results_dir, payload, markdown(payload))

    t0 = time.monotonic()
    try:
        asyncio.run(run(args, payload, write))
    finally:
        payload["total_wall_s"] = round(time.monotonic() - t0, 1)
        write()
    print(markdown(payload))
    return payload


if __name__ == "__main__":
    main()

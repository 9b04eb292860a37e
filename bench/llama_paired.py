"""Our batch-1 user path against llama.cpp, round by round in one sitting (issue #14): a ratio the drift cannot fake.

The preset (bench/split_cores.py) measures llama.cpp once and each of our rows once, minutes apart; on this VM
the box drifts 15-30 % between such runs, and "at least as fast as llama.cpp" held in some sittings and not in
others. Here each round puts the two engines side by side on the same core(s), back to back, in ABBA order
across rounds, so a slow spell falls on both:

  - the 0.5B: `greedy` through the worker's gRPC API on GSM8K test problem r (end to end, the client's
    latency, the prompt's prefill included) against `llama-bench -p 0 -n N -r 1` on the project's own GGUF;
  - the 1.5B: `llm` through the worker's API (the selector's model generates), the same way.

Per round the ratio is ours ÷ llama.cpp in tokens/s; the result is their geometric mean with a 95 % t interval
of the mean log. Shape `split` pins the worker and llama.cpp's 0.5B to the first CPU and the selector and
llama.cpp's 1.5B to the second, one thread each (as the preset's split rows); `shared` gives every process all
CPUs. End to end our rows pay the prompt's prefill, which llama-bench's tg rows do not; the second ratio takes our
tokens after the stream's first delta, over the client's time from it to the last delta, which is what tg
measures.

    python bench/llama_paired.py --name llama-paired-split --shape split --rounds 8 \
        --llama-cpp ~/.cache/s2t/llama.cpp

Writes bench/results/<name>.{json,md}, rewritten after every round.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import native_ref  # noqa: E402
import run_bench  # noqa: E402
from run_bench import git_commit, machine, write_results  # noqa: E402
from split_cores import (Role, ServerProcess, Shape, free_port, selector_command, single_shape,  # noqa: E402
                         worker_command)
from worker_ab import abba, paired_ratio  # noqa: E402

from s2t.modes import Mode  # noqa: E402

# our row and llama.cpp's, per model: the mode whose tokens that model makes, and the GGUF it runs
PAIRS = ((Role.WORKER, Mode.GREEDY, "0.5b"), (Role.SELECTOR, Mode.LLM, "1.5b"))


def paired_speed(ours: list[float], theirs: list[float]) -> dict:
    """ours ÷ theirs in tokens/s per round (= their time ÷ ours for the same tokens): geometric mean and the 95 % t
    interval of the mean log, as worker_ab pairs B's time over A's."""
    return paired_ratio(theirs, ours)


@dataclasses.dataclass(frozen=True)
class Streamed:
    """One streamed request as its client saw it."""

    tokens: int  # completion tokens
    latency_s: float  # from sending the request to the final message
    first_tokens: int  # tokens in the first delta (mode llm commits a chunk of the selector's at once)
    after_first_s: float  # from the first delta to the last

    @property
    def decode_tokens_per_s(self) -> float:
        """The tokens after the first delta over the time after it: no prompt prefill, as llama-bench's tg."""
        if self.tokens <= self.first_tokens:
            raise RuntimeError(f"all {self.tokens} tokens came in the first delta: give --max-new more than one "
                               "(mode llm's first delta is a whole worker.decode_chunk)")
        return (self.tokens - self.first_tokens) / self.after_first_s


async def stream_one(stub, mode: Mode, prompt: str, max_new: int) -> Streamed:
    from s2t.v1 import generation_pb2 as pb

    sent = time.monotonic()
    first: tuple[float, int] | None = None
    last = sent
    final = None
    request = pb.GenerateStreamRequest(prompt=prompt, options=pb.GenerationOptions(mode=mode.proto,
                                                                                  max_new_tokens=max_new))
    async for message in stub.GenerateStream(request):
        if message.HasField("delta") and message.delta.token_ids:
            last = time.monotonic()
            if first is None:
                first = (last, len(message.delta.token_ids))
        elif message.HasField("final"):
            final = message.final
    done = time.monotonic()
    if final is None or first is None:
        raise RuntimeError(f"mode {mode.value}: the stream ended without {'a final message' if first else 'tokens'}")
    if final.stats.mode_used != mode.proto:
        raise RuntimeError(f"mode {mode.value} degraded: {final.stats.degraded_reason}")
    return Streamed(final.stats.completion_tokens, done - sent, first[1], last - first[0])


def markdown(payload: dict) -> str:
    out = [f"# {payload['name']}", "", f"`{payload['command']}`", "",
           f"{payload['date']} · commit {payload['commit']} · {payload['machine'].get('cpu', '')}", "",
           f"Shape {payload['shape']}, {payload['max_new_tokens']} new tokens per request, batch 1; per round our "
           f"row and llama.cpp's back to back on the same CPUs (ABBA order across rounds).", "",
           "| model | ours | llama.cpp | rounds | ours tokens/s, end to end (after the first token) "
           "| llama.cpp tokens/s | ours ÷ llama.cpp, paired (95 % t) | the same after the first token |",
           "|---|---|---|---|---|---|---|---|"]

    def ratio(p: dict) -> str:
        return f"**{p['geomean']:.3f}**" + (f" ({p['ci95'][0]:.3f}–{p['ci95'][1]:.3f})" if p["ci95"] else "")

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    for row in payload["rows"]:
        n = row["paired"]["n"]
        out.append(f"| {row['label']} | `{row['ours']}` (CPUs {row['cpus']}) | "
                   f"llama-bench tg{payload['max_new_tokens']} | {n} | {mean(row['ours_tokens_per_s']):.2f} "
                   f"({mean(row['ours_decode_tokens_per_s']):.2f}) | {mean(row['llama_tokens_per_s']):.2f} | "
                   f"{ratio(row['paired'])} | {ratio(row['paired_decode'])} |")
    out += [""] + [f"- {n}" for n in payload["notes"]]
    return "\n".join(out) + "\n"


async def run(args, payload: dict, write) -> None:
    import grpc
    import yaml

    from s2t import gsm8k
    from s2t.config import load_settings
    from s2t.model_store import fetch_gguf
    from s2t.v1 import generation_pb2_grpc as gen_grpc

    plan = single_shape(Shape(args.shape), "llama_paired")
    threads, pins = plan.threads, {role: plan.cpus(role) for role in Role}
    settings = load_settings(**{k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)})
    bin_dir = native_ref.find_llama_cpp(args.llama_cpp)
    ggufs = {role: fetch_gguf(settings.worker.model if role is Role.WORKER else settings.selector.model,
                              settings.cache_dir) for role in Role}
    selector_port = free_port()
    selector_args = selector_command(args.set, threads, selector_port)
    worker_args = worker_command(args.set, threads, selector_port)
    problems = gsm8k.load("test", 0, args.rounds)
    servers: dict[Role, ServerProcess] = {}
    try:
        servers[Role.SELECTOR] = await ServerProcess.spawn(Role.SELECTOR, selector_args, pins[Role.SELECTOR])
        servers[Role.WORKER] = await ServerProcess.spawn(Role.WORKER, worker_args, pins[Role.WORKER])
        await asyncio.gather(*(server.serving() for server in servers.values()))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{servers[Role.WORKER].port}") as channel:
            stub = gen_grpc.GenerationServiceStub(channel)
            model = {Role.WORKER: settings.worker.model, Role.SELECTOR: settings.selector.model}
            rows = {role: {"label": f"{label} ({model[role]})",
                           "ours": mode.value, "llama_gguf": ggufs[role].name,
                           "cpus": list(pins[role]) if pins[role] else "all",
                           "ours_tokens_per_s": [], "ours_decode_tokens_per_s": [],
                           "llama_tokens_per_s": [], "ours_tokens": [], "llama_commands": []}
                    for role, mode, label in PAIRS}
            # one untimed short request per mode first: a worker's first request pays one-off costs
            for _, mode, _ in PAIRS:
                await stream_one(stub, mode, problems[0]["question"], 8)
            for problem, order in zip(problems, abba(len(problems))):
                for role, mode, _ in PAIRS:
                    row = rows[role]
                    for side in order:  # "a": ours first, "b": llama.cpp first
                        if side == "a":
                            timed = await stream_one(stub, mode, problem["question"], args.max_new)
                            row["ours_tokens_per_s"].append(timed.tokens / timed.latency_s)
                            row["ours_decode_tokens_per_s"].append(timed.decode_tokens_per_s)
                            row["ours_tokens"].append(timed.tokens)
                        else:
                            r = await asyncio.to_thread(native_ref.llama_bench, bin_dir, ggufs[role], threads,
                                                        pins[role], args.max_new, 1)
                            row["llama_tokens_per_s"].append(r["tokens_per_s"])
                            row["llama_commands"].append(r["command"])
                    print(f"[llama-paired] round {problem['idx']} {row['label']}: ours "
                          f"{row['ours_tokens_per_s'][-1]:.2f}, llama.cpp {row['llama_tokens_per_s'][-1]:.2f} tokens/s",
                          file=sys.stderr, flush=True)
                    row["paired"] = paired_speed(row["ours_tokens_per_s"], row["llama_tokens_per_s"])
                    row["paired_decode"] = paired_speed(row["ours_decode_tokens_per_s"], row["llama_tokens_per_s"])
                payload["rows"] = list(rows.values())
                write()
    finally:
        for role in (Role.WORKER, Role.SELECTOR):  # the worker first: it closes its sessions while the selector serves
            if role in servers:
                payload["processes"][role.value] = await servers[role].stop()
        write()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="llama-paired")
    ap.add_argument("--shape", default="split", choices=["split", "shared"])
    ap.add_argument("--rounds", type=int, default=8, help="one GSM8K test problem per round, from test 0")
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--llama-cpp", type=Path, default=Path("~/.cache/s2t/llama.cpp").expanduser(),
                    help="a llama.cpp build (bash bench/build_llama_cpp.sh) or its bin directory")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="for both of our processes")
    ap.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    if args.rounds < 2 or args.max_new < 1:
        ap.error("--rounds must be >= 2 (a paired interval needs two) and --max-new >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    payload = {"name": args.name,
               "command": run_bench.command_line(Path(__file__).relative_to(ROOT).as_posix(),
                                                 sys.argv[1:] if argv is None else argv),
               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": git_commit(), "machine": machine(),
               "shape": args.shape, "rounds": args.rounds, "max_new_tokens": args.max_new, "settings": args.set,
               "rows": [], "processes": {},
               "notes": ["ours: completion tokens ÷ the client's latency of one request (prompt prefill included); "
                         "after the first token: the tokens after the stream's first delta (mode llm's first delta "
                         "is a chunk of the selector's) over the client's time from that delta to the last; llama.cpp: llama-bench's tg tokens/s of one repetition (no prompt)",
                         "paired: exp(mean of log(ours ÷ llama.cpp)) over rounds, with a 95 % Student t interval of "
                         "that mean log",
                         "one untimed 8-token request per mode first (one-off costs of a worker's first request)"]}

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

"""Where does the time of one batch-1 request go? Times every forward of both models.

    python bench/profile_s2t.py --mode s2t --trigger always --block-size 4 --max-new 96 --problems 2

Runs the selector core on a plain grpc.aio server and the worker in this one process (no Ray), wraps both
engines' forward to record rows and seconds per call, and prints a breakdown: SLM forwards (prefill vs
one-token drafts), LLM forwards by rows, and the rest of the wall time (transport, Python, waiting).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time
from pathlib import Path


class Timed:
    def __init__(self, engine, name):
        self.engine, self.name = engine, name
        self.calls = []
        original = engine.forward

        def forward(caches, tokens, want):
            t0 = time.perf_counter()
            out = original(caches, tokens, want)
            self.calls.append((len(tokens), sum(len(t) for t in tokens), time.perf_counter() - t0))
            return out

        engine.forward = forward

    def report(self) -> dict:
        by = collections.defaultdict(lambda: [0, 0.0])
        for _seqs, rows, dt in self.calls:
            key = "prefill (>32 rows)" if rows > 32 else f"{rows} rows"
            by[key][0] += 1
            by[key][1] += dt
        return {"forwards": len(self.calls), "seconds": round(sum(c[2] for c in self.calls), 2),
                "by_rows": {k: {"calls": v[0], "s": round(v[1], 2), "ms_per_call": round(1000 * v[1] / v[0], 1)}
                            for k, v in sorted(by.items(), key=lambda kv: -kv[1][1])}}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="s2t")
    ap.add_argument("--trigger", default="always")
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--inflight", type=int, default=1)
    ap.add_argument("--max-new", type=int, default=96)
    ap.add_argument("--problems", type=int, default=2)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--out", help="also write the breakdown as JSON here")
    args = ap.parse_args()

    import yaml

    from s2t import gsm8k
    from s2t.config import load_settings
    from s2t.modes import Mode, TriggerKind
    from s2t.stack import LocalStack
    from s2t.v1 import generation_pb2 as pb

    settings = load_settings(**{"selector.grpc_port": 0, "worker.port": 0, "selector.log_enabled": False,
                                "worker.max_inflight_blocks": args.inflight,
                                **{k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}})
    stack = await LocalStack(settings, ray=False).__aenter__()
    llm, slm = Timed(stack.selector_core.engine, "llm"), Timed(stack.worker.engine, "slm")
    stub = stack.stub
    opts = pb.GenerationOptions(mode=Mode(args.mode).proto, max_new_tokens=args.max_new,
                                trigger=TriggerKind(args.trigger).proto, trigger_rate=args.rate,
                                block_size=args.block_size)
    tokens, t0 = 0, time.perf_counter()
    stats = []
    for p in gsm8k.load("test", 0, args.problems):
        r = await stub.Generate(pb.GenerateRequest(prompt=p["question"], options=opts))
        tokens += r.stats.completion_tokens
        stats.append(r.stats)
    wall = time.perf_counter() - t0
    busy = slm.report()["seconds"] + llm.report()["seconds"]
    rolled_back = sum(s.rolled_back_tokens for s in stats)
    drafts = [c for c in slm.calls if c[1] == 1]  # one-token SLM forwards: the drafts
    draft_ms = 1000 * sum(c[2] for c in drafts) / len(drafts) if drafts else 0.0
    report = {"command": "python bench/profile_s2t.py " + " ".join(sys.argv[1:]), "config": vars(args),
              "tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 2),
              "slm": slm.report(), "llm": llm.report(), "not_in_forwards_s": round(wall - busy, 2),
              "drafted": sum(s.drafted_tokens for s in stats), "rolled_back": rolled_back,
              "rolled_back_draft_s": round(rolled_back * draft_ms / 1000, 2),
              "selector_calls": sum(s.selector_calls for s in stats)}
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    await stack.__aexit__(None, None, None)


if __name__ == "__main__":
    asyncio.run(main())

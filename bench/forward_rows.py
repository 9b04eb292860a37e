"""What one forward of M new tokens costs, by M and weight-format plan: the selector's verification of a block
(M = block + 1), a prefill, a batch of drafts.

Loads the model once per plan (all at once, so the plans' rounds interleave: this machine drifts), prefills a
100-token prompt, then times forwards of M new tokens on that cache (cropped back after each), logits at every
new position as a verification asks. One thread; run it under `taskset -c 1`.

    taskset -c 1 python bench/forward_rows.py --name forward-rows-amx --model qwen2.5-coder-1.5b-instruct \
        --plan int8_vnni,int8_vnni,int8_vnni,int8_vnni,bf16 --plan auto

--path model-forward adds, per plan, the same forwards through transformers' model forward (the engine's
direct and compiled steps turned off) beside the engine's own choice (--path engine), on the same weights.

--huge-pages off,on loads each plan twice, its formatted weights on 4 KB pages and on 2 MB pages
(runtime.huge_pages), and interleaves the two like plans:

    taskset -c 1 python bench/forward_rows.py --name huge-pages-1.5b --plan auto --huge-pages off,on --rows 1,4,8

--move-min-bytes 2097152,4096 loads each plan with huge pages on once per value of weight_formats.MOVE_MIN_BYTES
(the smallest storage moved onto them), interleaved like plans.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from run_bench import RESULTS, results_header, write_results
from s2t import weight_formats
from s2t.runtime import Engine, load_model

PROMPT_TOKENS = 100


PATHS = ("engine", "model-forward")


def path_switch(engine: Engine, path: str):
    """A function switching `engine` to `path`: its own choice of step ("engine") or transformers' model
    forward for every call ("model-forward")."""
    own = engine._ops, engine.fast_decode

    def switch():
        engine._ops, engine.fast_decode = (None, False) if path == "model-forward" else own
    return switch


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="forward-rows")
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--plan", action="append", required=True, help="a weight-format plan (repeatable; auto measures)")
    ap.add_argument("--rows", default="1,2,4,8,9,16,17,32,64", help="new tokens per forward, comma-separated")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--path", action="append", choices=PATHS,
                    help="how each plan's forwards run (repeatable; default: engine)")
    ap.add_argument("--huge-pages", default="on", help="'on', 'off' or 'off,on': the formatted weights on 2 MB pages "
                    "(runtime.huge_pages); both loads each plan twice")
    ap.add_argument("--move-min-bytes", default=None, help="comma-separated values of weight_formats.MOVE_MIN_BYTES "
                    "(the smallest storage moved onto huge pages): loads each plan with huge pages on once per value")
    args = ap.parse_args(argv)
    huge = {"on": [True], "off": [False], "off,on": [False, True], "on,off": [True, False]}.get(args.huge_pages)
    if huge is None:
        ap.error(f"--huge-pages: expected 'on', 'off' or 'off,on', not {args.huge_pages!r}")
    rows = [int(r) for r in args.rows.split(",")]
    paths = args.path or ["engine"]
    move_min = [int(b) for b in args.move_min_bytes.split(",")] if args.move_min_bytes else [weight_formats.MOVE_MIN_BYTES]
    loads = [(on, b) for on in huge for b in (move_min if on else [None])]
    engines, switches = {}, {}
    for i, spec in enumerate(args.plan):
        for on, min_bytes in loads:
            if min_bytes is not None:
                weight_formats.MOVE_MIN_BYTES = min_bytes  # read by the Engine's move, below
            engine = Engine(load_model(args.model, Path.home() / ".cache/s2t/models", spec, threads=1, huge_pages=on))
            print(f"plan {spec!r}: {engine.lm.plan.describe()}, {engine.lm.weight_bytes / 2**30:.2f} GiB held", flush=True)
            for path in paths:
                key = (f"{i}: {spec}" + (f" ({path})" if len(paths) > 1 else "")
                       + (f" (huge pages {'on' if on else 'off'})" if len(huge) > 1 else "")
                       + (f" (storages from {min_bytes} B moved)" if len(move_min) > 1 and on else ""))
                engines[key], switches[key] = engine, path_switch(engine, path)
    vocab = next(iter(engines.values())).lm.vocab_size
    prompt = [(1000 + i) % vocab for i in range(PROMPT_TOKENS)]
    caches = {}
    with torch.inference_mode():
        for key, engine in engines.items():
            caches[key] = engine.new_cache()
            caches[key].reserve(PROMPT_TOKENS + max(rows))
            engine.forward([caches[key]], [prompt], [[PROMPT_TOKENS - 1]])
        ms: dict[tuple[str, int], list[float]] = {}
        for m in rows:
            for r in range(args.rounds + 1):  # the first round warms up
                tokens = [(2000 + 7 * i + r) % vocab for i in range(m)]
                for key, engine in engines.items():
                    switches[key]()
                    t0 = time.perf_counter()
                    engine.forward([caches[key]], [tokens], [list(range(m))])
                    dt = (time.perf_counter() - t0) * 1e3
                    caches[key].crop(PROMPT_TOKENS)
                    if r:
                        ms.setdefault((key, m), []).append(dt)
    keys = list(engines)
    out_rows = []
    for m in rows:
        base = statistics.median(ms[(keys[0], m)])
        for key in keys:
            med = statistics.median(ms[(key, m)])
            out_rows.append({"plan": key, "rows": m, "ms_median": round(med, 1), "ms_min": round(min(ms[(key, m)]), 1),
                             "ms_per_row": round(med / m, 1), "vs_first_plan": round(base / med, 3)})
            print(f"M={m:3d} {key:50s} {med:8.1f} ms (min {min(ms[(key, m)]):.1f}) x{base / med:.2f}", flush=True)
    payload = results_header(args.name, "bench/forward_rows.py", argv)
    payload.update(model=args.model, threads=1, rounds=args.rounds, prompt_tokens=PROMPT_TOKENS, huge_pages=args.huge_pages,
                   move_min_bytes=move_min if any(huge) else None,
                   plans={k: {"plan": e.lm.plan.describe(), "weight_gib": round(e.lm.weight_bytes / 2**30, 3)}
                          for k, e in engines.items()},
                   rows=out_rows)
    md = [f"# {args.name}\n\n`taskset -c 1 {payload['command']}`\n\n{payload['date']} · commit {payload['commit']} · "
          f"{payload['machine'].get('cpu', '')}\n\nOne forward of M new tokens after a {PROMPT_TOKENS}-token prompt, "
          f"logits at every new position, one thread; median of {args.rounds} (interleaved across plans).\n\n"
          "| plan | as measured | weights held GiB |\n|---|---|---|\n"]
    md += [f"| {k} | {v['plan']} | {v['weight_gib']} |\n" for k, v in payload["plans"].items()]
    md.append("\n| M | " + " | ".join(f"plan {i} ms" for i in range(len(keys))) + " | "
              + " | ".join(f"plan 0 ÷ plan {i} (time)" for i in range(1, len(keys)))
              + " |\n|" + "---|" * (1 + 2 * len(keys) - 1) + "\n")
    for m in rows:
        got = {r["plan"]: r for r in out_rows if r["rows"] == m}
        md.append(f"| {m} | " + " | ".join(str(got[k]["ms_median"]) for k in keys) + " | "
                  + " | ".join(str(got[k]["vs_first_plan"]) for k in keys[1:]) + " |\n")
    write_results(RESULTS, payload, "".join(md))


if __name__ == "__main__":
    main(sys.argv[1:])

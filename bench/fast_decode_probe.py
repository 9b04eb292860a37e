"""Probe (issue #14): the batch-1 decode step run through transformers' model forward, against the engine's
direct step (`Engine._decode_one`: the same modules and operations, without the model forward's plumbing),
with q/k/v and gate/up as separate kernel calls and fused (one call each, `weight_formats.fuse_outputs`).

Times both in one process, interleaved round by round on the same teacher-forced tokens after a 63-token
prompt, one thread, and counts the steps whose argmax differs between them.

    taskset -c 0 python bench/fast_decode_probe.py qwen2.5-coder-0.5b-instruct int8_vnni 64 5

Arguments: model, weight formats, steps per round, rounds. Prints one line per variant and writes
bench/results/fast-decode-probe-<model>-<formats>.{json,md}.
"""
import statistics, sys, time, torch
from pathlib import Path
from run_bench import RESULTS, results_header, write_results
from s2t.runtime import Engine, load_model

model, fmt, steps, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
lm = load_model(model, Path.home() / ".cache/s2t/models", fmt, threads=1)
e = Engine(lm)
prompt = [(1000 + i) % lm.vocab_size for i in range(63)]
c = e.new_cache(); c.reserve(63 + steps + 8)
fused = list(e._fused)
unfused = [(None, None)] * len(fused)
variants = {"transformers forward": (False, fused), "direct step, separate projections": (True, unfused),
            "direct step, fused q/k/v and gate/up": (True, fused)}


def run(name, n, ref=None):
    e.fast_decode, e._fused = variants[name]
    c.crop(0)
    out = []
    tok = int(e.forward([c], [prompt], [[62]])[0][0].argmax())
    t0 = time.perf_counter()
    for i in range(n):
        out.append(tok)
        tok = int(e.forward([c], [[tok if ref is None else ref[i]]], [[0]])[0][0].argmax())
    return time.perf_counter() - t0, out


_, ref = run("transformers forward", steps)
for v in variants:  # warm-up
    run(v, 8, ref)
ms = {v: [] for v in variants}; picks = {}
for r in range(rounds):
    for v in variants:
        dt, out = run(v, steps, ref)
        ms[v].append(dt / steps * 1e3); picks[v] = out
base = statistics.median(ms["transformers forward"])
rows = []
for v in variants:
    med = statistics.median(ms[v])
    diff = sum(a != b for a, b in zip(picks[v], ref))
    print(f"{model} {fmt} | {v:38s} | {med:6.2f} ms/step median ({min(ms[v]):.2f} min) | {1e3/med:6.2f} tok/s | "
          f"x{base/med:.3f} | argmax differs {diff}/{steps}", flush=True)
    rows.append({"variant": v, "ms_per_step_median": round(med, 2), "ms_per_step_min": round(min(ms[v]), 2),
                 "tokens_per_s": round(1e3 / med, 2), "vs_transformers_forward": round(base / med, 3),
                 "argmax_differs": diff, "steps": steps})
payload = results_header(f"fast-decode-probe-{Path(model).name}-{fmt}", "bench/fast_decode_probe.py", sys.argv[1:])
payload.update(pinned="run under `taskset -c 0`", model=model, weight_formats=fmt, rounds=rounds, threads=1,
               torch=torch.__version__, rows=rows)
write_results(RESULTS, payload, "".join(
    [f"# {payload['name']}\n\n`taskset -c 0 {payload['command']}`\n\n{payload['date']} · commit {payload['commit']} · "
     f"{payload['machine'].get('cpu', '')}\n\n| variant | ms/step (median, min) | tokens/s | ÷ transformers forward | "
     "argmax differs |\n|---|---|---|---|---|\n"]
    + [f"| {r['variant']} | {r['ms_per_step_median']}, {r['ms_per_step_min']} | {r['tokens_per_s']} | "
       f"{r['vs_transformers_forward']} | {r['argmax_differs']}/{r['steps']} |\n" for r in rows]))

"""The one-thread batch-1 decode-step probes' shared part (bench/compile_probe.py, bench/fast_decode_probe.py).

A probe loads one model in one weight format on one thread and names variants of the decode step, each a
function that switches the engine (or the modules it calls) to that variant. `StepProbe.measure` decodes the
same teacher-forced tokens after a 63-token prompt under every variant, interleaved round by round (this
machine drifts), and `StepProbe.report` prints and writes the medians, the ratio to the baseline variant and
how many steps' argmax differs from the baseline's own greedy run.

Command line of every probe: MODEL FORMATS STEPS_PER_ROUND ROUNDS [SUFFIX]; SUFFIX is appended to the results
name (e.g. the machine's kind, so a run elsewhere does not overwrite another machine's results).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from run_bench import RESULTS, results_header, write_results
from s2t.runtime import Engine, load_model


class StepProbe:
    PROMPT_TOKENS = 63

    def __init__(self, argv: list[str]):
        self.argv = list(argv)
        self.model, self.fmt, self.steps, self.rounds = argv[0], argv[1], int(argv[2]), int(argv[3])
        self.suffix = f"-{argv[4]}" if len(argv) > 4 and argv[4] else ""
        self.engine = Engine(load_model(self.model, Path.home() / ".cache/s2t/models", self.fmt, threads=1))
        self.prompt = [(1000 + i) % self.engine.lm.vocab_size for i in range(self.PROMPT_TOKENS)]
        self.cache = self.engine.new_cache()
        self.cache.reserve(self.PROMPT_TOKENS + self.steps + 8)

    def run(self, apply: Callable[[], None], n: int, ref: list[int] | None = None) -> tuple[float, list[int]]:
        """Switch to a variant, prefill the prompt, then time n one-token steps (fed `ref` when given, else
        the step's own argmax); returns the seconds and the argmax before each step."""
        apply()
        e, c = self.engine, self.cache
        c.crop(0)
        out = []
        with torch.inference_mode():
            tok = int(e.forward([c], [self.prompt], [[self.PROMPT_TOKENS - 1]])[0][0].argmax())
            t0 = time.perf_counter()
            for i in range(n):
                out.append(tok)
                tok = int(e.forward([c], [[tok if ref is None else ref[i]]], [[0]])[0][0].argmax())
            return time.perf_counter() - t0, out

    def measure(self, variants: dict[str, Callable[[], None]], baseline: str, warmup_label: str = "warm-up"):
        """The baseline's own greedy tokens, a short warm-up of every variant (compiles, if any), then the
        timed rounds on those tokens. Returns (ms per step per variant, each variant's argmaxes, the tokens)."""
        t0 = time.perf_counter()
        _, ref = self.run(variants[baseline], self.steps)
        for apply in variants.values():
            self.run(apply, min(8, self.steps), ref)
        print(f"{warmup_label} {time.perf_counter() - t0:.1f} s", flush=True)
        ms: dict[str, list[float]] = {v: [] for v in variants}
        picks: dict[str, list[int]] = {}
        for _ in range(self.rounds):
            for v, apply in variants.items():
                dt, out = self.run(apply, self.steps, ref)
                ms[v].append(dt / self.steps * 1e3)
                picks[v] = out
        return ms, picks, ref

    def report(self, name: str, script: str, variants: dict[str, Callable[[], None]], baseline: str,
               ratio_key: str, ratio_label: str, warmup_label: str = "warm-up") -> dict:
        """measure(), print a line per variant and write <RESULTS>/<name><SUFFIX>.{json,md}."""
        name += self.suffix
        ms, picks, ref = self.measure(variants, baseline, warmup_label)
        base = statistics.median(ms[baseline])
        width = max(len(v) for v in variants)
        rows = []
        for v in variants:
            med = statistics.median(ms[v])
            diff = sum(a != b for a, b in zip(picks[v], ref))
            print(f"{self.model} {self.fmt} | {v:{width}s} | {med:6.2f} ms/step median ({min(ms[v]):.2f} min) | "
                  f"{1e3 / med:6.2f} tok/s | x{base / med:.3f} {ratio_label} | argmax differs {diff}/{self.steps}",
                  flush=True)
            rows.append({"variant": v, "ms_per_step_median": round(med, 2), "ms_per_step_min": round(min(ms[v]), 2),
                         "tokens_per_s": round(1e3 / med, 2), ratio_key: round(base / med, 3),
                         "argmax_differs": diff, "steps": self.steps})
        payload = results_header(name, script, self.argv)
        payload.update(pinned="run under `taskset -c 0`", model=self.model, weight_formats=self.fmt,
                       plan=self.engine.lm.plan.describe(),
                       rounds=self.rounds, threads=1, torch=torch.__version__, rows=rows)
        write_results(RESULTS, payload, "".join(
            [f"# {payload['name']}\n\n`taskset -c 0 {payload['command']}`\n\n{payload['date']} · commit "
             f"{payload['commit']} · {payload['machine'].get('cpu', '')} "
             f"({payload['machine'].get('cpu_capability', '')}) · plan: {payload['plan']}\n\n| variant | ms/step (median, min) | "
             f"tokens/s | {ratio_label} | argmax differs |\n|---|---|---|---|---|\n"]
            + [f"| {r['variant']} | {r['ms_per_step_median']}, {r['ms_per_step_min']} | {r['tokens_per_s']} | "
               f"{r[ratio_key]} | {r['argmax_differs']}/{r['steps']} |\n" for r in rows]))
        return payload

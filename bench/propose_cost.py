"""What the worker's `propose` (s2t.triggers: the SLM's top-64 and their probabilities at a drafted position)
costs where the worker calls it, right after a forward, against the same call on data already in cache.

A decode step streams every weight through the caches, so the step's logits ([rows, 151,936] float32, 0.6 MB
a row) and the buffers `propose` works in are cold when it runs. Loads the model once (one thread), prefills
a 100-token prompt, then per step: one forward of `--rows` rows; `propose` on its logits (timed: "after a
forward"); `propose` again on the same logits (timed: "in cache"). The steps alternate with ones that time its
two large operations alone after a forward: the softmax over the vocabulary, and `topk` over the
probabilities. Run it under `taskset -c 1`:

    taskset -c 1 python bench/propose_cost.py --name propose-cost-0.5b --rows 1,2 --steps 60
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from run_bench import RESULTS, results_header, write_results
from s2t.runtime import Engine, load_model
from s2t.triggers import SUPPORT, propose

PROMPT_TOKENS = 100


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="propose-cost")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--plan", default="auto", help="weight-format plan")
    ap.add_argument("--rows", default="1,2", help="rows per forward (a draft and its branches), comma-separated")
    ap.add_argument("--steps", type=int, default=60, help="steps per row count (half time propose, half its parts)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    engine = Engine(load_model(args.model, Path.home() / ".cache/s2t/models", args.plan, threads=1))
    vocab = engine.lm.vocab_size
    out_rows = []
    with torch.inference_mode():
        for rows in [int(r) for r in args.rows.split(",")]:
            caches = [engine.new_cache() for _ in range(rows)]
            for c in caches:
                c.reserve(PROMPT_TOKENS + args.steps + 1)
            logits = engine.forward(caches, [[(1000 + i + r) % vocab for i in range(PROMPT_TOKENS)] for r in range(rows)],
                                    [[PROMPT_TOKENS - 1]] * rows)
            feed = [[int(lg.argmax())] for lg in logits]
            ms: dict[str, list[float]] = {"forward": [], "propose after a forward": [], "propose in cache": [],
                                          "softmax after a forward": [], "topk of the probabilities after it": []}
            for step in range(args.steps):
                t0 = time.perf_counter()
                lg = torch.cat(engine.forward(caches, feed, [[0]] * rows))
                t1 = time.perf_counter()
                ms["forward"].append(t1 - t0)
                if step % 2 == 0:
                    proposals = propose(lg)
                    t2 = time.perf_counter()
                    propose(lg)
                    t3 = time.perf_counter()
                    ms["propose after a forward"].append(t2 - t1)
                    ms["propose in cache"].append(t3 - t2)
                    feed = [[p.token] for p in proposals]
                else:
                    probs = torch.softmax(lg, dim=-1)
                    t2 = time.perf_counter()
                    top = probs.topk(SUPPORT, dim=-1)
                    t3 = time.perf_counter()
                    ms["softmax after a forward"].append(t2 - t1)
                    ms["topk of the probabilities after it"].append(t3 - t2)
                    feed = [[int(i)] for i in top.indices[:, 0]]
            medians = {k: round(statistics.median(v) * 1e3, 3) for k, v in ms.items()}
            medians["propose after a forward, share of the forward"] = round(
                medians["propose after a forward"] / medians["forward"], 4)
            out_rows.append({"rows": rows, "ms_median": medians, "n": {k: len(v) for k, v in ms.items()}})
            print(f"rows {rows}: " + ", ".join(f"{k} {v}" for k, v in medians.items()), flush=True)
    payload = results_header(args.name, "bench/propose_cost.py", argv)
    payload.update(model=args.model, plan=engine.lm.plan.describe(), threads=1, prompt_tokens=PROMPT_TOKENS,
                   steps=args.steps, rows=out_rows)
    keys = list(out_rows[0]["ms_median"])
    md = [f"# {args.name}\n\n`taskset -c 1 {payload['command']}`\n\n{payload['date']} · commit {payload['commit']} · "
          f"{payload['machine'].get('cpu', '')}\n\n{args.model}, weight formats {payload['plan']}, one thread; "
          f"medians over {args.steps // 2} steps each (ms).\n\n| rows | " + " | ".join(keys) + " |\n|"
          + "---|" * (len(keys) + 1) + "\n"]
    md += [f"| {r['rows']} | " + " | ".join(str(r["ms_median"][k]) for k in keys) + " |\n" for r in out_rows]
    write_results(RESULTS, payload, "".join(md))


if __name__ == "__main__":
    main(sys.argv[1:])

"""The engine alone on the serving path's work: greedy decoding of GSM8K prompts with `Engine.forward`, no server.

What a worker (`--role worker`, mode greedy) or a selector (`--role selector`, mode llm) computes for a batch-1
request, without gRPC, the worker's loop, sessions or streaming: the role's model loaded with the role's runtime
settings (weight formats, threads) from the same `--set` values the servers get, the worker's chat prompt for
each problem, a prefill, then one `Engine.forward` per token until a stop id or `--max-new`. bench/split_cores.py
runs it under the shape's `taskset`, before the servers start, so `greedy ÷ engine` is what the serving path
keeps of the engine's speed in the same run (issue #14: the serving path may cost at most 10 %).

    python bench/engine_decode.py --role worker --problems 5 --max-new 128 --set worker.runtime.threads=1

Prints one JSON line: per problem the prompt and generated token counts, the seconds from the prefill to the
last token, and the generated ids; a first problem is decoded untimed to warm up (as the worker's warm-up does).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))


def greedy_decode(engine, prompt: list[int], max_new: int, stop_ids) -> tuple[list[int], float]:
    """The prompt's greedy continuation (at most max_new tokens, ending at the first stop id) and its seconds."""
    import torch

    cache = engine.new_cache()
    cache.reserve(len(prompt) + max_new)
    stop = set(stop_ids)
    out: list[int] = []
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = engine.forward([cache], [prompt], [[len(prompt) - 1]])[0][0]
        while True:
            out.append(int(logits.argmax()))
            if out[-1] in stop or len(out) >= max_new:
                break
            logits = engine.forward([cache], [[out[-1]]], [[0]])[0][0]
        return out, time.perf_counter() - t0


def run(role: str, problems: int, max_new: int, overrides: list[str]) -> dict:
    import yaml

    from s2t import gsm8k
    from s2t.config import load_settings
    from s2t.prompts import chat_prompt_ids
    from s2t.runtime import Engine, load_with

    settings = load_settings(**{k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in overrides)})
    section = settings.worker if role == "worker" else settings.selector
    lm = load_with(section.model, settings.cache_dir, section.runtime)
    engine = Engine(lm)
    prompts = [chat_prompt_ids(lm.tokenizer, settings.worker.system_prompt, p["question"])
               for p in gsm8k.load("test", 0, problems)]
    greedy_decode(engine, prompts[0], min(max_new, 16), lm.stop_ids)  # warm-up, untimed
    results = []
    for prompt in prompts:
        ids, seconds = greedy_decode(engine, prompt, max_new, lm.stop_ids)
        results.append({"prompt_tokens": len(prompt), "tokens": len(ids), "seconds": seconds, "ids": ids})
    return {"role": role, "model": lm.name, "plan": lm.plan.describe(), "threads": section.runtime.threads,
            "load_s": round(lm.load_s, 1), "results": results}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--role", choices=("worker", "selector"), required=True,
                    help="whose model and runtime settings: the worker's (greedy) or the selector's (llm)")
    ap.add_argument("--problems", type=int, default=3, help="GSM8K test problems 0..N-1 (default 3)")
    ap.add_argument("--max-new", type=int, default=128, help="token cap per problem (default 128)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="settings, as the servers get")
    args = ap.parse_args(argv)
    print(json.dumps(run(args.role, args.problems, args.max_new, args.set)))


if __name__ == "__main__":
    main()

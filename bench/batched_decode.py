"""Batched decode throughput of the engine per weight format and batch size (issue #14, item 4).

What a selector serving many workers sees, and what an accuracy run of 100 sessions costs: for each model and
weight format, B sessions prefilled with the same prompt, then timed `Engine.forward` steps over all B caches,
either one new token per session (decoding: the worker drafting, the selector in mode llm) or a block of
`--block` tokens per session (the selector verifying speculative blocks). Rounds of `--steps` steps per
(format, B), formats interleaved round by round (this machine drifts), every cache cropped back to the prompt
before each round so each configuration decodes at the same context lengths.

    python bench/batched_decode.py --llama-cpp ~/.cache/s2t/llama.cpp
    python bench/batched_decode.py --models qwen2.5-coder-0.5b-instruct --formats int8,fp32_packed --batches 1,64
    python bench/batched_decode.py --formats fp32_packed --batches 64 --prompt-tokens 63,400   # context's cost
    python bench/batched_decode.py --formats int8_vnni,int8_vnni@model-forward --batches 1,2,4,8,16,32
        # the compiled step against transformers' forward on the same weights, interleaved

With `--llama-cpp DIR`, llama.cpp's `llama-batched-bench` on the same pinned GGUF files at the same batch sizes
and threads is the anchor in the same run (its text-generation tokens/s at each batch size).

Writes <results dir>/<name>.json and .md: ms per step (median, min), new tokens per second (B × tokens per
session / step), and the ratio to the same format at B = 1.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import native_ref  # noqa: E402
from run_bench import RESULTS, git_commit, machine  # noqa: E402

DEFAULT_MODELS = ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct")
# A format named FMT@model-forward: the same loaded weights, every forward through transformers' model forward
# instead of the engine's compiled step (what batches of sessions took before they were compiled too).
MODEL_FORWARD = "model-forward"


def time_configs(engines: dict, prompt: list[int], batches: list[int], block: int, steps: int,
                 rounds: int, vocab: int) -> dict:
    """Seconds per step for every (format, batch) over `rounds` interleaved rounds (plus one untimed warm-up).
    engines: format -> (engine, caches prefilled with `prompt`, at least max(batches) of them)."""
    import torch

    per_step: dict[tuple[str, int], list[float]] = {}
    with torch.inference_mode():
        for r in range(rounds + 1):
            for b in batches:
                for fmt, (engine, caches) in engines.items():
                    group = caches[:b]
                    for c in group:
                        c.crop(len(prompt))
                    t0 = time.perf_counter()
                    for i in range(steps):
                        feed = [[(2000 + 7 * i + j) % vocab for j in range(block)]] * b  # ids do not change the speed
                        engine.forward(group, feed, [[block - 1]] * b)
                    if r > 0:
                        per_step.setdefault((fmt, b), []).append((time.perf_counter() - t0) / steps)
    return per_step


def measure_model(model: str, cache_dir: Path, formats: list[str], batches: list[int], block: int,
                  threads: int, steps: int, rounds: int, prompt_tokens: int) -> list[dict]:
    import torch

    from s2t.runtime import Engine, load_model

    engines, plans, loaded = {}, {}, {}
    prompt: list[int] = []
    vocab = 0
    for fmt in formats:
        weights, _, path = fmt.partition("@")
        if path not in ("", MODEL_FORWARD):
            raise SystemExit(f"batched_decode: unknown path {path!r} in {fmt!r} (only @{MODEL_FORWARD})")
        lm = loaded.get(weights) or load_model(model, cache_dir, weights, threads=threads)
        loaded[weights] = lm
        vocab = lm.vocab_size
        prompt = [(1000 + i) % vocab for i in range(prompt_tokens)]
        engine = Engine(lm)
        if path == MODEL_FORWARD:  # this engine only: transformers' forward at every batch size
            engine._ops, engine.fast_decode = None, False
        caches = [engine.new_cache() for _ in range(max(batches))]
        with torch.inference_mode():  # one batched prefill of the same prompt into every session
            engine.forward(caches, [prompt] * len(caches), [[prompt_tokens - 1]] * len(caches))
        for c in caches:
            c.reserve(prompt_tokens + steps * block + 1)
        engines[fmt] = (engine, caches)
        plans[fmt] = lm.plan.describe()
    per_step = time_configs(engines, prompt, batches, block, steps, rounds, vocab)
    rows = []
    for fmt in formats:
        single = statistics.median(per_step[(fmt, batches[0])])
        for b in batches:
            secs = per_step[(fmt, b)]
            median = statistics.median(secs)
            rows.append({"model": model, "engine": "s2t", "weight_formats": fmt, "plan": plans[fmt],
                         "threads": threads, "batch": b, "tokens_per_session": block, "steps": steps,
                         "rounds": rounds, "prompt_tokens": prompt_tokens,
                         "ms_per_step_median": round(median * 1e3, 2), "ms_per_step_min": round(min(secs) * 1e3, 2),
                         "tokens_per_s": round(b * block / median, 2),
                         "vs_first_batch": round((b / batches[0]) * single / median, 2)})
    return rows


def llama_batched_bench(llama_dir: Path, gguf: Path, batches: list[int], threads: int, prompt_tokens: int,
                        n_gen: int) -> list[dict]:
    """llama.cpp's llama-batched-bench: B parallel sequences of prompt_tokens then n_gen tokens each; its
    text-generation speed S_TG (tokens/s over all sequences) per B."""
    exe = native_ref.find_llama_cpp(llama_dir) / "llama-batched-bench"
    if not exe.exists():
        raise SystemExit(f"no {exe} (bash bench/build_llama_cpp.sh builds it)")
    cmd = [str(exe), "-m", str(gguf), "-t", str(threads), "-tb", str(threads), "-npp", str(prompt_tokens),
           "-ntg", str(n_gen), "-npl", ",".join(map(str, batches)),
           "-c", str(max(batches) * (prompt_tokens + n_gen) + 64), "-b", "2048", "-ub", "512"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return [{**r, "threads": threads, "command": " ".join(cmd)} for r in parse_batched_bench(out)]


def parse_batched_bench(text: str) -> list[dict]:
    """The rows of llama-batched-bench's table
    |    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
    as {batch, prompt_tokens, n_gen, tokens_per_s (S_TG: generated tokens/s over all sequences)}."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and all(re.fullmatch(r"[\d.]+", c) for c in cells[:8]):
            rows.append({"engine": "llama.cpp (llama-batched-bench)", "batch": int(cells[2]),
                         "prompt_tokens": int(cells[0]), "tokens_per_session": 1, "n_gen": int(cells[1]),
                         "tokens_per_s": float(cells[7])})
    if not rows:
        raise ValueError(f"no llama-batched-bench table in:\n{text}")
    return rows


def markdown(payload: dict) -> str:
    lines = [f"# {payload['name']}", "", f"`{payload['command']}`", "",
             f"{payload['date']} · commit {payload['commit']} · {payload['machine'].get('cpu', '')} "
             f"({payload['machine'].get('cores')} cores, {payload['machine'].get('cpu_capability')})", "",
             "| model | engine | weight format | threads | context | sessions | new tokens per session per step | "
             "ms/step (median, min) | new tokens/s | × first batch size |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        if r["engine"] == "s2t":
            lines.append(f"| {r['model']} | s2t | {r['weight_formats']} | {r['threads']} | {r['prompt_tokens']} | "
                         f"{r['batch']} | {r['tokens_per_session']} | {r['ms_per_step_median']}, "
                         f"{r['ms_per_step_min']} | {r['tokens_per_s']} | {r['vs_first_batch']} |")
        else:
            lines.append(f"| {r['model']} | {r['engine']} | GGUF | {r['threads']} | {r['prompt_tokens']} | "
                         f"{r['batch']} | 1 | – | {r['tokens_per_s']} | – |")
    lines += ["", "- new tokens/s: sessions × new tokens per session / the median seconds per step; every session "
              "decodes after the same prompt of `context` tokens; one process per model, no server around it", "- the block rows (several new tokens per session) are the selector's verification "
              "forwards; the others are decoding", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="batched-decode")
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument("--formats", default="int8_avx2,int8,fp32_packed", help="comma-separated weight formats")
    ap.add_argument("--batches", default="1,8,16,32,64", help="sessions per forward (comma-separated)")
    ap.add_argument("--block", default="1", help="new tokens per session per step (comma-separated; e.g. 1,8)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", default="63",
                    help="context each session decodes after (comma-separated: one set of rows per length)")
    ap.add_argument("--llama-cpp", type=Path, default=None, metavar="DIR")
    ap.add_argument("--n-gen", type=int, default=32, help="llama-batched-bench tokens per sequence")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    blocks = [int(b) for b in args.block.split(",")]
    contexts = [int(c) for c in args.prompt_tokens.split(",")]
    formats = args.formats.split(",")
    payload = {"name": args.name, "command": "python " + " ".join(["bench/batched_decode.py", *(argv or sys.argv[1:])]),
               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": git_commit(), "machine": machine(),
               "prompt_tokens": contexts, "rows": []}
    from s2t.model_store import default_cache_dir, fetch_gguf

    cache_dir = args.cache_dir or default_cache_dir()
    for model in args.models.split(","):
        for context in contexts:
            for block in blocks:
                payload["rows"] += measure_model(model, cache_dir, formats, batches, block, args.threads,
                                                 args.steps, args.rounds, context)
            if args.llama_cpp:
                gguf = fetch_gguf(model, cache_dir)
                for r in llama_batched_bench(args.llama_cpp.expanduser(), gguf, batches, args.threads, context,
                                             args.n_gen):
                    payload["rows"].append({"model": model, **r})
        print(markdown(payload), flush=True)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"{args.name}.json").write_text(json.dumps(payload, indent=1))
    (args.results_dir / f"{args.name}.md").write_text(markdown(payload))
    return payload


if __name__ == "__main__":
    main()

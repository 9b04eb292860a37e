"""Batch-1 decode speed of the engine per weight format, beside llama.cpp, in one run (issue #14, item 1).

For each model, one process loads it once per weight format (s2t.runtime.load_model, as the worker and the
selector do), prefills the same prompt, then times `Engine.forward` decode steps: rounds of `--steps` steps
per format, formats interleaved round by round (this machine drifts; interleaving keeps the comparison
fair), the cache cropped back to the prompt before each round so every format decodes at the same context
lengths. Every format is fed the same tokens (the first format's greedy picks of round one); the share of
steps where a format's argmax differs from the first format's is reported. Then, when `--llama-cpp DIR` is
given, llama.cpp's llama-bench on the same pinned GGUF files at the same thread counts (bench/native_ref.py).

    python bench/decode_formats.py --llama-cpp ~/.cache/s2t/llama.cpp
    python bench/decode_formats.py --models qwen2.5-coder-0.5b-instruct --formats int8,int8_avx2 --threads 1
    python bench/decode_formats.py --formats int8_avx2,int8_vnni@avx512_vnni,int8_vnni@avx2   # both int8_vnni builds
    python bench/decode_formats.py --formats int4_vnni@avx512_vnni,int4_vnni@avx2             # both int4_vnni builds

Writes <results dir>/<name>.json and .md: ms per step (median and min of the rounds), tokens/s from the
median, the weight bytes a step reads (bench/native_ref.engine_bytes_per_token) and the GB/s that implies,
and each format's ratio to llama.cpp at the same thread count.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import native_ref  # noqa: E402
from run_bench import RESULTS, git_commit, machine  # noqa: E402

DEFAULT_MODELS = ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct")


def _decode_rounds(engines: dict, prompt: list[int], threads: int, steps: int, rounds: int) -> dict:
    """Interleaved timed rounds over already-prefilled caches; returns per format its seconds per step of each
    round and its argmax picks of the last round (fed the reference tokens)."""
    import torch

    torch.set_num_threads(threads)
    reference: list[int] | None = None
    per_step: dict[str, list[float]] = {f: [] for f in engines}
    picks: dict[str, list[int]] = {}
    for r in range(rounds + 1):  # round 0 warms up (and fixes the reference tokens); it is not timed
        for fmt, (engine, cache) in engines.items():
            cache.crop(len(prompt))
            token, got = prompt[-1], []
            t0 = time.perf_counter()
            for i in range(steps):
                logits = engine.forward([cache], [[token]], [[0]])[0][0]
                got.append(int(logits.argmax()))
                token = reference[i] if reference is not None else got[-1]
            elapsed = time.perf_counter() - t0
            if reference is None:
                reference = got
            if r > 0:
                per_step[fmt].append(elapsed / steps)
                picks[fmt] = got
    return {"per_step_s": per_step, "picks": picks, "reference": reference}


@contextlib.contextmanager
def vnni_build(spec: str):
    """'int8_vnni@avx2' -> the plan 'int8_vnni', loaded with S2T_INT8_VNNI_KERNEL=avx2 ('int4_vnni@avx2': with
    S2T_INT4_VNNI_KERNEL); the layers keep the build they were made with, so both builds can sit in one process
    and be timed round by round."""
    plan, _, build = spec.partition("@")
    variable = f"S2T_{plan.upper()}_KERNEL"
    before = os.environ.get(variable)
    if build:
        os.environ[variable] = build
    try:
        yield plan
    finally:
        if build:
            if before is None:
                os.environ.pop(variable, None)
            else:
                os.environ[variable] = before


def measure_model(model: str, cache_dir: Path, formats: list[str], threads: list[int], steps: int, rounds: int,
                  prompt_tokens: int) -> list[dict]:
    import torch

    from s2t.runtime import Engine, load_model

    engines, config, loaded = {}, None, {}
    prompt: list[int] = []
    for fmt in formats:
        with vnni_build(fmt) as plan:
            lm = load_model(model, cache_dir, plan, threads=max(threads))
        # fixed ids (the speed of a step does not depend on them), inside any vocabulary
        prompt = [(1000 + i) % lm.vocab_size for i in range(prompt_tokens)]
        engine = Engine(lm)
        cache = engine.new_cache()
        cache.reserve(prompt_tokens + steps + 1)
        with torch.inference_mode():
            engine.forward([cache], [prompt], [[prompt_tokens - 1]])
        engines[fmt] = (engine, cache)
        config = lm.model.config.to_dict()
        loaded[fmt] = {"plan": lm.plan.describe(), "load_s": round(lm.load_s, 1)}
    rows = []
    for t in threads:
        with torch.inference_mode():
            res = _decode_rounds(engines, prompt, t, steps, rounds)
        for fmt in formats:
            secs = res["per_step_s"][fmt]
            median = statistics.median(secs)
            one_row = native_ref.one_row_format(loaded[fmt]["plan"])  # 'auto' resolved
            step_bytes = native_ref.engine_bytes_per_token(config, one_row)
            differ = sum(a != b for a, b in zip(res["picks"][fmt], res["reference"]))
            rows.append({"model": model, "engine": "s2t", "weight_formats": fmt,
                         "plan": loaded[fmt]["plan"], "threads": t, "steps": steps, "rounds": rounds,
                         "ms_per_step_median": round(median * 1e3, 2), "ms_per_step_min": round(min(secs) * 1e3, 2),
                         "tokens_per_s": round(1 / median, 2), "weight_bytes_per_token": step_bytes,
                         "weight_gb_per_token": round(step_bytes / 1e9, 3),
                         "gb_per_s": round(step_bytes / median / 1e9, 2),
                         "argmax_differs_from_first_format": differ, "load_s": loaded[fmt]["load_s"]})
    return rows


def markdown(payload: dict) -> str:
    lines = [f"# {payload['name']}", "", f"`{payload['command']}`", "",
             f"{payload['date']} · commit {payload['commit']} · {payload['machine'].get('cpu', '')}", "",
             "| model | engine | weight formats | threads | ms/step (median, min) | tokens/s | GB/token | GB/s "
             "| ÷ llama.cpp | argmax ≠ first format |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        if r["engine"] == "s2t":
            lines.append(f"| {r['model']} | s2t | {r['weight_formats']} | {r['threads']} | "
                         f"{r['ms_per_step_median']}, {r['ms_per_step_min']} | {r['tokens_per_s']} | "
                         f"{r['weight_gb_per_token']} | {r['gb_per_s']} | {r.get('vs_llama_cpp', '–')} | "
                         f"{r['argmax_differs_from_first_format']}/{r['steps']} |")
        else:
            lines.append(f"| {r['model']} | llama.cpp (llama-bench tg{r['n_gen']}) | GGUF | {r['threads']} | – | "
                         f"{r['tokens_per_s']:.2f} ± {r['tokens_per_s_sd']:.2f} sd | {r['weight_gb_per_token']} | "
                         f"{r['gb_per_s']} | 1 | – |")
    lines += ["", "- tokens/s of the engine: 1 / the median seconds per step over the rounds (formats interleaved "
              "round by round); one process per model, no server around it",
              "- GB/token: weight bytes one decode step reads (s2t: every linear layer in its one-row format plus "
              "biases, norms and one embedding row; llama.cpp: the GGUF file)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", default="decode-formats")
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS), help="registry names or model directories")
    ap.add_argument("--formats", default="int8,int8_avx2",
                    help="weight formats to compare, separated by ';' when a format is a 5-bucket plan; "
                         "int8_vnni@avx2 / int4_vnni@avx512_vnni pick that format's build (default: int8,int8_avx2)")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--steps", type=int, default=32, help="decode steps per round (default 32)")
    ap.add_argument("--rounds", type=int, default=4, help="timed rounds per format (default 4)")
    ap.add_argument("--prompt-tokens", type=int, default=63, help="prefilled context (default 63)")
    ap.add_argument("--llama-cpp", type=Path, default=None, metavar="DIR",
                    help="a llama.cpp build (bench/build_llama_cpp.sh): llama-bench rows at the same threads")
    ap.add_argument("--n-gen", type=int, default=128, help="llama-bench tokens per repeat (default 128)")
    ap.add_argument("--cache-dir", type=Path, default=None, help="model cache (default: the s2t cache)")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    from s2t.model_store import default_cache_dir, fetch_gguf

    cache_dir = args.cache_dir or default_cache_dir()
    formats = [f for f in (args.formats.split(";") if ";" in args.formats else args.formats.split(",")) if f]
    threads = [int(t) for t in args.threads.split(",") if t]
    models = [m for m in args.models.split(",") if m]
    rows = []
    for model in models:
        print(f"[decode] {model}: {', '.join(formats)} at {threads} thread(s)", flush=True)
        rows += measure_model(model, cache_dir, formats, threads, args.steps, args.rounds, args.prompt_tokens)
    if args.llama_cpp is not None:
        bin_dir = native_ref.find_llama_cpp(args.llama_cpp)
        for model in models:
            gguf = fetch_gguf(model, cache_dir)
            size = gguf.stat().st_size
            for t in threads:
                print(f"[decode] llama-bench {model} at {t} thread(s)", flush=True)
                r = native_ref.llama_bench(bin_dir, gguf, t, None, args.n_gen)
                rows.append({"model": model, "engine": "llama.cpp", "threads": t, **r,
                             "weight_bytes_per_token": size, "weight_gb_per_token": round(size / 1e9, 3),
                             "gb_per_s": round(size * r["tokens_per_s"] / 1e9, 2)})
        native = {(r["model"], r["threads"]): r["tokens_per_s"] for r in rows if r["engine"] == "llama.cpp"}
        for r in rows:
            ref = native.get((r["model"], r["threads"]))
            if r["engine"] == "s2t" and ref:
                r["vs_llama_cpp"] = round(r["tokens_per_s"] / ref, 3)
    payload = {"name": args.name, "command": " ".join(["python", "bench/decode_formats.py", *(argv or sys.argv[1:])]),
               "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "commit": git_commit(),
               "machine": machine(), "rows": rows}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"{args.name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.results_dir / f"{args.name}.md").write_text(markdown(payload))
    print(markdown(payload))
    return payload


if __name__ == "__main__":
    main()

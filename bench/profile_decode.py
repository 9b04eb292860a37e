"""Where a batch-1 decode step's time goes: the engine's linear kernels, attention, or everything around them.

Runs `Engine.forward` decode steps of one model in a child process (pinned with `taskset` when --cpus is
given) and samples it with py-spy (a dependency of ray[serve]) for --seconds once it is warm, then sorts the
samples by their innermost Python frame: the weight-format kernel call (s2t/weight_formats.py `_apply`),
attention (transformers' sdpa integration), the KV-cache copy (s2t/runtime.py `_BatchCache.update`), and
everything else (norms, rotary embeddings, module dispatch, small tensor ops: what a compiled step, e.g.
`torch.compile`, could fuse or remove). That last share bounds what such a step could gain without faster
kernels: at most 1 / (1 - share).

    python bench/profile_decode.py --models qwen2.5-coder-0.5b-instruct,qwen2.5-coder-1.5b-instruct \
        --weight-formats int8_vnni --threads 1 --cpus 0

py-spy stops the process briefly for every sample, so tokens/s under sampling is lower than without; the
shares are what this measures. Writes <results dir>/<name>.json and .md.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from run_bench import RESULTS, results_header, write_results  # noqa: E402

# innermost frame (as py-spy names it: "function (file:line)") -> category; the first match wins
CATEGORIES = (("linear kernels", ("_apply (s2t/weight_formats.py",)),
              ("attention", ("sdpa_attention_forward (", "scaled_dot_product_attention")),
              ("KV cache copy", ("_BatchCache.update (s2t/runtime.py",)))
OTHER = "everything else"

CHILD = """
import sys, time, torch
from pathlib import Path
from s2t.runtime import Engine, load_model
model, fmt, threads, cache_dir = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
lm = load_model(model, Path(cache_dir), fmt, threads=threads)
engine = Engine(lm)
prompt = [(1000 + i) % lm.vocab_size for i in range(63)]
cache = engine.new_cache()
cache.reserve(63 + 256)
with torch.inference_mode():
    engine.forward([cache], [prompt], [[62]])
    token, steps, t0 = prompt[-1], 0, None
    while True:  # decode 256 positions after the prompt, again and again, until killed
        if cache.length >= 63 + 255:
            cache.crop(63)
        token = int(engine.forward([cache], [[token]], [[0]])[0][0].argmax())
        steps += 1
        if steps == 16:
            print("READY", flush=True)
            t0, steps = time.perf_counter(), 0
        elif t0 is not None and steps % 32 == 0:
            print(f"TPS {steps / (time.perf_counter() - t0):.3f}", flush=True)
"""


def categorise(raw: str) -> tuple[dict[str, int], dict[str, int]]:
    """py-spy's raw (collapsed) stacks -> samples per category and per innermost frame."""
    by_category: dict[str, int] = collections.Counter()
    by_frame: dict[str, int] = collections.Counter()
    for line in raw.splitlines():
        if not line.strip():
            continue
        stack, count = line.rsplit(" ", 1)
        leaf = stack.split(";")[-1]
        by_frame[leaf] += int(count)
        category = next((name for name, marks in CATEGORIES if any(m in leaf for m in marks)), OTHER)
        by_category[category] += int(count)
    return dict(by_category), dict(by_frame)


def profile(model: str, weight_formats: str, threads: int, cpus: str | None, seconds: float, rate: int,
            cache_dir: Path) -> dict:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    pin = ["taskset", "-c", cpus] if cpus else []
    child = subprocess.Popen([*pin, sys.executable, "-c", CHILD, model, weight_formats, str(threads), str(cache_dir)],
                             stdout=subprocess.PIPE, text=True)
    try:
        for line in child.stdout:
            if line.strip() == "READY":
                break
        else:
            raise RuntimeError(f"the decode process for {model} exited with {child.wait()} before it was warm")
        out = Path(f"/tmp/profile-decode-{child.pid}.raw")
        subprocess.run([py_spy, "record", "-p", str(child.pid), "-d", str(int(seconds)), "-r", str(rate), "-f", "raw",
                        "-o", str(out)], check=True, capture_output=True)
        raw = out.read_text()
        out.unlink()
    finally:
        child.kill()
        rest = child.communicate()[0]
    tps = [float(line.split()[1]) for line in rest.splitlines() if line.startswith("TPS ")]
    by_category, by_frame = categorise(raw)
    total = sum(by_category.values())
    shares = {name: by_category.get(name, 0) / total for name, _ in CATEGORIES} | {OTHER: by_category.get(OTHER, 0) / total}
    return {"model": model, "weight_formats": weight_formats, "threads": threads, "cpus": cpus or "all",
            "samples": total, "shares": shares, "tokens_per_s_under_sampling": tps[-1] if tps else None,
            "bound_without_other": 1 / (1 - shares[OTHER]) if shares[OTHER] < 1 else None,
            "top_frames": [[frame, n / total] for frame, n in sorted(by_frame.items(), key=lambda kv: -kv[1])[:12]]}


def markdown(payload: dict) -> str:
    names = [name for name, _ in CATEGORIES] + [OTHER]
    md = [f"# {payload['name']}\n\n", f"`{payload['command']}`\n\n",
          f"{payload['date']} · commit {payload['commit']} · {payload['machine'].get('cpu', '')}\n\n",
          "| model | formats | threads | CPUs | samples | " + " | ".join(names) + " | bound 1/(1 − else) |\n",
          "|---|---|---|---|---|" + "---|" * len(names) + "---|\n"]
    for r in payload["rows"]:
        md.append(f"| {r['model']} | {r['weight_formats']} | {r['threads']} | {r['cpus']} | {r['samples']} | "
                  + " | ".join(f"{r['shares'][n]:.1%}" for n in names) + f" | {r['bound_without_other']:.2f}× |\n")
    md.append("\nShares of py-spy samples by innermost Python frame during steady batch-1 decoding (63-token "
              "prompt, up to 256 positions). 'everything else' is what a compiled step could at best remove.\n")
    return "".join(md)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", default="profile-decode")
    ap.add_argument("--models", default="qwen2.5-coder-0.5b-instruct,qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--weight-formats", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cpus", default=None, help="taskset CPU list for the decode process (default: unpinned)")
    ap.add_argument("--seconds", type=float, default=12.0, help="py-spy sampling time per model (default 12)")
    ap.add_argument("--rate", type=int, default=200, help="py-spy samples per second (default 200)")
    ap.add_argument("--cache-dir", type=Path, default=None, help="model cache (default: the s2t cache)")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    from s2t.config import load_settings

    cache_dir = args.cache_dir or load_settings().cache_dir
    rows = [profile(m, args.weight_formats, args.threads, args.cpus, args.seconds, args.rate, cache_dir)
            for m in args.models.split(",")]
    payload = results_header(args.name, "bench/profile_decode.py", sys.argv[1:] if argv is None else argv)
    payload["rows"] = rows
    write_results(args.results_dir, payload, markdown(payload))
    print(markdown(payload))
    return payload


if __name__ == "__main__":
    main()

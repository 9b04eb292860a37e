"""What a loaded model costs in memory (issue #14, item 2): for each model, a fresh process loads it with the
given weight formats (s2t.runtime.load_model, as the worker and the selector do) and reports

  - formats_gib: the bytes its weights hold as loaded: every parameter (embeddings, norms, ...) plus every
    FormattedLinear's formats (packed fp32 counted as in x out x 4 bytes: oneDNN's handle has no size);
  - peak_rss_gib / rss_gib: VmHWM and VmRSS of that process after loading (GiB = 2^30 bytes), and their
    ratios to formats_gib (the issue's bound: about 1.3x plus the KV budget, which loading does not touch).

    python bench/load_memory.py                                   # both embedded models, int8 + packed fp32
    python bench/load_memory.py --models qwen2.5-coder-0.5b-instruct --weight-formats auto
    git worktree add /tmp/before <commit>; python bench/load_memory.py --source /tmp/before --source .
                                                                  # the same loads from another checkout's s2t

Writes <results dir>/<name>.json and .md. One model at a time: the 1.5B peaks near 9 GiB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from run_bench import RESULTS, results_header, write_results  # noqa: E402

GIB = 1 << 30
PINNED = "int8,int8,int8,fp32_packed,fp32_packed"

CHILD = """
import json, sys
from pathlib import Path
from s2t.runtime import load_model
from s2t.weight_formats import FormattedLinear

def status():
    out = {}
    for line in open("/proc/self/status"):
        key = line.split(":")[0]
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) * 1024
    return out

lm = load_model(sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
held = sum(p.numel() * p.element_size() for p in lm.model.parameters())
seen = set()
for m in lm.model.modules():
    if isinstance(m, FormattedLinear):
        if m.bias is not None:
            held += m.bias.numel() * m.bias.element_size()
        for fmt, w in m.weights.items():
            if fmt == "fp32_packed":
                held += m.in_features * m.out_features * 4
            else:  # int8_vnni's tuple also holds its input width; int8_amx shares int8_vnni's tensors
                for t in (w if isinstance(w, tuple) else (w,)):
                    if hasattr(t, "numel") and t.data_ptr() not in seen:
                        seen.add(t.data_ptr())
                        held += t.numel() * t.element_size()
print(json.dumps({"held": held, "status": status(), "plan": lm.plan.describe(), "load_s": lm.load_s}))
"""


def measure(model: str, cache_dir: Path, weight_formats: str, threads: int, source: Path) -> dict:
    """Load `model` in a fresh process that imports s2t from the checkout at `source` (its working directory
    comes first on sys.path)."""
    proc = subprocess.run([sys.executable, "-c", CHILD, model, str(cache_dir), weight_formats, str(threads)],
                          capture_output=True, text=True, cwd=source)
    if proc.returncode != 0:
        raise RuntimeError(f"loading {model} failed: {proc.stderr[-2000:]}")
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    st = m["status"]
    held = m["held"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=source).stdout.strip()
    return {"model": model, "s2t_from": commit or str(source), "weight_formats": m["plan"],
            "load_s": round(m["load_s"], 1),
            "formats_bytes": held, "formats_gib": round(held / GIB, 3), "peak_rss_gib": round(st["VmHWM"] / GIB, 3),
            "rss_gib": round(st["VmRSS"] / GIB, 3), "rss_anon_gib": round(st["RssAnon"] / GIB, 3),
            "rss_file_gib": round(st["RssFile"] / GIB, 3),
            "peak_over_formats": round(st["VmHWM"] / held, 3), "rss_over_formats": round(st["VmRSS"] / held, 3)}


def markdown(payload: dict) -> str:
    md = [f"# {payload['name']}\n\nCommand: `{payload['command']}`  \n",
          f"Date: {payload['date']}; commit {payload['commit']}  \n",
          f"Machine: {payload['machine']['cpu']} ({payload['machine']['cores']} cores)\n\n",
          "| model | s2t from | weight formats | formats GiB | peak RSS GiB | RSS after load GiB (anon / file) | "
          "peak ÷ formats | RSS ÷ formats | load s |\n|---|---|---|---|---|---|---|---|---|\n"]
    md += [f"| {r['model']} | {r['s2t_from']} | {r['weight_formats']} | {r['formats_gib']} | {r['peak_rss_gib']} | "
           f"{r['rss_gib']} "
           f"({r['rss_anon_gib']} / {r['rss_file_gib']}) | {r['peak_over_formats']} | {r['rss_over_formats']} | "
           f"{r['load_s']} |\n" for r in payload["rows"]]
    return "".join(md)


def main(argv: list[str] | None = None) -> dict:
    from s2t.model_store import default_cache_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="load-memory")
    ap.add_argument("--models", default="qwen2.5-coder-0.5b-instruct,qwen2.5-coder-1.5b-instruct",
                    help="comma-separated registry names or model directories")
    ap.add_argument("--weight-formats", default=PINNED)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--cache-dir", type=Path, default=None, help="model cache (default: the user cache)")
    ap.add_argument("--source", type=Path, action="append", default=None,
                    help="a checkout whose s2t is loaded (repeatable; default: this one)")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    cache_dir = args.cache_dir or default_cache_dir()
    payload = results_header(args.name, "bench/load_memory.py", sys.argv[1:] if argv is None else argv)
    payload["rows"] = []
    sources = [s.resolve() for s in (args.source or [BENCH.parent])]
    for model in [m for m in args.models.split(",") if m]:
        for source in sources:
            payload["rows"].append(measure(model, cache_dir, args.weight_formats, args.threads, source))
            write_results(args.results_dir, payload, markdown(payload))  # after every load: a crash keeps the rows
    print(markdown(payload))
    return payload


if __name__ == "__main__":
    main()

"""A kernel change, before and after, in one process: a model's forwards of M new tokens with the int8 kernels
(int8_vnni, int8_amx) of a git revision against this checkout's, interleaved call by call on the same weights.

Two builds of a kernel cannot share one extension name, so the revision's sources (and the headers beside them)
are written to a directory of their own and built under another name; a switch then routes every int8_vnni /
int8_amx call of the loaded model to one build or the other. Compare runs of two processes and this machine's
drift (±15 % between runs) swamps a kernel change of a few percent; interleaved in one process it does not.

    taskset -c 1 python bench/kernel_ab.py --name prefetch-ab --base 2ead809

Writes bench/results/<name>.{json,md}: per M, the median ms of both and after ÷ before, and whether the two
builds' outputs were bit for bit the same on the model's first layer's weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from run_bench import commit_of, results_header, write_results  # noqa: E402

from s2t import kernels  # noqa: E402

PROMPT_TOKENS = 100
SIDES = ("before", "after")


def write_sources(rev: str, into: Path) -> list[str]:
    """s2t/kernels' C++ sources and headers as they were at `rev`, written to `into`; their names."""
    listing = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", rev, "s2t/kernels/"],
                             check=True, capture_output=True, text=True).stdout.split()
    names = []
    for path in listing:
        if path.endswith((".cpp", ".h")):
            text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], check=True,
                                  capture_output=True).stdout
            (into / Path(path).name).write_bytes(text)
            names.append(Path(path).name)
    return names


class Switch:
    """A kernel callable that runs `builds[side]`, `side` set from outside: the model binds it once at load."""

    def __init__(self, builds: dict[str, object]):
        self.builds, self.side = builds, "after"

    def __call__(self, *args):
        return self.builds[self.side](*args)


def build_base(kernel_name: str, rev: str, into: Path):
    """The kernel `kernel_name` (a key of s2t.kernels._KERNELS) built from `rev`'s sources in `into`, by the
    project's own builder under another extension name (its includes resolve beside the source, in `into`)."""
    spec = kernels._KERNELS[kernel_name]
    return kernels._build(dataclasses.replace(
        spec, module=f"{spec.module}_base_{rev[:12]}", source=str(into / spec.source),
        headers=tuple(str(into / h) for h in spec.headers if (into / h).exists())))


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="kernel-ab")
    ap.add_argument("--base", required=True, help="git revision whose kernels are 'before'")
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--plan", default="int8_vnni,int8_vnni,int8_amx,int8_amx,int8_amx",
                    help="weight-format plan (one format per row-count bucket; no 'auto': it would time the switch)")
    ap.add_argument("--rows", default="1,2,3,4,5,6,8")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    try:
        rev = commit_of(args.base)
    except ValueError as e:
        ap.error(f"--base: {e}")
    torch.set_num_threads(1)
    switches = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_sources(rev, Path(tmp))
        for fmt, loader in (("int8_vnni", "load_int8_vnni_linear"), ("int8_amx", "load_int8_amx_linear")):
            current = getattr(kernels, loader)()
            if current is None:
                continue
            name = kernels.kernel_for(fmt) if fmt == "int8_vnni" else fmt
            switches[fmt] = Switch({"before": build_base(name, rev, Path(tmp)), "after": current})
            setattr(kernels, loader, lambda s=switches[fmt]: s)
    if not switches:
        sys.exit("kernel_ab: neither int8_vnni nor int8_amx runs here")

    from s2t.runtime import Engine, load_model
    from s2t.weight_formats import FormattedLinear

    engine = Engine(load_model(args.model, Path.home() / ".cache/s2t/models", args.plan, threads=1))
    print(f"plan: {engine.lm.plan.describe()}", flush=True)
    # the two builds' outputs on one of the model's weights (a prefetch change leaves them bit for bit the same)
    identical = {}
    layer = next(m for m in engine.lm.model.modules() if isinstance(m, FormattedLinear)
                 and any(f in m.weights for f in switches))
    for fmt, switch in switches.items():
        u, scale, k = next(w for f, w in layer.weights.items() if f in switches)[:3]
        x = torch.randn(5, k)
        outs = {}
        for side in SIDES:
            switch.side = side
            outs[side] = switch(x, u, scale, k)
        identical[fmt] = bool(torch.equal(outs["before"], outs["after"]))

    def set_side(side: str) -> None:
        for s in switches.values():
            s.side = side

    rows = [int(r) for r in args.rows.split(",")]
    vocab = engine.lm.vocab_size
    prompt = [(1000 + i) % vocab for i in range(PROMPT_TOKENS)]
    ms: dict[tuple[str, int], list[float]] = {}
    with torch.inference_mode():
        cache = engine.new_cache()
        cache.reserve(PROMPT_TOKENS + max(rows))
        engine.forward([cache], [prompt], [[PROMPT_TOKENS - 1]])
        for m in rows:
            for r in range(args.rounds + 1):  # the first round warms up
                tokens = [(2000 + 7 * i + r) % vocab for i in range(m)]
                for side in (SIDES if r % 2 else SIDES[::-1]):
                    set_side(side)
                    t0 = time.perf_counter()
                    engine.forward([cache], [tokens], [list(range(m))])
                    dt = (time.perf_counter() - t0) * 1e3
                    cache.crop(PROMPT_TOKENS)
                    if r:
                        ms.setdefault((side, m), []).append(dt)
            b, a = (statistics.median(ms[(s, m)]) for s in SIDES)
            print(f"M={m}: before {b:.1f} ms, after {a:.1f} ms, after / before {a / b:.3f}", flush=True)
    out_rows = [{"rows": m, **{f"{s}_ms": round(statistics.median(ms[(s, m)]), 1) for s in SIDES},
                 "after_over_before": round(statistics.median(ms[("after", m)]) / statistics.median(ms[("before", m)]), 3)}
                for m in rows]
    payload = results_header(args.name, "bench/kernel_ab.py", argv)
    # 'after' is this checkout's kernels, which may not be committed yet
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "s2t/kernels"], capture_output=True,
                           text=True).stdout.strip()
    after = f"commit {payload['commit']}" + (" with uncommitted kernel changes" if dirty else "")
    payload.update(base=rev, after=after, model=args.model, plan=engine.lm.plan.describe(), threads=1,
                   rounds=args.rounds, prompt_tokens=PROMPT_TOKENS, identical_outputs=identical, rows=out_rows)
    md = [f"# {args.name}", "", f"`taskset -c 1 {payload['command']}`", "",
          f"{payload['date']} · before: the kernels at {rev[:12]}, after: {after} · "
          f"{payload['machine'].get('cpu', '')}", "",
          f"{args.model}, plan {payload['plan']}; one forward of M new tokens after a {PROMPT_TOKENS}-token prompt, "
          f"logits at every new position, one thread, both builds interleaved call by call on the same weights; "
          f"median of {args.rounds}. Outputs bit for bit the same: "
          + ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in identical.items()) + ".", "",
          "| M | before ms | after ms | after ÷ before |", "|---|---|---|---|"]
    md += [f"| {r['rows']} | {r['before_ms']} | {r['after_ms']} | {r['after_over_before']} |" for r in out_rows]
    write_results(args.results_dir, payload, "\n".join(md) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])

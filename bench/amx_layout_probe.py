"""Probe (issue #14): would the weights in AMX's B layout make a forward of a few rows cost what one row does?

A one-thread Select of 4-5 positions takes 1.32x a one-position one (bench/results/trace-selects-split.md):
int8_vnni turns compute-bound above two rows, and int8_amx reads its weights slower than int8_vnni does at one
row. This times, per matrix of the 1.5B selector and per row count, on one thread: int8_vnni, int8_amx, and
bench/kernels/amx_b_layout.cpp (the same numbers with the weights in AMX's B layout and the activation rows in
A; one row through AVX-512 VNNI on that layout). Each matrix is cycled through enough copies (--gb) that it
comes from memory, as in a decode step; the formats interleave round by round; median of the rounds.

    taskset -c 1 python bench/amx_layout_probe.py --name amx-layout-probe

Writes bench/results/<name>.{json,md}. Needs a CPU with AMX-INT8 (and Linux granting the tile state).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from run_bench import git_commit, machine, write_results  # noqa: E402

from s2t import kernels  # noqa: E402
from s2t import weight_formats as wf  # noqa: E402

# Qwen2.5-Coder-1.5B's matrices as the decode step calls them (q/k/v and gate/up fused), outputs x inputs
SHAPES = {"gate/up fused": (2 * 8960, 1536), "down": (1536, 8960), "q/k/v fused": (2048, 1536)}
FORMATS = ("int8_vnni", "int8_amx", "b_layout")


def b_layout(u: torch.Tensor) -> torch.Tensor:
    """int8_vnni's weights u [N, Kp] (uint8, q + 128) -> per band of 16 outputs and chunk of 64 inputs, 16 rows
    of kq each holding 16 outputs x 4 inputs (AMX's B layout), bands one after another; shape kept [N, Kp]."""
    n, kp = u.shape
    return u.reshape(n // 16, 16, kp // 64, 16, 4).permute(0, 2, 3, 1, 4).contiguous().reshape(n, kp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", default="amx-layout-probe")
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gb", type=float, default=1.2, help="weight bytes cycled per matrix shape")
    ap.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    if not kernels._cpu_supports("int8_amx") or kernels.load_int8_amx_linear() is None:
        sys.exit(f"amx_layout_probe: int8_amx is not available here ({kernels.unavailable_reason('int8_amx')})")
    torch.set_num_threads(1)
    # torch's builder rebuilds on a change of the source or the flags, not of what it includes: the headers'
    # hash goes into the flags, as s2t/kernels does for its own builds
    include = ROOT / "s2t" / "kernels"
    digest = hashlib.sha256(b"".join((include / h).read_bytes() for h in ("act_quant.h", "amx_tiles.h"))).hexdigest()[:16]
    probe = load(name="s2t_probe_amx_b_layout", sources=[str(ROOT / "bench" / "kernels" / "amx_b_layout.cpp")],
                 extra_cflags=[*kernels._AMX_INT8, f"-I{include}", f"-DS2T_HEADERS_SHA256={digest}"],
                 extra_ldflags=["-fopenmp"])
    rows = [int(r) for r in args.rows.split(",")]
    amx = wf._prepare_kernel("int8_amx")
    results = []
    for label, (n, k) in SHAPES.items():
        copies = max(4, int(args.gb * 1e9 // (n * k)))
        base = torch.randn(n, k) * 0.02
        held = [wf._prepare(base + 0.001 * i, "int8_vnni") for i in range(copies)]  # (u, scale, k, kernel)
        vnni = held[0][3]
        calls = {"int8_vnni": (vnni, [h[:3] for h in held]), "int8_amx": (amx, [h[:3] for h in held]),
                 "b_layout": (probe.b_layout_linear, [(b_layout(h[0]), h[1], h[2]) for h in held])}
        agreement = {}
        for m in (1, 5):  # the probe against int8_vnni: equal up to the order of float sums
            x = torch.randn(m, k)
            ref, got = vnni(x, *held[0][:3]), probe.b_layout_linear(x, *calls["b_layout"][1][0])
            agreement[m] = float((ref - got).abs().max() / ref.abs().max())
        ms = {f: {m: [] for m in rows} for f in FORMATS}
        for m in rows:
            x = torch.randn(m, k)
            for _ in range(args.rounds):
                for fmt in FORMATS:
                    fn, weights = calls[fmt]
                    for w in weights:
                        fn(x, *w)
                    t = time.perf_counter()
                    for _ in range(2):
                        for w in weights:
                            fn(x, *w)
                    ms[fmt][m].append((time.perf_counter() - t) / (2 * len(weights)) * 1e3)
        results.append({"matrix": label, "outputs": n, "inputs": k, "copies": copies,
                        "max_relative_difference_vs_int8_vnni": agreement,
                        "ms": {f: {m: statistics.median(v) for m, v in per.items()} for f, per in ms.items()}})
        print(f"[amx-layout-probe] {label}: " + " | ".join(
            f"{f} " + " ".join(f"{results[-1]['ms'][f][m]:.2f}" for m in rows) for f in FORMATS), flush=True)
        del held, calls
    command = "python bench/amx_layout_probe.py " + " ".join(sys.argv[1:])
    payload = {"name": args.name, "command": command.strip(), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
               "commit": git_commit(), "machine": machine(), "rows": rows, "rounds": args.rounds, "results": results}
    lines = [f"# {args.name}", "", f"`{payload['command']}`", "",
             f"{payload['date']} · commit {payload['commit']} · {payload['machine'].get('cpu', '')}", "",
             f"One thread; each matrix cycled through ~{args.gb:g} GB of copies (from memory); ms per matrix, median "
             f"of {args.rounds} interleaved rounds, at {' / '.join(map(str, rows))} rows.", "",
             "| matrix (outputs × inputs) | int8_vnni | int8_amx | B layout (probe) | probe ÷ int8_vnni at one row |",
             "|---|---|---|---|---|"]
    for r in results:
        cells = [" / ".join(f"{r['ms'][f][m]:.2f}" for m in rows) for f in FORMATS]
        lines.append(f"| {r['matrix']}, {r['outputs']:,} × {r['inputs']:,} | " + " | ".join(cells)
                     + f" | {r['ms']['b_layout'][rows[0]] / r['ms']['int8_vnni'][rows[0]]:.2f} |")
    lines += ["", "- B layout: bench/kernels/amx_b_layout.cpp; one row through AVX-512 VNNI on the same layout, more "
              "through AMX (tdpbsud) with the activation rows in A", "- max relative difference against int8_vnni "
              "(1 and 5 rows): " + "; ".join(f"{r['matrix']} " + ", ".join(f"{v:.1e}" for v in
                                             r["max_relative_difference_vs_int8_vnni"].values()) for r in results), ""]
    write_results(args.results_dir, payload, "\n".join(lines))


if __name__ == "__main__":
    main()

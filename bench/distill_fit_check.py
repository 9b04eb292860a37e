"""Can the S2T-Local trainer fit its own training data? A capacity check on a few real sessions.

    S2T_DATA_DIR=... python bench/distill_fit_check.py --sessions 12 --epochs 6 --lr 3e-4 --bin-lr 1e-5 \
        --bin-init-std 0.003 --out /work/runs/fit/bininit
    python bench/distill_fit_check.py --report /work/runs/fit/saturated /work/runs/fit/bininit --name s2t-local-fit

Trains on the top-10 %-by-KL groups of `--sessions` training sessions (drawn from the sessions `s2t distill`
would train on, seeded) for several epochs, and evaluates agreement@1 on those same groups every
`--eval-every` steps. An adapter that cannot lift agreement on groups it has seen many times has a learning
problem, not a data problem: this is how the score bins' saturation was found (TrainConfig.bin_lr). `--report`
writes bench/results/NAME.{json,md} from the summaries of finished runs.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))


def run(args) -> Path:
    from distill.groups import LabelBy, read_groups, sessions, split_held_out, top_positions
    from distill.train import TrainConfig, train
    from s2t.config import load_settings
    from s2t.model_store import resolve_model

    settings = load_settings()
    log_dir = Path(args.log_dir) if args.log_dir else settings.selection_log_dir()
    base = resolve_model(settings.worker.model, settings.cache_dir)
    groups = top_positions(list(read_groups(log_dir, None, None, context_tail=511)), args.tau, LabelBy.KL)
    pool, _ = split_held_out(groups, 0.10)  # never a session s2t distill holds out
    ids = sorted({g.session_id for g in pool})
    random.Random(args.seed).shuffle(ids)
    picked = set(ids[:args.sessions])
    fit = [g for g in pool if g.session_id in picked]
    print(f"[fit-check] {len(fit)} groups of {len(picked)} sessions from {log_dir}", file=sys.stderr, flush=True)
    config = TrainConfig(epochs=args.epochs, lr=args.lr, schedule="constant", rank=args.rank, alpha=2.0 * args.rank,
                         lora_layers=args.lora_layers, bin_lr=args.bin_lr, bin_init_std=args.bin_init_std,
                         eval_every=args.eval_every, checkpoint_every=0, progress=True)
    summary = train(fit, fit, base, Path(args.out), config, sessions(log_dir, None, None))
    print(json.dumps({"fit_before": summary["metrics_before"], "fit_after": summary["metrics"]}, default=str))
    return Path(args.out) / "summary.json"


def fit_row(summary: dict, out_dir: str) -> dict:
    cfg = summary["config"]
    curve = [{"step": p["step"], "agreement_at_1": round(p["agreement_at_1"], 4)} for p in summary["eval_curve"]]
    peaks = summary["curves"].get("bin_peak") or []
    return {"kind": "fit-check", "out": out_dir, "groups": summary["metrics"]["groups"], "steps": summary["steps"],
            "epochs": cfg["epochs"], "lr": cfg["lr"], "bin_lr": cfg.get("bin_lr"), "bin_init_std": cfg.get("bin_init_std", 0.0),
            "lora_layers": cfg["lora_layers"], "rank": cfg["rank"],
            "slm_top1_agreement": summary["metrics"]["slm_top1_agreement"],
            "fit_before": curve[0]["agreement_at_1"], "fit_after": curve[-1]["agreement_at_1"],
            "fit_best": max(p["agreement_at_1"] for p in curve), "curve": curve,
            "bin_peak_last_step": peaks[-1] if peaks else None, "wall_s": summary["wall_s"]}


def report(out_dirs: list[str], name: str, command: str) -> tuple[Path, Path]:
    rows = [fit_row(json.loads((Path(d) / "summary.json").read_text()), d) for d in out_dirs]
    RESULTS.mkdir(parents=True, exist_ok=True)
    js = RESULTS / f"{name}.json"
    js.write_text(json.dumps({"name": name, "command": command, "rows": rows}, indent=1) + "\n")
    lines = [f"# {name}: does the trainer fit the groups it trains on?", "", f"Command: `{command}`", "",
             "Agreement@1 with the LLM's choice, evaluated on the training groups themselves (constant lr).", "",
             "| run | groups | epochs (steps) | lr | bins lr | bins init noise | SLM top-1 | before | after | best | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{Path(r['out']).name}` | {r['groups']} | {r['epochs']} ({r['steps']}) | {r['lr']:g} | "
                     f"{r['bin_lr'] if r['bin_lr'] is not None else r['lr']:g} | {r['bin_init_std']:g} | "
                     f"{r['slm_top1_agreement']:.3f} | {r['fit_before']:.3f} | {r['fit_after']:.3f} | "
                     f"{r['fit_best']:.3f} | {r['wall_s']:.0f} |")
    md = RESULTS / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    return js, md


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report", nargs="+", metavar="OUT", help="write NAME.{json,md} from these finished runs")
    ap.add_argument("--name", default="s2t-local-fit")
    ap.add_argument("--command", default="", help="the commands that made the runs (for the report)")
    ap.add_argument("--log-dir", help="default: the selector's selection-log directory")
    ap.add_argument("--out", help="where the run's summary, checkpoint and adapter go")
    ap.add_argument("--sessions", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tau", type=float, default=0.10)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--bin-lr", type=float)
    ap.add_argument("--bin-init-std", type=float, default=0.0)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lora-layers", type=int, default=6)
    ap.add_argument("--eval-every", type=int, default=20)
    args = ap.parse_args(argv)
    if args.report:
        for path in report(args.report, args.name, args.command):
            print(path)
        return
    if not args.out:
        ap.error("--out is required to run a check")
    print(run(args))


if __name__ == "__main__":
    main()

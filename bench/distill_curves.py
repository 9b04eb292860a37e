"""Training curves of one `s2t distill` run, as a PNG and a markdown table beside the benchmark results.

    python bench/distill_curves.py DISTILL_OUT/summary.json --name s2t-local-more-data

Issue #13 asks, when accuracy does not move, what the training curves show. Two questions are read off them:
does the adapter fit its own training groups (train hit@1 rising above where it started: capacity and learning
rate are enough), and does what it fits hold out (held-out agreement@1 rising above the SLM's own top-1). Train
hit@1 per step is noisy (one session's row of ~15 groups), so it is drawn as a moving average over `--window`
steps. Held-out points exist before training, at the end, and every `s2t distill --eval-every` steps.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Mapping, Sequence

RESULTS = Path(__file__).resolve().parent / "results"


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values (shorter at the start, so the curve starts at step 1)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def held_out_points(summary: Mapping) -> list[dict]:
    """(step, agreement@1, Spearman ρ) at every held-out evaluation; s2t distill writes step 0 (before
    training) into its eval curve, so the curve is the whole story."""
    return [{"step": p["step"], "agreement_at_1": p["agreement_at_1"], "spearman": p.get("spearman")}
            for p in summary.get("eval_curve") or [] if p.get("agreement_at_1") is not None]


def epoch_means(summary: Mapping) -> list[dict]:
    """Train hit@1 and selection loss averaged over each epoch (steps_per_epoch = total_steps / epochs)."""
    curves, epochs = summary["curves"], max(1, int(summary["config"]["epochs"]))
    per_epoch = max(1, round(summary["total_steps"] / epochs))
    rows = []
    for e in range(epochs):
        hits = curves["hit1"][e * per_epoch:(e + 1) * per_epoch]
        sel = curves["selection"][e * per_epoch:(e + 1) * per_epoch]
        # summaries from before the bin-peak curve existed have none
        peak = (curves.get("bin_peak") or [])[e * per_epoch:(e + 1) * per_epoch]
        if hits:
            rows.append({"epoch": e + 1, "steps": len(hits), "train_hit1": sum(hits) / len(hits),
                         "train_selection_loss": sum(sel) / len(sel),
                         "bin_peak": sum(peak) / len(peak) if peak else None})
    return rows


def markdown(summary: Mapping, command: str) -> str:
    metrics = summary.get("metrics") or {}
    slm = metrics.get("slm_top1_agreement")
    lines = [f"# Training curves: `{summary.get('adapter')}`", "", f"Command: `{command}`", "",
             f"{summary['steps']} of {summary['total_steps']} steps ({summary['stopped']}), "
             f"{summary['wall_s']:.0f} s, peak RSS {summary['peak_rss_mb'] / 1024:.2f} GB, "
             f"learned prior weight {summary['prior_weight']:.3f}; {adapter_label(summary['config'])}.", "",
             "| epoch | steps | train hit@1 | train selection loss | top bin probability (1/16 undifferentiated, 1 saturated) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['epoch']} | {r['steps']} | {r['train_hit1']:.3f} | {r['train_selection_loss']:.4f} | "
              f"{'-' if r['bin_peak'] is None else format(r['bin_peak'], '.3f')} |" for r in epoch_means(summary)]
    lines += ["", f"Held-out ({metrics.get('groups')} groups; the SLM's own top-1 agrees with the LLM on "
              f"{slm:.3f} of them):" if slm is not None else "Held-out:", "",
              "| step | agreement@1 | Spearman ρ |", "|---|---|---|"]
    lines += [f"| {p['step']} | {p['agreement_at_1']:.3f} | "
              f"{'-' if p['spearman'] is None else format(p['spearman'], '.3f')} |" for p in held_out_points(summary)]
    return "\n".join(lines) + "\n"


def adapter_label(config: Mapping) -> str:
    """What was trained: the LoRA's rank and layers, or that it was held at zero (s2t distill --freeze-lora)."""
    layers = config.get("lora_layers")
    where = "all layers" if layers is None else f"top {layers} layers"
    if config.get("lora_trainable", True) is False:
        return f"LoRA frozen at zero ({where}): score bins and prior weight only"
    bins = ""
    if config.get("bin_lr") is not None or config.get("bin_init_std"):
        bins = f", bins lr {config.get('bin_lr') or config['lr']:g} init noise {config.get('bin_init_std') or 0:g}"
    return f"LoRA rank {config['rank']} on {where}{bins}"


def plot(summary: Mapping, out: Path, window: int) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = summary["curves"]
    fig = Figure(figsize=(9, 4), dpi=120)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    left.plot(curves["step"], moving_average(curves["hit1"], window), label=f"train hit@1 ({window}-step mean)")
    points = held_out_points(summary)
    left.plot([p["step"] for p in points], [p["agreement_at_1"] for p in points], marker="o",
              label="held-out agreement@1")
    slm = (summary.get("metrics") or {}).get("slm_top1_agreement")
    if slm is not None:
        left.axhline(slm, color="gray", linestyle="--", label=f"SLM top-1, held-out ({slm:.3f})")
    left.set_xlabel("optimizer step")
    left.set_ylabel("agreement with the LLM's choice")
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    right.plot(curves["step"], moving_average(curves["selection"], window), label="selection CE")
    right.plot(curves["step"], moving_average(curves["teacher_kl"], window), label="KL(teacher ‖ scores)")
    right.set_xlabel("optimizer step")
    right.set_ylabel(f"train loss per group ({window}-step mean)")
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    fig.suptitle(f"s2t distill: {summary['steps']} steps, lr {summary['config']['lr']:g}, "
                 f"{adapter_label(summary['config'])}", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("summary", type=Path, help="summary.json written by s2t distill in its --out directory")
    ap.add_argument("--name", required=True, help="writes bench/results/NAME.curves.{png,md}")
    ap.add_argument("--window", type=int, default=25)
    ap.add_argument("--command", default="", help="the s2t distill command that made the summary (for the table)")
    args = ap.parse_args(argv)
    summary = json.loads(args.summary.read_text())
    png = plot(summary, RESULTS / f"{args.name}.curves.png", args.window)
    md = RESULTS / f"{args.name}.curves.md"
    md.write_text(markdown(summary, args.command or f"s2t distill --out {args.summary.parent}"))
    print(png)
    print(md)


if __name__ == "__main__":
    main()

"""Pictures of a benchmark results file, written next to it as PNGs (issue #16).

- `<name>.tau.png`: accuracy against the share of positions where the verifier decides, one line per S2T
  configuration swept over the trigger rate tau: for `s2t` rows with the selector-side KL trigger the rate
  it is calibrated to fire at (tau; the LLM scores every position to compute KL, so its scored share says
  nothing about the sweep), 1 for `always`, and the measured triggered positions per token for the worker's
  LLM-free triggers and for `s2t-local` rows (the worker's local re-ranker: no LLM).
- `<name>.k.png`: accuracy against K (candidates per position), one line per configuration with at least two
  values of K.

Both carry Wilson 95% error bars and horizontal lines (with their Wilson bands) for the greedy, llm and maj8
rows when present. matplotlib is imported only when drawing, and only its Agg canvas is used (no pyplot
state, no display), so the benchmark runs without it and plots from any thread.

    python bench/plots.py bench/results/s2t-local.json
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping
from pathlib import Path

BASELINE_MODES = ("greedy", "llm", "maj8")
_BASELINE_STYLE = {"greedy": ("tab:gray", ":"), "llm": ("tab:red", "--"), "maj8": ("tab:purple", "-.")}


@dataclasses.dataclass(frozen=True)
class Point:
    row: str
    x: float
    accuracy: float
    ci95: tuple[float, float]
    n: int


def request_mode(row: Mapping) -> str:
    """The mode a row requested. Newer files record it; older ones are recognised by the row name."""
    if row.get("request_mode"):
        return str(row["request_mode"])
    name = str(row["mode"])
    return "s2t-local" if name.startswith("s2t-local") else "s2t" if name.startswith("s2t") else name


def _accuracy_rows(payload: Mapping) -> list[Mapping]:
    return [r for r in payload.get("rows", []) if r.get("kind") == "accuracy" and r.get("n")]


def _point(row: Mapping, x: float) -> Point:
    lo, hi = row.get("accuracy_ci95") or (row["accuracy"], row["accuracy"])
    return Point(row=str(row["mode"]), x=float(x), accuracy=float(row["accuracy"]), ci95=(float(lo), float(hi)),
                 n=int(row["n"]))


def _default_k(payload: Mapping) -> int | None:
    return (payload.get("settings", {}).get("worker", {}) or {}).get("num_candidates")


def _k_of(row: Mapping, payload: Mapping) -> int | None:
    return row.get("num_candidates") or _default_k(payload)


def baselines(payload: Mapping) -> dict[str, Point]:
    """Accuracy rows of the reference modes (greedy, llm, maj8), by mode."""
    return {request_mode(r): _point(r, 0.0) for r in _accuracy_rows(payload) if request_mode(r) in BASELINE_MODES}


def _config(row: Mapping) -> str:
    inflight = row.get("max_inflight_blocks")
    return (f"{row.get('trigger') or 'default'} trigger, block {row.get('block_size') or '-'}"
            + (f" x{inflight} in flight" if inflight else ""))


def tau_sweep_series(payload: Mapping) -> dict[str, list[Point]]:
    """S2T accuracy rows at the worker's default K, grouped by everything but the trigger rate, each sorted by
    the verifier's share. Rows at another K belong to the K sweep."""
    series: dict[str, list[Point]] = {}
    default_k = _default_k(payload)
    for r in _accuracy_rows(payload):
        mode = request_mode(r)
        if default_k and r.get("num_candidates") and r["num_candidates"] != default_k:
            continue
        if mode == "s2t-local":
            x, scorer = r.get("triggered_per_token"), "re-ranker"
        elif mode == "s2t":
            trigger, scorer = r.get("trigger"), "LLM"
            x = {"always": 1.0, "kl": r.get("trigger_rate")}.get(trigger, r.get("triggered_per_token"))
            if not trigger:  # files from before rows recorded their trigger
                x = r.get("llm_positions_per_token")
        else:
            continue
        if x is None:
            continue
        k = _k_of(r, payload)
        # every-step selection is the KL sweep's tau = 100 %: one line
        config = _config({**r, "trigger": "kl/always"} if r.get("trigger") in ("kl", "always") else r)
        label = f"{mode} ({scorer}), {config}" + (f", K={k}" if k else "")
        series.setdefault(label, []).append(_point(r, x))
    return {label: sorted(points, key=lambda p: p.x) for label, points in series.items()}


def k_sweep_series(payload: Mapping) -> dict[str, list[Point]]:
    """S2T accuracy rows grouped by everything but K; only groups with at least two values of K."""
    series: dict[str, list[Point]] = {}
    for r in _accuracy_rows(payload):
        mode, k = request_mode(r), _k_of(r, payload)
        if mode not in ("s2t", "s2t-local") or not k:
            continue
        label = f"{mode}, tau={r.get('trigger_rate') or '-'}, {_config(r)}"
        series.setdefault(label, []).append(_point(r, k))
    return {label: sorted(points, key=lambda p: p.x) for label, points in series.items()
            if len({p.x for p in points}) >= 2}


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _draw(series: dict[str, list[Point]], refs: dict[str, Point], xlabel: str, title: str, out: Path,
          integer_x: bool = False) -> Path:
    fig, ax = _figure()
    for label, points in series.items():
        ax.errorbar([p.x for p in points], [p.accuracy for p in points],
                    yerr=[[p.accuracy - p.ci95[0] for p in points], [p.ci95[1] - p.accuracy for p in points]],
                    marker="o", capsize=3, label=label)
        for p in points:
            ax.annotate(p.row, (p.x, p.accuracy), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for mode, ref in refs.items():
        color, style = _BASELINE_STYLE.get(mode, ("black", "--"))
        ax.axhline(ref.accuracy, color=color, linestyle=style, label=f"{mode} {ref.accuracy:.1%} (n={ref.n})")
        ax.axhspan(ref.ci95[0], ref.ci95[1], color=color, alpha=0.08)
    xs = [p.x for points in series.values() for p in points]
    if integer_x:
        ax.set_xticks(sorted(set(xs)))
    elif xs and min(xs) > 0 and max(xs) / min(xs) >= 20:  # tau from 1 % to every position: log scale
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("GSM8K accuracy (Wilson 95% CI)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def plot_tau_sweep(payload: Mapping, out: Path) -> Path | None:
    """Accuracy against the verifier's share of positions; None when the file has no S2T accuracy row."""
    series = tau_sweep_series(payload)
    if not series:
        return None
    n = sorted({p.n for points in series.values() for p in points})
    return _draw(series, baselines(payload),
                 "share of positions where the verifier decides\n(kl: calibrated tau; always: 1; "
                 "worker-side triggers: measured)",
                 f"Accuracy against verifier share (tau sweep), n={'/'.join(map(str, n))}", Path(out))


def plot_k_sweep(payload: Mapping, out: Path) -> Path | None:
    """Accuracy against K; None when no configuration was run at two or more values of K."""
    series = k_sweep_series(payload)
    if not series:
        return None
    return _draw(series, baselines(payload), "K: SLM candidates per position", "Accuracy against K", Path(out),
                 integer_x=True)


def write_plots(json_path: Path, payload: Mapping | None = None) -> list[Path]:
    """Draw every picture the results file supports next to it: <stem>.tau.png, <stem>.k.png."""
    json_path = Path(json_path)
    if payload is None:
        payload = json.loads(json_path.read_text())
    written = [plot_tau_sweep(payload, json_path.with_suffix(".tau.png")),
               plot_k_sweep(payload, json_path.with_suffix(".k.png"))]
    return [p for p in written if p is not None]


def main(argv: list[str] | None = None) -> None:
    for path in argv if argv is not None else sys.argv[1:]:
        for out in write_plots(Path(path)):
            print(out)


if __name__ == "__main__":
    main()

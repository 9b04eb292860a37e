"""Compare benchmark results files problem by problem: is each (row, kind, problem) text identical to the first file's?

    python bench/compare_runs.py bench/results/A.json bench/results/B.json [C.json ...]
    python bench/compare_runs.py --paired bench/results/A.json bench/results/B.json

--paired: for every accuracy row both files hold (by mode), on the problems both solved, the exact McNemar test
and the difference's 95% interval, B against A (e.g. the same rows under another weight format).

Prints a markdown table: for every result of the first file, per other file "identical" or where the text first
differs (and whether each answer was correct). Used for issue #12's token checks: greedy and batch-1 runs must be
identical across builds; concurrent runs group sessions into forwards by timing, so they may differ at near-ties.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))


def results(path: Path) -> dict[tuple, tuple[str, bool]]:
    payload = json.loads(Path(path).read_text())
    return {(d["mode"], d["kind"], r["idx"]): (r["text"], r["correct"]) for d in payload["details"] for r in d["results"]}


def first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def table(paths: list[Path]) -> str:
    runs = [results(p) for p in paths]
    lines = ["| row | kind | problem | " + " | ".join(f"{p.stem} vs {paths[0].stem}" for p in paths[1:]) + " |",
             "|---|---|---|" + "---|" * (len(paths) - 1)]
    for key in sorted(runs[0]):
        (text, ok), cells = runs[0][key], []
        for other in runs[1:]:
            if key not in other:
                cells.append("–")
            elif other[key][0] == text:
                cells.append("identical")
            else:
                cells.append(f"differs from character {first_difference(text, other[key][0])} "
                             f"(correct: {ok} vs {other[key][1]})")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def outcomes(path: Path) -> dict[str, dict[int, bool]]:
    payload = json.loads(Path(path).read_text())
    return {d["mode"]: {int(r["idx"]): bool(r["correct"]) for r in d["results"]}
            for d in payload["details"] if d.get("kind") == "accuracy"}


def paired(first: Path, second: Path, margin: float = 0.01) -> list[dict]:
    """Each accuracy row of `second` against the same mode's row in `first`, on their common problems."""
    import stats

    a_runs, b_runs = outcomes(first), outcomes(second)
    out = []
    for mode in [m for m in b_runs if m in a_runs]:
        idxs = sorted(set(a_runs[mode]) & set(b_runs[mode]))
        if not idxs:
            continue
        a_name, b_name = f"{mode} ({second.stem})", f"{mode} ({first.stem})"
        answer = stats.within_margin([b_runs[mode][i] for i in idxs], [a_runs[mode][i] for i in idxs], margin,
                                     (a_name, b_name))
        out.append({"a": a_name, "b": b_name, "problem_range": [idxs[0], idxs[-1]], **answer.as_dict(),
                    "highlight": False})
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--paired"]:
        if len(args) != 3:
            sys.exit(__doc__)
        from run_bench import paired_table

        print(paired_table(paired(Path(args[1]), Path(args[2]))) or "no accuracy row in common")
    elif len(args) < 2:
        sys.exit(__doc__)
    else:
        print(table([Path(p) for p in args]))

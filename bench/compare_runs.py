"""Compare benchmark results files problem by problem: is each (row, kind, problem) text identical to the first file's?

    python bench/compare_runs.py bench/results/A.json bench/results/B.json [C.json ...]

Prints a markdown table: for every result of the first file, per other file "identical" or where the text first
differs (and whether each answer was correct). Used for issue #12's token checks: greedy and batch-1 runs must be
identical across builds; concurrent runs group sessions into forwards by timing, so they may differ at near-ties.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


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


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    print(table([Path(p) for p in sys.argv[1:]]))

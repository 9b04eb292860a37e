"""GSM8K (MIT, OpenAI 2021): loading, the answer extraction and scoring used by calibration and the benchmark.

The data lies in the project's `shared/data/gsm8k/` beside the repository (override with S2T_GSM8K_DIR).
Train problems are for calibration; test problems only for evaluation. The first test problems are shipped
with the package (gsm8k_sample.jsonl) so the main job runs anywhere.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

SAMPLE = Path(__file__).with_name("gsm8k_sample.jsonl")


def data_dir() -> Path:
    env = os.environ.get("S2T_GSM8K_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "gsm8k"


def load(split: str, start: int = 0, n: int | None = None) -> list[dict]:
    """Problems [start, start+n) of a split as {"idx", "question", "gold", "solution"} dicts (solution: the
    dataset's worked answer, ending in '#### gold')."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown GSM8K split {split!r}")
    path = data_dir() / f"{split}.jsonl"
    if not path.is_file():
        if split == "test" and SAMPLE.is_file() and start + (n or 0) <= sum(1 for _ in open(SAMPLE)) and n:
            path = SAMPLE
        else:
            raise FileNotFoundError(f"GSM8K {split} split not found at {path}; set S2T_GSM8K_DIR")
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i < start:
                continue
            if n is not None and len(out) >= n:
                break
            d = json.loads(line)
            out.append({"idx": i, "question": d["question"], "gold": d["answer"].split("####")[-1].strip(),
                        "solution": d["answer"]})
    return out


def last_boxed(text: str) -> str | None:
    i = text.rfind("\\boxed")
    if i < 0:
        return None
    j = text.find("{", i)
    if j < 0:
        return None
    depth = 0
    for k in range(j, len(text)):
        if text[k] == "{":
            depth += 1
        elif text[k] == "}":
            depth -= 1
            if depth == 0:
                return text[j + 1:k]
    return None


_NUM = re.compile(r"-?\d+(?:\.\d+)?")
_FRAC = re.compile(r"\\[dt]?frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}")


def to_number(s: str | None) -> float | None:
    """The last number in s, after removing thousands separators, currency signs and \\frac{a}{b}."""
    if s is None:
        return None
    s = s.replace(",", "").replace("$", "").replace("\\!", "")
    s = _FRAC.sub(lambda m: str(float(m.group(1)) / float(m.group(2))) if float(m.group(2)) else m.group(0), s)
    nums = _NUM.findall(s)
    return float(nums[-1]) if nums else None


def extract(text: str) -> float | None:
    """The answer: the last \\boxed{...} if it holds a number, else the last number in the text."""
    boxed = to_number(last_boxed(text))
    return boxed if boxed is not None else to_number(text)


def is_correct(text: str, gold: str) -> bool:
    value, target = extract(text), to_number(gold)
    return value is not None and target is not None and abs(value - target) <= 1e-6 * max(1.0, abs(target))

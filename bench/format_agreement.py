"""What a weight format does to the model's choices: teacher-forced top-1 agreement and KL against a reference
format (issue #14: "fewer bytes per token than int8 where accuracy holds").

For each model, the first N GSM8K test problems' prompts followed by an answer text (the committed greedy
row's answers when a cache file is given, else the gold solutions) go through `Engine.forward` once per
format, with every position's next-token logits kept; each format is compared with the first one (the
reference) at every answer position: how often the top-1 token differs, and KL(reference || format) in nats.
Token-level, so it needs no sampling and no GSM8K run; the end-to-end cost on accuracy is a paired GSM8K row
(run_bench) beside it.

    python bench/format_agreement.py --formats int8_avx2,int8_vnni --problems 20
    python bench/format_agreement.py --formats fp32,bf16,int8_avx2 --models qwen2.5-coder-0.5b-instruct

Writes <results dir>/<name>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from run_bench import RESULTS, git_commit, machine  # noqa: E402
from stats import wilson  # noqa: E402

DEFAULT_MODELS = ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct")


def answers(problems: int, cache_file: Path | None) -> list[tuple[dict, str]]:
    """(problem, answer text) for GSM8K test problems 0..N-1: a cached row's texts, else the gold solutions."""
    from s2t import gsm8k

    probs = gsm8k.load("test", 0, problems)
    texts: dict[int, str] = {}
    if cache_file is not None:
        for line in cache_file.read_text().splitlines()[1:]:  # the first line is the cache's header
            rec = json.loads(line)
            texts[int(rec["idx"])] = rec["result"]["text"]
    return [(p, texts.get(int(p["idx"]), p["solution"])) for p in probs]


def compare(model: str, formats: list[str], items, max_answer_tokens: int, cache_dir: Path, threads: int) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from s2t.config import WorkerSettings
    from s2t.prompts import chat_prompt_ids
    from s2t.runtime import Engine, load_model

    system_prompt = WorkerSettings().system_prompt  # the worker's own default, as the benchmark rows use
    logits: dict[str, list] = {}
    timing: dict[str, float] = {}
    for fmt in formats:
        lm = load_model(model, cache_dir, weight_formats=fmt, threads=threads)
        engine = Engine(lm)
        rows, t0 = [], time.perf_counter()
        for problem, text in items:
            prompt = chat_prompt_ids(lm.tokenizer, system_prompt, problem["question"])
            ids = prompt + lm.tokenizer(text)["input_ids"][:max_answer_tokens]
            want = list(range(len(prompt) - 1, len(ids) - 1))
            rows.append(engine.forward([engine.new_cache()], [ids], [want])[0].float())
        timing[fmt] = time.perf_counter() - t0
        logits[fmt] = rows
        del lm, engine
        print(f"[agreement] {model} {fmt}: {sum(r.shape[0] for r in rows)} positions in {timing[fmt]:.1f}s",
              file=sys.stderr, flush=True)
    ref = logits[formats[0]]
    out = []
    for fmt in formats[1:]:
        changed = positions = 0
        kl = 0.0
        for a, b in zip(ref, logits[fmt]):
            changed += int((a.argmax(-1) != b.argmax(-1)).sum())
            positions += a.shape[0]
            kl += float(F.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="sum"))
        lo, hi = wilson(changed, positions)
        out.append({"model": model, "reference": formats[0], "format": fmt, "problems": len(items),
                    "positions": positions, "top1_changed": changed, "top1_changed_rate": changed / positions,
                    "top1_changed_ci95": [lo, hi], "kl_nats_per_position": kl / positions,
                    "forward_s": {formats[0]: round(timing[formats[0]], 1), fmt: round(timing[fmt], 1)}})
    return out


def markdown(payload: dict) -> str:
    lines = [f"# {payload['name']}", f"Command: `{payload['command']}`  ",
             f"Date: {payload['date']}; commit {payload['commit']}  ",
             f"Machine: {payload['machine']['cpu']} ({payload['machine']['cores']} cores, torch CPU capability "
             f"{payload['machine']['cpu_capability']})  ",
             f"Answers: {payload['answers']}", "",
             "| model | reference | format | problems | positions | top-1 changed (95% CI) | KL nats/position |",
             "|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        lo, hi = r["top1_changed_ci95"]
        lines.append(f"| {r['model']} | `{r['reference']}` | `{r['format']}` | {r['problems']} | {r['positions']} | "
                     f"{r['top1_changed']} = {100 * r['top1_changed_rate']:.2f}% ({100 * lo:.2f}–{100 * hi:.2f}%) | "
                     f"{r['kl_nats_per_position']:.5f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", default="format-agreement")
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument("--formats", default="int8_avx2,int8_vnni",
                    help="comma-separated uniform weight formats; the first is the reference")
    ap.add_argument("--problems", type=int, default=20)
    ap.add_argument("--max-answer-tokens", type=int, default=400)
    ap.add_argument("--answers", type=Path, default=None, metavar="CACHE_JSONL",
                    help="a run_bench cache file whose texts to teacher-force (default: the gold solutions)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    from s2t.model_store import default_cache_dir

    cache_dir = args.cache_dir or default_cache_dir()
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if len(formats) < 2:
        ap.error("--formats needs a reference and at least one format to compare")
    items = answers(args.problems, args.answers)
    rows = []
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        rows += compare(model, formats, items, args.max_answer_tokens, cache_dir, args.threads)
    payload = {"name": args.name, "command": "python bench/format_agreement.py " + " ".join(argv or sys.argv[1:]),
               "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "commit": git_commit(),
               "machine": machine(),
               "answers": str(args.answers.name) if args.answers else "GSM8K gold solutions", "rows": rows}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"{args.name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    (args.results_dir / f"{args.name}.md").write_text(markdown(payload))
    print(markdown(payload))


if __name__ == "__main__":
    main()

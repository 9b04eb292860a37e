"""The selector's scoring read two ways on the real pair: the full-vocabulary float64 log-softmax a Select used to
take, against `VocabLogProbs` (each row's normaliser in the logits' dtype, log-probabilities at the ids read).

Part 1, decisions: the SLM's greedy trajectories on the first N GSM8K test problems (`s2t.calibration`'s
`greedy_trajectories`, the proposals of every step), each scored by the LLM in one forward by `s2t calibrate`'s
own `teacher_logprobs`, then at every position both ways: the candidates' argmax, the KL trigger value, and
whether the trigger fires at each calibrated rate's threshold (`selector.kl_thresholds`).
Part 2, cost: the two computations alone on random float32 [n, vocab] logits at several position counts, one
thread, best of `--repeats`.

    python bench/select_logprobs.py --problems 20 --max-new 256

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


def decisions(problems: int, max_new: int, num_candidates: int, threads: int) -> dict:
    import torch

    from s2t import gsm8k
    from s2t.calibration import greedy_trajectories, teacher_logprobs
    from s2t.config import load_settings
    from s2t.prompts import chat_prompt_ids
    from s2t.runtime import Engine, load_model
    from s2t.triggers import kl_on_support, kl_on_support_at

    settings = load_settings()
    slm = Engine(load_model(settings.worker.model, settings.cache_dir, settings.worker.runtime.weight_formats, threads))
    llm = Engine(load_model(settings.selector.model, settings.cache_dir, settings.selector.runtime.weight_formats,
                            threads))
    prompts = [chat_prompt_ids(slm.lm.tokenizer, settings.worker.system_prompt, p["question"])
               for p in gsm8k.load("test", 0, problems)]
    thresholds = settings.selector.kl_thresholds
    out = dict(positions=0, argmax_differs=0, max_relative_kl_difference=0.0,
               trigger_flips={f"{r:g}": 0 for r in thresholds}, nearest_relative_distance_to_a_threshold=float("inf"))
    for prompt, (generated, proposals) in zip(prompts, greedy_trajectories(slm, prompts, max_new, slm.lm.stop_ids)):
        read = teacher_logprobs(llm, prompt, generated)  # s2t calibrate's forward; its logits, read both ways
        full = torch.log_softmax(read.logits.double(), dim=-1)
        for step, p in enumerate(proposals):
            out["positions"] += 1
            cands = p.ids[:num_candidates]
            out["argmax_differs"] += (int(torch.argmax(full[step, torch.tensor(cands)]))
                                      != int(torch.argmax(read.at(step, cands))))
            before, now = kl_on_support(p.ids, p.probs, full[step]), kl_on_support_at(p.probs, read.at(step, p.ids))
            if before:
                out["max_relative_kl_difference"] = max(out["max_relative_kl_difference"], abs(now - before) / before)
            for rate, threshold in thresholds.items():
                out["trigger_flips"][f"{rate:g}"] += (before > threshold) != (now > threshold)
                out["nearest_relative_distance_to_a_threshold"] = min(
                    out["nearest_relative_distance_to_a_threshold"], abs(before - threshold) / threshold)
    return out


def timings(rows: list[int], vocab: int, repeats: int) -> list[dict]:
    import torch

    torch.set_num_threads(1)

    def best_ms(fn) -> float:
        fn()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return round(best * 1e3, 2)

    out = []
    for n in rows:
        x = torch.randn(n, vocab) * 3
        out.append(dict(positions=n, log_softmax_float64_ms=best_ms(lambda: torch.log_softmax(x.double(), dim=-1)),
                        logsumexp_ms=best_ms(lambda: torch.logsumexp(x, dim=-1))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", default="select-logprobs")
    ap.add_argument("--problems", type=int, default=20)
    ap.add_argument("--max-new", type=int, default=256)
    ap.add_argument("--num-candidates", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="for the models' forwards (the timings use one)")
    ap.add_argument("--rows", default="1,4,7,16,128,512", help="position counts of the timings")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    t0 = time.time()
    result = dict(command="python bench/select_logprobs.py " + " ".join(sys.argv[1:]),
                  date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), commit=git_commit(), machine=machine(),
                  problems=args.problems, max_new=args.max_new, repeats=args.repeats,
                  decisions=decisions(args.problems, args.max_new, args.num_candidates, args.threads))
    result["timings"] = timings([int(r) for r in args.rows.split(",")], 151_936, args.repeats)
    result["wall_s"] = round(time.time() - t0, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(render(args.name, result))
    print(render(args.name, result))


def render(name: str, result: dict) -> str:
    d, m = result["decisions"], result["machine"]
    lines = [f"# {name}", "", f"`{result['command']}`", "",
             f"{result['date']} · commit {result['commit']} · {m['cpu']} ({m['cores']} cores, {m['cpu_capability']})",
             "", f"Decisions, {result['problems']} GSM8K test problems, {d['positions']} positions of the SLM's greedy "
             f"trajectories (≤ {result['max_new']} tokens) scored by the LLM both ways:", "",
             f"- the candidates' argmax differs at {d['argmax_differs']} positions",
             f"- KL trigger values: largest relative difference {d['max_relative_kl_difference']:.1e}",
             f"- trigger decisions changed, by calibrated rate: {d['trigger_flips']} (nearest KL value "
             f"{d['nearest_relative_distance_to_a_threshold']:.1e} relative from a threshold)", "",
             "Cost alone, random float32 [positions, 151,936] logits, one thread, best of "
             f"{result['repeats']}:", "",
             "| positions | float64 log-softmax (before), ms | float32 logsumexp (now), ms |", "|---|---|---|"]
    lines += [f"| {t['positions']} | {t['log_softmax_float64_ms']} | {t['logsumexp_ms']} |" for t in result["timings"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

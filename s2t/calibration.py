"""Trigger calibration: thresholds for a target trigger rate, measured on GSM8K *train* prompts.

The SLM decodes greedily; at every generated position (past the warm-up steps) we record the entropy of
its top-64 distribution, its top-1/top-2 margin and, with the LLM teacher-forced over the same text, the
KL(SLM || LLM) on the SLM's top-64. The threshold for rate r is the matching quantile. The file is written
beside the models (`<cache>/calibration/<slm>__<llm>.json`); the worker reads the entropy and margin
tables, the selector the KL table. Also recorded: how often the LLM's pick among the SLM's top-8 differs
from the SLM's top-1 (the divergence rate), and what share of those divergences each trigger catches.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterator

import torch

from .runtime import Engine
from .triggers import Proposal, VocabLogProbs, kl_on_support_at, propose

RATES = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)


def read_calibration(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None


def write_calibration(path: Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def greedy_rollouts(engine: Engine, prompts: list[list[int]], max_new_tokens: int, stop_ids, batch_size: int = 32
                    ) -> Iterator[tuple[int, list[int], list[Proposal]]]:
    """Batched greedy decoding with continuous batching: up to `batch_size` prompts decode together, and a
    finished one is replaced by the next prompt at the following step (its prefill joins that forward), so
    the batch never runs down to its longest member alone. Yields (prompt index, generated ids, the SLM's
    proposal at each of them) as each finishes; between two yields nothing runs, so a caller may pause.
    Each trajectory is what decoding its prompt alone would give, up to the rounding of batched matmuls."""
    stop = set(stop_ids)
    waiting = iter(range(len(prompts)))
    active: dict[int, tuple] = {}  # prompt index -> (cache, next feed, generated, proposals)

    def admit() -> None:
        while len(active) < batch_size:
            i = next(waiting, None)
            if i is None:
                return
            active[i] = (engine.new_cache(), list(prompts[i]), [], [])

    admit()
    while active:
        order = list(active)
        logits = engine.forward([active[i][0] for i in order], [active[i][1] for i in order],
                                [[len(active[i][1]) - 1] for i in order])
        done = []
        for i, lg in zip(order, logits):
            cache, _, gen, props = active[i]
            p = propose(lg)[0]
            props.append(p)
            gen.append(p.token)
            if p.token in stop or len(gen) >= max_new_tokens:
                done.append(i)
            else:
                active[i] = (cache, [p.token], gen, props)
        for i in done:
            _, _, gen, props = active.pop(i)
            yield i, gen, props
        admit()


def greedy_trajectories(engine: Engine, prompts: list[list[int]], max_new_tokens: int, stop_ids,
                        batch_size: int = 32) -> list[tuple[list[int], list[Proposal]]]:
    """Batched greedy decoding (greedy_rollouts); per prompt, in order, the generated ids and proposals."""
    out: list[tuple[list[int], list[Proposal]] | None] = [None] * len(prompts)
    for i, gen, props in greedy_rollouts(engine, prompts, max_new_tokens, stop_ids, batch_size):
        out[i] = (gen, props)
    return out


def teacher_logprobs(engine: Engine, prompt: list[int], generated: list[int]) -> VocabLogProbs:
    """LLM log-probabilities at each generated position (rows 0..len(generated)-1), in one forward; read as the
    selector reads them, so the calibrated KL thresholds are defined on the values it computes."""
    seq = list(prompt) + list(generated)
    want = list(range(len(prompt) - 1, len(seq) - 1))
    logits = engine.forward([engine.new_cache()], [seq[:-1] if len(seq) > len(prompt) else seq], [want])[0]
    return VocabLogProbs(logits)


def thresholds(values: list[float], high_fires: bool) -> dict[str, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return {f"{r:g}": float(torch.quantile(t, 1 - r if high_fires else r)) for r in RATES}


def recall(values: list[float], divergent: list[bool], high_fires: bool) -> dict[str, float]:
    """Share of divergent steps among those a trigger at each rate would fire at."""
    v = torch.tensor(values, dtype=torch.float64)
    d = torch.tensor(divergent)
    if not bool(d.any()):
        return {}
    order = torch.argsort(v, descending=high_fires, stable=True)
    out = {}
    for r in RATES:
        k = max(1, round(r * len(values)))
        out[f"{r:g}"] = float(d[order[:k]].sum() / d.sum())
    return out


def calibrate(slm: Engine, llm: Engine | None, prompts: list[list[int]], max_new_tokens: int, warmup_steps: int,
              num_candidates: int = 8, log=print) -> dict:
    t0 = time.time()
    trajectories = greedy_trajectories(slm, prompts, max_new_tokens, slm.lm.stop_ids)
    log(f"calibration: {len(prompts)} SLM trajectories, {sum(len(g) for g, _ in trajectories)} tokens "
        f"in {time.time() - t0:.0f}s")
    entropy, margin, kl, divergent = [], [], [], []
    for prompt, (generated, props) in zip(prompts, trajectories):
        teacher = teacher_logprobs(llm, prompt, generated) if llm is not None else None
        for step, p in enumerate(props):
            if step < warmup_steps:
                continue
            entropy.append(p.entropy)
            margin.append(p.margin)
            if teacher is not None:
                kl.append(kl_on_support_at(p.probs, teacher.at(step, p.ids)))
                divergent.append(int(torch.argmax(teacher.at(step, p.ids[:num_candidates]))) != 0)
    out = {
        "slm": slm.lm.name, "llm": llm.lm.name if llm is not None else None, "vocab_sha256": slm.lm.vocab_sha256,
        "data": f"GSM8K train, {len(prompts)} problems", "max_new_tokens": max_new_tokens,
        "warmup_steps": warmup_steps, "steps": len(entropy), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "entropy": thresholds(entropy, high_fires=True), "margin": thresholds(margin, high_fires=False),
    }
    if llm is not None:
        out["kl"] = thresholds(kl, high_fires=True)
        out["divergence_rate"] = sum(divergent) / max(1, len(divergent))
        out["recall"] = {"entropy": recall(entropy, divergent, True), "margin": recall(margin, divergent, False),
                         "kl": recall(kl, divergent, True)}
    log(f"calibration done in {time.time() - t0:.0f}s over {len(entropy)} steps")
    return out

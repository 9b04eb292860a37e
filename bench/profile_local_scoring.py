"""What one S2T-Local scoring call costs at batch 1, against one drafting step of the same SLM.

    python bench/profile_local_scoring.py ADAPTER_DIR [--formats int8,int8,int8,fp32_packed,fp32_packed]

Loads the embedded SLM and the adapter, prefills a 200-token context, and times (median of 15) a drafting step
and a scoring call of 8 new context tokens + 8 candidates at the next position: unsplit (the scorer runs
every layer on its own cache) and split at the adapter's first layer (Engine.score_trees with the drafting
cache's tap). Random token ids: the cost does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from s2t.config import load_settings
from s2t.rerank import install, load_adapter
from s2t.runtime import Engine, TreeJob, load_model


def median_s(fn, n: int = 15) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[n // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("adapter")
    ap.add_argument("--formats", default="auto")
    args = ap.parse_args()
    settings = load_settings()
    lm = load_model(settings.worker.model, settings.cache_dir, args.formats, 0)
    engine = Engine(lm)
    reranker = load_adapter(Path(args.adapter), lm.weights_sha256)
    install(lm.model, reranker)
    engine.set_tap(reranker.first_layer)
    tokens = torch.randint(0, 150000, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    cands = tokens[300:308]
    base = engine.new_cache()
    engine.forward([base], [tokens[:209]], [[208]])  # the drafting cache holds 209 tokens
    full = engine.new_cache()
    engine.forward_tree(full, tokens[:201], [], adapter=reranker.version)
    split = engine.new_cache(first_layer=reranker.first_layer)
    engine.score_trees([TreeJob(split, tokens[:201], [], base=base, base_length=209)], reranker.version)

    def unsplit_call():
        full.crop(201)
        engine.forward_tree(full, tokens[201:209], [(209, cands)], adapter=reranker.version)

    def split_call():
        split.crop(201)
        engine.score_trees([TreeJob(split, tokens[201:209], [(209, cands)], base=base, base_length=209)],
                           reranker.version)

    def draft_step():
        base.crop(209)
        engine.forward([base], [[tokens[209]]], [[0]])

    unsplit, split_s = median_s(unsplit_call), median_s(split_call)
    step = median_s(draft_step)
    print(json.dumps({"weight_formats": lm.plan.describe(), "adapter_first_layer": reranker.first_layer,
                      "draft_step_ms": round(step * 1e3, 1), "unsplit_ms": round(unsplit * 1e3, 1),
                      "split_ms": round(split_s * 1e3, 1), "unsplit_steps": round(unsplit / step, 2),
                      "split_steps": round(split_s / step, 2)}))


if __name__ == "__main__":
    main()

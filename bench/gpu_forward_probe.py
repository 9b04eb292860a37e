"""Where a selector forward's time goes on a GPU: Engine.forward against transformers' own forward for the same
shape, and a profile of Engine.forward's operations (issue #14; bench/gpu_selector.py measured the whole Select).

    python bench/gpu_forward_probe.py --shape 1.5b --context 512 --block 8

Prints medians (ms) and, with --profile, the GPU's busy time and the kernel launches per forward.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def timed(fn, repeats: int) -> float:
    import torch

    out = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return 1000 * statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1.5b")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--block", type=int, default=8)
    ap.add_argument("--sessions", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--profile", action="store_true", help="also the GPU's busy time per forward (torch.profiler)")
    ap.add_argument("--table", action="store_true", help="with --profile: the top operations by host time")
    args = ap.parse_args()

    import torch
    from transformers import DynamicCache

    from gpu_selector import attention_backends, random_model
    from s2t.runtime import Engine

    print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} threads={torch.get_num_threads()}", flush=True)
    lm = random_model(args.shape, "cuda", seed=0)
    engine = Engine(lm)
    vocab = lm.vocab_size
    g = torch.Generator().manual_seed(0)
    ctx = [torch.randint(vocab, (args.context,), generator=g).tolist() for _ in range(args.sessions)]
    new = [torch.randint(vocab, (args.block,), generator=g).tolist() for _ in range(args.sessions)]
    caches = [engine.new_cache() for _ in range(args.sessions)]
    engine.forward(caches, ctx, [[] for _ in ctx])

    def engine_block():
        for c in caches:
            c.crop(args.context)
        engine.forward(caches, new, [list(range(args.block)) for _ in new])

    def engine_one():
        for c in caches[:1]:
            c.crop(args.context)
        engine.forward(caches[:1], [new[0][:1]], [[0]])

    model = lm.model
    with torch.inference_mode():
        hf_cache = DynamicCache(config=model.config)
        model(torch.tensor([ctx[0]], device="cuda"), past_key_values=hf_cache, use_cache=True)
        block_ids = torch.tensor([new[0]], device="cuda")
        one_id = block_ids[:, :1]

        def hf(ids):
            extra = hf_cache.get_seq_length() - args.context
            if extra > 0:
                hf_cache.crop(-extra)  # transformers' crop takes the count to remove
            return model(ids, past_key_values=hf_cache, use_cache=True, logits_to_keep=ids.shape[1]).logits.cpu()

        for label, fn in [("engine block", engine_block), ("engine one token", engine_one),
                          ("transformers block (1 session)", lambda: hf(block_ids)),
                          ("transformers one token", lambda: hf(one_id))]:
            fn()
            print(f"{label}: {timed(fn, args.repeats):.2f} ms", flush=True)
        # a Select's context grows with every block: each forward's attention has a new key length
        for label, cudnn in [("default attention backends", True), ("without cuDNN attention", False)]:
            for c in caches:
                c.crop(args.context)
            times = []
            with attention_backends(cudnn):
                for _ in range(12):
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    engine.forward(caches, new, [list(range(args.block)) for _ in new])
                    torch.cuda.synchronize()
                    times.append(round(1000 * (time.perf_counter() - t), 1))
            print(f"engine block, growing context, {label}: {times} ms", flush=True)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    engine_block()
                torch.cuda.synchronize()
            events = prof.key_averages()
            if args.table:
                print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
            gpu_us = sum(e.self_device_time_total for e in events)
            launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernelEx"))
            print(f"profile, per engine block forward ({args.sessions} session(s) x {args.block} tokens): "
                  f"GPU busy {gpu_us / 5000:.2f} ms, {launches / 5:.0f} kernel launches", flush=True)


if __name__ == "__main__":
    main()

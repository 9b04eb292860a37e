"""Probe (issue #14): does compiling the glue of a batch-1 decode step with torch.compile pay?

bench/profile_decode.py puts 16-23 % of a one-thread step outside the linear kernels; the largest named parts
are the RMSNorms and the rotary embedding. This times, in one process and interleaved round by round on the
same (teacher-forced) tokens: transformers' eager Qwen2RMSNorm and apply_rotary_pos_emb; both compiled with
torch.compile (inductor, static shapes); and RMSNorm as torch's single `F.rms_norm` op. The whole step is not
compiled: the kernels are pybind calls and the KV cache is Python lists (graph breaks at every linear layer).

    taskset -c 0 python bench/compile_probe.py qwen2.5-coder-0.5b-instruct int8_vnni 64 5

Arguments: model, weight formats, steps per round, rounds (one thread). Prints one line per variant and
writes bench/results/compile-probe-<model>.{json,md}.
"""
import statistics, sys, time, torch
from pathlib import Path
import transformers.models.qwen2.modeling_qwen2 as mq
from run_bench import RESULTS, results_header, write_results
from s2t.runtime import Engine, load_model

model, fmt, steps, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
lm = load_model(model, Path.home() / ".cache/s2t/models", fmt, threads=1)
e = Engine(lm)
prompt = [(1000 + i) % lm.vocab_size for i in range(63)]
c = e.new_cache(); c.reserve(63 + steps + 8)

eager_norm, eager_rope = mq.Qwen2RMSNorm.forward, mq.apply_rotary_pos_emb

def rms(x, w, eps: float):
    dt = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return w * x.to(dt)

def fused_rms(x, w, eps: float):  # one aten op instead of six (numerics may differ in the last bits)
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), w, eps)

crms = torch.compile(rms, dynamic=False)
crope = torch.compile(eager_rope, dynamic=False)
variants = {
    "eager": (eager_norm, eager_rope),
    "compiled norm+rope": (lambda self, x: crms(x, self.weight, self.variance_epsilon), crope),
    "F.rms_norm": (lambda self, x: fused_rms(x, self.weight, self.variance_epsilon), eager_rope),
}

def run(name, n, ref=None):
    mq.Qwen2RMSNorm.forward, mq.apply_rotary_pos_emb = variants[name]
    c.crop(0)
    out = []
    with torch.inference_mode():
        tok = int(e.forward([c], [prompt], [[62]])[0][0].argmax())
        t0 = time.perf_counter()
        for i in range(n):
            out.append(tok)
            tok = int(e.forward([c], [[tok if ref is None else ref[i]]], [[0]])[0][0].argmax())
        return time.perf_counter() - t0, out

t0 = time.perf_counter()
_, ref = run("eager", steps)
for v in variants:  # warm-up and compile
    run(v, 8, ref)
print(f"compile+warmup {time.perf_counter() - t0:.1f} s", flush=True)
ms = {v: [] for v in variants}; picks = {}
for r in range(rounds):
    for v in variants:
        dt, out = run(v, steps, ref)
        ms[v].append(dt / steps * 1e3); picks[v] = out
rows = []
for v in variants:
    med = statistics.median(ms[v])
    diff = sum(a != b for a, b in zip(picks[v], ref))
    print(f"{model} {fmt} | {v:20s} | {med:6.2f} ms/step median ({min(ms[v]):.2f} min) | {1e3/med:6.2f} tok/s | "
          f"x{statistics.median(ms['eager'])/med:.3f} vs eager | argmax differs {diff}/{steps}", flush=True)
    rows.append({"variant": v, "ms_per_step_median": round(med, 2), "ms_per_step_min": round(min(ms[v]), 2),
                 "tokens_per_s": round(1e3 / med, 2), "vs_eager": round(statistics.median(ms["eager"]) / med, 3),
                 "argmax_differs": diff, "steps": steps})
payload = results_header(f"compile-probe-{Path(model).name}", "bench/compile_probe.py", sys.argv[1:])
payload.update(pinned="run under `taskset -c 0`", model=model, weight_formats=fmt, rounds=rounds, threads=1,
               torch=torch.__version__, rows=rows)
write_results(RESULTS, payload, "".join(
    [f"# {payload['name']}\n\n`taskset -c 0 {payload['command']}`\n\n{payload['date']} · commit {payload['commit']} · "
     f"{payload['machine'].get('cpu', '')}\n\n| variant | ms/step (median, min) | tokens/s | ÷ eager | argmax differs |\n"
     "|---|---|---|---|---|\n"]
    + [f"| {r['variant']} | {r['ms_per_step_median']}, {r['ms_per_step_min']} | {r['tokens_per_s']} | "
       f"{r['vs_eager']} | {r['argmax_differs']}/{r['steps']} |\n" for r in rows]))

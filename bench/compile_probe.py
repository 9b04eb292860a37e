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
import sys

import torch
import transformers.models.qwen2.modeling_qwen2 as mq

from step_probe import StepProbe

probe = StepProbe(sys.argv[1:])
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


def patch(norm, rope):
    def apply():
        mq.Qwen2RMSNorm.forward, mq.apply_rotary_pos_emb = norm, rope
    return apply


variants = {
    "eager": patch(eager_norm, eager_rope),
    "compiled norm+rope": patch(lambda self, x: crms(x, self.weight, self.variance_epsilon), crope),
    "F.rms_norm": patch(lambda self, x: fused_rms(x, self.weight, self.variance_epsilon), eager_rope),
}
probe.report(f"compile-probe-{probe.model.rsplit('/', 1)[-1]}", "bench/compile_probe.py", variants, "eager",
             "vs_eager", "÷ eager", warmup_label="compile+warmup")

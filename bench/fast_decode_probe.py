"""Probe (issue #14): the batch-1 decode step run through transformers' model forward, against the engine's
direct step (`Engine._decode_one`: the same modules and operations, without the model forward's plumbing),
with q/k/v and gate/up as separate kernel calls and fused (one call each, `weight_formats.fuse_outputs`),
and fused with the small operations compiled (`Engine._decode_compiled`, kernels/decode_ops.cpp; where
they build and the model computes in float32).

Times both in one process, interleaved round by round on the same teacher-forced tokens after a 63-token
prompt, one thread, and counts the steps whose argmax differs between them.

    taskset -c 0 python bench/fast_decode_probe.py qwen2.5-coder-0.5b-instruct int8_vnni 64 5

Arguments: model, weight formats, steps per round, rounds. Prints one line per variant and writes
bench/results/fast-decode-probe-<model>-<formats>.{json,md}.
"""
import sys

from step_probe import StepProbe

probe = StepProbe(sys.argv[1:])
e = probe.engine
fused = list(e._fused)
unfused = [(None, None)] * len(fused)
ops = e._ops


def setting(fast_decode, fused_layers, compiled_ops=None):
    def apply():
        e.fast_decode, e._fused, e._ops = fast_decode, fused_layers, compiled_ops
    return apply


variants = {"transformers forward": setting(False, fused),
            "direct step, separate projections": setting(True, unfused),
            "direct step, fused q/k/v and gate/up": setting(True, fused)}
if ops is not None:
    variants["direct step, fused, small operations compiled"] = setting(True, fused, ops)
probe.report(f"fast-decode-probe-{probe.model.rsplit('/', 1)[-1]}-{probe.fmt}", "bench/fast_decode_probe.py",
             variants, "transformers forward", "vs_transformers_forward", "÷ transformers forward")

"""bench/profile_decode.py: py-spy's collapsed stacks sorted by innermost frame into the step's parts."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import profile_decode  # noqa: E402

RAW = """\
<module> (<string>:17);forward (s2t/runtime.py:330);_apply (s2t/weight_formats.py:262) 60
<module> (<string>:17);forward (s2t/runtime.py:330);sdpa_attention_forward (transformers/integrations/sdpa_attention.py:193) 10
<module> (<string>:17);forward (s2t/runtime.py:330);_BatchCache.update (s2t/runtime.py:240) 5
<module> (<string>:17);forward (s2t/runtime.py:330);Qwen2RMSNorm.forward (transformers/models/qwen2/modeling_qwen2.py:242) 20
<module> (<string>:17);forward (s2t/runtime.py:330);_apply (s2t/weight_formats.py:262) 5

"""


def test_samples_are_sorted_by_their_innermost_frame():
    by_category, by_frame = profile_decode.categorise(RAW)
    assert by_category == {"linear kernels": 65, "attention": 10, "KV cache copy": 5, "everything else": 20}
    assert by_frame["_apply (s2t/weight_formats.py:262)"] == 65
    assert sum(by_frame.values()) == 100


def test_a_kernel_frame_above_the_leaf_does_not_count_as_the_kernel():
    """Only the innermost frame decides: a Python helper called from within `_apply` is not kernel time."""
    raw = "a (x.py:1);_apply (s2t/weight_formats.py:262);helper (y.py:3) 7\n"
    assert profile_decode.categorise(raw)[0] == {"everything else": 7}

"""bench/amx_layout_probe.py's weight packing: AMX's B layout, as bench/kernels/amx_b_layout.cpp reads it."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from amx_layout_probe import b_layout  # noqa: E402


def test_b_layout_puts_every_weight_where_the_kernel_reads_it():
    n, kp = 48, 256  # three bands of 16 outputs, four chunks of 64 inputs
    u = torch.randint(0, 256, (n, kp), dtype=torch.uint8)
    packed = b_layout(u)
    assert packed.shape == u.shape and packed.is_contiguous()
    flat = packed.reshape(-1)
    for out in (0, 5, 17, 47):
        for k in (0, 3, 4, 63, 64, 130, 255):
            band, row = divmod(out, 16)
            chunk, within = divmod(k, 64)
            kq, i = divmod(within, 4)
            # band after band; in a band, chunk after chunk; in a chunk, 16 rows of kq, each 16 outputs x 4 inputs
            at = band * 16 * kp + chunk * 16 * 64 + kq * 64 + row * 4 + i
            assert flat[at] == u[out, k]
    assert sorted(flat.tolist()) == sorted(u.reshape(-1).tolist())  # a permutation: nothing lost or repeated

"""bench/kernel_ab.py's parts that need no compiler: a revision's kernel sources, and the switch between builds."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from kernel_ab import Switch, write_sources  # noqa: E402


def test_write_sources_gives_the_revisions_kernels_and_headers(tmp_path):
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], check=True, capture_output=True,
                         text=True).stdout.strip()
    names = write_sources(rev, tmp_path)
    assert {"int8_vnni.cpp", "int8_amx.cpp", "act_quant.h", "int8_args.h"} <= set(names)
    assert not [n for n in names if not n.endswith((".cpp", ".h"))]
    committed = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:s2t/kernels/int8_vnni.cpp"], check=True,
                               capture_output=True).stdout
    assert (tmp_path / "int8_vnni.cpp").read_bytes() == committed


def test_switch_routes_each_call_to_the_side_set():
    switch = Switch({"before": lambda *a: ("before", a), "after": lambda *a: ("after", a)})
    assert switch(1, 2) == ("after", (1, 2))  # a model loads on the checkout's build
    switch.side = "before"
    assert switch(3) == ("before", (3,))

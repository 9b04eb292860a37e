"""Regenerate the Python wire code from the .proto sources: `python protos/generate.py`.

The generated modules (*_pb2.py, *_pb2.pyi, *_pb2_grpc.py) are committed in the shared core package as
`s2t/v1/` (import name `s2t.v1`, the proto package) so the project installs without protoc;
tests/test_protos.py fails when they are stale. grpcio-tools is pinned
in pyproject.toml so that the output is byte-for-byte reproducible.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent  # generated modules land in REPO_ROOT/s2t/v1/
SOURCES = ["s2t/v1/generation.proto", "s2t/v1/selector.proto"]


def generate(out_dir: Path = REPO_ROOT) -> list[Path]:
    """Run protoc (from grpcio-tools) over SOURCES into out_dir; returns the files written."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *SOURCES]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted(p for p in (out_dir / "s2t" / "v1").glob("*_pb2*.py*") if p.is_file())


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO_ROOT):
        print(path)

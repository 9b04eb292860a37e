"""The committed wire code is what `python protos/generate.py` produces from the .proto sources."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"


def _generate_module():
    spec = importlib.util.spec_from_file_location("protos_generate", PROTOS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_up_to_date(tmp_path):
    fresh = _generate_module().generate(tmp_path)
    assert fresh, "protoc produced nothing"
    for path in fresh:
        rel = path.relative_to(tmp_path)
        committed = ROOT / rel
        assert committed.is_file(), f"{rel} is generated but not committed; run python protos/generate.py"
        assert committed.read_bytes() == path.read_bytes(), f"{rel} is stale; run python protos/generate.py"
    committed_files = {p.relative_to(ROOT) for p in (ROOT / "s2t" / "v1").glob("*_pb2*.py*")}
    assert committed_files == {p.relative_to(tmp_path) for p in fresh}, "committed files without a .proto source"


def test_wire_package_imports_as_s2t_v1():
    from s2t.v1 import generation_pb2, selector_pb2

    assert selector_pb2.DESCRIPTOR.package == "s2t.v1"
    assert "GenerationService" in generation_pb2.DESCRIPTOR.services_by_name
    assert "SelectorService" in selector_pb2.DESCRIPTOR.services_by_name

"""Regenerate the Python API code from ``protos/`` (``python -m moments.tools.protogen``).

The generated modules under ``moments/v1/`` are build artifacts: never edit them by hand. Besides the
Python code, ``moments/v1/moments.binpb`` is a descriptor set of the API with its comments (source
info) and imports, which the front end's reflection serves. Only ``protos/moments/`` is compiled:
``protos/third_party/`` (google.rpc) is there for other languages, and Python uses the
googleapis-common-protos package for it. ``--check`` regenerates into a temporary directory and fails
if the committed files differ (CI).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
API_DIR = PROTO_DIR / "moments"
THIRD_PARTY_DIR = PROTO_DIR / "third_party"
DESCRIPTOR_SET = "moments.binpb"
GENERATED = ("moments_pb2.py", "moments_pb2.pyi", "moments_pb2_grpc.py", DESCRIPTOR_SET)


def generate(out_dir: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in API_DIR.rglob("*.proto"))
    (out_dir / "moments" / "v1").mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{THIRD_PARTY_DIR}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        "--include_source_info",
        "--include_imports",
        f"--descriptor_set_out={out_dir / 'moments' / 'v1' / DESCRIPTOR_SET}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed code is stale")
    args = parser.parse_args(argv)
    target = ROOT / "moments" / "v1"
    if not args.check:
        generate(ROOT)
        (target / "__init__.py").touch()
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [
            name
            for name in GENERATED
            if not (target / name).exists()
            or not filecmp.cmp(Path(tmp) / "moments" / "v1" / name, target / name, shallow=False)
        ]
    if stale:
        print(f"generated code is stale: {stale}; run python -m moments.tools.protogen", file=sys.stderr)
        return 1
    print("generated code matches protos/")
    return 0


if __name__ == "__main__":
    sys.exit(main())

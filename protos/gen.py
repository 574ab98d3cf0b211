"""Regenerate gptoss_pb/ (Python, gRPC stubs, .pyi) from protos/. The one command: ./dev gen-protos.

The proto folder mirrors the Python package path (protos/gptoss_pb/v1/x.proto -> gptoss_pb/v1/x_pb2.py),
so generated imports resolve without rewriting.
"""
from __future__ import annotations

import pathlib
import shutil
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE = "gptoss_pb"


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    from grpc_tools import protoc  # dev/test dependency only

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE).rglob("*.proto"))
    args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
            f"--pyi_out={out_dir}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for d in [out_dir / PACKAGE, *[p for p in (out_dir / PACKAGE).rglob("*") if p.is_dir()]]:
        init = d / "__init__.py"
        init.write_text('"""Generated from protos/ by `./dev gen-protos`. Do not edit."""\n')
    return sorted(p for p in (out_dir / PACKAGE).rglob("*") if p.is_file())


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        generate(pathlib.Path(tmp))
        target = ROOT / PACKAGE
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(pathlib.Path(tmp) / PACKAGE, target)
    print(f"regenerated {PACKAGE}/ from protos/", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Fail if gptoss_pb/ differs from what protos/ generates (CI runs this before the tests)."""
from __future__ import annotations

import filecmp
import pathlib
import sys
import tempfile

from protos.gen import PACKAGE, ROOT, generate


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(pathlib.Path(tmp))
        base = pathlib.Path(tmp) / PACKAGE
        want = {p.relative_to(base) for p in fresh}
        have = {p.relative_to(ROOT / PACKAGE) for p in (ROOT / PACKAGE).rglob("*")
                if p.is_file() and "__pycache__" not in p.parts}
        stale = sorted(str(p) for p in want ^ have)
        stale += sorted(str(p) for p in want & have
                        if not filecmp.cmp(base / p, ROOT / PACKAGE / p, shallow=False))
    if stale:
        sys.exit(f"gptoss_pb/ is stale ({', '.join(stale)}): run ./dev gen-protos")


if __name__ == "__main__":
    main()

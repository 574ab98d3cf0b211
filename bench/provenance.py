"""What every results row records about where it was measured: the commit and the machine."""
from __future__ import annotations

import os
import pathlib
import platform
import subprocess


def commit() -> str:
    """Short hash of HEAD, or "unknown" (a copy without .git, as on the GPU machine: pass --commit)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=pathlib.Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "?"


def machine() -> str:
    """Host name and CPU model, for CPU benchmarks."""
    return f"{os.uname().nodename} ({cpu_model()}, {os.cpu_count()} cpus)"


def append_rows(path: pathlib.Path, title: str, columns: list[str], rows: list[list[object]]) -> None:
    """Append rows to a markdown results table, writing its title and header first if it is new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text(f"# {title}\n\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n")
    with path.open("a") as f:
        for row in rows:
            f.write("| " + " | ".join(str(c) for c in row) + " |\n")

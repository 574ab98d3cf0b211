"""A real systemd (Debian bookworm, systemd 252) booted as PID 1 of a systemd-nspawn container.

The root fs is built once with mmdebstrap and cached under ~/.cache/gptoss/systemd-rootfs/<key>,
keyed by its package list; each boot runs it with --volatile=overlay, so nothing a test does
persists. The container shares the host's network namespace (tests reach its ports from outside)
and sees host paths bound read-only at the same place (the checkout, its venv, the venv's Python).

nspawn runs without a host systemd here (--register=no --keep-unit), so it is put into a cgroup of
its own: the `payload`/`supervisor` cgroups it creates land under that one, never collide with
another container's, and are removed afterwards. Never bind host device nodes: the container's
systemd would chown them on the host.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

SUITE = "bookworm"
PACKAGES = ("curl", "dbus", "libgomp1", "libnuma1", "procps", "python3", "systemd", "systemd-sysv")
CACHE = pathlib.Path.home() / ".cache" / "gptoss" / "systemd-rootfs"
HOST_TOOLS = {"systemd-nspawn": "systemd-container", "mmdebstrap": "mmdebstrap", "nsenter": "util-linux"}

T = TypeVar("T")


class ContainerError(RuntimeError):
    pass


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.2) -> T:
    """Poll probe() until it returns something truthy; raise with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def why_unusable() -> str | None:
    """None if a container can be booted here; else the reason (for pytest.skip)."""
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn, mount namespaces)"
    missing = [pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None]
    if missing and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]):
            if subprocess.run(cmd, env=env, capture_output=True, timeout=600).returncode != 0:
                return f"could not install {' '.join(missing)} with apt-get"
    missing = [tool for tool in HOST_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)} (and no apt-get to install them)"
    if not _unified_cgroup_root():
        return "no cgroup v2 hierarchy mounted (needed to boot systemd 252 in nspawn)"
    return None


def rootfs() -> pathlib.Path:
    """The cached root fs for PACKAGES, built on first use (about 30 s, 250 MB)."""
    key = hashlib.sha256(f"{SUITE} minbase {','.join(sorted(PACKAGES))}".encode()).hexdigest()[:16]
    root = CACHE / key
    if root.is_dir():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = CACHE / f"{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    proc = subprocess.run(["mmdebstrap", "--quiet", "--variant=minbase", f"--include={','.join(sorted(PACKAGES))}",
                           SUITE, str(tmp)], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ContainerError(f"mmdebstrap failed:\n{proc.stderr[-4000:]}")
    tmp.rename(root)   # atomic: a concurrent or interrupted build never leaves a half root fs
    return root


def _unified_cgroup_root() -> pathlib.Path | None:
    for path in (pathlib.Path("/sys/fs/cgroup"), pathlib.Path("/sys/fs/cgroup/unified")):
        if (path / "cgroup.procs").exists() and (path / "cgroup.controllers").exists():
            return path
    return None


def _remove_cgroup_tree(path: pathlib.Path) -> None:
    """rmdir bottom-up; cgroup directories can only be removed once empty of processes."""
    if not path.is_dir():
        return
    for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()


@dataclass
class Container:
    name: str
    process: subprocess.Popen
    cgroup: pathlib.Path
    log_path: pathlib.Path
    leader: int = 0

    def sh(self, script: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run a shell script inside the container (all its namespaces, its root and cwd)."""
        proc = subprocess.run(["nsenter", "-t", str(self.leader), "-a", "-r", "-w", "sh", "-c", script],
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise ContainerError(f"in container, `{script}` exited {proc.returncode}:\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def out(self, script: str, timeout: float = 120) -> str:
        return self.sh(script, timeout=timeout).stdout.strip()

    def show(self, unit: str, prop: str) -> str:
        return self.sh(f"systemctl show -P {prop} {unit}").stdout.strip()

    def journal(self, unit: str) -> str:
        return self.sh(f"journalctl -b --no-pager -o cat -u {unit}", check=False).stdout

    def _find_leader(self) -> int | None:
        if self.process.poll() is not None:
            raise ContainerError(f"systemd-nspawn exited {self.process.returncode}: {self.log_path.read_text()[-3000:]}")
        for task in pathlib.Path(f"/proc/{self.process.pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                if pathlib.Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return int(child)
        return None

    def _booted(self) -> bool:
        state = self.sh("systemctl is-system-running", check=False).stdout.strip()
        if state in ("running", "degraded"):
            return True
        if state in ("maintenance", "stopping", "offline"):
            raise ContainerError(f"container systemd is {state}: {self.log_path.read_text()[-3000:]}")
        return False

    def shut_down(self, timeout: float = 30) -> None:
        if self.process.poll() is None and self.leader:
            self.sh("systemctl poweroff --no-block", check=False, timeout=15)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout)
        for sig in (signal.SIGTERM, signal.SIGKILL):   # only the nspawn process this module started
            if self.process.poll() is None:
                self.process.send_signal(sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout=10)
        _remove_cgroup_tree(self.cgroup)


@contextlib.contextmanager
def booted(root: pathlib.Path, binds_ro: dict[str, str], log_dir: pathlib.Path,
           boot_timeout: float = 60) -> Iterator[Container]:
    """Boot `root` (volatile overlay: changes vanish at exit) with host paths bound read-only
    ({host path: container path}); yields once systemd reports the system up; always powers off."""
    cg_root = _unified_cgroup_root()
    if cg_root is None:
        raise ContainerError("no cgroup v2 hierarchy")
    name = f"gptoss-test-{uuid.uuid4().hex[:8]}"
    cgroup = cg_root / name
    cgroup.mkdir()
    log_path = log_dir / f"{name}.console.log"
    cmd = ["systemd-nspawn", "-q", "-D", str(root), "-b", "-M", name, "--register=no", "--keep-unit",
           "--console=pipe", "--volatile=overlay", *(f"--bind-ro={h}:{c}" for h, c in binds_ro.items())]
    procs_file = str(cgroup / "cgroup.procs")

    def enter_own_cgroup() -> None:   # runs in the child before exec: nspawn starts in our cgroup
        with open(procs_file, "w") as f:
            f.write("0")

    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"},
                                   preexec_fn=enter_own_cgroup)
    container = Container(name, process, cgroup, log_path)
    try:
        container.leader = wait_for("the container's systemd process", container._find_leader, 20)
        wait_for("the container to finish booting", container._booted, boot_timeout, interval=0.3)
        yield container
    finally:
        container.shut_down()

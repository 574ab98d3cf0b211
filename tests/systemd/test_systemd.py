"""The shipped systemd units, run for real: systemd 252 boots as PID 1 of a container, `gptoss
install-systemd` installs the units there, and the real daemons (tiny model, CPU) run under them
with the shipped hardening, as the dedicated gptoss user, against an etcd unit.

The container shares the host's network namespace, so this test talks HTTP to the frontend and
reads etcd from outside, on ports it picked free. Tests run in file order on one booted stack;
the last one stops it.
"""
from __future__ import annotations

import base64
import json
import pathlib
import shutil
import subprocess
import sys

import httpx
import pytest

from registry.embedded_etcd import free_ports
from registry.keys import namespace_prefix
from registry.record import InstanceRecord
from tests.systemd.nspawn import Container, booted, rootfs, wait_for, why_unusable

pytestmark = [pytest.mark.systemd, pytest.mark.slow, pytest.mark.timeout(600)]

REPO = pathlib.Path(__file__).resolve().parents[2]
VENV = pathlib.Path(sys.prefix)
GPTOSS = VENV / "bin" / "gptoss"
MODEL = "/srv/gptoss-model"        # where the tiny checkpoint is bound in the container
NAMESPACE = "dynamo"
SERVED = "tiny-gptoss"
WORKERS = ("gptoss-prefill.service", "gptoss-decode.service")
STACK = (*WORKERS, "gptoss-frontend.service")
START_TIMEOUT = 240                # three daemons importing torch on two shared cores


class Stack:
    """The booted container plus what the test set up in it: ports, env files, etcd."""

    def __init__(self, container: Container) -> None:
        self.c = container
        (self.etcd_port, self.etcd_peer, self.prefill_port, self.prefill_ucx, self.decode_port,
         self.decode_ucx, self.decode2_port, self.decode2_ucx, self.http_port) = free_ports(9)
        self.etcd = f"http://127.0.0.1:{self.etcd_port}"
        self.http = f"http://127.0.0.1:{self.http_port}"

    def records(self) -> list[InstanceRecord]:
        """Instance records in etcd now (read with the venv's etcdctl from the host)."""
        out = subprocess.run([str(VENV / "bin" / "etcdctl"), f"--endpoints={self.etcd}", "get", "--prefix",
                              namespace_prefix(NAMESPACE), "-w", "json"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        kvs = json.loads(out).get("kvs", [])
        return [InstanceRecord.from_json(base64.b64decode(kv["value"])) for kv in kvs]

    def records_on(self, port: int) -> list[InstanceRecord]:
        return [r for r in self.records() if r.grpc_address.endswith(f":{port}")]

    def active(self, unit: str) -> bool:
        return self.c.show(unit, "ActiveState") == "active"

    def diagnose(self, units: tuple[str, ...]) -> str:
        return "\n".join(f"--- {u}: {self.c.show(u, 'ActiveState')}/{self.c.show(u, 'Result')}\n"
                         f"{self.c.journal(u)[-3000:]}" for u in units)


ETCD_UNIT = """[Unit]
Description=etcd for the gptoss systemd test
[Service]
Type=notify
ExecStart={venv}/bin/etcd --name test --data-dir /var/lib/etcd-test \\
  --listen-client-urls {etcd} --advertise-client-urls {etcd} \\
  --listen-peer-urls http://127.0.0.1:{peer} --initial-advertise-peer-urls http://127.0.0.1:{peer} \\
  --initial-cluster test=http://127.0.0.1:{peer}
"""


def write_env_files(s: Stack) -> None:
    """What an admin does after install: edit /etc/gptoss/*.env (here: tiny model, CPU, free ports)."""
    files = {
        "gptoss.env": f"GPTOSS_MODEL_PATH={MODEL}\nGPTOSS_SERVED_MODEL_NAME={SERVED}\n"
                      f"GPTOSS_ETCD_ENDPOINTS={s.etcd}\nGPTOSS_NAMESPACE={NAMESPACE}\nGPTOSS_DEVICE=cpu\n"
                      "GPTOSS_LOG_FORMAT=console\n",
        "prefill.env": f"GPTOSS_GRPC_PORT={s.prefill_port}\nGPTOSS_UCX_PORT={s.prefill_ucx}\n",
        "decode.env": f"GPTOSS_DISAGGREGATION_MODE=decode\nGPTOSS_GRPC_PORT={s.decode_port}\n"
                      f"GPTOSS_UCX_PORT={s.decode_ucx}\n",
        "decode-2.env": f"GPTOSS_DISAGGREGATION_MODE=decode\nGPTOSS_GRPC_PORT={s.decode2_port}\n"
                        f"GPTOSS_UCX_PORT={s.decode2_ucx}\n",
        # Two frontend processes under one supervisor: READY=1 and the clean stop come from it.
        "frontend.env": f"GPTOSS_HTTP_HOST=127.0.0.1\nGPTOSS_HTTP_PORT={s.http_port}\nGPTOSS_HTTP_WORKERS=2\n",
    }
    for name, text in files.items():
        s.c.sh(f"cat > /etc/gptoss/{name} <<'EOF'\n{text}EOF")


@pytest.fixture(scope="module")
def stack(tiny_model_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory):
    reason = why_unusable()
    if reason:
        pytest.skip(f"cannot boot systemd in a container here: {reason}")
    if not GPTOSS.exists():
        pytest.skip(f"{GPTOSS} missing: install the checkout into its venv first (./dev setup)")
    # The venv's python links into the base interpreter's tree (pyenv, /usr/...): bind it as well.
    base = pathlib.Path(sys.base_prefix).resolve()
    # pytest's tmp dirs are 0700 root: give the gptoss user a world-readable copy of the model.
    model = tmp_path_factory.mktemp("model") / "tiny"
    shutil.copytree(tiny_model_dir, model)
    for path in (model.parent, model, *model.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    binds = {str(REPO): str(REPO), str(base): str(base), str(model): MODEL}
    if REPO not in VENV.resolve().parents:
        binds[str(VENV)] = str(VENV)
    # A checkout made in a `mktemp -d` folder is 0700: the gptoss user could not enter it. Let
    # others traverse it (x only, no listing) while the test runs; restored afterwards.
    repo_mode = REPO.stat().st_mode & 0o7777
    if not repo_mode & 0o001:
        REPO.chmod(repo_mode | 0o011)
    try:
        yield from _booted_stack(binds, tmp_path_factory)
    finally:
        REPO.chmod(repo_mode)


def _booted_stack(binds: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    with booted(rootfs(), binds, tmp_path_factory.mktemp("nspawn")) as c:
        s = Stack(c)
        # The container's /root is 0700 (Debian's default); the gptoss user must traverse it to
        # reach a pyenv interpreter bound under /root. Production venvs live under /opt.
        c.sh("chmod 0711 /root")
        c.sh(f"cat > /etc/systemd/system/etcd.service <<'EOF'\n"
             f"{ETCD_UNIT.format(venv=VENV, etcd=s.etcd, peer=s.etcd_peer)}EOF")
        s.install_log = c.out(f"{GPTOSS} install-systemd --create-user --local-etcd")
        write_env_files(s)
        c.sh("systemctl enable " + " ".join(STACK))
        # gptoss.target pulls in the enabled units (and waits for them: targets order after what they
        # want); the units pull in etcd.service (--local-etcd).
        c.sh("systemctl start --no-block gptoss.target")

        def all_active() -> bool:
            states = [c.show(u, "ActiveState") for u in STACK]
            if "failed" in states:   # gave up after StartLimitBurst restarts
                raise AssertionError(f"{STACK} ended {states}\n{s.diagnose(('etcd.service', *STACK))}")
            return all(state == "active" for state in states)

        try:
            wait_for("prefill, decode and frontend to be active", all_active, START_TIMEOUT, interval=1)
        except TimeoutError as e:
            raise AssertionError(f"{e}\n{s.diagnose(('etcd.service', *STACK))}") from None
        yield s


def test_install_created_user_units_and_env_files(stack: Stack) -> None:
    c = stack.c
    assert "write /etc/systemd/system/gptoss-prefill.service" in stack.install_log
    assert "run: systemctl daemon-reload" in stack.install_log
    assert c.out("id -u gptoss").isdigit()
    assert c.out("stat -c '%a %U:%G' /etc/gptoss/gptoss.env") == "640 root:gptoss"
    assert f"ExecStart={GPTOSS} prefill" in c.out("systemctl cat gptoss-prefill.service")
    # Running it again keeps the admin's env files and rewrites nothing.
    again = c.out(f"{GPTOSS} install-systemd --local-etcd")
    assert "kept existing /etc/gptoss/gptoss.env" in again
    assert "\nwrite " not in "\n" + again
    assert f"GPTOSS_ETCD_ENDPOINTS={stack.etcd}" in c.out("cat /etc/gptoss/gptoss.env")


def test_systemd_analyze_verify_passes_on_every_unit(stack: Stack) -> None:
    units = "gptoss.target " + " ".join(STACK) + " gptoss-prefill@1.service gptoss-decode@2.service"
    proc = stack.c.sh(f"cd /etc/systemd/system && systemd-analyze verify {units}", check=False)
    assert proc.returncode == 0, proc.stderr
    assert "gptoss" not in proc.stderr, proc.stderr


def test_all_active_hardened_and_etcd_pulled_in(stack: Stack) -> None:
    c = stack.c
    assert stack.active("etcd.service")
    for unit in STACK:
        assert c.show(unit, "Type") == "notify"
        assert c.show(unit, "User") == "gptoss"
        pid = c.show(unit, "MainPID")
        assert c.out(f"ps -o user= -p {pid}") == "gptoss", unit
        # ProtectSystem=strict: the daemon cannot write outside its state/cache directories.
        assert c.sh(f"nsenter -t {pid} -m sh -c 'touch /usr/gptoss-probe'", check=False).returncode != 0
    assert c.show("gptoss-frontend.service", "PrivateDevices") == "yes"
    frontends = c.out(f"cat /proc/{c.show('gptoss-frontend.service', 'MainPID')}/task/*/children").split()
    assert len(frontends) == 2 and all(c.out(f"ps -o user= -p {pid}") == "gptoss" for pid in frontends)
    assert "char-nvidia*" in c.show("gptoss-decode.service", "DeviceAllow")


def test_health_lists_both_workers_and_chat_completes(stack: Stack) -> None:
    def healthy() -> dict | None:
        try:
            body = httpx.get(f"{stack.http}/health", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return None
        components = {i.get("component") for i in body.get("instances", [])}
        return body if {"prefill", "backend"} <= components else None

    body = wait_for("/health to list a prefill and a backend instance", healthy, 60, interval=0.5)
    assert body["status"] == "healthy"
    r = httpx.post(f"{stack.http}/v1/chat/completions", timeout=120, json={
        "model": SERVED, "messages": [{"role": "user", "content": "Hello through systemd"}],
        "max_tokens": 8, "temperature": 0, "seed": 1})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] in ("stop", "length")
    assert r.json()["usage"]["completion_tokens"] >= 1


def test_kill_9_restarts_decode_and_it_reregisters(stack: Stack) -> None:
    c, unit = stack.c, "gptoss-decode.service"
    old_pid = int(c.show(unit, "MainPID"))
    restarts = int(c.show(unit, "NRestarts"))
    assert [r.pid for r in stack.records_on(stack.decode_port)] == [old_pid]
    c.sh(f"kill -9 {old_pid}")

    def restarted() -> int | None:
        pid = int(c.show(unit, "MainPID"))
        back = int(c.show(unit, "NRestarts")) > restarts and stack.active(unit) and pid not in (0, old_pid)
        return pid if back else None

    new_pid = wait_for("systemd to restart the killed decode worker", restarted, START_TIMEOUT, interval=0.5)
    # Active means READY=1, which the daemon sends only after registering: the record is there now.
    assert new_pid in [r.pid for r in stack.records_on(stack.decode_port)]
    # The killed worker never revoked its lease; its record goes when the lease (TTL 10 s) expires.
    wait_for("the killed worker's record to expire",
             lambda: [r.pid for r in stack.records_on(stack.decode_port)] == [new_pid], 30, interval=0.5)


def test_second_decode_instance_from_template_runs_beside(stack: Stack) -> None:
    c, unit = stack.c, "gptoss-decode@2.service"
    c.sh(f"systemctl start {unit}", timeout=START_TIMEOUT)   # returns once READY=1 (registered)
    assert stack.active(unit) and stack.active("gptoss-decode.service")
    assert c.show(unit, "EnvironmentFiles").count("/etc/gptoss/decode-2.env") == 1
    second = stack.records_on(stack.decode2_port)
    first = stack.records_on(stack.decode_port)
    assert len(second) == 1 and len(first) == 1
    assert second[0].component == first[0].component == "backend"
    assert second[0].instance_id != first[0].instance_id
    assert second[0].pid == int(c.show(unit, "MainPID"))


def test_stop_deregisters_at_once_and_exits_cleanly(stack: Stack) -> None:
    c, unit = stack.c, "gptoss-decode@2.service"
    assert stack.records_on(stack.decode2_port)
    c.sh(f"systemctl stop {unit}", timeout=150)    # returns once the process has exited
    # Revoked on the way out, not left to expire with the 10 s lease.
    assert stack.records_on(stack.decode2_port) == []
    assert c.show(unit, "Result") == "success"
    assert c.show(unit, "ExecMainStatus") == "0"
    # Stopping the target stops every service that is PartOf it, each as cleanly.
    c.sh("systemctl stop gptoss.target", timeout=150)
    for u in STACK:
        # The target's stop job can finish before every PartOf service has drained (a prefill
        # worker waits for its staged KV up to GPTOSS_DRAIN_TIMEOUT): wait, bounded by that.
        wait_for(f"{u} inactive", lambda u=u: c.show(u, "ActiveState") == "inactive", timeout=60)
        assert c.show(u, "Result") == "success", f"{u}\n{stack.diagnose((u,))}"
    assert stack.records() == []

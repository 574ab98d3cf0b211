"""`gptoss install-systemd`: put the systemd units of systemd/ in place for the venv this runs from.

The unit files name their program as /opt/gptoss/venv/bin/gptoss; installing rewrites that prefix
to the real venv, so a unit never depends on PATH or on a wrapper script. Default env files are
copied to /etc/gptoss only where none exists yet: an upgrade replaces units, never settings.
Idempotent: running it again with the same flags changes nothing.
"""
from __future__ import annotations

import argparse
import grp
import os
import pathlib
import pwd
import shutil
import subprocess
import sys
from dataclasses import dataclass

SHIPPED_VENV = "/opt/gptoss/venv"     # the prefix the unit files are written with
SHIPPED_USER = "gptoss"
COMMON_DROPIN_DIR = "gptoss-.service.d"   # applies to every gptoss-*.service
LOCAL_ETCD_DROPIN = "20-local-etcd.conf"
HOME_DROPIN = "30-venv-in-home.conf"
HOME_DIRS = ("/home", "/root", "/run/user")
TMP_DROPIN = "31-venv-in-tmp.conf"
TMP_DIRS = ("/tmp", "/var/tmp")
STATE_DIR = "/var/lib/gptoss"


class InstallError(RuntimeError):
    """Something the install cannot go on with; the message says what to do."""


@dataclass(frozen=True)
class InstallConfig:
    units_dir: pathlib.Path
    prefix: pathlib.Path
    env_dir: pathlib.Path
    venv: pathlib.Path
    user: str
    create_user: bool
    local_etcd: bool
    reload: bool
    dry_run: bool


def default_units_dir() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parents[1] / "systemd"


def default_venv() -> pathlib.Path | None:
    return pathlib.Path(sys.prefix) if sys.prefix != sys.base_prefix else None


def systemd_is_running() -> bool:
    """sd_booted(3): systemd is PID 1 exactly when /run/systemd/system exists."""
    return os.path.isdir("/run/systemd/system")


def _code_places(venv: pathlib.Path) -> tuple[pathlib.Path, ...]:
    """Where the services' code lives: the venv, the Python it links to (pyenv, ~/.local), and this
    package's own source (an editable install runs it from the checkout)."""
    return (venv.resolve(), (venv / "bin" / "python").resolve(), pathlib.Path(__file__).resolve())


def _under(places: tuple[pathlib.Path, ...], dirs: tuple[str, ...]) -> bool:
    return any(p == pathlib.Path(d) or pathlib.Path(d) in p.parents for p in places for d in dirs)


def interpreter_in_home(venv: pathlib.Path) -> bool:
    """True if the services' code lies under a home directory, which ProtectHome=yes would hide."""
    return _under(_code_places(venv), HOME_DIRS)


def code_dirs_in_tmp(venv: pathlib.Path) -> list[pathlib.Path]:
    """The top folders under /tmp or /var/tmp holding the services' code (e.g. a CI checkout):
    PrivateTmp=yes would hide them, so they are bound read-only into the service's private /tmp."""
    found = set()
    for p in _code_places(venv):
        for d in map(pathlib.Path, TMP_DIRS):
            if d in p.parents:
                found.add(d / p.relative_to(d).parts[0])
    return sorted(found)


def untraversable_parents(path: pathlib.Path) -> list[pathlib.Path]:
    """Parent directories that a user other than their owner cannot enter (no o+x)."""
    return [p for p in path.resolve().parents if p.exists() and not p.stat().st_mode & 0o001]


class Installer:
    """Carries out (or, with dry_run, only describes) each step, printing one line per change."""

    def __init__(self, cfg: InstallConfig) -> None:
        self.cfg = cfg

    def say(self, what: str) -> None:
        print(("would " if self.cfg.dry_run else "") + what)

    def run(self, cmd: list[str]) -> None:
        self.say("run: " + " ".join(cmd))
        if not self.cfg.dry_run:
            subprocess.run(cmd, check=True)

    def write(self, dest: pathlib.Path, text: str, mode: int = 0o644) -> None:
        if dest.exists() and dest.read_text() == text:
            print(f"unchanged {dest}")
            return
        self.say(f"write {dest}")
        if not self.cfg.dry_run:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".tmp")
            tmp.write_text(text)
            tmp.chmod(mode)
            tmp.replace(dest)

    def remove(self, dest: pathlib.Path) -> None:
        if dest.exists():
            self.say(f"remove {dest}")
            if not self.cfg.dry_run:
                dest.unlink()

    # -- steps -------------------------------------------------------------------------------

    def ensure_user(self) -> None:
        try:
            pwd.getpwnam(self.cfg.user)
            print(f"user {self.cfg.user} exists")
            return
        except KeyError:
            pass
        if not self.cfg.create_user:
            raise InstallError(f"user {self.cfg.user!r} does not exist: pass --create-user, or --user NAME")
        self.run(["useradd", "--system", "--user-group", "--home-dir", STATE_DIR, "--no-create-home",
                  "--shell", "/usr/sbin/nologin", "--comment", "gptoss-disagg services", self.cfg.user])

    def render(self, text: str) -> str:
        text = text.replace(SHIPPED_VENV, str(self.cfg.venv))
        return (text.replace(f"\nUser={SHIPPED_USER}\n", f"\nUser={self.cfg.user}\n")
                    .replace(f"\nGroup={SHIPPED_USER}\n", f"\nGroup={self.group()}\n"))

    def install_units(self) -> None:
        src = self.cfg.units_dir
        for unit in sorted([*src.glob("*.service"), *src.glob("*.target")]):
            self.write(self.cfg.prefix / unit.name, self.render(unit.read_text()))
        for dropin in sorted(src.glob("*.service.d/*.conf")):
            self.write(self.cfg.prefix / dropin.parent.name / dropin.name, self.render(dropin.read_text()))
        common = self.cfg.prefix / COMMON_DROPIN_DIR
        if self.cfg.local_etcd:
            self.write(common / LOCAL_ETCD_DROPIN, (src / "optional" / LOCAL_ETCD_DROPIN).read_text())
        else:
            self.remove(common / LOCAL_ETCD_DROPIN)
        if interpreter_in_home(self.cfg.venv):
            # ProtectHome=yes would hide the interpreter; read-only still keeps it unwritable.
            print(f"note: {self.cfg.venv} (or its Python) lies under a home directory: "
                  "relaxing ProtectHome to read-only")
            self.write(common / HOME_DROPIN, "# Written by gptoss install-systemd: the venv or its Python "
                       "lives under a home directory.\n[Service]\nProtectHome=read-only\n")
        else:
            self.remove(common / HOME_DROPIN)
        tmp_code = code_dirs_in_tmp(self.cfg.venv)
        if tmp_code:
            # PrivateTmp=yes gives the service an empty /tmp; keep it, and bind the code back in read-only.
            paths = " ".join(map(str, tmp_code))
            print(f"note: the services' code lies under /tmp: binding {paths} read-only into their private /tmp")
            self.write(common / TMP_DROPIN, "# Written by gptoss install-systemd: the venv or its code "
                       f"lives under /tmp.\n[Service]\nBindReadOnlyPaths={paths}\n")
        else:
            self.remove(common / TMP_DROPIN)
        blocked = untraversable_parents(self.cfg.venv / "bin" / "python")
        if blocked and self.cfg.user != "root":
            print(f"warning: user {self.cfg.user} cannot enter {', '.join(map(str, blocked))} "
                  f"(no o+x), so it cannot run {self.cfg.venv}/bin/python", file=sys.stderr)

    def install_env_files(self) -> None:
        env_dir = self.cfg.env_dir
        if not env_dir.is_dir():
            self.say(f"create {env_dir}")
            if not self.cfg.dry_run:
                env_dir.mkdir(parents=True, mode=0o755)
        for src in sorted((self.cfg.units_dir / "env").glob("*.env")):
            dest = env_dir / src.name
            if dest.exists():
                print(f"kept existing {dest}")
                continue
            # 0640 root:<group>: env files may carry GPTOSS_ETCD_PASSWORD.
            self.write(dest, src.read_text(), mode=0o640)
            if not self.cfg.dry_run:
                shutil.chown(dest, "root", self.group())

    def group(self) -> str:
        """The user's primary group; before --create-user made it, the group useradd will make."""
        try:
            return grp.getgrgid(pwd.getpwnam(self.cfg.user).pw_gid).gr_name
        except KeyError:
            return self.cfg.user

    def reload(self) -> None:
        if not self.cfg.reload:
            return
        if systemd_is_running():
            self.run(["systemctl", "daemon-reload"])
        else:
            print("systemd is not PID 1 here: skipped daemon-reload")

    def install(self) -> None:
        if not (self.cfg.venv / "bin" / "gptoss").is_file():
            raise InstallError(f"{self.cfg.venv}/bin/gptoss not found: pass --venv with the venv gptoss is installed in")
        if not (self.cfg.units_dir / "gptoss.target").is_file():
            raise InstallError(f"no units in {self.cfg.units_dir}: pass --units-dir (the checkout's systemd/)")
        self.ensure_user()
        self.install_units()
        self.install_env_files()
        self.reload()
        print("next: edit the env files in", self.cfg.env_dir, "then "
              "`systemctl enable --now gptoss-prefill gptoss-decode gptoss-frontend gptoss.target`")


def parse_args(argv: list[str] | None) -> InstallConfig:
    p = argparse.ArgumentParser(prog="gptoss install-systemd", description=__doc__.splitlines()[0])
    p.add_argument("--prefix", type=pathlib.Path, default=pathlib.Path("/etc/systemd/system"),
                   help="where unit files go (default: %(default)s)")
    p.add_argument("--env-dir", type=pathlib.Path, default=pathlib.Path("/etc/gptoss"),
                   help="where the env files go; existing ones are kept (default: %(default)s)")
    p.add_argument("--venv", type=pathlib.Path, default=default_venv(),
                   help="venv whose bin/gptoss the units run (default: the running interpreter's venv)")
    p.add_argument("--user", default=SHIPPED_USER, help="user the services run as (default: %(default)s)")
    p.add_argument("--create-user", action="store_true", help="create --user as a system user if missing")
    p.add_argument("--local-etcd", action="store_true",
                   help="etcd runs on this host as etcd.service: make the services pull it in")
    p.add_argument("--units-dir", type=pathlib.Path, default=default_units_dir(),
                   help="unit sources (default: the checkout's systemd/)")
    p.add_argument("--no-reload", action="store_true", help="skip `systemctl daemon-reload`")
    p.add_argument("--dry-run", action="store_true", help="print what would be done, change nothing")
    ns = p.parse_args(argv)
    if ns.venv is None:
        p.error("not running from a venv: pass --venv PATH")
    return InstallConfig(units_dir=ns.units_dir, prefix=ns.prefix, env_dir=ns.env_dir,
                         venv=ns.venv.absolute(), user=ns.user, create_user=ns.create_user,
                         local_etcd=ns.local_etcd, reload=not ns.no_reload, dry_run=ns.dry_run)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        Installer(cfg).install()
    except (InstallError, subprocess.CalledProcessError, OSError) as e:
        print(f"gptoss install-systemd: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

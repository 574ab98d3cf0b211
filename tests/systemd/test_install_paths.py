"""The installer relaxes exactly the hardening that would hide the services' own code."""
import pathlib

from gptoss_cli import install_systemd as inst


def test_venv_under_tmp_is_detected(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to("/usr/bin/python3")
    assert str(tmp_path.resolve()).startswith("/tmp")   # pytest's tmp_path lives under /tmp here
    top = pathlib.Path("/tmp") / tmp_path.resolve().relative_to("/tmp").parts[0]
    assert top in inst.code_dirs_in_tmp(venv)


def test_under_matches_whole_path_components():
    assert inst._under((pathlib.Path("/tmp/x/venv"),), inst.TMP_DIRS)
    assert inst._under((pathlib.Path("/root/.pyenv/bin/python"),), inst.HOME_DIRS)
    assert not inst._under((pathlib.Path("/tmpfoo/venv"),), inst.TMP_DIRS)
    assert not inst._under((pathlib.Path("/opt/gptoss/venv"),), inst.TMP_DIRS + inst.HOME_DIRS)

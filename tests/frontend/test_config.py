"""Frontend flags: TLS to the workers and to etcd, secrets only from the environment."""
import pytest

from frontend_svc.config import parse_args
from frontend_svc.workers import worker_credentials


def test_tls_flags_and_env(monkeypatch, tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("GPTOSS_ETCD_USER", "gptoss")
    cfg = parse_args(["--worker-tls-ca", str(ca), "--etcd-ca", str(ca)])
    assert cfg.worker_tls_ca == str(ca) and cfg.etcd_ca == str(ca) and cfg.etcd_user == "gptoss"
    assert "password" not in repr(cfg).lower()
    assert worker_credentials(cfg.worker_tls_ca) is not None
    assert worker_credentials(None) is None


@pytest.mark.parametrize("argv", [["--worker-tls-cert", "c.pem"],
                                  ["--worker-tls-cert", "c.pem", "--worker-tls-key", "k.pem"]])
def test_client_cert_needs_key_and_ca(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2 and "--worker-tls" in capsys.readouterr().err


def test_unreadable_ca_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="cannot read"):
        worker_credentials(str(tmp_path / "missing.pem"))

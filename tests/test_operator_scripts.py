"""The operator's scripts: certificates for real names (DNS and IP) with a validity and renewal under the same CA,
and a CLI connection added to Flower's config without losing the ones there."""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from script_modules import load_script

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def _script(name: str):
    return load_script(f"scripts/{name}.py")


tool = _script("make_certificates")
connections = _script("add_connection")


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_the_superlink_certificate_names_every_host_and_lasts_the_days_asked(tmp_path, capsys):
    assert tool.main([str(tmp_path), "--host", "fl.example.org", "--host", "203.0.113.7", "--days", "90", "--nodes", "2"]) == 0
    server, ca = _load(tmp_path / "server.pem"), _load(tmp_path / "ca.crt")
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "fl.example.org"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("203.0.113.7"),
    }
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert datetime.timedelta(days=90) <= lifetime <= datetime.timedelta(days=90, minutes=10)
    assert (tmp_path / "ca.key").stat().st_mode & 0o077 == 0 and (tmp_path / "server.key").stat().st_mode & 0o077 == 0
    assert sorted(p.name for p in tmp_path.glob("supernode-*")) == [
        "supernode-0",
        "supernode-0.pub",
        "supernode-1",
        "supernode-1.pub",
    ]
    assert "fl.example.org, 203.0.113.7, 90 days" in capsys.readouterr().out


def test_renewal_keeps_the_ca_the_sites_trust(tmp_path):
    assert tool.main([str(tmp_path), "--host", "fl.example.org", "--nodes", "0"]) == 0
    ca_before, server_before = (tmp_path / "ca.crt").read_bytes(), _load(tmp_path / "server.pem")
    assert tool.main([str(tmp_path), "--host", "fl.example.org", "--host", "fl2.example.org", "--renew", "--nodes", "0"]) == 0
    assert (tmp_path / "ca.crt").read_bytes() == ca_before
    renewed = _load(tmp_path / "server.pem")
    assert renewed.serial_number != server_before.serial_number
    renewed.verify_directly_issued_by(_load(tmp_path / "ca.crt"))
    assert "fl2.example.org" in renewed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--host", "not a name"], "neither an IP address nor a DNS name"),
        (["--days", "0"], "at least 1 day"),
        (["--renew"], "no usable CA"),
    ],
)
def test_bad_arguments_are_refused_with_the_reason(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        tool.main([str(tmp_path / "certs"), *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_connection_is_added_to_the_flower_config_and_local_stays(tmp_path, monkeypatch):
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "home")}
    subprocess.run(
        ["flwr", "config", "list"], env=env, capture_output=True, text=True, timeout=120, check=True
    )  # the default file
    before = (tmp_path / "home" / "config.toml").read_text()
    tool.main([str(tmp_path / "certs"), "--nodes", "0"])
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert connections.main(["docker", "127.0.0.1:8000", "--root-certificates", "certs/ca.crt"]) == 0
    after = (tmp_path / "home" / "config.toml").read_text()
    assert after.startswith(before) and f'root-certificates = "{tmp_path / "certs" / "ca.crt"}"' in after  # absolute
    listed = subprocess.run(["flwr", "config", "list"], env=env, capture_output=True, text=True, timeout=120, check=True)
    assert "local (default)" in listed.stdout and "docker" in listed.stdout
    with pytest.raises(SystemExit):
        connections.main(["docker", "127.0.0.1:9000", "--insecure"])  # the name is taken: nothing is overwritten
    assert (tmp_path / "home" / "config.toml").read_text() == after

"""Run the app on a real deployment on this machine: one SuperLink and N SuperNodes on 127.0.0.1.

With ``--tls`` (the default) the SuperLink serves HTTPS with a certificate from a fresh CA and
admits only registered SuperNodes (``--enable-supernode-auth``): each node gets an ECDSA P-384
key pair, its public key is registered with ``flwr supernode register``, and the node signs in
with its private key. Every process this script starts is stopped by PID when it ends.

    python scripts/local_deployment.py --supernodes 3 --rounds 2 --workdir /tmp/fedpipe-deploy

The same steps on real machines: README, "Deployment".
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

APP = Path(__file__).resolve().parents[1]
CONNECTION = "fedpipe-deploy"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout_s: float) -> None:
    """Wait until something listens on 127.0.0.1:port."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s")


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_certificates(directory: Path, days: int = 30, hosts: list[str] | None = None) -> dict[str, Path]:
    """A CA and a server certificate for localhost / 127.0.0.1 (and ``hosts``), signed by it (PEM files)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("FedPipe test CA"))
        .issuer_name(_name("FedPipe test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    names = [x509.DNSName(h) for h in ["localhost", *(hosts or [])]]
    san = x509.SubjectAlternativeName([*names, x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    server = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(san, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": directory / "ca.crt", "cert": directory / "server.pem", "key": directory / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    paths["key"].chmod(0o600)
    return paths


def make_node_key(directory: Path, name: str) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair in OpenSSH format (what SuperNode authentication uses)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = directory / name, directory / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return private, public


@dataclass
class Deployment:
    """The processes of one local deployment and how to reach it."""

    workdir: Path
    tls: bool
    port: int = field(default_factory=free_port)
    processes: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    certs: dict[str, Path] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "FLWR_HOME": str(self.workdir / "flwr-home"),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "w")  # noqa: SIM115 - kept open for the process's lifetime
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append((name, proc))
        return proc

    def security(self) -> list[str]:
        return ["--root-certificates", str(self.certs["ca"])] if self.tls else ["--insecure"]

    def start_superlink(self, timeout_s: float = 60.0) -> None:
        cmd = [
            "flower-superlink",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--database",
            str(self.workdir / "state.db"),
            "--disable-runtime-dependency-installation",
        ]
        if self.tls:
            self.certs = make_certificates(self.workdir / "certs")
            cmd += [
                "--ssl-ca-certfile",
                str(self.certs["ca"]),
                "--ssl-certfile",
                str(self.certs["cert"]),
                "--ssl-keyfile",
                str(self.certs["key"]),
                "--enable-supernode-auth",
            ]
        else:
            cmd += ["--insecure"]
        self.start("superlink", cmd)
        wait_port(self.port, timeout_s)
        self.write_connection()

    def write_connection(self) -> None:
        """The CLI's connection to this SuperLink in $FLWR_HOME/config.toml."""
        home = self.workdir / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        secure = f'root-certificates = "{self.certs["ca"]}"' if self.tls else "insecure = true"
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.port}"\n{secure}\n'
        )

    def register(self, public_key: Path, name: str) -> str:
        """Register a SuperNode's public key (operator side); returns the CLI's answer."""
        done = subprocess.run(
            ["flwr", "supernode", "register", str(public_key), CONNECTION, "--name", name],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"registering {public_key.name} failed: {done.stdout}{done.stderr}")
        return done.stdout

    def start_supernode(self, index: int, node_config: str, key: Path | None = None) -> subprocess.Popen:
        cmd = [
            "flower-supernode",
            *self.security(),
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--port",
            str(free_port()),
            "--node-config",
            node_config,
            "--max-retries",
            "3",
            "--max-wait-time",
            "60",
        ]
        if key is not None:
            cmd += ["--auth-supernode-private-key", str(key)]
        return self.start(f"supernode-{index}", cmd)

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop every process started here (whole process group), newest first; kill what does not stop."""
        for _, proc in reversed(self.processes):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.time() + timeout_s
        for _, proc in reversed(self.processes):
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


def node_config(index: int, supernodes: int) -> str:
    """Each node's partition and a declared profile (memory and TFLOPS differ per node)."""
    memory_gb, tflops = 1.4 + 0.15 * index, 9.0 + 8.0 * index
    return f"partition-id={index} num-partitions={supernodes} memory-gb={memory_gb:.2f} tflops={tflops:.1f}"


def run_app(deployment: Deployment, run_config: str, timeout_s: float) -> subprocess.CompletedProcess:
    cmd = ["flwr", "run", str(APP), CONNECTION, "--stream", "--run-config", run_config]
    return subprocess.run(cmd, env=deployment.env, capture_output=True, text=True, timeout=timeout_s, check=False)


def deploy_and_run(
    workdir: Path, supernodes: int = 3, rounds: int = 2, tls: bool = True, extra_config: str = "", timeout_s: float = 900.0
) -> dict[str, object]:
    """Start the deployment, run the app, stop everything; returns wall time, run directory and log tail."""
    workdir.mkdir(parents=True, exist_ok=True)
    deployment = Deployment(workdir, tls)
    started = time.time()
    try:
        deployment.start_superlink()
        for index in range(supernodes):
            key = None
            if tls:
                key, public = make_node_key(workdir / "keys", f"supernode-{index}")
                deployment.register(public, f"node-{index}")
            deployment.start_supernode(index, node_config(index, supernodes), key)
        runs = workdir / "runs"
        config = f'num-server-rounds={rounds} output-dir="{runs}" strategy.min-train-nodes={supernodes} {extra_config}'.strip()
        done = run_app(deployment, config, timeout_s)
    finally:
        deployment.stop()
    summaries = sorted(runs.glob("*/summary.json"))
    return {
        "wall_s": time.time() - started,
        "returncode": done.returncode,
        "run_dir": str(summaries[-1].parent) if summaries else None,
        "log_tail": (done.stdout + done.stderr)[-4000:],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--supernodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--insecure", action="store_true", help="plain HTTP and no node authentication (testing only)")
    parser.add_argument("--run-config", default="", help="extra run-config keys, e.g. 'train.local-steps=2'")
    parser.add_argument("--timeout-s", type=float, default=900.0)
    args = parser.parse_args()
    result = deploy_and_run(args.workdir, args.supernodes, args.rounds, not args.insecure, args.run_config, args.timeout_s)
    print(json.dumps({k: v for k, v in result.items() if k != "log_tail"}, indent=2))
    if result["run_dir"] is None:
        print(result["log_tail"], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

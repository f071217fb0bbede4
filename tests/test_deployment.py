"""Deployment mode on 127.0.0.1: SuperLink + SuperNodes with TLS and node authentication.

Marked ``deployment`` (run by ``pytest -m 'slow or deployment'`` and in CI): every process is started by
``scripts/local_deployment.py`` and stopped by PID with timeouts.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from script_modules import load_script

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.deployment

deploy = load_script("scripts/local_deployment.py")

SMALL = (
    "train.local-steps=2 train.batch-size=4 eval.examples=8 eval.test-groups=2 eval.max-new-tokens=8 eval.base-generation=false"
)


def test_tls_federation_with_registered_nodes_runs_two_rounds(tmp_path):
    result = deploy.deploy_and_run(tmp_path, supernodes=3, rounds=2, tls=True, extra_config=SMALL, timeout_s=900)
    assert result["returncode"] == 0 and result["run_dir"], result["log_tail"]
    run = Path(result["run_dir"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["clients"] == 3 and r["bytes_up"] > 0 for r in rows[1:])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["total_bytes_up"] > 0
    plans = [json.loads(line) for line in (run / "plans.jsonl").read_text().splitlines()]
    assert {p["profile"]["source"] for p in plans} == {"declared"}  # each node's own --node-config profile
    assert len({p["profile"]["flops"] for p in plans}) == 3
    for row in rows[1:]:  # a fresh ClientApp process per message: it reports its start-up and its state restore
        assert row["client_startup_s"] > 0 and row["client_setup_s"] > 0 and row["client_train_s"] > 0
    assert rows[1]["client_query_s"] > 0 and "client_query_s" not in rows[2]  # profiled once, in round 1
    print(
        f"deployment wall time: {result['wall_s']:.1f} s; per round and node: "
        + "; ".join(
            f"train {r['client_train_s']:.2f} s, setup {r['client_setup_s']:.2f} s, process start {r['client_startup_s']:.2f} s"
            for r in rows[1:]
        )
    )


def _log_has(path: Path, needles: tuple[str, ...], timeout_s: float) -> str | None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        for needle in needles:
            if needle in text:
                return needle
        time.sleep(0.5)
    return None


@contextmanager
def _federation(tmp_path: Path, *, tls: bool, nodes: int = 0, register: bool = False) -> Iterator[deploy.Deployment]:
    """A SuperLink and ``nodes`` SuperNodes (registered by key when ``register``), all stopped on exit."""
    deployment = deploy.Deployment(tmp_path, tls=tls)
    try:
        deployment.start_superlink()
        for index in range(nodes):
            if register:
                deployment.join(index, deploy.node_config(index, nodes))
            else:
                deployment.start_supernode(index, deploy.node_config(index, nodes))
        yield deployment
    finally:
        deployment.stop()


def test_unregistered_node_and_plaintext_clients_are_refused(tmp_path):
    with _federation(tmp_path, tls=True) as deployment:
        key, _ = deploy.make_node_key(tmp_path / "keys", "stranger")  # never registered
        deployment.start_supernode(0, "partition-id=0 num-partitions=1", key)
        refused = _log_has(tmp_path / "superlink.log", ('activate-node HTTP/1.1" 412', "No SuperNode found"), 60)
        assert refused, (tmp_path / "superlink.log").read_text()[-2000:]
        # a plaintext (insecure) SuperNode cannot talk to the TLS SuperLink
        plain = deployment.start(
            "supernode-plain",
            [
                "flower-supernode",
                "--insecure",
                "--superlink",
                f"127.0.0.1:{deployment.port}",
                "--port",
                str(deploy.free_port()),
                "--max-retries",
                "1",
                "--max-wait-time",
                "10",
            ],
        )
        plain.wait(timeout=90)
        assert plain.returncode != 0
        assert "could not establish a connection to the SuperLink" in (tmp_path / "supernode-plain.log").read_text()
        # and a plain HTTP request gets no HTTP answer from the HTTPS port
        with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError, OSError)):
            urllib.request.urlopen(f"http://127.0.0.1:{deployment.port}/v1/fleet/get-run", data=b"{}", timeout=10)
    assert all(proc.poll() is not None for _, proc in deployment.processes)


def test_a_node_killed_mid_round_does_not_stop_the_run(tmp_path):
    runs = tmp_path / "runs"
    with _federation(tmp_path, tls=False, nodes=3, register=False) as deployment:
        config = f'num-server-rounds=2 strategy.min-train-nodes=2 strategy.round-timeout-s=300 output-dir="{runs}" {SMALL}'
        run = deployment.start_run(config)
        victim = next(proc for name, proc in deployment.processes if name == "supernode-2")
        assert _log_has(tmp_path / "supernode-2.log", ("Receiving: train message",), 600), "node 2 never got a train message"
        os.killpg(victim.pid, signal.SIGKILL)  # mid-round: it received its train message and will never reply
        run.wait(timeout=900)
    summaries = list(runs.glob("*/summary.json"))
    assert run.returncode == 0 and summaries, (tmp_path / "flwr-run.log").read_text()[-3000:]
    rows = [json.loads(line) for line in (summaries[0].parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[1]["clients"] == 2 and rows[1]["rejected"] == 1  # the killed node's "Node Unavailable" error reply
    assert rows[2]["clients"] >= 2
    assert rows[2]["eval_loss"] < rows[0]["eval_loss"]


def _checkpoint_round(runs: Path, wanted: int, timeout_s: float) -> int | None:
    """The round of the run's checkpoint once it reaches ``wanted`` (None if it does not in time)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        for state in runs.glob("*/checkpoint/state.json"):
            try:
                round_ = json.loads(state.read_text())["round"]
            except (OSError, ValueError, KeyError):
                continue  # being written
            if round_ >= wanted:
                return round_
        time.sleep(0.5)
    return None


def _post(url: str, ca: Path) -> int:
    """HTTP status of an empty POST over TLS verified against ``ca``."""
    request = urllib.request.Request(url, data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, context=ssl.create_default_context(cafile=str(ca)), timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_only_the_fleet_api_is_public_behind_the_proxy(tmp_path):
    runs = tmp_path / "runs"
    with _federation(tmp_path, tls=True) as deployment:
        deployment.start_proxy()  # nginx with docker/nginx/fleet.conf.template, as in docker/compose.yml
        public = f"https://127.0.0.1:{deployment.proxy_port}"
        ca = deployment.certs["ca"]
        # the Control and Runtime APIs are not forwarded: the proxy answers 404 itself
        assert _post(f"{public}/v1/control/list-runs", ca) == 404
        assert _post(f"{public}/v1/runtime/get-nodes", ca) == 404
        assert _post(f"{public}/v1/fleet/get-run", ca) == 415  # forwarded: the SuperLink wants a protobuf body
        deployment.write_connection("public", deployment.proxy_port)
        stranger, stranger_pub = deploy.make_node_key(tmp_path / "keys", "stranger")
        refused = deployment.flwr(["supernode", "register", str(stranger_pub), "public", "--name", "stranger"])
        assert refused.returncode != 0 and "404" in refused.stdout + refused.stderr
        assert deployment.flwr(["ls", "public"]).returncode != 0
        assert deployment.flwr(["ls", deploy.CONNECTION]).returncode == 0  # the operator's side still has it
        # registered sites train through the public port; site 1 as docs/hospital-node.md shows a site: its key made
        # with ssh-keygen, its ClientApps in a separate flower-superexec (--isolation process), only the messages it needs
        deployment.join(0, deploy.node_config(0, 2))
        site_key = tmp_path / "keys" / "site_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(site_key)], check=True, timeout=30)
        deployment.join(1, f'{deploy.node_config(1, 2)} messages="query,train"', site_key, isolation="process")
        config = f'num-server-rounds=1 strategy.min-train-nodes=2 output-dir="{runs}" {SMALL}'
        done = deploy.run_app(deployment, config, timeout_s=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in next(runs.glob("*/metrics.jsonl")).read_text().splitlines()]
    assert rows[-1]["round"] == 1 and rows[-1]["clients"] == 2 and rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    access = (tmp_path / "nginx" / "access.log").read_text()
    assert '"POST /v1/fleet/push-messages HTTP/1.1" 200' in access and '"POST /v1/control/register-node HTTP/1.1" 404' in access


def test_a_restarted_superlink_keeps_its_nodes_and_the_run_resumes_without_losing_a_round(tmp_path):
    runs, resumed = tmp_path / "runs", tmp_path / "resumed"
    with _federation(tmp_path, tls=True, nodes=2, register=True) as deployment:
        config = f'num-server-rounds=2 strategy.min-train-nodes=2 output-dir="{runs}" {SMALL}'
        first = deployment.start_run(config)
        assert _checkpoint_round(runs, 1, timeout_s=600) == 1, "round 1 never finished"
        deployment.restart_superlink()  # between rounds 1 and 2: the ServerApp it ran goes with it
        deploy._stop(first, 30)
        run_dir = next(runs.glob("*/checkpoint")).parent
        assert not (run_dir / "summary.json").exists()
        # the same nodes are accepted again (their keys are in state.db), and the run goes on from round 1
        again = f'num-server-rounds=2 strategy.min-train-nodes=2 output-dir="{resumed}" resume-from="{run_dir}" {SMALL}'
        done = deploy.run_app(deployment, again, timeout_s=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in next(resumed.glob("*/metrics.jsonl")).read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[2]["clients"] == 2
    assert (tmp_path / "superlink.log").read_text().count("Starting Flower SuperLink") >= 2


def _site_files(directory: Path) -> list[str]:
    """Three sites' own files, in three formats, each with meaning representations of its own from the packaged E2E
    set: JSONL with prompt/response fields, a native mr,ref CSV, and a save_to_disk directory."""
    import csv

    import datasets

    records = [
        json.loads(line) for line in (ROOT / "fedpipe_core" / "datasets" / "e2e" / "devset.jsonl").read_text().splitlines()
    ]
    shares = [[(r["mr"], ref) for r in records[i * 60 : (i + 1) * 60] for ref in r["refs"][:2]] for i in range(3)]
    jsonl, table, saved = directory / "site-a.jsonl", directory / "site-b.csv", directory / "site-c"
    jsonl.write_text("".join(json.dumps({"question": mr, "answer": ref}) + "\n" for mr, ref in shares[0]))
    with open(table, "w", newline="") as handle:
        csv.writer(handle).writerows([("mr", "ref"), *shares[1]])
    datasets.Dataset.from_dict({"prompt": [m for m, _ in shares[2]], "response": [r for _, r in shares[2]]}).save_to_disk(
        str(saved)
    )
    return [
        f'{jsonl} prompt-field="question" response-field="answer"',
        str(table),
        f'{saved} prompt-field="prompt" response-field="response"',
    ]


def test_sites_with_their_own_files_and_a_server_without_data_or_weights(tmp_path):
    import hashlib

    sites = _site_files(tmp_path)
    no_data = tmp_path / "the-server-has-no-data.csv"  # never created: a server that read its data.path would stop
    small = SMALL.replace("eval.base-generation=false", "eval.base-generation=true")  # each site scores its base too
    config = f'{small} eval.where="sites" data.path="{no_data}" eval.local-baseline=true'
    result = deploy.deploy_and_run(
        tmp_path / "deploy", rounds=2, tls=True, extra_config=config, timeout_s=1200, site_data=sites, weightless_server=True
    )
    assert result["returncode"] == 0 and result["run_dir"], result["log_tail"]
    run = Path(result["run_dir"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows:  # the server evaluated nothing; the sites' example-weighted mean is the federated eval loss
        assert row["eval_loss"] is None and len(row["site_eval"]) == 3
        weighted = sum(s["loss"] * s["examples"] for s in row["site_eval"].values()) / sum(
            s["examples"] for s in row["site_eval"].values()
        )
        assert row["federated_eval_loss"] == pytest.approx(weighted, rel=1e-12)
    assert rows[2]["federated_eval_loss"] < rows[0]["federated_eval_loss"]
    summary = json.loads((run / "summary.json").read_text())
    hashes = {hashlib.sha256(Path(site.split()[0]).read_bytes()).hexdigest() for site in sites[:2]}
    assert hashes <= {s["data_hash"] for s in summary["sites"].values()}  # what sha256sum prints for the two files
    for site in summary["sites"].values():
        assert site["examples"] > 0 and site["eval_examples"] > 0
        for scores in (site, site["base"], site["local_only"]):
            assert {"ppl", "bleu", "nist", "rouge_l", "cider"} <= set(scores)
        assert site["ppl"] < site["base"]["ppl"]
    assert summary["federated"]["sites"] == 3 and "bleu" in summary["federated"] and "ppl" in summary["federated"]["local_only"]
    assert "bleu" not in summary  # nothing scored on the server
    per_site = "; ".join(
        f"{s['base']['ppl']:.2f} / {s['local_only']['ppl']:.2f} / {s['ppl']:.2f}" for s in summary["sites"].values()
    )
    losses = [round(r["federated_eval_loss"], 4) for r in rows]
    print(
        f"server peak RSS {summary['server_peak_rss_bytes'] / 1e6:.0f} MB; PPL per site (base / local only / federated): "
        f"{per_site}; federated eval loss per round: {losses}"
    )


def _signing_key() -> tuple[object, str]:
    """An ed25519 key pair: the private key and the public key as OpenSSH writes it (what --trusted-entities lists)."""
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = ed25519.Ed25519PrivateKey.generate()
    return key, key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()


def test_flower_s_app_pin_accepts_only_a_fab_signed_by_a_trusted_key():
    """The check a SuperNode with --trusted-entities applies to each run's app (Flower's own ``_verify_fab``): a
    signature by a listed key over this app's bundle passes; another key's, or a signature over another bundle, fails."""
    import base64
    import hashlib

    from flwr.supercore.fab import Fab
    from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign
    from flwr.supernode.start_client_internal import _verify_fab

    content, other = b"the app's FAB bytes", b"an altered FAB"
    (trusted, trusted_pub), (stranger, _) = _signing_key(), _signing_key()

    def signed(key, body: bytes, signed_at: int = 1_700_000_000) -> Fab:
        signature = key.sign(create_message_to_sign(hashlib.sha256(body).digest(), signed_at))
        record = {"signature": base64.urlsafe_b64encode(signature).rstrip(b"=").decode(), "signed_at": signed_at}
        return Fab(hashlib.sha256(content).hexdigest(), content, {"fpk_site": json.dumps(record), "valid_license": "Valid"})

    entities = {"fpk_site": trusted_pub}
    assert _verify_fab(signed(trusted, content), entities)
    assert not _verify_fab(signed(stranger, content), entities)  # signed, but not by a key the site trusts
    assert not _verify_fab(signed(trusted, other), entities)  # the trusted key signed a different bundle


def test_a_node_that_pins_signed_apps_refuses_this_unsigned_app_and_the_run_goes_on_without_it(tmp_path):
    _, public = _signing_key()
    entities = tmp_path / "trusted-entities.yaml"
    entities.write_text(f"fpk_hospital_review: '{public}'\n")
    with _federation(tmp_path, tls=False, nodes=1) as deployment:
        deployment.start_supernode(1, deploy.node_config(1, 2), trusted_entities=entities)
        runs = tmp_path / "runs"
        done = deploy.run_app(
            deployment, f'num-server-rounds=1 output-dir="{runs}" strategy.min-train-nodes=2 {SMALL}', timeout_s=600
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        refusal = _log_has(tmp_path / "supernode-1.log", ("The FAB could not be verified",), 30)
        assert refusal, (tmp_path / "supernode-1.log").read_text()[-2000:]
    rows = [json.loads(line) for line in next(runs.glob("*/metrics.jsonl")).read_text().splitlines()]
    assert rows[-1]["round"] == 1 and rows[-1]["clients"] == 1  # the pinned node ran none of it


def test_secure_aggregation_over_a_real_deployment_keeps_each_site_s_secrets_across_its_processes(tmp_path):
    """Each message is a fresh ClientApp process: a site's round secrets must live in its context's state from the
    keys stage to the unmask stage, and the server must learn the round from the sites' sums alone."""
    runs = tmp_path / "runs"
    with _federation(tmp_path, tls=False, nodes=3) as deployment:
        config = f'num-server-rounds=2 output-dir="{runs}" strategy.min-train-nodes=3 privacy.mode="secure" eval.where="both"'
        done = deploy.run_app(deployment, f"{config} {SMALL}", timeout_s=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = [json.loads(line) for line in next(runs.glob("*/metrics.jsonl")).read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["clients"] == 3 for r in rows[1:])
    assert rows[0]["site_eval"] == {} and rows[0]["federated_eval_loss"] > 0  # the sites' evaluation, known only summed
    assert rows[2]["eval_loss"] < rows[0]["eval_loss"]

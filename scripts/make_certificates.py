"""Make a federation CA, a SuperLink certificate signed by it, and SuperNode key pairs.

    python scripts/make_certificates.py docker/certs --host fl.example-hospital.org --host 203.0.113.7 --days 365 --nodes 3
    python scripts/make_certificates.py docker/certs --host fl.example-hospital.org --days 365 --renew --nodes 0

Writes ca.crt (every site gets it), ca.key (keep it offline: it signs renewals), server.pem and
server.key (the SuperLink's, for every name in --host: DNS names or IP addresses, plus localhost and
127.0.0.1), and supernode-<i> / supernode-<i>.pub (OpenSSH ECDSA P-384). Give each site only its own
private key; register the .pub files with `flwr supernode register`. `--renew` keeps the CA and
issues a new SuperLink certificate (rotation: the sites change nothing). A certificate from an
existing CA replaces server.pem/server.key and ca.crt instead (README, "Deployment").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from local_deployment import make_certificates, make_node_key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument(
        "--host", action="append", default=[], help="DNS name or IP address sites use for the SuperLink (repeatable)"
    )
    parser.add_argument("--days", type=int, default=365, help="validity of the certificates in days (default 365)")
    parser.add_argument("--renew", action="store_true", help="keep the CA in DIRECTORY, issue a new SuperLink certificate")
    parser.add_argument("--nodes", type=int, default=3, help="SuperNode key pairs to make (default 3)")
    args = parser.parse_args(argv)
    if args.nodes < 0:
        parser.error("--nodes must be >= 0")
    try:
        paths = make_certificates(args.directory, days=args.days, hosts=args.host, renew=args.renew)
    except ValueError as exc:
        parser.error(str(exc))
    for index in range(args.nodes):
        make_node_key(args.directory, f"supernode-{index}")
    names = ", ".join(["localhost", "127.0.0.1", *args.host])
    print(f"CA {paths['ca']}; SuperLink certificate {paths['cert']} for {names}, {args.days} days; {args.nodes} node keys")
    return 0


if __name__ == "__main__":
    sys.exit(main())

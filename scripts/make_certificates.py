"""Make a CA, a server certificate for a SuperLink and SuperNode key pairs (first-time users, tests).

    python scripts/make_certificates.py docker/certs --host superlink --nodes 3

Writes ca.crt, server.pem, server.key and supernode-<i> / supernode-<i>.pub (OpenSSH ECDSA P-384).
Give each site only its own private key; register the .pub files with `flwr supernode register`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from local_deployment import make_certificates, make_node_key


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--host", action="append", default=[], help="extra DNS name of the SuperLink (repeatable)")
    parser.add_argument("--nodes", type=int, default=3, help="SuperNode key pairs to make")
    args = parser.parse_args()
    paths = make_certificates(args.directory, hosts=args.host)
    for index in range(args.nodes):
        make_node_key(args.directory, f"supernode-{index}")
    print(f"CA {paths['ca']}, server certificate {paths['cert']}, {args.nodes} node keys in {args.directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

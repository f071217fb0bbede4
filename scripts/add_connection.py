"""Add a SuperLink connection to the Flower CLI's config without overwriting it.

    python scripts/add_connection.py docker 127.0.0.1:8000 --root-certificates docker/certs/ca.crt

Appends ``[superlink.NAME]`` to ``$FLWR_HOME/config.toml`` (``~/.flwr/config.toml`` by default) with the
CA certificate's absolute path, so the connection works from any directory; the connections already
there (``local``, which ``flwr run .`` uses, among them) stay. Then: ``flwr run . NAME``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from local_deployment import add_connection


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="connection name, e.g. docker")
    parser.add_argument("address", help="the SuperLink's Control API, HOST:PORT (the operator's side)")
    security = parser.add_mutually_exclusive_group(required=True)
    security.add_argument("--root-certificates", type=Path, help="the CA certificate that signed the SuperLink's")
    security.add_argument("--insecure", action="store_true", help="plain HTTP (testing on one machine only)")
    args = parser.parse_args(argv)
    if args.root_certificates is not None and not args.root_certificates.is_file():
        parser.error(f"--root-certificates {str(args.root_certificates)!r} is not a file")
    config = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr")) / "config.toml"
    try:
        add_connection(config, args.name, args.address, args.root_certificates)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"{config}: added connection {args.name!r} -> {args.address}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Write secrets from AWS SSM Parameter Store into a shell env file that only this user can read.

Runs on every node of ``cluster/aws.yaml`` at setup, with the node's IAM instance profile (no
credential on disk or in any config). ``ray start`` sources the file, so the raylet and every
process it starts (job drivers, Serve replicas, Ray Data actors) get the secrets in their
environment, where the code reads them (``OPENAI_API_KEY`` for the judge proxy, ``HF_TOKEN``).

    python node_secrets.py --prefix /bpo-ray/ --out ~/.bpo-ray.env OPENAI_API_KEY HF_TOKEN

A parameter that does not exist is skipped (printed by name only); values are never printed.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def fetch_parameters(names: Sequence[str], prefix: str, region: Optional[str] = None,
                     endpoint_url: Optional[str] = None) -> dict[str, str]:
    """``{NAME: value}`` for each ``prefix + NAME`` that exists in SSM (SecureString decrypted)."""
    import boto3

    client = boto3.client("ssm", region_name=region, endpoint_url=endpoint_url)
    found: dict[str, str] = {}
    for start in range(0, len(names), 10):  # GetParameters takes at most 10 names
        chunk = list(names[start:start + 10])
        reply = client.get_parameters(Names=[prefix + n for n in chunk], WithDecryption=True)
        for param in reply["Parameters"]:
            found[param["Name"][len(prefix):]] = param["Value"]
    return found


def render_env_file(values: dict[str, str]) -> str:
    """``export NAME='value'`` lines, shell-quoted so any value round-trips through ``.``."""
    lines = []
    for name, value in sorted(values.items()):
        if not _ENV_NAME.match(name):
            raise ValueError(f"{name!r} is not a valid environment variable name")
        lines.append(f"export {name}={shlex.quote(value)}")
    return "\n".join(lines) + ("\n" if lines else "")


def write_private(path: Path, text: str) -> None:
    """Create or replace ``path`` with mode 600 from the start (never briefly world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="+", help="environment variable names; SSM name = prefix + NAME")
    ap.add_argument("--prefix", default="/bpo-ray/")
    ap.add_argument("--region", default=None)
    ap.add_argument("--endpoint-url", default=None, help="SSM endpoint (tests: a loopback server)")
    ap.add_argument("--out", required=True, help="env file to write (mode 600)")
    args = ap.parse_args(argv)
    for name in args.names:
        if not _ENV_NAME.match(name):
            ap.error(f"{name!r} is not a valid environment variable name")
    values = fetch_parameters(args.names, args.prefix, args.region, args.endpoint_url)
    write_private(Path(os.path.expanduser(args.out)), render_env_file(values))
    missing = [n for n in args.names if n not in values]
    print(f"node_secrets: wrote {len(values)} secret(s) to {args.out}"
          + (f"; not in SSM (skipped): {', '.join(missing)}" if missing else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

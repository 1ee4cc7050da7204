"""The command-line face of a config, shared by every stage's CLI: ``--config`` and ``--set``.

Lives with the configs (not in the ``bpo-ray`` dispatcher, which imports the stage CLIs).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def add_config_args(parser: argparse.ArgumentParser, default: str = "tiny") -> None:
    """``--config`` (path, URI or named config) and repeatable ``--set key.path=value``."""
    parser.add_argument("--config", default=default, help=f"config YAML path/URI or named config (default: {default})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.beta=0.2 (repeatable)")
    parser.add_argument("--address", default=None, metavar="ADDR",
                        help="join this running Ray cluster (host:port, or 'auto': the one `ray start` started "
                             "here); same as --set ray.address=ADDR. Default: RAY_ADDRESS if set, else a fresh "
                             "local Ray instance")


def config_from_args(args: argparse.Namespace, extra: Sequence[str] = ()):
    """Load the config named by ``args`` (see ``add_config_args``); exits with a clear message."""
    from bpo_ray.config import ConfigError, load_config

    address = [f"ray.address={args.address}"] if getattr(args, "address", None) else []
    try:
        return load_config(args.config, list(args.overrides) + address + list(extra))
    except ConfigError as exc:
        print(f"bpo-ray: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

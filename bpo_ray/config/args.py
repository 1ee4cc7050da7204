"""The command-line face of a config, shared by every stage's CLI: ``--config``, ``--set`` and
``--address``, the parser a stage starts from, and how a stage reports a bad input.

Lives with the configs (not in the ``bpo-ray`` dispatcher, which imports the stage CLIs).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def add_config_args(parser: argparse.ArgumentParser, default: str = "tiny", address: bool = True) -> None:
    """``--config`` (path, URI or named config), repeatable ``--set key.path=value`` and (unless
    ``address`` is false: a command that starts its own cluster) ``--address``."""
    parser.add_argument("--config", default=default, help=f"config YAML path/URI or named config (default: {default})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.beta=0.2 (repeatable)")
    if address:
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


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def stage_group(command: str, description: str) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """``bpo-ray <command> <subcommand>``: the parser, and its subcommands for ``stage_parser(...,
    subcommands=)`` (or ``add_parser``); the chosen one's name is ``args.what``."""
    parser = _parser(f"bpo-ray {command}", description)
    return parser, parser.add_subparsers(dest="what", required=True)


def stage_parser(command: str, description: str, pairs_help: str = "", out_help: str = "", *,
                 out_required: bool = True, out_default: Optional[str] = None, config_default: str = "tiny",
                 address: bool = True, subcommands: Optional[argparse._SubParsersAction] = None,
                 help: Optional[str] = None) -> argparse.ArgumentParser:
    """``bpo-ray <command>``'s parser: the config arguments (``add_config_args``: ``config_default``,
    ``address``), plus a required ``--pairs`` and an ``--out`` (required unless ``out_required`` is
    false; then ``out_default``) when their help is given.

    With ``subcommands`` (what ``add_subparsers()`` returned), the parser is the subcommand
    ``command`` of that parser (``help``: its line there); otherwise its ``prog`` is ``bpo-ray <command>``.
    """
    if subcommands is not None:
        parser = subcommands.add_parser(command, help=help, description=description,
                                        formatter_class=argparse.RawDescriptionHelpFormatter)
    else:
        parser = _parser(f"bpo-ray {command}", description)
    add_config_args(parser, config_default, address)
    if pairs_help:
        parser.add_argument("--pairs", required=True, help=pairs_help)
    if out_help:
        parser.add_argument("--out", required=out_required, default=out_default, help=out_help)
    return parser


def stage_error(command: str, exc: BaseException | str) -> int:
    """Report a bad input of ``bpo-ray <command>`` in one line on stderr; the exit status (2)."""
    print(f"bpo-ray {command}: {exc}", file=sys.stderr)
    return 2

"""``bpo-ray <command>``: one entry point for every stage.

Each command lives in its own module exposing ``main(argv) -> int``. ``python -m bpo_ray <command>``
(what ``ray job submit`` runs) and the thin ``jobs/<stage>.py`` shims call the very same function.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("bpo_ray.models.cli", "build tiny HF-format models offline"),
    "world": ("bpo_ray.world.cli", "build the synthetic bias world and its base model"),
    "generate": ("bpo_ray.generate.cli", "bootstrap preference pairs (Ray Data)"),
    "derive": ("bpo_ray.generate.derive", "Li et al. 2024 training sets from the annotation dataset"),
    "reference": ("bpo_ray.train.reference_cli", "add reference log-probs to pairs (Ray Data)"),
    "train": ("bpo_ray.train.cli", "LoRA DPO / SFT with Ray Train + DeepSpeed"),
    "trl-pairs": ("bpo_ray.train.trl_cli", "pairs as a dataset stock TRL DPOTrainer trains on, same tokens"),
    "serve": ("bpo_ray.serving.cli", "serve the model and the judge proxy (Ray Serve)"),
    "evaluate": ("bpo_ray.evaluate.cli", "run benchmarks against a served model"),
    "iterate": ("bpo_ray.iterate", "rounds of on-policy generate -> train (RLAIF-V)"),
    "demo": ("bpo_ray.demo", "every stage end to end on the embedded default"),
    "envcheck": ("bpo_ray.envcheck", "check that the installed stack works"),
}


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "usage: bpo-ray <command> [options]\n\ncommands:\n" + "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"bpo-ray: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name = COMMANDS[name][0]
    pin_numerics_early(rest)
    from bpo_ray.progress import quiet_library_bars

    quiet_library_bars()  # before the stage imports transformers
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            print(f"bpo-ray: command {name!r} is not available in this build ({module_name} is missing)", file=sys.stderr)
            return 2
        raise
    return int(module.main(rest) or 0)


def pin_numerics_early(argv: Sequence[str]) -> None:
    """Pin the config's CPU kernels (``numerics.cpu_isa``) before the stage imports torch.

    The stage parses its config again (and reports a bad one); this pass only needs
    ``--config`` and ``--set`` and stays silent on anything it cannot read.
    """
    from bpo_ray import numerics
    from bpo_ray.config import ConfigError, load_config
    from bpo_ray.config.args import add_config_args

    # No abbreviations: a stage's own flag that starts like one of these ("--add") is not one of them.
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_config_args(parser)
    try:
        args, _ = parser.parse_known_args(list(argv))
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, SystemExit, OSError, ValueError):
        return
    numerics.pin(cfg.numerics.cpu_isa)


if __name__ == "__main__":
    sys.exit(main())

"""Make PyPI's CUDA-linked torchvision importable beside the +cpu torch build (idempotent).

torchvision's C ops do not load beside torch +cpu, and ``_meta_registrations.py`` then fails at
import on ``torch.library.register_fake("torchvision::nms")``. vLLM's LLaVA only needs
torchvision's pure-Python transforms, so registration is skipped when the C ops are absent.
The README's "Stacks" section says why.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

MARK = "# bpo-ray: skip fake registration without C ops"
GUARD = (
    f"{MARK}\n"
    "def _bpo_register_fake(name):\n"
    "    if torchvision.extension._has_ops():\n"
    "        return torch.library.register_fake(name)\n"
    "    return lambda fn: fn\n"
)


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        print("patch_torchvision: torchvision not installed, nothing to do")
        return 0
    path = Path(spec.origin).parent / "_meta_registrations.py"
    text = path.read_text()
    if MARK in text:
        return 0
    if "@torch.library.register_fake(" not in text:
        print(f"patch_torchvision: {path} has no register_fake calls; leaving it alone")
        return 0
    text = text.replace("@torch.library.register_fake(", "@_bpo_register_fake(")
    anchor = "import torchvision.extension  # noqa: F401\n"
    if anchor not in text:
        print(f"patch_torchvision: unexpected layout of {path}", file=sys.stderr)
        return 1
    text = text.replace(anchor, anchor + "\n\n" + GUARD, 1)
    path.write_text(text)
    print(f"patch_torchvision: patched {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

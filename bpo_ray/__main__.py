"""``python -m bpo_ray <command>``: the same entry point as the ``bpo-ray`` console script.

What ``ray job submit`` runs on a cluster whose image has the package installed (no checkout
needed), e.g. ``ray job submit -- python -m bpo_ray train --config llava-1.5-7b ...``.
"""

import sys

from bpo_ray.cli import main

if __name__ == "__main__":
    sys.exit(main())

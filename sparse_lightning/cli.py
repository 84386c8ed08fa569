"""The ``sparse-lightning`` command.

This version only reports its version: ``fit --recipe``, ``recipes`` and ``bench`` arrive with the recipe issue.
The built-in task runs with ``python examples/gradual_magnitude_mnist1d.py`` until then.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from sparse_lightning import __version__

    parser = argparse.ArgumentParser(
        prog="sparse-lightning",
        description="Training-time sparsity for PyTorch Lightning. Recipes and `fit --recipe` are not in this "
        "version yet; see examples/gradual_magnitude_mnist1d.py for the built-in task.",
    )
    parser.add_argument("--version", action="version", version=f"sparse-lightning {__version__}")
    parser.parse_args(argv)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""Run the SparseML importer over every recipe in a SparseML checkout and count what converts.

    git clone https://github.com/neuralmagic/sparseml && python benchmarks/sparseml_corpus.py sparseml

Every ``.yaml``/``.yml``/``.md`` file that names a pruning modifier (``!...PruningModifier``) is converted and the
result loaded as a recipe (what ``import-sparseml`` checks before writing); the script prints how many convert,
each refusal (one line), and the report lines by kind, most frequent first.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

PRUNING = re.compile(r"!(GM|Magnitude|GlobalMagnitude|OBS|MFAC|ACDC|Constant)PruningModifier")


def main() -> None:
    import tempfile

    import yaml

    from sparse_lightning.core.errors import ConfigError
    from sparse_lightning.recipes import load
    from sparse_lightning.recipes.sparseml import convert_sparseml

    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    args = parser.parse_args()
    files = sorted(
        p
        for p in args.root.rglob("*")
        if p.suffix in (".yaml", ".yml", ".md") and p.is_file() and PRUNING.search(p.read_text(errors="ignore"))
    )
    converted, refused, lines = 0, [], Counter()
    for path in files:
        try:
            recipe, problems = convert_sparseml(path)
            with tempfile.TemporaryDirectory() as scratch:
                trial = Path(scratch) / "converted.yaml"
                trial.write_text(yaml.safe_dump(recipe, sort_keys=False))
                load(trial)  # what `import-sparseml` checks before it writes
        except ConfigError as err:
            refused.append(f"{path}: {err}" if str(path) not in str(err) else str(err))
            continue
        converted += 1
        lines.update(re.sub(r"modifiers\[\d+\] ", "", p) for p in problems)
    print(f"{len(files)} files with a pruning modifier: {converted} converted, {len(refused)} refused")
    for line in refused:
        print("  refused:", line)
    for line, count in lines.most_common():
        print(f"  {count:3d} x {line}")


if __name__ == "__main__":
    main()

"""Shared helpers of the benchmarks: statistics and writing one section of docs/benchmarks.md."""

from __future__ import annotations

import statistics
from pathlib import Path

from sparse_lightning.bench import write_doc_section

DOC = Path(__file__).parents[1] / "docs" / "benchmarks.md"

QUIET_TRAINER = {
    "accelerator": "cpu",
    "devices": 1,
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}
"""Trainer settings of every benchmark run: one CPU device, nothing written, nothing printed."""


def mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def write_section(name: str, body: str) -> None:
    """Replace (or append) one section of docs/benchmarks.md (see ``sparse_lightning.bench.write_doc_section``)."""
    write_doc_section(DOC, name, body)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)

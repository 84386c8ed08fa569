"""The benchmark runner behind ``sparse-lightning bench``.

For every seed it trains a dense baseline, Lightning's ``ModelPruning`` (global L1, pruned at epoch ends over the
window of the recipe's first scheduled method, with whole-number amounts that follow the same curve, because its
``amount`` compounds on what is left) at each recipe's final sparsity, and each recipe, all on the same model, data
and Trainer settings, one after another in one process. Each run reports: test accuracy, achieved sparsity (exact
zeros over the Linear/Conv weights), FLOPs of one forward pass relative to dense (``torch.utils.flop_counter``, each
Linear/Conv layer's count scaled by its weight density), bytes of the non-zero parameters, wall time of ``fit``, and
the median step time relative to the dense run of the same seed.
"""

from __future__ import annotations

import csv
import math
import os
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from sparse_lightning.core.plan import MethodPlan, Timeline
from sparse_lightning.core.schedules import sparsity_at
from sparse_lightning.recipes.loader import instantiate


def prunable(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, _ConvNd))]


def modelpruning_callback(
    model: nn.Module, sparsity: float, start_epoch: int, end_epoch: int, curve: str = "cubic"
) -> pl.Callback:
    """Lightning's ``ModelPruning`` (global L1 over Linear/Conv weights) following ``curve`` at epoch ends.

    Its ``amount`` prunes a share of what is left, so each event's amount is a whole number of weights: the
    difference between the cubic targets of consecutive epochs.
    """
    from lightning.pytorch.callbacks import ModelPruning

    targets = [(m, "weight") for m in prunable(model)]
    total = sum(m.weight.numel() for m, _ in targets)

    def count(epoch: int) -> int:
        return round(sparsity_at(epoch, start_epoch, end_epoch, 0.0, sparsity, curve) * total)

    def amount(epoch: int) -> int:
        return max(0, count(epoch + 1) - count(epoch)) if start_epoch <= epoch + 1 <= end_epoch else 0

    return ModelPruning(
        "l1_unstructured",
        parameters_to_prune=targets,
        amount=amount,
        use_global_unstructured=True,
        make_pruning_permanent=True,
        verbose=0,
    )


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter() - self._t0)


def sparse_flops_ratio(model: nn.Module, batch: Any) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = batch[0] if isinstance(batch, (list, tuple)) else batch
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x[:2])
    counts = counter.get_flop_counts()
    total = counter.get_total_flops()
    if not total:
        return 1.0
    saved = 0.0
    root = type(model).__name__
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, _ConvNd)):
            flops = sum(counts.get(f"{root}.{name}", {}).values())
            density = float((module.weight != 0).float().mean())
            saved += flops * (1.0 - density)
    return (total - saved) / total


@dataclass
class BenchRun:
    name: str
    seed: int
    sparsity_target: float
    test_acc: float = math.nan
    achieved: float = 0.0
    flops_ratio: float = 1.0
    nonzero_param_bytes: int = 0
    wall_s: float = 0.0
    median_step_s: float = 0.0
    step_ratio: float = math.nan
    extra: dict[str, Any] = field(default_factory=dict)


def epoch_steps(data_spec: dict[str, Any], trainer_settings: dict[str, Any]) -> int:
    """Optimizer steps in one epoch of ``data_spec``'s training loader on one device, under the Trainer settings'
    ``limit_train_batches`` and ``accumulate_grad_batches``."""
    data = instantiate(data_spec, "data")
    data.setup("fit")
    batches = len(data.train_dataloader())
    limit = trainer_settings.get("limit_train_batches")
    if isinstance(limit, int) and not isinstance(limit, bool):
        batches = min(batches, limit)
    elif isinstance(limit, float):
        batches = int(batches * limit)
    return max(1, math.ceil(batches / int(trainer_settings.get("accumulate_grad_batches", 1))))


def recipe_plans(callbacks: Sequence[pl.Callback], model: nn.Module, timeline: Timeline) -> list[MethodPlan]:
    """The plans of a recipe's methods on ``model`` over ``timeline`` (what training will do)."""
    from sparse_lightning.callbacks.base import MethodCallback

    return [cb.plan(model, timeline) for cb in callbacks if isinstance(cb, MethodCallback)]


def plans_target(plans: Sequence[MethodPlan]) -> float:
    """The final targets weighted by the values each method selects (as ``sparsity/target`` is logged)."""
    weighted = [(p.target, p.num_selected) for p in plans if p.target is not None]
    total = sum(n for _, n in weighted)
    return sum(t * n for t, n in weighted) / total if total else 0.0


def window_epochs(plans: Sequence[MethodPlan], epochs: int, steps_per_epoch: int) -> tuple[int, int]:
    """First and last epoch with an event of the first plan that has events (``ModelPruning``'s window)."""
    for plan in plans:
        if plan.events:
            start = round(plan.events[0].step / steps_per_epoch)
            end = round(plan.events[-1].step / steps_per_epoch)
            return start, min(epochs, max(end, start + 1))
    return 0, max(1, epochs - 1)


def run_bench(
    recipe_paths: Sequence[str],
    seeds: int = 3,
    epochs: int | None = None,
    model: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    trainer_args: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[BenchRun]:
    from tqdm import tqdm

    from sparse_lightning.recipes import load

    loaded = [load(p) for p in recipe_paths]
    model_spec = model or (loaded[0].recipe.model.model_dump() if loaded and loaded[0].recipe.model else None)
    data_spec = data or (loaded[0].recipe.data.model_dump() if loaded and loaded[0].recipe.data else None)
    if epochs is None:
        epochs = int(loaded[0].recipe.trainer.get("max_epochs", 10)) if loaded else 10
    batches = epoch_steps(data_spec, trainer_args or {})
    timeline = Timeline(float(epochs * batches), float(batches))
    plans = {rec.path: recipe_plans(rec.callbacks, instantiate(model_spec, "model"), timeline) for rec in loaded}
    targets = sorted({plans_target(p) for p in plans.values()})
    first = plans[loaded[0].path] if loaded else []
    plan: list[tuple[str, int, float, Any]] = []
    for seed in range(seeds):
        plan.append(("dense", seed, 0.0, None))
        plan += [(f"ModelPruning {t:.0%}", seed, t, ("modelpruning", t)) for t in targets]
        plan += [(rec.recipe.name, seed, plans_target(plans[rec.path]), ("recipe", rec.path)) for rec in loaded]
    runs: list[BenchRun] = []
    dense_step: dict[int, float] = {}
    for name, seed, target, how in tqdm(plan, desc="bench", disable=not progress, unit="run"):
        pl.seed_everything(seed, verbose=False)
        lit_model = instantiate(model_spec, "model")
        datamodule = instantiate(data_spec, "data")
        callbacks: list[pl.Callback] = []
        if how is not None and how[0] == "recipe":
            callbacks = load(how[1]).callbacks
        if how is not None and how[0] == "modelpruning":
            start_ep, end_ep = window_epochs(first, epochs, max(1, batches))
            callbacks = [modelpruning_callback(lit_model, how[1], start_ep, end_ep)]
        timer = StepTimer()
        trainer = pl.Trainer(
            max_epochs=epochs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[*callbacks, timer],
            **(trainer_args or {}),
        )
        began = time.perf_counter()
        trainer.fit(lit_model, datamodule=datamodule)
        wall = time.perf_counter() - began
        results = trainer.test(lit_model, datamodule=datamodule, verbose=False)[0]
        acc_keys = [k for k in results if k.endswith("acc")]
        layers = prunable(lit_model)
        zeros = sum(int((m.weight == 0).sum()) for m in layers)
        total = sum(m.weight.numel() for m in layers)
        batch = next(iter(datamodule.test_dataloader()))
        run = BenchRun(
            name=name,
            seed=seed,
            sparsity_target=target,
            test_acc=100 * float(results[acc_keys[0]]) if acc_keys else math.nan,
            achieved=zeros / total if total else 0.0,
            flops_ratio=sparse_flops_ratio(lit_model, batch),
            nonzero_param_bytes=sum(int((p != 0).sum()) * p.element_size() for p in lit_model.parameters()),
            wall_s=wall,
            median_step_s=statistics.median(timer.times[len(timer.times) // 10 :] or [math.nan]),
        )
        if name == "dense":
            dense_step[seed] = run.median_step_s
        run.step_ratio = run.median_step_s / dense_step[seed]
        runs.append(run)
    return runs


COLUMNS = [
    "name",
    "seed",
    "sparsity_target",
    "test_acc",
    "achieved",
    "flops_ratio",
    "nonzero_param_bytes",
    "wall_s",
    "median_step_s",
    "step_ratio",
]


def plot_runs(runs: Sequence[BenchRun], path: Path) -> Path:
    """Test accuracy against achieved sparsity: ModelPruning as one line over its targets, each recipe its own
    point (seed spread as error bars), dense as a band."""
    from sparse_lightning.plots import plot_accuracy_vs_sparsity

    series: dict[str, list[tuple[float, float, float]]] = {}
    for r in runs:
        if r.name != "dense":
            key = "ModelPruning" if r.name.startswith("ModelPruning ") else r.name
            series.setdefault(key, []).append((r.sparsity_target, r.achieved, r.test_acc))
    dense = [r.test_acc for r in runs if r.name == "dense"]
    return plot_accuracy_vs_sparsity(series, dense, path, title="sparse-lightning bench")


def write_results(
    runs: Sequence[BenchRun], out_dir: Path, command: str, doc_dir: Path | None = None
) -> tuple[Path, Path, str]:
    """``bench.csv``, ``bench.png`` and ``bench.md`` in ``out_dir``; the Markdown links the picture relative to
    ``doc_dir`` (default: ``out_dir``), where it will be read."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "bench.csv", out_dir / "bench.md"
    png_path = plot_runs(runs, out_dir / "bench.png")
    link = os.path.relpath(png_path, doc_dir or out_dir)
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for r in runs:
            writer.writerow([getattr(r, c) for c in COLUMNS])
    names = list(dict.fromkeys(r.name for r in runs))
    lines = [
        "## `sparse-lightning bench`",
        "",
        f"`{command}` (raw rows: `{csv_path}`). Mean ± standard deviation over seeds; step-time ratio against the",
        "dense run of the same seed, measured in the same invocation.",
        "",
        f"![test accuracy against achieved sparsity]({link})",
        "",
        "| run | target | test accuracy (%) | achieved sparsity | FLOPs ratio | non-zero param KiB | wall (s) | "
        "step-time ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def ms(values: list[float], fmt: str = "{:.1f}") -> str:
        if len(values) == 1:
            return fmt.format(values[0])
        return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"

    for name in names:
        rs = [r for r in runs if r.name == name]
        lines.append(
            f"| {name} | {rs[0].sparsity_target:.0%} | {ms([r.test_acc for r in rs])} | "
            f"{statistics.mean(r.achieved for r in rs):.4f} | {statistics.mean(r.flops_ratio for r in rs):.3f} | "
            f"{statistics.mean(r.nonzero_param_bytes for r in rs) / 1024:.1f} | {ms([r.wall_s for r in rs])} | "
            f"{statistics.median(r.step_ratio for r in rs):.3f} |"
        )
    text = "\n".join(lines) + "\n"
    md_path.write_text(text)
    return csv_path, md_path, text


def log_to_wandb(runs: Sequence[BenchRun], png_path: Path, command: str) -> str:
    """One W&B run (job type ``bench``; offline without a login) with the table of runs and the picture."""
    import wandb

    from sparse_lightning.cli import wandb_logged_in

    mode = "online" if wandb_logged_in() and os.environ.get("WANDB_MODE") != "offline" else "offline"
    run = wandb.init(project="sparse-lightning", job_type="bench", mode=mode, config={"command": command})
    table = wandb.Table(columns=COLUMNS, data=[[getattr(r, c) for c in COLUMNS] for r in runs])
    run.log({"bench/runs": table, "bench/accuracy_vs_sparsity": wandb.Image(str(png_path))})
    run_dir = str(Path(run.dir).parent)
    run.finish()
    return run_dir


def write_doc_section(doc: Path, name: str, body: str) -> None:
    """Replace (or append) the part of ``doc`` between ``<!-- name:start -->`` and ``<!-- name:end -->``."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = f"<!-- {name}:start -->\n{body.strip()}\n<!-- {name}:end -->"
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)

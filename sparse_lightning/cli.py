"""The ``sparse-lightning`` command.

    sparse-lightning fit --recipe recipes/gmp-90-global.yaml [--var sparsity=0.95] [--log-model] [LightningCLI flags]
    sparse-lightning validate|test --recipe FILE --ckpt_path CKPT
    sparse-lightning recipes list | show NAME | validate FILE [--model CLASS_PATH]
    sparse-lightning recipes import-sparseml SPARSEML.yaml [-o OUT.yaml] [--prefix net.]
    sparse-lightning bench --recipes A.yaml B.yaml --seeds 3   # beside dense and ModelPruning baselines
    sparse-lightning export CKPT [--compact] -o OUT [--model CLASS_PATH] [--input-shape 1,40]

``fit``/``validate``/``test`` run on ``LightningCLI``, so every Trainer, model and data flag works; the recipe gives
the callbacks and the default model, data and Trainer settings, which flags override. The run logs to Weights &
Biases unless ``--trainer.logger`` says otherwise (offline when no W&B login is found). A user error prints one line
and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sparse_lightning.core.errors import ConfigError

TRAIN_COMMANDS = ("fit", "validate", "test")


def _fail(message: str) -> int:
    print(f"sparse-lightning: error: {message}", file=sys.stderr)
    return 2


def _parse_vars(items: Sequence[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--var takes NAME=VALUE, got {item!r}.")
        out[name] = yaml.safe_load(value)
    return out


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def default_logger(run_name: str) -> dict[str, Any]:
    """W&B: online when logged in, otherwise offline with a hint about ``wandb sync``."""
    offline = os.environ.get("WANDB_MODE") in ("offline", "disabled") or not wandb_logged_in()
    if offline and os.environ.get("WANDB_MODE") != "disabled":
        print(
            "W&B: no login found, logging offline under ./wandb; upload later with `wandb sync wandb/offline-run-*`.",
            file=sys.stderr,
        )
    init_args = {"project": "sparse-lightning", "name": run_name, "offline": offline, "save_dir": "."}
    return {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": init_args}


TRAINING_HELP = """usage: sparse-lightning {command} --recipe FILE [--var NAME=VALUE ...] [--log-model] [flags]

Run `{command}` with a recipe's methods, model, data and Trainer settings; flags override the recipe. A run's saved
config.yaml repeats it without the recipe: `sparse-lightning {command} --config config.yaml`.

recipe options:
  --recipe FILE       a recipe file, or the name of a shipped one (`sparse-lightning recipes list`)
  --var NAME=VALUE    set one of the recipe's variables (repeat for several){variables}
  --log-model         at the end of fit, log the final sparse checkpoint to W&B as a `model` artifact

The run logs to W&B (offline when no login is found) unless --trainer.logger says otherwise. The LightningCLI
flags follow (--trainer.*, --model, --data, --ckpt_path, ...)."""


def _one_line(message: str) -> str:
    """A jsonargparse or Lightning message (often many indented lines) as one line: the flag, the value given and
    why it was refused."""
    lines = [line.strip(" -") for line in message.strip().splitlines() if line.strip(" -")]
    key = re.search(r'Parser key "([^"]+)"', message)
    if key is None:
        return " ".join(lines)[:400]
    given = re.search(r"Given value: (.*)", message)
    reasons = []
    for i, line in enumerate(lines):
        if line.startswith("Problem with given class_path") and i + 1 < len(lines):
            reasons.append(f"{line.rstrip(':')}: {lines[i + 1]}")
        elif line.startswith("Expected a ") and "NoneType" not in line and not line.startswith("Expected a path"):
            reasons.append(line.replace("<class '", "").replace("'>", ""))
        elif line.startswith(("Unrecognized", "Key ", "Not a valid", "Import path")):
            reasons.append(line)
    flag = f"--{key.group(1)}" + (f"={given.group(1)}" if given else "")
    return f"{flag}: {'; '.join(dict.fromkeys(reasons)) or ' '.join(lines[1:3])}"[:400]


def run_training(command: str, argv: Sequence[str]) -> int:
    pre = argparse.ArgumentParser(prog=f"sparse-lightning {command}", add_help=False)
    pre.add_argument("--recipe")
    pre.add_argument("--var", action="append", default=[])
    pre.add_argument("--log-model", action="store_true")
    known, rest = pre.parse_known_args(argv)
    from jsonargparse import ArgumentError
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.loggers import WandbLogger

    from sparse_lightning.recipes import load

    wants_help = any(a in ("-h", "--help") for a in rest)
    from_config = any(a in ("-c", "--config") or a.startswith("--config=") for a in rest)
    if known.recipe is None and not wants_help and not from_config:
        raise ConfigError(f"`sparse-lightning {command}` needs --recipe FILE (`sparse-lightning {command} --help`).")
    loaded = load(known.recipe, **_parse_vars(known.var)) if known.recipe else None
    if wants_help:
        variables = ""
        if loaded is not None and loaded.recipe.variables:
            pairs = ", ".join(f"{k}={v!r}" for k, v in loaded.recipe.variables.items())
            variables = f"\n                      {loaded.path.name} defines: {pairs}"
        print(TRAINING_HELP.format(command=command, variables=variables) + "\n")
    args = [command]
    flags = {a.split("=")[0] for a in rest}
    trainer_defaults: dict[str, Any] = {}
    if loaded is not None:
        recipe = loaded.recipe
        if recipe.model is not None and "--model" not in flags:
            args += ["--model", json.dumps(recipe.model.model_dump())]
        if recipe.data is not None and "--data" not in flags:
            args += ["--data", json.dumps(recipe.data.model_dump())]
        # as flags, not defaults: the parser checks their types, and the saved config.yaml reproduces the run
        args += [f"--trainer.{key}={json.dumps(value)}" for key, value in recipe.trainer.items()]
        args += ["--trainer.callbacks", json.dumps(loaded.specs)]
        if "--trainer.logger" not in flags and not wants_help:
            trainer_defaults["logger"] = default_logger(recipe.name)
        elif known.log_model and "wandb" not in " ".join(a for a in rest if "logger" in a).lower():
            raise ConfigError("--log-model needs the W&B logger, but --trainer.logger replaces it.")
    args += list(rest)

    class RecipeCLI(LightningCLI):
        def _log_recipe(self) -> None:
            if loaded is None:
                return
            for logger in self.trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.experiment.config.update({"recipe": loaded.resolved}, allow_val_change=True)
                else:
                    logger.log_hyperparams({"recipe": json.dumps(loaded.resolved)})

        before_fit = before_validate = before_test = _log_recipe

        def instantiate_trainer(self, **kwargs: Any) -> Any:
            try:
                return super().instantiate_trainer(**kwargs)
            except (TypeError, ValueError, MisconfigurationException) as err:  # a flag Lightning refuses
                raise ConfigError(f"Trainer: {_one_line(str(err))}") from None

        def after_fit(self) -> None:
            if known.log_model:
                log_model_artifact(self.trainer, loaded.recipe.name if loaded else "config")
            print_fit_summary(self.trainer, self.datamodule, loaded)

    try:
        with warnings.catch_warnings():
            # sys.argv stays as given, so DDP's launcher starts the other ranks with the same command
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            RecipeCLI(
                LightningModule,
                LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                args=args,
                trainer_defaults=trainer_defaults,
                save_config_kwargs={"overwrite": True},
                parser_kwargs={"exit_on_error": False},
            )
    except SystemExit as done:  # --help
        return int(done.code or 0)
    except ArgumentError as err:
        raise ConfigError(_one_line(str(err))) from None
    except MisconfigurationException as err:
        raise ConfigError(_one_line(str(err))) from None
    return 0


def print_fit_summary(trainer: Any, datamodule: Any, loaded: Any) -> None:
    """What the run bought, at a glance: test accuracy, sparsity per layer, non-zero parameters and bytes, the
    recipe's dense reference, where the checkpoint and the W&B run are."""
    from lightning.pytorch.loggers import WandbLogger
    from lightning.pytorch.utilities.model_helpers import is_overridden

    from sparse_lightning.callbacks.channels import ChannelMethod
    from sparse_lightning.callbacks.monitor import weight_sparsities
    from sparse_lightning.core.masks import masks_of

    model = trainer.lightning_module
    results = {}
    if datamodule is not None and is_overridden("test_dataloader", datamodule):
        results = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    if not trainer.is_global_zero:
        return
    params = dict(model.named_parameters())
    masks = masks_of(model)
    global_sparsity, per_layer = weight_sparsities(params, masks)
    nonzero = sum(int((p != 0).sum()) for p in params.values())
    total = sum(p.numel() for p in params.values())
    nonzero_bytes = sum(int((p != 0).sum()) * p.element_size() for p in params.values())
    lines = ["", f"== {loaded.recipe.name}: {loaded.recipe.description}" if loaded else "== run summary"]
    references = loaded.recipe.reference if loaded else {}
    for key, value in results.items():
        reference = references.get(key)
        source = references.get("source", "")
        extra = f"   (dense reference {reference:.4f}: {source})" if isinstance(reference, float) else ""
        lines.append(f"   {key:<22s} {value:.4f}{extra}")
    lines.append(f"   {'sparsity (masked)':<22s} {global_sparsity:.4f} over {len(masks)} parameter(s)")
    for name, value in per_layer.items():
        lines.append(f"     {name:<38s} {tuple(params[name].shape)!s:>16s}  {value:.4f}")
    for callback in trainer.callbacks:
        if isinstance(callback, ChannelMethod) and callback.groups:
            kept = ", ".join(f"{g.name} {int(callback.keeps[g.name].sum())}/{g.channels}" for g in callback.groups)
            lines.append(
                f"   {callback.cost + ' removed':<22s} {callback.removed_fraction:.4f} (channels kept: {kept})"
            )
            if not callback.compact_during_fit:
                lines.append(f"   {'':<22s} remove them: sparse-lightning export CKPT --compact -o OUT")
    size = f"{nonzero_bytes / 2**10:,.1f} KiB"
    lines.append(f"   {'non-zero parameters':<22s} {nonzero:,} of {total:,} ({size} of non-zero values)")
    checkpoint = trainer.checkpoint_callback
    path = (checkpoint.last_model_path or checkpoint.best_model_path) if checkpoint is not None else ""
    lines.append(f"   {'checkpoint':<22s} {path or 'none (checkpointing is off)'}")
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            run_dir = Path(logger.experiment.dir).parent
            hint = f"   upload: wandb sync {run_dir}" if logger.experiment.offline else ""
            lines.append(f"   {'W&B run':<22s} {run_dir}{hint}")
    print("\n".join(lines))


def log_model_artifact(trainer: Any, recipe_name: str) -> None:
    """Save the final sparse checkpoint and log it to W&B as a ``model`` artifact (also offline, for ``wandb sync``)."""
    from lightning.pytorch.loggers import WandbLogger

    from sparse_lightning.callbacks.monitor import weight_sparsities
    from sparse_lightning.core.masks import masks_of

    loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
    if not loggers:
        raise ConfigError("--log-model needs the W&B logger (the default); --trainer.logger replaced it.")
    import wandb

    run = loggers[0].experiment
    path = Path(run.dir) / "final-sparse.ckpt"
    trainer.save_checkpoint(path)
    masks = masks_of(trainer.lightning_module)
    sparsity, _ = weight_sparsities(dict(trainer.lightning_module.named_parameters()), masks)
    artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata={"recipe": recipe_name, "sparsity": sparsity})
    artifact.add_file(str(path))
    run.log_artifact(artifact, aliases=["final", "latest"])


def recipes_command(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="sparse-lightning recipes", description="Inspect recipes.")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="the shipped recipes")
    show = sub.add_parser("show", help="print a recipe")
    show.add_argument("name")
    check = sub.add_parser("validate", help="check a recipe against a model without training")
    check.add_argument("file")
    check.add_argument("--model", help="class path of a LightningModule (default: the recipe's model)")
    check.add_argument("--var", action="append", default=[])
    check.add_argument(
        "--total-steps", type=int, help="optimizer steps of the run (default: the recipe's max_epochs or max_steps)"
    )
    check.add_argument(
        "--steps-per-epoch", type=int, help="optimizer steps per epoch (default: from the recipe's data, one device)"
    )
    imp = sub.add_parser("import-sparseml", help="convert a SparseML recipe; prints what it can not convert")
    imp.add_argument("file")
    imp.add_argument("-o", "--output", help="write the recipe here (default: standard output)")
    imp.add_argument("--prefix", default="", help="prepended to parameter names, e.g. 'net.' for a wrapped model")
    args = parser.parse_args(argv)
    if args.action == "import-sparseml":
        return import_sparseml(args.file, args.output, args.prefix)
    from sparse_lightning.recipes import find_recipe, load, shipped_recipes

    if args.action == "list":
        rows = []
        for path in shipped_recipes():
            r = load(path).recipe
            methods = ", ".join(m.method for s in r.stages for m in s.methods)
            targets = [m.args.get("sparsity") for s in r.stages for m in s.methods if "sparsity" in m.args]
            rows.append((r.name, methods, f"{targets[-1]:.0%}" if targets else "-", r.description))
        header = ("name", "method", "target", "description")
        width = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
        for row in [header, *rows]:
            print("  ".join(c.ljust(w) for c, w in zip(row[:3], width, strict=True)) + "  " + row[3])
        return 0
    if args.action == "show":
        print(find_recipe(args.name).read_text(), end="")
        return 0
    return validate_recipe(args.file, args.model, _parse_vars(args.var), args.total_steps, args.steps_per_epoch)


def import_sparseml(file: str, output: str | None, prefix: str) -> int:
    """Convert, validate the result as a recipe (in a scratch file), and only then print or write it."""
    import tempfile

    import yaml

    from sparse_lightning.recipes import load
    from sparse_lightning.recipes.sparseml import convert_sparseml

    recipe, problems = convert_sparseml(file, prefix)
    text = yaml.safe_dump(recipe, sort_keys=False)
    with tempfile.TemporaryDirectory() as scratch:
        trial = Path(scratch) / f"{Path(file).stem}.yaml"
        trial.write_text(text)
        try:
            load(trial)
        except ConfigError as err:
            message = str(err).replace(str(trial), "the converted recipe")
            raise ConfigError(f"{file}: {message}") from None
    for problem in problems:
        print(f"{file}: {problem}", file=sys.stderr)
    if output is None:
        print(text, end="")
        return 0
    Path(output).write_text(text)
    print(f"wrote {output} ({len(recipe['stages'])} stage(s); {len(problems)} item(s) not converted)", file=sys.stderr)
    return 0


def recipe_timeline(loaded: Any, total_steps: int | None, steps_per_epoch: int | None) -> Any:
    """The run a recipe describes, on one device: steps per epoch from its data (and the trainer's
    ``limit_train_batches`` / ``accumulate_grad_batches``), total steps from ``max_steps`` or ``max_epochs``."""
    from sparse_lightning.bench import epoch_steps
    from sparse_lightning.core.plan import Timeline

    trainer = loaded.recipe.trainer
    for name, value in (("--total-steps", total_steps), ("--steps-per-epoch", steps_per_epoch)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}.")
    if steps_per_epoch is None and loaded.recipe.data is None:
        print("the recipe names no data: assuming 100 steps per epoch (set --steps-per-epoch)", file=sys.stderr)
        steps_per_epoch = 100
    if steps_per_epoch is None:
        steps_per_epoch = epoch_steps(loaded.recipe.data.model_dump(), trainer)
    if total_steps is None:
        max_steps = trainer.get("max_steps") or -1
        total_steps = max_steps if max_steps > 0 else int(trainer.get("max_epochs") or 1000) * steps_per_epoch
    return Timeline(float(total_steps), float(steps_per_epoch))


def validate_recipe(
    file: str, model_path: str | None, variables: dict, total_steps: int | None, steps_per_epoch: int | None
) -> int:
    """Print each method's plan (selection, events, memory) without training; errors are those ``fit`` gives."""
    from sparse_lightning.callbacks.base import MethodCallback
    from sparse_lightning.core.targets import naming_hint
    from sparse_lightning.recipes import load
    from sparse_lightning.recipes.loader import instantiate

    loaded = load(file, **variables)
    spec = {"class_path": model_path, "init_args": {}} if model_path else loaded.recipe.model
    spec = spec if spec is None or isinstance(spec, dict) else spec.model_dump()
    model = instantiate(spec, "model")
    timeline = recipe_timeline(loaded, total_steps, steps_per_epoch)
    print(f"{loaded.path}: {loaded.recipe.name} ({len(loaded.callbacks)} method(s)) on {spec['class_path']}")
    print(f"plan for {int(timeline.total_steps)} optimizer steps, {int(timeline.steps_per_epoch)} per epoch")
    for i, callback in enumerate(loaded.callbacks):
        if not isinstance(callback, MethodCallback):
            continue
        try:
            plan = callback.plan(model, timeline)
        except ConfigError as err:
            patterns = [p for c in loaded.callbacks for p in (getattr(c, "include", None) or [])]
            hint = naming_hint(patterns, [n for n, _ in model.named_parameters()])
            message = f"{loaded.path}: method {i} ({type(callback).__name__}): {err}"
            raise ConfigError(f"{message} {hint}".rstrip()) from None
        print(f"\n[{i}] {plan.summary()}")
    return 0


def bench_command(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="sparse-lightning bench",
        description="Train recipes beside dense and ModelPruning baselines; write a Markdown and CSV table.",
    )
    parser.add_argument("--recipes", nargs="+", required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, help="default: the first recipe's trainer.max_epochs")
    parser.add_argument("--model", help="class path of a LightningModule (default: the first recipe's model)")
    parser.add_argument("--data", help="class path of a LightningDataModule (default: the first recipe's data)")
    parser.add_argument("--limit-train-batches", type=int)
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--docs", default="docs/benchmarks.md", help="Markdown file whose `bench` section is rewritten")
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--wandb", action="store_true", help="also log the table and the picture to a W&B run")
    args = parser.parse_args(argv)
    if args.seeds < 1 or (args.epochs is not None and args.epochs < 1):
        raise ConfigError("--seeds and --epochs must be at least 1.")
    from sparse_lightning.bench import log_to_wandb, run_bench, write_doc_section, write_results

    trainer_args = {"limit_train_batches": args.limit_train_batches} if args.limit_train_batches else {}
    runs = run_bench(
        args.recipes,
        args.seeds,
        args.epochs,
        {"class_path": args.model} if args.model else None,
        {"class_path": args.data} if args.data else None,
        trainer_args,
    )
    command = "sparse-lightning bench " + " ".join(argv)
    doc_dir = None if args.no_docs else Path(args.docs).parent
    csv_path, md_path, text = write_results(runs, Path(args.out_dir), command, doc_dir)
    print(text)
    if not args.no_docs:
        write_doc_section(Path(args.docs), "bench", text)
    print(
        f"wrote {csv_path}, {md_path} and bench.png" + ("" if args.no_docs else f"; updated {args.docs}"),
        file=sys.stderr,
    )
    if args.wandb:
        print(f"W&B: {log_to_wandb(runs, Path(args.out_dir) / 'bench.png', command)}", file=sys.stderr)
    return 0


def export_command(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="sparse-lightning export",
        description="Write a checkpoint's model with its masks applied (and, with --compact, masked channels removed) "
        "as a torch.export program (.pt2), or a pickled module when it does not export, plus a JSON report.",
    )
    parser.add_argument("checkpoint")
    parser.add_argument("-o", "--output", required=True, help="output path; the suffix becomes .pt2 (or .pt)")
    parser.add_argument("--compact", action="store_true", help="remove masked channels physically")
    parser.add_argument("--model", help="class path of the LightningModule (default: from config.yaml of the run)")
    parser.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224 (default: example_input_array)")
    args = parser.parse_args(argv)
    shape = None
    if args.input_shape:
        try:
            shape = tuple(int(d) for d in args.input_shape.split(","))
        except ValueError:
            raise ConfigError(f"--input-shape must be comma-separated ints, got {args.input_shape!r}.") from None
    from sparse_lightning.export import export_model

    try:
        report = export_model(args.checkpoint, args.output, args.model, args.compact, shape)
    except ValueError as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(_one_line(str(err))) from None
    if report["format"] != "torch.export":
        print(f"torch.export failed ({report['export_error']}); wrote a pickled module instead.", file=sys.stderr)
    print(
        f"wrote {report['file']} ({report['format']}) and {report['report']}: parameters "
        f"{report['params_before']:,} -> {report['params_after']:,}, FLOPs {report['flops_before']:,} -> "
        f"{report['flops_after']:,}"
        + (f", max |masked - compacted| {report['max_abs_diff']:.2e}" if args.compact else "")
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from sparse_lightning import __version__

    argv = list(sys.argv[1:] if argv is None else argv)
    usage = (
        "usage: sparse-lightning {fit,validate,test} --recipe FILE [--var NAME=VALUE] [LightningCLI flags]\n"
        "       sparse-lightning recipes {list,show,validate,import-sparseml} ...\n"
        "       sparse-lightning bench --recipes FILE [FILE ...] [--seeds 3] [--epochs N]\n"
        "       sparse-lightning export CKPT [--compact] -o OUT [--model CLASS_PATH] [--input-shape 1,40]\n"
        "       sparse-lightning --version"
    )
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"sparse-lightning {__version__}")
        return 0
    try:
        if argv[0] in TRAIN_COMMANDS:
            return run_training(argv[0], argv[1:])
        if argv[0] == "recipes":
            return recipes_command(argv[1:])
        if argv[0] == "bench":
            return bench_command(argv[1:])
        if argv[0] == "export":
            return export_command(argv[1:])
    except ConfigError as err:
        return _fail(str(err))
    return _fail(f"unknown command {argv[0]!r}.\n{usage}")


if __name__ == "__main__":
    sys.exit(main())

"""Reading a recipe: safe YAML, variables, validation, and the configured callbacks.

Every problem raises :class:`RecipeError` naming the file, the field path (``stages[0].methods[1].args``) and what is
allowed, before any training starts.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml
from pydantic import ValidationError

from sparse_lightning.callbacks.base import MethodCallback
from sparse_lightning.callbacks.registry import METHODS
from sparse_lightning.core.errors import ConfigError
from sparse_lightning.core.schedules import parse_time
from sparse_lightning.recipes.schema import Recipe

ZOO = Path(__file__).parent / "zoo"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class RecipeError(ConfigError):
    """A recipe that can not be used: ``file: field: what is wrong``."""

    def __init__(self, file: str | Path, field: str, message: str) -> None:
        self.file, self.field = str(file), field
        super().__init__(f"{file}: {field + ': ' if field else ''}{message}")


@dataclass
class LoadedRecipe:
    path: Path
    recipe: Recipe
    resolved: dict[str, Any]
    callbacks: list[pl.Callback]
    specs: list[dict[str, Any]]
    """``{"class_path", "init_args"}`` of each callback, as LightningCLI configs name them (the saved config)."""


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file by path, or a shipped recipe by name (``gmp-90`` finds ``recipes/gmp-90.yaml``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = ZOO / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(p.stem for p in shipped_recipes())
    raise RecipeError(name_or_path, "", f"no such file, and no shipped recipe of that name. Shipped: {names}.")


def shipped_recipes() -> list[Path]:
    return sorted(ZOO.glob("*.yaml"))


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as err:
        raise RecipeError(path, "", f"can not be read: {err.strerror}.") from None
    try:
        return yaml.safe_load(text)
    except yaml.constructor.ConstructorError as err:
        line = err.problem_mark.line + 1 if err.problem_mark else "?"
        raise RecipeError(
            f"{path}:{line}",
            "",
            f"{err.problem}. Tags such as !!python/... are refused: recipes can only name "
            f"registered methods ({', '.join(sorted(METHODS))}).",
        ) from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise RecipeError(where, "", f"YAML syntax error: {err.problem}.") from None


def substitute(value: Any, variables: Mapping[str, Any], path: Path, field: str) -> Any:
    """Replace ``${name}``: a whole-string reference keeps the variable's type, others are interpolated."""
    if isinstance(value, dict):
        return {k: substitute(v, variables, path, f"{field}.{k}" if field else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, variables, path, f"{field}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value
    for name in _VAR.findall(value):
        if name not in variables:
            known = ", ".join(sorted(variables)) or "none"
            raise RecipeError(path, field, f"undefined variable ${{{name}}}. Defined variables: {known}.")
    whole = _VAR.fullmatch(value)
    if whole:
        return variables[whole.group(1)]
    return _VAR.sub(lambda m: str(variables[m.group(1)]), value)


def _field_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def load(path_or_name: str | Path, **overrides: Any) -> LoadedRecipe:
    """Read, substitute, validate and build a recipe; see :func:`load_recipe`."""
    path = find_recipe(path_or_name)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise RecipeError(path, "", "a recipe is a mapping with `name`, `description` and `stages`.")
    variables = raw.get("variables") or {}
    if not isinstance(variables, dict):
        raise RecipeError(path, "variables", "must be a mapping of names to values.")
    unknown = sorted(set(overrides) - set(variables))
    if unknown:
        known = ", ".join(sorted(variables)) or "none"
        raise RecipeError(path, "variables", f"no variable named {', '.join(unknown)} to override. Defined: {known}.")
    variables = {**variables, **overrides}
    resolved = {k: v if k == "variables" else substitute(v, variables, path, k) for k, v in raw.items()}
    resolved["variables"] = variables
    try:
        recipe = Recipe.model_validate(resolved)
    except ValidationError as err:
        errors = err.errors()
        first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        field = _field_path(first["loc"])
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            parent = first["loc"][:-1]
            allowed = _allowed_keys(parent)
            message = f"unknown key. Allowed keys here: {', '.join(allowed)}."
        elif first["type"] == "missing":
            message = "this key is required."
        raise RecipeError(path, field, message) from None
    check_trainer(recipe.trainer, path)
    callbacks, specs = build_callbacks(recipe, path)
    return LoadedRecipe(path, recipe, resolved, callbacks, specs)


_TRAINER_COUNTS = {
    "max_epochs": -1,
    "min_epochs": 0,
    "max_steps": -1,
    "min_steps": 0,
    "accumulate_grad_batches": 1,
    "log_every_n_steps": 1,
    "check_val_every_n_epoch": 1,
    "num_nodes": 1,
}


def check_trainer(trainer: Mapping[str, Any], path: Path) -> None:
    """The recipe's ``trainer`` defaults: names of ``Trainer`` arguments, and counts that are ints in range."""
    allowed = [p for p in inspect.signature(pl.Trainer.__init__).parameters if p != "self"]
    for key, value in trainer.items():
        if key not in allowed:
            raise RecipeError(path, f"trainer.{key}", "not an argument of lightning.pytorch.Trainer.")
        if key in ("callbacks", "logger", "plugins", "strategy") and not isinstance(value, (str, bool)):
            raise RecipeError(path, f"trainer.{key}", "set it on the command line (`--trainer.{key}`).")
        low = _TRAINER_COUNTS.get(key)
        if low is not None and value is not None:
            if isinstance(value, bool) or not isinstance(value, int):
                raise RecipeError(path, f"trainer.{key}", f"must be an int >= {low}, got {value!r}.")
            if value < low:
                raise RecipeError(path, f"trainer.{key}", f"must be an int >= {low}, got {value}.")


def _allowed_keys(parent: tuple[Any, ...]) -> list[str]:
    from sparse_lightning.recipes.schema import ClassSpec, MethodSpec, Stage

    names = [p for p in parent if isinstance(p, str)]
    model = Recipe
    if names[-1:] == ["stages"] or (names and names[-1] == "stages"):
        model = Stage
    if "methods" in names:
        model = MethodSpec
    elif names and names[-1] in ("model", "data"):
        model = ClassSpec
    return list(model.model_fields)


def build_callbacks(recipe: Recipe, path: Path) -> tuple[list[pl.Callback], list[dict[str, Any]]]:
    callbacks: list[pl.Callback] = []
    specs: list[dict[str, Any]] = []
    windows: list[tuple[str, Any, Any, pl.Callback]] = []
    for i, stage in enumerate(recipe.stages):
        for j, spec in enumerate(stage.methods):
            field = f"stages[{i}].methods[{j}]"
            if spec.method not in METHODS:
                raise RecipeError(
                    path,
                    f"{field}.method",
                    f"unknown method {spec.method!r}. Registered: {', '.join(sorted(METHODS))}.",
                )
            cls = METHODS[spec.method]
            params = inspect.signature(cls.__init__).parameters
            allowed = [p for p in params if p != "self"]
            unknown = sorted(set(spec.args) - set(allowed))
            if unknown:
                raise RecipeError(
                    path,
                    f"{field}.args",
                    f"{spec.method} takes no argument {', '.join(unknown)}. Allowed: {', '.join(allowed)}.",
                )
            args = dict(spec.args)
            for key in ("start", "end"):
                window = getattr(stage, key)
                if window is not None and key in allowed and key not in args:
                    args[key] = window
            try:
                callback = cls(**args)
            except (ValueError, TypeError) as err:
                raise RecipeError(path, f"{field}.args", str(err)) from None
            callbacks.append(callback)
            specs.append({"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": args})
            if isinstance(callback, MethodCallback) and callback.window is not None:
                windows.append((f"stages[{i}]", *callback.window, callback))
    _check_overlaps(windows, path)
    return callbacks, specs


def _check_overlaps(windows: list[tuple[str, Any, Any, pl.Callback]], path: Path) -> None:
    for a in range(len(windows)):
        for b in range(a + 1, len(windows)):
            (fa, sa, ea, ca), (fb, sb, eb, cb) = windows[a], windows[b]
            same_selection = (ca.include, ca.exclude) == (cb.include, cb.exclude)
            if not same_selection:
                continue
            if len({sa.kind, ea.kind, sb.kind, eb.kind}) > 1:
                raise RecipeError(
                    path,
                    f"{fb}",
                    f"its window ({sb.text} to {eb.text}) and that of {fa} ({sa.text} to {ea.text}) "
                    "use different kinds of time, so they can not be checked for overlap; use one kind in a recipe.",
                )
            if sa.value < eb.value and sb.value < ea.value:
                raise RecipeError(
                    path,
                    f"{fb}",
                    f"its window ({sb.text} to {eb.text}) overlaps {fa} ({sa.text} to {ea.text}) on "
                    "the same parameters: two methods would update the same masks at once. Give them disjoint windows "
                    "or disjoint `include` lists.",
                )


def instantiate(spec: Mapping[str, Any] | None, what: str) -> Any:
    """Build ``{"class_path": ..., "init_args": {...}}`` with Lightning's ``instantiate_class``; a ``ConfigError``
    naming ``--<what>`` when there is no spec, the class can not be imported or its arguments are refused."""
    from lightning.pytorch.cli import instantiate_class

    if spec is None:
        raise ConfigError(f"No {what} given: the recipe names none, so pass --{what} CLASS_PATH.")
    class_path = spec["class_path"]
    if "." not in class_path:
        raise ConfigError(f"--{what} {class_path!r} is not a class path (module.Class).")
    try:
        return instantiate_class((), {"class_path": class_path, "init_args": dict(spec.get("init_args") or {})})
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"--{what} {class_path!r} is not an importable class: {err}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--{what} {class_path!r} can not be built: {err}") from None


def load_recipe(path: str | Path, **overrides: Any) -> list[pl.Callback]:
    """The configured callbacks of a recipe file (or shipped recipe name); ``overrides`` set its variables."""
    return load(path, **overrides).callbacks


__all__ = [
    "LoadedRecipe",
    "RecipeError",
    "find_recipe",
    "instantiate",
    "load",
    "load_recipe",
    "parse_time",
    "shipped_recipes",
]

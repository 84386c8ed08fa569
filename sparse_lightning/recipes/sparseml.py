"""Convert classic SparseML pruning recipes into sparse-lightning recipes.

SparseML (end of life in 2025) wrote recipes as YAML (optionally inside Markdown front matter) with tagged
modifiers. Converted: ``!GMPruningModifier`` and ``!MagnitudePruningModifier`` (per-layer magnitude, here
``distribution: uniform``), ``!GlobalMagnitudePruningModifier`` (``distribution: global``), ``!ConstantPruningModifier``
(``constant_mask``) and ``!EpochRangeModifier`` (``trainer.max_epochs``). Fields: ``start_epoch``/``end_epoch``
(a stage window in epochs; ``-1`` is the end of training), ``update_frequency`` (``every`` in epochs),
``init_sparsity``/``final_sparsity`` (a per-layer map ``{sparsity: [params]}`` becomes one method per group),
``inter_func`` (``linear``, ``cubic``), ``mask_type`` (``unstructured``, ``"N:M"`` where SparseML's N also counts
kept weights, ``block4`` as ``block:1x4``, ``filter`` as ``channel``), ``params`` (names, ``re:`` regexes, which
SparseML matches at the start of a name and are anchored here with a trailing ``.*``, and ``__ALL_PRUNABLE__``, the
default selection). Top-level variables and ``eval(...)`` arithmetic over them are resolved.

Everything else is reported, modifier by modifier and field by field, and left out.
"""

from __future__ import annotations

import ast
import operator
import re
from pathlib import Path
from typing import Any

import yaml

from sparse_lightning.core.errors import ConfigError

PRUNING = {
    "GMPruningModifier": "uniform",
    "MagnitudePruningModifier": "uniform",
    "GlobalMagnitudePruningModifier": "global",
}
CURVES = {"linear": "linear", "cubic": "cubic"}
IGNORED_FIELDS = {"leave_enabled", "log_types", "global_sparsity", "phased", "score_type", "mask_creator"}


class _TaggedLoader(yaml.SafeLoader):
    """A safe loader that reads ``!SomeModifier`` mappings as ``{"__modifier__": name, ...}``."""


def _construct_tagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    if not isinstance(node, yaml.MappingNode):
        return {"__modifier__": suffix}
    return {"__modifier__": suffix, **loader.construct_mapping(node, deep=True)}


_TaggedLoader.add_multi_constructor("!", _construct_tagged)

_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def _evaluate(expr: str, variables: dict[str, Any]) -> Any:
    def walk(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.Name) and node.id in variables:
            return variables[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.operand))
        raise ConfigError(f"eval({expr}) uses something other than numbers, + - * / and top-level variables.")

    return walk(ast.parse(expr, mode="eval"))


def _resolve(value: Any, variables: dict[str, Any]) -> Any:
    if isinstance(value, dict):
        return {k: _resolve(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, variables) for v in value]
    if isinstance(value, str) and (m := re.fullmatch(r"\s*eval\((.*)\)\s*", value, re.S)):
        return _evaluate(m.group(1), variables)
    return value


def read_sparseml(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Top-level variables and the list of modifiers of a SparseML recipe (YAML or Markdown front matter)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: can not be read: {err.strerror}.") from None
    if text.lstrip().startswith("---"):
        text = text.lstrip()[3:].split("\n---", 1)[0]
    try:
        data = yaml.load(text, Loader=_TaggedLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: YAML syntax error: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a SparseML recipe is a mapping with a `modifiers` list.")
    variables: dict[str, Any] = {}
    for key, value in data.items():
        value = _resolve(value, variables) if isinstance(value, str) else value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            variables[key] = value
    modifiers = []
    for key, value in data.items():
        if "modifiers" in str(key) and isinstance(value, list):
            modifiers += [_resolve(m, variables) for m in value]
    if not modifiers:
        raise ConfigError(f"{path}: no `modifiers` list found.")
    return variables, modifiers


def _params(value: Any, prefix: str) -> list[str] | None:
    items = [value] if isinstance(value, str) else list(value or [])
    if not items or "__ALL_PRUNABLE__" in items or "__ALL__" in items:
        return None
    out = []
    for item in items:
        if item.startswith("re:"):
            out.append(f"re:{re.escape(prefix)}(?:{item[3:]}).*")
        else:
            out.append(prefix + item)
    return out


def _mask_type(value: Any) -> str | None:
    text = str(value).strip().lower()
    if text == "unstructured":
        return "unstructured"
    if re.fullmatch(r"\d+:\d+", text):
        return text
    if text == "block4" or text == "block":
        return "block:1x4"
    if text == "filter":
        return "channel"
    return None


def convert_sparseml(path: str | Path, prefix: str = "") -> tuple[dict[str, Any], list[str]]:
    """Our recipe (as a dict) and the list of what could not be converted."""
    _, modifiers = read_sparseml(path)
    problems: list[str] = []
    stages: list[dict[str, Any]] = []
    trainer: dict[str, Any] = {}
    for i, mod in enumerate(modifiers):
        kind = mod.get("__modifier__", "?")
        where = f"modifiers[{i}] !{kind}"
        fields = {k: v for k, v in mod.items() if k != "__modifier__"}
        if kind == "EpochRangeModifier":
            if "end_epoch" in fields:
                trainer["max_epochs"] = int(round(float(fields["end_epoch"])))
            continue
        if kind not in PRUNING and kind != "ConstantPruningModifier":
            problems.append(f"{where}: this modifier has no sparse-lightning equivalent; left out.")
            continue
        stage: dict[str, Any] = {"name": f"{kind}-{i}"}
        start, end = fields.pop("start_epoch", 0), fields.pop("end_epoch", -1)
        if float(start) > 0:
            stage["start"] = f"{float(start):g}ep"
        if float(end) >= 0:
            stage["end"] = f"{float(end):g}ep"
        include = _params(fields.pop("params", "__ALL_PRUNABLE__"), prefix)
        if kind == "ConstantPruningModifier":
            args = {"include": include} if include else {}
            stage["methods"] = [{"method": "constant_mask", "args": args}]
        else:
            args: dict[str, Any] = {"distribution": PRUNING[kind]}
            if "init_sparsity" in fields:
                args["initial_sparsity"] = float(fields.pop("init_sparsity"))
            if "update_frequency" in fields:
                args["every"] = f"{float(fields.pop('update_frequency')):g}ep"
            curve = fields.pop("inter_func", "cubic")
            if curve in CURVES:
                args["curve"] = CURVES[curve]
            else:
                problems.append(f"{where}.inter_func: {curve!r} has no equivalent curve (linear, cubic); used cubic.")
                args["curve"] = "cubic"
            if "mask_type" in fields:
                mask = fields.pop("mask_type")
                pattern = _mask_type(mask)
                if pattern is None:
                    problems.append(f"{where}.mask_type: {mask!r} can not be converted; used unstructured.")
                else:
                    args["pattern"] = pattern
            final = fields.pop("final_sparsity", None)
            if isinstance(final, dict):
                methods = []
                for sparsity, names in final.items():
                    group = _params(names, prefix)
                    methods.append(
                        {"method": "gradual_magnitude", "args": {**args, "sparsity": float(sparsity), "include": group}}
                    )
                stage["methods"] = methods
            elif final is None:
                problems.append(f"{where}: no final_sparsity; left out.")
                continue
            else:
                stage["methods"] = [
                    {
                        "method": "gradual_magnitude",
                        "args": {**args, "sparsity": float(final), **({"include": include} if include else {})},
                    }
                ]
            if isinstance(final, dict) and include:
                problems.append(f"{where}.params: ignored, the per-layer final_sparsity map names the parameters.")
        for field in sorted(fields):
            if field in IGNORED_FIELDS:
                continue
            problems.append(f"{where}.{field}: not converted.")
        stages.append(stage)
    if not stages:
        raise ConfigError(f"{path}: no convertible pruning modifier; " + " ".join(problems))
    recipe: dict[str, Any] = {
        "name": Path(path).stem,
        "description": f"Converted from the SparseML recipe {Path(path).name}.",
    }
    if trainer:
        recipe["trainer"] = trainer
    recipe["stages"] = stages
    return recipe, problems

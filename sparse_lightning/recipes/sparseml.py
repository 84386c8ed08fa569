"""Convert classic SparseML recipes into sparse-lightning recipes.

SparseML (end of life in 2025) wrote recipes as YAML, or as YAML front matter in Markdown recipe cards (often after
an HTML licence comment), with tagged modifiers. The front matter is found as SparseML finds it: the block between
the first two ``---`` lines, whatever stands around it; a README or tutorial without one gives the first fenced
code block that holds a modifier. Top-level keys are variables; ``eval(...)`` over numbers,
variables (text ones included) and + - * / // % ** is resolved, and numbers YAML reads as text (``5e-5``) are
numbers, as in SparseML. A field that can not be resolved is reported only if a converted modifier uses it.

Converted (see ``docs/sparseml.md`` for the table):

- ``!GMPruningModifier``, ``!MagnitudePruningModifier`` (``distribution: uniform``, or ``global`` with
  ``global_sparsity: true``) and ``!GlobalMagnitudePruningModifier`` (``global``) to ``gradual_magnitude``;
- ``!OBSPruningModifier`` (oBERT, Kurtic et al. 2022; defaults 1024 gradients, blocks of 50, damp 1e-7, global) and
  ``!MFACPruningModifier`` (defaults 64 gradients, blocks of 2000, damp 1e-5) to ``mfac_pruning``;
- ``!ACDCPruningModifier`` to ``acdc`` (SparseML starts with a dense phase and trims ``end_epoch`` to end on a
  compressed one, which then lasts to the end of training: the same phases);
- ``!ConstantPruningModifier`` to ``constant_mask``; ``!EpochRangeModifier`` to ``trainer.max_epochs``;
- ``!LearningRateFunctionModifier``, ``!SetLearningRateModifier``, ``!LearningRateModifier`` (``StepLR``,
  ``MultiStepLR``, ``ExponentialLR``) to ``lr_function``; ``!SetWeightDecayModifier`` to ``weight_decay``.

Fields: ``start_epoch``/``end_epoch`` (``-1``: the end of training), ``update_frequency``, ``init_sparsity``/
``final_sparsity`` (a map ``{sparsity: [params]}`` becomes one method per group), ``inter_func`` (``linear``,
``cubic``, ``inverse_cubic``), ``mask_type`` (``unstructured``, ``block4`` and ``[1, 4]`` as ``block:1x4``, any
``[R, C]``, ``"N:M"``, ``filter`` as ``channel``), ``params`` (names; ``re:`` regexes, which SparseML matches at
the start of a name, anchored here with a trailing ``.*``; ``__ALL__``, every parameter; ``__ALL_PRUNABLE__``, the
weights of Linear, Conv, Embedding and GPT-style Conv1D layers), ``global_sparsity``.

Everything else is reported, one line per modifier and field, and left out (quantization, distillation, layer
dropping have no equivalent here).
"""

from __future__ import annotations

import ast
import math
import operator
import re
from pathlib import Path
from typing import Any

import yaml

from sparse_lightning.core.errors import ConfigError

GRADUAL = {
    "GMPruningModifier": "uniform",
    "MagnitudePruningModifier": "uniform",
    "GlobalMagnitudePruningModifier": "global",
}
SECOND_ORDER = {  # SparseML's defaults: num_grads, fisher_block_size, damp, global_sparsity
    "OBSPruningModifier": (1024, 50, 1e-7, True),
    "MFACPruningModifier": (64, 2000, 1e-5, False),
}
LEARNING_RATE = ("LearningRateFunctionModifier", "SetLearningRateModifier", "LearningRateModifier")
LR_CLASSES = {"StepLR": "step", "MultiStepLR": "multistep", "ExponentialLR": "exponential"}
LEFT_OUT = {
    "QuantizationModifier": "quantization",
    "DistillationModifier": "distillation",
    "KnowledgeDistillationModifier": "distillation",
    "LayerPruningModifier": "layer dropping",
    "LayerThinningModifier": "layer thinning",
    "TrainableParamsModifier": "freezing parameters",
}
CURVES = ("linear", "cubic", "inverse_cubic")
IGNORED_FIELDS = {
    "leave_enabled",
    "log_types",
    "phased",
    "score_type",
    "mask_creator",
    "constant_logging",
    "end_comparator",
}
PRUNABLE = "type:Linear|_ConvNd|Embedding|Conv1D"
NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


class Unresolved:
    """A field whose ``eval(...)`` or variable could not be resolved: why, reported only if the field is used."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class Refused(Exception):
    """One modifier can not be converted: the field and why (becomes one report line)."""

    def __init__(self, field: str | None, reason: str) -> None:
        super().__init__(reason)
        self.field, self.reason = field, reason


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
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def _number(value: Any) -> Any:
    """A number written as text (``"5e-5"``, which YAML 1.1 reads as a string) as a number."""
    if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
        text = value.strip()
        return int(text) if re.fullmatch(r"[+-]?\d+", text) else float(text)
    return value


def _evaluate(expr: str, variables: dict[str, Any]) -> Any:
    def walk(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)):
            return _number(node.value)
        if isinstance(node, ast.Name):
            if node.id not in variables:
                raise ValueError(f"eval({expr}): {node.id!r} is not a variable of the recipe")
            value = variables[node.id]
            if isinstance(value, Unresolved):
                raise ValueError(value.reason)
            return value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.operand))
        raise ValueError(f"eval({expr}) uses something other than numbers, variables and + - * / // % **")

    try:
        return walk(ast.parse(expr.strip(), mode="eval"))
    except SyntaxError:
        raise ValueError(f"eval({expr}) is not an expression") from None
    except (TypeError, ZeroDivisionError) as err:
        raise ValueError(f"eval({expr}): {err}") from None


def _resolve(value: Any, variables: dict[str, Any]) -> Any:
    if isinstance(value, dict):
        return {k: _resolve(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, variables) for v in value]
    if isinstance(value, str) and (m := re.fullmatch(r"\s*eval\((.*)\)\s*", value, re.S)):
        try:
            return _evaluate(m.group(1), variables)
        except ValueError as err:
            return Unresolved(str(err))
    return _number(value)


def front_matter(text: str) -> str | None:
    """A recipe card's YAML: between the first two ``---`` lines (``None`` when there is no such line)."""
    lines = text.splitlines()
    marks = [i for i, line in enumerate(lines) if line.strip() == "---"]
    if not marks:
        return None
    end = marks[1] if len(marks) > 1 else len(lines)
    return "\n".join(lines[marks[0] + 1 : end])


def code_blocks(text: str) -> list[tuple[int, str]]:
    """The fenced code blocks of a Markdown text that hold a SparseML modifier (README and tutorial recipes), with
    the line each starts on."""
    blocks, current, first = [], None, 0
    for number, line in enumerate(text.splitlines(), start=1):
        fence = line.strip()
        if current is None:
            if fence.startswith("```") and "```" not in fence[3:]:  # not an inline ```code``` on one line
                current, first = [], number + 1
        elif fence.startswith("```"):
            blocks.append((first, "\n".join(current)))
            current = None
        else:
            current.append(line)
    return [(line, b) for line, b in blocks if re.search(r"!\w+Modifier", b)]


def _parse(text: str) -> Any:
    return yaml.load(text, Loader=_TaggedLoader)  # noqa: S506 - a SafeLoader subclass


def _has_modifiers(data: Any) -> bool:
    return isinstance(data, dict) and any("modifiers" in str(k) and isinstance(v, list) for k, v in data.items())


def read_sparseml(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Top-level variables and the list of modifiers of a SparseML recipe: a YAML file, a recipe card's front
    matter, or the first fenced code block of a Markdown README or tutorial that holds one."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: can not be read: {err.strerror}.") from None
    matter = front_matter(text)
    candidates = [("the front matter", matter)] if matter is not None else []
    candidates += [(f"the code block at line {line}", block) for line, block in code_blocks(text)]
    candidates += [("the file", text)]
    data, first_error = None, None
    for label, candidate in candidates:
        try:
            parsed = _parse(candidate)
        except yaml.YAMLError as err:
            first_error = first_error or (label, err)
            continue
        if _has_modifiers(parsed):
            data = parsed
            break
    if data is None and first_error is not None:
        label, err = first_error
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1} of {label}" if mark is not None else f" in {label}"
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(
            f"{path}: no SparseML recipe found (front matter or a fenced block with a `modifiers` list); YAML syntax "
            f"error{where}: {problem}."
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a SparseML recipe is a mapping with a `modifiers` list.")
    variables: dict[str, Any] = {}
    for key, value in data.items():
        if not (isinstance(value, list) and "modifiers" in str(key)):
            variables[str(key)] = _resolve(value, variables)
    modifiers = []
    for key, value in data.items():
        if "modifiers" in str(key) and isinstance(value, list):
            modifiers += [_resolve(m, variables) if isinstance(m, dict) else m for m in value]
    if not modifiers:
        raise ConfigError(f"{path}: no `modifiers` list found.")
    return variables, modifiers


class _Fields:
    """A modifier's fields; reading one that could not be resolved refuses the modifier, naming the field."""

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields
        self.used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def get(self, key: str, default: Any = None) -> Any:
        self.used.add(key)
        value = self.fields.get(key, default)
        if isinstance(value, Unresolved):
            raise Refused(key, value.reason)
        return value

    def number(self, key: str, default: Any = None) -> Any:
        value = self.get(key, default)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise Refused(key, f"{value!r} is not a number")
        return value

    def unused(self) -> list[str]:
        return sorted(k for k in self.fields if k not in self.used and k not in IGNORED_FIELDS)


def _params(value: Any, prefix: str) -> list[str] | None:
    """Our ``include`` for SparseML's ``params`` (``None``: the default selection of Linear and Conv weights)."""
    items = [value] if isinstance(value, str) else list(value or [])
    if "__ALL__" in items:
        return ["*"]
    if not items or "__ALL_PRUNABLE__" in items:
        return [PRUNABLE]
    out = []
    for item in items:
        if not isinstance(item, str):
            raise Refused("params", f"{item!r} is not a parameter name")
        out.append(f"re:{re.escape(prefix)}(?:{item[3:]}).*" if item.startswith("re:") else prefix + item)
    return out


def _pattern(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        if list(value) == [1, 1]:
            return "unstructured"  # SparseML's block creator with 1 x 1 blocks
        if len(value) == 2 and all(isinstance(v, int) and v >= 1 for v in value) and value[0] * value[1] > 1:
            return f"block:{value[0]}x{value[1]}"
        raise Refused("mask_type", f"{value!r} is not a block shape [rows, columns]")
    text = str(value).strip().lower()
    if text == "unstructured":
        return "unstructured"
    if re.fullmatch(r"\d+:\d+", text):
        return text
    if text == "block4":
        return "block:1x4"
    if text == "filter":
        return "channel"
    raise Refused("mask_type", f"{value!r} has no equivalent pattern (unstructured, block4, [R, C], N:M, filter)")


def _epochs(value: Any) -> str:
    return f"{float(value):g}ep"


def _window(fields: _Fields, stage: dict[str, Any]) -> tuple[float, float]:
    start, end = fields.number("start_epoch", 0), fields.number("end_epoch", -1)
    if float(start) > 0:
        stage["start"] = _epochs(start)
    if float(end) >= 0:
        stage["end"] = _epochs(end)
    return float(start), float(end)


def _sparsities(fields: _Fields) -> tuple[float, Any]:
    init = fields.get("init_sparsity", 0.0)
    if init == "__FROM_PARAM__":
        raise Refused(
            "init_sparsity",
            "__FROM_PARAM__ (start from each parameter's current sparsity) is not served; write the number",
        )
    if isinstance(init, bool) or not isinstance(init, (int, float)):
        raise Refused("init_sparsity", f"{init!r} is not a number")
    final = fields.get("final_sparsity")
    if final is None:
        raise Refused("final_sparsity", "missing")
    targets = list(final) if isinstance(final, dict) else [final]
    for target in targets:
        if isinstance(_number(target), bool) or not isinstance(_number(target), (int, float)):
            raise Refused("final_sparsity", f"{target!r} is not a number")
        if float(init) > float(_number(target)):
            raise Refused("init_sparsity", f"{init} is above final_sparsity {target}")
    return float(init), final


def _gradual(kind: str, fields: _Fields, prefix: str, stage: dict[str, Any], problems: list[str], where: str) -> None:
    """A gradual pruning modifier (magnitude or second order) as one method per final sparsity."""
    _window(fields, stage)
    init, final = _sparsities(fields)
    args: dict[str, Any] = {}
    if kind in GRADUAL:
        method, global_default = "gradual_magnitude", GRADUAL[kind] == "global"
    else:
        num_grads, block, damp, global_default = SECOND_ORDER[kind]
        method = "mfac_pruning"
        grads = fields.get("num_grads", num_grads)
        if isinstance(grads, dict):
            largest = max(int(v) for v in grads.values())
            problems.append(f"{where}.num_grads: a schedule {grads}; converted with its largest value, {largest}.")
            grads = largest
        args.update(
            num_grads=int(grads),
            block_size=int(fields.number("fisher_block_size", block)),
            damp=float(fields.number("damp", damp)),
            recomputations=int(fields.number("num_recomputations", 1)),
        )
    global_sparsity = fields.get("global_sparsity", global_default)
    args["distribution"] = "global" if global_sparsity else "uniform"
    if init:
        args["initial_sparsity"] = init
    if "update_frequency" in fields:
        args["every"] = _epochs(fields.number("update_frequency"))
    curve = fields.get("inter_func", "cubic")
    if curve not in CURVES:
        raise Refused("inter_func", f"{curve!r} has no equivalent curve ({', '.join(CURVES)})")
    args["curve"] = curve
    if "mask_type" in fields:
        args["pattern"] = _pattern(fields.get("mask_type"))
        if method == "mfac_pruning" and args["pattern"] != "unstructured":
            problems.append(
                f"{where}.mask_type: blocks are scored by the mean of their weights' OBS saliencies, not by oBERT's "
                "joint block saliency w^T F_b^-1 w."
            )
    include = _params(fields.get("params", "__ALL_PRUNABLE__"), prefix)
    if isinstance(final, dict):
        if include != [PRUNABLE]:
            problems.append(f"{where}.params: ignored, the per-layer final_sparsity map names the parameters.")
        stage["methods"] = [
            {"method": method, "args": {**args, "sparsity": float(_number(s)), "include": _params(names, prefix)}}
            for s, names in final.items()
        ]
    else:
        stage["methods"] = [{"method": method, "args": {**args, "sparsity": float(final), "include": include}}]


def _acdc(fields: _Fields, prefix: str, stage: dict[str, Any]) -> None:
    start, end = fields.number("start_epoch", 0), fields.number("end_epoch")
    phase = fields.number("update_frequency")
    if end is None or float(end) < 0:
        raise Refused("end_epoch", "AC/DC needs a final epoch")
    if phase is None or float(phase) <= 0:
        raise Refused("update_frequency", "AC/DC needs the phase length in epochs")
    start, end, phase = float(start), float(end), float(phase)
    last = math.floor((end - 1 - start) / phase)  # the phase of the last epoch; even phases are dense
    if last % 2 == 0:
        last -= 1  # SparseML ends on a compressed phase (its docstring; its trimming code disagrees with it)
    if last < 1:
        raise Refused("end_epoch", f"{end:g} leaves no compressed phase after the first dense one")
    args: dict[str, Any] = {
        "sparsity": float(fields.number("compression_sparsity")),
        "start": _epochs(start + phase),
        "end": _epochs(start + last * phase),
        "phase": _epochs(phase),
        "distribution": "global" if fields.get("global_sparsity", True) else "uniform",
        "reset_momentum": bool(fields.get("momentum_buffer_reset", True)),
        "include": _params(fields.get("params", "__ALL_PRUNABLE__"), prefix),
    }
    if "mask_type" in fields:
        args["pattern"] = _pattern(fields.get("mask_type"))
    stage["methods"] = [{"method": "acdc", "args": args}]


def _learning_rate(kind: str, fields: _Fields, stage: dict[str, Any]) -> None:
    start, end = fields.number("start_epoch", 0), fields.number("end_epoch", -1)
    args: dict[str, Any] = {"start": _epochs(max(float(start), 0.0))}
    if float(end) >= 0:
        args["end"] = _epochs(end)
    if kind == "SetLearningRateModifier":
        args.update(function="constant", init_lr=float(fields.number("learning_rate")))
    elif kind == "LearningRateFunctionModifier":
        function = fields.get("lr_func", "linear")
        if function not in ("linear", "cosine", "cyclic_linear"):
            raise Refused("lr_func", f"{function!r} has no equivalent (linear, cosine, cyclic_linear)")
        args.update(
            function=function,
            init_lr=float(fields.number("init_lr")),
            final_lr=float(fields.number("final_lr")),
        )
        if function == "cyclic_linear":
            args["cycle"] = _epochs(fields.number("cycle_epochs"))
    else:
        lr_class = fields.get("lr_class")
        if lr_class not in LR_CLASSES:
            raise Refused("lr_class", f"{lr_class!r} has no equivalent ({', '.join(LR_CLASSES)})")
        kwargs = fields.get("lr_kwargs", {}) or {}
        args.update(function=LR_CLASSES[lr_class], init_lr=float(fields.number("init_lr")))
        args["gamma"] = float(_number(kwargs.get("gamma", 0.1)))
        if lr_class == "StepLR":
            args["step_size"] = _epochs(_number(kwargs["step_size"]))
        if lr_class == "MultiStepLR":
            args["milestones"] = [_epochs(_number(m)) for m in kwargs["milestones"]]
        unknown = sorted(set(kwargs) - {"gamma", "step_size", "milestones"})
        if unknown:
            raise Refused("lr_kwargs", f"{unknown} have no equivalent")
        if float(fields.number("update_frequency", -1)) not in (-1.0, 1.0):
            raise Refused("update_frequency", "only epoch-wise scheduler steps (-1 or 1) are converted")
    if fields.get("param_groups") is not None:
        args["param_groups"] = [int(i) for i in fields.get("param_groups")]
    stage["methods"] = [{"method": "lr_function", "args": args}]


def convert_sparseml(path: str | Path, prefix: str = "") -> tuple[dict[str, Any], list[str]]:
    """Our recipe (as a dict) and the lines saying what was not converted, each naming the modifier and field."""
    _, modifiers = read_sparseml(path)
    problems: list[str] = []
    stages: list[dict[str, Any]] = []
    trainer: dict[str, Any] = {}
    for i, mod in enumerate(modifiers):
        kind = mod.get("__modifier__", "?") if isinstance(mod, dict) else "?"
        where = f"modifiers[{i}] !{kind}"
        if not isinstance(mod, dict) or kind == "?":
            problems.append(f"modifiers[{i}]: not a tagged modifier mapping; left out.")
            continue
        fields = _Fields({k: v for k, v in mod.items() if k != "__modifier__"})
        stage: dict[str, Any] = {"name": f"{kind}-{i}"}
        try:
            if kind == "EpochRangeModifier":
                if "end_epoch" in fields:
                    trainer["max_epochs"] = int(round(float(fields.number("end_epoch"))))
                fields.get("start_epoch")
                continue
            if kind in GRADUAL or kind in SECOND_ORDER:
                _gradual(kind, fields, prefix, stage, problems, where)
            elif kind == "ACDCPruningModifier":
                _acdc(fields, prefix, stage)
            elif kind == "ConstantPruningModifier":
                _window(fields, stage)
                include = _params(fields.get("params", "__ALL_PRUNABLE__"), prefix)
                stage["methods"] = [{"method": "constant_mask", "args": {"include": include}}]
            elif kind in LEARNING_RATE:
                _learning_rate(kind, fields, stage)
            elif kind == "SetWeightDecayModifier":
                start = fields.number("start_epoch", 0)
                args: dict[str, Any] = {
                    "weight_decay": float(fields.number("weight_decay")),
                    "start": _epochs(max(float(start), 0.0)),
                }
                if fields.get("param_groups") is not None:
                    args["param_groups"] = [int(g) for g in fields.get("param_groups")]
                stage["methods"] = [{"method": "weight_decay", "args": args}]
            else:
                what = LEFT_OUT.get(kind)
                reason = f"{what} is not part of sparse-lightning" if what else "no sparse-lightning equivalent"
                problems.append(f"{where}: {reason}; left out.")
                continue
        except Refused as refusal:
            field = f".{refusal.field}" if refusal.field else ""
            problems.append(f"{where}{field}: {refusal.reason}; modifier left out.")
            continue
        except (TypeError, ValueError, KeyError) as err:
            problems.append(f"{where}: {err!s} can not be read; modifier left out.")
            continue
        problems += [f"{where}.{field}: not converted." for field in fields.unused()]
        stages.append(stage)
    if not any(m["method"] not in ("lr_function", "weight_decay") for s in stages for m in s["methods"]):
        raise ConfigError(f"{path}: no convertible pruning modifier. " + " ".join(problems))
    recipe: dict[str, Any] = {
        "name": Path(path).stem,
        "description": f"Converted from the SparseML recipe {Path(path).name}.",
    }
    if trainer:
        recipe["trainer"] = trainer
    recipe["stages"] = stages
    return recipe, problems

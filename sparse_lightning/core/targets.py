"""Which parameters a method acts on.

Patterns are ``fnmatch`` globs on the full parameter name (``"model.conv*.weight"``) or, with the prefix ``re:``,
regular expressions that must match the whole name (``"re:.*\\.layer[12]\\..*weight"``), or, with the prefix
``type:``, the ``weight`` of every module whose class (or a base class) has one of the ``|``-separated names
(``"type:Linear|_ConvNd|Embedding|Conv1D"``: what SparseML's ``__ALL_PRUNABLE__`` selects, transformers' GPT-style
``Conv1D`` included). Without ``include`` the default is the ``weight`` of every ``nn.Linear`` and ``nn.ConvNd``
module; biases, norms and embeddings are only selected when named.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

from torch import nn
from torch.nn.modules.conv import _ConvNd

from sparse_lightning.core.errors import ConfigError, ConfigTypeError

REGEX_PREFIX = "re:"
TYPE_PREFIX = "type:"


def _compile(pattern: str) -> re.Pattern[str]:
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"A parameter pattern must be a non-empty string, got {pattern!r}.")
    if pattern.startswith(REGEX_PREFIX):
        try:
            return re.compile(pattern[len(REGEX_PREFIX) :])
        except re.error as err:
            raise ConfigError(f"Invalid regular expression in pattern {pattern!r}: {err}.") from None
    return re.compile(fnmatch.translate(pattern))


def _typed_weights(module: nn.Module, pattern: str) -> set[str]:
    """Names of the ``weight`` parameters of the modules a ``type:`` pattern names."""
    wanted = {t.strip() for t in pattern[len(TYPE_PREFIX) :].split("|") if t.strip()}
    if not wanted:
        raise ConfigError(f"Pattern {pattern!r} names no module class (e.g. 'type:Linear|Embedding').")
    return {
        f"{prefix}.weight" if prefix else "weight"
        for prefix, sub in module.named_modules()
        if isinstance(getattr(sub, "weight", None), nn.Parameter) and wanted & {c.__name__ for c in type(sub).__mro__}
    }


def _matcher(module: nn.Module, pattern: str):  # noqa: ANN202
    if isinstance(pattern, str) and pattern.startswith(TYPE_PREFIX):
        names = _typed_weights(module, pattern)
        return names.__contains__
    return _compile(pattern).fullmatch


def match_name(name: str, pattern: str) -> bool:
    """Whether ``name`` matches one glob or ``re:`` pattern (the regex must match the whole name)."""
    return _compile(pattern).fullmatch(name) is not None


def default_targets(module: nn.Module) -> list[str]:
    """Names of the ``weight`` of every Linear and ConvNd module, in ``named_parameters()`` order."""
    wanted = {
        id(sub.weight)
        for sub in module.modules()
        if isinstance(sub, (nn.Linear, _ConvNd)) and isinstance(getattr(sub, "weight", None), nn.Parameter)
    }
    return [name for name, param in module.named_parameters() if id(param) in wanted]


def select_parameters(
    module: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[str]:
    """Names of the selected parameters, in ``named_parameters()`` order.

    Raises ``ValueError`` naming the pattern when an ``include`` or ``exclude`` pattern matches no parameter, and
    when nothing is selected at all.
    """
    for arg_name, arg in (("include", include), ("exclude", exclude)):
        if arg is not None and (isinstance(arg, str) or not isinstance(arg, Sequence)):
            raise ConfigTypeError(f"`{arg_name}` must be a list of name patterns, got {arg!r}.")
    names = [name for name, _ in module.named_parameters()]
    if include:
        compiled = [(pattern, _matcher(module, pattern)) for pattern in include]
        selected = []
        for pattern, matches in compiled:
            if not any(matches(name) for name in names):
                raise ConfigError(
                    f"`include` pattern {pattern!r} selects no parameter. Parameters are named like {_examples(names)}."
                )
        selected = [name for name in names if any(matches(name) for _, matches in compiled)]
    else:
        selected = default_targets(module)
    for pattern in exclude or ():
        matches = _matcher(module, pattern)
        if not any(matches(name) for name in selected):
            raise ConfigError(
                f"`exclude` pattern {pattern!r} matches no selected parameter. Selected: {_examples(selected)}."
            )
        selected = [name for name in selected if not matches(name)]
    if not selected:
        raise ConfigError("No parameter is selected: `include`/`exclude` leave nothing to sparsify.")
    return selected


def naming_hint(patterns: Sequence[str], names: Sequence[str]) -> str:
    """Why name patterns written elsewhere (a converted SparseML recipe) fail on a model: a missing wrapper prefix
    (say which), or another naming scheme (say how many fail); empty when every pattern matches."""
    plain = [p for p in dict.fromkeys(patterns) if not p.startswith(TYPE_PREFIX)]
    failing = [p for p in plain if not any(_compile(p).fullmatch(n) for n in names)]
    if not failing:
        return ""
    prefixes = sorted({n[: i + 1] for n in names for i, c in enumerate(n) if c == "."}, key=len)
    for prefix in prefixes:
        inner = [n[len(prefix) :] for n in names if n.startswith(prefix)]
        if all(any(_compile(p).fullmatch(n) for n in inner) for p in failing):
            return (
                f"The model's parameter names start with {prefix!r}, the recipe's do not: convert the SparseML recipe "
                f"again with `--prefix {prefix}` (or add {prefix!r} to the patterns)."
            )
    return (
        f"{len(failing)} of {len(plain)} parameter patterns match nothing in this model (e.g. {failing[0]!r}): they "
        f"look written for another naming scheme (this model's parameters are named like {_examples(list(names))}); "
        "rewrite them for this model, or convert with `--prefix` if only a prefix differs."
    )


def _examples(names: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (", ..." if len(names) > limit else "") if names else "(none)"

"""Which parameters a method acts on.

Patterns are ``fnmatch`` globs on the full parameter name (``"model.conv*.weight"``) or, with the prefix ``re:``,
regular expressions that must match the whole name (``"re:.*\\.layer[12]\\..*weight"``). Without ``include`` the
default is the ``weight`` of every ``nn.Linear`` and ``nn.ConvNd`` module; biases, norms and embeddings are only
selected when named.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

from torch import nn
from torch.nn.modules.conv import _ConvNd

from sparse_lightning.core.errors import ConfigError, ConfigTypeError

REGEX_PREFIX = "re:"


def _compile(pattern: str) -> re.Pattern[str]:
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"A parameter pattern must be a non-empty string, got {pattern!r}.")
    if pattern.startswith(REGEX_PREFIX):
        try:
            return re.compile(pattern[len(REGEX_PREFIX) :])
        except re.error as err:
            raise ConfigError(f"Invalid regular expression in pattern {pattern!r}: {err}.") from None
    return re.compile(fnmatch.translate(pattern))


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
        compiled = [(pattern, _compile(pattern)) for pattern in include]
        selected = []
        for pattern, regex in compiled:
            if not any(regex.fullmatch(name) for name in names):
                raise ConfigError(
                    f"`include` pattern {pattern!r} selects no parameter. Parameters are named like {_examples(names)}."
                )
        selected = [name for name in names if any(regex.fullmatch(name) for _, regex in compiled)]
    else:
        selected = default_targets(module)
    for pattern in exclude or ():
        regex = _compile(pattern)
        if not any(regex.fullmatch(name) for name in selected):
            raise ConfigError(
                f"`exclude` pattern {pattern!r} matches no selected parameter. Selected: {_examples(selected)}."
            )
        selected = [name for name in selected if not regex.fullmatch(name)]
    if not selected:
        raise ConfigError("No parameter is selected: `include`/`exclude` leave nothing to sparsify.")
    return selected


def _examples(names: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (", ..." if len(names) > limit else "") if names else "(none)"

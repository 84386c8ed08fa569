"""The one adapter to ``torch-pruning`` (Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023).

Nothing else in sparse-lightning imports ``torch_pruning``: this module turns its ``DependencyGraph`` into plain
:class:`~sparse_lightning.structure.groups.ChannelGroup` records (parameter names, dimensions and index tensors) and
asks it to remove channels in place. Its failures can be silent, so the adapter guards every call: the module's
train/eval flags are restored (``build_dependency`` leaves the model in eval mode), grad is enabled for the trace,
``torch.compile`` wrappers are traced through ``_orig_mod``, parametrized weights are refused, every exception from
inside the tracer becomes one ``ValueError`` naming what failed, and every removal is checked against the index
arithmetic of :mod:`~sparse_lightning.structure.groups` (:func:`remove_channels`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

from sparse_lightning.structure.groups import ChannelGroup, Member

# Layer kinds whose channels a masked model and a compacted one can never agree on: normalization statistics
# count masked zeros, attention's 1/sqrt(d) scale follows the head width, recurrent gates mix channels.
UNSUPPORTED_LAYERS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.LayerNorm, "LayerNorm (masked channels still count in its statistics)"),
    (nn.GroupNorm, "GroupNorm (masked channels still count in its statistics)"),
    (nn.modules.instancenorm._InstanceNorm, "InstanceNorm (masked channels still count in its statistics)"),
    (nn.MultiheadAttention, "multi-head attention (the head width sets its scale)"),
    (nn.RNNBase, "a recurrent layer"),
)


class TraceError(ValueError):
    """torch-pruning could not trace or prune the model (its own exception is chained)."""


def unwrap(module: nn.Module) -> nn.Module:
    """The module itself, or the original module inside a ``torch.compile`` wrapper."""
    return getattr(module, "_orig_mod", module)


_COMPILED_METHODS = ("forward", "training_step", "validation_step", "test_step", "predict_step")


@contextmanager
def eager(module: nn.Module) -> Iterator[None]:
    """Run ``module``'s own ``forward`` and step methods inside: a LightningModule that ``Trainer.fit`` received
    compiled holds them compiled (``_compiler_ctx``), and the tracer must see the modules, and a double backward
    (EarlyCroP's score) can not run through a compiled graph."""
    ctx = module.__dict__.get("_compiler_ctx") or {}
    compiled = {n: module.__dict__[n] for n in _COMPILED_METHODS if n in module.__dict__ and f"original_{n}" in ctx}
    for name in compiled:
        setattr(module, name, ctx[f"original_{name}"])
    try:
        yield
    finally:
        for name, method in compiled.items():
            setattr(module, name, method)


def detach_compiled(copy: nn.Module) -> None:
    """A deep copy of a LightningModule compiled by ``Trainer.fit`` still calls the *original's* compiled methods
    (bound to it); remove them so the copy runs its own class methods."""
    if copy.__dict__.get("_compiler_ctx"):
        for name in _COMPILED_METHODS:
            copy.__dict__.pop(name, None)
        copy.__dict__["_compiler_ctx"] = None


def forward(module: nn.Module, inputs: Any) -> Any:
    """Call ``module`` on example inputs as Lightning's ``example_input_array`` does (tuple: positional
    arguments, dict: keyword arguments, anything else: one argument)."""
    if isinstance(inputs, Mapping):
        return module(**inputs)
    if isinstance(inputs, (tuple, list)):
        return module(*inputs)
    return module(inputs)


@contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode and its own eager ``forward`` inside; every train/eval flag restored afterwards."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with eager(module):
            yield
    finally:
        for m, training in modes.items():
            m.training = training


@contextmanager
def _guarded(module: nn.Module, what: str) -> Iterator[None]:
    """Grad enabled, train/eval flags restored afterwards, foreign exceptions turned into :class:`TraceError`."""
    modes = {m: m.training for m in module.modules()}
    try:
        with torch.enable_grad(), eager(module):
            yield
    except TraceError:
        raise
    except Exception as err:
        raise TraceError(f"torch-pruning could not {what}: {type(err).__name__}: {err}") from err
    finally:
        for m, training in modes.items():
            m.training = training


def _check_traceable(module: nn.Module) -> None:
    parametrized = [name for name, m in module.named_modules() if parametrize.is_parametrized(m)]
    if parametrized:
        raise TraceError(
            f"Channel groups can not be traced on parametrized modules ({', '.join(parametrized)}): remove the "
            "parametrizations (torch.nn.utils.parametrize.remove_parametrizations) first."
        )


def _graph(module: nn.Module, example_inputs: Any) -> Any:
    import torch_pruning as tp

    return tp.DependencyGraph().build_dependency(module, example_inputs=example_inputs, forward_fn=forward)


def _layer_members(
    layer: nn.Module, prefix: str, out: bool, index: torch.Tensor, channel: torch.Tensor
) -> tuple[list[Member], str | None]:
    """The parameter slices a torch-pruning handler touches on ``layer`` (out- or in-channel side), or the reason
    the layer can not be served."""
    for kind, reason in UNSUPPORTED_LAYERS:
        if isinstance(layer, kind):
            return [], reason

    def member(attr: str, dim: int, role: str) -> list[Member]:
        param = getattr(layer, attr, None)
        if not isinstance(param, nn.Parameter):
            return []
        return [Member(f"{prefix}{attr}", dim, index, channel, role)]

    if isinstance(layer, _ConvNd):
        depthwise = layer.groups == layer.in_channels == layer.out_channels and layer.groups > 1
        if layer.groups > 1 and not depthwise:
            return [], f"a grouped convolution ({layer.groups} groups)"
        if out or depthwise:
            return member("weight", 1 if layer.transposed else 0, "producer") + member("bias", 0, "bias"), None
        return member("weight", 0 if layer.transposed else 1, "consumer"), None
    if isinstance(layer, nn.Linear):
        if out:
            return member("weight", 0, "producer") + member("bias", 0, "bias"), None
        return member("weight", 1, "consumer"), None
    if isinstance(layer, _BatchNorm):
        return member("weight", 0, "norm_weight") + member("bias", 0, "norm_bias"), None
    if isinstance(layer, nn.PReLU):
        return (member("weight", 0, "other") if layer.num_parameters > 1 else []), None
    if isinstance(layer, nn.Embedding):
        return (member("weight", 1, "producer") if out else []), None
    if any(True for _ in layer.parameters(recurse=False)):
        return [], f"a layer torch-pruning handles but sparse-lightning does not map ({type(layer).__name__})"
    return [], None


def trace_groups(module: nn.Module, example_inputs: Any) -> list[ChannelGroup]:
    """Every channel group of ``module`` rooted at a Conv or Linear output, in module order.

    A group that can not be served keeps its members and says why in ``unsupported``: it reaches the model's
    outputs, or holds a LayerNorm, GroupNorm, attention, recurrent, grouped-convolution or unknown layer.
    """
    module = unwrap(module)
    _check_traceable(module)
    with _guarded(module, "trace the model"):
        graph = _graph(module, example_inputs)
        names = {m: name for name, m in module.named_modules()}
        groups = []
        for tp_group in graph.get_all_groups():
            root = tp_group[0].dep.target.module
            members: list[Member] = []
            reasons: list[str] = []
            for item in tp_group:
                node, handler = item.dep.target, item.dep.handler
                out = graph.is_out_channel_pruning_fn(handler)
                layer = node.module
                if (out or layer not in names) and not node.outputs:
                    reasons.append("its channels reach the model's outputs")
                if isinstance(layer, nn.Parameter):
                    reasons.append("a bare nn.Parameter takes part")
                    continue
                if layer not in names:
                    continue  # an operation (add, cat, reshape, ...): no parameters of its own
                prefix = f"{names[layer]}." if names[layer] else ""
                index = torch.tensor(list(item.idxs), dtype=torch.long)
                channel = torch.tensor(list(item.root_idxs), dtype=torch.long)
                found, reason = _layer_members(layer, prefix, out, index, channel)
                members.extend(found)
                if reason:
                    reasons.append(f"{names[layer]} is {reason}")
            channels = len(tp_group[0].idxs)
            unique = list({(m.param, m.dim): m for m in members}.values())
            groups.append(ChannelGroup(names[root], channels, unique, "; ".join(dict.fromkeys(reasons)) or None))
    order = {name: i for i, name in enumerate(names.values())}
    return sorted(groups, key=lambda g: order[g.name])


def remove_channels(module: nn.Module, example_inputs: Any, removed: Mapping[str, Sequence[int]]) -> None:
    """Remove, in place, the channels ``removed[group name]`` (indices into the group) with torch-pruning.

    Groups are found again by their root layer's name on this module's own graph, so ``module`` may be a copy of
    the one the groups were traced on.
    """
    module = unwrap(module)
    _check_traceable(module)
    todo = {name: sorted(int(i) for i in idxs) for name, idxs in removed.items() if len(idxs)}
    if not todo:
        return
    with _guarded(module, "remove channels"):
        graph = _graph(module, example_inputs)
        layers = dict(module.named_modules())
        for name, idxs in todo.items():
            if name not in layers:
                raise TraceError(f"channel group {name!r} has no root layer in this module")
            root = layers[name]
            try:
                pruner = graph.get_pruner_of_module(root)
                graph.get_pruning_group(root, pruner.prune_out_channels, idxs=idxs).prune()
            except Exception as err:
                raise TraceError(
                    f"torch-pruning could not remove channels of group {name!r}: {type(err).__name__}: {err}"
                ) from err

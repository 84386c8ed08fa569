"""Physical compaction: masked channels removed, checked against the masked model before anything is returned.

:func:`compact` works on a copy and leaves the original untouched; :func:`compact_in_place` changes a live module
(compaction during ``fit``) and says, per resized parameter, which positions survived, so optimizer state can follow.
Both check torch-pruning's work twice: every resized parameter must equal the expected slice of the old one
exactly, and the compacted module's outputs (eval mode, the example inputs) must match the masked module's to
:data:`RELATIVE_TOLERANCE`; otherwise a ``ValueError`` names the channel group.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from sparse_lightning.core.masks import MaskSet, masks_of, strip_masks
from sparse_lightning.structure.groups import ChannelGroup, channel_keeps, channel_masks, position_keep
from sparse_lightning.structure.tracer import (
    TraceError,
    detach_compiled,
    evaluating,
    forward,
    remove_channels,
    trace_groups,
    unwrap,
)

RELATIVE_TOLERANCE = 1e-4
"""Largest allowed difference between masked and compacted outputs, relative to the largest masked output."""


def count_flops(module: nn.Module, example_inputs: Any) -> tuple[int, dict[str, int]]:
    """FLOPs of one forward on ``example_inputs`` (``torch.utils.flop_counter``, eval mode, no grad): the total and
    the FLOPs of each layer by module name."""
    module = unwrap(module)
    with torch.no_grad(), evaluating(module), FlopCounterMode(display=False) as counter:
        forward(module, example_inputs)
    per_layer = {}
    for key, counts in counter.get_flop_counts().items():
        if key == "Global" or "." not in key:
            continue
        per_layer[key.split(".", 1)[1]] = int(sum(counts.values()))
    return int(counter.get_total_flops()), per_layer


def layer_flops(module: nn.Module, example_inputs: Any) -> tuple[int, dict[str, float]]:
    """The total FLOPs and, per ``<layer>.weight`` parameter, the FLOPs of its layer (leaf layers only)."""
    total, per_layer = count_flops(module, example_inputs)
    params = dict(unwrap(module).named_parameters())
    return total, {f"{n}.weight": float(f) for n, f in per_layer.items() if f"{n}.weight" in params}


def _outputs(module: nn.Module, example_inputs: Any) -> list[Tensor]:
    with torch.no_grad(), evaluating(module):
        out = forward(module, example_inputs)
    flat: list[Tensor] = []

    def collect(value: Any) -> None:
        if isinstance(value, Tensor):
            flat.append(value.detach().float())
        elif isinstance(value, Mapping):
            for v in value.values():
                collect(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                collect(v)

    collect(out)
    return flat


def output_difference(reference: nn.Module, other: nn.Module, example_inputs: Any) -> tuple[float, float]:
    """The largest absolute difference between the two modules' outputs (eval mode; ``inf`` if ``other`` does not
    run or its outputs do not have the same shapes) and the largest absolute output of ``reference``."""
    want = _outputs(reference, example_inputs)
    scale = max((float(t.abs().max()) for t in want if t.numel()), default=0.0)
    try:
        got = _outputs(other, example_inputs)
    except Exception:
        return float("inf"), scale
    if len(got) != len(want) or any(a.shape != b.shape for a, b in zip(got, want, strict=True)):
        return float("inf"), scale
    diff = max((float((a - b).abs().max()) for a, b in zip(got, want, strict=True) if a.numel()), default=0.0)
    return diff, scale


def _matches(reference: nn.Module, other: nn.Module, example_inputs: Any) -> tuple[bool, float]:
    """Whether the outputs agree within :data:`RELATIVE_TOLERANCE`, and the largest difference."""
    diff, scale = output_difference(reference, other, example_inputs)
    return diff <= RELATIVE_TOLERANCE * max(scale, 1e-12), diff


def kept_positions(
    groups: list[ChannelGroup], keeps: Mapping[str, Tensor], shapes: Mapping[str, torch.Size]
) -> dict[str, dict[int, Tensor]]:
    """Per parameter that loses positions, per dimension, the surviving positions (sorted indices)."""
    result: dict[str, dict[int, Tensor]] = {}
    for g in groups:
        keep = keeps[g.name]
        if bool(keep.all()):
            continue
        for m in g.members:
            alive = position_keep(m, keep, shapes[m.param][m.dim])
            dims = result.setdefault(m.param, {})
            dims[m.dim] = dims[m.dim] & alive if m.dim in dims else alive
    return {p: {d: v.nonzero().flatten() for d, v in dims.items()} for p, dims in result.items()}


def slice_like(tensor: Tensor, positions: Mapping[int, Tensor]) -> Tensor:
    for dim, index in positions.items():
        tensor = tensor.index_select(dim, index.to(tensor.device))
    return tensor


def _apply(module: nn.Module, groups: list[ChannelGroup], keeps: Mapping[str, Tensor], inputs: Any) -> dict:
    """Remove the dropped channels of ``module`` in place and check every resized parameter exactly."""
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    positions = kept_positions(groups, keeps, {n: p.shape for n, p in before.items()})
    removed = {g.name: (~keeps[g.name]).nonzero().flatten().tolist() for g in groups}
    remove_channels(module, inputs, removed)
    after = dict(module.named_parameters())
    owner = {m.param: g.name for g in groups for m in g.members if not bool(keeps[g.name].all())}
    for name, old in before.items():
        if name not in after:
            raise TraceError(f"torch-pruning removed parameter {name!r} entirely")
        expected = slice_like(old, positions.get(name, {}))
        new = after[name]
        if new.shape != expected.shape or not torch.equal(new.detach(), expected):
            group = owner.get(name, "(none: this parameter belongs to no pruned group)")
            raise ValueError(
                f"Compaction of channel group {group!r} went wrong: torch-pruning left {name} with shape "
                f"{tuple(new.shape)}, expected the kept slice of shape {tuple(expected.shape)}."
            )
        new.requires_grad_(flags[name])
    return positions


def _check_outputs(
    reference: nn.Module, compacted: nn.Module, inputs: Any, groups: list[ChannelGroup], keeps: Mapping[str, Tensor]
) -> float:
    same, diff = _matches(reference, compacted, inputs)
    if same:
        return diff
    bad = [g.name for g in groups if not bool(keeps[g.name].all()) and not _group_compacts(reference, inputs, g, keeps)]
    raise ValueError(
        f"Compacting channel group(s) {', '.join(bad) or '(a combination of groups)'} changes the model's outputs "
        f"(largest difference {diff:.3g}): an operation the tracer does not see mixes these channels (channel "
        "slicing, shuffling or averaging). Leave the group(s) out with `exclude`."
    )


def _group_compacts(reference: nn.Module, inputs: Any, group: ChannelGroup, keeps: Mapping[str, Tensor]) -> bool:
    trial = copy.deepcopy(reference)
    try:
        _apply(trial, [group], {group.name: keeps[group.name]}, inputs)
    except ValueError:
        return False
    return _matches(reference, trial, inputs)[0]


def masked_copy(module: nn.Module) -> nn.Module:
    """A stand-alone copy of ``module`` with its masks applied to the weights and no mask set."""
    module = unwrap(module)
    masks = masks_of(module)
    result = copy.deepcopy(module)
    strip_masks(result)
    detach_compiled(result)
    with torch.no_grad():
        for name, param in result.named_parameters():
            if name in masks:
                param.mul_(masks[name].to(param.device))
    return result


def check_compactable(module: nn.Module, example_inputs: Any, groups: list[ChannelGroup]) -> None:
    """Drop the first channel of every group on a masked copy and compact another copy, then the same with the last
    channel (an operation that slices channels breaks on one of the two): a ``ValueError`` names each group whose
    compaction would change the outputs. Run before training, so a bad group is known at once."""
    for probe in (lambda g: torch.arange(g.channels) > 0, lambda g: torch.arange(g.channels) < g.channels - 1):
        reference = masked_copy(module)
        keeps = {g.name: probe(g) for g in groups}
        masks = channel_masks(groups, keeps, {n: p.shape for n, p in reference.named_parameters()})
        with torch.no_grad():
            for name, param in reference.named_parameters():
                if name in masks:
                    param.mul_(masks[name].to(param.device))
        trial = copy.deepcopy(reference)
        _apply(trial, groups, keeps, example_inputs)
        _check_outputs(reference, trial, example_inputs, groups, keeps)


def compact(module: nn.Module, example_inputs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``module`` with its masked channels physically removed, and a report.

    A channel is removed when every position of it on every member of its group is masked (what channel
    methods install). The copy is checked against the masked module (eval mode, ``example_inputs``): a
    ``ValueError`` names the group if any resized parameter is not the kept slice of the old one or the outputs
    differ by more than :data:`RELATIVE_TOLERANCE` relative; the original is never changed. Masks other than
    whole channels stay as zeros in the copy, which carries no mask set. A ``torch.compile`` wrapper is compacted
    through its original module (the result is not compiled).

    Returns:
        ``(new_module, report)`` where ``report`` holds ``params_before``, ``params_after``, ``flops_before``,
        ``flops_after``, ``max_abs_diff`` and ``groups`` (``{name: [kept, total]}`` for each group that shrank).
    """
    reference = masked_copy(module)
    groups = [g for g in trace_groups(reference, example_inputs) if g.unsupported is None]
    keeps = channel_keeps(groups, masks_of(unwrap(module)))
    groups = [g for g in groups if not bool(keeps[g.name].all())]
    compacted = copy.deepcopy(reference)
    try:
        _apply(compacted, groups, keeps, example_inputs)
    except TraceError as err:
        raise ValueError(f"Compaction failed: {err}") from err
    diff = _check_outputs(reference, compacted, example_inputs, groups, keeps)
    flops_before, _ = count_flops(reference, example_inputs)
    flops_after, _ = count_flops(compacted, example_inputs)
    report = {
        "params_before": sum(p.numel() for p in reference.parameters()),
        "params_after": sum(p.numel() for p in compacted.parameters()),
        "flops_before": flops_before,
        "flops_after": flops_after,
        "max_abs_diff": diff,
        "groups": {g.name: [int(keeps[g.name].sum()), g.channels] for g in groups},
    }
    return compacted, report


def compact_in_place(
    module: nn.Module, example_inputs: Any, groups: list[ChannelGroup], keeps: Mapping[str, Tensor]
) -> dict[str, dict[int, Tensor]]:
    """Remove the dropped channels (``keeps[group] == False``) from ``module`` itself, after the same removal on a
    copy passed the checks of :func:`compact`; the module's mask set follows (masks sliced like their
    parameters). Returns, per resized parameter and dimension, the surviving positions of the old parameter."""
    module = unwrap(module)
    groups = [g for g in groups if not bool(keeps[g.name].all())]
    if not groups:
        return {}
    reference = masked_copy(module)
    trial = copy.deepcopy(reference)
    _apply(trial, groups, keeps, example_inputs)
    _check_outputs(reference, trial, example_inputs, groups, keeps)
    mask_set = MaskSet.of(module)
    old_masks = {n: mask_set[n] for n in mask_set.names()}
    positions = _apply(module, groups, keeps, example_inputs)
    params = dict(module.named_parameters())
    for name, mask in old_masks.items():
        if name in positions:
            mask_set.replace(name, params[name], slice_like(mask, positions[name]))
        else:
            mask_set.add(name, params[name])
    return positions


def compact_to_shapes(
    module: nn.Module, example_inputs: Any, state_dict: Mapping[str, Tensor], groups: list[ChannelGroup] | None = None
) -> bool:
    """Compact ``module`` in place to the channel counts of ``state_dict`` (a checkpoint of a model compacted during
    training), so that it loads; which channels go does not matter, the loaded weights replace them. Returns
    whether anything changed."""
    module = unwrap(module)
    params = dict(module.named_parameters())
    if groups is None:
        groups = [g for g in trace_groups(module, example_inputs) if g.unsupported is None]
    keeps = {}
    for g in groups:
        producer = next((m for m in g.members if m.role == "producer"), None)
        saved = state_dict.get(producer.param) if producer is not None else None
        if saved is None or saved.shape == params[producer.param].shape:
            continue
        keep = torch.zeros(g.channels, dtype=torch.bool)
        keep[: saved.shape[producer.dim]] = True
        keeps[g.name] = keep
    if not keeps:
        return False
    for g in groups:
        keeps.setdefault(g.name, torch.ones(g.channels, dtype=torch.bool))
    mask_set = MaskSet.of(module)
    masks = channel_masks(groups, keeps, {n: p.shape for n, p in params.items()})
    for name, mask in masks.items():
        if name in mask_set:
            mask_set.update(name, mask)
        else:
            mask_set.add(name, params[name], mask)
    mask_set.apply_to_weights(params, list(masks))
    compact_in_place(module, example_inputs, groups, keeps)
    return True

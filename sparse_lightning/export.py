"""A trained checkpoint as a deployable model: masks applied, masked channels removed (``compact=True``), written as
a ``torch.export`` program (``.pt2``) when the model exports, else as a pickled module, with a JSON report."""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from sparse_lightning.core.errors import ConfigError
from sparse_lightning.core.masks import MaskSet, strip_masks
from sparse_lightning.structure.compact import compact, compact_to_shapes, count_flops, masked_copy


def _model_class(ckpt: Path, class_path: str | None) -> type:
    if class_path is None:
        for config in (ckpt.parent / "config.yaml", ckpt.parent.parent / "config.yaml"):
            if config.is_file():
                model = (yaml.safe_load(config.read_text()) or {}).get("model") or {}
                class_path = model.get("class_path") if isinstance(model, dict) else None
                if class_path:
                    break
    if class_path is None:
        raise ConfigError(
            f"{ckpt}: no config.yaml beside the checkpoint names the model class; pass --model CLASS_PATH."
        )
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"--model: no class {class_path!r}.") from None


def load_masked(ckpt: str | Path, class_path: str | None = None) -> nn.Module:
    """The LightningModule of a checkpoint with the masks its callbacks saved installed and applied."""
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise ConfigError(f"{ckpt}: no such checkpoint.")
    cls = _model_class(ckpt, class_path)
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    hparams = checkpoint.get("hyper_parameters", {})
    accepted = inspect.signature(cls).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        hparams = {k: v for k, v in hparams.items() if k in accepted}
    try:
        model = cls(**hparams)
    except TypeError as err:
        raise ConfigError(
            f"{ckpt}: {cls.__name__} can not be built from the checkpoint's hyperparameters: {err}"
        ) from None
    inputs = getattr(model, "example_input_array", None)
    if inputs is not None:  # a model compacted during training: take the checkpoint's shapes first
        compact_to_shapes(model, inputs, checkpoint["state_dict"])
        strip_masks(model)
    model.load_state_dict(checkpoint["state_dict"])
    params = dict(model.named_parameters())
    mask_set = MaskSet.of(model)
    for state in (checkpoint.get("callbacks") or {}).values():
        for name, mask in (state.get("masks") or {}).items() if isinstance(state, dict) else []:
            if name in params:
                mask_set.add(name, params[name], mask)
    mask_set.apply_to_weights(params)
    return model


def export_model(
    ckpt: str | Path,
    output: str | Path,
    class_path: str | None = None,
    compact_channels: bool = False,
    input_shape: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """Write the checkpoint's model to ``output`` and ``<output>.json``; returns the report.

    The report holds ``format`` (``torch.export`` or ``pickle``, with ``export_error`` when the program could not be
    exported), the file written and, with ``compact_channels``, the keys of :func:`~sparse_lightning.compact`.
    """
    model = load_masked(ckpt, class_path)
    inputs = torch.zeros(input_shape) if input_shape else getattr(model, "example_input_array", None)
    if inputs is None:
        raise ConfigError(
            "The model has no `example_input_array`; pass --input-shape (for example 1,3,224,224) to trace it."
        )
    if compact_channels:
        result, report = compact(model, inputs)
    else:
        result = masked_copy(model)
        params = sum(p.numel() for p in result.parameters())
        flops = count_flops(result, inputs)[0]
        report = {"params_before": params, "params_after": params, "flops_before": flops, "flops_after": flops}
    report["nonzero_params"] = sum(int((p != 0).sum()) for p in result.parameters())
    result.eval()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        program = _export(result, inputs)
        target = output.with_suffix(".pt2")
        torch.export.save(program, target)
        report["format"] = "torch.export"
    except Exception as err:  # any failure of the exporter: say why, and fall back
        target = output.with_suffix(".pt")
        torch.save(result, target)
        report["format"] = "pickle"
        report["export_error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    report["file"] = str(target)
    report_path = target.with_suffix(".json")
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    report["report"] = str(report_path)
    return report


def _export(module: nn.Module, inputs: Any) -> Any:
    """``torch.export`` with a dynamic batch dimension when the input is one tensor (exported on a batch of two, as a
    batch of one would be specialized), else with the example's shapes."""
    if isinstance(inputs, torch.Tensor) and inputs.dim() > 0:
        batch = inputs if inputs.shape[0] > 1 else torch.cat([inputs, inputs])
        try:
            return torch.export.export(module, (batch,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        except Exception:
            pass
    args = inputs if isinstance(inputs, tuple) else () if isinstance(inputs, dict) else (inputs,)
    return torch.export.export(module, args, kwargs=inputs if isinstance(inputs, dict) else None)

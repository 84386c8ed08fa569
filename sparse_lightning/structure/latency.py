"""Measured latency as a channel cost: a per-layer table timed on the current device, cached to a file.

Each convolution and linear layer is rebuilt at a grid of (input, output) channel counts and timed alone, forward
only, in eval mode without gradients, on an input of the shape it sees in the model (batch, spatial size); the
cost of the layer at other widths is read from the grid by bilinear interpolation. Everything else (norms,
activations, pooling, layers of other types) is the constant: the whole model's measured latency minus its layers'.
The table is stored as JSON with its key (the model's architecture, the input shapes, the device, the torch
version and the thread count); :func:`load_latency_table` refuses a file whose key is not this run's.

SMCP's reference reads such a table (per layer, by input and output channels) from a file measured on one GPU,
which is not in its repository; HALP (Shen et al. 2022) builds its table the same way.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map_only

from sparse_lightning.structure.groups import ChannelCost, ChannelGroup
from sparse_lightning.structure.tracer import detach_compiled, evaluating, forward, unwrap

TIMED_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
FORMAT_VERSION = 1


@dataclass
class LayerLatency:
    """Seconds of one layer's forward at each (input, output) width of the grid; a depthwise layer has one width
    axis (``ins == outs``, ``seconds`` diagonal only: ``seconds[i][0]``)."""

    ins: list[int]
    outs: list[int]
    seconds: list[list[float]]
    depthwise: bool = False

    def at(self, c_in: float, c_out: float) -> float:
        if self.depthwise:
            return _interpolate(self.ins, [row[0] for row in self.seconds], c_out)
        column = [_interpolate(self.outs, row, c_out) for row in self.seconds]
        return _interpolate(self.ins, column, c_in)


def _interpolate(grid: list[int], values: list[float], x: float) -> float:
    """Piecewise-linear in ``x`` through (grid, values); constant beyond the ends."""
    if x <= grid[0]:
        return values[0]
    for i in range(1, len(grid)):
        if x <= grid[i]:
            share = (x - grid[i - 1]) / (grid[i] - grid[i - 1])
            return values[i - 1] + (values[i] - values[i - 1]) * share
    return values[-1]


@dataclass
class LatencyTable:
    """A model's measured latency: ``total`` seconds dense, and per layer weight name its :class:`LayerLatency`."""

    key: dict[str, Any]
    total: float
    layers: dict[str, LayerLatency] = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps({"format": FORMAT_VERSION, **self.to_dict()}, indent=1))
        tmp.replace(path)

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "total": self.total, "layers": {n: vars(v) for n, v in self.layers.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyTable:
        if data.get("format", FORMAT_VERSION) != FORMAT_VERSION:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT_VERSION}")
        layers = {n: LayerLatency(**v) for n, v in data["layers"].items()}
        return cls(dict(data["key"]), float(data["total"]), layers)


def device_name(device: torch.device) -> str:
    """``cuda:<GPU name>``, or ``cpu:<processor model>`` (``/proc/cpuinfo``'s model name where there is one)."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    processor = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        processor = names[0] if names else processor
    return f"{device.type}:{processor}"


def _shapes(inputs: Any) -> Any:
    if isinstance(inputs, Tensor):
        return list(inputs.shape)
    if isinstance(inputs, Mapping):
        return {k: _shapes(v) for k, v in sorted(inputs.items())}
    if isinstance(inputs, (tuple, list)):
        return [_shapes(v) for v in inputs]
    return repr(inputs)


def latency_key(module: nn.Module, inputs: Any, device: torch.device | None = None) -> dict[str, Any]:
    """What a table is valid for: the architecture (class and a hash of its module tree and parameter shapes), the
    input shapes, the device (default: the module's), the torch version and, on the CPU, the thread count."""
    module = unwrap(module)
    if device is None:
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
    architecture = repr(module) + repr([(n, tuple(p.shape)) for n, p in module.named_parameters()])
    key = {
        "model": f"{type(module).__name__}:{hashlib.sha256(architecture.encode()).hexdigest()[:16]}",
        "input_shape": _shapes(inputs),
        "device": device_name(device),
        "torch": str(torch.__version__),
    }
    if device.type == "cpu":
        key["threads"] = torch.get_num_threads()
    return key


def cache_path(key: Mapping[str, Any]) -> Path:
    """Where a table for ``key`` is cached: ``$SPARSE_LIGHTNING_CACHE`` (default ``$XDG_CACHE_HOME/sparse_lightning``,
    ``~/.cache/sparse_lightning``) ``/latency/latency-<model class>-<hash of the key>.json``."""
    root = os.environ.get("SPARSE_LIGHTNING_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "sparse_lightning"
    )
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(root, "latency", f"latency-{key['model'].split(':')[0]}-{digest}.json")


def load_latency_table(path: str | os.PathLike, key: Mapping[str, Any]) -> LatencyTable:
    """The table in ``path``; ``ValueError`` when it is missing, unreadable or measured for another ``key``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"Latency table {str(path)!r} does not exist. Leave `latency_table` unset to measure one on this device "
            "(it is cached and reused), or give the path of a table measured for this model."
        )
    try:
        data = json.loads(path.read_text())
        table = LatencyTable.from_dict(data)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"Latency table {str(path)!r} can not be read: {type(err).__name__}: {err}") from None
    differences = [
        f"{name}: table {table.key.get(name)!r}, this run {value!r}"
        for name, value in key.items()
        if table.key.get(name) != value
    ]
    if differences:
        raise ValueError(
            f"Latency table {str(path)!r} was measured for something else (" + "; ".join(differences) + "). "
            "Measure a new one: leave `latency_table` unset, or delete the file."
        )
    return table


def _seconds(call: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median seconds of ``call`` over ``repeats`` timed runs after two warm-up runs."""
    times = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        begin = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def width_grid(size: int, points: int, round_to: int) -> list[int]:
    """``points`` widths from the smallest allowed (``round_to``, or 1) to ``size``, rounded to multiples of
    ``round_to`` (``size`` itself always included)."""
    smallest = min(round_to, size)
    grid = {size, smallest}
    for k in range(1, points - 1):
        width = smallest + (size - smallest) * k / (points - 1)
        grid.add(min(size, max(smallest, round(width / round_to) * round_to)))
    return sorted(grid)


def _rebuilt(layer: nn.Module, c_in: int, c_out: int) -> nn.Module:
    if isinstance(layer, nn.Linear):
        return nn.Linear(c_in, c_out, bias=layer.bias is not None)
    depthwise = layer.groups > 1 and layer.groups == layer.in_channels == layer.out_channels
    if layer.groups > 1 and not depthwise:
        raise ValueError(f"grouped convolution {layer} can not be timed at other widths")
    return type(layer)(
        c_in,
        c_out,
        layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=c_out if depthwise else 1,
        bias=layer.bias is not None,
        padding_mode=layer.padding_mode,
    )


def measure_latency(
    module: nn.Module,
    inputs: Any,
    *,
    points: int = 6,
    round_to: int = 1,
    repeats: int = 7,
    device: torch.device | str | None = None,
    progress: Callable[[str], None] | None = None,
) -> LatencyTable:
    """Time ``module`` on ``inputs`` and each of its Conv1d/2d/3d and Linear layers on a grid of ``points`` input
    and output widths (see the module docstring), in the module's dtype, on ``device`` (default: the module's; a
    copy is timed when they differ)."""
    model = unwrap(module)
    own = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = own if device is None else torch.device(device)
    if device != own:
        module = model = copy.deepcopy(model)
        detach_compiled(model)
        model.to(device)
        inputs = tree_map_only(Tensor, lambda t: t.to(device), inputs)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, TIMED_LAYERS)}
    seen: dict[str, tuple[torch.Size, torch.dtype]] = {}

    def record(name: str, args: tuple[Any, ...]) -> None:
        seen.setdefault(name, (args[0].shape, args[0].dtype))

    hooks = [m.register_forward_pre_hook(lambda _m, args, n=n: record(n, args)) for n, m in layers.items()]
    try:
        with evaluating(model), torch.no_grad():
            forward(module, inputs)
            total = _seconds(lambda: forward(module, inputs), device, repeats)
            table = LatencyTable(latency_key(module, inputs), total)
            for i, (name, (shape, dtype)) in enumerate(seen.items()):
                if progress is not None:
                    progress(f"latency table: layer {i + 1}/{len(seen)} ({name})")
                table.layers[f"{name}.weight"] = _layer_latency(
                    layers[name], shape, dtype, device, points, round_to, repeats
                )
    finally:
        for hook in hooks:
            hook.remove()
    return table


def _layer_latency(
    layer: nn.Module,
    shape: torch.Size,
    dtype: torch.dtype,
    device: torch.device,
    points: int,
    round_to: int,
    repeats: int,
) -> LayerLatency:
    linear = isinstance(layer, nn.Linear)
    size_in, size_out = (layer.in_features, layer.out_features) if linear else (layer.in_channels, layer.out_channels)
    depthwise = not linear and layer.groups > 1 and layer.groups == size_in == size_out
    ins = width_grid(size_in, points, round_to)
    outs = ins if depthwise else width_grid(size_out, points, round_to)
    channel_dim = len(shape) - 1 if linear else 1
    seconds = []
    for c_in in ins:
        x_shape = list(shape)
        x_shape[channel_dim] = c_in
        x = torch.randn(x_shape, dtype=dtype, device=device)
        row = []
        for c_out in [c_in] if depthwise else outs:
            timed = _rebuilt(layer, c_in, c_out).to(device=device, dtype=dtype).eval()
            row.append(_seconds(functools.partial(timed, x), device, repeats))
        seconds.append(row)
    return LayerLatency(ins, outs, seconds, depthwise)


class LatencyCost(ChannelCost):
    """:class:`ChannelCost` in measured seconds: a layer's weight costs its table's latency at the layer's kept
    input and output widths; the rest of the model is the table's constant."""

    def __init__(
        self,
        groups: list[ChannelGroup],
        shapes: Mapping[str, torch.Size],
        table: LatencyTable,
        dense: float | None = None,
    ) -> None:
        missing = sorted(
            {m.param for g in groups for m in g.members if m.role in ("producer", "consumer")} - set(table.layers)
        )
        if missing:
            raise ValueError(
                f"The latency table times Conv1d/2d/3d and Linear layers only; {', '.join(missing)} has none."
            )
        dense_seconds = {n: layer.at(layer.ins[-1], layer.outs[-1]) for n, layer in table.layers.items()}
        self.table = table
        super().__init__(groups, shapes, dense_seconds, table.total, "latency", dense)

    def param_cost(self, param: str, kept: Mapping[int, float]) -> float:
        return self.table.layers[param].at(*_widths(self.shapes[param], self.table.layers[param], kept))


def _widths(shape: torch.Size, layer: LayerLatency, kept: Mapping[int, float]) -> tuple[float, float]:
    """A weight's (input, output) widths: kept counts where given, else its full size (a Linear or convolution
    weight is (out, in, ...); a depthwise one's input width is its output width)."""
    c_out = kept.get(0, shape[0])
    c_in = c_out if layer.depthwise else kept.get(1, shape[1])
    return c_in, c_out

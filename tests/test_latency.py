"""The latency cost: the measured table, its cache and key, the cost it gives, and SMCP under a latency budget."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from helpers import QUIET, TinyNet, flop_seconds, tiny_loader
from lightning.pytorch.callbacks import ModelCheckpoint
from test_gradual import StopAfter
from torch import nn

from sparse_lightning import SoftMaskChannelPruning
from sparse_lightning.structure import latency
from sparse_lightning.structure.groups import ChannelGroup, Member
from sparse_lightning.structure.latency import (
    LatencyCost,
    LatencyTable,
    LayerLatency,
    cache_path,
    latency_key,
    load_latency_table,
    measure_latency,
    width_grid,
)


class Tiny(TinyNet):
    example_input_array = torch.zeros(2, 16)


@pytest.fixture
def flop_timer(monkeypatch):
    """Layers 'take' 1e-9 s per FLOP (+1 us), so tables are exact and costs reachable on tiny models."""
    monkeypatch.setattr(latency, "_seconds", flop_seconds)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_LIGHTNING_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_layer_latency_interpolates_bilinearly_and_holds_beyond_the_grid():
    layer = LayerLatency(ins=[1, 5], outs=[2, 4, 8], seconds=[[1.0, 2.0, 4.0], [5.0, 6.0, 12.0]])
    assert layer.at(1, 2) == 1.0 and layer.at(5, 8) == 12.0
    assert layer.at(3, 3) == pytest.approx(0.5 * 1.5 + 0.5 * 5.5)  # halfway in both directions
    assert layer.at(5, 6) == pytest.approx(9.0)
    assert layer.at(0, 0) == 1.0 and layer.at(9, 9) == 12.0
    depthwise = LayerLatency(ins=[1, 3], outs=[1, 3], seconds=[[2.0], [4.0]], depthwise=True)
    assert depthwise.at(99, 2) == pytest.approx(3.0)  # one axis: the output width


def test_width_grid():
    assert width_grid(64, 5, 8) == [8, 24, 32, 48, 64]
    assert width_grid(10, 4, 1) == [1, 4, 7, 10]
    assert width_grid(4, 6, 8) == [4]  # a layer narrower than round_to has one width


def test_measure_times_each_layer_rebuilt_at_each_width_on_its_own_input(flop_timer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, stride=2), nn.Flatten())
    model.append(nn.Linear(8 * 7 * 7, 10))
    x = torch.randn(4, 3, 16, 16)
    table = measure_latency(model, x, points=3, round_to=4)
    assert set(table.layers) == {"0.weight", "2.weight", "4.weight"}
    conv = table.layers["2.weight"]
    assert conv.ins == [4, 8, 16] and conv.outs == [4, 8]
    for i, c_in in enumerate(conv.ins):
        for j, c_out in enumerate(conv.outs):  # 2 x batch x out positions x c_out x c_in x 9 multiply-adds
            assert conv.seconds[i][j] == pytest.approx(1e-9 * 2 * 4 * 49 * c_out * c_in * 9 + 1e-6)
    fc = table.layers["4.weight"]
    assert fc.seconds[-1][-1] == pytest.approx(1e-9 * 2 * 4 * 392 * 10 + 1e-6)
    assert table.total == pytest.approx(flop_seconds(lambda: model(x), None, 1))
    assert table.key == latency_key(model, x)
    assert table.key["input_shape"] == [4, 3, 16, 16] and table.key["torch"] == torch.__version__


def test_real_timing_grows_with_width():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(128, 128, 3, padding=1))
    table = measure_latency(model, torch.randn(2, 128, 32, 32), points=2, repeats=5)
    seconds = table.layers["0.weight"].seconds  # 16384x the multiply-adds at full width
    assert seconds[-1][-1] > 3 * seconds[0][0] > 0


def _groups() -> tuple[list[ChannelGroup], dict[str, torch.Size]]:
    """Two linear layers a (4 -> 6) and b (6 -> 2): one group of a's 6 outputs, b's 6 inputs."""
    six = torch.arange(6)
    group = ChannelGroup(
        "a", 6, [Member("a.weight", 0, six, six, "producer"), Member("b.weight", 1, six, six, "consumer")]
    )
    return [group], {"a.weight": torch.Size([6, 4]), "b.weight": torch.Size([2, 6])}


def test_latency_cost_reads_the_table_at_the_kept_widths():
    groups, shapes = _groups()
    table = LatencyTable(
        {},
        total=10.0,
        layers={
            "a.weight": LayerLatency([4], [2, 6], [[1.0, 3.0]]),  # 1 + 0.5 per output above 2
            "b.weight": LayerLatency([2, 6], [2], [[2.0], [4.0]]),
        },
    )
    cost = LatencyCost(groups, shapes, table)
    assert cost.constant == pytest.approx(10.0 - 3.0 - 4.0) and cost.current() == pytest.approx(10.0)
    removed = cost.drop("a", torch.tensor([0, 1]))  # 4 kept: a costs 2.0, b costs 3.0
    assert removed == pytest.approx(2.0) and cost.removed_fraction() == pytest.approx(0.2)
    with pytest.raises(ValueError, match="b.weight has none"):
        LatencyCost(groups, shapes, LatencyTable({}, 1.0, {"a.weight": table.layers["a.weight"]}))


def test_table_file_round_trip_and_refusals(tmp_path, flop_timer):
    model, x = Tiny(), torch.zeros(2, 16)
    table = measure_latency(model, x, points=3)
    path = tmp_path / "table.json"
    table.save(path)
    assert load_latency_table(path, latency_key(model, x)) == table
    with pytest.raises(ValueError, match="does not exist"):
        load_latency_table(tmp_path / "missing.json", table.key)
    with pytest.raises(ValueError, match=r"input_shape: table \[2, 16\], this run \[8, 16\]"):
        load_latency_table(path, latency_key(model, torch.zeros(8, 16)))
    data = json.loads(path.read_text())
    data["key"]["torch"] = "1.13.0"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"torch: table '1.13.0', this run"):
        load_latency_table(path, table.key)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="can not be read"):
        load_latency_table(path, table.key)


def _fit(root, epochs=4, callbacks=(), ckpt_path=None, **kwargs):
    torch.manual_seed(0)
    model = Tiny("adam", lr=0.01)
    pruning = SoftMaskChannelPruning(
        **{"sparsity": 0.5, "cost": "latency", "round_to": 1, "start": 2, "end": 26, "every": 3, **kwargs}
    )
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[pruning, *callbacks],
        default_root_dir=root,
        **{**QUIET, "enable_checkpointing": True},
    )
    trainer.fit(model, tiny_loader(), ckpt_path=ckpt_path)
    return model, pruning


def test_smcp_under_a_latency_budget_measures_once_then_reuses_the_cache(tmp_path, cache, flop_timer, monkeypatch):
    calls = []
    monkeypatch.setattr(
        "sparse_lightning.callbacks.smcp.measure_latency", lambda *a, **k: calls.append(1) or measure_latency(*a, **k)
    )
    model, pruning = _fit(tmp_path / "a", log_sparsity=False)
    assert calls == [1]
    (path,) = (cache / "latency").iterdir()
    assert path == cache_path(latency_key(model, model.example_input_array))
    assert pruning.hard and pruning.removed_fraction >= 0.5
    exact = LatencyCost(pruning.groups, {n: p.shape for n, p in model.named_parameters()}, load_latency_table(path, {}))
    for name, keep in pruning.keeps.items():
        exact.drop(name, (~keep).nonzero().flatten())
    assert exact.removed_fraction() == pytest.approx(pruning.removed_fraction) and exact.removed_fraction() >= 0.5
    _, again = _fit(tmp_path / "b", log_sparsity=False)
    assert calls == [1], "the second run must read the cached table"
    assert again.latency == pruning.latency


def test_smcp_refuses_a_missing_or_mismatching_table(tmp_path, cache, flop_timer):
    with pytest.raises(ValueError, match="missing.json' does not exist"):
        _fit(tmp_path, latency_table=tmp_path / "missing.json")
    other = measure_latency(Tiny(), torch.zeros(5, 16), points=2)
    other.save(tmp_path / "other.json")
    with pytest.raises(ValueError, match=r"SoftMaskChannelPruning: Latency table .*\(input_shape: table \[5, 16\]"):
        _fit(tmp_path, latency_table=tmp_path / "other.json")


def test_resume_solves_with_the_checkpoints_table(tmp_path, cache, flop_timer, monkeypatch):
    straight, straight_pruning = _fit(tmp_path / "a", log_sparsity=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    _fit(tmp_path / "b", callbacks=[ckpt, StopAfter(2)], log_sparsity=False)
    state = torch.load(tmp_path / "ckpt" / "epoch=1.ckpt", weights_only=True)  # the table is plain data
    assert any(v.get("latency") for v in state["callbacks"].values())
    for path in (cache / "latency").iterdir():
        path.unlink()  # the resumed run would measure a different table ...
    monkeypatch.setattr(latency, "_seconds", lambda *a: flop_seconds(*a, scale=3e-9) + 1e-5)
    resumed, pruning = _fit(tmp_path / "c", ckpt_path=tmp_path / "ckpt" / "epoch=1.ckpt", log_sparsity=False)
    assert pruning.latency == straight_pruning.latency  # ... but solves with the checkpoint's
    assert pruning._cost.dense == straight_pruning._cost.dense
    assert pruning.removed_fraction == straight_pruning.removed_fraction
    for name, keep in straight_pruning.keeps.items():
        assert torch.equal(keep, pruning.keeps[name]), name
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_bad_latency_arguments():
    with pytest.raises(ValueError, match="`latency_table` is for `cost='latency'`"):
        SoftMaskChannelPruning(latency_table="t.json")
    with pytest.raises(TypeError, match="`latency_table` must be a path"):
        SoftMaskChannelPruning(cost="latency", latency_table=3)
    with pytest.raises(ValueError, match="`latency_points`"):
        SoftMaskChannelPruning(cost="latency", latency_points=1)
    with pytest.raises(ValueError, match="`cost` must be one of"):
        SoftMaskChannelPruning(cost="seconds")

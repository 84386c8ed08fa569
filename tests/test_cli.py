import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI
from wandb_records import history, read_records

from sparse_lightning import masks_of
from sparse_lightning.cli import main

RECIPES = Path(__file__).parents[1] / "recipes"


def test_fit_a_shipped_recipe_logs_to_wandb_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))  # wandb keeps the last run's directory otherwise
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    args = [
        "fit",
        "--recipe",
        str(RECIPES / "gmp-90-global.yaml"),
        "--var",
        "epochs=2",
        "--trainer.limit_train_batches=10",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.limit_val_batches=1",
        "--log-model",
    ]
    assert main(args) == 0
    import wandb

    wandb.finish()
    wandb.teardown()  # the W&B service writes the run file to its end before it stops
    assert "logging offline" in capsys.readouterr().err
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    rows = [r for r in history(run_file) if "sparsity/global" in r]
    values = [r["sparsity/global"] for r in rows]
    assert len(values) == 20 and values[0] == 0.0 and values[-1] == pytest.approx(0.9, abs=1e-3)
    configs = {}
    for record in read_records(run_file):
        if record.WhichOneof("record_type") == "config":
            configs.update({item.key: json.loads(item.value_json) for item in record.config.update})
    assert configs["recipe"]["name"] == "gmp-90-global"
    assert configs["recipe"]["stages"][0]["methods"][0]["args"]["sparsity"] == 0.9
    artifacts = [r.artifact for r in read_records(run_file) if r.WhichOneof("record_type") == "artifact"]
    (model,) = [a for a in artifacts if a.type == "model"]
    metadata = json.loads(model.metadata)
    assert metadata["recipe"] == "gmp-90-global" and metadata["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert [f.path for f in model.manifest.contents] == ["final-sparse.ckpt"]


def test_lightning_cli_config_can_name_the_callback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # LightningCLI saves its config.yaml in the working directory
    config = {
        "trainer": {
            "max_epochs": 1,
            "limit_train_batches": 6,
            "limit_val_batches": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "callbacks": [
                {
                    "class_path": "sparse_lightning.GradualMagnitudePruning",
                    "init_args": {"sparsity": 0.5, "start": 1, "end": 4, "every": 1, "include": ["net.linear.weight"]},
                }
            ],
        },
        "model": {"class_path": "sparse_lightning.models.MNIST1DCNN"},
        "data": {"class_path": "sparse_lightning.data.MNIST1DDataModule"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = LightningCLI(
        args=["fit", "--config", str(path)],
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
    )
    masks = masks_of(cli.model)
    assert list(masks) == ["net.linear.weight"]
    assert 1 - masks["net.linear.weight"].float().mean().item() == pytest.approx(0.5)
    assert torch.all(cli.model.net.linear.weight[~masks["net.linear.weight"]] == 0)


def test_user_error_during_setup_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text((RECIPES / "gmp-2of4.yaml").read_text())
    args = [
        "fit",
        "--recipe",
        str(recipe),
        "--model",
        "sparse_lightning.models.MNIST1DCNN",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "'net.conv1.weight' of shape (25, 1, 5) is too small for pattern 2:4" in err and "Traceback" not in err


def test_log_model_without_wandb_is_refused_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--recipe", str(RECIPES / "gmp-90-global.yaml"), "--log-model", "--trainer.logger=false"]
    assert main(args) == 2
    assert "--log-model needs the W&B logger" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"end": 400}, "`end`=400 is optimizer step 400, but training has only 72 steps"),
        ({"start": 50, "end": 40}, "`end`=40 (step 40) must come after `start`=50 (step 50)"),
        ({"every": "0.01ep"}, "`every`=0.01ep resolves to 0 steps; it must be at least 1"),
    ],
)
def test_validate_and_fit_give_the_same_error_for_a_bad_schedule(tmp_path, monkeypatch, capsys, args, message):
    """72 steps: 2 epochs of 36 batches of MNIST-1D; both read the one rule (`Timeline.window`)."""
    monkeypatch.chdir(tmp_path)
    recipe = yaml.safe_load((RECIPES / "gmp-90-global.yaml").read_text())
    recipe["variables"]["epochs"] = 2
    recipe["stages"][0]["methods"][0]["args"].update(args)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["recipes", "validate", str(path)]) == 2
    validate_err = capsys.readouterr().err
    fit = ["fit", "--recipe", str(path), "--trainer.logger=false", "--trainer.enable_progress_bar=false"]
    assert main(fit) == 2
    fit_err = capsys.readouterr().err
    assert message in validate_err and message in fit_err, (validate_err, fit_err)
    assert "Traceback" not in validate_err + fit_err


def test_the_saved_config_reproduces_the_run_and_the_summary_is_printed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    flags = ["--trainer.limit_train_batches=5", "--trainer.enable_progress_bar=false", "--trainer.logger=false"]
    assert main(["fit", "--recipe", str(RECIPES / "gmp-90-global.yaml"), "--var", "epochs=2", *flags]) == 0
    first = capsys.readouterr().out
    summary = first[first.index("== gmp-90-global") :]
    assert "test/acc" in summary and "sparsity (masked)      0.8999 over 4 parameter(s)" in summary  # 4612 of 5125
    assert "net.conv2.weight" in summary and "non-zero parameters" in summary and "checkpoint" in summary
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    (callback,) = config["trainer"]["callbacks"]
    assert callback["class_path"] == "sparse_lightning.callbacks.gradual.GradualMagnitudePruning"
    assert callback["init_args"]["sparsity"] == 0.9 and callback["init_args"]["start"] == 0.1
    (tmp_path / "config.yaml").rename(tmp_path / "run.yaml")
    assert main(["fit", "--config", str(tmp_path / "run.yaml")]) == 0
    again = capsys.readouterr().out
    assert again[again.index("== run summary") :].splitlines()[1:-1] == summary.splitlines()[1:-1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--var", "epochs=-5"], "trainer.max_epochs: must be an int >= -1, got -5"),
        (["--var", "epochs=ten"], "trainer.max_epochs: must be an int >= -1, got 'ten'"),
        (["--trainer.max_epochs=-3"], "`max_epochs` must be a non-negative integer or -1. You passed in -3"),
        (["--trainer.max_epochs=abc"], "--trainer.max_epochs=abc: Expected a int"),
        (["--trainer.accelerator=gpu"], "Trainer: No supported gpu backend found!"),
        (["--trainer.devices=abc"], "Trainer: `devices` selected with `CPUAccelerator` should be an int > 0"),
        (["--trainer.precision=13"], "--trainer.precision=13: Expected a typing.Literal"),
        (["--model", "torchvision.models.resnet999"], "module 'torchvision.models' has no attribute 'resnet999'"),
        (["--trainer.foo=1"], "unrecognized arguments: --trainer.foo=1"),
    ],
)
def test_user_errors_at_the_front_door_are_one_line(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--recipe", str(RECIPES / "gmp-90-global.yaml"), "--trainer.logger=false", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    (line,) = [e for e in err.splitlines() if e.startswith("sparse-lightning: error:")]
    assert len(line) < 450


def test_help_works_without_a_recipe_and_names_the_recipe_options(capsys):
    assert main(["fit", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--recipe FILE", "--var NAME=VALUE", "--log-model", "--trainer.max_epochs"):
        assert option in out
    assert main(["fit", "--recipe", str(RECIPES / "gmp-90-global.yaml"), "--help"]) == 0
    assert "gmp-90-global.yaml defines: sparsity=0.9, epochs=60" in capsys.readouterr().out
    assert main(["fit"]) == 2
    assert "needs --recipe FILE" in capsys.readouterr().err


def test_recipe_list_aligns_and_unknown_top_level_keys_are_named(tmp_path, capsys):
    assert main(["recipes", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    column = lines[0].index("description")
    assert all(line[column - 2 : column] == "  " and line[column] != " " for line in lines[1:])
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndescription: y\nstagez: []\n")
    assert main(["recipes", "validate", str(bad)]) == 2
    assert "stagez: unknown key" in capsys.readouterr().err


def test_ddp_from_the_command_starts_every_rank_with_the_recipe(tmp_path):
    """Lightning's DDP launcher starts the other ranks with ``sys.argv``: the command must leave it intact."""
    cmd = [sys.executable, "-m", "sparse_lightning.cli", "fit", "--recipe", "gmp-90-global", "--var", "epochs=2"]
    flags = [
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.logger=false",
        "--trainer.limit_train_batches=4",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "WANDB_MODE": "offline"}
    result = subprocess.run(
        [*cmd, *flags, "--trainer.enable_progress_bar=false"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "sparsity (masked)      0.8999 over 4 parameter(s)" in result.stdout

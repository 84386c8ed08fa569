"""The SparseML importer on recipe fixtures written for every case real recipes raise: recipe cards after a licence
comment, text variables and numbers written as text, list mask types, __ALL__ / __ALL_PRUNABLE__, global_sparsity,
refusals (one line each, naming the modifier and field), OBS/oBERT, AC/DC, learning-rate and weight-decay modifiers,
naming hints; converted AC/DC and oBERT-style recipes train on MNIST-1D."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import QUIET

from sparse_lightning import masks_of
from sparse_lightning.cli import main
from sparse_lightning.recipes import load
from sparse_lightning.recipes.sparseml import PRUNABLE, convert_sparseml

FIXTURES = Path(__file__).parent / "fixtures" / "sparseml"


def test_gmp_recipe_with_variables_eval_and_its_learning_rate_schedule(tmp_path, capsys):
    recipe, problems = convert_sparseml(FIXTURES / "gmp_resnet.yaml", prefix="net.")
    assert recipe["trainer"] == {"max_epochs": 10} and problems == []
    lr, gmp = recipe["stages"]
    assert lr["methods"] == [
        {
            "method": "lr_function",
            "args": {"start": "0ep", "end": "10ep", "function": "cosine", "init_lr": 0.1, "final_lr": 0.001},
        }
    ]
    assert (gmp["start"], gmp["end"]) == ("1ep", "7ep")
    assert gmp["methods"] == [
        {
            "method": "gradual_magnitude",
            "args": {
                "distribution": "uniform",
                "initial_sparsity": 0.05,
                "every": "0.5ep",
                "curve": "cubic",
                "pattern": "unstructured",
                "sparsity": 0.85,
                "include": [PRUNABLE],
            },
        }
    ]
    out = tmp_path / "converted.yaml"
    assert main(["recipes", "import-sparseml", str(FIXTURES / "gmp_resnet.yaml"), "-o", str(out)]) == 0
    schedule, pruning = load(out).callbacks
    assert pruning.sparsity == 0.85 and pruning.every_spec.text == "0.5ep" and schedule.function == "cosine"
    assert "wrote" in capsys.readouterr().err


def test_a_recipe_card_after_a_licence_comment_with_text_variables_list_masks_all_and_global(capsys):
    recipe, problems = convert_sparseml(FIXTURES / "card_with_licence.md")
    assert recipe["trainer"] == {"max_epochs": 8}
    constant, gmp, blocks = recipe["stages"]
    assert constant["methods"][0]["args"] == {"start": "0ep", "function": "constant", "init_lr": 0.005}  # "5e-3"
    args = gmp["methods"][0]["args"]
    assert args["include"] == ["*"]  # __ALL__: every parameter, biases and norms included, as SparseML
    assert args["distribution"] == "global"  # global_sparsity: True
    assert (args["curve"], args["pattern"]) == ("linear", "unstructured")  # eval(inter_func), eval(mask_type)
    assert gmp["end"] == "6ep"  # eval(num_epochs - 2)
    assert blocks["methods"][0]["args"]["pattern"] == "block:1x4"  # mask_type: [1, 4]
    assert problems == ["modifiers[4] !DistillationModifier: distillation is not part of sparse-lightning; left out."]


def test_a_tutorial_gives_the_first_fenced_block_that_parses_as_a_recipe():
    """An inline ```code``` on one line opens no block; a block that does not parse is passed over."""
    recipe, problems = convert_sparseml(FIXTURES / "tutorial.md")
    assert recipe["trainer"] == {"max_epochs": 10} and problems == []
    args = recipe["stages"][0]["methods"][0]["args"]
    assert (args["sparsity"], args["pattern"], args["every"]) == (0.8, "unstructured", "0.5ep")  # [1, 1] blocks


def test_refusals_are_one_line_each_naming_the_modifier_and_the_field():
    recipe, problems = convert_sparseml(FIXTURES / "refusals.yaml")
    assert problems == [
        "modifiers[0] !GMPruningModifier.init_sparsity: __FROM_PARAM__ (start from each parameter's current "
        "sparsity) is not served; write the number; modifier left out.",
        "modifiers[1] !GMPruningModifier.init_sparsity: 0.9 is above final_sparsity 0.8; modifier left out.",
        "modifiers[2] !GMPruningModifier.final_sparsity: eval(missing + 1): 'missing' is not a variable of the "
        "recipe; modifier left out.",
    ]
    (stage,) = recipe["stages"]
    assert stage["methods"][0]["args"]["distribution"] == "uniform"  # GlobalMagnitude with global_sparsity: False


def test_nothing_is_written_or_printed_when_the_conversion_does_not_validate(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "modifiers:\n  - !GMPruningModifier\n    params: __ALL_PRUNABLE__\n    final_sparsity: 0.9\n"
        "    start_epoch: 5.0\n    end_epoch: 2.0\n    update_frequency: 1.0\n"
    )
    out = tmp_path / "out.yaml"
    assert main(["recipes", "import-sparseml", str(path), "-o", str(out)]) == 2
    err = capsys.readouterr()
    assert not out.exists() and err.out == ""
    assert str(path) in err.err and "out.yaml" not in err.err and "must come after" in err.err
    assert len(err.err.strip().splitlines()) == 1


def test_a_yaml_error_is_one_line_with_the_line_number(tmp_path, capsys):
    path = tmp_path / "broken.md"
    path.write_text("<!-- licence -->\n---\nmodifiers:\n  - !GMPruningModifier\n    params: [a\n---\n")
    assert main(["recipes", "import-sparseml", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "YAML syntax error at line" in err


def test_obert_and_acdc_and_the_learning_rate_modifiers_convert():
    obert, problems = convert_sparseml(FIXTURES / "obert.yaml")
    args = obert["stages"][1]["methods"][0]["args"]
    assert obert["stages"][1]["methods"][0]["method"] == "mfac_pruning"
    assert (args["num_grads"], args["block_size"], args["damp"], args["recomputations"]) == (16, 8, 1e-7, 1)
    assert (args["distribution"], args["initial_sparsity"], args["sparsity"]) == ("global", 0.3, 0.7)
    assert problems == ["modifiers[2] !OBSPruningModifier.grad_sampler_kwargs: not converted."]
    acdc, problems = convert_sparseml(FIXTURES / "acdc.yaml")
    assert problems == []
    phases, multistep, decay = (s["methods"][0] for s in acdc["stages"])
    # SparseML: dense epochs 0-1, compressed 2-3, dense 4-5, compressed 6-7, dense 8-9, compressed 10 on
    assert phases == {
        "method": "acdc",
        "args": {
            "sparsity": 0.8,
            "start": "2ep",
            "end": "10ep",
            "phase": "2ep",
            "distribution": "global",
            "reset_momentum": True,
            "include": [PRUNABLE],
        },
    }
    assert multistep["args"] == {
        "start": "0ep",
        "function": "multistep",
        "init_lr": 0.01,
        "gamma": 0.1,
        "milestones": ["6ep", "9ep"],
    }
    assert decay == {"method": "weight_decay", "args": {"weight_decay": 0.0001, "start": "2ep"}}


def test_all_prunable_includes_embeddings_and_gpt_conv1d():
    from torch import nn

    from sparse_lightning.core.targets import select_parameters

    class Conv1D(nn.Module):  # transformers' GPT-2 layer: a Linear with its weight transposed
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(4, 8))
            self.bias = nn.Parameter(torch.zeros(8))

    model = nn.ModuleDict(
        {"embed": nn.Embedding(10, 4), "attn": Conv1D(), "fc": nn.Linear(8, 2), "norm": nn.LayerNorm(2)}
    )
    assert select_parameters(model, [PRUNABLE]) == ["embed.weight", "attn.weight", "fc.weight"]


@pytest.mark.parametrize(("fixture", "epochs"), [("acdc.yaml", 12), ("obert.yaml", 6)])
def test_converted_acdc_and_obert_recipes_train_on_mnist1d(tmp_path, fixture, epochs):
    from sparse_lightning.data import MNIST1DDataModule
    from sparse_lightning.models import MNIST1DCNN

    out = tmp_path / "converted.yaml"
    assert main(["recipes", "import-sparseml", str(FIXTURES / fixture), "-o", str(out)]) == 0
    loaded = load(out)
    assert loaded.recipe.trainer["max_epochs"] == epochs
    torch.manual_seed(0)
    model = MNIST1DCNN(channels=8)
    trainer = pl.Trainer(max_epochs=epochs, limit_train_batches=5, callbacks=loaded.callbacks, **QUIET)
    trainer.fit(model, datamodule=MNIST1DDataModule(batch_size=100))
    masks = masks_of(model)
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert 1 - kept / total == pytest.approx(0.8 if fixture == "acdc.yaml" else 0.7, abs=1e-3)
    params = dict(model.named_parameters())
    assert all(not params[n][~m].any() for n, m in masks.items())
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(0.01 * 0.1**2 if fixture == "acdc.yaml" else 0.01 + (0.001 - 0.01) * 29 / 30)


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (
            "['conv1.weight', 'conv2.weight']",
            "start with 'net.', the recipe's do not: convert the SparseML recipe again with `--prefix net.`",
        ),
        (
            "['sections.0.0.conv1.weight', 'sections.0.1.conv2.weight']",
            "2 of 2 parameter patterns match nothing "
            "in this model (e.g. 'sections.0.0.conv1.weight'): they look written for another naming scheme",
        ),
    ],
    ids=["prefix", "zoo_names"],
)
def test_a_naming_hint_names_the_prefix_or_the_other_scheme(tmp_path, capsys, names, expected):
    card = tmp_path / "zoo.yaml"
    card.write_text(
        f"modifiers:\n  - !GMPruningModifier\n    params: {names}\n    final_sparsity: 0.5\n"
        "    start_epoch: 0.0\n    end_epoch: 2.0\n    update_frequency: 1.0\n"
    )
    out = tmp_path / "converted.yaml"
    assert main(["recipes", "import-sparseml", str(card), "-o", str(out)]) == 0
    model = "sparse_lightning.models.MNIST1DCNN"
    argv = ["recipes", "validate", str(out), "--model", model, "--total-steps", "100", "--steps-per-epoch", "10"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1

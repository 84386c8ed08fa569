from pathlib import Path

import pytest

from sparse_lightning.cli import main
from sparse_lightning.recipes import load
from sparse_lightning.recipes.sparseml import convert_sparseml

FIXTURES = Path(__file__).parent / "fixtures" / "sparseml"


def test_gmp_recipe_with_variables_and_eval(tmp_path, capsys):
    recipe, problems = convert_sparseml(FIXTURES / "gmp_resnet.yaml", prefix="net.")
    assert recipe["trainer"] == {"max_epochs": 10}
    (stage,) = recipe["stages"]
    assert (stage["start"], stage["end"]) == ("1ep", "7ep")
    (method,) = stage["methods"]
    assert method == {
        "method": "gradual_magnitude",
        "args": {
            "distribution": "uniform",
            "initial_sparsity": 0.05,
            "every": "0.5ep",
            "curve": "cubic",
            "pattern": "unstructured",
            "sparsity": 0.85,
        },
    }
    assert problems == [
        "modifiers[1] !LearningRateFunctionModifier: this modifier has no sparse-lightning equivalent; left out."
    ]
    out = tmp_path / "converted.yaml"
    assert main(["recipes", "import-sparseml", str(FIXTURES / "gmp_resnet.yaml"), "-o", str(out)]) == 0
    (callback,) = load(out).callbacks
    assert callback.sparsity == 0.85 and callback.every_spec.text == "0.5ep"
    assert "LearningRateFunctionModifier" in capsys.readouterr().err


def test_markdown_recipe_reports_every_field_it_can_not_convert():
    recipe, problems = convert_sparseml(FIXTURES / "mixed.md", prefix="net.")
    global_stage, per_layer, constant = recipe["stages"]
    (g,) = global_stage["methods"]
    assert g["args"]["distribution"] == "global" and g["args"]["pattern"] == "2:4"
    assert g["args"]["include"] == [r"re:net\.(?:conv[23].weight).*"]
    assert [(m["args"]["sparsity"], m["args"]["include"]) for m in per_layer["methods"]] == [
        (0.7, ["net.conv1.weight"]),
        (0.5, ["net.linear.weight"]),
    ]
    assert constant["methods"] == [{"method": "constant_mask", "args": {}}] and "end" not in constant
    assert problems == [
        "modifiers[0] !GlobalMagnitudePruningModifier.inter_func: 'inverse_cubic' has no equivalent curve "
        "(linear, cubic); used cubic.",
        "modifiers[1] !MagnitudePruningModifier.mask_type: 'channel' can not be converted; used unstructured.",
        "modifiers[3] !QuantizationModifier: this modifier has no sparse-lightning equivalent; left out.",
    ]


def test_nothing_convertible_is_an_error(tmp_path, capsys):
    path = tmp_path / "quant.yaml"
    path.write_text("modifiers:\n  - !QuantizationModifier\n    start_epoch: 0.0\n")
    assert main(["recipes", "import-sparseml", str(path)]) == 2
    assert "no convertible pruning modifier" in capsys.readouterr().err


def test_python_tags_stay_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("modifiers: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(Exception, match="python"):
        convert_sparseml(path)

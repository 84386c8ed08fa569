import textwrap
from pathlib import Path

import pytest
import yaml

from sparse_lightning import GradualMagnitudePruning, load_recipe
from sparse_lightning.cli import main
from sparse_lightning.recipes import RecipeError, shipped_recipes

GOOD = """
name: test
description: a test recipe
variables:
  sparsity: 0.8
  every: 10
stages:
  - name: prune
    start: 0.1
    end: 0.5
    methods:
      - method: gradual_magnitude
        args: {sparsity: "${sparsity}", every: "${every}"}
"""


@pytest.fixture
def write(tmp_path):
    def _write(text: str, name: str = "r.yaml"):
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return _write


def test_load_recipe_returns_configured_callbacks(write):
    (callback,) = load_recipe(write(GOOD))
    assert isinstance(callback, GradualMagnitudePruning)
    assert callback.sparsity == 0.8 and callback.every_spec.value == 10
    assert (callback.start_spec.value, callback.end_spec.value) == (0.1, 0.5)
    (callback,) = load_recipe(write(GOOD), sparsity=0.95)
    assert callback.sparsity == 0.95


@pytest.mark.parametrize("path", shipped_recipes(), ids=lambda p: p.stem)
def test_every_shipped_recipe_validates(path, capsys):
    assert main(["recipes", "validate", str(path)]) == 0  # over the recipe's own length
    out = capsys.readouterr().out
    assert "net." in out


def test_recipes_list_and_show(capsys):
    assert main(["recipes", "list"]) == 0
    out = capsys.readouterr().out
    for path in shipped_recipes():
        assert yaml.safe_load(path.read_text())["name"] in out
    assert "90%" in out and "gradual_magnitude" in out
    assert main(["recipes", "show", "gmp-90"]) == 0
    assert "name: gmp-90" in capsys.readouterr().out


BAD = [
    ("name: x\ndescription: y\nstages: [\n", r"r.yaml:\d+:\d+: YAML syntax error"),
    (GOOD + "extra: 1\n", r"r.yaml: extra: unknown key. Allowed keys here: name, description, variables"),
    (
        GOOD.replace("    start: 0.1", "    begin: 0.1"),
        r"stages\[0\].begin: unknown key. Allowed keys here: name, start",
    ),
    (
        GOOD.replace("args:", "params:"),
        r"stages\[0\].methods\[0\].params: unknown key. Allowed keys here: method, args",
    ),
    (GOOD.replace("start: 0.1", "start: [1]"), r"stages\[0\].start"),
    (
        GOOD.replace("variables:\n  sparsity: 0.8", "variables:\n  sparsity: 1.5"),
        r"stages\[0\].methods\[0\].args: `sparsity` must lie in \[0, 1\), got 1.5",
    ),
    (
        GOOD.replace("method: gradual_magnitude", "method: rigl_magic"),
        r"stages\[0\].methods\[0\].method: unknown method 'rigl_magic'. "
        r"Registered: acdc, channel_pruning, constant_mask, controlled_sparsity, early_crop, gap, gradual_magnitude, "
        r"lr_function, mfac_preconditioner, "
        r"mfac_pruning, rigl, set, snip, soft_mask_channel_pruning, spectral_hessian, "
        r"static_random, weight_decay\.",
    ),
    (GOOD.replace("${every}", "${period}"), r"stages\[0\].methods\[0\].args.every: undefined variable \$\{period\}"),
    (GOOD.replace("end: 0.5", "end: soon"), r"stages\[0\].end: .*could not parse 'soon'"),
    (
        GOOD.replace('every: "${every}"', 'every: "${every}", speed: 3'),
        r"gradual_magnitude takes no argument speed. Allowed: sparsity, initial_sparsity",
    ),
    (
        GOOD + "  - name: again\n    start: 0.4\n    end: 0.9\n    methods:\n      - method: gradual_magnitude\n",
        r"stages\[1\]: its window \(0.4 to 0.9\) overlaps stages\[0\] \(0.1 to 0.5\) on the same parameters",
    ),
    (
        "name: x\ndescription: y\nstages: !!python/object/apply:os.system ['true']\n",
        r"Tags such as !!python/... are refused: recipes can only name registered methods",
    ),
    ("name: x\nstages: []\n", r"r.yaml: description: this key is required"),
]


@pytest.mark.parametrize(("text", "message"), BAD, ids=range(len(BAD)))
def test_bad_recipes_name_file_and_field(write, text, message, capsys):
    path = write(text)
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)
    assert main(["fit", "--recipe", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "Traceback" not in err


def test_bad_recipe_exits_2_with_one_line(write, capsys):
    path = write(GOOD.replace("method: gradual_magnitude", "method: nope"))
    assert main(["fit", "--recipe", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparse-lightning: error: ") and "Traceback" not in err and str(path) in err


def test_unknown_variable_override_and_missing_file(write, capsys):
    with pytest.raises(RecipeError, match=r"variables: no variable named spars to override. Defined: every, sparsity"):
        load_recipe(write(GOOD), spars=0.9)
    assert main(["fit", "--recipe", "no/such.yaml"]) == 2
    assert "no/such.yaml: no such file, and no shipped recipe of that name" in capsys.readouterr().err


def test_pattern_that_selects_nothing_fails_validation(write, capsys):
    path = write(GOOD.replace('every: "${every}"}', 'every: "${every}", include: ["encoder.*"]}'))
    code = main(["recipes", "validate", str(path), "--model", "sparse_lightning.models.MNIST1DCNN"])
    assert code == 2
    assert "`include` pattern 'encoder.*' selects no parameter" in capsys.readouterr().err


def test_validate_plans_over_the_recipes_own_length(capsys):
    """gmp-90-global: 60 epochs of MNIST-1D (3600 training samples, batch 100: 36 steps) = 2160 steps; its window
    0.1 .. 0.6 starts at step 216 and ends at 1296."""
    assert main(["recipes", "validate", str(Path(__file__).parents[1] / "recipes" / "gmp-90-global.yaml")]) == 0
    out = capsys.readouterr().out
    assert "plan for 2160 optimizer steps, 36 per epoch" in out
    assert "28 event(s), from step 216 to 1296" in out
    assert main(["recipes", "validate", "gmp-90-global", "--total-steps", "1000", "--steps-per-epoch", "10"]) == 0
    assert "14 event(s), from step 100 to 600" in capsys.readouterr().out  # 100, 140, ..., 580 and 600

import pytest
import torch
from helpers import TinyNet
from torch import nn

from sparse_lightning import masks_of
from sparse_lightning.core.masks import MaskSet
from sparse_lightning.core.targets import select_parameters


def test_default_selects_linear_and_conv_weights_only(model):
    assert select_parameters(model) == ["conv.weight", "fc1.weight", "fc2.weight"]


def test_include_exclude_globs_and_regex(model):
    assert select_parameters(model, include=["fc*.weight"]) == ["fc1.weight", "fc2.weight"]
    assert select_parameters(model, include=["re:fc\\d\\.(weight|bias)"], exclude=["*.bias"]) == [
        "fc1.weight",
        "fc2.weight",
    ]
    assert select_parameters(model, include=["bn.weight"]) == ["bn.weight"]
    assert select_parameters(model, exclude=["conv.*"]) == ["fc1.weight", "fc2.weight"]


def test_type_patterns_select_the_weights_of_module_classes_and_their_subclasses(model):
    assert select_parameters(model, include=["type:_ConvNd|BatchNorm1d"]) == ["conv.weight", "bn.weight"]
    assert select_parameters(model, include=["type:Module"], exclude=["type:Linear"]) == ["conv.weight", "bn.weight"]
    with pytest.raises(ValueError, match="`include` pattern 'type:Embedding' selects no parameter"):
        select_parameters(model, include=["type:Embedding"])
    with pytest.raises(ValueError, match="names no module class"):
        select_parameters(model, include=["type:"])


def test_patterns_that_select_nothing_are_named(model):
    with pytest.raises(ValueError, match=r"`include` pattern 'encoder\.\*' selects no parameter"):
        select_parameters(model, include=["encoder.*"])
    with pytest.raises(ValueError, match="`exclude` pattern 'fc9.weight' matches no selected parameter"):
        select_parameters(model, exclude=["fc9.weight"])
    with pytest.raises(ValueError, match="Invalid regular expression"):
        select_parameters(model, include=["re:fc[("])
    with pytest.raises(TypeError, match="must be a list"):
        select_parameters(model, include="fc1.weight")


def test_masks_of_uses_each_modules_own_names(model):
    wrapper = nn.Sequential(model)
    mask_set = MaskSet.of(wrapper)
    params = dict(wrapper.named_parameters())
    mask_set.add("0.fc1.weight", params["0.fc1.weight"], params["0.fc1.weight"] > 0)
    assert list(masks_of(wrapper)) == ["0.fc1.weight"]
    assert list(masks_of(model)) == ["fc1.weight"]
    assert masks_of(model)["fc1.weight"].dtype == torch.bool
    assert masks_of(TinyNet()) == {}


def test_mask_set_applies_to_weights_grads_and_optimizer_state(model):
    params = dict(model.named_parameters())
    mask_set = MaskSet.of(model)
    w = params["fc2.weight"]
    mask = torch.rand_like(w) > 0.5
    mask_set.add("fc2.weight", w, mask)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    mask_set.apply_to_grads(params)
    mask_set.apply_to_weights(params)
    mask_set.apply_to_optimizer_state(opt, params)
    assert (w[~mask] == 0).all() and (w.grad[~mask] == 0).all()
    assert (opt.state[w]["exp_avg"][~mask] == 0).all() and (opt.state[w]["exp_avg_sq"][~mask] == 0).all()
    assert (w[mask] != 0).all()
    state = mask_set.state_dict()
    assert torch.equal(state["fc2.weight"], mask)


def test_masked_module_pickles_and_deep_copies(model):
    import copy
    import io

    params = dict(model.named_parameters())
    MaskSet.of(model).add("fc1.weight", params["fc1.weight"], params["fc1.weight"] > 0)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    clone = copy.deepcopy(model)
    for other in (loaded, clone):
        assert torch.equal(masks_of(other)["fc1.weight"], masks_of(model)["fc1.weight"])
        assert MaskSet.of(other) is not MaskSet.of(model)
        other_params = dict(other.named_parameters())
        MaskSet.of(other).update("fc1.weight", torch.zeros_like(other_params["fc1.weight"], dtype=torch.bool))
        assert masks_of(other)["fc1.weight"].sum() == 0 and masks_of(model)["fc1.weight"].sum() > 0

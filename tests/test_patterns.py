import pytest
import torch

from sparse_lightning.core.distribution import pruned_units
from sparse_lightning.core.patterns import parse_pattern


def keep(score, pattern, sparsity):
    p = parse_pattern(pattern)
    p.check("w", score.shape)
    units = pruned_units({"w": score}, p, sparsity, "uniform")["w"]
    return p.keep_mask(score, units)


def test_two_four_keeps_the_two_largest_of_every_four():
    score = torch.tensor([[1.0, 4.0, 3.0, 2.0, 8.0, 5.0, 6.0, 7.0], [0.1, 0.2, 0.4, 0.3, 9.0, 1.0, 2.0, 3.0]])
    mask = keep(score, "2:4", 0.5)
    expected = torch.tensor([[0, 1, 1, 0, 1, 0, 0, 1], [0, 0, 1, 1, 1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_nm_groups_run_along_the_input_channels_of_a_conv():
    torch.manual_seed(0)
    score = torch.rand(6, 8, 3, 3)
    mask = keep(score, "1:4", 0.75)
    groups = mask.permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.all(groups.sum(1) == 1)
    values = score.permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.equal(values.argmax(1), groups.float().argmax(1))


def test_partial_nm_prunes_whole_groups_of_least_loss():
    score = torch.tensor([[1.0, 1.0, 9.0, 9.0, 0.1, 0.1, 9.0, 9.0]])
    mask = keep(score, "2:4", 0.25)
    assert mask.tolist() == [[True, True, True, True, False, False, True, True]]


def test_block_masks_are_exact_blocks():
    score = torch.tensor([[1.0, 1.0, 5.0, 5.0], [1.0, 1.0, 5.0, 5.0], [7.0, 7.0, 0.5, 0.5], [7.0, 7.0, 0.5, 0.5]])
    mask = keep(score, "block:2x2", 0.5)
    expected = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_conv_blocks_hold_consecutive_input_channels_at_one_kernel_position_as_sparsemls_block4():
    """SparseML's block4 permutes a conv weight's input channels last and groups 4 consecutive ones; the same
    tiles here, written out by hand on a 2 x 8 x 3 weight."""
    torch.manual_seed(0)
    score = torch.rand(2, 8, 3)
    mask = keep(score, "block:1x4", 0.5)
    expected = torch.zeros_like(mask)
    tiles = [(o, k, c) for o in range(2) for k in range(3) for c in range(2)]  # 12 tiles of 4 input channels
    means = {t: float(score[t[0], 4 * t[2] : 4 * t[2] + 4, t[1]].mean()) for t in tiles}
    for o, k, c in sorted(tiles, key=means.get)[6:]:
        expected[o, 4 * c : 4 * c + 4, k] = True
    assert torch.equal(mask, expected)


def test_channel_pattern_keeps_at_least_one_channel():
    score = torch.rand(4, 3)
    mask = keep(score, "channel", 0.99)
    assert mask.all(1).sum() == 1 and (mask.any(1) == mask.all(1)).all()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("5:4", "need 0 < N < M"),
        ("0:4", "need 0 < N < M"),
        ("block:1x1", "at least 2"),
        ("bogus", "Unknown `pattern`"),
        (3, "must be a string"),
    ],
)
def test_bad_pattern_strings(text, message):
    with pytest.raises((ValueError, TypeError), match=message):
        parse_pattern(text)


def test_too_small_tensors_are_named():
    with pytest.raises(ValueError, match=r"'fc.weight' of shape \(4, 6\) is too small for pattern 2:4"):
        parse_pattern("2:4").check("fc.weight", torch.Size([4, 6]))
    with pytest.raises(ValueError, match="does not divide into blocks of 4 outputs x 1 inputs"):
        parse_pattern("block:4x1").check("fc.weight", torch.Size([6, 8]))

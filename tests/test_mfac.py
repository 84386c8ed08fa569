"""Exactness of the M-FAC products against explicitly formed and inverted Fisher matrices (float64)."""

import statistics
import time

import pytest
import torch

from sparse_lightning.mfac import SlidingInverseFisher, StaticInverseFisher, obs_saliency, obs_update

D, M, DAMP = 1000, 64, 1e-5


def explicit_inverse(grads: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    grads = grads.double()
    fisher = damp * torch.eye(grads.shape[1], dtype=torch.float64) + grads.T @ grads / grads.shape[0]
    return torch.linalg.inv(fisher)


def explicit_tolerance(grads: torch.Tensor, damp: float = DAMP) -> float:
    """What the explicit inverse itself is good to: 100 * eps * cond(F) (cond 6.4e4 for one gradient, so 1.4e-9)."""
    grads = grads.double()
    fisher = damp * torch.eye(grads.shape[1], dtype=torch.float64) + grads.T @ grads / grads.shape[0]
    return max(1e-12, 100 * torch.finfo(torch.float64).eps * torch.linalg.cond(fisher).item())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture
def grads():
    # (|g|^2 / m) / damp = 1e3 for the whole window (6.4e4 for a window of one): the explicit inverse is good to
    # about eps * cond(F), which `explicit_tolerance` allows for
    generator = torch.Generator().manual_seed(0)
    return torch.randn(M, D, dtype=torch.float64, generator=generator) * (1e3 * DAMP * M / D) ** 0.5


@pytest.mark.parametrize("m", [1, 16, 64])
def test_static_ihvp_and_diag_equal_the_explicit_inverse(grads, m):
    inverse, tol = explicit_inverse(grads[:m]), explicit_tolerance(grads[:m])
    fisher = StaticInverseFisher(grads[:m], DAMP)
    x = torch.randn(D, dtype=torch.float64)
    assert rel(fisher.ihvp(x), inverse @ x) < tol
    assert rel(fisher.ihvp(grads[m - 1]), inverse @ grads[m - 1]) < tol
    assert rel(fisher.diag(), inverse.diagonal()) < tol


def test_sliding_window_after_more_than_m_updates_equals_static_on_the_last_m(grads):
    extra = torch.randn(2 * M + 7, D, dtype=torch.float64) * grads.std()
    window = SlidingInverseFisher(D, M, DAMP, dtype=torch.float64)
    for g in extra[:-1]:
        window.update(g)
    product = window.update_ihvp(extra[-1])
    last = extra[-M:]
    inverse = explicit_inverse(last)
    assert rel(product, inverse @ extra[-1]) < 1e-10
    x = torch.randn(D, dtype=torch.float64)
    assert rel(window.ihvp(x), StaticInverseFisher(last, DAMP).ihvp(x)) < 1e-10
    assert rel(window.ihvp(x), inverse @ x) < 1e-10


def test_a_partly_filled_window_counts_the_missing_gradients_as_zeros(grads):
    window = SlidingInverseFisher(D, M, DAMP, dtype=torch.float64)
    for g in grads[:10]:
        window.update(g)
    padded = torch.cat([grads[:10], torch.zeros(M - 10, D, dtype=torch.float64)])
    x = torch.randn(D, dtype=torch.float64)
    assert rel(window.ihvp(x), explicit_inverse(padded) @ x) < 1e-10


@pytest.mark.parametrize("block_size", [100, 300])
def test_block_diagonal_mode_equals_per_block_explicit_inverses(grads, block_size):
    blocked = torch.zeros(D, D, dtype=torch.float64)
    for a in range(0, D, block_size):
        blocked[a : a + block_size, a : a + block_size] = explicit_inverse(grads[:, a : a + block_size])
    x = torch.randn(D, dtype=torch.float64)
    static = StaticInverseFisher(grads, DAMP, block_size=block_size)
    assert rel(static.ihvp(x), blocked @ x) < 1e-10
    assert rel(static.diag(), blocked.diagonal()) < 1e-10
    window = SlidingInverseFisher(D, M, DAMP, dtype=torch.float64, block_size=block_size)
    for g in grads[:-1]:
        window.update(g)
    assert rel(window.update_ihvp(grads[-1]), blocked @ grads[-1]) < 1e-10


@pytest.mark.parametrize("block_size", [50, 30])  # shorter than the 64 gradients (oBERT: 50 and 1024); 30 pads
def test_blocks_shorter_than_the_window_are_inverted_explicitly(grads, block_size):
    blocked = torch.zeros(D, D, dtype=torch.float64)
    for a in range(0, D, block_size):
        blocked[a : a + block_size, a : a + block_size] = explicit_inverse(grads[:, a : a + block_size])
    static = StaticInverseFisher(grads, DAMP, block_size=block_size)
    assert static.explicit
    x = torch.randn(D, dtype=torch.float64)
    assert rel(static.ihvp(x), blocked @ x) < 1e-10
    assert rel(static.diag(), blocked.diagonal()) < 1e-10
    assert rel(StaticInverseFisher(grads.float(), DAMP, block_size=block_size).ihvp(x.float()), blocked @ x) < 1e-5


def test_float32_window_is_accurate_for_the_gradient_just_pushed():
    """(|g|^2 / m) / damp = 1e6: the float32 reference path loses ~30%; the bound here is 1e-3."""
    scale = (1e6 * DAMP * M / D) ** 0.5
    stream = torch.randn(M + 20, D, generator=torch.Generator().manual_seed(1)) * scale
    window = SlidingInverseFisher(D, M, DAMP)
    assert window.window.dtype == torch.float32
    for g in stream[:-1]:
        window.update(g)
    product = window.update_ihvp(stream[-1])
    assert product.dtype == torch.float32
    assert rel(product, explicit_inverse(stream[-M:]) @ stream[-1].double()) < 1e-3


def test_clearing_coordinates_gives_the_fisher_of_the_kept_ones(grads):
    kept = torch.rand(D, generator=torch.Generator().manual_seed(2)) > 0.3
    window = SlidingInverseFisher(D, M, DAMP, dtype=torch.float64)
    for g in grads:
        window.update(g)
    window.clear_coordinates(~kept)
    inverse = explicit_inverse(grads[:, kept])
    x = torch.randn(D, dtype=torch.float64) * kept
    assert rel(window.ihvp(x)[kept], inverse @ x[kept]) < 1e-10
    assert torch.all(window.ihvp(x)[~kept] == 0)
    g = torch.randn(D, dtype=torch.float64) * grads.std() * kept
    expected = explicit_inverse(torch.cat([grads[1:, kept], g[kept][None]])) @ g[kept]
    assert rel(window.update_ihvp(g)[kept], expected) < 1e-10


def test_state_dict_round_trip_continues_identically(grads):
    a = SlidingInverseFisher(D, 8, DAMP, dtype=torch.float64)
    for g in grads[:11]:
        a.update(g)
    b = SlidingInverseFisher(D, 8, DAMP, dtype=torch.float64)
    b.load_state_dict(a.state_dict())
    for g in grads[11:20]:
        assert torch.equal(a.update_ihvp(g), b.update_ihvp(g))


@pytest.mark.parametrize("block_size", [None, 250])
def test_obs_on_a_quadratic_zeroes_the_weight_and_costs_the_predicted_saliency(grads, block_size):
    """L(w) = 1/2 (w - w0)^T F (w - w0) with F the M-FAC Fisher: pruning w_q from the minimum w0 with the OBS update
    leaves w_q = 0 and raises L by w_q^2 / (2 [F^-1]_qq). With blocks, one weight per block is pruned at once."""
    fisher = StaticInverseFisher(grads, DAMP, block_size=block_size)
    dense = torch.linalg.inv(explicit_inverse(grads)) if block_size is None else None
    if dense is None:
        dense = torch.zeros(D, D, dtype=torch.float64)
        for a in range(0, D, block_size):
            g = grads[:, a : a + block_size]
            dense[a : a + block_size, a : a + block_size] = DAMP * torch.eye(g.shape[1]) + g.T @ g / M
    w0 = torch.randn(D, dtype=torch.float64)
    diag = fisher.diag()
    saliency = obs_saliency(w0, diag)
    pruned = torch.zeros(D, dtype=torch.bool)
    if block_size is None:
        pruned[int(saliency.argmin())] = True
    else:
        for a in range(0, D, block_size):
            pruned[a + int(saliency[a : a + block_size].argmin())] = True
    delta = obs_update(fisher, w0, pruned, diag)
    assert torch.allclose((w0 + delta)[pruned], torch.zeros(int(pruned.sum()), dtype=torch.float64), atol=1e-9)
    increase = 0.5 * delta @ dense @ delta
    assert increase.item() == pytest.approx(saliency[pruned].sum().item(), rel=1e-8)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: SlidingInverseFisher(10, 0), "`num_grads` must be >= 1"),
        (lambda: SlidingInverseFisher(10, 4, damp=0.0), "`damp` must be a finite number > 0"),
        (lambda: SlidingInverseFisher(10, 4, damp=-1.0), "`damp`"),
        (lambda: SlidingInverseFisher(10, 4, block_size=0), "`block_size` must be >= 1"),
        (lambda: SlidingInverseFisher(10, 4, block_size=2.5), "`block_size` must be an int"),
        (lambda: SlidingInverseFisher(10**9, 10**5), r"needs .* GiB, but cpu has .* GiB free"),
        (lambda: SlidingInverseFisher(100, 16, block_size=8), "`block_size` 8 is smaller than the 16 gradients"),
        (lambda: StaticInverseFisher(torch.ones(3)), "`grads` must be a non-empty m x d tensor"),
        (lambda: StaticInverseFisher(torch.tensor([[1.0, float("nan")]])), "NaN or infinite"),
    ],
)
def test_bad_input(build, message):
    with pytest.raises((ValueError, TypeError), match=message):
        build()


def test_a_gradient_of_the_wrong_size_is_refused():
    window = SlidingInverseFisher(10, 4)
    with pytest.raises(ValueError, match="does not match the window's dim 10"):
        window.update(torch.ones(11))


def test_ihvp_of_a_float32_window_is_accurate_inside_its_span():
    """(|g|^2 / m) / damp = 1e6: x - G^T K^-1 G x cancels to 6 digits, so K must be the float64 Gram (the float32
    one left a relative error of 0.46)."""
    d, m = 4000, 32
    stream = torch.randn(m, d, generator=torch.Generator().manual_seed(2)) * (1e6 * DAMP * m / d) ** 0.5
    window = SlidingInverseFisher(d, m, DAMP)
    for g in stream:
        window.update(g)
    assert not window.exact
    inverse = explicit_inverse(stream)
    inside = stream.T @ torch.randn(m, generator=torch.Generator().manual_seed(3))
    for x in (stream[5], inside, torch.randn(d)):
        assert rel(window.ihvp(x), inverse @ x.double()) < 1e-3
    window.update(stream[0])  # the cached Gram follows the window
    inverse = explicit_inverse(torch.cat([stream[1:], stream[:1]]))
    assert rel(window.ihvp(stream[7]), inverse @ stream[7].double()) < 1e-3


def _median_ms(fn, rounds=5):
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return 1000 * statistics.median(times)


def test_a_window_of_repeated_gradients_costs_about_two_products():
    """8 distinct gradients repeated through a window of 128: the window becomes exact (float64) and an update
    costs about two float32 products (was 20x and more: every product converted the window chunk by chunk into
    fresh memory). The floor and the update are timed interleaved; the bound leaves room for a noisy machine."""
    torch.set_num_threads(1)
    d, m = 100_000, 128
    base = torch.randn(8, d, generator=torch.Generator().manual_seed(0))
    window = SlidingInverseFisher(d, m, DAMP)
    for i in range(m):
        window.update(base[i % 8])
    assert window.exact
    plain, coef = base.repeat(m // 8, 1).contiguous(), torch.randn(m)
    floors, updates = [], []
    for r in range(5):
        floors.append(_median_ms(lambda r=r: (plain @ base[r % 8], coef @ plain), rounds=1))
        updates.append(_median_ms(lambda r=r: window.update_ihvp(base[r % 8]), rounds=1))
    ratio = statistics.median(updates) / statistics.median(floors)
    assert ratio < 4.0, f"update / floor = {ratio:.2f}"
    product = window.update_ihvp(base[5])
    assert rel(product, StaticInverseFisher(window.window[0].double(), DAMP).ihvp(base[5].double())) < 1e-4

"""The optimal denoiser (common/edm/networks/optimal.py) and detect/generate.py --optimal_denoiser: Eq. 3 exactly, in
chunks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import ONE_THREAD, run_cli

from diffmem.common.edm import sampler as S
from diffmem.common.edm.dataset.edm_zip import write_dataset_zip
from diffmem.common.edm.dataset.planted import planted_near_duplicates
from diffmem.common.edm.networks import optimal as O
from diffmem.common.edm.networks.optimal import (
    OptimalDenoiser,
    OptimalDenoiserError,
    empty_state,
    ideal_denoiser,
    log_weights,
    merge_chunk,
    squared_distances,
)
from diffmem.common.edm.sampler import SamplerError, SamplerSettings

SIGMAS = (0.002, 0.02, 0.3, 2.0, 80.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference(x: torch.Tensor, sigma, y: torch.Tensor) -> torch.Tensor:
    """Eq. 3 the plain way: all N at once, differences broadcast (B×N×D), float64 softmax."""
    x = x.reshape(len(x), -1).double()
    y = y.reshape(len(y), -1).double()
    sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1).expand(len(x), 1)
    d2 = (x[:, None, :] - y[None, :, :]).square().sum(-1)
    return torch.softmax(-d2 / (2 * sigma**2), dim=1) @ y


def fp32_cdist_denoiser(x: torch.Tensor, sigma: float, y: torch.Tensor) -> torch.Tensor:
    """OptimEDM-style: fp32 torch.cdist² / 2σ² over the whole set, softmax, weighted sum."""
    x32, y32 = x.reshape(len(x), -1).float(), y.reshape(len(y), -1).float()
    return torch.softmax(-torch.cdist(x32, y32).square() / (2 * sigma**2), dim=1) @ y32


def model_range(u: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(u).double() / 127.5 - 1


@pytest.fixture(scope="module")
def data():
    """12 uint8 1×4×4 images (images 3 and 7 duplicate image 0), 3 classes, and queries near and far from them."""
    rng = np.random.default_rng(0)
    u = rng.integers(0, 256, (12, 1, 4, 4), dtype=np.uint8)
    u[3] = u[0]
    u[7] = u[0]
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
    y = model_range(u)
    g = torch.Generator().manual_seed(1)
    near = y[[0, 1, 5, 9]] + 0.01 * torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64)
    far = torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64)
    return {"u": u, "labels": labels, "y": y, "x": torch.cat([near, far])}


# ------------------------------------------------------------------------------------------ the math


@pytest.mark.parametrize("sigma", SIGMAS)
def test_matches_a_full_float64_softmax(data, sigma):
    D = OptimalDenoiser(torch.from_numpy(data["u"]), chunk_size=5)
    out = D(data["x"], sigma)
    assert out.dtype == torch.float64 and out.shape == data["x"].shape
    torch.testing.assert_close(out.reshape(8, -1), reference(data["x"], sigma, data["y"]), rtol=0, atol=1e-12)


def test_uint8_and_float_images_give_the_same_denoiser(data):
    x = data["x"].float()  # an fp32 input is accepted and computed in float64
    a = OptimalDenoiser(torch.from_numpy(data["u"]))(x, 0.1)
    b = OptimalDenoiser(data["y"])(x, 0.1)
    c = OptimalDenoiser(data["y"].float())(x, 0.1)  # fp32 images: rounding of 1e-7 in y only
    assert torch.equal(a, b)
    torch.testing.assert_close(a, c, rtol=0, atol=1e-6)


def test_duplicate_training_images_count_with_their_multiplicity(data):
    y = data["y"]
    x, sigma = 0.5 * (y[0] + y[1])[None], 0.4
    out = OptimalDenoiser(torch.stack([y[0], y[0], y[1]]))(x, sigma).reshape(-1)
    d0, d1 = ((x - y[0]) ** 2).sum(), ((x - y[1]) ** 2).sum()
    w0, w1 = 2 * torch.exp(-d0 / (2 * sigma**2)), torch.exp(-d1 / (2 * sigma**2))
    torch.testing.assert_close(out, ((w0 * y[0] + w1 * y[1]) / (w0 + w1)).reshape(-1), rtol=0, atol=1e-14)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_chunk_size_does_not_change_the_answer(data, sigma):
    outs = [OptimalDenoiser(torch.from_numpy(data["u"]), chunk_size=c)(data["x"], sigma) for c in (1, 3, 12, 4096)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=1e-12)


def test_sigma_as_scalar_vector_or_column_and_per_sample(data):
    D = OptimalDenoiser(data["y"])
    sig = torch.tensor([0.002, 0.01, 0.1, 1.0, 3.0, 10.0, 40.0, 80.0])
    per = D(data["x"], sig)
    assert torch.equal(per, D(data["x"], sig.reshape(-1, 1, 1, 1)))
    for i, s in enumerate(sig.tolist()):
        torch.testing.assert_close(per[i], D(data["x"][i:i + 1], s)[0], rtol=0, atol=1e-15)
    assert torch.equal(D(data["x"], 0.5), D(data["x"], torch.tensor(0.5)))


def test_limits_small_sigma_is_the_nearest_image_large_sigma_the_mean(data):
    D = OptimalDenoiser(data["y"])
    near = data["x"][:4]
    nearest = torch.cdist(near.reshape(4, -1), data["y"].reshape(12, -1)).argmin(1)
    torch.testing.assert_close(D(near, 0.002).reshape(4, -1), data["y"].reshape(12, -1)[nearest], rtol=0, atol=1e-12)
    mean = data["y"].reshape(12, -1).mean(0)
    torch.testing.assert_close(D(data["x"], 1e6).reshape(8, -1), mean.expand(8, -1), rtol=0, atol=1e-9)


def test_online_merge_equals_one_softmax():
    g = torch.Generator().manual_seed(3)
    logw = 50 * torch.randn(3, 10, generator=g, dtype=torch.float64)  # spread far beyond exp's range
    y = torch.randn(10, 5, generator=g, dtype=torch.float64)
    state = empty_state(3, 5, "cpu")
    for lo, hi in ((0, 4), (4, 5), (5, 10)):
        state = merge_chunk(state, logw[:, lo:hi], y[lo:hi])
    torch.testing.assert_close(state.max, logw.max(1).values, rtol=0, atol=0)
    torch.testing.assert_close(state.max + state.total.log(), torch.logsumexp(logw, 1), rtol=0, atol=1e-13)
    torch.testing.assert_close(state.weighted / state.total[:, None], torch.softmax(logw, 1) @ y, rtol=0, atol=1e-13)


def test_squared_distances_and_log_weights_are_eq3s_exponent():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(4, 30, generator=g), torch.randn(40, 30, generator=g)  # 40 rows: cdist's matmul mode by default
    d2 = squared_distances(x, y)
    exact = (x.double()[:, None] - y.double()[None]).square().sum(-1)
    assert d2.dtype == torch.float64
    torch.testing.assert_close(d2, exact, rtol=1e-15, atol=0)
    sigma = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(log_weights(d2, sigma), -d2 / (2 * sigma[:, None] ** 2), rtol=0, atol=0)
    # A pair's distance does not depend on the other images of its chunk.
    assert torch.equal(torch.cat([squared_distances(x, y[i:i + 1]) for i in range(40)], 1), d2)
    assert torch.equal(ideal_denoiser(x.double(), sigma, y.double(), 7),
                       ideal_denoiser(x.double(), sigma, y.double(), 7))


def near_tie_problem(num_pairs: int = 8, shape=(3, 32, 32), sigma: float = 0.002, logit: float = 1.5):
    """Planted near-duplicates: training pairs differing in one pixel by one uint8 level, and a query per pair
    placed (with noise ⟂ the pair's difference) so that the float64 weights are sigmoid(±logit)."""
    rng = np.random.default_rng(5)
    base = rng.integers(0, 255, (num_pairs, *shape), dtype=np.uint8)
    twin = base.copy()
    twin.reshape(num_pairs, -1)[:, 0] += 1
    others = rng.integers(0, 256, (16, *shape), dtype=np.uint8)
    y = model_range(np.concatenate([base, twin, others])).reshape(2 * num_pairs + 16, -1)
    a, b = y[:num_pairs], y[num_pairs:2 * num_pairs]
    u = b - a
    noise = torch.from_numpy(rng.normal(0, 0.3, a.shape))
    noise -= (noise * u).sum(1, keepdim=True) / (u * u).sum(1, keepdim=True) * u
    # ‖x − a‖² − ‖x − b‖² = 2 (x − m)·u with m the midpoint, so this offset gives log w_b − log w_a = logit.
    x = 0.5 * (a + b) + noise + logit * sigma**2 / (u * u).sum(1, keepdim=True) * u
    return x, y


def test_fp32_cdist_softmax_gets_near_ties_wrong_at_sigma_0002_and_ours_does_not():
    x, y = near_tie_problem()
    sigma = 0.002
    truth = reference(x, sigma, y)
    ours = OptimalDenoiser(y.reshape(len(y), 3, 32, 32), chunk_size=7)(x.reshape(len(x), 3, 32, 32), sigma)
    fp32 = fp32_cdist_denoiser(x, sigma, y).double()
    ours_err = (ours.reshape(len(x), -1) - truth).abs().max().item()
    fp32_err = (fp32 - truth).abs().max().item()
    # The twins differ by 2/255 in their first pixel, where the float64 weights sigmoid(∓1.5) show.
    weight_b = torch.sigmoid(torch.tensor(1.5, dtype=torch.float64))
    torch.testing.assert_close(truth[:, 0], (1 - weight_b) * y[:8, 0] + weight_b * y[8:16, 0], rtol=0, atol=1e-9)
    # float64 sums of ‖·‖² ≈ 300 differ by ~1e-13 with the summation order (ours vs the broadcast reference):
    # ×1/2σ² = 125 000 that is ~1e-8 in a log-weight, ~1e-11 in D. fp32's distance error (~1e-4) moves the
    # log-weights by ~10: the weights of the twins come out wrong.
    assert ours_err < 1e-9, ours_err
    assert fp32_err > 1e-4, fp32_err
    # The float64 GEMM variant rounds more (and chunk-dependently), still ~1e6× closer than fp32.
    for chunk in (7, 4096):
        mm = OptimalDenoiser(y.reshape(len(y), 3, 32, 32), chunk_size=chunk, matmul=True)(
            x.reshape(len(x), 3, 32, 32), sigma)
        assert (mm.reshape(len(x), -1) - truth).abs().max() < 1e-8


def test_gradient_is_finite_and_matches_finite_differences(data):
    # Autograd runs the float64 reference (x requires grad); the differences use it too, so that the ≤ 1e-12
    # approximations of the screened path do not show through a 1e-6 step.
    D = OptimalDenoiser(data["y"], screen=False)
    x = data["x"][:1].clone()
    J = torch.autograd.functional.jacobian(lambda v: D(v, 0.3), x).reshape(16, 16)
    assert torch.isfinite(J).all()
    e = torch.zeros_like(x)
    e.view(-1)[5] = 1e-6
    fd = (D(x + e, 0.3) - D(x - e, 0.3)).reshape(-1) / 2e-6
    torch.testing.assert_close(J[:, 5], fd, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------- the screened (default) path


PLANTED_SHAPE = (3, 8, 8)


def relative_error(out, truth) -> float:
    return float((out.reshape(truth.shape) - truth).abs().max() / truth.abs().max())


@pytest.mark.parametrize("sigma", [0.002, 0.1, 1.0, 80.0])
def test_screened_equals_float64_on_planted_near_duplicates(sigma):
    u, x = planted_near_duplicates(300, 8, PLANTED_SHAPE)
    truth = reference(x, sigma, model_range(u))
    ours = OptimalDenoiser(u, chunk_size=64)(x, sigma)
    assert relative_error(ours, truth) <= 1e-10
    as_float = OptimalDenoiser(model_range(u), chunk_size=64)(x, sigma)  # no int8 way: float64 GEMM or per pair
    assert relative_error(as_float, truth) <= 1e-10
    if sigma == 0.002:  # where fp32 distances get the twins' weights wrong
        assert relative_error(fp32_cdist_denoiser(x, sigma, model_range(u)).double(), truth) > 1e-4


def test_screened_at_the_samplers_own_states_matches_float64():
    # x = y + σz: ‖x‖ grows with σ (the int8 way's scale and digits with it); a batch mixing σ's splits its queries.
    u, _ = planted_near_duplicates(200, 4, PLANTED_SHAPE)
    y = model_range(u)
    g = torch.Generator().manual_seed(3)
    sigma = torch.tensor([80.0, 12.0, 2.5, 0.5, 0.05, 0.002], dtype=torch.float64)
    x = y[[0, 5, 9, 20, 33, 40]].reshape(6, -1) + sigma[:, None] * torch.randn(6, 192, generator=g,
                                                                                  dtype=torch.float64)
    truth = torch.cat([reference(x[i:i + 1], float(s), y) for i, s in enumerate(sigma)])
    for images in (u, y):
        for chunk in (1, 37, 4096):
            out = OptimalDenoiser(images, chunk_size=chunk)(x.reshape(6, 3, 8, 8), sigma)
            assert relative_error(out, truth) <= 1e-10, (images.dtype, chunk)


def test_screened_path_takes_few_candidates_at_small_sigma_and_the_int8_way_at_large(monkeypatch):
    u, x = planted_near_duplicates(300, 8, PLANTED_SHAPE)
    seen = {"pairs": 0, "dense": 0}
    merge_candidates, merge_dense = O.merge_candidates, O.merge_dense

    def count_pairs(state, x, sigma, y, keep):
        seen["pairs"] += int(keep.sum())
        return merge_candidates(state, x, sigma, y, keep)

    def count_dense(state, way, *args):
        seen["dense"] += 1 if way.digits is not None else 0
        return merge_dense(state, way, *args)

    monkeypatch.setattr(O, "merge_candidates", count_pairs)
    monkeypatch.setattr(O, "merge_dense", count_dense)
    OptimalDenoiser(u, chunk_size=64)(x, 0.002)
    assert seen == {"pairs": 16, "dense": 0}  # each query's twins only
    OptimalDenoiser(u, chunk_size=64)(x, 80.0)
    assert seen == {"pairs": 16, "dense": 5}  # 300 images in 5 chunks, all by int8 digits


def test_screen_error_bound_holds_on_random_and_adversarial_data():
    g = torch.Generator().manual_seed(0)
    dim = 3072
    cases = [torch.randn(4, dim, generator=g, dtype=torch.float64) * 80,  # the sampler at σ = 80
             torch.rand(4, dim, generator=g, dtype=torch.float64)]  # all positive: no cancellation of the errors
    images = [torch.randn(64, dim, generator=g, dtype=torch.float64), torch.rand(64, dim, generator=g,
                                                                                 dtype=torch.float64) + 1]
    ratios = []
    for xc in cases:
        for yc in images:
            sq = yc.square().sum(1)
            with O.full_fp32_matmul():
                approx = torch.addmm(sq.float(), xc.float(), yc.float().T, alpha=-2).double()  # as the screen does
            exact = sq - 2 * (xc @ yc.T)  # float64: ~1e-9 of fp32's rounding
            bound = O.screen_error_bound(xc.norm(dim=1), float(yc.norm(dim=1).max()), dim)
            actual = (approx - exact).abs().max(dim=1).values
            assert (actual <= bound).all()
            ratios.append(float((actual / bound).max()))
    # The bound is the worst case of D roundings (γ_D ≈ D·u); the GEMM's blocked sums stay far below it, but more
    # than one rounding's worth (what a bound without the D-term sum would say): the γ_D is needed.
    assert 1e-5 < max(ratios) <= 1, ratios
    assert max(ratios) * O.gamma(dim + 3) / O.gamma(1) > 1, ratios


def test_int8_screen_error_bound_holds_for_one_and_two_digits():
    g = torch.Generator().manual_seed(0)
    dim = 3072
    random_u = torch.randint(0, 256, (32, dim), generator=g, dtype=torch.uint8)
    bright_u = torch.full((32, dim), 255, dtype=torch.uint8)  # q = 127 everywhere: the cut errors all add up
    # x̃ = (k + 0.49)/128 with s = 1: every first digit leaves a residual 0.49 of the same sign as q (the worst case).
    worst = (torch.randint(0, 121, (3, dim), generator=g).double() + 0.49) / 128
    queries = [torch.randn(3, dim, generator=g, dtype=torch.float64) * 80,
               torch.randn(3, dim, generator=g, dtype=torch.float64) * 0.3, worst]
    ratios = {1: [], 2: []}
    for u in (random_u, bright_u):
        images = O.prepare_images(O.images_to_model_range(u), u)
        for xc in queries:
            exact = images.sq_norms - 4 / 255 * (xc @ images.q.double().T)  # float64: far below either bound
            scale = O.power_of_two_scale(xc)
            digits = O.base128_digits(xc / scale[:, None], 2)
            partials = []
            for k in (1, 2):
                partials.append(O.int8_partial(digits[k - 1], images))
                t = O.int8_screen(partials, scale, images)
                bound = O.int8_screen_error(scale, float(images.q_l1.max()), float(images.norms.max()), k)
                actual = (t - exact).abs().max(dim=1).values
                assert (actual <= bound).all(), (k, actual, bound)
                ratios[k].append(float((actual / bound).max()))
    assert max(ratios[1]) > 0.95  # the worst case nearly reaches the one-digit bound: it is not loose
    assert max(ratios[2]) <= 1


def test_a_chunk_of_close_images_gets_the_second_screen_digit_and_stays_exact(monkeypatch):
    # 64 images a few grey levels apart (squared distances ~1e-3): one digit's bound (0.021 in t here) keeps them
    # all, two digits' (0.0002) the nearest few.
    rng = np.random.default_rng(1)
    base = rng.integers(10, 240, 192)
    u = torch.from_numpy((base + rng.integers(-2, 3, (64, 192)) * (rng.random((64, 192)) < 0.05)).astype(np.uint8))
    x = model_range(u[:4]) + 0.001 * torch.randn(4, 192, generator=torch.Generator().manual_seed(0),
                                                  dtype=torch.float64)
    calls = []
    int8_partial = O.int8_partial
    monkeypatch.setattr(O, "int8_partial",
                        lambda digit, chunk: calls.append(len(chunk.q)) or int8_partial(digit, chunk))
    out = OptimalDenoiser(u.reshape(64, 3, 8, 8), chunk_size=64)(x.reshape(4, 3, 8, 8), 0.002)
    assert calls == [64, 64]  # refined once
    assert relative_error(out, reference(x.reshape(4, 3, 8, 8), 0.002, model_range(u))) <= 1e-10


def test_base128_digits_are_exact_and_in_int8():
    r = torch.tensor([0.0, 127 / 128, -127 / 128, 1 / 3, -0.123456789, 2.0**-60], dtype=torch.float64)
    for count in (1, 3, 8):
        d = O.base128_digits(r, count)
        assert d.dtype == torch.int8 and d.shape == (count, 6)
        assert int(d[1:].abs().max()) <= 64 if count > 1 else True
        place = O.place_values(count)
        rest = r.clone()
        for k in range(count):
            rest = rest * 128 - d[k].double()
        assert (rest.abs() <= 0.5).all()
        # r = Σ d_k 128^−k + 128^−K r_K, exactly (each term is a float64 with few bits)
        assert torch.equal((place[:, None] * d.double()).sum(0) + rest * place[-1], r)
    assert O.digits_for(torch.tensor([1e-13]), 1e-12) == 1
    assert O.digits_for(torch.tensor([1.0]), 1e-12) == 1 + math.ceil(12 / math.log10(128))
    assert O.digits_for(torch.tensor([math.inf]), 1e-12) == O.MAX_DIGITS + 1


def test_drop_margin_bounds_the_dropped_weight():
    # Log-weights of N images, some just past the margin: those dropped weigh < 1e-40 of the kept, in float64 logs.
    n, sigma = 1000, torch.tensor([0.3], dtype=torch.float64)
    margin = O.drop_margin(sigma, n)
    t = torch.linspace(0, 1.2, n, dtype=torch.float64)[None] * margin
    keep = O.kept_candidates(t, torch.zeros(1, dtype=torch.float64), t.min(dim=1).values, margin)
    assert 0 < keep.sum() < n
    logw = -t / (2 * sigma**2)
    dropped = torch.logsumexp(logw[~keep], 0) - torch.logsumexp(logw[keep], 0)
    assert float(dropped) < -40 * math.log(10)


def test_derivatives_of_every_kind_run_the_float64_reference(data):
    # Autograd and torch.func.vjp get the differentiable reference's derivatives; torch.func.jvp and forward-mode
    # duals are seen too (the reference has no forward AD: torch's cdist lacks it, so they fail as before).
    D = OptimalDenoiser(torch.from_numpy(data["u"]))
    x = data["x"][4].reshape(-1)
    f = lambda v: D(v.reshape(1, 1, 4, 4), 0.7).reshape(-1)  # noqa: E731
    ref = OptimalDenoiser(torch.from_numpy(data["u"]), screen=False)
    closed = torch.autograd.functional.jacobian(lambda v: ref(v.reshape(1, 1, 4, 4), 0.7).reshape(-1), x)
    assert closed.abs().max() > 1e-3
    torch.testing.assert_close(torch.autograd.functional.jacobian(f, x), closed, rtol=0, atol=1e-12)
    _, pullback = torch.func.vjp(f, x)
    torch.testing.assert_close(pullback(torch.eye(16, dtype=torch.float64)[2])[0], closed[2], rtol=0, atol=1e-12)
    seen = []
    torch.func.jvp(lambda v: seen.append(O.needs_derivatives(v)) or v, (x,), (x,))
    import torch.autograd.forward_ad as fwad

    with fwad.dual_level():
        seen.append(O.needs_derivatives(fwad.make_dual(x, x)))
    assert seen == [True, True] and not O.needs_derivatives(x)


def test_screened_chunking_and_batch_do_not_change_the_answer():
    u, x = planted_near_duplicates(257, 6, PLANTED_SHAPE)
    for sigma in (0.002, 0.3, 80.0):
        outs = [OptimalDenoiser(u, chunk_size=c)(x, sigma) for c in (1, 16, 100, 257, 4096)]
        for out in outs[1:]:
            assert relative_error(out, outs[0]) <= 1e-12
        alone = torch.cat([OptimalDenoiser(u, chunk_size=16)(x[i:i + 1], sigma) for i in range(6)])
        assert relative_error(alone, outs[0]) <= 1e-12


# ------------------------------------------------------------------------------------- conditional


def test_conditional_uses_only_the_class_images(data):
    y, labels = data["y"], torch.from_numpy(data["labels"])
    D = OptimalDenoiser(y, labels, chunk_size=2)
    assert D.label_dim == 3
    x = data["x"]
    classes = torch.tensor([0, 1, 2, 0, 1, 2, 1, 0])
    for sigma in (0.002, 0.5, 80.0):
        out = D(x, sigma, classes).reshape(8, -1)
        for i, k in enumerate(classes.tolist()):
            torch.testing.assert_close(out[i], reference(x[i:i + 1], sigma, y[labels == k])[0], rtol=0, atol=1e-12)
    # One-hot labels (as EDM feeds its conditional networks) mean the same.
    assert torch.equal(D(x, 0.5, torch.nn.functional.one_hot(classes, 3).float()), D(x, 0.5, classes))
    # Even a query sitting on an image of class 1 is denoised towards class 0's images when labelled 0.
    on_one = y[1:2]
    out = D(on_one, 0.002, torch.tensor([0])).reshape(-1)
    assert min(float((out - yk.reshape(-1)).abs().max()) for yk in y[labels == 0]) < 1e-12


def test_unconditional_ignores_labels_and_conditional_needs_them(data):
    D = OptimalDenoiser(data["y"])
    assert D.label_dim == 0
    assert torch.equal(D(data["x"], 0.1, torch.zeros(8, dtype=torch.int64)), D(data["x"], 0.1))
    Dc = OptimalDenoiser(data["y"], torch.from_numpy(data["labels"]))
    with pytest.raises(OptimalDenoiserError, match="needs class_labels"):
        Dc(data["x"], 0.1)
    with pytest.raises(OptimalDenoiserError, match="class labels in 0..2"):
        Dc(data["x"], 0.1, torch.full((8,), 3))


def test_interface_the_sampler_duck_types(data):
    D = OptimalDenoiser(torch.from_numpy(data["u"]), torch.from_numpy(data["labels"] + 1))
    assert (D.sigma_min, D.sigma_max, D.label_dim, D.image_shape, D.num_images) == (0.0, math.inf, 4, (1, 4, 4), 12)
    assert isinstance(D, torch.nn.Module) and D.state_dict() == {}  # the training set is not saved as weights
    with pytest.raises(OptimalDenoiserError, match="class 0 has no training images"):
        D.check_classes()
    D.check_classes(2)
    assert SamplerSettings().for_network(D) == SamplerSettings()  # [0, ∞) clamps nothing


@pytest.mark.parametrize("make, message", [
    (lambda y: OptimalDenoiser(y[0]), "N×C×H×W"),
    (lambda y: OptimalDenoiser(y[:0]), "N >= 1"),
    (lambda y: OptimalDenoiser(y.to(torch.int32)), "uint8 or float"),
    (lambda y: OptimalDenoiser(y, torch.zeros(5, dtype=torch.int64)), "one integer label"),
    (lambda y: OptimalDenoiser(y, -torch.ones(12, dtype=torch.int64)), "one integer label"),
    (lambda y: OptimalDenoiser(y, torch.zeros(12)), "one integer label"),
    (lambda y: OptimalDenoiser(y, chunk_size=0), "chunk_size"),
    (lambda y: OptimalDenoiser(y * math.nan), "NaN"),
    (lambda y: OptimalDenoiser(y)(y[:2], 0.0), "σ > 1e-154"),
    (lambda y: OptimalDenoiser(y)(y[:2], -1.0), "σ > 1e-154"),
    (lambda y: OptimalDenoiser(y)(y[:2], math.inf), "σ > 1e-154"),
    (lambda y: OptimalDenoiser(y)(y[:2], torch.ones(3)), "one σ or one per sample"),
    (lambda y: OptimalDenoiser(y)(y[:2, :, :2], 1.0), "shape B×1×4×4"),
])
def test_bad_inputs_raise_one_line(data, make, message):
    with pytest.raises(OptimalDenoiserError, match=message) as exc:
        make(data["y"])
    assert "\n" not in str(exc.value)


def test_from_dataset_zip(data, tmp_path):
    write_dataset_zip(tmp_path / "d.zip", data["u"], data["labels"], progress=False)
    write_dataset_zip(tmp_path / "nolabels.zip", data["u"], progress=False)
    x = data["x"]
    assert torch.equal(OptimalDenoiser.from_dataset_zip(tmp_path / "d.zip")(x, 0.1),
                       OptimalDenoiser(torch.from_numpy(data["u"]))(x, 0.1))
    cond = OptimalDenoiser.from_dataset_zip(tmp_path / "d.zip", cond=True)
    assert cond.label_dim == 3
    classes = torch.tensor([2, 1, 0, 0, 1, 2, 2, 2])
    assert torch.equal(cond(x, 0.1, classes),
                       OptimalDenoiser(torch.from_numpy(data["u"]), torch.from_numpy(data["labels"]))(x, 0.1, classes))
    from diffmem.common.edm.dataset.edm_zip import DatasetError

    with pytest.raises(DatasetError, match="no dataset.json labels"):
        OptimalDenoiser.from_dataset_zip(tmp_path / "nolabels.zip", cond=True)


# ------------------------------------------------------------------------------------------ the solvers


class Recorder:
    """The exact denoiser of N(0, σ_d² I), recording each σ it is called at."""

    sigma_min, sigma_max, label_dim, image_shape = 0.0, math.inf, 0, (1, 2, 2)

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, class_labels=None):
        self.calls.append(float(sigma))
        return x * 0.25 / (sigma**2 + 0.25)


def test_euler_is_heun_without_the_correction_and_ends_with_D_at_sigma_min():
    sigmas = S.edm_sigma_steps(18, 0.002, 80.0, 7.0)
    latents = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    heun, euler = Recorder(), Recorder()
    x_heun = S.heun_sampler(heun, latents, sigmas)
    x_euler = S.heun_sampler(euler, latents, sigmas, second_order=False)
    assert len(heun.calls) == 2 * 18 - 1 and len(euler.calls) == 18
    assert euler.calls == sigmas[:-1].tolist()
    # Zhang et al.: the output is D(x; σ_min) of the state after 17 Euler steps.
    x17 = S.heun_sampler(Recorder(), latents, sigmas[:-1], second_order=False)
    assert torch.equal(x_euler, Recorder()(x17, sigmas[-2]))
    # The probability-flow ODE of N(0, σ_d²) has x(σ) = x_0 √(σ² + σ_d²)/√(σ_0² + σ_d²): Heun is the closer, and
    # the errors fall as 1/N² (Heun) and 1/N (Euler): 4× the steps, ≈16× and ≈4× smaller.
    exact = latents.double() * 80.0 * 0.5 / math.sqrt(80.0**2 + 0.25)

    def errors(n):
        steps = S.edm_sigma_steps(n, 0.002, 80.0, 7.0)
        return [(S.heun_sampler(Recorder(), latents, steps, second_order=o) - exact).abs().max().item()
                for o in (True, False)]

    assert (x_heun - exact).abs().max() < 0.5 * (x_euler - exact).abs().max()
    (h50, e50), (h200, e200) = errors(50), errors(200)
    assert h50 / h200 > 12 and 3 < e50 / e200 < 5, (h50 / h200, e50 / e200)


def test_solver_setting_is_validated_and_recorded():
    assert SamplerSettings().to_dict()["solver"] == "heun"
    with pytest.raises(SamplerError, match="--solver"):
        SamplerSettings(solver="rk4").validate()


def test_samples_do_not_depend_on_the_batch_and_reproduce_training_images(data):
    D = OptimalDenoiser(torch.from_numpy(data["u"]))
    settings = SamplerSettings(num_steps=8)
    seeds = list(range(7))
    one = np.concatenate([b.images for b in S.generate_images(D, seeds, 7, settings)])
    three = np.concatenate([b.images for b in S.generate_images(D, seeds, 3, settings)])
    assert np.array_equal(one, three)
    train = data["u"].transpose(0, 2, 3, 1).reshape(12, -1)
    assert all((train == im.reshape(1, -1)).all(1).any() for im in one)
    # Both solvers end with the Euler step to σ = 0, x_N = D(x_{N−1}; σ_min): a training image either way.
    x_euler, _ = S.sample_batch(D, seeds, SamplerSettings(num_steps=8, solver="euler"))
    assert all((train == im.reshape(1, -1)).all(1).any() for im in S.to_uint8(x_euler))
    # Stopped at a σ_min where D still averages, the two paths differ.
    x_heun, _ = S.sample_batch(D, seeds, SamplerSettings(num_steps=8, sigma_min=0.3))
    x_euler, _ = S.sample_batch(D, seeds, SamplerSettings(num_steps=8, sigma_min=0.3, solver="euler"))
    assert (x_heun - x_euler).abs().max() > 1e-3


# -------------------------------------------------------------------------------------------- the CLI


def nearest_uint8_distance(images_nhwc: np.ndarray, train_nchw: np.ndarray) -> np.ndarray:
    a = images_nhwc.transpose(0, 3, 1, 2).reshape(len(images_nhwc), -1).astype(np.float64)
    b = train_nchw.reshape(len(train_nchw), -1).astype(np.float64)
    return np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1)).min(1)


def test_cli_end_to_end_samples_are_training_images(data, tmp_path):
    write_dataset_zip(tmp_path / "tiny.zip", data["u"], data["labels"], progress=False)
    out = tmp_path / "out"
    res = run_cli("detect/generate.py", "--optimal_denoiser", "--dataset", tmp_path / "tiny.zip", "--seeds", "0-7",
                  "--steps", 5, "--outdir", out, "--npz", "--batch", 3, env=ONE_THREAD)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "8 images" in res.stdout
    with np.load(out / "images.npz") as z:
        images = z["images"]
        assert "labels" not in z
    assert images.shape == (8, 4, 4, 1)
    assert (nearest_uint8_distance(images, data["u"]) == 0).all()
    settings = json.loads((out / "generate.json").read_text())
    assert settings["dataset"] == str((tmp_path / "tiny.zip").resolve())
    assert (settings["network"], settings["cond"], settings["solver"]) == (None, False, "heun")
    assert settings["num_steps"] == 5 and settings["sigma_min"] == 0.002  # the sampler's range, unclamped

    # The conditional denoiser, Euler solver, in-process: each sample is a training image of its own label.
    from diffmem.detect.generate import main

    cout = tmp_path / "cond"
    assert main(["--optimal_denoiser", "--dataset", str(tmp_path / "tiny.zip"), "--cond", "--solver", "euler",
                 "--seeds", "0-7", "--steps", "5", "--outdir", str(cout), "--npz", "--chunk", "2"]) == 0
    with np.load(cout / "images.npz") as z:
        images, labels = z["images"], z["labels"]
    assert labels.tolist() == S.seed_labels(range(8), (1, 4, 4), 3, None, "cpu").tolist()
    for im, k in zip(images, labels):
        assert nearest_uint8_distance(im[None], data["u"][data["labels"] == k])[0] == 0
    settings = json.loads((cout / "generate.json").read_text())
    assert (settings["cond"], settings["solver"]) == (True, "euler")
    # Resuming with the other solver would mix samplers in one folder: refused.
    assert main(["--optimal_denoiser", "--dataset", str(tmp_path / "tiny.zip"), "--cond", "--seeds", "0-8",
                 "--steps", "5", "--outdir", str(cout)]) == 2


@pytest.mark.parametrize("args, message", [
    # With --optimal_denoiser, --network names the network whose σ range the sampler takes: it must exist.
    (["--network", "{tmp}/snap", "--optimal_denoiser", "--dataset", "{zip}"], "no such snapshot"),
    (["--seeds", "0"], "expected --model SNAPSHOT (or --optimal_denoiser with --data)"),
    (["--optimal_denoiser"], "needs --dataset"),
    (["--optimal_denoiser", "--dataset", "{tmp}/missing.zip"], "no such file"),
    (["--optimal_denoiser", "--dataset", "{tmp}/notazip.zip"], "notazip.zip"),
    (["--network", "{tmp}/snap", "--dataset", "{zip}"], "go with --optimal_denoiser"),
    (["--network", "{tmp}/snap", "--cond"], "go with --optimal_denoiser"),
    (["--optimal_denoiser", "--dataset", "{nolabels}", "--cond"], "no dataset.json labels"),
    (["--optimal_denoiser", "--dataset", "{nolabels}", "--class_idx", "0"], "unconditional"),
    (["--optimal_denoiser", "--dataset", "{zip}", "--cond", "--class_idx", "3"], "--class_idx < 3"),
    (["--optimal_denoiser", "--dataset", "{gap}", "--cond"], "classes 1, 3 have no training images"),
    (["--optimal_denoiser", "--dataset", "{zip}", "--solver", "rk4"], "invalid choice"),
    (["--optimal_denoiser", "--dataset", "{zip}", "--chunk", "0"], "--chunk >= 1"),
])
def test_cli_bad_input_is_one_line_and_exit_2(data, tmp_path, capsys, args, message):
    from diffmem.detect.generate import main

    write_dataset_zip(tmp_path / "tiny.zip", data["u"], data["labels"], progress=False)
    write_dataset_zip(tmp_path / "nolabels.zip", data["u"], progress=False)
    write_dataset_zip(tmp_path / "gap.zip", data["u"], data["labels"] * 2, progress=False)  # labels 0, 2, 4
    (tmp_path / "notazip.zip").write_text("not a zip")
    fill = {"tmp": tmp_path, "zip": tmp_path / "tiny.zip", "nolabels": tmp_path / "nolabels.zip",
            "gap": tmp_path / "gap.zip"}
    argv = [a.format(**fill) for a in args]
    if "--seeds" not in argv:
        argv += ["--seeds", "0-1"]
    argv += ["--outdir", str(tmp_path / "out"), "--steps", "2"]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()

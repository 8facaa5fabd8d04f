"""EDM's Heun sampler (common/edm/sampler.py) and detect/generate.py: σ schedule, Algorithm 2, seed rule, PNGs."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image

from diffmem.common.edm import sampler as S
from diffmem.common.edm.sampler import SamplerError, SamplerSettings

SCRIPT = "detect/generate.py"
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SIGMA_DATA = 0.5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class GaussianNet:
    """The exact denoiser of class-k data N(μ_k, σ_d² I): D(x; σ) = μ_k + (x − μ_k) σ_d²/(σ² + σ_d²), elementwise."""

    sigma_min, sigma_max = 0.0, math.inf

    def __init__(self, image_shape=(2, 3, 3), label_dim=0):
        self.image_shape, self.label_dim = image_shape, label_dim

    def mean(self, class_labels, x):
        if class_labels is None:
            return torch.zeros_like(x)
        return (0.3 * class_labels.to(x.dtype) - 0.4).reshape(-1, 1, 1, 1).expand_as(x)

    def __call__(self, x, sigma, class_labels=None):
        mu = self.mean(class_labels, x)
        return mu + (x - mu) * SIGMA_DATA**2 / (sigma**2 + SIGMA_DATA**2)


def gaussian_denoiser(x, sigma, class_labels=None):
    return GaussianNet()(x, sigma, class_labels)


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    """Tiny saved EDM snapshots (8×8, 1 channel): an unconditional and a 3-class one."""
    from diffmem.common.edm.networks.build import ArchConfig, build_network
    from diffmem.common.edm.networks.snapshot import save_snapshot
    from diffmem.common.edm.precond import Preconditioning

    root = tmp_path_factory.mktemp("edm-snapshots")
    out = {}
    for name, label_dim in (("uncond", 0), ("cond", 3)):
        torch.manual_seed(0)
        net = build_network(ArchConfig(resolution=8, channels=1, num_channels=16, channel_mult=(1, 2), num_blocks=1,
                                       attn_resolutions=(), dropout=0.0, label_dim=label_dim), Preconditioning())
        out[name] = save_snapshot(net, root / name, 0, {})
    return out


# ------------------------------------------------------------------------------------------ schedule


def test_edm_sigma_steps_by_hand():
    smin, smax, rho, n = 0.002, 80.0, 7.0, 5
    hand = [(smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho for i in range(n)]
    t = S.edm_sigma_steps(n, smin, smax, rho)
    assert t.dtype == torch.float64 and t.shape == (n + 1,)
    np.testing.assert_allclose(t[:-1].numpy(), hand, rtol=1e-14)
    assert t[-1] == 0 and t[0] == pytest.approx(smax, rel=1e-14) and t[-2] == pytest.approx(smin, rel=1e-12)
    assert (t[:-1].diff() < 0).all()
    # One step: no interior point, straight from σ_max to 0.
    assert S.edm_sigma_steps(1, smin, smax, rho).tolist() == pytest.approx([smax, 0.0], rel=1e-14)


def test_edm_sigma_steps_match_diffusers_edm_euler_scheduler():
    from diffusers import EDMEulerScheduler

    for smin, smax, rho in ((0.002, 80.0, 7.0), (0.01, 20.0, 3.0)):
        sched = EDMEulerScheduler(sigma_min=smin, sigma_max=smax, rho=rho)
        sched.set_timesteps(18)
        ours = S.edm_sigma_steps(18, smin, smax, rho)
        assert sched.sigmas.shape == ours.shape
        np.testing.assert_allclose(ours.numpy(), sched.sigmas.double().numpy(), rtol=2e-6, atol=0)


def test_sigma_range_is_clamped_to_the_network():
    class VPLike:
        sigma_min, sigma_max = 0.0064, 152.0

    s = SamplerSettings(sigma_min=0.002, sigma_max=1000.0).for_network(VPLike())
    assert (s.sigma_min, s.sigma_max) == (0.0064, 152.0)
    assert SamplerSettings(sigma_max=80.0).for_network(VPLike()).sigma_max == 80.0
    with pytest.raises(SamplerError, match="network's range"):
        SamplerSettings(sigma_min=200.0, sigma_max=300.0).for_network(VPLike())


def test_churn_gamma():
    assert S.churn_gamma(1.0, 10, 2.0, 0.0, math.inf) == 0.2  # S_churn/N
    assert S.churn_gamma(1.0, 10, 5.0, 0.0, math.inf) == math.sqrt(2) - 1  # capped at √2 − 1
    assert S.churn_gamma(0.01, 10, 2.0, 0.05, 50.0) == 0.0  # below S_min
    assert S.churn_gamma(80.0, 10, 2.0, 0.05, 50.0) == 0.0  # above S_max
    assert S.churn_gamma(0.05, 10, 2.0, 0.05, 50.0) == 0.2  # the window is closed


# ---------------------------------------------------------------------------------- Algorithm 2


def test_one_heun_step_equals_the_formula_by_hand():
    x0 = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eps = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t0, t1, gamma, s_noise = 3.0, 1.5, 0.25, 1.007

    def D(x, t):
        return x * SIGMA_DATA**2 / (t**2 + SIGMA_DATA**2)

    # Deterministic: x = latents·t0, one Euler step, then the trapezoidal correction (t1 ≠ 0).
    x = x0 * t0
    d = (x - D(x, t0)) / t0
    x1 = x + (t1 - t0) * d
    expected = x + (t1 - t0) * (0.5 * d + 0.5 * (x1 - D(x1, t1)) / t1)
    got = S.heun_sampler(gaussian_denoiser, x0, torch.tensor([t0, t1]))
    torch.testing.assert_close(got, expected, rtol=1e-15, atol=0)

    # With churn: t̂ = t0(1 + γ), x̂ = x + sqrt(t̂² − t0²) S_noise ε, then the same step from (x̂, t̂).
    t_hat = t0 + gamma * t0
    x_hat = x + math.sqrt(t_hat**2 - t0**2) * s_noise * eps
    d = (x_hat - D(x_hat, t_hat)) / t_hat
    x1 = x_hat + (t1 - t_hat) * d
    expected = x_hat + (t1 - t_hat) * (0.5 * d + 0.5 * (x1 - D(x1, t1)) / t1)
    got = S.heun_sampler(gaussian_denoiser, x0, torch.tensor([t0, t1]), S_churn=gamma, S_noise=s_noise,
                         noise_fn=lambda x: eps)
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=0)

    # The last step to t_N = 0 is Euler only: x_N = D(x; t).
    got = S.heun_sampler(gaussian_denoiser, x0, torch.tensor([t0, 0.0]))
    torch.testing.assert_close(got, D(x0 * t0, t0), rtol=1e-13, atol=1e-15)  # x + (0 − t)(x − D)/t


def reference_edm_sampler(denoise, latents, t_steps, noises, S_churn, S_min, S_max, S_noise):
    """Algorithm 2 written out again in numpy float64, with one pre-drawn noise array per step."""
    n = len(t_steps) - 1
    x = latents * t_steps[0]
    for i in range(n):
        t, t_next = t_steps[i], t_steps[i + 1]
        g = min(S_churn / n, np.sqrt(2) - 1) if S_min <= t <= S_max else 0.0
        t_hat = t + g * t
        x_hat = x + np.sqrt(t_hat**2 - t**2) * S_noise * noises[i]
        d = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x = x_hat + (t_next - t_hat) * d
        if i < n - 1:
            d2 = (x - denoise(x, t_next)) / t_next
            x = x_hat + (t_next - t_hat) * (d / 2 + d2 / 2)
    return x


def test_heun_sampler_matches_a_direct_float64_reimplementation():
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((3, 2, 3, 3))
    t_steps = S.edm_sigma_steps(12, 0.002, 80.0, 7.0).numpy()
    noises = [rng.standard_normal(latents.shape) for _ in range(12)]
    churn = dict(S_churn=30.0, S_min=0.05, S_max=10.0, S_noise=1.007)
    expected = reference_edm_sampler(lambda x, t: x * SIGMA_DATA**2 / (t**2 + SIGMA_DATA**2), latents, t_steps,
                                     noises, **churn)
    stream = iter(noises)
    got = S.heun_sampler(gaussian_denoiser, torch.from_numpy(latents), torch.from_numpy(t_steps), **churn,
                         noise_fn=lambda x: torch.from_numpy(next(stream)))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)
    assert next(stream, None) is None  # ε drawn at every step once any step churns, as EDM does


def test_heun_on_gaussian_data_follows_the_exact_probability_flow_ode():
    # For N(0, σ_d²) data the ODE dx/dσ = (x − D)/σ = xσ/(σ² + σ_d²) gives x(0) = x_T σ_d / sqrt(σ_max² + σ_d²).
    latents = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sigmas = S.edm_sigma_steps(18, 0.002, 80.0, 7.0)
    x = S.heun_sampler(gaussian_denoiser, latents, sigmas)
    exact = latents * 80.0 * SIGMA_DATA / math.sqrt(80.0**2 + SIGMA_DATA**2)
    torch.testing.assert_close(x, exact, rtol=0.06, atol=0)  # 18 steps: 5.5 % low, the same for every pixel

    # Heun is 2nd order: doubling the steps quarters the error (ratios 4.5, 4.25, 4.15), 0.07 % at 144 steps.
    def error(n):
        x = S.heun_sampler(gaussian_denoiser, latents, S.edm_sigma_steps(n, 0.002, 80.0, 7.0))
        return ((x - exact).abs() / exact.abs()).max().item()

    errors = [error(n) for n in (18, 36, 72, 144)]
    assert all(3.5 < a / b < 5 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3
    # Deterministic without churn: the same latents give the same samples, bit for bit.
    assert torch.equal(x, S.heun_sampler(gaussian_denoiser, latents, sigmas))


# ---------------------------------------------------------------------------------------- seed rule


def test_latents_then_label_then_churn_noise_come_from_the_seed_generator():
    net = GaussianNet(image_shape=(2, 3, 3), label_dim=5)
    seeds = [0, 7, 123456]
    settings = SamplerSettings(num_steps=6, S_churn=20.0)
    got, labels = S.sample_batch(net, seeds, settings)
    for row, seed in enumerate(seeds):
        g = torch.Generator("cpu").manual_seed(seed)
        latents = torch.randn((2, 3, 3), generator=g)  # fp32 like EDM's, then float64 in the sampler
        label = torch.randint(5, size=[1], generator=g)
        assert labels[row] == label[0]
        expected = S.heun_sampler(net, latents[None], settings.sigmas(), label, S_churn=20.0,
                                  noise_fn=lambda x: torch.randn(x.shape[1:], generator=g, dtype=x.dtype)[None])
        assert torch.equal(got[row : row + 1], expected)
    assert S.seed_labels(seeds, net.image_shape, 5, None, "cpu").tolist() == labels.tolist()
    # A fixed class replaces the drawn label but leaves the stream (and so the churn noise) as it is.
    fixed, fixed_labels = S.sample_batch(net, seeds, settings, class_idx=2)
    assert fixed_labels.tolist() == [2, 2, 2]
    assert S.seed_labels(seeds, net.image_shape, 5, 2, "cpu").tolist() == [2, 2, 2]
    g = torch.Generator("cpu").manual_seed(seeds[0])
    latents = torch.randn((2, 3, 3), generator=g)
    torch.randint(5, size=[1], generator=g)
    expected = S.heun_sampler(net, latents[None], settings.sigmas(), torch.tensor([2]), S_churn=20.0,
                              noise_fn=lambda x: torch.randn(x.shape[1:], generator=g, dtype=x.dtype)[None])
    assert torch.equal(fixed[:1], expected)


def test_an_unconditional_network_draws_no_label():
    net = GaussianNet(image_shape=(1, 2, 2))
    x, labels = S.sample_batch(net, [5], SamplerSettings(num_steps=1))
    g = torch.Generator("cpu").manual_seed(5)
    latents = torch.randn((1, 2, 2), generator=g)
    assert labels is None
    # One step from σ_max to 0 is x = D(x_T; σ_max), up to the rounding of x + (0 − t)(x − D)/t
    expected = net(latents[None].double() * 80.0, torch.tensor(80.0, dtype=torch.float64))
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-13)  # x ≈ 40, D ≈ 0.002: cancellation


def test_images_are_bit_identical_whatever_the_batch():
    net = GaussianNet(image_shape=(3, 4, 4), label_dim=4)
    seeds = [3, 1, 4, 15, 9, 26, 5]
    settings = SamplerSettings(num_steps=8, S_churn=10.0, S_min=0.01, S_max=50.0)
    runs = {}
    for batch in (1, 3, len(seeds)):
        out = list(S.generate_images(net, seeds, batch, settings))
        assert len(out) == S.num_batches(len(seeds), batch)
        runs[batch] = (np.concatenate([b.images for b in out]), np.concatenate([b.labels for b in out]),
                       [s for b in out for s in b.seeds])
        floats = torch.cat([S.sample_batch(net, seeds[i : i + batch], settings)[0]
                            for i in range(0, len(seeds), batch)])
        runs[batch] += (floats,)
    for batch in (1, 3):
        assert runs[batch][2] == seeds
        assert np.array_equal(runs[batch][0], runs[len(seeds)][0])
        assert np.array_equal(runs[batch][1], runs[len(seeds)][1])
        assert torch.equal(runs[batch][3], runs[len(seeds)][3])
    assert runs[1][0].dtype == np.uint8 and runs[1][0].shape == (7, 4, 4, 3)


def test_a_real_network_gives_the_same_images_whatever_the_batch_up_to_its_fp32_rounding(snapshots):
    # The seed rule makes every input of the network a function of the seed alone (bit for bit: the test above).
    # The network itself does not round alike for every batch size: MKL's fp32 GEMM and convolution kernels
    # depend on it (a few 1e-7 in D). So the float samples agree to rounding, and a uint8 pixel right at a
    # rounding boundary may move by one level.
    from diffmem.common.edm.networks.snapshot import load_network

    net = load_network(snapshots["cond"])
    seeds = list(range(8))
    for settings, atol in ((SamplerSettings(num_steps=18), 1e-5), (SamplerSettings(num_steps=4, S_churn=5.0), 1e-3)):
        images = {b: np.concatenate([g.images for g in S.generate_images(net, seeds, b, settings)]).astype(int)
                  for b in (1, 3, 8)}
        floats = {b: torch.cat([S.sample_batch(net, seeds[i : i + b], settings)[0] for i in range(0, 8, b)])
                  for b in (1, 8)}
        torch.testing.assert_close(floats[1], floats[8], rtol=0, atol=atol)
        for b in (1, 3):
            diff = np.abs(images[b] - images[8])
            assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (b, settings, (diff > 0).sum())


def test_to_uint8_is_edms_rule():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.999, 1.0, 3.0], dtype=torch.float64).reshape(1, 1, 1, 7)
    assert S.to_uint8(x).ravel().tolist() == [0, 0, 64, 128, 255, 255, 255]  # floor(x·127.5 + 128), clipped
    rgb = torch.zeros(2, 3, 4, 5)
    rgb[:, 1] = 1
    out = S.to_uint8(rgb)
    assert out.dtype == np.uint8 and out.shape == (2, 4, 5, 3)
    assert (out[..., 0] == 128).all() and (out[..., 1] == 255).all()


def test_parse_seeds_like_edm():
    assert S.parse_seeds("0-3") == [0, 1, 2, 3]
    assert S.parse_seeds("1,5,7-9") == [1, 5, 7, 8, 9]
    assert S.parse_seeds("42") == [42]
    for bad, match in (("", "not N"), ("3-1", "backwards"), ("1,,2", "not N"), ("-1", "not N"), ("a-b", "not N"),
                       ("1.5", "not N"), ("1,0-2", "more than once"), ("4294967296", "2\\*\\*32")):
        with pytest.raises(SamplerError, match=match):
            S.parse_seeds(bad)


# ---------------------------------------------------------------------------------------------- CLI


def generate(*args):
    from diffmem.detect.generate import main

    return main([str(a) for a in args])


def png(path):
    return np.asarray(Image.open(path))


def test_cli_writes_edm_named_pngs_and_an_npz_that_match_the_library(snapshots, tmp_path):
    from diffmem.common.edm.networks.snapshot import load_network

    out = tmp_path / "out"
    assert generate("--network", snapshots["uncond"].parent, "--seeds", "0-2,10", "--batch", 3, "--outdir", out,
                    "--steps", 3, "--npz", "--device", "cpu") == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png", "000001.png", "000002.png", "000010.png"]
    assert not list(out.glob(".*"))  # no temporary files left
    assert Image.open(out / "000010.png").mode == "L"
    net = load_network(snapshots["uncond"])
    (expected,) = S.generate_images(net, [0, 1, 2, 10], 4, SamplerSettings(num_steps=3))
    with np.load(out / "images.npz") as z:
        assert sorted(z.files) == ["images", "seeds"]
        assert z["images"].dtype == np.uint8 and z["images"].shape == (4, 8, 8, 1)
        assert z["seeds"].tolist() == [0, 1, 2, 10]
        for i, seed in enumerate([0, 1, 2, 10]):
            assert np.array_equal(z["images"][i, :, :, 0], png(out / f"{seed:06d}.png"))
        assert np.array_equal(z["images"], expected.images)


def test_image_grid_tiles_in_seed_order_with_padding_and_scale():
    images = np.arange(1, 6, dtype=np.uint8).reshape(5, 1, 1, 1).repeat(2, axis=1).repeat(2, axis=2)
    grid = S.image_grid(images, padding=1)  # 5 images of 2×2 → 3 columns, 2 rows
    assert grid.shape == (2 * 3 - 1, 3 * 3 - 1, 1)
    assert grid[0, 0, 0] == 1 and grid[0, 3, 0] == 2 and grid[0, 6, 0] == 3 and grid[3, 0, 0] == 4
    assert grid[0, 2, 0] == 0 and grid[2, 0, 0] == 0 and grid[3, 6, 0] == 0  # padding, empty last tile
    big = S.image_grid(images[:1], scale=3, padding=0)
    assert big.shape == (6, 6, 1) and (big == 1).all()


def test_cli_grid_holds_every_requested_seed(snapshots, tmp_path):
    out = tmp_path / "g"
    assert generate("--network", snapshots["uncond"], "--seeds", "0-3", "--outdir", out, "--steps", 2,
                    "--grid", tmp_path / "grid.png", "--grid_scale", 2, "--device", "cpu") == 0
    grid = png(tmp_path / "grid.png")
    assert grid.shape == (2 * 16 + 2, 2 * 16 + 2)  # 2×2 tiles of 16 px, 2 px (one source pixel) between
    first = png(out / "000000.png").repeat(2, axis=0).repeat(2, axis=1)
    assert np.array_equal(grid[:16, :16], first) and not grid[16:18].any()
    assert np.array_equal(grid[18:, 18:], png(out / "000003.png").repeat(2, axis=0).repeat(2, axis=1))


def test_cli_conditional_subdirs_npz_labels_and_resume(snapshots, tmp_path, capsys):
    out = tmp_path / "cond"
    base = ["--network", snapshots["cond"], "--outdir", out, "--steps", 2, "--batch", 2, "--subdirs", "--npz"]
    assert generate(*base, "--seeds", "998-1001") == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == [
        "000000/000998.png", "000000/000999.png", "001000/001000.png", "001000/001001.png"]
    with np.load(out / "images.npz") as z:
        assert z["seeds"].tolist() == [998, 999, 1000, 1001]
        assert z["labels"].tolist() == S.seed_labels([998, 999, 1000, 1001], (1, 8, 8), 3, None, "cpu").tolist()
    capsys.readouterr()

    # Resume: existing PNGs are not sampled again (a planted image survives); the npz covers all requested seeds.
    planted = np.full((8, 8), 7, dtype=np.uint8)
    S.save_png(out / "000000" / "000999.png", planted[:, :, None])
    assert generate(*base, "--seeds", "999-1002") == 0
    assert "1 sampled now" in capsys.readouterr().out
    assert np.array_equal(png(out / "000000" / "000999.png"), planted)
    with np.load(out / "images.npz") as z:
        assert z["seeds"].tolist() == [999, 1000, 1001, 1002]
        assert np.array_equal(z["images"][0, :, :, 0], planted)
        assert z["labels"].shape == (4,)

    # Other settings would mix other images into the folder: refused.
    assert generate(*base, "--steps", 3, "--seeds", "0") == 2  # the last --steps wins
    assert "num_steps=2 (now 3)" in capsys.readouterr().err


def test_cli_rerun_regenerates_damaged_pngs_it_would_skip(snapshots, tmp_path, capsys):
    out = tmp_path / "damaged"
    base = ["--network", snapshots["cond"], "--outdir", out, "--steps", 2, "--batch", 2, "--seeds", "0-3", "--npz"]
    assert generate(*base) == 0
    good = {s: png(out / f"{s:06d}.png") for s in range(4)}
    (out / "000001.png").write_bytes((out / "000001.png").read_bytes()[:40])  # truncated by a kill elsewhere
    (out / "000002.png").write_bytes(b"not a png")
    S.save_png(out / "000003.png", np.zeros((4, 4, 1), np.uint8))  # another resolution
    capsys.readouterr()
    assert generate(*base) == 0
    cap = capsys.readouterr()
    assert "3 damaged PNGs" in cap.err and "3 sampled now (3 of them to replace damaged PNGs)" in cap.out
    assert all(np.array_equal(png(out / f"{s:06d}.png"), good[s]) for s in range(4))
    with np.load(out / "images.npz") as z:
        assert z["images"].shape == (4, 8, 8, 1)


def test_cli_class_idx_fixes_the_label(snapshots, tmp_path):
    out = tmp_path / "k"
    assert generate("--network", snapshots["cond"], "--seeds", "0-2", "--outdir", out, "--steps", 1,
                    "--class_idx", 2, "--npz") == 0
    with np.load(out / "images.npz") as z:
        assert z["labels"].tolist() == [2, 2, 2]


@pytest.mark.parametrize("args, message", [
    (["--network", "{tmp}/missing"], "no such snapshot or run folder"),
    (["--network", "{tmp}"], "not a snapshot"),
    (["--seeds", "9-1"], "runs backwards"),
    (["--seeds", "x"], "bad --seeds"),
    (["--steps", "0"], "--steps >= 1"),
    (["--batch", "0"], "--batch_size >= 1"),
    (["--sigma_min", "-1"], "--sigma_min"),
    (["--S_churn", "-1"], "--S_churn"),
    (["--class_idx", "0"], "unconditional"),
    (["--network", "{cond}", "--class_idx", "3"], "--class_idx < 3"),
    (["--steps", "two"], "invalid int value"),
])
def test_cli_bad_input_is_one_line_and_exit_2(snapshots, tmp_path, capsys, args, message):
    fill = {"tmp": tmp_path, "cond": snapshots["cond"]}
    argv = {"--network": str(snapshots["uncond"]), "--seeds": "0-1", "--outdir": str(tmp_path / "out")}
    extra = [a.format(**fill) for a in args]
    for key in list(argv):
        if key in extra:
            argv.pop(key)
    flat = [x for kv in argv.items() for x in kv] + extra
    try:
        code = generate(*flat)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------- two processes


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_write_the_same_images_as_one(snapshots, tmp_path):
    args = ["--network", snapshots["cond"], "--seeds", "0-4", "--steps", 3, "--S_churn", 5, "--batch", 1,
            "--device", "cpu", "--npz"]
    assert generate(*args, "--outdir", tmp_path / "one") == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true", **ONE_THREAD}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu.yaml",
           "--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port()), SCRIPT,
           *map(str, args), "--outdir", str(tmp_path / "two")]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "on 2 processes" in res.stdout
    names = sorted(p.name for p in (tmp_path / "one").glob("*.png"))
    assert names == sorted(p.name for p in (tmp_path / "two").glob("*.png")) and len(names) == 5
    for name in names:
        assert np.array_equal(png(tmp_path / "one" / name), png(tmp_path / "two" / name)), name
    with np.load(tmp_path / "one" / "images.npz") as a, np.load(tmp_path / "two" / "images.npz") as b:
        assert all(np.array_equal(a[k], b[k]) for k in ("images", "seeds", "labels"))

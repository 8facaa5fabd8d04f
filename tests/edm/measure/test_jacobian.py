"""The denoiser's Jacobian (common.edm.measure.jacobian, detect/jacobian.py): equal to
torch.autograd.functional.jacobian on
tiny networks, equal to the closed form Cov_w(y)/σ² for the optimal denoiser, the rank rule, the randomized rank
(its probability bounds against scipy and Monte Carlo, its rank against the full SVD's on matrices of known singular
values and on tiny nets, the fall-back), the evaluation points (x = σ·z, the Heun states), and the CLI's rows,
resume, plot and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cli

from diffmem.common.edm import sampler as S
from diffmem.common.edm.dataset.molrg import MoLRGRecipe, molrg_bases, molrg_denoiser
from diffmem.common.edm.measure import jacobian as J
from diffmem.common.edm.networks.optimal import OptimalDenoiser
from diffmem.common.edm.networks.snapshot import save_snapshot

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (3, 4, 4)


def tiny_net(label_dim=0, attn=(), resolution=4):
    from diffmem.common.edm.networks.build import ArchConfig, build_network
    from diffmem.common.edm.precond import Preconditioning

    torch.manual_seed(0)
    arch = ArchConfig(resolution=resolution, channels=3, num_channels=8, channel_mult=(1, 2), num_blocks=1,
                      attn_resolutions=attn, dropout=0, label_dim=label_dim)
    return build_network(arch, Preconditioning("edm")).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    from diffmem.common.edm.networks.snapshot import save_snapshot

    return save_snapshot(tiny_net(), tmp_path_factory.mktemp("jac-net"), 0, {})


def reference(denoise, x, sigma, labels=None):
    """torch.autograd.functional.jacobian's default: one backward pass per output."""
    f = J.flat_denoiser(denoise, x.shape, torch.as_tensor(sigma, dtype=torch.float64), labels)
    return torch.autograd.functional.jacobian(f, x.reshape(-1))


def training_set(n=6, seed=0):
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------------------ the rank


def test_rank_is_the_first_k_whose_energy_strictly_passes_the_threshold():
    assert J.numerical_rank(torch.tensor([10.0, 0.1, 0.01])) == 1
    assert J.numerical_rank(torch.tensor([4.0, 3.0])) == 2  # 4 < 0.99·5
    # √(Σ_{j≤1} s²) = 1 equals 0.5·‖J‖_F = 0.5·2 exactly: not past it, so k = 2.
    assert J.numerical_rank(torch.ones(4), threshold=0.5) == 2
    assert J.numerical_rank(torch.zeros(5)) == 0
    s = J.singular_values(torch.diag(torch.tensor([1.0, 3.0, 0.0, 2.0])))
    assert s.tolist() == [3.0, 2.0, 1.0, 0.0] and s.dtype == torch.float64
    row = J.rank_row(7, 0.5, torch.diag(torch.tensor([1.0, 0.0, 0.0, 0.0])), 0.99)
    assert row.to_dict() == {"seed": 7, "sigma": 0.5, "rank": 1, "rank_ratio": 0.25, "dim": 4, "fro": 1.0,
                             "method": "full", "fallback": None, "subspace": 4, "rank_lo": 1, "rank_hi": 1,
                             "fro_lo": 1.0, "fro_hi": 1.0, "failure_probability": 0.0}


# ------------------------------------------------------------------------------- against autograd


@pytest.mark.parametrize("method", J.METHODS)
@pytest.mark.parametrize("sigma", [0.02, 0.7, 20.0])
def test_network_jacobian_equals_autograd_functional_jacobian(method, sigma):
    net = tiny_net()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * max(sigma, 0.5)
    ours = J.denoiser_jacobian(net, x, sigma, chunk_size=7, method=method)  # 7 does not divide 48
    ref = reference(net, x, sigma)
    assert ours.shape == (48, 48)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)
    assert J.numerical_rank(J.singular_values(ours)) == J.numerical_rank(J.singular_values(ref))


def test_conditional_network_and_attention_layers():
    net = tiny_net(label_dim=3, attn=(2,))
    processors = [m.processor for m in net.modules() if hasattr(m, "set_processor")]
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([2])
    ours = J.denoiser_jacobian(net, x, 1.5, labels, chunk_size=16)
    ref = reference(net, x, 1.5, labels)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)
    assert not torch.allclose(ours, reference(net, x, 1.5, torch.tensor([0])), atol=1e-5, rtol=0)
    # The math-attention swap is undone afterwards.
    assert [m.processor for m in net.modules() if hasattr(m, "set_processor")] == processors


def test_a_wrong_batching_rule_cannot_pass_silently(monkeypatch):
    net = tiny_net()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(J, "jacobian_vmap", lambda f, v, chunk: reference(net, x, 0.5) * 1.01)
    with pytest.raises(J.JacobianError, match="plain autograd VJP"):
        J.denoiser_jacobian(net, x, 0.5)


# ---------------------------------------------------------------------------- the optimal denoiser


@pytest.mark.parametrize("sigma", [0.3, 1.0, 3.0])
def test_optimal_denoiser_jacobian_is_the_weighted_covariance_over_sigma_squared(sigma):
    from diffmem.common.edm.networks.optimal import OptimalDenoiser

    y = training_set()
    od = OptimalDenoiser(y)
    x = y[2] + sigma * torch.randn(SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    closed = J.optimal_jacobian(x, sigma, y)
    ours = J.denoiser_jacobian(od, x, sigma, method="batch", chunk_size=10)
    assert ours.dtype == torch.float64
    assert torch.allclose(ours, closed, atol=1e-12, rtol=1e-10)
    assert torch.allclose(reference(od, x, sigma), closed, atol=1e-12, rtol=1e-10)
    assert torch.allclose(closed, closed.T, atol=1e-14)  # a covariance: symmetric
    assert J.numerical_rank(J.singular_values(ours)) <= len(y) - 1  # Σ wᵢ(yᵢ − D)(yᵢ − D)ᵀ has rank ≤ N − 1


def test_torch_func_on_the_optimal_denoiser_is_right_or_refused():
    from diffmem.common.edm.networks.optimal import OptimalDenoiser

    y = training_set()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    try:
        ours = J.denoiser_jacobian(OptimalDenoiser(y), x, 2.0, method="vmap")
    except J.JacobianError:
        return  # torch 2.14's vmapped cdist backward is wrong: the check refuses it
    assert torch.allclose(ours, J.optimal_jacobian(x, 2.0, y), atol=1e-12)


def test_optimal_jacobian_vanishes_near_a_training_image_and_is_the_covariance_at_huge_sigma():
    from diffmem.common.edm.networks.optimal import OptimalDenoiser

    y = training_set()
    od = OptimalDenoiser(y)
    near = y[3] + 1e-3 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    small = J.denoiser_jacobian(od, near, 0.01, method="batch")
    assert float(small.norm()) < 1e-30  # one-hot softmax: e^(−Δ‖x − y‖²/2σ²) of the runner-up underflows
    assert J.rank_row(0, 0.01, small, 0.99).rank == 0
    # σ → ∞: the weights tend to 1/N, so J → Cov(y)/σ² with the population covariance of the training set.
    sigma = 1e4
    flat = y.reshape(len(y), -1)
    cov = (flat - flat.mean(0)).T @ (flat - flat.mean(0)) / len(y)
    big = J.denoiser_jacobian(od, torch.zeros(SHAPE, dtype=torch.float64), sigma, method="batch")
    assert torch.allclose(big * sigma**2, cov, rtol=0, atol=1e-6 * float(cov.abs().max()))
    assert J.numerical_rank(J.singular_values(big)) == J.numerical_rank(J.singular_values(cov))


# ------------------------------------------------------------------------------- evaluation points


def test_noise_points_are_sigma_times_the_seed_latent():
    latent = S.draw_latents(S.seed_generators([5], "cpu"), SHAPE, "cpu")[0]
    points, labels = J.evaluation_points(tiny_net(), 5, SHAPE, "noise", [0.5, 2.0])
    assert labels is None and [s for s, _ in points] == [0.5, 2.0]
    assert torch.equal(points[1][1], latent.double() * 2.0) and points[1][1].dtype == torch.float64


def test_trajectory_states_are_the_heun_samplers_own():
    net = tiny_net()
    sigmas = S.edm_sigma_steps(5, 0.002, 80.0, 7.0)
    latent = S.draw_latents(S.seed_generators([3], "cpu"), SHAPE, "cpu")
    points, _ = J.evaluation_points(net, 3, SHAPE, "trajectory", sigmas)
    assert [s for s, _ in points] == sigmas[:-1].tolist()  # σ_max first; σ_N = 0 is no denoiser input
    for i, (_, x) in enumerate(points):
        with torch.no_grad():
            # The sampler run over t_0 … t_i ends at x_i (every step has t_next ≠ 0, so all are Heun steps).
            assert torch.equal(x, S.heun_sampler(net, latent, sigmas[:i + 1])[0])


def test_conditional_seed_rule_draws_the_label_after_the_latent():
    _, labels = J.evaluation_points(tiny_net(label_dim=3), 11, SHAPE, "noise", [1.0], label_dim=3)
    assert labels.tolist() == S.seed_labels([11], SHAPE, 3, None, "cpu").tolist()


def test_rows_skip_done_pairs():
    net = tiny_net()
    rows = list(J.jacobian_rows(net, [0, 1], SHAPE, "noise", [0.1, 1.0], done={(0, 0.1), (0, 1.0), (1, 1.0)},
                                progress=False))
    assert [(r.seed, r.sigma) for r in rows] == [(1, 0.1)]
    x = 0.1 * S.draw_latents(S.seed_generators([1], "cpu"), SHAPE, "cpu")[0].double()
    assert rows[0] == J.rank_row(1, 0.1, J.denoiser_jacobian(net, x, 0.1), 0.99, rows[0].fallback)


# ------------------------------------------------------------------------------------------- the CLI


def jacobian(*args):
    from diffmem.detect.jacobian import main

    return main([str(a) for a in args])


def rows_of(out):
    return [json.loads(line) for line in (out / "jacobian.jsonl").read_text().splitlines()]


def test_cli_trajectory_rows_resume_summary_and_plot(snapshot, tmp_path, capsys):
    out = tmp_path / "traj"
    assert jacobian("--network", snapshot, "--seeds", "0-1", "--trajectory", "--steps", 4, "--out", out,
                    "--no_progress") == 0
    rows = rows_of(out)
    sigmas = S.edm_sigma_steps(4, 0.002, 80.0, 7.0)[:-1].tolist()
    assert [(r["seed"], r["sigma"]) for r in rows] == [(s, t) for s in (0, 1) for t in sigmas]
    assert all(set(r) == set(J.JacobianRow._fields) and r["dim"] == 48 for r in rows)
    # D = 48 is below the randomized rank's min_dim: every row says it took the full Jacobian, and why.
    assert all(r["method"] == "full" and "cheaper at D = 48" in r["fallback"] for r in rows)
    assert all(r["rank_ratio"] == r["rank"] / 48 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert [s["sigma"] for s in summary["per_sigma"]] == sigmas and summary["per_sigma"][0]["n"] == 2
    assert (out / "rank.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "rank/dim" in capsys.readouterr().out

    # A torn last line is cut, done pairs are skipped, the new seed's rows are appended.
    with open(out / "jacobian.jsonl", "a") as f:
        f.write('{"seed": 9, "sig')
    assert jacobian("--network", snapshot, "--seeds", "0-2", "--steps", 4, "--out", out, "--no_progress") == 0
    again = rows_of(out)
    assert again[:len(rows)] == rows and len(again) == 3 * len(sigmas)
    assert {r["seed"] for r in again[len(rows):]} == {2}

    # Other settings would mix other rows in: refused unless --overwrite.
    capsys.readouterr()
    assert jacobian("--network", snapshot, "--seeds", "0", "--steps", 4, "--threshold", 0.9, "--out", out) == 2
    assert "threshold=0.99 (now 0.9)" in capsys.readouterr().err
    assert jacobian("--network", snapshot, "--seeds", "0", "--steps", 4, "--threshold", 0.9, "--out", out,
                    "--overwrite", "--no_progress") == 0
    assert len(rows_of(out)) == len(sigmas)


def test_cli_sigmas_rows_are_the_library_rank_at_sigma_times_latent(snapshot, tmp_path):
    out = tmp_path / "sig"
    assert jacobian("--network", snapshot, "--seeds", "4", "--sigmas", "0.05,3", "--out", out, "--no_progress") == 0
    rows = rows_of(out)
    net = tiny_net()
    latent = S.draw_latents(S.seed_generators([4], "cpu"), SHAPE, "cpu")[0].double()
    for r, sigma in zip(rows, (0.05, 3.0)):
        jac = reference(net, latent * sigma, sigma)
        assert r["sigma"] == sigma and r["rank"] == J.numerical_rank(J.singular_values(jac))
        assert r["fro"] == pytest.approx(float(jac.norm()), rel=1e-5)


def test_cli_optimal_denoiser_of_a_dataset_zip(tmp_path):
    from diffmem.common.edm.dataset.edm_zip import write_float_dataset_zip

    y = training_set(8).numpy().astype(np.float32)
    write_float_dataset_zip(tmp_path / "d.zip", y, np.arange(8) % 2)
    out = tmp_path / "opt"
    assert jacobian("--optimal_denoiser", "--dataset", tmp_path / "d.zip", "--seeds", "0-1", "--steps", 6,
                    "--out", out, "--no_progress") == 0
    rows = rows_of(out)
    # σ_max = 80: J ≈ Cov(y)/σ² of 8 images, rank ≤ 7; σ = 0.002 at the end of the trajectory: on a training image.
    assert all(0 < r["rank"] <= 7 for r in rows if r["sigma"] == 80.0)
    assert all(r["rank"] == 0 or r["fro"] < 1e-6 for r in rows if r["sigma"] == 0.002)
    assert json.loads((out / "jacobian.json").read_text())["denoiser"].startswith("optimal:")


@pytest.mark.parametrize("args, message", [
    (["--optimal_denoiser"], "needs --dataset"),
    (["--dataset", "{tmp}/d.zip"], "--data is the training set of --optimal_denoiser"),
    (["--sigmas", "0.1,x"], "bad --sigmas"),
    (["--sigmas", "0.1,-1"], "finite and > 0"),
    (["--sigmas", "0.1,0.1"], "more than once"),
    (["--sigmas", "0.1", "--steps", "4"], "does not apply with --sigmas"),
    (["--sigmas", "0.1", "--trajectory"], "not allowed with argument"),
    (["--threshold", "1"], "0 < --energy_threshold < 1"),
    (["--chunk", "0"], "--chunk >= 1"),
    (["--block", "0"], "--block >= 1"),
    (["--probes", "1"], "--probes >= 2"),
    (["--block", "8", "--max_subspace", "4"], "--max_subspace >= --block (8)"),
    (["--failure_probability", "1"], "0 < --failure_probability < 1"),
    (["--method", "svd"], "invalid choice"),
    (["--seeds", "3-1"], "runs backwards"),
    (["--network", "{tmp}/missing"], "no such snapshot"),
])
def test_cli_bad_input_is_one_line_and_exit_2(snapshot, tmp_path, capsys, args, message):
    (tmp_path / "d.zip").write_bytes(b"")
    argv = {"--network": str(snapshot), "--seeds": "0", "--out": str(tmp_path / "out")}
    extra = [a.format(tmp=tmp_path) for a in args]
    if "--optimal_denoiser" in extra or "--network" in extra:
        argv.pop("--network")
    if "--seeds" in extra:
        argv.pop("--seeds")
    try:
        code = jacobian(*[x for kv in argv.items() for x in kv], *extra)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_entry_point_runs_as_a_script(snapshot, tmp_path):
    res = run_cli("detect/jacobian.py", "--network", snapshot, "--seeds", "0", "--sigmas", "1", "--out",
                  tmp_path / "o", "--no_progress", "--device", "cpu", env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    res = run_cli("detect/jacobian.py", "--optimal_denoiser", "--seeds", "0", "--out", tmp_path / "o2")
    assert res.returncode == 2 and res.stderr.strip() == "jacobian: error: --optimal_denoiser needs --dataset D.zip " \
                                                         "(its training set)"


def test_trajectory_of_an_iddpm_network_visits_its_sigma_table_as_edms_sampler():
    """EDM's sampler snaps an iDDPM network's steps to its σ table; the Jacobian's trajectory is that sampler's."""
    from diffmem.common.edm.networks.edm_preconditioners import iDDPMPrecond
    from diffmem.detect.jacobian import JacobianConfig, evaluation_sigmas

    net = iDDPMPrecond(img_resolution=8, img_channels=1, model_channels=8, channel_mult=[1], num_blocks=1,
                       attn_resolutions=[]).eval()
    cfg = JacobianConfig(network="unused", seeds="0", out="unused", steps=6)
    sigmas, _ = evaluation_sigmas(cfg, net)
    table = set(net.u.tolist())
    assert len(sigmas) == 7 and sigmas[-1] == 0.0 and all(s in table for s in sigmas[:-1])
    plain, _ = evaluation_sigmas(cfg, type("Plain", (), {"sigma_min": net.sigma_min, "sigma_max": net.sigma_max})())
    assert plain != sigmas  # without round_sigma the schedule's own values, off the table


# ------------------------------------------------------------------------------ the randomized rank


def with_singular_values(s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """U diag(s) Vᵀ with seeded Haar-random U, V (float64): a linear map whose singular values are s."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(len(s), len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(len(s), len(s), generator=g, dtype=torch.float64))
    return (u * s.to(torch.float64)) @ v.T


def matrix_rank(a: torch.Tensor, **kw) -> J.RandomizedRank:
    return J.randomized_rank(lambda t: t @ a.T, lambda u: u @ a, len(a), **kw)


@pytest.mark.parametrize("p", [16, 64, 200])
@pytest.mark.parametrize("delta", [1e-2, 1e-7])
def test_chi2_lower_quantile_is_a_valid_and_not_far_off_quantile(p, delta):
    from scipy.stats import chi2

    q = J.chi2_lower_quantile(p, delta)
    assert chi2.cdf(q, p) <= delta  # the Chernoff bound holds
    assert q >= 0.5 * chi2.ppf(delta, p)  # and is not wildly loose


def draws(mu: np.ndarray, p: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n Monte Carlo draws of X = (1/p) Σᵢ gᵢᵀBgᵢ and λ_max of the p×p Gram matrix, B = diag(mu)."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n, p, len(mu))) * np.sqrt(mu)
    gram = np.einsum("npd,nqd->npq", g, g)
    return np.einsum("npp->n", gram) / p, np.linalg.eigvalsh(gram)[:, -1]


@pytest.mark.parametrize("mu", [np.full(200, 0.01), np.r_[1.0, np.full(99, 1e-3)], np.r_[[1.0] * 3, [0.0] * 50]])
def test_residual_bounds_fail_at_most_as_often_as_stated(mu):
    """Monte Carlo against the true R = Σμ and μ₁: each bound fails in at most δ of the draws (plus MC noise)."""
    p, delta, n = 16, 0.05, 2000
    means, tops = draws(mu, p, n, seed=1)
    top_up = np.array([J.residual_top_eigenvalue_bound(t, p, delta) for t in tops])
    assert np.mean(top_up < mu.max()) <= delta + 0.015
    bounds = np.array([J.residual_energy_bounds(m, mu.max(), p, delta) for m in means])
    assert np.mean(bounds[:, 1] < mu.sum()) <= delta + 0.015 and np.mean(bounds[:, 0] > mu.sum()) <= delta + 0.015
    assert np.all(bounds[:, 0] <= means) and np.all(means <= bounds[:, 1])
    assert J.residual_energy_bounds(0.0, 0.0, p, delta) == (0.0, 0.0)


def test_rank_interval_brackets_the_rank_and_closes_on_the_top_subspace():
    s = torch.cat([torch.linspace(5, 2, 10), torch.full((90,), 0.05)]).double()
    a = with_singular_values(s)
    true = J.numerical_rank(J.singular_values(a))
    _, _, vh = torch.linalg.svd(a)
    for m in (4, 10, 30):  # Q = the top m right singular vectors, R and μ₁ exact
        q = vh[:m]
        ritz = torch.linalg.svdvals(a @ q.T)
        residual = float((s[m:] ** 2).sum())
        lo, hi = J.rank_interval(ritz, residual, residual, float(s[m] ** 2), 100)
        assert lo <= true <= hi
    assert (lo, hi) == (true, true)
    # A random subspace: still a bracket, just wider.
    q = torch.linalg.qr(torch.randn(100, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64))[0].T
    r = float(a.square().sum() - (a @ q.T).square().sum())
    lo, hi = J.rank_interval(torch.linalg.svdvals(a @ q.T), r, r, float(s[0] ** 2), 100)
    assert lo <= true <= hi and hi - lo > 10
    assert J.rank_interval(torch.zeros(3, dtype=torch.float64), 0.0, 0.0, 0.0, 100) == (0, 0)


@pytest.mark.parametrize("name, s", [
    ("low rank + noise", torch.cat([torch.linspace(10, 3, 20), torch.full((492,), 0.02)])),
    ("geometric decay", 0.9 ** torch.arange(512.0)),
    ("exact rank 5", torch.cat([torch.ones(5), torch.zeros(507)])),
    ("zero", torch.zeros(512)),
])
def test_randomized_rank_equals_the_full_svds_on_known_singular_values(name, s):
    a = with_singular_values(s)
    got = matrix_rank(a)
    true = J.numerical_rank(J.singular_values(a))
    assert got.rank == true and got.rank_lo == got.rank_hi == true and got.reason == "", (name, got)
    assert got.fro_lo - 1e-9 <= float(a.norm()) <= got.fro_hi + 1e-9
    assert got.subspace < 512 // 4  # decided from a small subspace, not by spanning everything


def test_randomized_rank_grows_the_subspace_until_decided_and_otherwise_gives_up_with_its_bounds():
    # rank 40 of 512: decided only after several blocks of 8.
    a = with_singular_values(torch.cat([torch.linspace(3, 1, 40), torch.full((472,), 1e-3)]).double())
    got = matrix_rank(a, block=8, probes=32)
    assert got.rank == J.numerical_rank(J.singular_values(a)) and got.checks > 3 and got.subspace >= 40
    # A flat spectrum (rank 502 of 512) cannot be decided inside D/8: None, with true bounds and the reason.
    flat = with_singular_values(torch.ones(512, dtype=torch.float64))
    got = matrix_rank(flat, max_subspace=96)
    assert got.rank is None and got.rank_lo <= 502 <= got.rank_hi and "subspace budget 96" in got.reason


def test_products_that_are_not_adjoint_are_refused():
    a = with_singular_values(torch.linspace(2, 1, 512).double())
    with pytest.raises(J.JacobianError, match="not adjoint"):
        J.randomized_rank(lambda t: t @ a.T, lambda u: u @ a.T, 512)


class LowRankPlusNet(torch.nn.Module):
    """The ideal MoLRG denoiser (Jacobian rank ≤ 2·7) plus 1e-3 × a tiny net: low rank with a full-rank floor."""

    def __init__(self, res: int = 8):
        super().__init__()
        self.net = tiny_net(attn=(4,), resolution=res)
        self.register_buffer("bases", torch.as_tensor(molrg_bases(MoLRGRecipe(res=res, classes=2, dim=7))))
        self.image_shape = (3, res, res)

    def forward(self, x, sigma, class_labels=None):
        ideal = molrg_denoiser(x.reshape(len(x), -1), sigma, self.bases).reshape(x.shape)
        return ideal + 1e-3 * self.net(x, sigma, class_labels).to(torch.float64)


@pytest.mark.parametrize("sigma", [0.05, 1.0])
def test_randomized_rank_of_a_low_rank_network_equals_the_full_svds(sigma):
    denoise = LowRankPlusNet()
    x = torch.randn(denoise.image_shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * sigma
    settings = J.RandomizedSettings(min_dim=0)
    row = J.point_rank_row(denoise, 0, sigma, x, None, randomized=settings)
    full = J.point_rank_row(denoise, 0, sigma, x, None, rank_method="full")
    assert row.method == "randomized" and row.fallback is None and row.subspace < 192
    assert row.rank == full.rank and row.rank_lo == row.rank_hi == full.rank and full.rank <= 20
    assert row.fro_lo <= full.fro * (1 + 1e-6) and full.fro <= row.fro_hi * (1 + 1e-6)
    assert row.failure_probability == 1e-6 and full.method == "full" and full.fallback is None


def test_the_fall_back_to_the_full_jacobian_is_taken_and_reported():
    net = tiny_net()  # D = 48, rank ≈ 40: not decidable inside a subspace of 16
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    row = J.point_rank_row(net, 3, 0.5, x, None, randomized=J.RandomizedSettings(8, 16, 16, min_dim=0))
    full = J.rank_row(3, 0.5, reference(net, x, 0.5), 0.99)
    assert row.method == "full" and "subspace budget 16" in row.fallback and row.rank == full.rank
    assert (row.rank_lo, row.rank_hi, row.subspace) == (full.rank, full.rank, 48)
    # The optimal denoiser has no vmapped JVP (torch.cdist): full, saying so.
    od_row = J.point_rank_row(OptimalDenoiser(training_set()), 0, 1.0, x, None, method="batch",
                              randomized=J.RandomizedSettings(min_dim=0))
    assert od_row.method == "full" and "no vmapped JVP" in od_row.fallback


def test_cli_randomized_rows_record_the_fall_back_and_full_rows_do_not(tmp_path):
    snap = save_snapshot(tiny_net(resolution=16), tmp_path / "net16", 0, {})  # D = 768: randomized is tried
    out = tmp_path / "r"
    assert jacobian("--network", snap, "--seeds", "0", "--sigmas", "1", "--out", out, "--no_progress") == 0
    (row,) = rows_of(out)
    # A random net's Jacobian is near full rank: the first check estimates it above the budget D/8 = 96.
    assert row["method"] == "full" and "above the subspace budget 96" in row["fallback"] and row["dim"] == 768
    assert jacobian("--network", snap, "--seeds", "0", "--sigmas", "1", "--method", "full", "--out",
                    tmp_path / "f", "--no_progress") == 0
    (full,) = rows_of(tmp_path / "f")
    assert full["method"] == "full" and full["fallback"] is None and full["rank"] == row["rank"]

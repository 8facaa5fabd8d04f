"""The denoiser's Jacobian (common.edm.measure.jacobian, detect/jacobian.py): equal to
torch.autograd.functional.jacobian on
tiny networks, equal to the closed form Cov_w(y)/σ² for the optimal denoiser, the rank rule, the evaluation points
(x = σ·z, the Heun states), and the CLI's rows, resume, plot and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cli

from diffmem.common.edm import sampler as S
from diffmem.common.edm.measure import jacobian as J

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (3, 4, 4)


def tiny_net(label_dim=0, attn=()):
    from diffmem.common.edm.networks.build import ArchConfig, build_network
    from diffmem.common.edm.precond import Preconditioning

    torch.manual_seed(0)
    arch = ArchConfig(resolution=4, channels=3, num_channels=8, channel_mult=(1, 2), num_blocks=1,
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
    assert row.to_dict() == {"seed": 7, "sigma": 0.5, "rank": 1, "rank_ratio": 0.25, "dim": 4, "fro": 1.0}


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
    assert rows[0] == J.rank_row(1, 0.1, J.denoiser_jacobian(net, x, 0.1), 0.99)


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
    assert all(set(r) == {"seed", "sigma", "rank", "rank_ratio", "dim", "fro"} and r["dim"] == 48 for r in rows)
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

"""MoLRG data (common.edm.dataset.molrg, data/dataset_tool.py --source molrg): orthonormal, mutually orthogonal class
bases,
samples on their class's subspace with covariance U_kU_kᵀ, seeded, stored exactly as float32, fed to training
unscaled and trained on through finetune/train_unconditional.py; the ideal MoLRG denoiser's Jacobian."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch
from conftest import ONE_THREAD, run_cli

from diffmem.common.edm.dataset import molrg as M
from diffmem.common.edm.dataset.edm_zip import (
    DatasetError,
    ImageDataset,
    collate_image_batch,
    load_dataset_zip,
    to_model_range,
    write_float_dataset_zip,
)

RECIPE = M.MoLRGRecipe(res=4, classes=2, dim=7, per_class=350, seed=0)


def tool(*args):
    from diffmem.data.dataset_tool import main

    return main([str(a) for a in args])


# --------------------------------------------------------------------------------------- the draws


def test_bases_are_orthonormal_and_classes_span_orthogonal_subspaces():
    q = M.random_orthogonal(48, np.random.default_rng(1))
    assert np.allclose(q.T @ q, np.eye(48), atol=1e-12) and np.allclose(q @ q.T, np.eye(48), atol=1e-12)
    u = M.molrg_bases(M.MoLRGRecipe(res=4, classes=3, dim=5))
    assert u.shape == (3, 48, 5)
    for j in range(3):
        for k in range(3):
            assert np.allclose(u[j].T @ u[k], np.eye(5) if j == k else 0, atol=1e-12)


def test_random_orthogonal_fixes_the_signs_of_r():
    g = np.random.default_rng(2).standard_normal((6, 6))
    q = M.random_orthogonal(6, np.random.default_rng(2))
    r = q.T @ g  # g = Q R with the same Q: R upper triangular with a positive diagonal
    assert np.allclose(np.tril(r, -1), 0, atol=1e-12) and (np.diag(r) > 0).all()


def test_samples_lie_on_their_class_subspace_with_covariance_u_ut():
    recipe = M.MoLRGRecipe(res=2, classes=2, dim=3, per_class=20000, seed=3)
    u = M.molrg_bases(recipe)
    x, labels = M.molrg_samples(u, recipe.per_class, recipe.seed)
    assert x.shape == (40000, 12) and labels.tolist() == [0] * 20000 + [1] * 20000
    for k in range(2):
        xk = x[labels == k]
        off = xk - xk @ u[k] @ u[k].T  # the part outside span(U_k)
        assert np.abs(off).max() < 1e-12
        cov = xk.T @ xk / len(xk)  # the mean is 0
        assert np.abs(cov - u[k] @ u[k].T).max() < 0.05  # statistically loose: entries of ± 1/√n ≈ 0.007
    assert abs(np.mean(x**2) - 3 / 12) < 0.01  # per-pixel variance d/D


def test_dataset_is_seeded_class_major_float32_images():
    a, b, c = M.molrg_dataset(RECIPE), M.molrg_dataset(RECIPE), M.molrg_dataset(M.MoLRGRecipe(seed=1))
    assert a.images.shape == (700, 3, 4, 4) and a.images.dtype == np.float32
    assert np.array_equal(a.images, b.images) and not np.allclose(a.images, c.images)
    assert a.labels.tolist() == [0] * 350 + [1] * 350 and a.names[3] == "data.npy[3]"
    # The flattened C×H×W image is the vector x = U_k g.
    u = M.molrg_bases(RECIPE)
    flat = a.images.reshape(700, 48).astype(np.float64)
    assert np.abs(flat[:350] - flat[:350] @ u[0] @ u[0].T).max() < 1e-5  # float32 rounding only


def test_recipe_checks():
    for bad, message in ((dict(dim=0), "--molrg_dim must be at least 1"),
                         (dict(res=2, classes=3, dim=5), "do not fit in D = 3·2² = 12"),
                         (dict(seed=-1), "--seed must be >= 0")):
        with pytest.raises(Exception, match=message):
            M.MoLRGRecipe(**bad).validate()


# ------------------------------------------------------------------------------------------ the zip


def test_dataset_tool_writes_a_float_zip_that_reads_back_exactly(tmp_path, capsys):
    dest = tmp_path / "molrg.zip"
    assert tool("--source", "molrg", "--molrg_res", 4, "--molrg_classes", 2, "--molrg_dim", 7,
                "--molrg_per_class", 350, "--seed", 0, "--dest", dest) == 0
    assert "700 MoLRG samples 3×4×4" in capsys.readouterr().out
    back = load_dataset_zip(dest, progress=False)
    want = M.molrg_dataset(RECIPE)
    assert back.images.dtype == np.float32 and np.array_equal(back.images, want.images)  # bit for bit
    assert back.labels.tolist() == want.labels.tolist() and back.names == want.names
    with zipfile.ZipFile(dest) as zf:
        assert sorted(zf.namelist()) == ["data.npy", "dataset.json", "source.json"]
        info = json.loads(zf.read("source.json"))
    assert info == {"kind": "molrg", "res": 4, "classes": 2, "dim": 7, "per_class": 350, "seed": 0,
                    "ambient_dim": 48}
    # Same seed, same bytes; another seed, other data.
    assert tool("--source", "molrg", "--seed", 0, "--dest", tmp_path / "again.zip") == 0
    assert tool("--source", "molrg", "--seed", 1, "--dest", tmp_path / "other.zip") == 0
    with zipfile.ZipFile(dest) as z1, zipfile.ZipFile(tmp_path / "again.zip") as z2, \
            zipfile.ZipFile(tmp_path / "other.zip") as z3:
        assert z1.read("data.npy") == z2.read("data.npy") != z3.read("data.npy")


def test_image_dataset_feeds_float_data_unscaled(tmp_path):
    data = M.molrg_dataset(M.MoLRGRecipe(res=2, classes=2, dim=2, per_class=4))
    write_float_dataset_zip(tmp_path / "d.zip", data.images, data.labels)
    ds = ImageDataset(tmp_path / "d.zip", seed=0)
    assert ds.is_float and ds.shape == (3, 2, 2) and ds.num_classes == 2 and len(ds) == 8
    image, label = ds[5]
    assert torch.equal(image, torch.from_numpy(data.images[5])) and int(label) == 1
    batch = collate_image_batch([ds[(0, 0, 1)], ds[(0, 1, 6)]])
    assert torch.equal(batch["pixel_values"], torch.from_numpy(data.images[[1, 6]]))
    # uint8 images are scaled exactly as before.
    u8 = np.array([[[[0, 255]]]], dtype=np.uint8)
    assert to_model_range(u8).tolist() == [[[[-1.0, 1.0]]]]
    assert to_model_range(torch.from_numpy(u8)).tolist() == [[[[-1.0, 1.0]]]]
    assert not ImageDataset(_uint8_arrays()).is_float


def _uint8_arrays():
    from diffmem.common.edm.dataset.edm_zip import DatasetArrays

    return DatasetArrays(np.zeros((2, 1, 2, 2), np.uint8), None, ["a", "b"])


def test_bad_float_zips_are_one_line_errors(tmp_path):
    with pytest.raises(DatasetError, match="expected finite float32"):
        write_float_dataset_zip(tmp_path / "x.zip", np.zeros((2, 3, 2, 2), np.float64))
    with pytest.raises(DatasetError, match="expected finite float32"):
        write_float_dataset_zip(tmp_path / "x.zip", np.full((2, 3, 2, 2), np.nan, np.float32))
    assert not (tmp_path / "x.zip").exists()
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("data.npy", b"not an array")
    with pytest.raises(DatasetError, match="cannot read it as a .npy array"):
        load_dataset_zip(bad)
    both = tmp_path / "both.zip"
    write_float_dataset_zip(both, np.zeros((1, 3, 2, 2), np.float32))
    with zipfile.ZipFile(both, "a") as zf:
        zf.writestr("00000/img00000000.png", b"")
    with pytest.raises(DatasetError, match="holds both images and data.npy"):
        load_dataset_zip(both)


@pytest.mark.parametrize("args, message", [
    (["--source", "molrg", "--max_images", "3"], "--max_images selects images and does not apply to --data molrg"),
    (["--source", "molrg", "--channels", "1"], "--channels selects images"),
    (["--source", "molrg", "--molrg_dim", "30"], "do not fit in D = 3·4² = 48"),
    (["--source", "digits", "--molrg_dim", "3"], "--molrg_dim applies to --data molrg only"),
    (["--source", "{tmp}/m.zip"], "holds float data (data.npy, e.g. MoLRG), not images"),
])
def test_dataset_tool_refusals_are_one_line_and_exit_2(tmp_path, capsys, args, message):
    write_float_dataset_zip(tmp_path / "m.zip", np.zeros((1, 3, 2, 2), np.float32))
    code = tool(*[a.format(tmp=tmp_path) for a in args], "--dest", tmp_path / "out.zip")
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out.zip").exists()


# ------------------------------------------------------------------------------------------ training


NET = ["--num_channels", "8", "--channel_mult", "1", "--num_blocks", "1", "--attn_resolutions", "0",
       "--dropout", "0", "--batch", "8", "--duration", "0.000024", "--snap", "0.008", "--report_to", "none",
       "--no_progress"]


def test_three_training_steps_on_molrg_and_no_xflip(tmp_path):
    data = tmp_path / "molrg.zip"
    assert tool("--source", "molrg", "--molrg_per_class", 20, "--dest", data) == 0
    out = tmp_path / "run"
    res = run_cli("finetune/train_unconditional.py", "--data", data, "--outdir", out, "--precond", "edm", *NET,
                  env=ONE_THREAD)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "trained 3 steps (24 images)" in res.stdout
    from diffmem.common.edm.networks.snapshot import load_network

    net = load_network(out)
    assert net.image_shape == (3, 4, 4) and net.label_dim == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["train_loss"]) for r in log)
    res = run_cli("finetune/train_unconditional.py", "--data", data, "--outdir", tmp_path / "flip", *NET, "--xflip",
                  env=ONE_THREAD)
    assert res.returncode == 2 and "--xflip would leave its distribution" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


# ------------------------------------------------------------------------------- the ideal denoiser


def test_ideal_molrg_denoiser_jacobian_has_rank_d_on_a_subspace_and_2d_at_the_origin():
    from diffmem.common.edm.measure.jacobian import denoiser_jacobian, numerical_rank, singular_values

    den = M.MoLRGDenoiser(RECIPE)
    u = den.bases
    x0 = torch.from_numpy(u[1] @ np.random.default_rng(4).standard_normal(7)).reshape(3, 4, 4)
    # On class 1's subspace at small σ the posterior is one-hot: D(x) = U_1U_1ᵀx/(1 + σ²), J = U_1U_1ᵀ/(1 + σ²).
    jac = denoiser_jacobian(den, x0, 0.01, method="batch")
    assert torch.allclose(jac, torch.from_numpy(u[1] @ u[1].T) / (1 + 1e-4), atol=1e-10)
    assert numerical_rank(singular_values(jac)) == 7  # d of D = 48: rank/dim 0.146
    # At x = 0 both classes are equally likely and ∂π/∂x·U_kU_kᵀx vanishes: J = (P_0 + P_1)/2(1 + σ²), rank 2d.
    jac0 = denoiser_jacobian(den, torch.zeros(3, 4, 4, dtype=torch.float64), 0.5, method="batch")
    proj = torch.from_numpy(u[0] @ u[0].T + u[1] @ u[1].T) / (2 * 1.25)
    assert torch.allclose(jac0, proj, atol=1e-12) and numerical_rank(singular_values(jac0)) == 14

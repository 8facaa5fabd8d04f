"""Gu et al.'s memorization ratio: exact nearest neighbours (common/edm/measure/knn.py), the metric and the per-snapshot
driver (common/edm/measure/mem_ratio.py) and detect/mem_ratio.py (max over snapshots, resume, --images, two
processes)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import accelerate_launch, free_port, run_cli
from PIL import Image

from diffmem.common.edm.measure import mem_ratio as M
from diffmem.common.edm.measure.knn import exact_knn, fp32_error_bound
from diffmem.common.plotting import GRID_GAP

SCRIPT = "detect/mem_ratio.py"
STEPS = 3
SEEDS = "0-7"
SNAPSHOTS = (0, 1500, 3000)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def mem_ratio(*args) -> int:
    from diffmem.detect.mem_ratio import main

    return main([str(a) for a in args])


# ------------------------------------------------------------------------------------------- planted data


def planted(seed=0, dim=3072, n_base=120):
    """(queries, training set), uint8 rows of CIFAR's size: the training set holds near-identical pairs (one grey
    level apart in one pixel) and exact duplicates (ties); the queries are training images moved by one or two grey
    levels in a few pixels, exact copies of duplicated images (0/0) and fresh random images."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n_base, dim)).astype(np.int16)
    twin = base[: n_base // 2].copy()
    rows, pix = np.arange(len(twin)), rng.integers(0, dim, len(twin))
    twin[rows, pix] += np.where(twin[rows, pix] < 255, 1, -1)
    train = np.concatenate([base, twin, base[:10]])  # base[:10] twice: ties
    train = train[rng.permutation(len(train))].astype(np.uint8)
    picks = train[rng.integers(0, len(train), 150)].astype(np.int16)
    near = picks + rng.integers(-2, 3, picks.shape) * (rng.random(picks.shape) < 0.002)
    fresh = rng.integers(0, 256, (20, dim))
    queries = np.concatenate([near.clip(0, 255), base[:5], fresh]).astype(np.uint8)
    return queries, train


def brute_force(queries, train, k=2):
    """float64 squared distances to every training row, the k smallest, ties to the lowest index (stable sort)."""
    r64 = train.reshape(len(train), -1).astype(np.float64)
    s = np.stack([((q.astype(np.float64).ravel() - r64) ** 2).sum(1) for q in queries])
    order = np.argsort(s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), order


@pytest.fixture(scope="module")
def planted_data():
    queries, train = planted()
    return queries, train, *brute_force(queries, train)


# ------------------------------------------------------------------------------------------- exact kNN


def test_exact_knn_equals_float64_brute_force_on_planted_near_duplicates(planted_data):
    queries, train, sq, idx = planted_data
    got = exact_knn(queries, train, k=2)
    assert got.index.dtype == np.int64 and got.sqdist.dtype == np.float64
    assert (got.index != idx).sum() == 0
    assert np.array_equal(got.sqdist, sq)  # bit for bit: integer squared distances are exact in float64
    dim = queries.shape[1]
    assert np.array_equal(M.normalized_l2(got.sqdist, dim), np.sqrt(sq) / math.sqrt(dim))


def test_torch_cdist_picks_wrong_neighbours_on_the_same_data(planted_data):
    queries, train, sq, _ = planted_data
    d = torch.cdist(torch.tensor(queries, dtype=torch.float32), torch.tensor(train, dtype=torch.float32))
    picked = d.topk(2, largest=False).indices.numpy()  # DiffMemorize's mem_ratio.py
    # The exact squared distance of the neighbour cdist picked, against the true nearest distance.
    picked_sq = ((queries.astype(np.float64) - train[picked[:, 0]].astype(np.float64)) ** 2).sum(1)
    wrong = int((picked_sq > sq[:, 0]).sum())
    assert wrong >= 20, f"cdist picked a farther nearest neighbour for only {wrong} of {len(queries)} queries"
    # And its distances themselves are off for near-duplicates (fp32 cancellation).
    close = sq[:, 0] > 0
    err = np.abs(d.topk(1, largest=False).values[:, 0].double().numpy() ** 2 - sq[:, 0])[close]
    assert err.max() > 1


@pytest.mark.parametrize("query_chunk,ref_chunk,shortlist", [(7, 13, 4), (1, 1000, 2), (64, 5, 16), (200, 269, 3)])
def test_chunk_sizes_and_shortlist_give_identical_answers(planted_data, query_chunk, ref_chunk, shortlist):
    queries, train, sq, idx = planted_data
    got = exact_knn(queries, train, k=2, shortlist=shortlist, query_chunk=query_chunk, ref_chunk=ref_chunk)
    assert np.array_equal(got.index, idx) and np.array_equal(got.sqdist, sq)
    if shortlist == 2:
        assert got.fallbacks > 0  # the exact fallback ran, and is exact too


@pytest.mark.parametrize("dim", [64, 300, 768])
def test_other_sizes_and_devices_of_input_are_exact_too(dim):
    queries, train = planted(seed=dim, dim=dim, n_base=60)
    sq, idx = brute_force(queries, train)
    for q, r in ((queries, train), (torch.tensor(queries), torch.tensor(train)),
                 (queries.reshape(len(queries), 1, 1, dim), train.reshape(len(train), 1, dim, 1))):
        got = exact_knn(q, r, k=2, ref_chunk=29)
        assert np.array_equal(got.index, idx) and np.array_equal(got.sqdist, sq)
    k3 = exact_knn(queries, train, k=3)
    assert np.array_equal(k3.index, brute_force(queries, train, k=3)[1])


def test_ties_go_to_the_lowest_index_and_zero_zero_is_counted(planted_data):
    queries, train, sq, idx = planted_data
    got = exact_knn(queries, train, k=2)
    dup = queries[150:155]  # copies of images that the training set holds twice
    for row, image in zip(got.index[150:155], dup):
        same = np.flatnonzero((train == image).all(1))
        assert len(same) == 2 and row.tolist() == sorted(same.tolist())
    d = M.normalized_l2(got.sqdist, queries.shape[1])
    assert M.zero_zero_count(d[:, 0], d[:, 1]) == 5
    assert not M.memorized(d[150:155, 0], d[150:155, 1]).any()


def test_float_inputs_match_float64_brute_force():
    rng = np.random.default_rng(1)
    train = rng.normal(size=(300, 48)) * 1e3
    queries = np.concatenate([train[:30] + rng.normal(size=(30, 48)) * 1e-3, rng.normal(size=(30, 48)) * 1e3])
    sq, idx = brute_force(queries, train)
    for shortlist in (16, 2):  # the second mostly falls back to the exact difference form
        got = exact_knn(queries.astype(np.float32), train.astype(np.float32), k=2, shortlist=shortlist,
                        ref_chunk=37)
        assert np.array_equal(got.index, brute_force(queries.astype(np.float32), train.astype(np.float32))[1])
    got = exact_knn(queries, train, k=2, ref_chunk=50)
    assert np.array_equal(got.index, idx)
    np.testing.assert_allclose(got.sqdist, sq, rtol=1e-12)


def test_fp32_error_bound_holds_where_fp32_is_far_off():
    # Uncentred uint8 rows: large norms, the worst case for the matmul form.
    rng = np.random.default_rng(2)
    a = torch.tensor(rng.integers(0, 256, (64, 3072)), dtype=torch.float32)
    b = torch.tensor(rng.integers(0, 256, (96, 3072)), dtype=torch.float32)
    b[:32] = a[:32] + torch.tensor(rng.integers(-1, 2, (32, 3072)), dtype=torch.float32)
    a2, b2 = (a.double() ** 2).sum(1), (b.double() ** 2).sum(1)
    approx = torch.addmm(a2.float()[:, None] + b2.float()[None, :], a, b.T, alpha=-2).double()
    exact = ((a.double()[:, None, :] - b.double()[None]) ** 2).sum(-1)
    err = (approx - exact).abs()
    bound = fp32_error_bound(a2.sqrt()[:, None], b2.sqrt()[None, :], 3072)
    assert err.max() > 10  # fp32 really is off by more than the near-duplicates' distances
    assert (err <= bound).all()


# ------------------------------------------------------------------------------------------------ metric


def test_metric_pure_functions():
    assert M.normalized_l2(np.array([0.0, 12.0]), 3).tolist() == [0.0, 2.0]
    d1, d2 = np.array([0.0, 0.0, 1.0, 0.99, 1.0, 2.0]), np.array([0.0, 1.0, 3.0, 3.0, 2.0, 2.0])
    # 0/0 no; 0/1 yes; exactly 1/3 no (strict); just below yes; 1/2 and 1 no.
    assert M.memorized(d1, d2).tolist() == [False, True, False, True, False, False]
    assert M.memorization_ratio(d1, d2) == pytest.approx(2 / 6)
    assert M.zero_zero_count(d1, d2) == 1
    assert math.isnan(M.memorization_ratio(np.zeros(0), np.zeros(0)))
    ratio = M.d1_d2(d1, d2)
    assert math.isnan(ratio[0]) and ratio[1:].tolist() == [0.0, 1 / 3, 0.33, 0.5, 1.0]
    # the most memorized first, ties to the earlier position, 0/0 last
    assert M.most_memorized(d1, d2, 3).tolist() == [1, 3, 2]
    assert M.most_memorized(d1, d2).tolist() == [1, 3, 2, 4, 5, 0]
    assert M.most_memorized(np.array([0.0, 1.0, 0.0]), np.array([1.0, 2.0, 1.0]), 2).tolist() == [0, 2]


def test_ratio_histogram_marks_the_threshold(tmp_path):
    d1, d2 = np.array([0.0, 0.1, 0.5, 0.0]), np.array([1.0, 1.0, 1.0, 0.0])
    fig = M.plot_ratio_histogram(d1, d2, tmp_path / "h.png", "t")
    (ax,) = fig.axes
    assert [line.get_xdata()[0] for line in ax.get_lines()] == [M.MEM_RATIO_THRESHOLD]
    assert ax.get_legend().get_texts()[0].get_text() == "d1/d2 = 1/3: memorized below (2 of 4); 1 at 0/0"
    assert sum(bar.get_height() for bar in ax.containers[0]) == 3  # 0/0 has no ratio to draw
    assert Image.open(tmp_path / "h.png").size == (720, 480)


def test_summary_takes_the_maximum_earliest_on_ties():
    def row(name, seen, ratio):
        return {"snapshot": name, "images_seen": seen, "kimg": seen / 1000, "ratio": ratio, "n": 4,
                "memorized": int(4 * ratio), "zero_zero": 0, "mean_d1": 1.0, "knn_fallbacks": 0}

    rows = [row("c", 3000, 0.5), row("a", 1000, 0.75), row("b", 2000, 0.75), row("z", 0, 0.0)]
    s = M.summarize(rows)
    assert (s["max_ratio"], s["max_snapshot"], s["max_images_seen"], s["snapshots"], s["n"]) == (0.75, "a", 1000,
                                                                                                 4, 4)
    assert [r["snapshot"] for r in s["per_snapshot"]] == ["z", "a", "b", "c"]
    assert s["latest_snapshot"] == "c"


def test_every_seed_in_exactly_one_shard_and_the_merge_restores_the_order():
    seeds = [9, 3, 5, 7, 1, 0, 2]
    for world in (1, 2, 3, 8):
        shards = [M.shard_positions(len(seeds), r, world) for r in range(world)]
        assert sorted(p for s in shards for p in s) == list(range(len(seeds)))
    parts = []
    for r in (2, 0, 1):  # any order of parts
        pos = M.shard_positions(len(seeds), r, 3)
        s = np.asarray([seeds[p] for p in pos])
        parts.append({"seeds": s, "knn_distance": np.stack([s, s + 0.5], 1).astype(float),
                      "knn_index": np.stack([s, s + 1], 1), "knn_fallbacks": np.int64(r)})
    merged, order = M.merge_shards(parts, seeds)
    assert order == seeds and merged.index[:, 0].tolist() == seeds and merged.fallbacks == 3
    assert merged.distance[:, 1].tolist() == [s + 0.5 for s in seeds]
    with pytest.raises(M.MemRatioError, match="requested seeds"):
        M.merge_shards(parts[:2], seeds)
    with pytest.raises(M.MemRatioError, match="requested seeds"):
        M.merge_shards(parts + parts[:1], seeds)


# ------------------------------------------------------------------------------------------- a tiny run


def tiny_net(seed: int):
    from diffmem.common.edm.networks.build import ArchConfig, build_network
    from diffmem.common.edm.precond import Preconditioning

    torch.manual_seed(seed)
    return build_network(ArchConfig(resolution=8, channels=1, num_channels=8, channel_mult=(1, 2), num_blocks=1,
                                    attn_resolutions=(), dropout=0.0), Preconditioning())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder with 3 tiny snapshots and a training zip holding every sample of snapshot 1500 and half of
    snapshot 3000's (seeds 0-3), plus 6 random images: ratios 1 and 1/2 there."""
    from diffmem.common.edm.dataset.edm_zip import write_dataset_zip
    from diffmem.common.edm.networks.snapshot import save_snapshot
    from diffmem.common.edm.sampler import SamplerSettings, generate_images

    root = tmp_path_factory.mktemp("memratio")
    samples = {}
    for i, seen in enumerate(SNAPSHOTS):
        net = tiny_net(i)
        save_snapshot(net, root / "run", seen, {})
        samples[seen] = next(generate_images(net.eval(), range(8), 8, SamplerSettings(num_steps=STEPS))).images
    rng = np.random.default_rng(0)
    train = np.concatenate([rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8), samples[1500], samples[3000][:4]])
    write_dataset_zip(root / "train.zip", train.transpose(0, 3, 1, 2), progress=False)
    return {"root": root, "dir": root / "run", "zip": root / "train.zip", "samples": samples,
            "train": train.transpose(0, 3, 1, 2)}


def base_args(run, outdir, *extra, seeds=SEEDS):
    # seeds is a parameter: a second --seeds would add to the list (docs/vocabulary.md), not replace it.
    return ["--expdir", run["dir"], "--knn_ref", run["zip"], "--seeds", seeds, "--steps", STEPS, "--batch", 8,
            "--device", "cpu", "--outdir", outdir, *extra]


def rows_of(folder):
    return [json.loads(line) for line in (folder / M.ROWS_FILE).read_text().splitlines()]


def grid_tiles(path, n_rows: int, n_cols: int, tile: int = 256):
    """A labelled grid's tiles (rows × columns of uint8 RGB arrays), found from its bottom-right corner: labels only
    widen the picture on the left and the top."""
    pixels = np.asarray(Image.open(path).convert("RGB"))
    height, width = pixels.shape[:2]
    step = tile + GRID_GAP  # each tile is followed by a gap
    return [[pixels[height - (n_rows - r) * step:][:tile, width - (n_cols - c) * step:][:, :tile]
             for c in range(n_cols)] for r in range(n_rows)]


def enlarged(image_hwc, k: int):
    """A uint8 H×W×C image as its RGB grid tile: every pixel a k×k block (nearest neighbour)."""
    rgb = np.repeat(image_hwc, 3, axis=2) if image_hwc.shape[2] == 1 else image_hwc
    return np.repeat(np.repeat(rgb, k, axis=0), k, axis=1)


def test_max_over_snapshots_with_exact_neighbours(run, tmp_path):
    out = tmp_path / "out"
    assert mem_ratio(*base_args(run, out, "--log", tmp_path / "traj.log")) == 0
    rows = {r["snapshot"]: r for r in rows_of(out)}
    assert list(rows) == ["snapshot-000003000", "snapshot-000001500", "snapshot-000000000"]  # newest first
    for seen, samples in run["samples"].items():
        name = f"snapshot-{seen:09d}"
        sq, idx = brute_force(samples.transpose(0, 3, 1, 2), run["train"])
        d = np.sqrt(sq) / math.sqrt(64)
        with np.load(out / "knn-dist" / f"{name}.npz") as z:
            assert np.array_equal(z["knn_index"], idx) and np.array_equal(z["knn_distance"], d)
            assert z["seeds"].tolist() == list(range(8))
        r = rows[name]
        assert r["ratio"] == M.memorization_ratio(d[:, 0], d[:, 1]) and r["n"] == 8 and r["images_seen"] == seen
        assert r["kimg"] == seen / 1000 and r["mean_d1"] == pytest.approx(d[:, 0].mean())
    assert rows["snapshot-000001500"]["ratio"] == 1.0 and rows["snapshot-000003000"]["ratio"] == 0.5
    assert rows["snapshot-000000000"]["ratio"] < 0.5
    summary = json.loads((out / M.SUMMARY_FILE).read_text())
    assert (summary["max_ratio"], summary["max_snapshot"], summary["max_images_seen"], summary["snapshots"],
            summary["n"]) == (1.0, "snapshot-000001500", 1500, 3, 8)
    log = (tmp_path / "traj.log").read_text().splitlines()
    assert len(log) == 3 and "mem_ratio 1.0000 (8/8)" in log[1]
    assert (out / M.PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((out / "knn-dist").glob(".*"))  # no shard or temporary files left
    # mem_ratio.png: the ratio against images seen beside the histogram of the maximum's snapshot
    assert Image.open(out / M.PLOT_FILE).size == (1440, 480)
    for seen, samples in run["samples"].items():
        name = f"snapshot-{seen:09d}"
        assert Image.open(out / "mem-plots" / f"{name}-d1d2.png").size == (720, 480)
        # the 8 samples, the most memorized (smallest d1/d2) first, each beside its nearest training image; the 8-px
        # images are 256-px tiles of 32×32 blocks
        sq, idx = brute_force(samples.transpose(0, 3, 1, 2), run["train"])
        order = np.argsort(np.sqrt(sq[:, 0]) / np.sqrt(sq[:, 1]), kind="stable")
        tiles = grid_tiles(out / "mem-plots" / f"{name}-nearest.png", 8, 2)
        for (generated, nearest), i in zip(tiles, order):
            assert np.array_equal(generated, enlarged(samples[i], 32))
            assert np.array_equal(nearest, enlarged(run["train"][idx[i, 0]].transpose(1, 2, 0), 32))
    assert not list((out / "mem-plots").glob(".*"))


def test_save_images_are_generate_pys_images(run, tmp_path):
    from diffmem.detect.generate import main as generate

    out = tmp_path / "out"
    assert mem_ratio(*base_args(run, out, "--snapshots", "1500", "--save_images")) == 0
    assert [r["snapshot"] for r in rows_of(out)] == ["snapshot-000001500"]
    ref = tmp_path / "generated"
    assert generate([str(a) for a in ["--network", run["dir"] / "snapshot-000001500", "--seeds", SEEDS, "--steps",
                                      STEPS, "--batch", 8, "--device", "cpu", "--outdir", ref]]) == 0
    saved = sorted((out / "mem-images" / "snapshot-000001500").glob("*.png"))
    assert [p.name for p in saved] == [f"{s:06d}.png" for s in range(8)]
    for p in saved:
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(ref / p.name)))


def test_resume_skips_finished_snapshots_and_redoes_a_partial_one(run, tmp_path):
    out = tmp_path / "out"
    assert mem_ratio(*base_args(run, out)) == 0
    first = {r["snapshot"]: r for r in rows_of(out)}
    with np.load(out / "knn-dist" / "snapshot-000000000.npz") as z:
        npz0 = {k: z[k] for k in z.files}
    # snapshot 3000 finished (its row marked, to see it untouched); 1500 killed after its npz, before its row;
    # 0 killed while sampling (no row, no npz, a shard file and a temporary left behind); a torn last line.
    keep = {**first["snapshot-000003000"], "seconds": -1.0}
    (out / M.ROWS_FILE).write_text(json.dumps(keep) + "\n" + '{"snapshot": "torn')
    (out / "knn-dist" / "snapshot-000000000.npz").unlink()
    (out / "knn-dist" / ".snapshot-000000000.part-0-of-1.npz").write_bytes(b"garbage")
    (out / "mem-plots" / "snapshot-000003000-d1d2.png").unlink()  # a run from before the histograms
    assert mem_ratio(*base_args(run, out)) == 0
    rows = rows_of(out)
    assert sorted(r["snapshot"] for r in rows) == sorted(first)  # nothing duplicated
    by_name = {r["snapshot"]: r for r in rows}
    assert by_name["snapshot-000003000"] == keep  # skipped: its row untouched
    for name in ("snapshot-000001500", "snapshot-000000000"):
        assert by_name[name]["seconds"] >= 0 and by_name[name]["ratio"] == first[name]["ratio"]
    with np.load(out / "knn-dist" / "snapshot-000000000.npz") as z:
        assert all(np.array_equal(z[k], npz0[k]) for k in npz0)
    assert not list((out / "knn-dist").glob(".*"))
    assert json.loads((out / M.SUMMARY_FILE).read_text())["snapshots"] == 3
    assert len((out / M.LOG_FILE).read_text().splitlines()) == 3
    assert (out / "mem-plots" / "snapshot-000003000-d1d2.png").is_file()  # redrawn from its npz
    # A resumed run with other seeds would mix samples: refused, unless --overwrite.
    assert mem_ratio(*base_args(run, out, seeds="0-3")) == 2
    assert mem_ratio(*base_args(run, out, "--snapshots", "latest", "--overwrite", seeds="0-3")) == 0
    assert [(r["snapshot"], r["n"]) for r in rows_of(out)] == [("snapshot-000003000", 4)]


def test_images_mode_on_a_png_folder_and_an_npz(run, tmp_path):
    train = run["train"]  # 18 distinct training images
    n = len(train)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(train):
        Image.fromarray(image[0]).save(folder / f"{100 + i:06d}.png")
    out = tmp_path / "out"
    assert mem_ratio("--images", folder, "--knn_ref", run["zip"], "--outdir", out, "--device", "cpu") == 0
    (row,) = rows_of(out)
    assert (row["snapshot"], row["ratio"], row["n"], row["images_seen"]) == ("pngs", 1.0, n, None)
    # one image set: mem_ratio.png is its d1/d2 histogram (no one-point trajectory); the 8 most memorized (all are
    # copies, d1/d2 = 0: the first 8 in order) beside their nearest training images, themselves
    assert Image.open(out / M.PLOT_FILE).size == Image.open(out / "mem-plots" / "pngs-d1d2.png").size == (720, 480)
    for i, (generated, nearest) in enumerate(grid_tiles(out / "mem-plots" / "pngs-nearest.png", 8, 2)):
        assert np.array_equal(generated, enlarged(train[i].transpose(1, 2, 0), 32))
        assert np.array_equal(nearest, generated)
    with np.load(out / "knn-dist" / "pngs.npz") as z:
        assert z["seeds"].tolist() == list(range(100, 100 + n))
        assert z["knn_index"][:, 0].tolist() == list(range(n)) and (z["knn_distance"][:, 0] == 0).all()
    npz = tmp_path / "samples.npz"
    np.savez(npz, images=train.transpose(0, 2, 3, 1)[::-1], seeds=np.arange(n) * 10)
    assert mem_ratio("--images", npz, "--knn_ref", run["zip"], "--outdir", out, "--device", "cpu") == 0
    rows = rows_of(out)
    assert [(r["snapshot"], r["ratio"]) for r in rows] == [("pngs", 1.0), ("samples", 1.0)]
    with np.load(out / "knn-dist" / "samples.npz") as z:
        assert z["knn_index"][:, 0].tolist() == list(range(n - 1, -1, -1))
    summary = json.loads((out / M.SUMMARY_FILE).read_text())
    assert summary["snapshots"] == 2 and summary["max_ratio"] == 1.0 and summary["max_images_seen"] is None
    assert Image.open(out / M.PLOT_FILE).size == (1440, 480)  # two image sets: their ratios beside a histogram
    assert (out / "mem-plots" / "samples-nearest.png").is_file()


def test_two_processes_give_the_same_results_as_one(run, tmp_path):
    # --batch 1: each seed is sampled alone in both runs, so not even fp32 batch rounding can differ.
    args = ["--expdir", run["dir"], "--knn_ref", run["zip"], "--seeds", "0-6", "--steps", STEPS, "--batch", 1,
            "--device", "cpu", "--snapshots", "3000,snapshot-000000000"]
    assert mem_ratio(*args, "--outdir", tmp_path / "one") == 0
    res = accelerate_launch("--config_file", "accelerate_configs/cpu.yaml", "--multi_gpu", "--num_processes", 2,
                            "--main_process_port", free_port(), SCRIPT, *args, "--outdir", tmp_path / "two",
                            timeout=300, env={"ACCELERATE_USE_CPU": "true"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "on 2 processes" in res.stdout
    for name in ("snapshot-000003000", "snapshot-000000000"):
        with np.load(tmp_path / "one" / "knn-dist" / f"{name}.npz") as a, \
                np.load(tmp_path / "two" / "knn-dist" / f"{name}.npz") as b:
            assert a["seeds"].tolist() == list(range(7))  # 7 seeds over 2 processes: 4 + 3, each once
            assert all(np.array_equal(a[k], b[k]) for k in ("knn_distance", "knn_index", "seeds"))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(rows_of(tmp_path / "one")) == strip(rows_of(tmp_path / "two"))


# ----------------------------------------------------------------------------------------------- bad input


def test_a_broken_new_snapshot_is_refused_before_anything_is_written(run, tmp_path, capsys):
    runs = tmp_path / "run"
    shutil.copytree(run["dir"], runs)
    args = ["--expdir", runs, *base_args(run, tmp_path / "out")[2:]]
    assert mem_ratio(*args, "--snapshots", "latest") == 0
    capsys.readouterr()  # its progress bars
    before = {p: p.read_bytes() for p in sorted((tmp_path / "out").rglob("*")) if p.is_file()}
    # The oldest snapshot copied in half (its weights file cut short): measured last, newest first.
    for weights in (runs / "snapshot-000000000").glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:100])
    assert mem_ratio(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "snapshot-000000000" in err[0], err
    after = {p: p.read_bytes() for p in sorted((tmp_path / "out").rglob("*")) if p.is_file()}
    assert after == before  # snapshot 1500 not measured before the refusal


def test_bad_inputs_exit_2_with_one_line(run, tmp_path, capsys):
    from diffmem.common.edm.dataset.edm_zip import write_dataset_zip

    empty = tmp_path / "empty-run"
    empty.mkdir()
    rgb = tmp_path / "rgb.zip"
    write_dataset_zip(rgb, np.zeros((3, 3, 8, 8), dtype=np.uint8), progress=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(broken / "000000.png")
    (broken / "000001.png").write_bytes(b"not a png")
    no_images = tmp_path / "no-images.npz"
    np.savez(no_images, pictures=np.zeros((2, 8, 8, 1), np.uint8))
    text = tmp_path / "text.npz"
    text.write_text("seed,image\n0,a.png\n")
    one = tmp_path / "one.zip"
    write_dataset_zip(one, np.zeros((1, 1, 8, 8), dtype=np.uint8), progress=False)
    out = tmp_path / "out"
    cases = {
        "no snapshot-* folder": ["--expdir", empty, "--knn_ref", run["zip"]],
        "(C×H×W) but the --data images": [*base_args(run, out)[:-2], "--knn_ref", rgb, "--outdir", out],
        "is not a snapshot of": base_args(run, out, "--snapshots", "1500,777"),
        "listed more than once": base_args(run, out, "--snapshots", "1500,snapshot-000001500"),
        "cannot read image": ["--images", broken, "--knn_ref", run["zip"], "--outdir", out],
        "no 'images' array": ["--images", no_images, "--knn_ref", run["zip"], "--outdir", out],
        "text.npz: not an npz file": ["--images", text, "--knn_ref", run["zip"], "--outdir", out],
        "needs --out ": ["--images", broken, "--knn_ref", run["zip"]],
        "only apply to --model": ["--images", broken, "--knn_ref", run["zip"], "--outdir", out, "--seeds", "0-3"],
        "no such file": ["--expdir", run["dir"], "--knn_ref", tmp_path / "missing.zip"],
        "needs at least 2": base_args(run, out)[:2] + ["--knn_ref", one] + base_args(run, out)[4:],
        "bad --seeds": base_args(run, out, seeds="5-1"),
    }
    for needle, args in cases.items():
        assert mem_ratio(*args) == 2, needle
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mem_ratio: error:") and needle in err[0], (needle, err)
    # Through the real entry point too (argparse's errors are one line as well).
    res = run_cli(SCRIPT, "--expdir", empty, "--knn_ref", run["zip"])
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    res = run_cli(SCRIPT, "--expdir", empty)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_read_summary_is_the_typed_view_of_the_summary_file(tmp_path):
    rows = [{"snapshot": "snapshot-000000040", "images_seen": 40, "kimg": 0.04, "ratio": 0.25, "memorized": 2,
             "n": 8, "zero_zero": 0},
            {"snapshot": "snapshot-000000080", "images_seen": 80, "kimg": 0.08, "ratio": 0.5, "memorized": 4,
             "n": 8, "zero_zero": 0}]
    path = tmp_path / M.SUMMARY_FILE
    path.write_text(json.dumps(M.summarize(rows)))
    assert M.read_summary(path) == M.RatioSummary(0.5, "snapshot-000000080", 80, 8)
    for bad in ("{", "[1]", json.dumps({"max_ratio": None}), json.dumps({"n": 8})):
        path.write_text(bad)
        with pytest.raises(M.MemRatioError, match="unreadable or has no max_ratio"):
            M.read_summary(path)
    with pytest.raises(M.MemRatioError, match="unreadable"):
        M.read_summary(tmp_path / "absent.json")

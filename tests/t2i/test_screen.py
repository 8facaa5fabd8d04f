"""The screening room's pieces on their own: reading, normalising, seeds, dedup, the threshold, the cliques."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from diffmem.common.t2i.screen.captions import (
    CaptionFileError,
    CaptionSource,
    caption_seed,
    deduplicate,
    normalize_caption,
)
from diffmem.common.t2i.screen.cliques import (
    largest_clique,
    near_duplicate_threshold,
    pairwise_upper,
    square_from_upper,
)
from diffmem.common.t2i.screen.threshold import empirical_fpr, threshold_at_fpr


def test_normalisation_is_nfkc_casefold_and_collapsed_whitespace():
    assert normalize_caption("  A\u00a0Cat\t\tON  the\nMat ") == "a cat on the mat"
    assert normalize_caption("ﬁne Straße") == "fine strasse"  # NFKC ligature, casefold ß
    assert normalize_caption("Ａ") == "a"  # full-width


def test_caption_seed_is_a_62_bit_hash_of_the_normalised_text():
    import hashlib

    text = "a cat on the mat"
    want = int(hashlib.sha256(text.encode()).hexdigest()[:16], 16) // 4
    assert caption_seed(text) == want and 0 <= want < 2 ** 62


def write_parquet(path, captions, urls=None, row_group_size=3):
    cols = {"caption": captions}
    if urls is not None:
        cols["url"] = urls
    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)
    return path


def test_every_format_streams_the_same_rows(tmp_path):
    caps = ["a cat", "A  CAT", "a dog", "x;y"]
    pqf = write_parquet(tmp_path / "c.parquet", caps, ["u0", None, "u2", "u3"])
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"caption": c, "url": f"u{i}"}) + "\n"
                                              for i, c in enumerate(caps)))
    (tmp_path / "c.txt").write_text("\n".join(caps) + "\n")
    (tmp_path / "c.csv").write_text("caption,url\n" + "".join(f'"{c}",u{i}\n' for i, c in enumerate(caps)))
    for f in (pqf, tmp_path / "c.jsonl", tmp_path / "c.txt", tmp_path / "c.csv"):
        rows = list(CaptionSource(f, batch_rows=2).rows())
        assert [r.caption for r in rows] == caps and [r.row for r in rows] == [0, 1, 2, 3], f
    assert [r.url for r in CaptionSource(pqf).rows()] == ["u0", None, "u2", "u3"]


def test_deduplicate_counts_and_keeps_first_rows(tmp_path):
    rows = CaptionSource(write_parquet(tmp_path / "c.parquet", ["a cat", "b", "A  Cat ", "a cat", "b"])).rows()
    unique, n = deduplicate(rows, keep_rows=2)
    assert n == 5 and [(u.id, u.caption, u.count, u.rows) for u in unique] == [(0, "a cat", 3, [0, 2]),
                                                                               (1, "b", 2, [1, 4])]
    assert unique[0].record()["rows_complete"] is False and unique[1].record()["rows_complete"] is True


@pytest.mark.parametrize("content, where", [
    ({"caption": ["ok", None, "fine"]}, "c.parquet:row 1: expected the caption to be a string, got null"),
    ({"caption": ["ok", "   "]}, "c.parquet:row 1: empty caption"),
    ({"text2": ["ok"]}, "c.parquet: no caption column"),
])
def test_a_bad_parquet_row_is_one_line(tmp_path, content, where):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table(content), path)
    with pytest.raises(CaptionFileError) as exc:
        list(CaptionSource(path).rows())
    assert str(exc.value).startswith(str(tmp_path / where)) and "\n" not in str(exc.value)


def test_bad_rows_are_skipped_when_asked_and_a_broken_file_is_one_line(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"caption": "a"}\nnot json\n{"caption": 3}\n{"caption": "b"}\n')
    skipped = []
    rows = list(CaptionSource(tmp_path / "c.jsonl").rows(True, lambda w, why: skipped.append(w)))
    assert [r.caption for r in rows] == ["a", "b"] and [r.row for r in rows] == [0, 3]
    assert skipped == [f"{tmp_path / 'c.jsonl'}:2", f"{tmp_path / 'c.jsonl'}:3"]
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(CaptionFileError, match="not a readable parquet file"):
        list(CaptionSource(tmp_path / "bad.parquet").rows())
    (tmp_path / "c.tsv").write_text("x")
    with pytest.raises(CaptionFileError, match="expected a .parquet"):
        CaptionSource(tmp_path / "c.tsv")


def test_threshold_at_fpr_by_hand():
    scores = [0.1 * i for i in range(1, 11)]  # 0.1 .. 1.0
    assert threshold_at_fpr(scores, 0.1) == pytest.approx(0.9)  # one of ten above: FPR 0.1
    assert empirical_fpr(scores, 0.9) == pytest.approx(0.1)
    assert threshold_at_fpr(scores, 0.25) == pytest.approx(0.8)  # ⌊2.5⌋ = 2 above
    assert threshold_at_fpr(scores, 0.05) == pytest.approx(1.0)  # unresolved: none above
    with pytest.raises(ValueError):
        threshold_at_fpr([], 0.1)


def brute_force_clique(sim, thr):
    n = sim.shape[0]
    for k in range(n, 0, -1):
        for c in itertools.combinations(range(n), k):
            if all(sim[i, j] > thr for i, j in itertools.combinations(c, 2)):
                return k
    return 0


def test_largest_clique_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(2, 8))
        a = rng.uniform(-1, 1, (n, n))
        sim = (a + a.T) / 2
        np.fill_diagonal(sim, 1)
        assert len(largest_clique(sim, 0.2)) == brute_force_clique(sim, 0.2)


def test_pairs_round_trip_and_the_near_duplicate_quantile():
    sim = torch.tensor([[1.0, 0.2, 0.3], [0.2, 1.0, 0.4], [0.3, 0.4, 1.0]])
    upper = pairwise_upper(sim)
    assert upper == pytest.approx([0.2, 0.3, 0.4])
    assert np.allclose(square_from_upper(upper, 3), sim.double().numpy())
    assert near_duplicate_threshold([0.0, 1.0, 2.0, 3.0, 4.0], 0.5) == 2.0
    assert near_duplicate_threshold([0.0, 1.0], 0.99) == pytest.approx(0.99)


def test_a_hugging_face_dataset_folder_streams(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    write_parquet(folder / "train.parquet", ["a cat", "a dog"], ["u0", "u1"])
    src = CaptionSource(folder)
    assert src.kind == "dataset" and src.identity()["dataset"] == str(folder)
    assert [(r.row, r.caption, r.url) for r in src.rows()] == [(0, "a cat", "u0"), (1, "a dog", "u1")]
    with pytest.raises(CaptionFileError, match="no caption column 'title'"):
        list(CaptionSource(folder, column="title").rows())

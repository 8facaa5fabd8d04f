"""The merge stage: every worker's scores joined to the unique captions, ranked, and the calibrated threshold."""

from __future__ import annotations

import json

import numpy as np

from diffmem.common.errors import DiffmemError
from diffmem.common.results import write_json_atomic
from diffmem.common.t2i.screen.files import ScreenFiles
from diffmem.common.t2i.screen.threshold import empirical_fpr, resolved_fpr, threshold_at_fpr

PARQUET_BATCH = 65536


class IncompleteScreenError(DiffmemError):
    """Captions without a score after every worker ended (a shard failed); str() is the one-line message."""


def set_scores(files: ScreenFiles, caption_set: str, n_unique: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores [n], truncated [n]) of a set by caption id; IncompleteScreenError when any is missing."""
    scores = np.full(n_unique, np.nan)
    truncated = np.zeros(n_unique, dtype=bool)
    for r in files.score_rows(caption_set):
        if np.isnan(scores[r["id"]]):
            scores[r["id"]], truncated[r["id"]] = r["score"], r["truncated"]
    missing = int(np.isnan(scores).sum())
    if missing:
        raise IncompleteScreenError(f"{files.parts_dir}: {missing} of {n_unique} {caption_set} captions have no "
                                    f"score (a shard failed or was stopped); the same command resumes them")
    return scores, truncated


def write_threshold(files: ScreenFiles, calibration_scores: np.ndarray, fpr: float) -> dict:
    """threshold.json: the threshold at the FPR, the FPR measured with it, and the smallest FPR n captions resolve."""
    t = threshold_at_fpr(calibration_scores, fpr)
    doc = {"threshold": t, "fpr": fpr, "calibration_captions": int(calibration_scores.size),
           "empirical_fpr": empirical_fpr(calibration_scores, t),
           "resolved_fpr": resolved_fpr(int(calibration_scores.size))}
    write_json_atomic(files.threshold, doc)
    return doc


def ranking(scores: np.ndarray) -> np.ndarray:
    """Caption ids by score, descending; ties by id."""
    ids = np.arange(scores.size)
    return np.lexsort((ids, -scores))


def write_ranked(files: ScreenFiles, scores: np.ndarray, truncated: np.ndarray, threshold: float | None) -> None:
    """screen.jsonl (one row per unique caption, ranked) and screen.parquet, each written then renamed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(files.captions("screen"), encoding="utf-8") as f:
        lines = f.readlines()  # one string per caption, parsed one at a time below
    order = ranking(scores)
    tmp = files.ranked.with_name(files.ranked.name + ".tmp")
    ptmp = files.ranked_parquet.with_name(files.ranked_parquet.name + ".tmp")
    schema = pa.schema([("rank", pa.int64()), ("id", pa.int64()), ("caption", pa.string()), ("score", pa.float64()),
                        ("count", pa.int64()), ("rows", pa.list_(pa.int64())), ("rows_complete", pa.bool_()),
                        ("url", pa.string()), ("above_threshold", pa.bool_()), ("truncated", pa.bool_())])
    with open(tmp, "w", encoding="utf-8") as out, pq.ParquetWriter(ptmp, schema) as writer:
        batch: list[dict] = []
        for rank, i in enumerate(order.tolist()):
            c = json.loads(lines[i])
            row = {"rank": rank, "id": i, "caption": c["caption"], "score": float(scores[i]), "count": c["count"],
                   "rows": c["rows"], "rows_complete": c["rows_complete"], "url": c.get("url"),
                   "above_threshold": None if threshold is None else bool(scores[i] > threshold),
                   "truncated": bool(truncated[i])}
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            batch.append(row)
            if len(batch) == PARQUET_BATCH:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                batch = []
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
    files.ranked.parent.mkdir(parents=True, exist_ok=True)
    tmp.replace(files.ranked)
    ptmp.replace(files.ranked_parquet)


def read_ranked(files: ScreenFiles, limit: int | None = None, above_only: bool = False) -> list[dict]:
    """The first rows of screen.jsonl (all with limit None); only those above the threshold with above_only."""
    rows = []
    with open(files.ranked, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if above_only and not row["above_threshold"]:
                break  # ranked: none below follows
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    return rows

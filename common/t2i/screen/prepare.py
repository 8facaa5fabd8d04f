"""The prepare stage of a screen: bind the settings, read and deduplicate each caption set once, before any model.

Runs on the main process only (and before the Slurm array is submitted). Each set's unique captions go to
DIR/captions/SET.jsonl, written under a temporary name and renamed into place, then DIR/captions/SET.json records
the counts and the source's identity; a rerun finds the marker and reads nothing again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from diffmem.common.results import bind_run_settings, check_run_settings, write_json_atomic
from diffmem.common.t2i.screen.captions import CaptionFileError, CaptionSource, deduplicate
from diffmem.common.t2i.screen.config import CONFIRM_KEYS, SCORE_KEYS, ScreenConfig
from diffmem.common.t2i.screen.files import ScreenFiles


def caption_sources(cfg: ScreenConfig) -> dict[str, CaptionSource]:
    """The caption sets of a run: 'screen' always, 'calibration' when given (CaptionFileError for a bad source)."""
    sources = {"screen": CaptionSource(cfg.captions, column=cfg.column, url_column=cfg.url_column, split=cfg.split)}
    if cfg.calibration is not None:
        sources["calibration"] = CaptionSource(cfg.calibration, column=cfg.column, url_column=cfg.url_column,
                                               split=cfg.split)
    return sources


def score_binding(cfg: ScreenConfig, identities: dict[str, dict]) -> dict:
    return {**cfg.bound(SCORE_KEYS), "sources": identities}


def check_settings(cfg: ScreenConfig, files: ScreenFiles, identities: dict[str, dict], scored: bool,
                   confirmed: bool) -> None:
    """Refuse other score settings (or another caption set) than the scores on disk were made with; likewise the
    confirmation's settings against its stored generations. Writes nothing."""
    check_run_settings(files.settings, score_binding(cfg, identities), scored, "another --out")
    check_run_settings(files.confirm_settings, cfg.bound(CONFIRM_KEYS), confirmed, "another --out")


def read_unique_captions(source: CaptionSource, caption_set: str, skip_bad: bool) -> tuple[list, list[dict], int]:
    """(unique captions, rows left out, rows used) of one set; CaptionFileError for a bad row unless skip_bad."""
    bad: list[dict] = []
    unique, rows_read = deduplicate(source.rows(skip_bad, lambda where, why: bad.append({"set": caption_set,
                                                                                          "where": where,
                                                                                          "reason": why})))
    if not unique:
        raise CaptionFileError(f"{source.source}: no caption found")
    return unique, bad, rows_read


def write_unique_captions(unique: list, bad: list[dict], rows_read: int, path: Path, skipped: Path) -> dict:
    """Write one set's unique captions (then renamed into place) and its left-out rows; returns the counts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for u in unique:
            f.write(json.dumps(u.record(), ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if bad:
        write_json_atomic(skipped, bad, jsonl=True)
    return {"rows_read": rows_read + len(bad), "rows_used": rows_read, "skipped": len(bad), "unique": len(unique),
            "duplicates": rows_read - len(unique)}


def prepare(cfg: ScreenConfig, files: ScreenFiles) -> dict[str, dict]:
    """Check the settings, read each set that is not on disk yet (every row checked before anything is written),
    then bind the settings and write the sets; returns each set's counts."""
    if cfg.overwrite:
        files.clear()
    sources = caption_sources(cfg)
    identities = {name: src.identity() for name, src in sources.items()}
    # Whether results exist is read once: each reading goes through every part file.
    scored, confirmed = files.has_scores(), any(files.confirm_rows(s) for s in identities)
    check_settings(cfg, files, identities, scored, confirmed)
    counts, pending = {}, {}
    for name, src in sources.items():
        marker = files.captions_marker(name)
        if marker.exists() and files.captions(name).exists():
            done = json.loads(marker.read_text())
            if done.get("identity") == identities[name]:
                counts[name] = done["counts"]
                continue
        pending[name] = read_unique_captions(src, name, cfg.skip_bad_rows)
    files.out.mkdir(parents=True, exist_ok=True)
    bind_run_settings(files.settings, score_binding(cfg, identities), scored, "another --out")
    files.confirm_dir.mkdir(parents=True, exist_ok=True)
    bind_run_settings(files.confirm_settings, cfg.bound(CONFIRM_KEYS), confirmed, "another --out")
    for name, (unique, bad, rows_read) in pending.items():
        counts[name] = write_unique_captions(unique, bad, rows_read, files.captions(name), files.skipped(name))
        write_json_atomic(files.captions_marker(name), {"identity": identities[name], "counts": counts[name]})
    return counts

"""A whole screen, stage by stage: prepare (main process) → screen (every worker) → merge → confirm → report.

Workers: under ``accelerate launch`` each process is one; ``--launcher local --shards K`` runs K shards one after
another on each process (worker = shard × processes + process); ``--launcher slurm`` submits an array of K tasks
per stage (:mod:`common.t2i.screen.launch`) from the main process, which merges and reports.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace

import numpy as np
import torch
from accelerate import PartialState

from diffmem.common.errors import ConfigError
from diffmem.common.results import write_json_atomic
from diffmem.common.runlock import lock_run_folder
from diffmem.common.t2i.pipelines import ModelLoadError, model_family
from diffmem.common.t2i.screen.captions import read_unique
from diffmem.common.t2i.screen.cliques import near_duplicate_threshold
from diffmem.common.t2i.screen.config import ScreenConfig
from diffmem.common.t2i.screen.confirm import confirm_items, confirm_share, read_gt_map, verdict_row
from diffmem.common.t2i.screen.files import ScreenFiles
from diffmem.common.t2i.screen.launch import run_array
from diffmem.common.t2i.screen.merge import (
    IncompleteScreenError,
    read_ranked,
    set_scores,
    write_ranked,
    write_threshold,
)
from diffmem.common.t2i.screen.prepare import prepare
from diffmem.common.t2i.screen.report import ScreenReport, write_report
from diffmem.common.t2i.screen.score import WorkerModels, score_share


def resolve_scheduler(cfg: ScreenConfig) -> ScreenConfig:
    """The family's default scheduler where none is given (it is a bound setting), checked against the family."""
    try:
        family = model_family(cfg.model_id, cfg.revision)
    except ModelLoadError:
        return cfg  # the loader says why, with its own line, when the model is loaded
    cfg = replace(cfg, scheduler=cfg.scheduler or family.default_scheduler)
    family.check_scheduler(cfg.scheduler)
    return cfg


def device_of_worker() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def confirm_plan(cfg: ScreenConfig, files: ScreenFiles) -> tuple[dict, list, list[dict]]:
    """(captions by (set, id), the confirmation items, the ranked rows confirmed)."""
    confirmed = read_ranked(files, None if cfg.confirm == "above" else cfg.top_k, above_only=cfg.confirm == "above")
    captions = {("screen", r["id"]): r for r in confirmed}
    calibration_ids: list[int] = []
    if cfg.near_duplicate_threshold is None:
        for c in read_unique(files.captions("calibration"), lambda i: i < cfg.calibration_confirm):
            captions[("calibration", c["id"])] = c
            calibration_ids.append(c["id"])
    return captions, confirm_items(calibration_ids, [r["id"] for r in confirmed]), confirmed


def run_worker(cfg: ScreenConfig, stage: str, shard: int, shards: int) -> int:
    """One worker's share of a stage (a Slurm task, one process); returns the captions it did now."""
    files, models = ScreenFiles(cfg.out), WorkerModels(cfg, device_of_worker())
    if stage == "screen":
        return score_share(cfg, files, models, shard, shards)[0]
    captions, items, _ = confirm_plan(cfg, files)
    gt_map = read_gt_map(cfg.gt_map) if cfg.gt_map else None
    return confirm_share(cfg, files, models, captions, items, shard, shards, gt_map)


def finish_confirmation(cfg: ScreenConfig, files: ScreenFiles, confirmed: list[dict]) -> tuple[list[dict], dict]:
    """confirm.jsonl (ranked, with verdicts) and near_duplicate.json from the stored similarities."""
    stored = {r["id"]: r for r in files.confirm_rows("screen")}
    missing = [r["id"] for r in confirmed if r["id"] not in stored]
    if missing:
        raise IncompleteScreenError(f"{files.confirm_parts_dir}: {len(missing)} confirmed captions have no "
                                    f"generations yet (a task failed or was stopped); the same command resumes them")
    if cfg.near_duplicate_threshold is not None:
        nd = {"threshold": cfg.near_duplicate_threshold, "source": "given"}
    else:
        cal = files.confirm_rows("calibration")
        pairs = [p for r in cal for p in r["pairs"]]
        nd = {"threshold": near_duplicate_threshold(pairs, cfg.near_duplicate_quantile), "source": "calibrated",
              "quantile": cfg.near_duplicate_quantile, "calibration_captions": len(cal), "pairs": len(pairs)}
    nd["min_cluster"] = cfg.min_cluster
    write_json_atomic(files.near_duplicate, nd)
    rows = [verdict_row(stored[r["id"]], r, cfg.confirm_images, nd["threshold"], cfg.min_cluster) for r in confirmed]
    write_json_atomic(files.confirmed, rows, jsonl=True)
    return rows, nd


def run_screen(cfg: ScreenConfig, say=print) -> dict:
    """Screen (or resume screening) a caption set; returns the summary written to DIR/summary.json."""
    cfg.validate()
    cfg = resolve_scheduler(cfg)
    state = PartialState(cpu=not torch.cuda.is_available())
    if cfg.launcher == "slurm" and state.num_processes > 1:
        raise ConfigError("--launcher slurm submits its own tasks: run it without accelerate launch")
    files = ScreenFiles(cfg.out)
    main, P, p = state.is_main_process, state.num_processes, state.process_index
    t_start = time.perf_counter()
    with lock_run_folder(cfg.out, "--out", ".screen.lock"):
        counts = prepare(cfg, files) if main else None
        state.wait_for_everyone()
        models = WorkerModels(cfg, state.device)
        t0 = time.perf_counter()
        scored = 0
        if cfg.launcher == "slurm":
            if main:
                scored = run_array(cfg, files, "screen", run_worker, say)
        else:
            for shard in range(cfg.shards):
                scored += score_share(cfg, files, models, shard * P + p, cfg.shards * P)[0]
        screen_time = time.perf_counter() - t0
        state.wait_for_everyone()
        if main:
            scores, truncated = set_scores(files, "screen", counts["screen"]["unique"])
            threshold = None
            cal_scores = None
            if "calibration" in counts:
                cal_scores, _ = set_scores(files, "calibration", counts["calibration"]["unique"])
                threshold = write_threshold(files, cal_scores, cfg.fpr)
                write_json_atomic(files.calibration_scores,
                                  [{"id": i, "score": float(s)} for i, s in enumerate(cal_scores)], jsonl=True)
            write_ranked(files, scores, truncated, threshold["threshold"] if threshold else None)
        state.wait_for_everyone()
        confirm_rows, nd = [], None
        if cfg.confirm != "none":
            captions, items, confirmed = confirm_plan(cfg, files)
            gt_map = read_gt_map(cfg.gt_map) if cfg.gt_map else None
            if cfg.launcher == "slurm":
                if main:
                    run_array(cfg, files, "confirm", run_worker, say)
            else:
                for shard in range(cfg.shards):
                    confirm_share(cfg, files, models, captions, items, shard * P + p, cfg.shards * P, gt_map)
            state.wait_for_everyone()
            if main:
                confirm_rows, nd = finish_confirmation(cfg, files, confirmed)
        if not main:
            return {}
        elapsed = time.perf_counter() - t_start
        summary = summarize(cfg, counts, scores, threshold, confirm_rows, nd, scored, screen_time, elapsed, P)
        write_json_atomic(files.summary, summary)
        write_report(files.report, report_of(cfg, summary, scores, cal_scores, threshold, confirm_rows, nd))
        c = summary["counts"]
        say(f"{files.ranked}: {c['rows read']:,} rows, {c['unique captions']:,} unique, {scored:,} scored now "
            f"({summary['throughput']['captions/s']:.1f} captions/s over {P * cfg.shards} worker(s)), "
            f"{c['above threshold'] if c['above threshold'] is not None else '-'} above threshold, "
            f"{c['confirmed memorized']} of {len(confirm_rows)} confirmed memorized; report {files.report}")
        return summary


def summarize(cfg, counts, scores, threshold, confirm_rows, nd, scored, screen_time, elapsed, processes) -> dict:
    """The run's counts, throughput, threshold, near-duplicate rule and settings."""
    above = int((scores > threshold["threshold"]).sum()) if threshold else None
    return {
        "counts": {"rows read": counts["screen"]["rows_read"], "rows skipped": counts["screen"]["skipped"],
                   "unique captions": counts["screen"]["unique"], "screened": int(np.isfinite(scores).sum()),
                   "above threshold": above, "confirmed": len(confirm_rows),
                   "confirmed memorized": sum(r["verdict"] == "memorized" for r in confirm_rows),
                   "calibration captions": counts.get("calibration", {}).get("unique")},
        "throughput": {"captions/s": scored / screen_time if screen_time > 0 and scored else 0.0,
                       "scored now": scored, "screen stage (s)": round(screen_time, 2),
                       "wall time (s)": round(elapsed, 2), "processes": processes, "shards": cfg.shards,
                       "launcher": cfg.launcher},
        "threshold": threshold,
        "near_duplicate": nd,
        "settings": asdict(cfg),
        "versions": {"torch": torch.__version__},
    }


def report_of(cfg, summary, scores, cal_scores, threshold, confirm_rows, nd) -> ScreenReport:
    return ScreenReport(
        title=f"diffmem screen: {cfg.captions} on {cfg.model_id}",
        counts={k: v for k, v in summary["counts"].items() if v is not None},
        throughput=summary["throughput"], scores=scores.tolist(),
        calibration_scores=cal_scores.tolist() if cal_scores is not None else None,
        threshold=threshold["threshold"] if threshold else None, fpr=cfg.fpr if threshold else None,
        confirmed=confirm_rows, settings={k: json.dumps(v) if isinstance(v, (list, dict)) else v
                                          for k, v in summary["settings"].items()},
        near_duplicate_threshold=nd["threshold"] if nd else None)

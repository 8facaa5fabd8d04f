"""The detection harness behind ``detect/detect_mem.py`` (and ``detect/benchmark.py``): DetectConfig, the run
folder (DetectFiles: parts per process, bound settings, the merged jsonl and summary) and :func:`run_detection`,
which scores the selected rows, resuming earlier work, sharded over accelerate's processes.

Torch is imported inside :func:`run_detection`, after the input has been checked.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from diffmem.common.cli import quiet_hub_logging
from diffmem.common.errors import ConfigError
from diffmem.common.hub import check_model_reference, model_source
from diffmem.common.results import (
    append_results,
    bind_run_settings,
    check_rows_match,
    digest_rows,
    merge_rows,
    read_results,
    write_json_atomic,
)
from diffmem.common.runlock import lock_run_folder
from diffmem.common.settings import first_steps, option, option_flag, prefix_step_count
from diffmem.common.t2i.options import ALL_DETECTORS, ANISOTROPY_WEIGHTS, batch_size_option, shared_option
from diffmem.common.t2i.prompts import PromptFileError, PromptRecord, read_prompts, select_rows
from diffmem.common.t2i.stability_calibration import (
    CALIBRATION_KEYS,
    calibration_record,
    calibration_sha256,
    check_calibration,
    read_calibration,
    write_calibration,
)

# Arguments that change the numbers: a resumed run must use the same values as the results on disk.
SCORE_KEYS = ("model_id", "unet_id", "revision", "variant", "num_images_per_prompt", "gen_seed",
              "num_inference_steps", "latents", "dtype", "scheduler", "detector")
# ... and those that change only one detector's numbers (the others ignore them, so they bind nothing there).
DETECTOR_KEYS = {"wen": ("guidance_scale", "score_steps"), "anisotropy": ("anisotropy_weights",), "sharpness": (),
                 "grad_diff": (), "dsm": ("guidance_scale", "dsm_step"), "broken": ("guidance_scale",)}
# Detectors that follow the guided trajectory beyond its first step (so the guidance must mean something).
GUIDED_DETECTORS = ("dsm", "broken")


@dataclass
class DetectConfig:
    model_id: str = shared_option("model_id")
    dataset: str = option(flag="--data", aliases=("--dataset",),
                          help=".jsonl / ;-separated .csv file, or Hugging Face dataset")
    run_name: str = option(help="name of the results files in --out (a plain file name)")
    unet_id: str | None = shared_option("unet_id")
    revision: str | None = shared_option("revision")
    variant: str | None = shared_option("variant")
    split: str = shared_option("split")
    column: str | None = shared_option("column")
    output_dir: str = option("det_outputs", flag="--out", aliases=("--output_dir",),
                             help="the folder the run writes (RUN_NAME.jsonl and RUN_NAME.json)")
    num_images_per_prompt: int = shared_option("num_images_per_prompt")
    gen_seed: int = shared_option("gen_seed")
    num_inference_steps: int = shared_option("num_inference_steps")
    guidance_scale: float = shared_option("guidance_scale")
    score_steps: str = option("0", flag="--target_steps", joined=True, metavar="STEPS",
                              legacy={"--score_steps": (first_steps, "old spelling: the first N steps (1: step 0)")},
                              legacy_metavar="N",
                              help="DDIM steps scored (a prefix of the trajectory): 0 (the first), 0-9 (the first "
                                   "ten) or all (paper setting)")
    batch_size: int = batch_size_option(32)
    latents: str = shared_option("latents")
    dtype: str = shared_option("dtype")
    scheduler: str | None = shared_option("scheduler")
    height: int | None = shared_option("height")
    width: int | None = shared_option("width")
    detector: str = option("wen", choices=ALL_DETECTORS,
                           help="wen: noise magnitude along the trajectory (its --guidance_scale, --target_steps); "
                                "anisotropy / sharpness / grad_diff: zero-step scores; dsm: prediction shift over "
                                "one guided step; broken: latent-norm z-scores along the whole guided trajectory "
                                "(--calibration or --make_calibration)")
    dsm_step: int = option(0, help="dsm: the step k of the shift eps(x_k+1, c) - eps(x_k, c) (0: their DSM 0->1, 1: "
                                   "DSM 1->2)")
    calibration: str | None = option(None, type=str, help="broken: the calibration file (per-step norm statistics "
                                                          "of non-memorized prompts, same settings) to score against")
    make_calibration: str | None = option(None, type=str, metavar="FILE",
                                          help="broken: score nothing; write FILE, the calibration of these (non-"
                                               "memorized) prompts")
    anisotropy_weights: list[float] | None = option(
        None, type=float, nargs=2, metavar=("GAMMA_N", "GAMMA_C"),
        help="anisotropy score = GAMMA_N·N + GAMMA_C·C (None: " + ", ".join(
            f"{gn:g} {gc:g} for {kind} models" for kind, (gn, gc) in ANISOTROPY_WEIGHTS.items()) + ")")
    start: int = shared_option("start")
    end: int | None = shared_option("end")
    label: int | None = option(None, type=int, choices=(0, 1), help="label for rows that carry none")
    allow_empty: bool = option(False, help="score empty captions instead of rejecting them")
    overwrite: bool = option(False, help="discard earlier results of this run_name")

    @property
    def num_score_steps(self) -> int:
        """How many steps from the first are scored (--target_steps; ConfigError unless a prefix)."""
        return prefix_step_count(self.score_steps, self.num_inference_steps)

    def bound_score_setting(self, key: str):
        """A score setting as a run's config records it: the step count for --target_steps (as before issue 27,
        so earlier runs resume), the field's value otherwise."""
        if key == "score_steps" and self.score_steps != "all":
            return str(self.num_score_steps)
        return getattr(self, key)

    def validate(self) -> None:
        """Raise ConfigError with a one-line reason for inconsistent settings."""
        # Each setting on its own first: a bad --num_inference_steps is not blamed on --score_steps.
        for name in ("num_images_per_prompt", "num_inference_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}")
        self.num_score_steps  # noqa: B018  (parses and range-checks --target_steps)
        if self.start < 0 or (self.end is not None and self.end <= self.start):
            raise ConfigError(f"--start/--end must satisfy 0 <= start < end, got {self.start}/{self.end}")
        if self.detector != "wen" and self.score_steps != "0":
            raise ConfigError(f"--target_steps applies to --detector wen only; {self.detector} scores x_T "
                              f"with zero denoising steps")
        if self.anisotropy_weights is not None and self.detector != "anisotropy":
            raise ConfigError(f"--anisotropy_weights applies to --detector anisotropy only, not {self.detector}")
        if self.dsm_step != 0 and self.detector != "dsm":
            raise ConfigError(f"--dsm_step applies to --detector dsm only, not {self.detector}")
        if self.detector == "dsm" and not 0 <= self.dsm_step <= self.num_inference_steps - 2:
            raise ConfigError(f"--dsm_step must lie in 0..{self.num_inference_steps - 2} (--num_inference_steps "
                              f"{self.num_inference_steps}), got {self.dsm_step}")
        for name in ("calibration", "make_calibration"):
            if getattr(self, name) is not None and self.detector != "broken":
                raise ConfigError(f"--{name} applies to --detector broken only, not {self.detector}")
        if self.detector == "broken" and (self.calibration is None) == (self.make_calibration is None):
            raise ConfigError("--detector broken needs one of --calibration FILE (score against it) or "
                              "--make_calibration FILE (write it from these non-memorized prompts)")
        if self.calibration is not None:
            read_calibration(self.calibration)
        if self.detector == "anisotropy" and self.num_inference_steps < 3:
            raise ConfigError(f"--detector anisotropy needs --num_inference_steps of at least 3 (t_lo is "
                              f"timesteps[-3]), got {self.num_inference_steps}")
        if not self.run_name or "/" in self.run_name:
            raise ConfigError(f"--run_name must be a plain file name, got {self.run_name!r}")
        check_model_reference(self.model_id, option_flag(DetectConfig, "model_id"), self.revision)


def row_identity(rec: PromptRecord) -> dict:
    """What a stored result row must repeat of its dataset row: the prompt and the label."""
    return {"prompt": rec.prompt, "label": rec.label}


class DetectFiles:
    """The files of one run: parts/{part-RANK.jsonl, config.json}, the merged jsonl and the summary."""

    def __init__(self, cfg: DetectConfig, dataset_rows: list[PromptRecord]):
        self.out = Path(cfg.output_dir)
        self.parts = self.out / f"{cfg.run_name}.parts"
        self.final = self.out / f"{cfg.run_name}.jsonl"
        self.summary = self.out / f"{cfg.run_name}.summary.json"
        self.config_file = self.parts / "config.json"
        self.score_config = {k: cfg.bound_score_setting(k) for k in SCORE_KEYS + DETECTOR_KEYS[cfg.detector]}
        # Recorded only when given, so runs from before the options existed resume.
        self.score_config.update({k: getattr(cfg, k) for k in ("height", "width") if getattr(cfg, k) is not None})
        # A broken run is bound to its calibration's content (None: the run makes one), kept beside the results.
        self.calibration_copy = self.out / f"{cfg.run_name}.calibration.json"
        self.calibration = cfg.calibration
        if cfg.detector == "broken":
            self.score_config["calibration_sha256"] = (calibration_sha256(cfg.calibration)
                                                       if cfg.calibration is not None else None)
        # The dataset is bound by its content (every row's prompt and label), not its path: a moved file still
        # resumes, another file under the same name does not.
        self.score_config["dataset_sha256"] = digest_rows({"row": r.row, **row_identity(r)} for r in dataset_rows)

    def part(self, rank: int) -> Path:
        return self.parts / f"part-{rank}.jsonl"

    def prepare(self, overwrite: bool, records: list[PromptRecord]) -> None:
        """Create or check the run folder against the settings and the selected records (main process only)."""
        if overwrite:
            shutil.rmtree(self.parts, ignore_errors=True)
            for f in (self.final, self.summary, self.calibration_copy):
                f.unlink(missing_ok=True)
        self.parts.mkdir(parents=True, exist_ok=True)
        if self.config_file.exists():
            old = json.loads(self.config_file.read_text())
            if "detector" not in old:  # written before --detector existed, so by a wen run: it still resumes
                old = {**old, "detector": "wen"}
                write_json_atomic(self.config_file, old)
        done = [r for p in sorted(self.parts.glob("part-*.jsonl")) for r in read_results(p)]
        check_rows_match(self.final if self.final.exists() else self.parts, done,
                         {r.row: row_identity(r) for r in records}, "a new --run_name")
        if self.config_file.exists() and "dataset_sha256" not in old:
            # Written before the dataset was bound: its rows match (checked above), so the run is this dataset's.
            write_json_atomic(self.config_file, {**old, "dataset_sha256": self.score_config["dataset_sha256"]})
        bind_run_settings(self.config_file, self.score_config, bool(done), "a new --run_name")
        if self.calibration is not None:
            shutil.copyfile(self.calibration, self.calibration_copy)

    def done_rows(self, own_rank: int) -> list[list[dict]]:
        """Rows of every part file; this process's own part is repaired (torn tail cut)."""
        return [read_results(p, repair=(p == self.part(own_rank))) for p in sorted(self.parts.glob("part-*.jsonl"))]


def run_detection(cfg: DetectConfig) -> int:
    """Score the selected rows, resuming earlier work; returns the number of prompts this process scored now."""
    cfg.validate()
    # Validate the whole input before torch is even imported, let alone a model loaded.
    dataset_rows = select_rows(read_prompts(cfg.dataset, split=cfg.split, column=cfg.column,
                                            allow_empty=cfg.allow_empty), 0, None, cfg.label)
    records = select_rows(dataset_rows, cfg.start, cfg.end)
    if not records:
        raise PromptFileError(f"{cfg.dataset}: no rows in --start {cfg.start} --end {cfg.end}")
    if cfg.make_calibration is not None and len(records) * cfg.num_images_per_prompt < 2:
        raise ConfigError("--make_calibration needs at least 2 trajectories (rows x --num_images_per_prompt) for a "
                          "standard deviation")

    import torch
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from diffmem.common.t2i.broken_memories import StabilityRegion, calibration_from_rows
    from diffmem.common.t2i.detection import anisotropy_weights_for, result_row, score_prompts
    from diffmem.common.t2i.pipelines import (
        FamilyError,
        ModelLoadError,
        denoiser_parts,
        load_pipeline,
        model_family,
        parse_dtype,
    )

    # The family's default scheduler is what the run records (an SD run's "ddim" as before). A pipeline folder of a
    # class the arm does not speak (or with parts missing) is refused now, before the run folder is written; any
    # other model that cannot be read here fails later, where it always has (after the run folder's and the lock's
    # checks), with the loader's line.
    try:
        family = model_family(cfg.model_id, cfg.revision)
    except ModelLoadError:
        if (Path(cfg.model_id).expanduser() / "model_index.json").is_file():
            raise
        family = None
    if family is not None:
        cfg = replace(cfg, scheduler=cfg.scheduler or family.default_scheduler)
        family.check_scheduler(cfg.scheduler)
    calibration = read_calibration(cfg.calibration) if cfg.calibration is not None else None
    if calibration is not None:
        check_calibration(calibration, {k: getattr(cfg, k) for k in CALIBRATION_KEYS}, cfg.calibration)

    with lock_run_folder(cfg.output_dir, "--out", f".{cfg.run_name}.lock"):
        quiet_hub_logging()
        # On a machine without CUDA, accelerate only honours a multi-process launch when told it is on CPU.
        state = PartialState(cpu=not torch.cuda.is_available())
        run_state = DetectFiles(cfg, dataset_rows)
        if state.is_main_process:
            run_state.prepare(cfg.overwrite, records)
        state.wait_for_everyone()

        t0 = time.perf_counter()
        selected = {r.row for r in records}
        done_before = {r["row"] for rows in run_state.done_rows(state.process_index) for r in rows} & selected
        todo = [r for r in records if r.row not in done_before][state.process_index :: state.num_processes]
        own_part = run_state.part(state.process_index)
        scoring_time = 0.0
        if todo:
            pipe = load_pipeline(cfg.model_id, cfg.unet_id, parse_dtype(cfg.dtype), state.device,
                                 cfg.revision, cfg.variant)
            parts = denoiser_parts(pipe, cfg.scheduler, cfg.height, cfg.width)
            guided = cfg.detector in GUIDED_DETECTORS or (cfg.detector == "wen" and cfg.num_score_steps > 1)
            problem = parts.family.guidance_problem(cfg.guidance_scale) if guided else None
            if problem is not None:
                raise FamilyError(problem)
            if cfg.detector == "broken":  # x̂₀ of the sampler's steps, or one line now
                problem = parts.family.clean_estimate_problem(parts.scheduler)
                if problem is not None:
                    raise FamilyError(f"--detector broken: {problem}")
            region = StabilityRegion.from_record(calibration) if calibration is not None else None
            if cfg.detector == "anisotropy":  # the weights of this family's prediction type, or one line now
                anisotropy_weights_for(parts, cfg.anisotropy_weights)
            uncond = parts.unconditional()
            t_score = time.perf_counter()
            batches = [todo[i : i + cfg.batch_size] for i in range(0, len(todo), cfg.batch_size)]
            bar = tqdm(total=len(todo), desc=f"detect[{state.process_index}]", unit="prompt",
                       position=state.process_index)
            for batch in batches:
                trace, truncated = score_prompts(
                    parts, [r.prompt for r in batch], [r.row for r in batch],
                    num_images_per_prompt=cfg.num_images_per_prompt, gen_seed=cfg.gen_seed,
                    num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                    score_steps=cfg.num_score_steps, latents_mode=cfg.latents, uncond_embed=uncond,
                    detector=cfg.detector, anisotropy_weights=cfg.anisotropy_weights, dsm_step=cfg.dsm_step,
                    region=region)
                scores = [None if s != s else s for s in trace.score.tolist()]  # NaN: a calibration run's rows
                append_results(own_part, [result_row(rec, cfg.detector, trace.row_terms(b), scores[b], truncated[b])
                                          for b, rec in enumerate(batch)])
                bar.update(len(batch))
            bar.close()
            scoring_time = time.perf_counter() - t_score
            del pipe
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        state.wait_for_everyone()

        if state.is_main_process:
            rows = merge_rows(run_state.done_rows(-1), keep=selected)
            write_json_atomic(run_state.final, rows, jsonl=True)
            if cfg.make_calibration is not None:
                mean, std, trajectories = calibration_from_rows(rows)
                write_calibration(cfg.make_calibration, calibration_record(
                    {k: getattr(cfg, k) for k in CALIBRATION_KEYS}, mean, std, trajectories, len(rows),
                    run_state.score_config["dataset_sha256"]))
                print(f"{cfg.make_calibration}: the calibration of {trajectories} trajectories ({len(rows)} prompts)")
            elapsed = time.perf_counter() - t0
            scored_now = len(rows) - len(done_before)
            write_json_atomic(run_state.summary, summarize(cfg, rows, scored_now, len(done_before), elapsed,
                                                           scoring_time, state.num_processes))
            missing = len(selected) - len(rows)
            print(f"{run_state.final}: {len(rows)} prompts ({scored_now} scored now, {len(done_before)} resumed"
                  f"{f', {missing} MISSING' if missing else ''}) in {elapsed:.1f}s "
                  f"(scoring {scored_now / max(scoring_time, 1e-9):.2f} prompts/s on process 0's share)")
        return len(todo)


def summarize(cfg: DetectConfig, rows: list[dict], scored_now: int, resumed: int, elapsed: float,
              scoring_time: float, num_processes: int) -> dict:
    """Run summary: settings, counts, timing (wall time, and process 0's scoring loop) and versions."""
    import diffusers
    import torch
    import transformers

    labels = {str(k): sum(r.get("label") == k for r in rows) for k in (0, 1)}
    return {
        "run_name": cfg.run_name,
        "args": asdict(cfg),
        "model": {"model_id": cfg.model_id, "unet_id": cfg.unet_id, "dtype": cfg.dtype, "scheduler": cfg.scheduler,
                  "source": model_source(cfg.model_id, cfg.revision)},  # the commit a Hub id resolved to
        "counts": {"prompts": len(rows), "scored_this_run": scored_now, "resumed": resumed,
                   "truncated": sum(bool(r.get("truncated")) for r in rows), "labels": labels},
        "detector": cfg.detector,
        "score_steps": cfg.num_score_steps if cfg.detector == "wen" else 0,
        "num_processes": num_processes,
        "time_s": elapsed,
        "scoring_time_s": scoring_time,
        # Throughput of the scoring loop (model loading excluded); all processes run concurrently.
        "prompts_per_s": scored_now / scoring_time if scoring_time > 0 else None,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
    }



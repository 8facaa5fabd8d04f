"""Sweep mitigation methods and plot replication (SSCD) against prompt alignment (CLIP score).

    python mitigate/tradeoff.py --model ID_OR_DIR --data FILE_OR_DIR --out RUN_DIR
        [--methods none ours jain_stp jain_dtp jain_og han_batch han_sample ren_attn gni rand_word_add ...]
        [--target_losses 1 2 3 4] [--repeat_nums 1 2 4 8] [--sweep jain_tau=300,500,700 ren_c=1.1,1.25 ...]
        [--general_dataset FILE [--general_end N]] [options]

Loads the model once and runs every method into {out}/{label}/ exactly as
``mitigate/inference_mem.py --method`` would (resumable): ``ours`` once per --target_losses, the rand_* baselines
once per --repeat_nums, every other method once per value of its knob given with --sweep (jain_stp: jain_tau,
jain_dtp: jain_early_scale, han_batch: han_tau, han_sample: han_target_loss, ren_attn: ren_c, gni: gni_scale),
else once at its --setting. An item METHOD:FIELD=V,... runs the method with those of its own settings
(Jain et al.'s two static settings side by side: jain_stp jain_stp:jain_tau=650,jain_early_scale=-2). With
--general_dataset every run is repeated on that prompt set (CLIP only) into {label}/general/. Writes
{out}/tradeoff.json and tradeoff.png (mean SSCD vs mean CLIP score, one curve per method and the settings
given with it, seconds per image in the legend) and side_by_side.png (one row per run, labelled as its folder,
under a row of ground-truth images; one column per prompt, the first 8; each tile a prompt's first generation, at
least 256 px, tiny images enlarged with nearest neighbour; the --general_dataset runs are not shown). Without
--methods: none (unless --skip_none), ours per --target_losses and each of --baselines per --repeat_nums.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from pathlib import Path

from diffmem.common.cli import (
    ArgumentParser,
    add_settings_arguments,
    add_settings_groups,
    quiet_hub_logging,
    resolve_device,
    run_main,
    settings_from_args,
)
from diffmem.common.errors import ConfigError
from diffmem.common.runlock import lock_run_folder
from diffmem.common.settings import float_list, int_list, option
from diffmem.common.t2i.mitigation.options import (  # torch-free: run() imports torch
    BASELINES,
    METHODS,
    MitigationSettings,
    RunOptions,
    argument_groups,
    own_fields,
)
from diffmem.common.t2i.mitigation.tradeoff import parse_sweeps, plan_runs, plot_tradeoff, tradeoff_point


@dataclass
class TradeoffConfig(MitigationSettings, RunOptions):
    """RunOptions, the MitigationSettings every run shares (``method`` is set per run), then the sweep."""

    methods: list[str] | None = option(None, nargs="+", metavar="METHOD[:FIELD=V,...]",
                                       help=f"the methods to compare, of {', '.join(METHODS)}; an item may set the "
                                            "method's own settings for its runs, e.g. jain_stp:jain_tau=650,"
                                            "jain_early_scale=-2 or ours:be_mask=1 (None: none, ours and --baselines)")
    target_losses: list[float] = option(default_factory=lambda: [1.0, 2.0, 3.0, 4.0], type=float_list, nargs="*",
                                        help="ours: one run per target loss")
    repeat_nums: list[int] = option(default_factory=lambda: [1, 2, 4, 8], type=int_list, nargs="*",
                                    help="baselines: one run per value")
    baselines: list[str] = option(default_factory=lambda: ["rand_word_add"], nargs="*", choices=BASELINES,
                                  help="without --methods: the baselines to run")
    skip_none: bool = option(False, help="without --methods: leave out the unmitigated run")
    sweep: list[str] = option(default_factory=list, nargs="*", metavar="KNOB=V1,V2",
                              help="values of a method's knob, one run each (jain_tau, jain_early_scale, han_tau, "
                                   "han_target_loss, ren_c, gni_scale)")
    general_dataset: str | None = option(None, type=str,
                                         help="general (unmemorized) prompts run with every method, CLIP only, e.g. "
                                              "../shared/data/coco2014_val_10000.csv")
    general_start: int = option(0, help="first general prompt")
    general_end: int | None = option(None, type=int, help="one past the last general prompt")

    def base_settings(self) -> MitigationSettings:
        return MitigationSettings(**{f.name: getattr(self, f.name) for f in fields(MitigationSettings)})

    def method_list(self) -> list[str]:
        if self.methods is not None:
            return list(self.methods)
        legacy = [] if self.skip_none else ["none"]
        legacy += ["ours"] if self.target_losses else []
        return legacy + (list(self.baselines) if self.repeat_nums else [])

    def runs(self) -> list:
        knob_values = {"optim_target_loss": self.target_losses, "repeat_num": self.repeat_nums,
                       **parse_sweeps(self.sweep)}
        return plan_runs(self.base_settings(), self.method_list(), knob_values)

    def validate(self) -> None:
        """Raise ConfigError with a one-line reason for inconsistent settings."""
        runs = self.runs()
        if not runs:
            raise ConfigError("nothing to sweep: give --methods, or --target_losses and/or --baselines with "
                              "--repeat_nums")
        for r in runs:
            r.settings.validate()
        RunOptions.validate(self)
        if self.sscd_model == "none":
            raise ConfigError("--sscd_model none: the trade-off plot needs SSCD similarities")
        if self.general_start < 0 or (self.general_end is not None and self.general_end <= self.general_start):
            raise ConfigError(f"--general_start/--general_end must satisfy 0 <= start < end, got "
                              f"{self.general_start}/{self.general_end}")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Sweep mitigation strength; plot SSCD vs CLIP score per method.")
    add_settings_groups(p, argument_groups(), exclude=("method",))  # set per run
    add_settings_arguments(p, TradeoffConfig, only=own_fields(TradeoffConfig, MitigationSettings, RunOptions))
    return p


def parse_config(argv: list[str] | None) -> TradeoffConfig:
    return settings_from_args(TradeoffConfig, build_parser().parse_args(argv))


def run(cfg: TradeoffConfig) -> list[dict]:
    cfg.validate()
    from diffmem.common.results import write_json_atomic
    from diffmem.common.t2i.groundtruth import resolve_dataset_path, resolve_gt_root
    from diffmem.common.t2i.mitigation.run import (
        Evaluators,
        check_evaluators,
        load_evaluators,
        run_binding,
        run_mitigation,
    )
    from diffmem.common.t2i.mitigation.side_by_side import SIDE_BY_SIDE_FILE, write_side_by_side
    from diffmem.common.t2i.prompts import PromptFileError, read_prompts, select_rows

    dataset = resolve_dataset_path(cfg.dataset)
    dataset_rows = read_prompts(dataset)
    records = select_rows(dataset_rows, cfg.start, cfg.end)
    if not records:
        raise PromptFileError(f"{cfg.dataset}: no rows in --start {cfg.start} --end {cfg.end}")
    gt_root = resolve_gt_root(dataset, cfg.gt_dir) if Path(str(dataset)).is_file() or cfg.gt_dir else None
    if gt_root is None:
        raise ConfigError(f"{cfg.dataset}: no ground-truth folder (gt_images/ next to the prompt file, or "
                          f"--gt_dir); the trade-off needs SSCD similarities to ground truth")
    general = None
    if cfg.general_dataset:
        general_rows = read_prompts(resolve_dataset_path(cfg.general_dataset))
        general = select_rows(general_rows, cfg.general_start, cfg.general_end)
        if not general:
            raise PromptFileError(f"{cfg.general_dataset}: no rows in --general_start {cfg.general_start} "
                                  f"--general_end {cfg.general_end}")
    check_evaluators(cfg.sscd_model, cfg.reference_model, cfg.reference_model_pretrain)
    device = resolve_device(cfg.device)
    runs = cfg.runs()

    from diffmem.common.t2i.pipelines import denoiser_parts, load_pipeline, parse_dtype

    with lock_run_folder(cfg.run_dir, "--out"):
        quiet_hub_logging()
        evaluators = load_evaluators(cfg.sscd_model, cfg.sscd_preprocess, cfg.reference_model,
                                     cfg.reference_model_pretrain, gt_root, device)
        pipe = load_pipeline(cfg.model_id, cfg.unet_id, parse_dtype(cfg.dtype), device, cfg.revision)
        parts = denoiser_parts(pipe, cfg.scheduler, cfg.height, cfg.width)
        root = cfg.run_dir
        points = []
        for planned in runs:
            label, settings = planned.label, planned.settings
            summary = run_mitigation(parts, pipe.vae, records, settings, root / label, evaluators=evaluators,
                                     batch_size=cfg.batch_size, overwrite=cfg.overwrite,
                                     extra_summary={"run_name": f"{cfg.name}/{label}", "dataset": str(dataset),
                                                    "model_source": getattr(pipe, "model_source", None)},
                                     binding=run_binding(cfg.model_id, cfg.unet_id, cfg.dtype, evaluators,
                                                         cfg.sscd_preprocess, dataset_rows, cfg.revision))
            general_summary = None
            if general is not None:
                general_summary = run_mitigation(
                    parts, pipe.vae, general, settings, root / label / "general",
                    evaluators=Evaluators(clip=evaluators.clip), batch_size=cfg.batch_size, overwrite=cfg.overwrite,
                    extra_summary={"run_name": f"{cfg.name}/{label}/general", "dataset": cfg.general_dataset,
                                   "model_source": getattr(pipe, "model_source", None)},
                    binding=run_binding(cfg.model_id, cfg.unet_id, cfg.dtype, Evaluators(clip=evaluators.clip),
                                        cfg.sscd_preprocess, general_rows, cfg.revision))
            points.append(tradeoff_point(planned, summary, general_summary))
            p = points[-1]
            print(f"{label}: SSCD mean {p['sscd_mean']}, CLIP {p['clip_score_mean']}, "
                  f"{p['seconds_per_image']} s/image", file=sys.stderr)
        write_json_atomic(root / "tradeoff.json", {
            "points": points, "sscd_model": evaluators.sscd.description,
            "clip_model": f"{cfg.reference_model}:{cfg.reference_model_pretrain}", "dataset": str(dataset),
            "general_dataset": cfg.general_dataset, "prompts": len(records),
            "general_prompts": len(general) if general is not None else 0,
            "num_images_per_prompt": cfg.num_images_per_prompt, "num_inference_steps": cfg.num_inference_steps,
            "guidance_scale": cfg.guidance_scale, "gen_seed": cfg.gen_seed, "device": device, "dtype": cfg.dtype})
        png = plot_tradeoff(points, root / "tradeoff.png",
                            title=f"{cfg.name}: {len(records)} prompts, "
                                  f"{cfg.num_images_per_prompt} generations each")
        picture = write_side_by_side(root / SIDE_BY_SIDE_FILE, records, [(r.label, root / r.label) for r in runs],
                                     cfg.num_images_per_prompt, gt_root,
                                     title=f"{cfg.name}: first generation of each prompt, one row per run")
        print(f"{root / 'tradeoff.json'}, {png}{f', {picture}' if picture else ''}: {len(points)} runs")
        return points


def main(argv: list[str] | None = None) -> int:
    return run_main("tradeoff", run, parse_config(argv))


if __name__ == "__main__":
    raise SystemExit(main())

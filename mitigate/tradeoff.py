"""Sweep mitigation strength and plot replication (SSCD) against prompt alignment (CLIP score).

    python mitigate/tradeoff.py --model_id ID_OR_DIR --dataset FILE_OR_DIR --run_name NAME
        [--target_losses 1 2 3 4] [--repeat_nums 1 2 4 8] [--baselines rand_word_add ...] [options]

Runs ``none`` once, ``ours`` at each target loss and each baseline at each repeat_num on one loaded model,
each into {out}/{run_name}/{label}/ exactly as ``mitigate/inference_mem.py`` would (resumable), then writes
{out}/{run_name}/tradeoff.json and tradeoff.png (mean SSCD vs mean CLIP score, one curve per method).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import ArgumentParser, quiet_hub_logging, run_main  # noqa: E402
from common.errors import ConfigError  # noqa: E402
from common.t2i.mitigation_run import BASELINES, MitigationSettings, RunOptions  # noqa: E402


@dataclass
class TradeoffConfig(RunOptions):
    """RunOptions, then the sweep and the MitigationSettings every point of it shares."""

    target_losses: list[float] = field(default_factory=lambda: [1.0, 2.0, 3.0, 4.0])
    repeat_nums: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    baselines: list[str] = field(default_factory=lambda: ["rand_word_add"])
    skip_none: bool = False
    optim_target_steps: list[int] = field(default_factory=lambda: [0])
    optim_iters: int = 10
    optim_lr: float = 0.05
    optim_loss_reduction: str = "mean"
    freeze_padding: bool = False
    num_images_per_prompt: int = 4
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    gen_seed: int = 0

    def base_settings(self) -> MitigationSettings:
        keys = {f.name for f in fields(MitigationSettings)} & {f.name for f in fields(self)}
        return MitigationSettings(**{k: getattr(self, k) for k in keys})

    def validate(self) -> None:
        """Raise ConfigError with a one-line reason for inconsistent settings."""
        from common.t2i.mitigation_run import sweep_settings

        for _, s in sweep_settings(self.base_settings(), self.target_losses, self.repeat_nums, self.baselines,
                                   not self.skip_none):
            s.validate()
        if not self.target_losses and not (self.baselines and self.repeat_nums):
            raise ConfigError("nothing to sweep: give --target_losses and/or --baselines with --repeat_nums")
        self.validate_run()
        if self.sscd_model == "none":
            raise ConfigError("--sscd_model none: the trade-off plot needs SSCD similarities")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Sweep mitigation strength; plot SSCD vs CLIP score per method.")
    p.add_argument("--model_id", required=True)
    p.add_argument("--unet_id")
    p.add_argument("--dataset", required=True, help="prompt file or Wen-style folder (see inference_mem.py)")
    p.add_argument("--run_name", required=True)
    p.add_argument("--target_losses", type=float, nargs="*", default=[1.0, 2.0, 3.0, 4.0],
                   help="ours: one run per target loss")
    p.add_argument("--repeat_nums", type=int, nargs="*", default=[1, 2, 4, 8], help="baselines: one run per value")
    p.add_argument("--baselines", nargs="*", choices=BASELINES, default=["rand_word_add"])
    p.add_argument("--skip_none", action="store_true", help="leave out the unmitigated reference run")
    p.add_argument("--optim_target_steps", type=int, nargs="+", default=[0])
    p.add_argument("--optim_iters", type=int, default=10)
    p.add_argument("--optim_lr", type=float, default=0.05)
    p.add_argument("--optim_loss_reduction", choices=("mean", "joint"), default="mean")
    p.add_argument("--freeze_padding", action="store_true")
    p.add_argument("--num_images_per_prompt", type=int, default=4)
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--gen_seed", type=int, default=0)
    p.add_argument("--gt_dir")
    p.add_argument("--sscd_model", default="default")
    p.add_argument("--sscd_preprocess", choices=("wen", "sscd"), default="wen")
    p.add_argument("--reference_model", default="ViT-g-14")
    p.add_argument("--reference_model_pretrain", default="laion2b_s12b_b42k")
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--end", type=int)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.add_argument("--out", default="mit_outputs")
    p.add_argument("--overwrite", action="store_true", help="discard earlier results of every swept run")
    return p


def parse_config(argv: list[str] | None) -> TradeoffConfig:
    args = build_parser().parse_args(argv)
    return TradeoffConfig(**{f.name: getattr(args, f.name) for f in fields(TradeoffConfig)})


def run(cfg: TradeoffConfig) -> list[dict]:
    cfg.validate()
    from common.t2i.groundtruth import resolve_dataset_path, resolve_gt_root
    from common.t2i.mitigation_run import (check_evaluators, load_evaluators, plot_tradeoff, resolve_device,
                                       run_mitigation, sweep_settings, tradeoff_point)
    from common.t2i.prompts import PromptFileError, read_prompts, select_rows
    from common.results import write_json_atomic

    dataset = resolve_dataset_path(cfg.dataset)
    records = select_rows(read_prompts(dataset), cfg.start, cfg.end)
    if not records:
        raise PromptFileError(f"{cfg.dataset}: no rows in --start {cfg.start} --end {cfg.end}")
    gt_root = resolve_gt_root(dataset, cfg.gt_dir) if Path(str(dataset)).is_file() or cfg.gt_dir else None
    if gt_root is None:
        raise ConfigError(f"{cfg.dataset}: no ground-truth folder (gt_images/ next to the prompt file, or "
                          f"--gt_dir); the trade-off needs SSCD similarities to ground truth")
    check_evaluators(cfg.sscd_model, cfg.reference_model, cfg.reference_model_pretrain)
    device = resolve_device(cfg.device)
    runs = sweep_settings(cfg.base_settings(), cfg.target_losses, cfg.repeat_nums, cfg.baselines, not cfg.skip_none)

    from common.t2i.models import denoiser_parts, load_pipeline, parse_dtype

    quiet_hub_logging()
    evaluators = load_evaluators(cfg.sscd_model, cfg.sscd_preprocess, cfg.reference_model,
                                 cfg.reference_model_pretrain, gt_root, device)
    pipe = load_pipeline(cfg.model_id, cfg.unet_id, parse_dtype(cfg.dtype), device)
    parts = denoiser_parts(pipe)
    root = Path(cfg.out) / cfg.run_name
    points = []
    for label, settings in runs:
        summary = run_mitigation(parts, pipe.vae, records, settings, root / label, evaluators=evaluators,
                                 batch_size=cfg.batch_size, overwrite=cfg.overwrite,
                                 extra_summary={"run_name": f"{cfg.run_name}/{label}", "dataset": str(dataset)})
        points.append(tradeoff_point(label, settings, summary))
        print(f"{label}: SSCD mean {points[-1]['sscd_mean']}, CLIP {points[-1]['clip_score_mean']}", file=sys.stderr)
    write_json_atomic(root / "tradeoff.json", {"points": points, "sscd_model": evaluators.sscd.description,
                                               "clip_model": f"{cfg.reference_model}:{cfg.reference_model_pretrain}"})
    png = plot_tradeoff(points, root / "tradeoff.png",
                        title=f"{cfg.run_name}: {len(records)} prompts, {cfg.num_images_per_prompt} generations each")
    print(f"{root / 'tradeoff.json'}, {png}: {len(points)} runs")
    return points


def main(argv: list[str] | None = None) -> int:
    return run_main("tradeoff", run, parse_config(argv))


if __name__ == "__main__":
    raise SystemExit(main())

"""Screen a training-caption set for memorized captions: score, rank, confirm without ground truth, report.

    python detect/screen.py --model ID_OR_DIR --captions FILE --out DIR [--calibration FILE] [--fpr 0.01] \\
        [--detector wen|anisotropy|sharpness] [--top_k 1000] [--confirm_images 16] [--confirm_steps 50]
    accelerate launch detect/screen.py ...                  # one share per process (GPUs, nodes)
    python detect/screen.py ... --launcher slurm --shards K # a submitit array of K Slurm tasks per stage

Writes DIR/screen.jsonl and DIR/screen.parquet (every unique caption, ranked by score), DIR/threshold.json,
DIR/confirm.jsonl (verdicts of the confirmed captions, their generations under DIR/confirm/images/),
DIR/report.html and DIR/summary.json. Re-running the same command resumes; other score settings are refused.
"""

from __future__ import annotations

from diffmem.common.cli import ArgumentParser, add_settings_arguments, quiet_hub_logging, run_main, settings_from_args
from diffmem.common.hub import check_model_reference
from diffmem.common.settings import option_flag
from diffmem.common.t2i.screen.config import ScreenConfig


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Screen a training-caption set for memorized captions: score every unique "
                                   "caption, rank, confirm the top ones by near-duplicate generations, report.")
    add_settings_arguments(p, ScreenConfig)
    return p


def parse_config(argv: list[str] | None) -> ScreenConfig:
    return settings_from_args(ScreenConfig, build_parser().parse_args(argv))


def run(cfg: ScreenConfig) -> dict:
    cfg.validate()
    check_model_reference(cfg.model_id, option_flag(ScreenConfig, "model_id"), cfg.revision)
    # The sources are opened (suffix, dataset name) before torch is imported.
    from diffmem.common.t2i.screen.prepare import caption_sources

    caption_sources(cfg)
    quiet_hub_logging()
    from diffmem.common.t2i.screen.run import run_screen

    return run_screen(cfg)


def main(argv: list[str] | None = None) -> int:
    return run_main("screen", run, parse_config(argv))


if __name__ == "__main__":
    raise SystemExit(main())

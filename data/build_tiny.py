"""Write a tiny random-weight pipeline of any text-to-image family (SD 1/2, SDXL, SD3, Flux, PixArt-Σ) to try every
text-to-image CLI offline.

    diffmem build-tiny --family sd3 --out tiny-sd3
    diffmem detect --model tiny-sd3 --data prompts.jsonl --run_name r

Each is the family's own diffusers pipeline class with tiny configs (common/t2i/pipelines/tiny.py), saved with
save_pretrained, so the CLIs read it through the same from_pretrained path as a Hub model. Random weights: scores,
images and heatmaps show that the path runs, not what a real model memorizes.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from diffmem.common.cli import ArgumentParser, add_settings_arguments, run_main, settings_from_args
from diffmem.common.errors import ConfigError
from diffmem.common.settings import option

FAMILY_CHOICES = ("sd", "sdxl", "sd3", "flux", "pixart")  # common.t2i.pipelines.tiny.TINY_FAMILIES (torch-free here)


@dataclass
class TinyConfig:
    family: str = option(choices=FAMILY_CHOICES, help="the pipeline family to build")
    out: str = option(help="output folder (must not exist, unless --overwrite)")
    seed: int = option(0, help="seed of the random weights")
    overwrite: bool = option(False, help="replace --out if it exists")

    def validate(self) -> None:
        if Path(self.out).exists() and not self.overwrite:
            raise ConfigError(f"--out {self.out}: already exists (pass --overwrite to replace it)")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Write a tiny random-weight pipeline of a text-to-image family.")
    add_settings_arguments(p, TinyConfig)
    return p


def run(cfg: TinyConfig) -> int:
    cfg.validate()
    from diffmem.common.t2i.pipelines.tiny import build_family_pipeline

    out = Path(cfg.out)
    if out.exists():
        shutil.rmtree(out)
    build_family_pipeline(cfg.family, out, seed=cfg.seed)
    size = " (ask for --height 16 --width 16: Flux's default image is 256 x 256 here)" if cfg.family == "flux" else ""
    print(f"{out}: a tiny {cfg.family} pipeline{size}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main("build_tiny", run, settings_from_args(TinyConfig, build_parser().parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())

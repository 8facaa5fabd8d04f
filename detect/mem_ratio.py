"""Memorization ratio of an EDM training run (Gu et al.): fraction of samples with d1/d2 < 1/3, max over snapshots.

    python detect/mem_ratio.py --model RUN --data DATASET.zip [--seeds 0-9999] [--batch_size 512]
        [--snapshots all|latest|K1,K2,...] [--log RUN/mem_traj.log] [--save_images] [--device cpu|cuda]
        [--steps 18] [--sigma_min 0.002] [--sigma_max 80] [--rho 7] [--out DIR] [--overwrite]
    python detect/mem_ratio.py --images DIR_OR_NPZ --knn_ref DATASET.zip --outdir OUT   # any generator's samples
    accelerate launch detect/mem_ratio.py ...                                          # shards the seeds

Every chosen snapshot of RUN (K = images-seen numbers or snapshot folder names), newest first: its EMA network
samples the seeds exactly as detect/generate.py does (uint8 as its PNGs; --save_images also writes them to
RUN/mem-images/<snapshot>/), and each sample's two nearest training images of DATASET.zip are found exactly
(float64; DiffMemorize's distance: L2 of uint8 values / sqrt(C*H*W)). With --images, one folder of PNGs, an EDM
dataset zip or an npz (uint8 N×H×W×C under 'images', optional 'seeds') is measured instead (common/edm/images.py,
the reader detect/similarity.py uses too).

Writes, under RUN (or --out): knn-dist/<snapshot>.npz, mem_ratio.jsonl (one row per snapshot), mem_traj.log,
mem_ratio_summary.json (max_ratio, max_snapshot, max_images_seen, snapshots, n, ...), mem_ratio.png (ratio vs
images seen beside the d1/d2 histogram of the maximum's snapshot; one snapshot or image set: its histogram) and, per
snapshot or image set, mem-plots/<name>-d1d2.png (its d1/d2 histogram with the 1/3 line) and
mem-plots/<name>-nearest.png (its 8 most memorized samples, smallest d1/d2 first, each beside its nearest training
image and labelled with the ratio; small images enlarged with nearest neighbour to 256-px tiles).
Re-running resumes: finished snapshots are skipped, an interrupted one is redone. Bad input: one line on stderr
and exit code 2.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from diffmem.common.cli import ArgumentParser, add_settings_arguments, resolve_device, run_main, settings_from_args
from diffmem.common.edm.measure.mem_ratio import MemRatioError
from diffmem.common.edm.networks.snapshot import NetworkLimits, network_limits
from diffmem.common.edm.sampler import SamplerSettings, parse_seeds
from diffmem.common.errors import ConfigError
from diffmem.common.runlock import lock_run_folder
from diffmem.common.settings import device_option, option

DEFAULT_SEEDS = "0-9999"  # DiffMemorize's 10k samples per snapshot


@dataclass
class MemRatioConfig:
    knn_ref: Path = option(flag="--data", aliases=("--knn_ref", "--knn-ref"), help="the training set (EDM dataset zip)",
                           type=Path, metavar="ZIP")
    expdir: Path | None = option(None, type=Path, metavar="RUN", flag="--model", aliases=("--expdir",),
                                 help="training run folder (its snapshot-* folders)")
    images: Path | None = option(None, type=Path, metavar="DIR_OR_NPZ",
                                 help="measure these generated images instead")
    outdir: Path | None = option(None, type=Path, metavar="DIR", flag="--out", aliases=("--outdir",),
                                 help="the folder the run writes (None: --model's; --images needs it)")
    seeds: str | None = option(None, type=str, metavar="LIST", joined=True,
                               help=f"seeds to sample per snapshot (None: {DEFAULT_SEEDS})")
    batch: int = option(512, metavar="N", flag="--batch_size", aliases=("--batch",), help="images per network call")
    snapshots: str | None = option(None, type=str, metavar="SPEC", joined=True,
                                   help="all (None), latest, or K1,K2,... (images seen or snapshot folder names)")
    log: Path | None = option(None, type=Path, metavar="FILE",
                              help="readable log, one line per snapshot (None: OUTDIR/mem_traj.log)")
    save_images: bool = option(False, help="also save the samples as PNGs in mem-images/")
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    limits: NetworkLimits = field(default_factory=NetworkLimits)
    device: str | None = device_option()
    overwrite: bool = option(False, help="discard earlier results in the output folder")
    # Validate only: the inputs may not exist yet (a sweep checks before its stages run).
    check_args: bool = option(False, help="parse and check the arguments, then exit without reading --data or "
                                          "writing anything (detect/emm.py checks a sweep's stage arguments so)")

    @property
    def root(self) -> Path:
        return self.outdir if self.outdir is not None else self.expdir

    def seed_list(self) -> list[int]:
        return parse_seeds(self.seeds or DEFAULT_SEEDS)

    def validate(self) -> None:
        """Argument-level checks (before torch is imported); raises a DiffmemError."""
        if (self.expdir is None) == (self.images is None):
            raise ConfigError("give exactly one of --model RUN and --images DIR_OR_NPZ")
        if self.images is not None:
            if self.outdir is None:
                raise ConfigError("--images needs --out (where the results go)")
            given = [n for n, v in (("--seeds", self.seeds), ("--snapshots", self.snapshots),
                                    ("--save_images", self.save_images or None)) if v is not None]
            if given:
                raise ConfigError(f"{', '.join(given)} only apply to --model (--images measures the given images)")
        else:
            self.seed_list()
            self.sampler.validate()
            if self.snapshots is not None and not self.snapshots.strip():
                raise MemRatioError("bad --snapshots '': expected all, latest or K1,K2,...")
        if self.batch < 1:
            raise ConfigError(f"expected --batch >= 1, got {self.batch}")
        if not self.check_args and not self.knn_ref.is_file():
            raise MemRatioError(f"{self.knn_ref}: no such file (expected the training set as an EDM dataset zip)")
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"{self.root}: expected the output folder to be a folder, it is a file")


# mem_ratio samples with EDM's deterministic sampler: only its schedule is an option here.
SAMPLER_OPTIONS = ("num_steps", "sigma_min", "sigma_max", "rho")


def parse_args(argv=None) -> MemRatioConfig:
    p = ArgumentParser(prog="mem_ratio", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    add_settings_arguments(src, MemRatioConfig, only=("expdir", "images"))
    add_settings_arguments(p, MemRatioConfig, exclude=("expdir", "images", "sampler", "limits"))
    add_settings_arguments(p, SamplerSettings, only=SAMPLER_OPTIONS)
    add_settings_arguments(p, NetworkLimits)
    a = p.parse_args(argv)
    return settings_from_args(MemRatioConfig, a, sampler=settings_from_args(SamplerSettings, a),
                              limits=settings_from_args(NetworkLimits, a))


def process_state(device: str):
    """This process's Shard and device: Accelerate's when launched on several processes."""
    import torch

    from diffmem.common.edm.measure.mem_ratio import Shard

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        # On a machine without CUDA, accelerate only honours a multi-process launch when told it is on CPU.
        state = PartialState(cpu=device == "cpu")
        return Shard(state.process_index, state.num_processes, state.wait_for_everyone), state.device
    return Shard(), torch.device(device)


def run(cfg: MemRatioConfig) -> dict | None:
    """Measure the run's snapshots (or the images); the summary on process 0."""
    cfg.validate()
    if cfg.check_args:
        return None


    from diffmem.common.edm.dataset.edm_zip import load_dataset_zip
    from diffmem.common.edm.measure import mem_ratio as M

    with lock_run_folder(cfg.root, "--out" if cfg.outdir is not None else "--model", ".mem_ratio.lock"):
        device = resolve_device(cfg.device)
        # Input errors before any process group is set up (every process would raise the same one).
        source = M.load_measured_images(cfg.images) if cfg.images is not None else None
        if source is None:
            M.select_snapshots(cfg.expdir, cfg.snapshots or "all")
        shard, device = process_state(device)
        train = load_dataset_zip(cfg.knn_ref, progress=shard.rank == 0).images
        paths = M.MemRatioFiles.at(cfg.root, cfg.log)
        if source is not None:
            summary = M.measure_images(source, train, cfg.knn_ref, paths, device, shard, cfg.overwrite, cfg.batch)
        else:
            with network_limits(cfg.limits):  # the measure loads each snapshot itself
                summary = M.measure_run(cfg.expdir, train, cfg.knn_ref, cfg.seed_list(), paths,
                                        cfg.snapshots or "all", cfg.batch, cfg.sampler, device, shard,
                                        cfg.save_images, cfg.overwrite)
        if shard.rank == 0 and summary is not None:
            where = summary["max_snapshot"] if summary["max_images_seen"] is None else (
                f"{summary['max_snapshot']}, {summary['max_images_seen']} images seen")
            print(f"{paths.root}: max memorization ratio {summary['max_ratio']:.4f} ({where}) over "
                  f"{summary['snapshots']} snapshot{'s' if summary['snapshots'] != 1 else ''}, {summary['n']} samples "
                  f"each; on {shard.world} process{'es' if shard.world > 1 else ''}")
        return summary


def main(argv=None) -> int:
    return run_main("mem_ratio", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""Sample images from an EDM snapshot with EDM's Heun sampler (Karras et al. 2022, Algorithm 2), one PNG per seed.

    python detect/generate.py --model SNAPSHOT_OR_RUN --seeds 0-9999 --batch_size 512 --out DIR [--steps 18]
        [--sigma_min 0.002] [--sigma_max 80] [--rho 7] [--S_churn 0 --S_min 0 --S_max inf --S_noise 1]
        [--class_idx K] [--solver heun|euler] [--subdirs] [--npz] [--device cpu|cuda]
    python detect/generate.py --optimal_denoiser --dataset DATASET.zip [--cond] [--solver heun|euler] ...
    accelerate launch detect/generate.py ...        # shards the seeds across processes

--optimal_denoiser samples with the ideal denoiser of the zip's images in place of a network (Karras et al. 2022,
Eq. 3; common/edm/networks/optimal.py; with --cond, of each class's images): the same sampler, seed rule, outputs and
sharding. --solver heun is Gu et al.'s OptimEDM sampler (EDM's Heun), --solver euler Zhang et al.'s (the same σ
steps without the 2nd-order correction: the last output is D(x; σ_min)).

Writes DIR/{seed:06d}.png (with --subdirs in DIR/{seed - seed % 1000:06d}/), DIR/generate.json (the settings the
images depend on) and with --npz DIR/images.npz (images uint8 N×H×W×C, seeds, labels for a conditional network).
Each image is a function of its seed alone (EDM's seed rule), whatever --batch or the number of processes (up
to the network's fp32 rounding, which depends on the batch size: rarely one uint8 level).
Re-running resumes: seeds whose PNG exists are skipped once it decodes to the network's image shape; damaged ones
are sampled again (the count is printed). Bad input: one line on stderr and exit code 2.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from diffmem.common.cli import ArgumentParser, add_settings_arguments, resolve_device, run_main, settings_from_args
from diffmem.common.edm import sampler as S
from diffmem.common.edm.networks.snapshot import NetworkLimits
from diffmem.common.edm.sampler import SamplerError, SamplerSettings, parse_seeds
from diffmem.common.errors import ConfigError
from diffmem.common.runlock import lock_run_folder
from diffmem.common.settings import device_option, option


@dataclass
class GenerateConfig:
    seeds: str = option(joined=True, help="seeds, e.g. 0-9999 or 1,5,7-9 (one image each)", metavar="LIST")
    outdir: Path = option(flag="--out", aliases=("--outdir",), help="the folder the run writes (one PNG per seed)",
                          type=Path, metavar="DIR")
    # With optimal_denoiser: optional, the network whose σ range the sampler takes.
    network: str | None = option(None, type=str, metavar="SNAPSHOT", flag="--model", aliases=("--network",),
                                 help="a snapshot folder, a training run folder (its newest snapshot) or an EDM "
                                      "network pickle (*.pkl, read without running its code); with "
                                      "--optimal_denoiser, the network whose σ range the sampler takes, so both "
                                      "sample on the same steps")
    optimal_denoiser: bool = option(False, help="sample with the ideal denoiser of --data's images (Karras et "
                                                "al. 2022, Eq. 3)")
    dataset: Path | None = option(None, type=Path, metavar="ZIP", flag="--data", aliases=("--dataset",),
                                  help="EDM dataset zip of the training images (with --optimal_denoiser)")
    cond: bool = option(False, help="class-conditional optimal denoiser: each sample sees its class's images only")
    chunk: int = option(4096, metavar="N", help="training images per distance chunk of the optimal denoiser "
                                                "(memory)")
    batch: int = option(64, metavar="N", flag="--batch_size", aliases=("--batch",), help="images per network call")
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    limits: NetworkLimits = field(default_factory=NetworkLimits)
    class_idx: int | None = option(None, type=int, metavar="K", aliases=("--class",),
                                   help="class of every image (conditional networks; None: each seed draws its "
                                        "own)")
    subdirs: bool = option(False, help="put seed s in the subfolder {s - s %% 1000:06d}/")
    npz: bool = option(False, help="also write DIR/images.npz of all requested seeds")
    grid: Path | None = option(None, type=Path, metavar="PNG",
                               help="also write one PNG tiling all requested seeds (seed order, row by row)")
    grid_scale: int = option(1, metavar="K", help="enlarge each image K× in the grid")
    device: str | None = device_option()

    def seed_list(self) -> list[int]:
        return parse_seeds(self.seeds)

    def validate(self) -> None:
        """Argument-level checks (before torch is imported); raises SamplerError or ConfigError."""
        self.seed_list()
        self.sampler.validate()
        if self.batch < 1:
            raise ConfigError(f"expected --batch_size >= 1, got {self.batch}")
        if self.grid_scale < 1:
            raise ConfigError(f"expected --grid_scale >= 1, got {self.grid_scale}")
        if self.class_idx is not None and self.class_idx < 0:
            raise SamplerError(f"expected --class_idx >= 0, got {self.class_idx}")
        if self.outdir.exists() and not self.outdir.is_dir():
            raise ConfigError(f"{self.outdir}: expected --out to be a folder, it is a file")
        if not self.optimal_denoiser and self.network is None:
            raise ConfigError("expected --model SNAPSHOT (or --optimal_denoiser with --data)")
        if not self.optimal_denoiser and (self.dataset is not None or self.cond):
            raise ConfigError("--dataset and --cond go with --optimal_denoiser")
        if self.optimal_denoiser and self.dataset is None:
            raise ConfigError("--optimal_denoiser needs --dataset DATASET.zip")
        if self.dataset is not None and not self.dataset.is_file():
            raise ConfigError(f"{self.dataset}: no such file (expected an EDM dataset zip for --dataset)")
        if self.chunk < 1:
            raise ConfigError(f"expected --chunk >= 1, got {self.chunk}")


def parse_args(argv=None) -> GenerateConfig:
    p = ArgumentParser(prog="generate", description=__doc__.split("\n\n")[0])
    add_settings_arguments(p, GenerateConfig, exclude=("sampler", "limits"))
    add_settings_arguments(p, SamplerSettings)
    add_settings_arguments(p, NetworkLimits)
    a = p.parse_args(argv)
    return settings_from_args(GenerateConfig, a, sampler=settings_from_args(SamplerSettings, a),
                              limits=settings_from_args(NetworkLimits, a))


def process_state(device: str):
    """(index, count, device, barrier) of this process: Accelerate's when launched on several processes."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        # On a machine without CUDA, accelerate only honours a multi-process launch when told it is on CPU.
        state = PartialState(cpu=device == "cpu")
        return state.process_index, state.num_processes, state.device, state.wait_for_everyone
    return 0, 1, torch.device(device), lambda: None


def run(cfg: GenerateConfig) -> int:
    """Sample the seeds whose PNG is missing (this process's share); returns how many it sampled."""
    cfg.validate()
    seeds = cfg.seed_list()

    from tqdm.auto import tqdm

    from diffmem.common.edm.networks.snapshot import load_network, resolve_snapshot

    with lock_run_folder(cfg.outdir, "--out", ".generate.lock"):
        device = resolve_device(cfg.device)
        if cfg.optimal_denoiser:
            from diffmem.common.edm.networks.optimal import OptimalDenoiser

            reference = resolve_snapshot(cfg.network) if cfg.network is not None else None
            rank, world, device, barrier = process_state(device)
            net = OptimalDenoiser.from_dataset_zip(cfg.dataset, cond=cfg.cond, chunk_size=cfg.chunk).to(device)
            net.check_classes(cfg.class_idx)  # an empty class fails here, not after some images are written
            source = {"network": None, "dataset": str(cfg.dataset.resolve()), "cond": cfg.cond}
            if reference is not None:
                ref_net = load_network(reference, limits=cfg.limits)
                if tuple(ref_net.image_shape) != tuple(net.image_shape):
                    raise ConfigError(f"--model {cfg.network} makes {'x'.join(map(str, ref_net.image_shape))} images"
                                      f" but --dataset {cfg.dataset} holds {'x'.join(map(str, net.image_shape))}")
                # The ideal denoiser is defined for every σ > 0: the reference network's range fixes the steps.
                net.sigma_min, net.sigma_max = ref_net.sigma_min, ref_net.sigma_max
                source["sigma_range_of"] = str(reference.resolve())
        else:
            snapshot = resolve_snapshot(cfg.network)  # SnapshotError before any process group is set up
            rank, world, device, barrier = process_state(device)
            net = load_network(snapshot, device, cfg.limits)
            source = {"network": str(snapshot.resolve())}
        S.check_class_idx(cfg.class_idx, net.label_dim)
        settings = cfg.sampler.for_network(net)

        # The images depend on these (not on the batch or the process count): a resume must not mix others in.
        folder_settings = {**source, **settings.to_dict(), "class_idx": cfg.class_idx,
                           "device": device.type, "subdirs": cfg.subdirs}
        if rank == 0:
            cfg.outdir.mkdir(parents=True, exist_ok=True)
        barrier()
        S.bind_folder_settings(cfg.outdir, folder_settings, write=rank == 0)
        damaged = []
        if rank == 0:
            # A rerun skips the seeds whose PNG exists: check those decode to the network's image shape first, and
            # sample again the ones that do not.
            damaged = S.damaged_images(cfg.outdir, seeds, net.image_shape, cfg.subdirs)
            for seed in damaged:
                S.image_path(cfg.outdir, seed, cfg.subdirs).unlink()
            if damaged:
                print(f"generate: {len(damaged)} damaged PNG{'s' if len(damaged) > 1 else ''} in {cfg.outdir} "
                      f"(not decodable, or not {'×'.join(map(str, net.image_shape))}; first: seed {damaged[0]}) "
                      f"removed; sampling them again", file=sys.stderr)
        already = len(seeds) - len(S.missing_seeds(cfg.outdir, seeds, cfg.subdirs)) if rank == 0 else 0
        barrier()

        # Shard the requested seeds before looking at the disk: each seed has one owner, so no two processes write
        # the same file and none skips a seed another one has not finished.
        todo = S.missing_seeds(cfg.outdir, seeds[rank::world], cfg.subdirs)
        t0 = time.perf_counter()
        bar = tqdm(total=len(todo), desc=f"generate[{rank}]", unit="img", position=rank, disable=not todo)
        for batch in S.generate_images(net, todo, cfg.batch, settings, cfg.class_idx, device):
            for seed, image in zip(batch.seeds, batch.images):
                S.save_png(S.image_path(cfg.outdir, seed, cfg.subdirs), image)
            bar.update(len(batch.seeds))
        bar.close()
        elapsed = time.perf_counter() - t0
        barrier()

        if rank == 0:
            missing = S.missing_seeds(cfg.outdir, seeds, cfg.subdirs)
            if missing:
                raise SamplerError(f"{cfg.outdir}: {len(missing)} of the requested images are missing "
                                   f"(first: seed {missing[0]}); run the command again")
            note = ""
            if cfg.npz or cfg.grid:
                import numpy as np

                images = np.stack([S.load_png(S.image_path(cfg.outdir, s, cfg.subdirs)) for s in seeds])
            if cfg.grid:
                # One source pixel of black between tiles, at any scale.
                S.save_png(cfg.grid, S.image_grid(images, padding=cfg.grid_scale, scale=cfg.grid_scale))
                note += f", {cfg.grid}"
            if cfg.npz:
                labels = (S.seed_labels(seeds, net.image_shape, net.label_dim, cfg.class_idx, device)
                          if net.label_dim else None)
                S.write_images_npz(cfg.outdir / "images.npz", images, seeds, labels)
                note += ", images.npz"
            rate = f" ({len(todo) / elapsed:.2f} images/s on process 0)" if todo else ""
            fixed = f" ({len(damaged)} of them to replace damaged PNGs)" if damaged else ""
            print(f"{cfg.outdir}: {len(seeds)} images{note}; {len(seeds) - already} sampled now{fixed} on {world} "
                  f"process{'es' if world > 1 else ''}, {already} there already; {elapsed:.1f}s{rate}")
        return len(todo)


def main(argv=None) -> int:
    return run_main("generate", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

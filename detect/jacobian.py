"""The rank of the denoiser's Jacobian ∂D(x; σ)/∂x per seed and σ (Zhang et al.), for a snapshot or the optimal
denoiser.

    python detect/jacobian.py --model SNAPSHOT_OR_RUN --seeds 0-15 --out DIR [--trajectory] [--steps 18]
    python detect/jacobian.py --model SNAPSHOT_OR_RUN --seeds 0-15 --sigmas 0.002,0.01,0.05,0.2,1,5 --out DIR
    python detect/jacobian.py --optimal_denoiser --dataset D.zip --seeds 0-15 [--trajectory | --sigmas ...] --out DIR
        [--threshold 0.99] [--method randomized|full] [--chunk 64] [--device cpu|cuda] [--overwrite] [--no_progress]

Where J is taken, for seed s with latent z (EDM's seed rule, as detect/generate.py draws it):
- ``--trajectory`` (the default; Zhang et al.'s): the states x_0 = σ_0·z, …, x_{N−1} of EDM's deterministic Heun
  sampler at its own σ_0 > … > σ_{N−1} (``--steps`` N, σ ∈ [0.002, 80], ρ = 7, clamped to the network's range);
- ``--sigmas``: x = σ·z at each listed σ (the start of a sampler begun at σ).
rank = the smallest k with √(Σ_{j≤k} s_j²) > threshold·‖J‖_F (0 when J = 0), over D = C·H·W. ``--method
randomized`` (default) decides it from block Krylov bounds on a few hundred JVPs and VJPs, wrong with probability
at most --failure_probability, and takes the full Jacobian (``--method full``: J and its SVD) where they do not
decide; each row says which.

Writes DIR/jacobian.jsonl (one row per Jacobian: seed, sigma, rank, rank_ratio = rank/D, dim = D, fro = ‖J‖_F,
method, fallback, subspace and the bounds; appended as computed, so a rerun skips the (seed, σ) pairs done),
DIR/jacobian.json (the settings the rows depend on; a rerun with others is refused), DIR/summary.json (per σ: mean
and spread over the seeds) and DIR/rank.png (rank/dim against SNR 1/σ, log x). Bad input: one line on stderr and
exit code 2.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from diffmem.common.cli import ArgumentParser, add_settings_arguments, resolve_device, run_main, settings_from_args
from diffmem.common.edm.networks.snapshot import NetworkLimits
from diffmem.common.edm.sampler import SamplerSettings, parse_seeds, rounded_sigmas
from diffmem.common.errors import ConfigError
from diffmem.common.settings import device_option, option

RESULTS = "jacobian.jsonl"
SETTINGS = "jacobian.json"
SUMMARY = "summary.json"
PLOT = "rank.png"


@dataclass
class JacobianConfig:
    seeds: str = option(joined=True, help="seeds, e.g. 0-15 or 1,5,7-9", metavar="LIST")
    out: Path = option(aliases=("--outdir",), help="the folder the run writes", type=Path, metavar="DIR")
    network: str | None = option(None, type=str, metavar="SNAPSHOT", flag="--model", aliases=("--network",),
                                 help="a snapshot folder, a run folder (its newest snapshot) or an EDM network "
                                      "pickle (*.pkl, read without running its code)")
    optimal_denoiser: bool = option(False, help="the optimal denoiser of --data (unconditional, float64)")
    dataset: Path | None = option(None, type=Path, metavar="D.zip", flag="--data", aliases=("--dataset",),
                                  help="training set of --optimal_denoiser")
    sigmas: str | None = option(None, type=str, metavar="LIST", joined=True,
                                help="x = σ·z at each σ, e.g. 0.002,0.01,0.05,0.2,1,5 (None: the trajectory)")
    # None: the sampler's default (trajectory only; given with --sigmas it is refused).
    steps: int | None = option(None, type=int, metavar="N",
                               help=f"sampler steps of --trajectory (None: {SamplerSettings.num_steps})")
    threshold: float = option(0.99, flag="--energy_threshold", aliases=("--threshold",),
                              help="energy fraction of the rank")
    # Rows per backward: past a few dozen, larger chunks leave the cache for little gain (README, Jacobian).
    chunk: int = option(64, metavar="B", help="Jacobian rows (or products) per backward")
    method: str = option("randomized", choices=("randomized", "full"),
                         help="randomized: the rank from block Krylov bounds, the full Jacobian where they do not "
                              "decide; full: J and its SVD")
    block: int = option(32, metavar="B", help="--method randomized: Krylov block, directions added per step")
    probes: int = option(64, metavar="P", help="--method randomized: Gaussian probes bounding the energy outside "
                                               "the subspace")
    max_subspace: int | None = option(None, type=int, metavar="M",
                                      help="--method randomized: subspace size at which the full Jacobian is taken "
                                           "(None: D/8)")
    failure_probability: float = option(1e-6, metavar="DELTA",
                                        help="--method randomized: probability that a decided rank is wrong")
    device: str | None = device_option()
    overwrite: bool = option(False, help="discard the rows already in DIR")
    progress: bool = option(True, flag="--no_progress", help="no progress bar")
    limits: NetworkLimits = field(default_factory=NetworkLimits)

    @property
    def mode(self) -> str:
        return "trajectory" if self.sigmas is None else "noise"

    def seed_list(self) -> list[int]:
        return parse_seeds(self.seeds)

    def sigma_list(self) -> list[float]:
        """The --sigmas values; one-line ConfigError for anything but distinct finite numbers > 0."""
        try:
            values = [float(t) for t in self.sigmas.split(",") if t.strip()]
        except ValueError:
            raise ConfigError(f"bad --sigmas {self.sigmas!r}: expected comma-separated numbers") from None
        if not values:
            raise ConfigError("--sigmas is empty; give comma-separated σ > 0, e.g. 0.002,0.01,0.05")
        bad = [v for v in values if not (math.isfinite(v) and v > 0)]
        if bad:
            raise ConfigError(f"bad --sigmas {self.sigmas!r}: σ must be finite and > 0, got {bad[0]:g}")
        if len(set(values)) != len(values):
            raise ConfigError(f"bad --sigmas {self.sigmas!r}: a σ is listed more than once")
        return values

    def validate(self) -> None:
        """Argument-level checks (before torch is imported); raises ConfigError or SamplerError."""
        self.seed_list()
        if (self.network is None) == (not self.optimal_denoiser):
            raise ConfigError("give --model SNAPSHOT or --optimal_denoiser (with --data), not both")
        if self.optimal_denoiser and self.dataset is None:
            raise ConfigError("--optimal_denoiser needs --dataset D.zip (its training set)")
        if self.network is not None and self.dataset is not None:
            raise ConfigError("--data is the training set of --optimal_denoiser; a --model carries its own "
                              "weights")
        if self.dataset is not None and not self.dataset.is_file():
            raise ConfigError(f"--dataset {self.dataset}: no such file (expected an EDM dataset zip)")
        if self.sigmas is not None:
            self.sigma_list()
            if self.steps is not None:
                raise ConfigError("--steps sets the sampler's trajectory; it does not apply with --sigmas")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"expected --steps >= 1, got {self.steps}")
        if not 0 < self.threshold < 1:
            raise ConfigError(f"expected 0 < --energy_threshold < 1, got {self.threshold}")
        if self.chunk < 1:
            raise ConfigError(f"expected --chunk >= 1, got {self.chunk}")
        if self.block < 1:
            raise ConfigError(f"expected --block >= 1, got {self.block}")
        if self.probes < 2:
            raise ConfigError(f"expected --probes >= 2, got {self.probes}")
        if self.max_subspace is not None and self.max_subspace < self.block:
            raise ConfigError(f"expected --max_subspace >= --block ({self.block}), got {self.max_subspace}")
        if not 0 < self.failure_probability < 1:
            raise ConfigError(f"expected 0 < --failure_probability < 1, got {self.failure_probability}")
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"{self.out}: expected --out to be a folder, it is a file")


def parse_args(argv=None) -> JacobianConfig:
    p = ArgumentParser(prog="jacobian", description=__doc__.split("\n\n")[0])
    add_settings_arguments(p.add_mutually_exclusive_group(required=True), JacobianConfig,
                           only=("network", "optimal_denoiser"))
    where = p.add_mutually_exclusive_group()
    add_settings_arguments(where, JacobianConfig, only=("sigmas",))
    # The trajectory is what no --sigmas means: the switch only documents it and excludes --sigmas.
    where.add_argument("--trajectory", action="store_true",
                       help="the Heun sampler's states x_i at its σ_i, σ_max first (what no --sigmas means)")
    add_settings_arguments(p, JacobianConfig, exclude=("network", "optimal_denoiser", "sigmas", "limits"))
    add_settings_arguments(p, NetworkLimits)
    a = p.parse_args(argv)
    return settings_from_args(JacobianConfig, a, limits=settings_from_args(NetworkLimits, a))


def load_denoiser(cfg: JacobianConfig, device):
    """(denoiser, its description for the settings, Jacobian method): a snapshot's network or the optimal denoiser."""
    if cfg.optimal_denoiser:
        from diffmem.common.edm.networks.optimal import OptimalDenoiser

        # torch.func's vmapped cdist backward is wrong (common.edm.measure.jacobian): the batch method needs no vmap.
        return OptimalDenoiser.from_dataset_zip(cfg.dataset).to(device), f"optimal:{cfg.dataset.resolve()}", "batch"
    from diffmem.common.edm.networks.snapshot import load_network, resolve_snapshot

    snapshot = resolve_snapshot(cfg.network)
    return load_network(snapshot, device, cfg.limits), f"network:{snapshot.resolve()}", "vmap"


def evaluation_sigmas(cfg: JacobianConfig, net) -> tuple[list[float], dict]:
    """The σ's (the trajectory's schedule t_0 … t_N, or the --sigmas list) and the settings they come from."""
    if cfg.mode == "trajectory":
        sampler = SamplerSettings(num_steps=cfg.steps or SamplerSettings.num_steps).for_network(net)
        # The states EDM's sampler visits: an iDDPM network's steps snapped to its σ table (round_sigma).
        steps = rounded_sigmas(sampler.sigmas(), getattr(net, "round_sigma", None))
        return steps.tolist(), {"sampler": sampler.to_dict()}
    sigmas = cfg.sigma_list()
    outside = [s for s in sigmas if not net.sigma_min <= s <= net.sigma_max]
    if outside:
        raise ConfigError(f"--sigmas {outside[0]:g} is outside the network's range [{net.sigma_min:g}, "
                          f"{net.sigma_max:g}]")
    return sigmas, {}


def print_summary(stats: list[dict], out: Path) -> None:
    """One line per σ: samples, mean rank and rank/dim (mean ± std, min–max)."""
    print(f"{'sigma':>10} {'SNR':>9} {'n':>4} {'rank':>8} {'rank/dim':>18} {'min-max':>13}")
    for r in stats:
        print(f"{r['sigma']:10.4g} {r['snr']:9.4g} {r['n']:4d} {r['rank_mean']:8.2f} "
              f"{r['ratio_mean']:9.4f} ± {r['ratio_std']:6.4f} {r['ratio_min']:6.3f}-{r['ratio_max']:.3f}")
    print(f"{out}: {RESULTS}, {SUMMARY}, {PLOT}")


def run(cfg: JacobianConfig) -> int:
    """Compute the Jacobians not yet in DIR, then the summary and the plot; returns how many were computed."""
    cfg.validate()
    seeds = cfg.seed_list()


    from diffmem.common.edm.measure import jacobian as J
    from diffmem.common.results import append_results, bind_run_settings, read_results, write_json_atomic

    device = resolve_device(cfg.device)
    denoise, described, autodiff = load_denoiser(cfg, device)
    sigmas, sigma_settings = evaluation_sigmas(cfg, denoise)

    # The rows depend on these; seeds and σ's may grow between runs (each row stands on its own).
    settings = {"denoiser": described, "mode": cfg.mode, "threshold": cfg.threshold, "device": device,
                **sigma_settings}
    cfg.out.mkdir(parents=True, exist_ok=True)
    results = cfg.out / RESULTS
    if cfg.overwrite:
        results.unlink(missing_ok=True)
    rows = read_results(results, repair=True)
    bind_run_settings(cfg.out / SETTINGS, settings, bool(rows), "another --out")
    done = {(int(r["seed"]), float(r["sigma"])) for r in rows}

    computed = 0
    randomized = J.RandomizedSettings(cfg.block, cfg.probes, cfg.max_subspace, cfg.failure_probability)
    for row in J.jacobian_rows(denoise, seeds, denoise.image_shape, cfg.mode, sigmas, cfg.threshold,
                               denoise.label_dim, done, cfg.chunk, autodiff, device, cfg.progress, cfg.method,
                               randomized):
        append_results(results, [row.to_dict()])
        computed += 1

    wanted = {(s, float(t)) for s in seeds for t in J.point_sigmas(cfg.mode, sigmas)}
    mine = [r for r in read_results(results) if (int(r["seed"]), float(r["sigma"])) in wanted]
    stats = J.summarize(mine)
    write_json_atomic(cfg.out / SUMMARY, {"settings": settings, "seeds": len(seeds), "per_sigma": stats})
    title = f"{Path(described.split(':', 1)[1]).name} ({cfg.mode}, {len(seeds)} seeds)"
    J.plot_rank_curve(mine, cfg.out / PLOT, title)
    print_summary(stats, cfg.out)
    decided = sum(r.get("method") == "randomized" for r in mine)
    print(f"ranks decided randomized: {decided} of {len(mine)}; the full Jacobian: {len(mine) - decided}")
    return computed


def main(argv=None) -> int:
    return run_main("jacobian", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

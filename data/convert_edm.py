"""Convert an EDM / DiffMemorize / Zhang et al. network pickle into a diffmem snapshot folder, running none of its code.

    python data/convert_edm.py --model edm-cifar10-32x32-uncond-vp.pkl --out nets/edm-uncond-vp

The pickle's ``ema`` network is read by a restricted unpickler (``common.edm.networks.edm_pickle``: only the globals a
snapshot needs; the module source EDM embeds is never executed) and rebuilt as our ``SongUNet`` / ``DhariwalUNet``
with its preconditioning. OUT is a snapshot folder (``save_pretrained`` + ``snapshot.json`` with the source file and
its SHA-256, the architecture, the preconditioning and the sampler defaults) that every unconditional CLI takes as
``--model OUT``. The CLIs also take the pickle itself (converted in memory, the same network). The folder is
written under a temporary name and renamed. Bad input: one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from diffmem.common.cli import ArgumentParser, add_settings_arguments, run_main, settings_from_args
from diffmem.common.edm.networks.snapshot import NetworkLimits
from diffmem.common.errors import ConfigError
from diffmem.common.settings import option


@dataclass
class ConvertConfig:
    network: Path = option(flag="--model", aliases=("--network",), type=Path, metavar="PKL",
                           help="EDM network pickle (network-snapshot-NNNNNN.pkl, edm-cifar10-32x32-*.pkl, …)")
    out: Path = option(help="the snapshot folder to write", type=Path, metavar="DIR")
    overwrite: bool = option(False, help="replace an existing --out that holds something else")
    limits: NetworkLimits = field(default_factory=NetworkLimits)

    def validate(self) -> None:
        """Argument-level checks; raises ConfigError."""
        if not self.network.is_file():
            raise ConfigError(f"{self.network}: no such file (expected an EDM network pickle)")
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"{self.out}: expected --out to be a folder, it is a file")


def parse_args(argv=None) -> ConvertConfig:
    p = ArgumentParser(prog="convert_edm", description=__doc__.split("\n\n")[0])
    add_settings_arguments(p, ConvertConfig, exclude=("limits",))
    add_settings_arguments(p, NetworkLimits)
    a = p.parse_args(argv)
    return settings_from_args(ConvertConfig, a, limits=settings_from_args(NetworkLimits, a))


def run(cfg: ConvertConfig) -> None:
    cfg.validate()
    from diffmem.common.edm.networks.snapshot import convert_edm_pickle, load_network

    out, info = convert_edm_pickle(cfg.network, cfg.out, overwrite=cfg.overwrite, limits=cfg.limits)
    net = load_network(out)
    shape = "x".join(map(str, net.image_shape))
    cond = f", {net.label_dim} classes" if net.label_dim else ", unconditional"
    n_params = sum(p.numel() for p in net.parameters())
    print(f"{out}: {info['preconditioning']} + {info['architecture']} ({n_params:,} parameters, "
          f"{shape}{cond}, σ in [{net.sigma_min:g}, {net.sigma_max:g}]) from {cfg.network} "
          f"(sha256 {info['converted_from']['sha256'][:12]}…)")


def main(argv=None) -> int:
    return run_main("convert_edm", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

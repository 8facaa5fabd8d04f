"""Build an EDM dataset zip (NVlabs/edm's and DiffMemorize's format) with DiffMemorize's subset rules.

    python data/dataset_tool.py --data SRC --out OUT.zip [--max_images N] [--subset first|random] [--seed S]
        [--classes C] [--labels true|random|unique|none] [--num_classes K] [--resolution R]
        [--transform center-crop] [--mix_source SRC2 --mix_alpha A] [--split train|test] [--channels 1|3]
    python data/dataset_tool.py --data molrg --out OUT.zip [--molrg_res 4] [--molrg_classes 2] [--molrg_dim 7]
        [--molrg_per_class 350] [--seed S]

SRC is the CIFAR-10 python tarball (cifar-10-python.tar.gz), a folder of images (labels from its dataset.json),
an EDM dataset zip, or ``digits`` (scikit-learn's bundled 8×8 digits; needs no download). ``molrg`` writes Zhang et
al.'s mixture of low-rank Gaussians instead (``common.edm.dataset.molrg``): float data in a zip with ``data.npy``,
labels =
class; it takes only the --molrg_* options and --seed. The rules (class-balanced
first N/C, seeded draws, label rules, Lanczos resizing, intra-class mixing) are those of ``common.edm.dataset.edm_zip``.
The zip is written under a temporary name beside OUT.zip and renamed when complete (a temporary left by a killed
write is removed by the next write into that folder); an existing OUT.zip is replaced only with --overwrite.
Bad input: one line on stderr (``FILE[:MEMBER]: what was expected``) and exit code 2, with no output left behind.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from diffmem.common.cli import ArgumentParser, add_settings_arguments, run_main, settings_from_args
from diffmem.common.edm.dataset.edm_zip import write_dataset_zip, write_float_dataset_zip
from diffmem.common.edm.dataset.molrg import MoLRGRecipe, molrg_dataset
from diffmem.common.edm.dataset.recipe import DatasetRecipe, build_dataset, mix_count
from diffmem.common.errors import ConfigError
from diffmem.common.settings import option

MOLRG = "molrg"


@dataclass
class DatasetToolConfig:
    recipe: DatasetRecipe
    dest: Path = option(flag="--out", aliases=("--dest",), type=Path, metavar="OUT.zip",
                        help="the EDM dataset zip to write (this command's one product)")
    molrg: MoLRGRecipe | None = None  # set for --data molrg (then recipe only names the source)
    molrg_flags: tuple[str, ...] = ()  # the --molrg_* options given (refused without --data molrg)
    overwrite: bool = option(False, help="replace --out if it exists (refused otherwise)")
    # Validate only (a sweep checks its stage arguments before the stages run).
    check_args: bool = option(False, help="parse and check the arguments, then exit without reading --data or "
                                          "writing anything (detect/emm.py checks a sweep's stage arguments so)")

    def validate(self) -> None:
        """Argument-level checks before any source is read; raises ConfigError with the one-line message."""
        self._validate_molrg()
        self.recipe.validate()
        if self.dest.suffix.lower() != ".zip":
            raise ConfigError(f"--out must name a .zip file (an EDM dataset zip), got {self.dest}")
        if self.dest.is_dir():
            raise ConfigError(f"--out {self.dest} is a folder; expected a .zip file name")
        if self.dest.exists() and not self.overwrite and not self.check_args:
            raise ConfigError(f"--out {self.dest} exists; pass --overwrite to replace it, or write another file")
        for flag, src in (("--data", self.recipe.source), ("--mix_source", self.recipe.mix_source)):
            if src is not None and Path(src).resolve() == self.dest.resolve():
                raise ConfigError(f"--out {self.dest} is also {flag}; write the new dataset elsewhere")

    def _validate_molrg(self) -> None:
        """--molrg_* only with --data molrg, and none of the image-selection options with it (ConfigError)."""
        if self.molrg is None:
            if self.molrg_flags:
                raise ConfigError(f"{self.molrg_flags[0]} applies to --data molrg only")
            return
        r = self.recipe
        image_only = {"--max_images": r.max_images, "--subset": r.subset != "first" or None, "--classes": r.classes,
                      "--labels": r.labels, "--num_classes": r.num_classes, "--resolution": r.resolution,
                      "--transform": r.transform, "--mix_source": r.mix_source, "--mix_alpha": r.mix_alpha,
                      "--split": r.split != "train" or None, "--channels": r.channels}
        for flag, value in image_only.items():
            if value is not None:
                raise ConfigError(f"{flag} selects images and does not apply to --data molrg (float data; it takes "
                                  f"--molrg_res, --molrg_classes, --molrg_dim, --molrg_per_class and --seed)")
        self.molrg.validate()


# MoLRGRecipe's fields as --molrg_* options (its seed is --seed).
MOLRG_OPTIONS = tuple(f for f in fields(MoLRGRecipe) if f.name != "seed")


def parse_args(argv=None) -> DatasetToolConfig:
    p = ArgumentParser(prog="dataset_tool", description=__doc__.split("\n\n")[0])
    add_settings_arguments(p, DatasetRecipe)
    add_settings_arguments(p, DatasetToolConfig, exclude=("recipe", "molrg", "molrg_flags"))
    g = p.add_argument_group("MoLRG (--data molrg)")
    for f in MOLRG_OPTIONS:
        # Not given, an option is absent from the namespace (SUPPRESS), so one given without --data molrg is
        # refused; MoLRGRecipe fills in its own default.
        g.add_argument(f"--molrg_{f.name}", type=int, metavar=f.metadata["metavar"], default=argparse.SUPPRESS,
                       help=f"{f.metadata['help']} (default: {f.default})")
    a = p.parse_args(argv)
    given = {f.name: getattr(a, f"molrg_{f.name}") for f in MOLRG_OPTIONS if hasattr(a, f"molrg_{f.name}")}
    molrg = MoLRGRecipe(**given, seed=a.seed) if a.source == MOLRG else None
    return settings_from_args(DatasetToolConfig, a, recipe=settings_from_args(DatasetRecipe, a), molrg=molrg,
                              molrg_flags=tuple(f"--molrg_{k}" for k in given))


def run(cfg: DatasetToolConfig) -> None:
    """Build the dataset in memory (every check passes first), then write the zip atomically."""
    cfg.validate()
    if cfg.check_args:
        return
    if cfg.molrg is not None:
        data = molrg_dataset(cfg.molrg)
        write_float_dataset_zip(cfg.dest, data.images, data.labels, cfg.molrg.to_dict())
        n, c, h, w = data.images.shape
        m = cfg.molrg
        print(f"wrote {cfg.dest}: {n} MoLRG samples {c}×{h}×{w} (float32), {m.classes} classes of dimension "
              f"{m.dim} in D = {m.ambient_dim}, {m.per_class} per class; labels: class")
        return
    data = build_dataset(cfg.recipe)
    write_dataset_zip(cfg.dest, data.images, data.labels)
    n, c, h, w = data.images.shape
    if data.labels is None:
        labels = "none"
    else:
        labels = f"{cfg.recipe.labels or 'true'}, {len(set(data.labels.tolist()))} distinct"
    mixed = ""
    if cfg.recipe.mix_source is not None:
        mixed = f", {mix_count(cfg.recipe.mix_alpha, n)} of them from {cfg.recipe.mix_source}"
    print(f"wrote {cfg.dest}: {n} images {c}×{h}×{w}{mixed}; labels: {labels}")


def main(argv=None) -> int:
    return run_main("dataset_tool", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
